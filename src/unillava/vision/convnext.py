"""ConvNeXt tower (ConvLLaVA): a hierarchical backbone whose token count grows linearly with pixels.

A transformers `ConvNextModel`, optionally with a 5th stage appended (downsample x2 + ConvNeXt blocks,
layer scale 1e-6 so it starts near identity), for an output stride of 64: 768 px -> 144 tokens,
1536 px -> 576. The feature is the raw last-stage map (no final norm) flattened row-major to
(H/stride * W/stride, channels).

Image-size policy: the tower only accepts sides that are positive multiples of its stride and says so
with a ConfigError; the preprocessor is set up to always produce such sides (`pad`/`resize` need an
`image_size` divisible by the stride; `any` mode rounds both sides to `extra.multiple_of`, which defaults
to the stride, and `extra.max_long_side` caps extreme aspect ratios and huge images). See
docs/convllava.md.

`extra` keys: `add_stage5: {depth, width, layer_scale_init}` (append stage 5 to a 4-stage model; a no-op
when the model already has a matching 5th stage, so a saved model reloads unchanged),
`unfreeze_from_stage: k` (with `trainable: true`, only stages >= k train; stages count from 1, the stem
is stage 0), and the preprocessor's `multiple_of` / `max_long_side`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import ConvNextConfig, ConvNextModel
from transformers.models.convnext.modeling_convnext import ConvNextLayer, ConvNextStage

from unillava.config import VisionConfig
from unillava.errors import CheckpointError, ConfigError
from unillava.vision.base import (
    VisionTower,
    image_processor_config,
    preprocessing_from_image_processor,
    register_tower,
)
from unillava.weights import WEIGHT_FILES as WEIGHT_FILES_HF
from unillava.weights import check_state_dict, key_list, read_state_dict

# The pooled-output norm of ConvNextModel: the tower never uses it (features are the raw last-stage
# map), so a checkpoint may lack it or carry one of another width (ConvLLaVA appends stage 5 without
# resizing it).
FINAL_NORM_KEYS = ("layernorm.weight", "layernorm.bias")

# Where a ConvNeXt directory keeps its weights: transformers' names, then open_clip's.
WEIGHT_FILES = (*WEIGHT_FILES_HF, "open_clip_model.safetensors", "open_clip_pytorch_model.bin")

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
    state = read_state_dict(path, WEIGHT_FILES)
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
    config, state = convert_timm_convnext(read_state_dict(path, WEIGHT_FILES))
    return check_and_load(ConvNextModel(config), state, str(path))


STAGE5_DEFAULTS: dict[str, Any] = {"depth": 6, "width": 3072, "layer_scale_init": 1e-6}
EXTRA_KEYS = ("add_stage5", "unfreeze_from_stage", "multiple_of", "max_long_side")


def output_stride(model: ConvNextModel) -> int:
    """Pixels per output token side: the stem's patch size, halved resolution for every later stage."""
    patch = model.config.patch_size
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise ConfigError(f"ConvNeXt tower: non-square patch size {patch} is not supported")
        patch = patch[0]
    return int(patch) * 2 ** (model.config.num_stages - 1)


def add_stage(
    model: ConvNextModel, depth: int = 6, width: int = 3072, layer_scale_init: float = 1e-6
) -> ConvNextModel:
    """Append one stage in place (LayerNorm + 2x2 stride-2 conv, then `depth` blocks): ConvLLaVA's stage 5.

    The blocks' layer scale starts at `layer_scale_init`, so each block is close to identity and the new
    stage begins as little more than a learned downsampling. The config is updated to match (depths,
    hidden_sizes, num_stages, out_features), so `hf_config_dict()` rebuilds the same model; the unused
    pooled-output norm is resized to the new width for the same reason.
    """
    config = model.config
    if config.layer_scale_init_value <= 0:
        raise ConfigError(
            "add_stage5: the ConvNeXt has no layer scale, so a new stage cannot start near identity"
        )
    if depth < 1 or width < 1:
        raise ConfigError(f"add_stage5: depth and width must be positive, got depth={depth} width={width}")
    reference = next(model.parameters())
    stage = ConvNextStage(config, in_channels=config.hidden_sizes[-1], out_channels=width, depth=depth)
    for module in stage.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(module.weight, std=config.initializer_range)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, ConvNextLayer) and module.layer_scale_parameter is not None:
            nn.init.constant_(module.layer_scale_parameter, layer_scale_init)
    model.encoder.stages.append(stage.to(device=reference.device, dtype=reference.dtype))
    model.layernorm = nn.LayerNorm(width, eps=config.layer_norm_eps).to(
        device=reference.device, dtype=reference.dtype
    )
    n = config.num_stages + 1
    config.depths = [*config.depths, depth]
    config.hidden_sizes = [*config.hidden_sizes, width]
    config.num_stages = n
    config.stage_names = ["stem"] + [f"stage{i}" for i in range(1, n + 1)]
    config.out_features = [f"stage{n}"]
    return model


