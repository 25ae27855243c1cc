"""OMG-LLaVA's pixel-level model: [SEG] tokens decoded into masks by the frozen segmenter.

`OMGLlavaModel` is the core `LlavaModel` (with the `omg` tower) plus:
- the special tokens `[SEG]`, `<p>`, `</p>`, `<region>`, `<mark>`, each one token id even inside text
  (added as ordinary, non-special added tokens: the conversation encoder splits *special* tokens typed
  in messages into plain text, and answers must keep them when decoded);
- `seg_head` (held by the tower, so `train_vision` trains it), an MLP from the LLM's last hidden state
  at each [SEG] (H -> 2D -> 2D), split into query content and position and decoded as one extra query
  over the image's cached segmenter memory, so every [SEG] gives one mask, in text order;
- the training loss text CE + 2.0 * mask BCE + 0.5 * Dice (BCE and Dice averaged over decoder layers),
  plus stage 1's object-token round-trip regulariser when `vision.extra.object_regularizer` is set;
- empty object-token slots masked out of attention and position ids (`prepare_inputs`, see vision/omg.py);
- visual prompts: each `<region>`/`<mark>` token replaced by its prompt's region-restricted decoder query,
  projected like an object token (`unillava.perception.prompts`);
- `segment`, `generate_with_masks` and `chat_pixels` (text + masks as arrays, COCO RLE and the phrase
  of the `<p>..</p>` before each [SEG]); `supports_segmentation` and
  `supports_visual_prompts` for the server.

[SEG] masks come from the last image of each sample (OMG-LLaVA takes one image per conversation).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from torch import nn
from transformers import AddedToken
from transformers.modeling_outputs import CausalLMOutputWithPast

from unillava.config import ModelConfig
from unillava.conversation import Message, user_message
from unillava.data.images import load_image
from unillava.data.llava_format import MARK_TOKEN, REGION_TOKEN, SEG_TOKEN, parse_record
from unillava.errors import ConfigError, UnillavaError
from unillava.hub.omg_xtuner import (  # noqa: F401  (re-exported: the old names)
    XTUNER_PREFIXES,
    XTUNER_SEPARATOR,
    convert_xtuner_projectors,
)
from unillava.modeling import LlavaModel, splice_image_features, supervised_token_loss
from unillava.perception.geometry import PadGeometry
from unillava.perception.model import DecodeOutput
from unillava.perception.prompts import PromptRegion, encode_prompts, mask_targets, prompt_regions
from unillava.vision import VisionTower

PHRASE_START = "<p>"
PHRASE_END = "</p>"
OMG_TOKENS = (SEG_TOKEN, PHRASE_START, PHRASE_END, REGION_TOKEN, MARK_TOKEN)
MASK_BCE_WEIGHT = 2.0
MASK_DICE_WEIGHT = 0.5
REFSEG_PROMPT = "Please segment {expression} in this image."
_PHRASE = re.compile(re.escape(PHRASE_START) + r"(.*?)" + re.escape(PHRASE_END), re.S)


def add_omg_tokens(tokenizer: Any, language_model: nn.Module) -> dict[str, int]:
    """Add OMG's tokens as single, non-special added tokens (growing the embeddings); returns their ids."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in OMG_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in missing])
    ids = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in OMG_TOKENS}
    if max(ids.values()) >= language_model.get_input_embeddings().num_embeddings:
        language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return ids


def mask_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-mask BCE (mean over pixels) and Dice loss; logits (N, h, w), targets (N, H, W) in 0..1,
    resampled to the logits' size (area) so a large ground truth costs nothing at low resolution."""
    if targets.shape[-2:] != logits.shape[-2:]:
        targets = F.interpolate(targets[:, None].float(), size=logits.shape[-2:], mode="area")[:, 0]
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(1)
    probs = logits.sigmoid().flatten(1)
    flat = targets.flatten(1)
    dice = 1 - (2 * (probs * flat).sum(1) + 1) / (probs.sum(1) + flat.sum(1) + 1)
    return bce, dice


