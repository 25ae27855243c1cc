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
- empty object-token slots masked out of attention and position ids (`prepare_inputs`, see omg/tower.py);
- visual prompts: each `<region>`/`<mark>` token replaced by its prompt's region-restricted decoder query,
  projected like an object token (`unillava.omg.perception.prompts`);
- `supports_segmentation` and `supports_visual_prompts` for the inference layer, which runs it for text
  and masks (`unillava.segmentation`: `segment`, `generate_with_masks`, the server's pixel hook).

[SEG] masks come from the last image of each sample (OMG-LLaVA takes one image per conversation).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AddedToken
from transformers.modeling_outputs import CausalLMOutputWithPast

from unillava.config import ModelConfig
from unillava.data.images import ImagePreprocessor
from unillava.data.llava_format import MARK_TOKEN, REGION_TOKEN, SEG_TOKEN, Sample
from unillava.errors import ConfigError, DataError
from unillava.modeling import (
    TEXT_LOSS,
    BatchFields,
    LlavaModel,
    LlavaOutput,
    LossPart,
    register_model_class,
    splice_image_features,
    supervised_token_loss,
    supervised_tokens,
)
from unillava.omg.perception.model import DecodeOutput
from unillava.omg.perception.prompts import PromptRegion, encode_prompts, mask_targets, prompt_regions
from unillava.processor import Processor
from unillava.vision.base import VisionTower

PHRASE_START = "<p>"
PHRASE_END = "</p>"
OMG_TOKENS = (SEG_TOKEN, PHRASE_START, PHRASE_END, REGION_TOKEN, MARK_TOKEN)
MASK_BCE_WEIGHT = 2.0
MASK_DICE_WEIGHT = 0.5
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
class OMGOutput(LlavaOutput):
    """The LM output plus the parts of the loss and the [SEG] masks (last decoder layer)."""

    text_loss: torch.Tensor | None = None
    mask_bce: torch.Tensor | None = None
    mask_dice: torch.Tensor | None = None
    seg_mask_logits: list[torch.Tensor] | None = None
    object_regularizer: torch.Tensor | None = None


class OMGBatchFields(BatchFields):
    """A record's `masks` (one COCO RLE per [SEG] in the answers) and `visual_prompts` (one per `<region>` /
    `<mark>` in the user turns) as the forward's `seg_masks` / `visual_prompts`, brought into the
    segmenter's padded, resized input frame (`mask_targets` / `prompt_regions`; `tests/omg_batches.py` is
    the reference). Both are in text order, so a sample cut on the right keeps the first k masks for the
    k [SEG] that survive, and the first k prompts for the k markers."""

    names = ("seg_masks", "visual_prompts")
    RECORD_FIELDS = {"seg_masks": "masks", "visual_prompts": "visual_prompts"}

    def __init__(self, token_ids: Mapping[str, int], image_size: int) -> None:
        self.token_ids = dict(token_ids)
        self.image_size = image_size

    def check(self, tokenizer: Any, preprocessor: ImagePreprocessor) -> None:
        """The [SEG] and marker ids count the entries a sample keeps, and targets live in a padded square."""
        vocab = tokenizer.get_vocab()
        wanted = (SEG_TOKEN, REGION_TOKEN, MARK_TOKEN)
        missing = [t for t in wanted if t not in vocab]
        if missing:
            raise ConfigError(
                f"pixel targets need a tokenizer with {', '.join(missing)} (an OMG-LLaVA model)"
            )
        if any(vocab[t] != self.token_ids[t] for t in wanted):
            raise ConfigError("pixel targets: the tokenizer's [SEG]/<region>/<mark> ids are not the model's")
        if preprocessor.mode != "pad":
            raise ConfigError(f"vision.image_mode: pixel targets need 'pad', got {preprocessor.mode!r}")
        if preprocessor.size != self.image_size:
            raise ConfigError(
                f"vision.image_size: pixel targets need {self.image_size}, got {preprocessor.size}"
            )

    def kept(self, sample: Sample, input_ids: Sequence[int]) -> dict[str, tuple[int, int]]:
        """More tokens than entries (a template that adds [SEG]) is an error naming the record."""
        found = {
            "seg_masks": input_ids.count(self.token_ids[SEG_TOKEN]),
            "visual_prompts": sum(input_ids.count(self.token_ids[t]) for t in (REGION_TOKEN, MARK_TOKEN)),
        }
        out = {}
        for name, record_name in self.RECORD_FIELDS.items():
            value = sample.extra.get(record_name)
            if value is None:
                continue
            if found[name] > len(value):
                raise DataError(
                    f"{sample.source}: field '{record_name}': {len(value)} entries but {found[name]} "
                    "tokens after encoding"
                )
            out[name] = (len(value), found[name])
        return out

    def build(
        self, sample: Sample, kept: Mapping[str, int], image_sizes: Sequence[tuple[int, int]]
    ) -> dict[str, Any]:
        """Masks (n, S, S) over the last image (the one [SEG] decodes against) and prompt regions."""
        out: dict[str, Any] = {}
        if "seg_masks" in kept:
            width, height = image_sizes[-1]
            rles = sample.extra["masks"][: kept["seg_masks"]]
            out["seg_masks"] = mask_targets(rles, width, height, self.image_size)
        if "visual_prompts" in kept:
            prompts = sample.extra["visual_prompts"][: kept["visual_prompts"]]
            out["visual_prompts"] = prompt_regions(prompts, image_sizes, self.image_size)
        return out


@register_model_class("omg")
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
        vision_tower.attach_language_model(
            language_model.get_input_embeddings().embedding_dim, self.projector
        )
        self._processor: Any = None

    def batch_fields(self) -> OMGBatchFields:
        """[SEG] masks and visual prompts travel with a record's sample into the forward."""
        return OMGBatchFields(self.token_ids, self.config.vision.image_size)

    def loss_counts(self, inputs: Mapping[str, Any]) -> dict[str, int]:
        """Text CE per supervised token, the mask terms per [SEG] target and the regulariser (when on) per
        image: each a mean over the global batch, however it is split."""
        masks = sum(len(m) for m in inputs.get("seg_masks") or [] if m is not None)
        counts = {TEXT_LOSS: supervised_tokens(inputs["labels"]), "mask_bce": masks, "mask_dice": masks}
        if self.vision_tower.object_regularizer:
            counts["object_regularizer"] = len(inputs.get("images") or [])
        return counts

    def encode_images(self, images: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """Per-image LLM-space tokens: the OMG tower projects its two kinds of tokens itself."""
        return self.vision_tower(images)

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
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """The core forward's contract (`loss_reduction="sum"`: summed text CE, no logits), with empty
        object slots masked. With `seg_masks` (per row, (n_row, H, W) targets in the input frame, one per
        [SEG] of the row; None: the row has no mask data and its [SEG] train as text only) the loss adds
        2.0 * mask BCE + 0.5 * Dice, summed over masks under "sum" like the text term over tokens, otherwise
        both are means. `visual_prompts`: per row, the regions that fill its `<region>`/`<mark>` tokens in
        order (`prompt_region`; None: markers stay plain tokens). With labels and
        `vision.extra.object_regularizer` = w > 0, w * `object_regularizer_loss` is added (times the
        supervised token count under "sum", so a per-token average leaves w * MSE).

        Under "sum" `loss_parts` holds each term as (sum, count, weight): `text_ce` over supervised tokens,
        `mask_bce` / `mask_dice` over target masks (weights 2.0 / 0.5), `object_regularizer` over images
        (weight w). The trainer sums them over the global batch, so the step trains text CE per token +
        2.0 * BCE and 0.5 * Dice per mask + w * MSE per image however the batch is split (`loss_counts`
        gives the counts before the forward). `mask_bce` / `mask_dice` / `object_regularizer` in the output
        are the unweighted sums (means without "sum")."""
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
                loss = loss + weight * regularizer * (float(supervised) if loss_reduction == "sum" else 1.0)
        bce = dice = None
        num_masks = 0
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
            num_masks = sum(len(b) for b in bces)
            masks_loss = MASK_BCE_WEIGHT * bce + MASK_DICE_WEIGHT * dice
            loss = masks_loss if loss is None else loss + masks_loss
        parts = None
        if loss_reduction == "sum":
            parts = {TEXT_LOSS: LossPart(text_loss, supervised)}
            if bce is not None:
                parts["mask_bce"] = LossPart(bce, num_masks, MASK_BCE_WEIGHT)
                parts["mask_dice"] = LossPart(dice, num_masks, MASK_DICE_WEIGHT)
            if regularizer is not None:
                count = len(images)  # type: ignore[arg-type]
                parts["object_regularizer"] = LossPart(regularizer * count, count, weight)
        return OMGOutput(
            loss=loss,
            loss_parts=parts,
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
    def processor(self) -> Processor:
        """The model's own processor (its config's template), built on first use."""
        if self._processor is None:
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