def _stage5_settings(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"vision.extra.add_stage5: expected a mapping like {{depth: 6, width: 3072}}, got {value!r}"
        )
    unknown = sorted(set(value) - set(STAGE5_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"vision.extra.add_stage5: unknown key(s) {', '.join(unknown)}; known: depth, width, layer_scale_init"
        )
    settings = {**STAGE5_DEFAULTS, **value}
    for key in ("depth", "width"):
        if not isinstance(settings[key], int) or isinstance(settings[key], bool) or settings[key] < 1:
            raise ConfigError(
                f"vision.extra.add_stage5.{key}: expected a positive integer, got {settings[key]!r}"
            )
    if not isinstance(settings["layer_scale_init"], (int, float)) or settings["layer_scale_init"] <= 0:
        raise ConfigError(
            f"vision.extra.add_stage5.layer_scale_init: expected a positive number, got {settings['layer_scale_init']!r}"
        )
    return settings


def ensure_stage5(model: ConvNextModel, settings: Mapping[str, Any]) -> ConvNextModel:
    """Add stage 5 to a 4-stage model; accept a 5-stage model whose last stage already matches."""
    config = model.config
    if config.num_stages == 4:
        return add_stage(model, settings["depth"], settings["width"], float(settings["layer_scale_init"]))
    if config.num_stages == 5 and (config.depths[-1], config.hidden_sizes[-1]) == (
        settings["depth"],
        settings["width"],
    ):
        return model
    raise ConfigError(
        f"vision.extra.add_stage5 {{depth: {settings['depth']}, width: {settings['width']}}}: the ConvNeXt has "
        f"{config.num_stages} stages (depths {list(config.depths)}, widths {list(config.hidden_sizes)}); "
        "a 5th stage can only be added to a 4-stage model"
    )


@register_tower("convnext")
class ConvNeXtTower(VisionTower):
    """ConvNeXt (4 or 5 stages) as in ConvLLaVA: raw last-stage features, stride 32 or 64."""

    checkpoint_model_types = ("convnext",)
    takes_mm_vision_resolution = True

    @classmethod
    def config_from_checkpoint(cls, path: Path, data: dict[str, Any]) -> VisionConfig:
        """A ConvNeXt directory named by a ConvLLaVA checkpoint's `mm_vision_tower`.

        The directory's own config decides the stage count (ConvLLaVA's towers have 5); the square input
        size comes from its image processor (crop size) or config `image_size`, as ConvLLaVA's model zoo
        tells users to edit both. The LLaVA loader then applies `mm_vision_resolution`.
        """
        normalize_convnext_config(data, f"{path}/config.json")
        default_size = data.get("image_size")
        size, _, mean, std = preprocessing_from_image_processor(
            image_processor_config(path),
            str(path),
            default_size=default_size if isinstance(default_size, int) else 768,
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

    @staticmethod
    def llava_checkpoint_key(key: str) -> str | None:
        """ConvLLaVA saves a `ConvNextModel`."""
        return f"model.{key}" if re.match(r"^(?:embeddings|encoder|layernorm)\..+$", key) else None

    def __init__(self, config: VisionConfig):
        super().__init__()
        unknown = sorted(set(config.extra) - set(EXTRA_KEYS))
        if unknown:
            raise ConfigError(
                f"vision.extra: unknown key(s) {', '.join(unknown)} for convnext; known: {', '.join(EXTRA_KEYS)}"
            )
        if config.select_layer != -1:
            raise ConfigError(
                f"vision.select_layer={config.select_layer}: the convnext tower hands on the raw last stage; set -1"
            )
        if config.select_feature != "patch":
            raise ConfigError(
                f"vision.select_feature: convnext has no CLS token; use 'patch', got {config.select_feature!r}"
            )
        self.config = config
        if config.pretrained:
            model = load_convnext_model(config.pretrained)
        elif config.hf_config is not None:
            try:
                model = ConvNextModel(normalize_convnext_config(config.hf_config, "vision.hf_config"))
            except CheckpointError as err:
                raise ConfigError(str(err)) from None
        else:
            raise ConfigError("vision: set `pretrained` (a ConvNeXt checkpoint) or `hf_config`")
        if config.extra.get("add_stage5") is not None:
            model = ensure_stage5(model, _stage5_settings(config.extra["add_stage5"]))
        self.model = model
        self.num_stages: int = model.config.num_stages
        self.stride = output_stride(model)
        self.hidden_size = model.config.hidden_sizes[-1]
        self.unfreeze_from_stage = self._check_unfreeze(config.extra.get("unfreeze_from_stage"))
        self._check_image_policy(config)
        self.model.layernorm.requires_grad_(False)

    def _check_unfreeze(self, value: Any) -> int | None:
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= self.num_stages:
            raise ConfigError(
                f"vision.extra.unfreeze_from_stage: expected an integer 0..{self.num_stages} "
                f"(0 = stem, stages count from 1), got {value!r}"
            )
        return value

    def _check_image_policy(self, config: VisionConfig) -> None:
        """Make the preprocessor produce sides the tower accepts; refuse settings that cannot."""
        s = self.stride
        if config.image_mode in ("pad", "resize") and config.image_size % s:
            lower, upper = max(s, config.image_size // s * s), (config.image_size // s + 1) * s
            raise ConfigError(
                f"vision.image_size={config.image_size} is not a multiple of the ConvNeXt stride {s}; "
                f"use {lower} or {upper}"
            )
        if config.image_mode == "any":
            multiple = config.extra.setdefault("multiple_of", s)
            if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple <= 0 or multiple % s:
                raise ConfigError(
                    f"vision.extra.multiple_of={multiple!r} must be a multiple of the ConvNeXt stride {s}"
                )

    def set_unfreeze_from_stage(self, stage: int | None) -> None:
        """Change which stages train (e.g. stage 1 trains stage 5 only, stage 2 from stage 3 on).

        A model continued with `init_from` carries the previous stage's setting in its saved config; a
        trainer calls this before `requires_grad_`. The config is updated so the next save records it.
        """
        self.unfreeze_from_stage = self._check_unfreeze(stage)
        if stage is None:
            self.config.extra.pop("unfreeze_from_stage", None)
        else:
            self.config.extra["unfreeze_from_stage"] = stage
        self.requires_grad_(any(p.requires_grad for p in self.parameters()))

    def requires_grad_(self, requires_grad: bool = True) -> ConvNeXtTower:
        """Like nn.Module's, but with `unfreeze_from_stage: k` only stages >= k train when enabled.

        `build_vision_tower` calls this with `vision.trainable`, and a trainer that re-enables the tower
        keeps the same partial unfreezing. The pooled-output norm is unused and always stays frozen.
        """
        super().requires_grad_(requires_grad)
        if requires_grad and self.unfreeze_from_stage is not None:
            self.model.embeddings.requires_grad_(self.unfreeze_from_stage == 0)
            for index, stage in enumerate(self.model.encoder.stages, start=1):
                stage.requires_grad_(index >= self.unfreeze_from_stage)
        self.model.layernorm.requires_grad_(False)
        return self

    def lr_depth(self, name: str) -> int:
        """Stages between parameter `name` (relative to the tower) and the top, for layer-wise LR decay.

        The last stage (and the unused pooled-output norm) is 0, the stage below it 1, ..., the stem
        `num_stages`: early stages hold generic low-level features that a fine-tune should move least.
        """
        if name.startswith("model.embeddings."):
            return self.num_stages
        prefix = "model.encoder.stages."
        if name.startswith(prefix):
            return self.num_stages - 1 - int(name[len(prefix) :].split(".", 1)[0])
        return 0

    def hf_config_dict(self) -> dict[str, Any]:
        return self.model.config.to_diff_dict()

    def num_tokens(self, height: int, width: int) -> int:
        s = self.stride
        if height < s or width < s or height % s or width % s:
            raise ConfigError(
                f"ConvNeXt tower (stride {s}) takes image sides that are positive multiples of {s}, got "
                f"{height}x{width}; preprocess with an image_size divisible by {s}, or image_mode any with "
                f"extra.multiple_of {s}"
            )
        return (height // s) * (width // s)

    def encode_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.num_tokens(int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))
        dtype = self.model.embeddings.patch_embeddings.weight.dtype
        features = self.model.embeddings(pixel_values.to(dtype))
        for stage in self.model.encoder.stages:
            features = stage(features)
        return features.flatten(2).transpose(1, 2)
