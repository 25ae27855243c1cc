"""Reading and writing the checkpoint layouts LLaVA-family models are published in.

`load_model` recognises a directory by its files, never its name:

- unillava: `unillava_config.json` (our own `LlavaModel.save_pretrained`);
- original LLaVA: a `config.json` with LLaVA's wrapper class (`LlavaLlamaForCausalLM`, ...) or its
  `mm_vision_tower` / `mm_projector_type` keys (checked first: its model_type is often "llava" too);
- llava-hf: a `config.json` for transformers' `LlavaForConditionalGeneration` (model_type "llava").

`export_hf` writes the llava-hf layout, which transformers, vLLM and others load.
`unillava.omg.converter.convert_xtuner_checkpoint` turns the released OMG-LLaVA (XTuner `.pth`, OMG-Seg segmenter,
InternLM2 + LoRA) into a unillava directory (`unillava convert omg-xtuner`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from unillava.errors import CheckpointError
from unillava.hub.llava_hf import export_hf, load_llava_hf
from unillava.hub.original_llava import (
    is_original_llava,
    load_original_llava,
    tower_config_from_dir,
)
from unillava.modeling import CONFIG_NAME, LlavaModel
from unillava.weights import read_json

Layout = Literal["unillava", "llava_hf", "original_llava"]

__all__ = [
    "Layout",
    "detect_layout",
    "export_hf",
    "load_model",
    "tower_config_from_dir",
]


def _listing(path: Path, limit: int = 12) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not names:
        return "the directory is empty"
    shown = ", ".join(names[:limit])
    return "found: " + shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def detect_layout(path: str | Path) -> Layout:
    """Which layout a model directory holds, from its files; a CheckpointError says what was found instead."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such model directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; a model is a directory with its config and weights")
    if (path / CONFIG_NAME).is_file():
        return "unillava"
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"{path}: not a model directory (no {CONFIG_NAME} or config.json); {_listing(path)}"
        )
    config = read_json(config_file)
    if is_original_llava(config):
        return "original_llava"
    architectures = config.get("architectures") or []
    if "LlavaForConditionalGeneration" in architectures or config.get("model_type") == "llava":
        return "llava_hf"
    raise CheckpointError(
        f"{config_file}: architectures {architectures}, model_type {config.get('model_type')!r} is not a LLaVA "
        "checkpoint unillava reads (expected LlavaForConditionalGeneration, LlavaLlamaForCausalLM and "
        f"siblings, or {CONFIG_NAME})"
    )


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    *,
    vision_tower_path: str | Path | None = None,
    base_llm_path: str | Path | None = None,
) -> LlavaModel:
    """Load a model directory in any supported layout, offline, in eval mode.

    `vision_tower_path` and `base_llm_path` apply to original LLaVA checkpoints only: the local tower
    directory (CLIP, ConvNeXt) when `mm_vision_tower` names a hub model, and the base LLM beside a stage-1
    `mm_projector.bin`.
    """
    path = Path(path).expanduser()
    layout = detect_layout(path)
    if layout != "original_llava" and (vision_tower_path is not None or base_llm_path is not None):
        raise CheckpointError(
            f"{path}: a {layout} checkpoint is complete; vision_tower_path and base_llm_path apply to original "
            "LLaVA checkpoints only"
        )
    if layout == "unillava":
        return LlavaModel.from_pretrained(path, dtype=dtype).eval()
    if layout == "llava_hf":
        return load_llava_hf(path, dtype=dtype)
    return load_original_llava(
        path, dtype=dtype, vision_tower_path=vision_tower_path, base_llm_path=base_llm_path
    )
