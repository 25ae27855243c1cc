"""ConvNeXt checkpoints in the layouts ConvLLaVA meets, read into a transformers `ConvNextModel`.

Three sources exist in the wild: transformers directories (LAION-CLIP-ConvNeXt-Large-512, and the
ConvLLaVA-ConvNeXt-{768,1024,1536} towers with a 5th stage), timm / open_clip state dicts (the LAION
CLIP ConvNeXt the paper starts from), and ConvLLaVA's LLM repos (`LlavaLlamaForCausalLM` naming a tower
directory in `mm_vision_tower`). Everything is loaded strictly: a key that maps nowhere or a weight that
is missing is a `CheckpointError` naming the keys, because a silently half-loaded tower still runs and
only shows up as bad benchmark numbers much later.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import ConvNextConfig, ConvNextModel

from unillava.config import VisionConfig
from unillava.errors import CheckpointError
from unillava.weights import check_state_dict, key_list

# The pooled-output norm of ConvNextModel: the tower never uses it (features are the raw last-stage
# map), so a checkpoint may lack it or carry one of another width (ConvLLaVA appends stage 5 without
# resizing it).
FINAL_NORM_KEYS = ("layernorm.weight", "layernorm.bias")

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "open_clip_model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "open_clip_pytorch_model.bin",
)

_TIMM_STEM = {
    "stem.0.weight": "embeddings.patch_embeddings.weight",
    "stem.0.bias": "embeddings.patch_embeddings.bias",
    "stem.1.weight": "embeddings.layernorm.weight",
    "stem.1.bias": "embeddings.layernorm.bias",
    "head.norm.weight": "layernorm.weight",
    "head.norm.bias": "layernorm.bias",
}
_TIMM_BLOCK_PARTS = {
    "conv_dw.weight": "dwconv.weight",
    "conv_dw.bias": "dwconv.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
    "mlp.fc1.weight": "pwconv1.weight",
    "mlp.fc1.bias": "pwconv1.bias",
    "mlp.fc2.weight": "pwconv2.weight",
    "mlp.fc2.bias": "pwconv2.bias",
    "gamma": "layer_scale_parameter",
}
# The classifier of an ImageNet timm model: there is no place for it in a feature extractor.
_TIMM_DROPPED = ("head.fc.weight", "head.fc.bias")
_TIMM_BLOCK = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$")
_TIMM_DOWNSAMPLE = re.compile(r"^stages\.(\d+)\.downsample\.([01])\.(weight|bias)$")


def read_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a weights file or a directory (safetensors or torch pickles, sharded or not)."""
    path = Path(source).expanduser()
    if path.is_dir():
        for name in _WEIGHT_FILES:
            if (path / name).is_file():
                return read_state_dict(path / name)
        raise CheckpointError(f"{path}: no weights file (looked for {', '.join(_WEIGHT_FILES)})")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: malformed shard index ({err})") from None
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_state_dict(path.parent / shard))
        return state
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad pickle; all mean the same here
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint ({err})") from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, got {type(loaded).__name__}")
    return {k.removeprefix("module."): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def normalize_convnext_config(data: Mapping[str, Any], where: str) -> ConvNextConfig:
    """A ConvNextConfig whose stage count matches its depths and widths.

    transformers builds `num_stages` stages (default 4) whatever `depths` says, so a hand-written
    5-stage config without `num_stages` would silently lose stage 5: fill it in, refuse contradictions.
    """
    data = dict(data)
    if data.get("model_type", "convnext") != "convnext":
        raise CheckpointError(f"{where}: model_type {data['model_type']!r} is not a ConvNeXt")
    depths = list(data.get("depths") or ConvNextConfig().depths)
    widths = list(data.get("hidden_sizes") or ConvNextConfig().hidden_sizes)
    if len(depths) != len(widths):
        raise CheckpointError(f"{where}: depths {depths} and hidden_sizes {widths} differ in length")
    stages = data.setdefault("num_stages", len(depths))
    if stages != len(depths):
        raise CheckpointError(f"{where}: num_stages {stages} but {len(depths)} depths {depths}")
    data["depths"], data["hidden_sizes"] = depths, widths
    data.pop("stage_names", None)
    if "out_features" in data or "out_indices" in data:
        data["out_features"] = [f"stage{len(depths)}"]
        data.pop("out_indices", None)
    return ConvNextConfig.from_dict(data)


def check_and_load(model: ConvNextModel, state: Mapping[str, torch.Tensor], source: str) -> ConvNextModel:
    """Load `state` into `model`, refusing missing, unknown or misshapen keys (final norm optional)."""
    check_state_dict(model.state_dict(), state, source, optional=FINAL_NORM_KEYS)
    model.load_state_dict(dict(state), strict=False)
    return model


def load_hf_convnext(path: str | Path) -> ConvNextModel:
    """A transformers ConvNeXt directory (4 stages, or ConvLLaVA's 5) -> ConvNextModel.

    Accepts `ConvNextModel` and `ConvNextForImageClassification` weights (prefix `convnext.`, the
    classifier dropped). A final norm whose width differs from the last stage's (ConvLLaVA's towers keep
    the 4-stage one) is dropped: the tower never uses it.
    """
    path = Path(path).expanduser()
    config_file = path / "config.json"
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_file}: cannot read ({err})") from None
    config = normalize_convnext_config(raw, str(config_file))
    state = read_state_dict(path)
    if any(k.startswith("convnext.") for k in state):
        state = {k.removeprefix("convnext."): v for k, v in state.items() if not k.startswith("classifier.")}
    width = config.hidden_sizes[-1]
    if "layernorm.weight" in state and tuple(state["layernorm.weight"].shape) != (width,):
        state = {k: v for k, v in state.items() if k not in FINAL_NORM_KEYS}
    return check_and_load(ConvNextModel(config), state, str(path))


