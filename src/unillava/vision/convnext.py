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

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import ConvNextModel
from transformers.models.convnext.modeling_convnext import ConvNextLayer, ConvNextStage

from unillava.config import VisionConfig
from unillava.errors import CheckpointError, ConfigError
from unillava.hub.convllava import load_convnext_model, normalize_convnext_config
from unillava.vision import VisionTower, register_tower

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
