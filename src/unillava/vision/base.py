"""The vision tower interface and registry: modules that turn a list of images into a list of per-image feature sequences.

A tower declares how many tokens an image of a given size yields (`num_tokens`), so the processor can
reserve exactly that many image-token slots before the model runs. New towers (ConvNeXt, a segmentation
model) register under a type name and plug into the same multimodal core.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unillava.config import CLIP_MEAN, CLIP_STD, VisionConfig
from unillava.errors import CheckpointError, ConfigError
from unillava.weights import read_json

PROCESSOR_CONFIG = "processor_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"

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

    # How LLaVA checkpoints meet this tower: the config.json `model_type`s of a tower directory it reads
    # (named by `mm_vision_tower`), and whether `mm_vision_resolution` (ConvLLaVA) sets its input size.
    checkpoint_model_types: tuple[str, ...] = ()
    takes_mm_vision_resolution: bool = False

    @classmethod
    def config_from_checkpoint(cls, path: Path, data: dict[str, Any]) -> VisionConfig:
        """The VisionConfig (with `pretrained` = `path`) of a tower directory whose config.json is `data`."""
        raise NotImplementedError

    @staticmethod
    def llava_checkpoint_key(key: str) -> str | None:
        """A key of this tower saved inside a LLaVA checkpoint (after `model.vision_tower.vision_tower.`)
        -> our tower's key; None for a key it lacks."""
        return None

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


def tower_class_for_checkpoint(model_type: str, source: str) -> type[VisionTower]:
    """The registered tower class that reads tower directories of this config.json `model_type`."""
    readers = {
        kind: tower
        for tower in TOWERS.values()
        if isinstance(tower, type) and issubclass(tower, VisionTower)
        for kind in tower.checkpoint_model_types
    }
    if model_type not in readers:
        raise CheckpointError(
            f"{source}: vision tower model_type {model_type!r} is not supported; known: {', '.join(sorted(readers))}"
        )
    return readers[model_type]


def image_processor_config(path: Path) -> dict[str, Any]:
    """A tower directory's image-processor settings (preprocessor_config.json or processor_config.json)."""
    if (path / PREPROCESSOR_CONFIG).is_file():
        return read_json(path / PREPROCESSOR_CONFIG)
    if (path / PROCESSOR_CONFIG).is_file():
        return read_json(path / PROCESSOR_CONFIG).get("image_processor") or {}
    return {}


def preprocessing_from_image_processor(
    data: dict[str, Any], source: str, default_size: int
) -> tuple[int, str, list[float], list[float]]:
    """(image size, our image_mode, mean, std) from a transformers image-processor config.

    `do_pad` -> "pad" (LLaVA-1.5's expand-to-square); a square resize without crop -> "resize"; a
    shortest-edge resize plus centre crop (CLIPImageProcessor) -> "center_crop".
    """
    mean = list(data.get("image_mean") or CLIP_MEAN)
    std = list(data.get("image_std") or CLIP_STD)
    size_spec = data.get("size") or {}
    crop_spec = data.get("crop_size") or {}
    if isinstance(size_spec, int):
        size_spec = {"shortest_edge": size_spec}
    if isinstance(crop_spec, int):
        crop_spec = {"height": crop_spec, "width": crop_spec}
    center_crop = bool(data.get("do_center_crop", bool(crop_spec)))
    if center_crop and crop_spec:
        size = crop_spec.get("height")
        width = crop_spec.get("width", size)
    else:
        size = size_spec.get("height", size_spec.get("shortest_edge"))
        width = size_spec.get("width", size)
    if size is None:
        size = width = default_size
    if size != width:
        raise CheckpointError(f"{source}: non-square image size {width}x{size} is not supported")
    if data.get("do_pad"):
        mode = "pad"
    elif not center_crop and "height" in size_spec:
        mode = "resize"
    else:
        mode = "center_crop"
    return int(size), mode, mean, std
