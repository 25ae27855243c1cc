"""CLIP ViT tower (LLaVA-1.5)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from unillava.config import CLIP_MEAN, CLIP_STD, VisionConfig
from unillava.errors import CheckpointError, ConfigError
from unillava.vision.base import (
    VisionTower,
    image_processor_config,
    preprocessing_from_image_processor,
    register_tower,
)


@register_tower("clip")
class CLIPTower(VisionTower):
    """CLIP ViT as in LLaVA-1.5: hidden states of `select_layer`, with or without the CLS token."""

    checkpoint_model_types = ("clip_vision_model", "clip")

    @classmethod
    def config_from_checkpoint(cls, path: Path, data: dict[str, Any]) -> VisionConfig:
        """A `CLIPVisionModel` (clip_vision_model) or a whole `CLIPModel` (clip) directory."""
        vision = data if data.get("model_type") == "clip_vision_model" else data.get("vision_config") or {}
        native = int(vision.get("image_size", 224))
        size, mode, mean, std = preprocessing_from_image_processor(
            image_processor_config(path), str(path), default_size=native
        )
        if size != native:
            raise CheckpointError(
                f"{path}: the image processor makes {size}px images but the CLIP tower takes {native}px"
            )
        return VisionConfig(
            type="clip",
            pretrained=str(path),
            image_size=size,
            image_mode=mode,
            image_mean=mean or list(CLIP_MEAN),
            image_std=std or list(CLIP_STD),
        )

    @staticmethod
    def llava_checkpoint_key(key: str) -> str | None:
        """LLaVA saves a `CLIPVisionModel`, keys with or without `vision_model.`."""
        match = re.match(
            r"^(?:vision_model\.)?((?:embeddings|pre_layrnorm|encoder|post_layernorm)\..+)$", key
        )
        return f"model.{match.group(1)}" if match else None

    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.select_feature not in ("patch", "cls_patch"):
            raise ConfigError(
                f"vision.select_feature: expected 'patch' or 'cls_patch', got {config.select_feature!r}"
            )
        self.config = config
        if config.pretrained:
            self.model = CLIPVisionModel.from_pretrained(config.pretrained)
        elif config.hf_config is not None:
            self.model = CLIPVisionModel(CLIPVisionConfig(**config.hf_config))
        else:
            raise ConfigError("vision: set `pretrained` (a CLIP vision checkpoint) or `hf_config`")
        hf = self.model.config
        self.hidden_size = hf.hidden_size
        self.patch_size = hf.patch_size
        self.native_size = hf.image_size
        n_layers = hf.num_hidden_layers
        if not -n_layers - 1 <= config.select_layer <= n_layers:
            raise ConfigError(
                f"vision.select_layer={config.select_layer} is outside the tower's {n_layers} layers"
            )

    def hf_config_dict(self) -> dict[str, Any]:
        return self.model.config.to_diff_dict()

    def num_tokens(self, height: int, width: int) -> int:
        if (height, width) != (self.native_size, self.native_size):
            raise ConfigError(
                f"CLIP tower takes {self.native_size}x{self.native_size} images, got {height}x{width}"
            )
        patches = (height // self.patch_size) * (width // self.patch_size)
        return patches + (1 if self.config.select_feature == "cls_patch" else 0)

    def encode_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.model.embeddings.patch_embedding.weight.dtype
        out = self.model(pixel_values.to(dtype), output_hidden_states=True)
        features = out.hidden_states[self.config.select_layer]
        return features[:, 1:] if self.config.select_feature == "patch" else features
