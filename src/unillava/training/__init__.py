"""Training: typed recipes (`TrainConfig`), the training data (`SupervisedDataset` and its sampler), the
accelerate-based `Trainer`, and atomic checkpoints."""

from __future__ import annotations

from unillava.training.config import DataConfig, LoraSettings, TrainConfig, load_train_config
from unillava.training.dataset import ModalityLengthGroupedSampler, SupervisedDataset, TrainBatch
from unillava.training.trainer import Trainer, TrainResult, check_qlora_support, export_model, train

__all__ = [
    "DataConfig",
    "LoraSettings",
    "ModalityLengthGroupedSampler",
    "SupervisedDataset",
    "TrainConfig",
    "TrainBatch",
    "TrainResult",
    "Trainer",
    "check_qlora_support",
    "export_model",
    "load_train_config",
    "train",
]
