"""ConvLLaVA's checkpoint layout: LLM repos (`LlavaLlamaForCausalLM`) that name a ConvNeXt tower
directory in `mm_vision_tower`, and the key names of a ConvNeXt saved inside a LLaVA checkpoint.

The ConvNeXt weight readers themselves (transformers directories with 4 or 5 stages, timm / open_clip
state dicts) belong to the tower: `unillava.vision.convnext`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from unillava.config import VisionConfig
from unillava.hub.llava_hf import PREPROCESSOR_CONFIG, preprocessing_from_image_processor, read_json
from unillava.vision.convnext import normalize_convnext_config


def convnext_tower_config(path: Path, data: dict[str, Any]) -> VisionConfig:
    """`TOWER_LOADERS` entry: a ConvNeXt directory named by a LLaVA checkpoint's `mm_vision_tower`.

    The directory's own config decides the stage count (ConvLLaVA's towers have 5); the square input size
    comes from its image processor (crop size) or config `image_size`, as ConvLLaVA's model zoo tells
    users to edit both. The LLaVA loader then applies `mm_vision_resolution` and `image_aspect_ratio`.
    """
    normalize_convnext_config(data, f"{path}/config.json")
    image = read_json(path / PREPROCESSOR_CONFIG) if (path / PREPROCESSOR_CONFIG).is_file() else {}
    default_size = data.get("image_size")
    size, _, mean, std = preprocessing_from_image_processor(
        image, str(path), default_size=int(default_size) if isinstance(default_size, int) else 768
    )
    return VisionConfig(
        type="convnext",
        pretrained=str(path),
        select_layer=-1,
        image_size=size,
        image_mode="pad",
        image_mean=mean,
        image_std=std,
    )


def convnext_tower_key(key: str) -> str | None:
    """`TOWER_KEY_RENAMES` entry: a key after LLaVA's `model.vision_tower.vision_tower.` (a ConvNextModel,
    as ConvLLaVA saves it) -> our tower's key; None for anything else."""
    return f"model.{key}" if re.match(r"^(?:embeddings|encoder|layernorm)\..+$", key) else None