def _find_trunk_prefix(keys: list[str]) -> str:
    prefixes = sorted({k[: -len("stem.0.weight")] for k in keys if k.endswith("stem.0.weight")})
    if not prefixes:
        raise CheckpointError("not a timm/open_clip ConvNeXt: no `stem.0.weight` key")
    if len(prefixes) > 1:
        raise CheckpointError(f"several ConvNeXt trunks in one state dict: prefixes {prefixes}")
    return prefixes[0]


def convert_timm_convnext(
    state_dict: Mapping[str, torch.Tensor], prefix: str | None = None
) -> tuple[ConvNextConfig, dict[str, torch.Tensor]]:
    """timm / open_clip ConvNeXt weights -> (ConvNextConfig, ConvNextModel state dict).

    Depths, widths, patch size and layer scale are read off the keys and shapes. The trunk prefix
    (`visual.trunk.` for open_clip, none for timm) is found from `stem.0.weight` unless given; keys
    outside it (a CLIP text tower, the CLIP projection head) are not part of the ConvNeXt and are left
    alone. Inside the trunk every key must map (the ImageNet classifier `head.fc` is dropped), and every
    weight of the model must be present; otherwise a CheckpointError lists the keys.
    """
    keys = list(state_dict)
    if prefix is None:
        prefix = _find_trunk_prefix(keys)
    trunk = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    blocks: dict[int, set[int]] = {}
    widths: dict[int, int] = {}
    has_gamma = False
    for key, tensor in trunk.items():
        if key in _TIMM_DROPPED:
            continue
        if key in _TIMM_STEM:
            out[_TIMM_STEM[key]] = tensor
            continue
        if match := _TIMM_DOWNSAMPLE.match(key):
            stage, index, kind = match.groups()
            out[f"encoder.stages.{stage}.downsampling_layer.{index}.{kind}"] = tensor
            continue
        match = _TIMM_BLOCK.match(key)
        if match is None or match.group(3) not in _TIMM_BLOCK_PARTS:
            unknown.append(prefix + key)
            continue
        stage, block, part = int(match.group(1)), int(match.group(2)), match.group(3)
        blocks.setdefault(stage, set()).add(block)
        if part.startswith("mlp.") and part.endswith("weight") and tensor.dim() == 4:
            tensor = tensor.flatten(1)  # conv_mlp variants store the 1x1 convs as Conv2d
        if part == "conv_dw.weight":
            widths[stage] = int(tensor.shape[0])
        has_gamma = has_gamma or part == "gamma"
        out[f"encoder.stages.{stage}.layers.{block}.{_TIMM_BLOCK_PARTS[part]}"] = tensor
    if unknown:
        raise CheckpointError(f"timm ConvNeXt: {len(unknown)} unknown key(s) [{key_list(sorted(unknown))}]")
    if "embeddings.patch_embeddings.weight" not in out:
        raise CheckpointError(f"timm ConvNeXt: no stem weights under prefix {prefix!r}")
    n_stages = max(blocks, default=-1) + 1
    if not n_stages or sorted(blocks) != list(range(n_stages)) or sorted(widths) != list(range(n_stages)):
        raise CheckpointError(f"timm ConvNeXt: stages {sorted(blocks)} are not numbered 0..n-1 with blocks")
    depths = []
    for stage in range(n_stages):
        if sorted(blocks[stage]) != list(range(len(blocks[stage]))):
            raise CheckpointError(
                f"timm ConvNeXt: stage {stage} has gaps in its blocks {sorted(blocks[stage])}"
            )
        depths.append(len(blocks[stage]))
    stem = out["embeddings.patch_embeddings.weight"]
    config = ConvNextConfig(
        num_channels=int(stem.shape[1]),
        patch_size=int(stem.shape[-1]),
        num_stages=n_stages,
        depths=depths,
        hidden_sizes=[widths[i] for i in range(n_stages)],
        layer_norm_eps=1e-6,
        layer_scale_init_value=1e-6 if has_gamma else 0.0,
        out_features=[f"stage{n_stages}"],
    )
    with torch.device("meta"):
        skeleton = ConvNextModel(config)
    check_state_dict(skeleton.state_dict(), out, "timm ConvNeXt", optional=FINAL_NORM_KEYS)
    return config, out


