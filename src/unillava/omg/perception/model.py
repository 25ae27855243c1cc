"""A Mask2Former universal segmenter whose image memory can be cached and queried again later.

OMG-LLaVA needs more from its segmenter than one forward pass: the LLM's [SEG] tokens and the user's
visual prompts become *extra* queries that run through the same masked-attention decoder over the same
image memory. transformers' `Mask2FormerModel` supplies every part (backbone, multi-scale deformable
pixel decoder, decoder layers, mask embedder) but runs them in one monolithic `forward`, so this module
splits that into `encode` (image -> `PerceptionMemory`, cacheable) and `decode` (queries + memory ->
per-layer class and mask logits), with an optional region that restricts each query's cross-attention
(a box, a mask or a point's small box). Training uses transformers' Hungarian-matched `Mask2FormerLoss`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import ConvNextConfig, Mask2FormerConfig, Mask2FormerModel
from transformers.models.mask2former.modeling_mask2former import Mask2FormerHungarianMatcher, Mask2FormerLoss
from transformers.utils import logging as hf_logging

from unillava.errors import CheckpointError
from unillava.omg.perception.matching import install_fallback_solver
from unillava.omg.perception.omg_seg import (
    apply_backbone_feature_norm,
    build_class_head,
    build_prompt_query,
    classify,
    handed_on,
)

CONFIG_NAME = "perception_config.json"
WEIGHTS_NAME = "perception.safetensors"
LOSS_WEIGHTS = ("loss_cross_entropy", "loss_mask", "loss_dice")


def tiny_perception_config(num_labels: int = 8, num_queries: int = 8, **overrides: Any) -> dict[str, Any]:
    """A Mask2Former-on-ConvNeXt config small enough to train for a few steps in a CPU test."""
    config: dict[str, Any] = {
        "backbone_config": {
            "model_type": "convnext",
            "depths": [1, 1, 1, 1],
            "hidden_sizes": [8, 16, 32, 64],
            "out_features": ["stage1", "stage2", "stage3", "stage4"],
        },
        "feature_size": 32,
        "mask_feature_size": 32,
        "hidden_dim": 32,
        "encoder_feedforward_dim": 64,
        "encoder_layers": 1,
        "decoder_layers": 3,
        "num_attention_heads": 4,
        "dim_feedforward": 64,
        "num_queries": num_queries,
        "num_labels": num_labels,
        "train_num_points": 1024,
    }
    config.update(overrides)
    return config


def make_config(data: dict[str, Any] | Mask2FormerConfig) -> Mask2FormerConfig:
    """A Mask2FormerConfig from a plain dict; a ConvNeXt backbone is the default (OMG-Seg's choice)."""
    if isinstance(data, Mask2FormerConfig):
        return data
    data = dict(data)
    backbone = data.pop("backbone_config", None)
    if not isinstance(backbone, (dict, ConvNextConfig)):
        raise CheckpointError("perception config: `backbone_config` must describe a ConvNeXt (a mapping)")
    if isinstance(backbone, dict):
        backbone = dict(backbone)
        model_type = backbone.pop("model_type", "convnext")
        if model_type != "convnext":
            raise CheckpointError(f"perception backbone {model_type!r}: only convnext is supported here")
        backbone = ConvNextConfig(**backbone)
    num_labels = data.pop("num_labels", None)
    data.pop("id2label", None)
    data.pop("label2id", None)
    data.pop("model_type", None)
    data.pop("transformers_version", None)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "convnext is not a supported backbone": it is, for our use
    try:
        config = Mask2FormerConfig(backbone_config=backbone, **data)
    finally:
        hf_logging.set_verbosity(verbosity)
    if num_labels is not None:
        config.num_labels = int(num_labels)
    return config


class PerceptionLoss(Mask2FormerLoss):
    """transformers' Mask2FormerLoss, buildable without scipy (see `matching`)."""

    def __init__(self, config: Mask2FormerConfig, weight_dict: dict[str, float]):
        nn.Module.__init__(self)
        install_fallback_solver()
        self.num_labels = config.num_labels
        self.weight_dict = weight_dict
        self.eos_coef = config.no_object_weight
        empty_weight = torch.ones(self.num_labels + 1)
        empty_weight[-1] = self.eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)
        self.num_points = config.train_num_points
        self.oversample_ratio = config.oversample_ratio
        self.importance_sample_ratio = config.importance_sample_ratio
        self.matcher = Mask2FormerHungarianMatcher(
            cost_class=config.class_weight,
            cost_dice=config.dice_weight,
            cost_mask=config.mask_weight,
            num_points=self.num_points,
        )