def phrases_for_segs(text: str) -> list[str]:
    """The `<p>..</p>` phrase before each [SEG] since the previous [SEG] ("" when there is none)."""
    phrases = []
    for chunk in text.split(SEG_TOKEN)[:-1]:
        found = _PHRASE.findall(chunk)
        phrases.append(found[-1].strip() if found else "")
    return phrases


@dataclass
class OMGOutput(CausalLMOutputWithPast):
    """The LM output plus the parts of the loss and the [SEG] masks (last decoder layer)."""

    text_loss: torch.Tensor | None = None
    mask_bce: torch.Tensor | None = None
    mask_dice: torch.Tensor | None = None
    seg_mask_logits: list[torch.Tensor] | None = None
    object_regularizer: torch.Tensor | None = None


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
        out = []
        for mask in self.masks:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            out.append({"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")})
        return out

    @property
    def plain_text(self) -> str:
        """The text without [SEG] and phrase markers, for display."""
        text = self.text.replace(SEG_TOKEN, "").replace(PHRASE_START, "").replace(PHRASE_END, "")
        return re.sub(r"\s+([.,;:!?])", r"\1", re.sub(r"\s{2,}", " ", text)).strip()


class OMGLlavaModel(LlavaModel):
    """LlavaModel + [SEG] head over the OMG tower's frozen segmenter."""

    supports_segmentation = True
    supports_visual_prompts = True
    supports_feature_cache = False

    def __init__(
        self, config: ModelConfig, vision_tower: VisionTower, language_model: nn.Module, tokenizer: Any
    ):
        super().__init__(config, vision_tower, language_model, tokenizer)
        if not hasattr(vision_tower, "memory_for"):
            raise ConfigError(f"vision.type: an OMG model needs the 'omg' tower, got {config.vision.type!r}")
        self.token_ids = add_omg_tokens(tokenizer, language_model)
        self.seg_token_id = self.token_ids[SEG_TOKEN]
        vision_tower.attach_language_model(language_model.get_input_embeddings().embedding_dim)
        self._processor: Any = None

    @property
    def seg_head(self) -> nn.Module:
        """The [SEG] text-to-vision MLP; it lives in the tower so `train_vision` trains it."""
        return self.vision_tower.seg_head

    # -- [SEG] -> masks ------------------------------------------------------------------------------

    def decode_seg(self, pixel_values: torch.Tensor, seg_hidden: torch.Tensor) -> DecodeOutput:
        """Masks for [SEG] hidden states (N, H) over one image (3, H, W): N independent extra queries
        through the frozen decoder (or its trainable copy, `vision.extra.seg_decoder: trainable`); mask
        logits (N, 1, H/4, W/4) per decoder layer."""
        tower = self.vision_tower
        perception = tower.perception
        memory = tower.memory_for(pixel_values).memory.select(0, repeat=seg_hidden.shape[0])
        query = self.seg_head(seg_hidden).to(memory.mask_features.dtype)
        content, position = query.split(perception.hidden_dim, dim=-1)
        return perception.decode(memory, content[:, None], position[:, None], decoder=tower.seg_decoder)

    def _images_per_row(self, input_ids: torch.Tensor, counts: list[int]) -> list[list[int]]:
        """Which images (flat indices) each row's image tokens belong to, from the tokens they take."""
        slots = (input_ids == self.image_token_id).sum(1).tolist()
        rows: list[list[int]] = []
        image = 0
        for n in slots:
            mine = []
            while n > 0 and image < len(counts):
                n -= counts[image]
                mine.append(image)
                image += 1
            rows.append(mine)
        return rows

    def prompt_tokens(self, pixel_values: torch.Tensor, prompts: Sequence[PromptRegion]) -> torch.Tensor:
        """LLM input embeddings (K, H) for visual prompts on one image: the decoder's region-restricted
        query through the object-token path (`query_projection`, `object_mlp`), like an object token."""
        memory = self.vision_tower.memory_for(pixel_values).memory
        queries = encode_prompts(self.vision_tower.perception, memory, list(prompts))
        return self.vision_tower.project_queries(queries)

    def _splice_prompts(
        self,
        embeds: torch.Tensor,
        input_ids: torch.Tensor,
        images: list[torch.Tensor],
        counts: list[int],
        visual_prompts: Sequence[Sequence[PromptRegion] | None],
    ) -> torch.Tensor:
        marker_ids = torch.tensor(
            [self.token_ids[REGION_TOKEN], self.token_ids[MARK_TOKEN]], device=input_ids.device
        )
        rows = self._images_per_row(input_ids, counts)
        if len(visual_prompts) != input_ids.shape[0]:
            raise ValueError(
                f"visual_prompts: {len(visual_prompts)} rows for a batch of {input_ids.shape[0]}"
            )
        embeds = embeds.clone()
        for row, prompts in enumerate(visual_prompts):
            if prompts is None:  # a row without prompt data: its markers stay plain tokens
                continue
            positions = torch.isin(input_ids[row], marker_ids).nonzero().flatten()
            if len(positions) != len(prompts):
                raise ValueError(
                    f"row {row}: {len(positions)} <region>/<mark> token(s) but {len(prompts)} prompt(s)"
                )
            for image in sorted({p.image_index for p in prompts}):
                if image >= len(rows[row]):
                    raise ValueError(
                        f"row {row}: a prompt marks image {image} but the row has {len(rows[row])}"
                    )
                chosen = [i for i, p in enumerate(prompts) if p.image_index == image]
                tokens = self.prompt_tokens(images[rows[row][image]], [prompts[i] for i in chosen])
                embeds[row, positions[chosen]] = tokens.to(embeds.dtype)
        return embeds

    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        images: list[torch.Tensor] | None,
        visual_prompts: Sequence[Sequence[PromptRegion] | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """Embeddings with image features spliced in (and visual prompts at `<region>`/`<mark>`), the
        attention mask without the empty object slots, position ids counted over attended tokens only (as
        generation counts them), and each image's token count. Empty slots change nothing the LLM computes."""
        images = list(images) if images is not None else []
        features, valid = self.vision_tower.embed(images, self.projector) if images else ([], [])
        embeds = splice_image_features(
            self.language_model.get_input_embeddings()(input_ids), input_ids, self.image_token_id, features
        )
        if visual_prompts is not None:
            embeds = self._splice_prompts(
                embeds, input_ids, images, [int(f.shape[0]) for f in features], visual_prompts
            )
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.clone()
        if valid:
            slots = input_ids == self.image_token_id
            mask[slots] = mask[slots] * torch.cat(valid).to(mask.dtype)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        return embeds, mask, positions, [int(f.shape[0]) for f in features]

    def object_regularizer_loss(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Stage 1's regulariser MSE(P_t(P_v(T)), T): object queries T sent into the LLM's space (P_v, the
        object path) and back (P_t, the [SEG] head) should come back unchanged, so the LLM's object
        tokens stay decodable by the segmenter. The MSE is taken per image and averaged over the images
        (an image without objects counts 0), so a batch split into micro-batches averages to the same."""
        tower = self.vision_tower
        queries = [part.objects for image in images for part in tower.encode_parts(image[None])]
        sizes = [len(q) for q in queries]
        if sum(sizes) == 0:
            return tower.separator.new_zeros((), dtype=torch.float32)
        target = torch.cat(queries)
        round_trip = self.seg_head(tower.project_queries(target))
        errors = (round_trip.float() - target.to(round_trip.device).float()).pow(2).mean(-1)
        per_image = [chunk.mean() if len(chunk) else errors.new_zeros(()) for chunk in errors.split(sizes)]
        return torch.stack(per_image).mean()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: list[torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        loss_reduction: str | None = None,
        seg_masks: Sequence[torch.Tensor | None] | None = None,
        visual_prompts: Sequence[Sequence[PromptRegion] | None] | None = None,
        global_counts: Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """The core forward's contract (`loss_reduction="sum"`: summed text CE, no logits), with empty
        object slots masked. With `seg_masks` (per row, (n_row, H, W) targets in the input frame, one per
        [SEG] of the row; None: the row has no mask data and its [SEG] train as text only) the loss adds
        2.0 * mask BCE + 0.5 * Dice, summed over masks under "sum" like the text term over tokens, otherwise
        both are means. `visual_prompts`: per row, the regions that fill its `<region>`/`<mark>` tokens in
        order (`prompt_region`; None: markers stay plain tokens). With labels and
        `vision.extra.object_regularizer` = w > 0, w * `object_regularizer_loss` is added (times the
        supervised token count under "sum", so the trainer's per-token average leaves w * MSE).

        `global_counts` ("tokens", "masks", "images" of the whole global batch, summed over micro-batches
        and processes) is how the trainer makes every term split-invariant: it divides the summed loss by
        the global token count, so under "sum" the mask terms are scaled by tokens / masks and the
        regulariser by tokens / images * (this batch's images). The step's loss is then text CE per token
        + 2.0 * BCE and 0.5 * Dice per mask + w * MSE per image, however the global batch is split.
        `mask_bce` / `mask_dice` / `object_regularizer` in the output stay unscaled."""
        if loss_reduction not in (None, "sum"):
            raise ValueError('loss_reduction="sum" is the only reduction')
        embeds, mask, positions, counts = self.prepare_inputs(
            input_ids, attention_mask, images, visual_prompts
        )
        has_images = images is not None and len(images) > 0
        weight = self.vision_tower.object_regularizer if labels is not None and has_images else 0.0
        regularizer = self.object_regularizer_loss(images) if weight else None  # type: ignore[arg-type]
        if loss_reduction is None and seg_masks is None:
            out = self.language_model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, labels=labels, **kwargs
            )
            if regularizer is not None:
                out.loss = out.loss + weight * regularizer
            return out
        if loss_reduction == "sum" and labels is None:
            raise ValueError('loss_reduction="sum" needs labels')
        hidden = self.language_model.get_decoder()(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **kwargs
        ).last_hidden_state
        loss = text_loss = None
        if labels is not None:
            loss, supervised = supervised_token_loss(
                self.language_model, hidden, labels, "sum" if loss_reduction == "sum" else "mean"
            )
            text_loss = loss
            if regularizer is not None:
                scale = 1.0
                if loss_reduction == "sum":
                    scale = float(supervised)
                    if global_counts is not None and global_counts.get("images"):
                        scale = global_counts["tokens"] * len(images) / global_counts["images"]  # type: ignore[arg-type]
                loss = loss + weight * regularizer * scale
        bce = dice = None
        mask_logits = []
        if seg_masks is not None:
            rows = self._images_per_row(input_ids, counts)
            bces, dices = [], []
            for row, targets_row in enumerate(seg_masks):
                if targets_row is None:
                    continue
                seg_positions = (input_ids[row] == self.seg_token_id).nonzero().flatten()
                if len(seg_positions) != len(targets_row):
                    raise ValueError(
                        f"row {row}: {len(seg_positions)} [SEG] token(s) but {len(targets_row)} target mask(s)"
                    )
                if len(seg_positions) == 0:
                    continue
                if not rows[row]:
                    raise ValueError(f"row {row}: [SEG] tokens but no image")
                decoded = self.decode_seg(images[rows[row][-1]], hidden[row, seg_positions])  # type: ignore[index]
                per_layer = [mask_losses(m[:, 0], targets_row.to(m.device)) for m in decoded.mask_logits]
                bces.append(torch.stack([b for b, _ in per_layer]).mean(0))
                dices.append(torch.stack([d for _, d in per_layer]).mean(0))
                mask_logits.append(decoded.mask_logits[-1][:, 0])
            reduce = torch.sum if loss_reduction == "sum" else torch.mean
            zero = hidden.new_zeros((), dtype=torch.float32)
            bce = reduce(torch.cat(bces)) if bces else zero
            dice = reduce(torch.cat(dices)) if dices else zero
            masks_loss = MASK_BCE_WEIGHT * bce + MASK_DICE_WEIGHT * dice
            if loss_reduction == "sum" and global_counts is not None and global_counts.get("masks"):
                masks_loss = masks_loss * (global_counts["tokens"] / global_counts["masks"])
            loss = masks_loss if loss is None else loss + masks_loss
        return OMGOutput(
            loss=loss,
            text_loss=text_loss,
            mask_bce=bce,
            mask_dice=dice,
            seg_mask_logits=mask_logits,
            object_regularizer=regularizer,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: list[torch.Tensor] | None = None,
        visual_prompts: Sequence[Sequence[PromptRegion]] | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """New token ids only, with empty object slots masked (generation derives positions from the mask)."""
        embeds, mask, _, _ = self.prepare_inputs(input_ids, attention_mask, images, visual_prompts)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)

    def last_hidden_states(
        self,
        input_ids: torch.Tensor,
        images: list[torch.Tensor],
        prompts: Sequence[PromptRegion] | None = None,
    ) -> torch.Tensor:
        """The LLM's last-layer states for unpadded ids (1, L) -> (L, H): what [SEG] positions are read from."""
        embeds, mask, positions, _ = self.prepare_inputs(
            input_ids, None, images, None if prompts is None else [prompts]
        )
        return self.language_model.get_decoder()(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions
        ).last_hidden_state[0]

    # -- inference -----------------------------------------------------------------------------------

    @property
    def processor(self) -> Any:
        if self._processor is None:
            from unillava.processor import Processor

            self._processor = Processor.for_model(self)
        return self._processor

    @torch.no_grad()
    def prompt_regions(
        self, visual_prompts: Sequence[Mapping[str, Any]], pictures: Sequence[Image.Image]
    ) -> list[PromptRegion]:
        """Prompt dicts in image pixels (the server's and the shapes data's format) -> input-frame regions."""
        return prompt_regions(
            visual_prompts, [(p.width, p.height) for p in pictures], self.config.vision.image_size
        )

    def _check_prompt_markers(self, input_ids: torch.Tensor, regions: Sequence[Sequence[Any]] | None) -> None:
        """The stated rule: each `<region>`/`<mark>` in a prompt needs exactly one visual prompt and each
        prompt one marker (`segment` and `chat_pixels` append markers when the text has none)."""
        markers = torch.isin(
            input_ids, torch.tensor([self.token_ids[REGION_TOKEN], self.token_ids[MARK_TOKEN]])
        )
        for row, count in enumerate(markers.sum(dim=1).tolist()):
            given = 0 if regions is None else len(regions[row])
            if count != given:
                raise UnillavaError(
                    f"conversation {row}: {count} <region>/<mark> marker(s) but {given} visual "
                    "prompt(s); give one box/point/mask per marker"
                )

    @torch.no_grad()
    def generate_results(
        self,
        conversations: Sequence[list[Message]],
        images: Sequence[Sequence[Image.Image]],
        *,
        max_new_tokens: int = 256,
        visual_prompts: Sequence[Sequence[Mapping[str, Any]] | None] | None = None,
    ) -> list[SegmentationResult]:
        """Greedy answers, then one teacher-forced pass per answer to read the [SEG] hidden states and
        decode their masks at each image's own size (binarised at probability 0.5). `visual_prompts`: per
        conversation, prompt dicts that fill its `<region>`/`<mark>` tokens in order."""
        from unillava.inference import GenerationSettings

        processor = self.processor
        settings = GenerationSettings(max_new_tokens=max_new_tokens)
        regions = None
        if visual_prompts is not None:
            regions = [
                self.prompt_regions(p or [], ims) for p, ims in zip(visual_prompts, images, strict=True)
            ]
        batch, lengths = processor.prompt_batch(list(conversations), [list(ims) for ims in images])
        self._check_prompt_markers(batch.input_ids, regions)
        batch = batch.to(self.device)
        new_ids = self.generate(
            batch.input_ids,
            attention_mask=batch.attention_mask,
            images=batch.images,
            visual_prompts=regions,
            **settings.generate_kwargs(processor),
        )
        stops = set(processor.stop_token_ids) | {processor.tokenizer.pad_token_id}
        results = []
        image_start = 0
        for row, length in enumerate(lengths):
            row_images = batch.images[image_start : image_start + len(images[row])]
            image_start += len(images[row])
            answer = []
            for token in new_ids[row].tolist():
                if token in stops:
                    break
                answer.append(token)
            text = processor.tokenizer.decode(answer, skip_special_tokens=True).strip()
            result = SegmentationResult(text, phrases=phrases_for_segs(text))
            if self.seg_token_id in answer and row_images:
                prompt = batch.input_ids[row, batch.input_ids.shape[1] - length :]
                ids = torch.cat([prompt, torch.tensor(answer, device=prompt.device)])[None]
                hidden = self.last_hidden_states(ids, row_images, None if regions is None else regions[row])
                positions = (ids[0] == self.seg_token_id).nonzero().flatten()
                decoded = self.decode_seg(row_images[-1], hidden[positions])
                picture = images[row][-1]
                geometry = PadGeometry(picture.width, picture.height, self.config.vision.image_size)
                size = row_images[-1].shape[-1]
                logits = F.interpolate(
                    decoded.mask_logits[-1][:, 0:1].float(),
                    size=(size, size),
                    mode="bilinear",
                    align_corners=False,
                )[:, 0]
                probs = geometry.logits_to_image(logits).sigmoid()
                for q in range(probs.shape[0]):
                    mask = (probs[q] > 0.5).cpu().numpy()
                    result.masks.append(mask)
                    result.scores.append(float(probs[q][probs[q] > 0.5].mean()) if mask.any() else 0.0)
                result.phrases = (result.phrases + [""] * len(result.masks))[: len(result.masks)]
            results.append(result)
        return results

    def segment(
        self,
        image: Image.Image,
        prompt: str,
        *,
        max_new_tokens: int = 64,
        visual_prompts: Sequence[Mapping[str, Any]] | None = None,
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

    def generate_with_masks(
        self,
        conversations: Sequence[list[Message]],
        images: Sequence[Sequence[Any]],
        *,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        progress: Any = None,
        visual_prompts: Sequence[Sequence[Mapping[str, Any]] | None] | None = None,
    ) -> list[tuple[str, list[dict[str, Any]]]]:
        """The benchmark runner's hook: (text, masks as COCO RLE dicts) per conversation; `visual_prompts`
        (per conversation, None for none) fill the `<region>`/`<mark>` markers of region tasks."""
        from unillava.inference import _as_image

        out: list[tuple[str, list[dict[str, Any]]]] = []
        for start in range(0, len(conversations), batch_size):
            chunk = [[_as_image(im) for im in entry] for entry in images[start : start + batch_size]]
            prompts = None if visual_prompts is None else visual_prompts[start : start + batch_size]
            for result in self.generate_results(
                conversations[start : start + batch_size],
                chunk,
                max_new_tokens=max_new_tokens,
                visual_prompts=prompts,
            ):
                out.append((result.text, result.rles))
            if progress is not None:
                progress.update(len(chunk))
        return out

    def chat_pixels(
        self,
        conversation: list[Message],
        images: list[Image.Image],
        visual_prompts: list[dict[str, Any]],
        *,
        settings: Any,
        return_masks: bool,
    ) -> tuple[str, list[dict[str, Any]]]:
        """The server's pixel-level hook (docs/serving.md): the greedy answer (up to
        `settings.max_new_tokens`) and one mask per [SEG]. Prompts fill
        the conversation's `<region>`/`<mark>` tokens in order; when it has none, "region1 <region>" (or
        "point1 <mark>" for points) is appended to the last user turn for each prompt."""
        if visual_prompts:
            conversation = with_prompt_markers(conversation, visual_prompts)
        result = self.generate_results(
            [conversation],
            [images],
            max_new_tokens=settings.max_new_tokens,
            visual_prompts=[visual_prompts] if visual_prompts else None,
        )[0]
        if not return_masks:
            return result.text, []
        masks = [
            {"mask": m, "phrase": p, "score": s, "image_index": len(images) - 1}
            for m, p, s in zip(result.masks, result.phrases, result.scores, strict=True)
        ]
        return result.text, masks


def with_prompt_markers(
    conversation: list[Message], visual_prompts: Sequence[Mapping[str, Any]]
) -> list[Message]:
    """The conversation, with a marker per prompt appended to the last user turn if it has none at all."""
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


@dataclass
class SegBatch:
    """A training batch with its pixel-level targets: `model(**seg.inputs())`."""

    batch: Any
    seg_masks: list[torch.Tensor]
    visual_prompts: list[list[PromptRegion]]

    def inputs(self) -> dict[str, Any]:
        return {
            **self.batch.model_inputs(),
            "seg_masks": self.seg_masks,
            "visual_prompts": self.visual_prompts,
        }


def seg_batch(model: OMGLlavaModel, records: Sequence[Mapping[str, Any]], image_root: str | Path) -> SegBatch:
    """Training inputs from LLaVA-format records as the shapes tasks write them: `masks` (one COCO RLE
    per [SEG], in answer order; refseg, reasonseg, gcg) and `visual_prompts` (one per `<region>`/`<mark>`;
    region tasks), with targets (n, S, S) in the segmenter's input frame."""
    processor = model.processor
    size = model.config.vision.image_size
    encoded, pixel_lists, targets, prompts = [], [], [], []
    for i, record in enumerate(records):
        sample = parse_record(record, source=f"record {i}")
        pictures = [load_image(Path(image_root) / name) for name in sample.images]
        pixels = processor.preprocess_images(pictures)
        encoded.append(processor.encode(sample.messages, pixels))
        pixel_lists.append(pixels)
        rles = record.get("masks") or []
        targets.append(
            mask_targets(rles, pictures[-1].width, pictures[-1].height, size)
            if rles
            else torch.zeros(0, size, size)
        )
        prompts.append(model.prompt_regions(record.get("visual_prompts") or [], pictures))
    return SegBatch(processor.collate(encoded, pixel_lists, padding_side="right"), targets, prompts)


# The released OMG-LLaVA checkpoints are XTuner `.pth` state dicts of `OMG_LLaVA` (omg_llava/model/
# omg_llava.py in the OMG-Seg repository). The projector table and `convert_xtuner_projectors` live with
# the full converter (segmenter, InternLM2 + LoRA, tokenizer) in `unillava.hub.omg_xtuner`.


def load_xtuner_projectors(model: OMGLlavaModel, path: str | Path) -> list[str]:
    """Load the projector parts of a released `.pth` into `model` (shapes checked); returns the keys not
    loaded. The model must be built with the matching LLM width and segmenter (ConvNeXt-L, 256-d queries)."""
    raw = torch.load(Path(path), map_location="cpu", weights_only=True)
    state = raw.get("state_dict", raw) if isinstance(raw, Mapping) else raw
    converted, left = convert_xtuner_projectors(state)
    if not converted:
        raise ConfigError(f"{path}: no OMG-LLaVA projector weights found (is it an XTuner OMG-LLaVA .pth?)")
    own = model.state_dict()
    for key, value in converted.items():
        if key not in own:
            raise ConfigError(f"{path}: {key} has no counterpart in this model")
        if tuple(own[key].shape) != tuple(value.shape):
            raise ConfigError(
                f"{path}: {key} is {tuple(value.shape)} but the model has {tuple(own[key].shape)}"
            )
    model.load_state_dict(converted, strict=False)
    return left
