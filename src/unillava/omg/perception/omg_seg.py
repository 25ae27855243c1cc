"""OMG-Seg's departures from transformers' Mask2Former, as options of a perception config.

A converted OMG-Seg checkpoint (`unillava.omg.converter`) must compute what the released segmenter
computes, because OMG-LLaVA's tokens are built from its class scores, raw backbone features and raw
query states:

- `class_head: "open_vocab"`. OMG-Seg has no Linear class head. It embeds each query (an MLP over the
  query plus its mask-pooled pixel features) and scores it by cosine similarity with fixed CLIP text
  embeddings of the class names, times exp(logit_scale); the background is a zero prototype, so its
  logit is always 0. The text embeddings are a saved buffer, so no CLIP text tower is needed at run time.
- `backbone_feature_norm: false`. transformers' `ConvNextBackbone` puts a LayerNorm on every stage output;
  OMG-Seg's pixel decoder (and OMG-LLaVA's pixel tokens) read the raw stage outputs.
- `query_states: raw`. OMG-Seg's head hands on its last decoder layer's output before the final LayerNorm
  (the norm is applied only to predict classes and masks); OMG-LLaVA's prior, object tokens and
  visual-prompt tokens are built from those raw states, so its projectors expect them.
- `prompt_queries: "omg_seg"`. OMG-Seg starts a visual-prompt query from learned weights: content
  `pb_embedding[0] + mask_tokens[0]`, position `pos_linear` of the sine encoding of a +-3 px box around
  the prompt's point, and its attention rule depends on the prompt (see `PROMPT_ATTENTION`). The default,
  `mean_query`, has no such weights (stage 0 has no interactive training): the mean learned query and a
  sine position of the anchor, restricted to the region (perception/prompts.py).

All default to the transformers behaviour (what stage 0 trains), so configs without these keys are
unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# OMG-Seg's fixed temperature: log(1 / 0.01), a buffer, never trained.
OMG_SEG_LOGIT_SCALE = 4.6052


def mask_pool(features: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Mean of `features` (B, C, h, w) over each mask's positive pixels -> (B, K, C); masks (B, K, H, W)
    are resized to the features first, as OMG-Seg does, and an empty mask pools to zeros."""
    if mask_logits.shape[-2:] != features.shape[-2:]:
        mask_logits = F.interpolate(
            mask_logits, size=features.shape[-2:], mode="bilinear", align_corners=False
        )
    mask = (mask_logits.detach() > 0).to(features.dtype)
    mask = mask / (mask.sum(dim=(-1, -2), keepdim=True) + 1e-8)
    return torch.einsum("bchw,bkhw->bkc", features, mask)


class OpenVocabClassHead(nn.Module):
    """OMG-Seg's classifier: logits (B, K, labels + 1) from queries, their masks and the mask features.

    `text_embeddings` (labels + 1, prototypes, dim) holds unit-norm CLIP text embeddings of the class
    names and a zero background row; a class scores the best of its prototypes (prompt templates).
    """

    def __init__(
        self,
        hidden_dim: int,
        embed_dim: int,
        num_labels: int,
        prototypes: int = 1,
        logit_scale: float = OMG_SEG_LOGIT_SCALE,
    ):
        super().__init__()
        self.mask_pooling_proj = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, hidden_dim))
        self.cls_proj = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, embed_dim),
        )
        self.register_buffer("text_embeddings", torch.zeros(num_labels + 1, prototypes, embed_dim))
        self.logit_scale = float(logit_scale)

    def forward(
        self, queries: torch.Tensor, mask_logits: torch.Tensor, mask_features: torch.Tensor
    ) -> torch.Tensor:
        pooled = self.mask_pooling_proj(mask_pool(mask_features, mask_logits))
        embedding = F.normalize(self.cls_proj(pooled + queries), dim=-1)
        similarity = torch.einsum("bkc,npc->bknp", embedding, self.text_embeddings.to(embedding.dtype))
        return similarity.max(-1).values * math.exp(self.logit_scale)


def build_class_head(config: Any) -> nn.Module:
    """The class head a perception config asks for: a Linear (default) or OMG-Seg's open-vocabulary head."""
    kind = getattr(config, "class_head", "linear")
    if kind == "linear":
        return nn.Linear(config.hidden_dim, config.num_labels + 1)
    if kind == "open_vocab":
        return OpenVocabClassHead(
            config.hidden_dim,
            int(config.class_embed_dim),
            config.num_labels,
            int(getattr(config, "class_prototypes", 1)),
            float(getattr(config, "class_logit_scale", OMG_SEG_LOGIT_SCALE)),
        )
    raise ValueError(f"perception config: class_head {kind!r} is not 'linear' or 'open_vocab'")