@dataclass
class PerceptionMemory:
    """What the decoder needs of a batch of images, computed once: per level (3, coarse to fine)
    projected features and sine positions as (HW, B, D), their sizes, the stride-4 mask features
    (B, D, H/4, W/4) and the backbone's last stage (B, C, H/32, W/32) for OMG's pixel tokens."""

    features: list[torch.Tensor]
    positions: list[torch.Tensor]
    sizes: list[tuple[int, int]]
    mask_features: torch.Tensor
    backbone_last: torch.Tensor

    def select(self, index: int, repeat: int = 1) -> PerceptionMemory:
        """Image `index`'s memory, repeated `repeat` times along the batch (one query per copy)."""
        return PerceptionMemory(
            [f[:, index : index + 1].expand(-1, repeat, -1) for f in self.features],
            [p[:, index : index + 1].expand(-1, repeat, -1) for p in self.positions],
            list(self.sizes),
            self.mask_features[index : index + 1].expand(repeat, -1, -1, -1),
            self.backbone_last[index : index + 1],
        )


@dataclass
class DecodeOutput:
    """Per decoder layer (first = before any layer, as Mask2Former): class logits (B, K, labels+1) and
    mask logits (B, K, H/4, W/4); `queries` = last layer's query states (B, K, D), after the decoder's
    final LayerNorm, or before it with `query_states: raw` (OMG-Seg's convention, see omg_seg.py)."""

    class_logits: list[torch.Tensor]
    mask_logits: list[torch.Tensor]
    queries: torch.Tensor


@dataclass
class PerceptionOutput(DecodeOutput):
    memory: PerceptionMemory
    query_positions: torch.Tensor  # (B, Q, D) learned positional query embeddings

    @property
    def query_embeddings(self) -> torch.Tensor:
        """OMG's query embedding per query: content ++ position, (B, Q, 2D)."""
        return torch.cat([self.queries, self.query_positions], dim=-1)

    def scores(self) -> torch.Tensor:
        """Max non-background class probability per query, (B, Q)."""
        return self.class_logits[-1].softmax(-1)[..., :-1].max(-1).values