def load_convnext_model(source: str | Path) -> ConvNextModel:
    """Any supported ConvNeXt checkpoint -> ConvNextModel: a transformers directory (config.json with
    model_type convnext), or a timm / open_clip weights file or directory."""
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: ConvNeXt checkpoint not found (no model hub is reached at run time)")
    config_file = path / "config.json"
    if path.is_dir() and config_file.is_file():
        try:
            model_type = json.loads(config_file.read_text()).get("model_type")
        except (OSError, json.JSONDecodeError, AttributeError) as err:
            raise CheckpointError(f"{config_file}: cannot read ({err})") from None
        if model_type == "convnext":
            return load_hf_convnext(path)
        if model_type is not None:
            raise CheckpointError(f"{config_file}: model_type {model_type!r} is not a ConvNeXt")
    config, state = convert_timm_convnext(read_state_dict(path))
    return check_and_load(ConvNextModel(config), state, str(path))


def convnext_tower_config(path: Path, data: dict[str, Any]) -> VisionConfig:
    """`TOWER_LOADERS` entry: a ConvNeXt directory named by a LLaVA checkpoint's `mm_vision_tower`.

    The directory's own config decides the stage count (ConvLLaVA's towers have 5); the square input size
    comes from its image processor (crop size) or config `image_size`, as ConvLLaVA's model zoo tells
    users to edit both. The LLaVA loader then applies `mm_vision_resolution` and `image_aspect_ratio`.
    """
    from unillava.hub.llava_hf import PREPROCESSOR_CONFIG, preprocessing_from_image_processor, read_json

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