def classify(
    head: nn.Module, queries: torch.Tensor, mask_logits: torch.Tensor, mask_features: torch.Tensor
) -> torch.Tensor:
    """Class logits for normalised queries (B, K, D) whose masks are `mask_logits` (B, K, h, w)."""
    if isinstance(head, OpenVocabClassHead):
        return head(queries, mask_logits, mask_features)
    return head(queries)


# How a prompt query's cross-attention is restricted in each decoder layer, per prompt kind, with OMG-Seg's
# prompt queries: a box limits the query's own predicted mask to the box, a mask prompt is the only place
# it may look, a point is not restricted at all (its +-3 px box only places the query). Every rule falls
# back to the whole image when it would leave nothing to attend to.
PROMPT_ATTENTION = {"box": "within_region", "mask": "region_only", "point": "unrestricted"}
PROMPT_BOX_HALF_SIDE = 3  # px of the input, around the point (a box's centre, a mask's deepest point)


def sine_encoding(
    coords: torch.Tensor, columns: tuple[int, ...], num_feats: int, temperature: float = 10000.0
) -> torch.Tensor:
    """(K, C) coordinates in [0, 1] -> (K, len(columns) * num_feats): per listed column alternating
    sin / cos at DETR's frequencies, concatenated in the listed order (mmdet's `coordinate_to_encoding`
    lists y, x, w, h)."""
    steps = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    frequencies = temperature ** (2 * (steps // 2) / num_feats)
    parts = []
    for column in columns:
        angles = coords[:, column, None].float() * 2 * math.pi / frequencies
        parts.append(torch.stack([angles[:, 0::2].sin(), angles[:, 1::2].cos()], dim=-1).flatten(1))
    return torch.cat(parts, dim=-1)


class PromptQueryEmbedding(nn.Module):
    """OMG-Seg's visual-prompt query start: content and position (K, D) for anchors (K, 2) in [0, 1]."""

    def __init__(self, hidden_dim: int, labels: int = 2, mask_tokens: int = 1):
        super().__init__()
        self.pb_embedding = nn.Embedding(labels, hidden_dim)
        self.mask_tokens = nn.Embedding(mask_tokens, hidden_dim)
        self.pos_linear = nn.Linear(2 * hidden_dim, hidden_dim)

    def forward(
        self, anchors: torch.Tensor, input_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = input_size
        size = anchors.new_tensor([2 * PROMPT_BOX_HALF_SIDE / width, 2 * PROMPT_BOX_HALF_SIDE / height])
        # The released code passes the box through inverse_sigmoid and back: a clamp to [1e-5, 1 - 1e-5].
        boxes = torch.cat([anchors, size.expand_as(anchors)], dim=-1).clamp(0, 1)
        low, high = boxes.clamp(min=1e-5), (1 - boxes).clamp(min=1e-5)
        boxes = low / (low + high)  # (cx, cy, w, h)
        position = self.pos_linear(sine_encoding(boxes, (1, 0, 2, 3), self.pos_linear.in_features // 4))
        content = (self.pb_embedding.weight[0] + self.mask_tokens.weight[0]).expand(len(anchors), -1)
        return content, position


def build_prompt_query(config: Any) -> PromptQueryEmbedding | None:
    """OMG-Seg's prompt-query weights when the config asks for them (`prompt_queries: omg_seg`)."""
    kind = getattr(config, "prompt_queries", "mean_query")
    if kind == "mean_query":
        return None
    if kind == "omg_seg":
        return PromptQueryEmbedding(
            config.hidden_dim,
            int(getattr(config, "prompt_query_labels", 2)),
            int(getattr(config, "prompt_mask_tokens", 1)),
        )
    raise ValueError(f"perception config: prompt_queries {kind!r} is not 'mean_query' or 'omg_seg'")


def apply_backbone_feature_norm(model: nn.Module, config: Any) -> None:
    """With `backbone_feature_norm: false`, replace the backbone's per-stage output norms by identities."""
    if getattr(config, "backbone_feature_norm", True):
        return
    backbone = model.pixel_level_module.encoder
    backbone.hidden_states_norms = nn.ModuleDict(
        {name: nn.Identity() for name in backbone.hidden_states_norms}
    )


def handed_on(config: Any, hidden: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
    """The query states a decode returns: normalised (default) or raw (`query_states: raw`)."""
    kind = getattr(config, "query_states", "normed")
    if kind not in ("normed", "raw"):
        raise ValueError(f"perception config: query_states {kind!r} is not 'normed' or 'raw'")
    return hidden if kind == "raw" else normed
