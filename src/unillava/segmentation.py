"""Running OMG-LLaVA for text and masks: greedy answers, then their [SEG] tokens decoded into masks.

The model (`unillava.omg.OMGLlavaModel`) only computes (`generate`, `last_hidden_states`, `decode_seg`,
`prompt_regions`); this module turns prompts into its inputs and its outputs into answers, with the
processor of the `InferenceModel` that owns it (which loads images and batches for it).
`Segmenter.results_for_encoded` answers conversations already encoded, so the server runs what it
encoded (and counted) on admission without encoding again.

[SEG] masks come from the last image of each conversation (OMG-LLaVA takes one image per conversation).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from unillava.conversation import Encoded, Message, user_message
from unillava.data.llava_format import MARK_TOKEN, REGION_TOKEN, SEG_TOKEN
from unillava.data.masks import rle_json
from unillava.errors import UnillavaError
from unillava.generation import GenerationSettings
from unillava.omg.model import PHRASE_END, PHRASE_START, OMGLlavaModel, phrases_for_segs
from unillava.omg.perception.geometry import PadGeometry
from unillava.omg.perception.prompts import PromptRegion
from unillava.processor import Processor

PromptDicts = Sequence[Mapping[str, Any]]


@dataclass
class SegmentationResult:
    """One answer: its text (markup kept) and one entry per [SEG], in order."""

    text: str
    masks: list[np.ndarray] = field(default_factory=list)
    phrases: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    @property
    def rles(self) -> list[dict[str, Any]]:
        """COCO compressed RLE per mask, counts as str (JSON-ready)."""
        return [rle_json(mask) for mask in self.masks]

    @property
    def plain_text(self) -> str:
        """The text without [SEG] and phrase markers, for display."""
        text = self.text.replace(SEG_TOKEN, "").replace(PHRASE_START, "").replace(PHRASE_END, "")
        return re.sub(r"\s+([.,;:!?])", r"\1", re.sub(r"\s{2,}", " ", text)).strip()

    def mask_records(self, image_index: int) -> list[dict[str, Any]]:
        """The masks as the server's pixel hook returns them (it encodes them for the response)."""
        return [
            {"mask": m, "phrase": p, "score": s, "image_index": image_index}
            for m, p, s in zip(self.masks, self.phrases, self.scores, strict=True)
        ]


def with_prompt_markers(conversation: list[Message], visual_prompts: PromptDicts) -> list[Message]:
    """The conversation, with a marker per prompt ("region1 <region>", "point1 <mark>") appended to the
    last user turn if it has none at all, so prompts given without markers still reach the model."""
    if any(REGION_TOKEN in m.text or MARK_TOKEN in m.text for m in conversation):
        return conversation
    markers = " ".join(
        f"point{i + 1} {MARK_TOKEN}" if p.get("type") == "point" else f"region{i + 1} {REGION_TOKEN}"
        for i, p in enumerate(visual_prompts)
    )
    last_user = max(i for i, m in enumerate(conversation) if m.role == "user")
    out = list(conversation)
    out[last_user] = Message("user", [*conversation[last_user].content, " " + markers])
    return out