class PerceptionModel(nn.Module):
    """Mask2Former (transformers parts) with a split encode / decode and region-restricted queries."""

    def __init__(self, config: dict[str, Any] | Mask2FormerConfig):
        super().__init__()
        self.config = make_config(config)
        self.model = Mask2FormerModel(self.config)
        apply_backbone_feature_norm(self.model, self.config)  # OMG-Seg options: see perception/omg_seg.py
        self.class_predictor = build_class_head(self.config)
        self.prompt_query = build_prompt_query(self.config)
        self.weight_dict = {
            "loss_cross_entropy": self.config.class_weight,
            "loss_mask": self.config.mask_weight,
            "loss_dice": self.config.dice_weight,
        }
        self.criterion = PerceptionLoss(self.config, self.weight_dict)

    # -- persistence ---------------------------------------------------------------------------------

    def config_dict(self) -> dict[str, Any]:
        """A JSON-able config that `PerceptionModel(...)` rebuilds the same architecture from."""
        data = self.config.to_diff_dict()
        backbone = self.config.backbone_config.to_diff_dict()
        backbone["model_type"] = "convnext"
        backbone.pop("transformers_version", None)
        data["backbone_config"] = backbone
        data["num_labels"] = self.config.num_labels
        for key in ("id2label", "label2id", "transformers_version", "model_type"):
            data.pop(key, None)
        return data

    def save_pretrained(self, path: str | Path) -> None:
        """Config + safetensors: what stage 0 hands to the OMG tower (`vision.pretrained`)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2))
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path: str | Path) -> PerceptionModel:
        path = Path(path)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise CheckpointError(
                f"{path}: not a perception model directory (needs {CONFIG_NAME}, {WEIGHTS_NAME})"
            )
        model = cls(json.loads((path / CONFIG_NAME).read_text()))
        missing, unexpected = model.load_state_dict(load_file(path / WEIGHTS_NAME), strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        return model

    # -- encode / decode -----------------------------------------------------------------------------

    @property
    def hidden_dim(self) -> int:
        return int(self.config.hidden_dim)

    @property
    def backbone_channels(self) -> int:
        return int(self.config.backbone_config.hidden_sizes[-1])

    def encode(self, pixel_values: torch.Tensor) -> PerceptionMemory:
        """Backbone + pixel decoder once per image batch; the result can be cached and decoded repeatedly."""
        pixel = self.model.pixel_level_module(pixel_values)
        module = self.model.transformer_module
        features, positions, sizes = [], [], []
        for level in range(module.num_feature_levels):
            x = pixel.decoder_hidden_states[level]
            sizes.append((int(x.shape[-2]), int(x.shape[-1])))
            positions.append(
                module.position_embedder(x.shape, x.device, x.dtype, None).flatten(2).permute(2, 0, 1)
            )
            projected = (
                module.input_projections[level](x).flatten(2)
                + module.level_embed.weight[level][None, :, None]
            )
            features.append(projected.permute(2, 0, 1))
        return PerceptionMemory(
            features, positions, sizes, pixel.decoder_last_hidden_state, pixel.encoder_last_hidden_state
        )

    def _masks(self, normed: torch.Tensor, mask_features: torch.Tensor, decoder: nn.Module) -> torch.Tensor:
        embeddings = decoder.mask_predictor.mask_embedder(normed.transpose(0, 1))
        return torch.einsum("bqc,bchw->bqhw", embeddings, mask_features)

    def _attention_mask(
        self, mask_logits: torch.Tensor, size: tuple[int, int], region: torch.Tensor | None, rule: str
    ) -> torch.Tensor:
        """Mask2Former's masked attention (attend where the previous mask is > 0.5) combined with the
        query's region by `rule`: `prefer_region` (ours) intersects and falls back to the region, then to
        everything; `within_region` intersects and falls back to everything; `region_only` attends to
        the region alone (OMG-Seg's mask prompts); `unrestricted` ignores the region."""
        blocked = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False).sigmoid() < 0.5
        blocked = blocked.flatten(2)
        if region is not None and rule == "region_only":
            blocked = ~(F.interpolate(region.float(), size=size, mode="nearest") > 0).flatten(2)
        elif region is not None and rule in ("prefer_region", "within_region"):
            outside = ~(F.interpolate(region.float(), size=size, mode="area") > 0).flatten(2)
            blocked = blocked | outside
            if rule == "prefer_region":
                blocked = torch.where(blocked.all(-1, keepdim=True), outside, blocked)
        elif region is not None and rule != "unrestricted":
            raise ValueError(f"unknown region rule {rule!r}")
        blocked = blocked & ~blocked.all(-1, keepdim=True)
        return blocked.repeat_interleave(self.config.num_attention_heads, dim=0).detach()

    def decode(
        self,
        memory: PerceptionMemory,
        content: torch.Tensor,
        position: torch.Tensor,
        region: torch.Tensor | None = None,
        decoder: nn.Module | None = None,
        region_rule: str = "prefer_region",
    ) -> DecodeOutput:
        """Run queries (B, K, D) content + position through every decoder layer over `memory`.

        `region` (B, K, h, w) bool, any resolution, restricts each query's cross-attention to it in
        every layer (visual prompts), combined with its own predicted mask by `region_rule` (see
        `_attention_mask`). Queries in one batch row attend to each other (self-attention), as
        Mask2Former's learned queries do; decode independent queries as separate rows (`PerceptionMemory.select`).
        `decoder`: a copy of this model's transformer decoder to run instead (OMG-LLaVA's optional
        trainable [SEG] decoder); the memory and the class head stay this model's.
        """
        decoder = self.model.transformer_module.decoder if decoder is None else decoder
        hidden = content.transpose(0, 1)
        query_pos = position.transpose(0, 1)
        normed = decoder.layernorm(hidden)
        masks = [self._masks(normed, memory.mask_features, decoder)]
        classes = [classify(self.class_predictor, normed.transpose(0, 1), masks[-1], memory.mask_features)]
        levels = len(memory.sizes)
        for index, layer in enumerate(decoder.layers):
            level = index % levels
            attention = self._attention_mask(masks[-1], memory.sizes[level], region, region_rule)
            hidden = layer(
                hidden,
                level,
                None,
                memory.positions,
                query_pos,
                memory.features,
                encoder_attention_mask=attention,
            )[0]
            normed = decoder.layernorm(hidden)
            masks.append(self._masks(normed, memory.mask_features, decoder))
            classes.append(
                classify(self.class_predictor, normed.transpose(0, 1), masks[-1], memory.mask_features)
            )
        return DecodeOutput(classes, masks, handed_on(self.config, hidden, normed).transpose(0, 1))

    def forward(self, pixel_values: torch.Tensor, memory: PerceptionMemory | None = None) -> PerceptionOutput:
        """The learned queries over the images (encoding them unless a memory is given)."""
        memory = self.encode(pixel_values) if memory is None else memory
        batch = memory.mask_features.shape[0]
        module = self.model.transformer_module
        content = module.queries_features.weight.unsqueeze(0).expand(batch, -1, -1)
        position = module.queries_embedder.weight.unsqueeze(0).expand(batch, -1, -1)
        out = self.decode(memory, content, position)
        return PerceptionOutput(out.class_logits, out.mask_logits, out.queries, memory, position)

    # -- training and inference ----------------------------------------------------------------------

    def loss(
        self, output: DecodeOutput, mask_labels: list[torch.Tensor], class_labels: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Weighted Hungarian-matched losses (class CE, mask BCE, Dice) on the last and every earlier
        layer; `mask_labels[i]` is (n_i, H, W) float in the input image's frame, `class_labels[i]` (n_i,)."""
        aux = [
            {"masks_queries_logits": m, "class_queries_logits": c}
            for m, c in zip(output.mask_logits[:-1], output.class_logits[:-1], strict=True)
        ]
        losses = self.criterion(
            output.mask_logits[-1],
            output.class_logits[-1],
            mask_labels,
            class_labels,
            auxiliary_predictions=aux if self.config.use_auxiliary_loss else None,
        )
        weighted = {}
        for key, value in losses.items():
            weight = next(w for name, w in self.weight_dict.items() if key.startswith(name))
            weighted[key] = value * weight
        weighted["loss"] = sum(weighted.values())
        return weighted
