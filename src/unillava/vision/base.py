"""The vision tower interface and registry: modules that turn a list of images into a list of per-image feature sequences.

A tower declares how many tokens an image of a given size yields (`num_tokens`), so the processor can
reserve exactly that many image-token slots before the model runs. New towers (ConvNeXt, a segmentation
model) register under a type name and plug into the same multimodal core.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from unillava.config import CLIP_MEAN, CLIP_STD, VisionConfig
from unillava.errors import ConfigError

TOWERS: dict[str, Callable[[VisionConfig], VisionTower]] = {}


def register_tower(name: str) -> Callable:
    def decorate(builder: Callable[[VisionConfig], VisionTower]) -> Callable[[VisionConfig], VisionTower]:
        TOWERS[name] = builder
        return builder

    return decorate


class VisionTower(nn.Module):
    """Base class: `forward(images) -> list[(tokens_i, hidden_size)]`, one entry per image."""

    hidden_size: int
    config: VisionConfig
    # The normalisation the tower's weights were trained with, used where the config leaves it unset.
    default_mean: tuple[float, float, float] = CLIP_MEAN
    default_std: tuple[float, float, float] = CLIP_STD

    def num_tokens(self, height: int, width: int) -> int:
        raise NotImplementedError

    def hf_config_dict(self) -> dict[str, Any]:
        """The transformers config of the wrapped model, saved with a checkpoint to rebuild it offline."""
        raise NotImplementedError

    def encode_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) of one size -> (B, tokens, hidden_size)."""
        raise NotImplementedError

    def forward(self, images: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """Encode images of possibly different sizes: same-size images run together in one batch."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            return list(self.encode_batch(images))
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(tuple(image.shape[-2:]), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(images)
        for indices in by_size.values():
            features = self.encode_batch(torch.stack([images[i] for i in indices]))
            for i, feature in zip(indices, features, strict=True):
                out[i] = feature
        return out  # type: ignore[return-value]


def build_vision_tower(config: VisionConfig) -> VisionTower:
    if config.type not in TOWERS:
        raise ConfigError(f"vision.type: unknown tower {config.type!r}; known: {', '.join(sorted(TOWERS))}")
    tower = TOWERS[config.type](config)
    if config.image_mean is None:
        config.image_mean = list(tower.default_mean)
    if config.image_std is None:
        config.image_std = list(tower.default_std)
    tower.requires_grad_(config.trainable)
    return tower