class Segmenter:
    """An OMG-LLaVA model with the processor that encodes its prompts: text + masks per conversation."""

    def __init__(self, model: OMGLlavaModel, processor: Processor):
        self.model = model
        self.processor = processor

    def check_prompt_markers(self, input_ids: torch.Tensor, regions: Sequence[Sequence[Any]] | None) -> None:
        """The stated rule: each `<region>`/`<mark>` in a prompt needs exactly one visual prompt and each
        prompt one marker (`with_prompt_markers` appends markers when the text has none)."""
        token_ids = self.model.token_ids
        marker_ids = torch.tensor([token_ids[REGION_TOKEN], token_ids[MARK_TOKEN]], device=input_ids.device)
        for row, count in enumerate(torch.isin(input_ids, marker_ids).sum(dim=1).tolist()):
            given = 0 if regions is None else len(regions[row])
            if count != given:
                raise UnillavaError(
                    f"conversation {row}: {count} <region>/<mark> marker(s) but {given} visual "
                    "prompt(s); give one box/point/mask per marker"
                )

    @torch.no_grad()
    def results_for_encoded(
        self,
        encoded: Sequence[Encoded],
        pixels: Sequence[list[torch.Tensor]],
        pictures: Sequence[Sequence[Image.Image]],
        *,
        max_new_tokens: int = 256,
        visual_prompts: Sequence[PromptDicts | None] | None = None,
    ) -> list[SegmentationResult]:
        """Greedy answers to encoded prompts, then one teacher-forced pass per answer to read the [SEG]
        hidden states and decode their masks at each image's own size (binarised at probability 0.5).
        `pictures` are the images as given (their sizes place the masks); `visual_prompts`: per
        conversation, prompt dicts that fill its `<region>`/`<mark>` tokens in order."""
        model, processor = self.model, self.processor
        regions: list[list[PromptRegion]] | None = None
        if visual_prompts is not None:
            regions = [
                model.prompt_regions(p or [], ims) for p, ims in zip(visual_prompts, pictures, strict=True)
            ]
        batch = processor.batch_prompts(encoded, pixels)
        self.check_prompt_markers(batch.input_ids, regions)
        batch = batch.to(model.device)
        settings = GenerationSettings(max_new_tokens=max_new_tokens)
        new_ids = model.generate(
            batch.input_ids,
            attention_mask=batch.attention_mask,
            images=batch.images,
            visual_prompts=regions,
            **settings.generate_kwargs(processor),
        )
        stops = set(processor.stop_token_ids) | {processor.tokenizer.pad_token_id}
        results = []
        image_start = 0
        for row, prompt_ids in enumerate(encoded):
            row_images = batch.images[image_start : image_start + len(pictures[row])]
            image_start += len(pictures[row])
            answer = []
            for token in new_ids[row].tolist():
                if token in stops:
                    break
                answer.append(token)
            text = processor.tokenizer.decode(answer, skip_special_tokens=True).strip()
            result = SegmentationResult(text, phrases=phrases_for_segs(text))
            if model.seg_token_id in answer and row_images:
                prompt = batch.input_ids[row, batch.input_ids.shape[1] - len(prompt_ids.input_ids) :]
                ids = torch.cat([prompt, torch.tensor(answer, device=prompt.device)])[None]
                self._add_masks(
                    result, ids, row_images, pictures[row][-1], None if regions is None else regions[row]
                )
            results.append(result)
        return results

    def _add_masks(
        self,
        result: SegmentationResult,
        ids: torch.Tensor,
        images: list[torch.Tensor],
        picture: Image.Image,
        prompts: Sequence[PromptRegion] | None,
    ) -> None:
        """Decode the [SEG] tokens of prompt + answer `ids` (1, L) over the last image into `result`."""
        model = self.model
        hidden = model.last_hidden_states(ids, images, prompts)
        positions = (ids[0] == model.seg_token_id).nonzero().flatten()
        decoded = model.decode_seg(images[-1], hidden[positions])
        geometry = PadGeometry(picture.width, picture.height, model.config.vision.image_size)
        size = images[-1].shape[-1]
        logits = F.interpolate(
            decoded.mask_logits[-1][:, 0:1].float(), size=(size, size), mode="bilinear", align_corners=False
        )[:, 0]
        probs = geometry.logits_to_image(logits).sigmoid()
        for q in range(probs.shape[0]):
            mask = (probs[q] > 0.5).cpu().numpy()
            result.masks.append(mask)
            result.scores.append(float(probs[q][probs[q] > 0.5].mean()) if mask.any() else 0.0)
        result.phrases = (result.phrases + [""] * len(result.masks))[: len(result.masks)]

    def generate_results(
        self,
        conversations: Sequence[list[Message]],
        images: Sequence[Sequence[Image.Image]],
        *,
        max_new_tokens: int = 256,
        visual_prompts: Sequence[PromptDicts | None] | None = None,
    ) -> list[SegmentationResult]:
        """`results_for_encoded` for conversations and PIL images: each is encoded here first."""
        prepared = [
            self.processor.encode_prompt(c, ims) for c, ims in zip(conversations, images, strict=True)
        ]
        return self.results_for_encoded(
            [e for e, _ in prepared],
            [p for _, p in prepared],
            images,
            max_new_tokens=max_new_tokens,
            visual_prompts=visual_prompts,
        )

    def segment(
        self,
        image: Image.Image,
        prompt: str,
        *,
        max_new_tokens: int = 64,
        visual_prompts: PromptDicts | None = None,
    ) -> SegmentationResult:
        """One image, one prompt ("Please segment the red circle in this image.") -> text and masks.
        `visual_prompts` (box / point / mask dicts in image pixels) fill the prompt's `<region>`/`<mark>`
        tokens, which are appended when the prompt has none."""
        conversation = [user_message(prompt, 1)]
        if visual_prompts:
            conversation = with_prompt_markers(conversation, visual_prompts)
        return self.generate_results(
            [conversation],
            [[image]],
            max_new_tokens=max_new_tokens,
            visual_prompts=[list(visual_prompts)] if visual_prompts else None,
        )[0]

    def answer_pixels(
        self,
        encoded: Encoded,
        pixels: list[torch.Tensor],
        pictures: Sequence[Image.Image],
        visual_prompts: PromptDicts,
        *,
        settings: GenerationSettings,
        return_masks: bool,
    ) -> tuple[str, list[dict[str, Any]]]:
        """The server's pixel-level request, already encoded (markers included): the greedy answer (up to
        `settings.max_new_tokens`) and, with `return_masks`, one mask record per [SEG]."""
        result = self.results_for_encoded(
            [encoded],
            [pixels],
            [pictures],
            max_new_tokens=settings.max_new_tokens,
            visual_prompts=[visual_prompts] if visual_prompts else None,
        )[0]
        return result.text, result.mask_records(len(pictures) - 1) if return_masks else []
