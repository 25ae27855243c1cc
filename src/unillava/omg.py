"""OMG-LLaVA's pixel-level model: [SEG] tokens decoded into masks by the frozen segmenter.

`OMGLlavaModel` is the core `LlavaModel` (with the `omg` tower) plus:
- the special tokens `[SEG]`, `<p>`, `</p>`, `<region>`, `<mark>`, each one token id even inside text
  (added as ordinary, non-special added tokens: the conversation encoder splits *special* tokens typed
  in messages into plain text, and answers must keep them when decoded);
- `seg_head`, an MLP from the LLM's last hidden state at each [SEG] (H -> 2D -> 2D), split into query
  content and position and decoded as one extra query over the image's cached segmenter memory, so
  every [SEG] gives one mask, in text order;
- the training loss text CE + 2.0 * mask BCE + 0.5 * Dice (BCE and Dice averaged over decoder layers);
- `segment`, `generate_with_masks` and `chat_pixels` (text + masks as arrays, COCO RLE and the phrase
  of the `<p>..</p>` before each [SEG]); `supports_segmentation = True` for the server.

The masks come from the *last* [SEG] image of each sample (OMG-LLaVA takes one image per conversation).
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
from unillava.conversation import IGNORE_INDEX, Message, user_message
from unillava.data.images import load_image
from unillava.data.llava_format import parse_record
from unillava.errors import ConfigError, UnillavaError
from unillava.modeling import LlavaModel, splice_image_features
from unillava.perception.geometry import PadGeometry
from unillava.perception.model import DecodeOutput
from unillava.vision import VisionTower

SEG_TOKEN = "[SEG]"
PHRASE_START = "<p>"
PHRASE_END = "</p>"
REGION_TOKEN = "<region>"
MARK_TOKEN = "<mark>"
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
    supports_visual_prompts = False

    def __init__(self, config: ModelConfig, vision_tower: VisionTower, language_model: nn.Module, tokenizer: Any):
        super().__init__(config, vision_tower, language_model, tokenizer)
        if not hasattr(vision_tower, "memory_for"):
            raise ConfigError(f"vision.type: an OMG model needs the 'omg' tower, got {config.vision.type!r}")
        self.token_ids = add_omg_tokens(tokenizer, language_model)
        self.seg_token_id = self.token_ids[SEG_TOKEN]
        text_hidden = language_model.get_input_embeddings().embedding_dim
        query_dim = vision_tower.query_dim
        self.seg_head = nn.Sequential(nn.Linear(text_hidden, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim))
        self._processor: Any = None

    # -- [SEG] -> masks ------------------------------------------------------------------------------

    def decode_seg(self, pixel_values: torch.Tensor, seg_hidden: torch.Tensor) -> DecodeOutput:
        """Masks for [SEG] hidden states (N, H) over one image (3, H, W): N independent extra queries
        through the frozen decoder; mask logits (N, 1, H/4, W/4) per decoder layer."""
        tower = self.vision_tower
        perception = tower.perception
        memory = tower.memory_for(pixel_values).memory.select(0, repeat=seg_hidden.shape[0])
        query = self.seg_head(seg_hidden).to(memory.mask_features.dtype)
        content, position = query.split(perception.hidden_dim, dim=-1)
        return perception.decode(memory, content[:, None], position[:, None])

    def _images_per_row(self, input_ids: torch.Tensor, features: list[torch.Tensor]) -> list[list[int]]:
        """Which images (flat indices) each row's image tokens belong to, from the tokens they take."""
        slots = (input_ids == self.image_token_id).sum(1).tolist()
        rows: list[list[int]] = []
        image = 0
        for n in slots:
            mine = []
            while n > 0 and image < len(features):
                n -= int(features[image].shape[0])
                mine.append(image)
                image += 1
            rows.append(mine)
        return rows

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: list[torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        loss_reduction: str | None = None,
        seg_masks: list[torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """With `seg_masks` (per row, (n_row, H, W) targets in the input frame, one per [SEG] of the row):
        loss = text CE + 2.0 * BCE + 0.5 * Dice; with `loss_reduction="sum"` the mask terms are summed over
        masks like the text term over tokens, otherwise both are means. Without it: the core forward."""
        if seg_masks is None:
            return super().forward(input_ids, attention_mask, images, labels, loss_reduction, **kwargs)
        if loss_reduction not in (None, "sum"):
            raise ValueError('loss_reduction must be None or "sum"')
        images = list(images) if images is not None else []
        features = self.encode_images(images) if images else []
        embeds = self.language_model.get_input_embeddings()(input_ids)
        embeds = splice_image_features(embeds, input_ids, self.image_token_id, features)
        hidden = self.language_model.get_decoder()(
            inputs_embeds=embeds, attention_mask=attention_mask, **kwargs
        ).last_hidden_state
        text_loss = None
        if labels is not None:
            targets = labels[:, 1:]
            supervised = targets != IGNORE_INDEX
            logits = self.language_model.get_output_embeddings()(hidden[:, :-1][supervised])
            text_loss = F.cross_entropy(logits.float(), targets[supervised],
                                        reduction="sum" if loss_reduction == "sum" else "mean")
        rows = self._images_per_row(input_ids, features)
        bces, dices, mask_logits = [], [], []
        for row, targets_row in enumerate(seg_masks):
            positions = (input_ids[row] == self.seg_token_id).nonzero().flatten()
            if len(positions) != len(targets_row):
                raise ValueError(f"row {row}: {len(positions)} [SEG] token(s) but {len(targets_row)} target mask(s)")
            if len(positions) == 0:
                continue
            if not rows[row]:
                raise ValueError(f"row {row}: [SEG] tokens but no image")
            decoded = self.decode_seg(images[rows[row][-1]], hidden[row, positions])
            per_layer = [mask_losses(m[:, 0], targets_row.to(m.device)) for m in decoded.mask_logits]
            bces.append(torch.stack([b for b, _ in per_layer]).mean(0))
            dices.append(torch.stack([d for _, d in per_layer]).mean(0))
            mask_logits.append(decoded.mask_logits[-1][:, 0])
        reduce = torch.sum if loss_reduction == "sum" else torch.mean
        zero = hidden.new_zeros((), dtype=torch.float32)
        bce = reduce(torch.cat(bces)) if bces else zero
        dice = reduce(torch.cat(dices)) if dices else zero
        loss = MASK_BCE_WEIGHT * bce + MASK_DICE_WEIGHT * dice
        if text_loss is not None:
            loss = loss + text_loss
        return OMGOutput(loss=loss, text_loss=text_loss, mask_bce=bce, mask_dice=dice, seg_mask_logits=mask_logits)

    # -- inference -----------------------------------------------------------------------------------

    @property
    def processor(self) -> Any:
        if self._processor is None:
            from unillava.processor import Processor

            self._processor = Processor.for_model(self)
        return self._processor

    @torch.no_grad()
    def generate_results(
        self,
        conversations: Sequence[list[Message]],
        images: Sequence[Sequence[Image.Image]],
        *,
        max_new_tokens: int = 256,
    ) -> list[SegmentationResult]:
        """Greedy answers, then one teacher-forced pass per answer to read the [SEG] hidden states and
        decode their masks at each image's own size (binarised at probability 0.5)."""
        from unillava.inference import GenerationSettings

        processor = self.processor
        settings = GenerationSettings(max_new_tokens=max_new_tokens)
        batch, lengths = processor.prompt_batch(list(conversations), [list(ims) for ims in images])
        batch = batch.to(self.device)
        new_ids = self.generate(batch.input_ids, attention_mask=batch.attention_mask, images=batch.images,
                                **settings.generate_kwargs(processor))
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
                hidden = self.language_model.get_decoder()(
                    inputs_embeds=self.embed_inputs(ids, row_images)
                ).last_hidden_state[0]
                positions = (ids[0] == self.seg_token_id).nonzero().flatten()
                decoded = self.decode_seg(row_images[-1], hidden[positions])
                picture = images[row][-1]
                geometry = PadGeometry(picture.width, picture.height, self.config.vision.image_size)
                size = row_images[-1].shape[-1]
                logits = F.interpolate(decoded.mask_logits[-1][:, 0:1].float(), size=(size, size),
                                       mode="bilinear", align_corners=False)[:, 0]
                full = geometry.logits_to_image(logits)
                probs = full.sigmoid()
                for q in range(full.shape[0]):
                    mask = (probs[q] > 0.5).cpu().numpy()
                    inside = float(probs[q][probs[q] > 0.5].mean()) if mask.any() else 0.0
                    result.masks.append(mask)
                    result.scores.append(inside)
                result.phrases = (result.phrases + [""] * len(result.masks))[: len(result.masks)]
            results.append(result)
        return results

    def segment(self, image: Image.Image, prompt: str, *, max_new_tokens: int = 64) -> SegmentationResult:
        """One image, one prompt ("Please segment the red circle in this image.") -> text and masks."""
        return self.generate_results([[user_message(prompt, 1)]], [[image]], max_new_tokens=max_new_tokens)[0]

    def generate_with_masks(
        self,
        conversations: Sequence[list[Message]],
        images: Sequence[Sequence[Any]],
        *,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        progress: Any = None,
    ) -> list[tuple[str, list[dict[str, Any]]]]:
        """The benchmark runner's hook: (text, masks as COCO RLE dicts) per conversation."""
        from unillava.inference import _as_image

        out: list[tuple[str, list[dict[str, Any]]]] = []
        for start in range(0, len(conversations), batch_size):
            chunk = [[_as_image(im) for im in entry] for entry in images[start : start + batch_size]]
            for result in self.generate_results(conversations[start : start + batch_size], chunk,
                                                max_new_tokens=max_new_tokens):
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
        """The server's pixel-level hook (docs/serving.md): the answer and one mask per [SEG]."""
        if visual_prompts:
            raise UnillavaError("this model does not take visual prompts yet")
        result = self.generate_results([conversation], [images], max_new_tokens=settings.max_new_tokens)[0]
        if not return_masks:
            return result.text, []
        masks = [{"mask": m, "phrase": p, "score": s, "image_index": len(images) - 1}
                 for m, p, s in zip(result.masks, result.phrases, result.scores, strict=True)]
        return result.text, masks


def seg_batch(
    model: OMGLlavaModel, records: Sequence[Mapping[str, Any]], image_root: str | Path
) -> tuple[Any, list[torch.Tensor]]:
    """Training inputs from LLaVA-format records with `masks` (one COCO RLE per [SEG], in answer order,
    as the shapes refseg/reasonseg/gcg tasks write them): a right-padded `Batch` and per-record targets
    (n, S, S) in the segmenter's input frame, ready for `model(**batch.model_inputs(), seg_masks=...)`."""
    processor = model.processor
    size = model.config.vision.image_size
    encoded, pixel_lists, targets = [], [], []
    for i, record in enumerate(records):
        sample = parse_record(record, source=f"record {i}")
        pictures = [load_image(Path(image_root) / name) for name in sample.images]
        pixels = processor.preprocess_images(pictures)
        encoded.append(processor.encode(sample.messages, pixels))
        pixel_lists.append(pixels)
        masks = []
        for rle in record.get("masks") or []:
            counts = rle["counts"]
            rle = {"size": rle["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
            geometry = PadGeometry(pictures[-1].width, pictures[-1].height, size)
            masks.append(geometry.mask_to_input(mask_utils.decode(rle)))
        targets.append(torch.stack(masks) if masks else torch.zeros(0, size, size))
    return processor.collate(encoded, pixel_lists, padding_side="right"), targets
