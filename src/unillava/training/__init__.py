"""Training: typed recipes (`TrainConfig`), the accelerate-based `Trainer`, and atomic checkpoints."""

from __future__ import annotations

from unillava.training.config import DataConfig, LoraSettings, TrainConfig, load_train_config
from unillava.training.trainer import Trainer, TrainResult, check_qlora_support, export_model, train

__all__ = [
    "DataConfig",
    "LoraSettings",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "check_qlora_support",
    "export_model",
    "load_train_config",
    "train",
]
