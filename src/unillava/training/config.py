"""The training recipe as a typed config: what to start from, what trains, how fast, and where it goes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unillava.config import ModelConfig, check_override_keys, load_config
from unillava.conversation import TEMPLATE_NAMES
from unillava.data.llava_format import RESPONSE_FORMATS
from unillava.errors import ConfigError

TRAIN_LLM_MODES = ("none", "full", "lora", "qlora")
# transformers' schedules that need nothing beyond warmup and total steps
LR_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")


@dataclass
class DataConfig:
    """Training data. `template` overrides the model's chat template for this run only (stage 1: plain)."""

    train_files: list[str] = field(default_factory=list)
    image_root: str | None = None
    template: str | None = None
    response_format: str | None = None
    max_length: int | None = None
    group_by_modality_length: bool = True
    num_workers: int = 2


@dataclass
class LoraSettings:
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"


@dataclass
class TrainConfig:
    """One training stage. Set `model` to build a model (stage 1) or `init_from` to continue one (stage 2).

    `model_overrides` changes the model config of this stage: dotted keys, applied after `init_from`'s
    saved config is read (or to `model`), e.g. `{vision.extra.object_regularizer: 0.0}` for an OMG-LLaVA
    stage 2 that drops stage 1's regulariser. The exported model keeps the overridden config.

    `vision_lr_layer_decay: d` (ConvNeXt towers; null or 1 = off) scales the vision LR of each stage
    by d^(stages below the top): the last stage trains at `vision_lr`, the stem at the smallest LR.
    Length: `max_steps` if set, else `epochs` (may be fractional) over the kept samples.
    Batch semantics: `global_batch_size` = per_device_batch_size x processes x gradient_accumulation;
    give either of the last two fields (or both, consistently) so one recipe fits any number of GPUs.
    The loss is the mean over all supervised tokens of the global batch, however it is split.
    """

    model: ModelConfig | None = None
    init_from: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train_projector: bool = True
    train_llm: str = "none"
    train_vision: bool = False
    vision_unfreeze_from_stage: int | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)
    lr: float = 2e-5
    projector_lr: float | None = None
    vision_lr: float | None = None
    vision_lr_layer_decay: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    max_grad_norm: float | None = 1.0
    epochs: float = 1.0
    max_steps: int | None = None
    per_device_batch_size: int = 1
    gradient_accumulation: int | None = None
    global_batch_size: int | None = None
    bf16: bool = False
    gradient_checkpointing: bool = False
    # A frozen tower's features are computed once per image and reused (unillava.vision.feature_cache).
    cache_vision_features: bool = True
    seed: int = 42
    output_dir: str = "runs/unillava"
    save_every_steps: int | None = None
    keep_last: int | None = 2
    log_every: int = 1
    progress: bool = True
    resume: bool = False

    def validate(self) -> None:
        """Check field values that types alone cannot; errors name the field."""
        if (self.model is None) == (self.init_from is None):
            raise ConfigError(
                "model / init_from: set exactly one (a model to build, or a unillava model dir)"
            )
        if self.init_from is not None and not (Path(self.init_from) / "unillava_config.json").is_file():
            raise ConfigError(f"init_from: {self.init_from!r} is not a unillava model directory")
        check_override_keys(ModelConfig, self.model_overrides, "model_overrides")
        if self.train_llm not in TRAIN_LLM_MODES:
            raise ConfigError(
                f"train_llm: expected one of {', '.join(TRAIN_LLM_MODES)}, got {self.train_llm!r}"
            )
        if not (self.train_projector or self.train_vision or self.train_llm != "none"):
            raise ConfigError("train_projector / train_llm / train_vision: nothing would be trained")
        if not self.data.train_files:
            raise ConfigError("data.train_files: give at least one LLaVA-format file")
        for name in ("lr", "projector_lr", "vision_lr"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name}: must be positive, got {value}")
        decay = self.vision_lr_layer_decay
        if decay is not None and not 0 < decay <= 1:
            raise ConfigError(f"vision_lr_layer_decay: must be in (0, 1] (1 or null = off), got {decay}")
        positive = {
            "per_device_batch_size": self.per_device_batch_size,
            "gradient_accumulation": self.gradient_accumulation,
            "global_batch_size": self.global_batch_size,
            "max_steps": self.max_steps,
            "save_every_steps": self.save_every_steps,
            "keep_last": self.keep_last,
            "log_every": self.log_every,
            "lora.r": self.lora.r,
            "data.max_length": self.data.max_length,
        }
        for name, value in positive.items():
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be at least 1, got {value}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.epochs <= 0 and self.max_steps is None:
            raise ConfigError(f"epochs: must be positive (or set max_steps), got {self.epochs}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must not be negative, got {self.weight_decay}")
        if not 0 <= self.lora.dropout < 1:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.lora.dropout}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ConfigError(
                f"lr_scheduler: expected one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}"
            )
        if self.data.template is not None and self.data.template not in TEMPLATE_NAMES:
            raise ConfigError(
                f"data.template: expected one of {', '.join(TEMPLATE_NAMES)}, got {self.data.template!r}"
            )
        if self.data.response_format is not None and self.data.response_format not in RESPONSE_FORMATS:
            raise ConfigError(
                f"data.response_format: expected one of {', '.join(RESPONSE_FORMATS)}, "
                f"got {self.data.response_format!r}"
            )
        if self.data.num_workers < 0:
            raise ConfigError(f"data.num_workers: must not be negative, got {self.data.num_workers}")

    def gradient_accumulation_for(self, num_processes: int) -> int:
        """Accumulation steps that make the configured global batch on `num_processes` processes."""
        per_step = self.per_device_batch_size * num_processes
        if self.global_batch_size is None:
            return self.gradient_accumulation or 1
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"global_batch_size: {self.global_batch_size} is not a multiple of per_device_batch_size "
                f"{self.per_device_batch_size} x {num_processes} process(es)"
            )
        steps = self.global_batch_size // per_step
        if self.gradient_accumulation is not None and self.gradient_accumulation != steps:
            raise ConfigError(
                f"gradient_accumulation: {self.gradient_accumulation} disagrees with global_batch_size "
                f"{self.global_batch_size} = {self.per_device_batch_size} x {num_processes} process(es) x {steps}"
            )
        return steps


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a recipe with `key.sub=value` overrides and check it."""
    config = load_config(TrainConfig, path, overrides)
    config.validate()
    return config
