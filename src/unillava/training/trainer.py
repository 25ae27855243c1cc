"""The training loop: accelerate for processes and precision, peft for LoRA, transformers for schedules.

One optimizer step consumes one global batch. The model's forward returns its loss as named parts
(`loss_parts`: a sum, the count it is a mean over, a weight; the core model has only `text_ce`, summed
over supervised tokens), and `loss_counts` gives each part's count before the forward. The trainer sums
the counts over every micro-batch of every process first, so each micro-batch's backward already uses
the global denominators: the step's loss is sum_p weight_p * (sum of part p) / (count of part p) over the
global batch, and 1 process x 2 accumulation steps, 2 processes x 1, and 1 x 1 with a doubled batch all
compute the same loss and gradients. Every part is logged as its global mean under its own name. The
extra batch fields a model trains from come from its `batch_fields()` (see `unillava.training.dataset`),
so no model design is named here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel, get_scheduler

from unillava.config import override_dataclass, to_dict
from unillava.errors import CheckpointError, ConfigError, DataError
from unillava.modeling import ADAPTER_DIR, LlavaModel, LossPart
from unillava.processor import Processor
from unillava.training import checkpoint as ckpt
from unillava.training.config import TrainConfig
from unillava.training.dataset import (
    DataReport,
    ModalityLengthGroupedSampler,
    SupervisedDataset,
    TrainBatch,
    supervised_tokens,
)

LOG_NAME = "train_log.jsonl"
CONFIG_NAME = "train_config.yaml"
MODEL_DIR = "model"

NON_LORA_NAME = "non_lora_trainables.safetensors"
CHECKPOINT_FORMAT = 1


@dataclass
class TrainResult:
    step: int
    losses: dict[int, float] = field(default_factory=dict)
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    model_dir: Path | None = None
    data_report: DataReport | None = None


def check_qlora_support() -> None:
    """QLoRA needs bitsandbytes 4-bit kernels on this machine's device; say so before any model loads."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "train_llm: qlora needs bitsandbytes for 4-bit weights and it is not installed "
            "(pip install bitsandbytes; a CUDA GPU is needed) - or use train_llm: lora"
        )
    if torch.cuda.is_available():
        return
    try:
        # optional, CUDA-oriented and slow to import: only a QLoRA recipe on a machine without CUDA gets here
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(torch.randn(64, 64), quant_type="nf4")
    except Exception as err:  # any failure here means: no usable CPU backend
        raise ConfigError(
            f"train_llm: qlora needs bitsandbytes 4-bit kernels, which have no CPU support in this install "
            f"({type(err).__name__}: {err}); use a CUDA GPU or train_llm: lora"
        ) from None


def _use_cpu() -> bool:
    """Train on CPU (gloo for several processes) when there is no CUDA device."""
    return not torch.cuda.is_available()


def _param_part(name: str) -> str:
    if name.startswith("projector."):
        return "projector"
    if name.startswith("vision_tower."):
        return "vision"
    return "llm"


def _vision_lr_depth(model: LlavaModel, layer_decay: float) -> Callable[[str], int] | None:
    """The tower's stage depth per parameter name when layer-wise LR decay is on, else None."""
    if layer_decay == 1.0:
        return None
    depth = getattr(model.vision_tower, "lr_depth", None)
    if depth is None:
        raise ConfigError(
            f"vision_lr_layer_decay: the {model.config.vision.type!r} tower has no stages to decay over "
            "(supported: convnext)"
        )
    return depth


def param_groups(model: LlavaModel, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups per part (llm, projector, vision) with their own LR; no weight decay on biases/norms.

    With `vision_lr_layer_decay` the vision part splits further into one group per stage,
    `vision.depth{k}`, at vision_lr * decay^k (k = stages below the top).
    """
    lrs = {
        "llm": config.lr,
        "projector": config.projector_lr or config.lr,
        "vision": config.vision_lr or config.lr,
    }
    layer_decay = config.vision_lr_layer_decay or 1.0
    vision_depth = _vision_lr_depth(model, layer_decay)
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = _param_part(name)
        lr = lrs[part]
        if part == "vision" and vision_depth is not None:
            k = vision_depth(name.removeprefix("vision_tower."))
            lr *= layer_decay**k
            part = f"vision.depth{k}"
        decay = config.weight_decay > 0 and param.ndim >= 2
        key = part if decay or config.weight_decay == 0 else f"{part}.no_decay"
        group = groups.setdefault(
            key,
            {
                "name": key,
                "params": [],
                "lr": lr,
                "weight_decay": config.weight_decay if decay else 0.0,
            },
        )
        group["params"].append(param)
    return list(groups.values())


def _enable_gradient_checkpointing(module: torch.nn.Module) -> None:
    for sub in module.modules():
        if isinstance(sub, PreTrainedModel) and sub.supports_gradient_checkpointing:
            sub.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class Trainer:
    """One training stage from a TrainConfig: build, (resume), train, checkpoint, export."""

    def __init__(self, config: TrainConfig) -> None:
        config.validate()
        if config.train_llm == "qlora":
            check_qlora_support()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.config = config
        cpu = _use_cpu()
        state = PartialState(cpu=cpu)
        self.grad_accum = config.gradient_accumulation_for(state.num_processes)
        # accelerate keeps precision and accumulation in process-wide singletons; a second stage in the same
        # process (the demo, benchmarks, notebooks) may differ, so start them afresh. The process group
        # (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        self.accelerator = Accelerator(
            cpu=cpu,
            mixed_precision="bf16" if config.bf16 else "no",
            gradient_accumulation_steps=self.grad_accum,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        acc = self.accelerator
        self.is_main = acc.is_main_process
        self.output_dir = Path(config.output_dir)
        self.checkpoints = ckpt.CheckpointDir(self.output_dir / "checkpoints")
        self.resume_from = self._find_resume_checkpoint()

        set_seed(config.seed)
        self.model = self._build_model(quantize=config.train_llm == "qlora")
        self.processor = Processor.for_model(self.model, template=config.data.template)
        with acc.main_process_first():
            self.dataset = self._dataset()
        self.sampler = ModalityLengthGroupedSampler(
            self.dataset.lengths,
            self.dataset.has_images,
            micro_batch_size=config.per_device_batch_size,
            num_processes=acc.num_processes,
            process_index=acc.process_index,
            grad_accum=self.grad_accum,
            seed=config.seed,
            group_by_modality_length=config.data.group_by_modality_length,
        )
        self.global_batch_size = self.sampler.global_batch_size
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = config.max_steps or math.ceil(config.epochs * self.steps_per_epoch)
        optimizer = torch.optim.AdamW(param_groups(self.model, config))
        self.scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer,
            num_warmup_steps=math.ceil(config.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        if acc.distributed_type == DistributedType.DEEPSPEED:
            # no dataloader goes through prepare (the sampler shards itself), so tell DeepSpeed the batch
            acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = (
                config.per_device_batch_size
            )
        self.prepared, self.optimizer = acc.prepare(self.model, optimizer)
        self.step = 0
        self.epoch = 0
        self.samples_in_epoch = 0
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)

    # -- model ---------------------------------------------------------------------------------------

    def _build_model(self, quantize: bool) -> LlavaModel:
        """The base model with exactly the configured parts trainable (LoRA wrapped around the LLM).

        With bf16 the weights load in bf16 (half the memory of a 7B model) and only the trainable ones are
        turned back into float32, so the optimizer updates full-precision weights.
        """
        config = self.config
        dtype = torch.bfloat16 if config.bf16 else torch.float32
        try:
            if config.init_from is not None:
                model = LlavaModel.from_pretrained(
                    config.init_from, dtype=dtype, overrides=config.model_overrides
                )
            else:
                assert config.model is not None
                model_config = config.model
                if config.model_overrides:
                    model_config = override_dataclass(model_config, config.model_overrides, "model_overrides")
                model = LlavaModel.from_config(model_config, dtype=dtype)
        except ConfigError as err:
            # a model that only fails to build with the overrides fails because of them (the tower's own
            # checks, e.g. of vision.extra keys, do not know the recipe's field)
            if config.model_overrides and not str(err).startswith("model_overrides"):
                raise ConfigError(f"model_overrides: {err}") from None
            raise
        model.requires_grad_(False)
        model.projector.requires_grad_(config.train_projector)
        if config.vision_unfreeze_from_stage is not None:
            if not hasattr(model.vision_tower, "set_unfreeze_from_stage"):
                raise ConfigError(
                    f"vision_unfreeze_from_stage: the {model.config.vision.type!r} tower has no stages to choose"
                )
            model.vision_tower.set_unfreeze_from_stage(config.vision_unfreeze_from_stage)
        model.vision_tower.requires_grad_(config.train_vision)
        model.language_model.config.use_cache = False
        if config.gradient_checkpointing:
            _enable_gradient_checkpointing(model.language_model)
            if config.train_vision:
                _enable_gradient_checkpointing(model.vision_tower)
        if config.train_llm == "full":
            model.language_model.requires_grad_(True)
        elif config.train_llm in ("lora", "qlora"):
            if quantize:
                model.language_model = self._quantized_llm(model)
            lora = config.lora
            model.language_model = get_peft_model(
                model.language_model,
                LoraConfig(
                    r=lora.r,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=lora.target_modules,
                    task_type="CAUSAL_LM",
                ),
            )
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
            elif (
                not (param.requires_grad or quantize)
                and param.dtype == torch.float32
                and dtype != torch.float32
            ):
                param.data = param.data.to(dtype)
        if config.cache_vision_features and model.supports_feature_cache and not config.train_vision:
            model.cache_tower_features()
        return model

    def _quantized_llm(self, model: LlavaModel) -> torch.nn.Module:
        """Reload the LLM in 4-bit NF4 through transformers' bitsandbytes integration (QLoRA)."""
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if self.config.bf16 else torch.float32,
        )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.output_dir, prefix=".tmp-llm-") as tmp:
            model.language_model.save_pretrained(tmp)
            llm = AutoModelForCausalLM.from_pretrained(
                tmp, quantization_config=quantization, device_map={"": self.accelerator.device}
            )
        llm.config.use_cache = False
        return prepare_model_for_kbit_training(
            llm,
            use_gradient_checkpointing=self.config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )

    def _dataset(self) -> SupervisedDataset:
        """The training data; the main process plans it first and caches the plan for the others."""
        data = self.config.data
        return SupervisedDataset(
            data.train_files,
            self.processor,
            image_root=data.image_root,
            response_format=data.response_format,
            max_length=data.max_length or self.model.config.max_length,
            progress=self.config.progress and self.is_main,
            cache_dir=self.output_dir / "data_cache",
            fields=self.model.batch_fields(),
        )

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    # -- checkpoints ---------------------------------------------------------------------------------

    @property
    def _sharded(self) -> bool:
        return self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)

    def _find_resume_checkpoint(self) -> Path | None:
        latest = self.checkpoints.latest()
        if self.config.resume:
            if latest is None:
                raise CheckpointError(f"resume: no complete checkpoint in {self.checkpoints.root}")
            return latest
        if latest is not None:
            raise ConfigError(
                f"output_dir: {self.output_dir} already holds checkpoints; resume with --resume "
                "(or resume=true), or choose another output_dir"
            )
        return None

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "epoch": self.epoch,
            "samples_in_epoch": self.samples_in_epoch,
            "samples_seen": self.step * self.global_batch_size,
            "global_batch_size": self.global_batch_size,
            "num_processes": self.accelerator.num_processes,
            "train_llm": self.config.train_llm,
            "train_projector": self.config.train_projector,
            "train_vision": self.config.train_vision,
            "seed": self.config.seed,
        }

    def save_checkpoint(self) -> None:
        """Write a checkpoint of the current step atomically (see `unillava.training.checkpoint`)."""
        acc = self.accelerator
        staging = self.checkpoints.staging(self.step)
        if self.is_main:
            self.checkpoints.begin(self.step)
        acc.wait_for_everyone()
        if self._sharded:
            acc.save_state(str(staging / "accelerate"))
        elif self.is_main:
            ckpt.write_tensors(staging / "trainable.safetensors", self.trainable_state())
            tensors, rest = ckpt.split_state_dict(self.optimizer.state_dict())
            ckpt.write_tensors(staging / "optimizer.safetensors", tensors)
            ckpt.write_json(staging / "optimizer.json", rest)
        if self.is_main:
            ckpt.write_json(staging / "scheduler.json", self.scheduler.state_dict())
        ckpt.save_rng(staging, acc.process_index)
        acc.wait_for_everyone()
        if self.is_main:
            ckpt.write_json(staging / ckpt.STATE_NAME, self._trainer_state())
            self.checkpoints.publish(self.step)
            self.checkpoints.prune(self.config.keep_last)
        acc.wait_for_everyone()

    def _load_checkpoint(self, path: Path) -> None:
        state = ckpt.read_trainer_state(path)
        for key, now in (
            ("global_batch_size", self.global_batch_size),
            ("train_llm", self.config.train_llm),
            ("train_projector", self.config.train_projector),
            ("train_vision", self.config.train_vision),
        ):
            if state.get(key) != now:
                raise ConfigError(
                    f"{key}: the checkpoint {path} was trained with {state.get(key)!r}, now {now!r}"
                )
        if self._sharded:
            self.accelerator.load_state(str(path / "accelerate"))
        else:
            weights = load_file(str(path / "trainable.safetensors"))
            own = self.trainable_state()
            if set(weights) != set(own):
                missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
                raise CheckpointError(
                    f"{path}: trainable weights differ: missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
            with torch.no_grad():
                for name, param in own.items():
                    param.copy_(weights[name])
            rest = json.loads((path / "optimizer.json").read_text())
            self.optimizer.load_state_dict(
                ckpt.join_state_dict(load_file(str(path / "optimizer.safetensors")), rest)
            )
        self.scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
        if not ckpt.load_rng(path, self.accelerator.process_index):
            self.accelerator.print(
                f"warning: {path} has no RNG state for process {self.accelerator.process_index}"
            )
        self.step = state["step"]
        self.epoch = state["epoch"]
        self.samples_in_epoch = state["samples_in_epoch"]

    # -- logging -------------------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with (self.output_dir / LOG_NAME).open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _lrs(self) -> dict[str, float]:
        return {group["name"]: group["lr"] for group in self.optimizer.param_groups}

    # -- training ------------------------------------------------------------------------------------

    def _loader(self) -> DataLoader:
        self.sampler.set_epoch(self.epoch, self.samples_in_epoch)
        return DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=self.dataset.collate,
            num_workers=self.config.data.num_workers,
            generator=torch.Generator().manual_seed(self.config.seed + self.epoch),
        )

    def _loss_counts(self, micro_batches: list[TrainBatch]) -> list[dict[str, int]]:
        """Each micro-batch's loss-part counts (`LlavaModel.loss_counts`), known before any forward."""
        counts = [self.model.loss_counts(batch.model_inputs()) for batch in micro_batches]
        if any(list(c) != list(counts[0]) for c in counts):
            raise RuntimeError(f"{type(self.model).__name__}.loss_counts: the parts differ between batches")
        return counts

    def _loss_parts(self, out: Any, counts: dict[str, int]) -> dict[str, LossPart]:
        """The forward's named loss parts, each with a count `loss_counts` announced and agrees with."""
        parts = getattr(out, "loss_parts", None)
        if parts is None:
            raise RuntimeError(f'{type(self.model).__name__}: the forward gave no loss_parts under "sum"')
        for name, part in parts.items():
            if name not in counts or int(part.count) != counts[name]:
                raise RuntimeError(
                    f"{type(self.model).__name__}: loss part {name!r} counts {int(part.count)}, "
                    f"but loss_counts said {counts.get(name)}"
                )
        return parts

    def _train_step(
        self, micro_batches: list[TrainBatch]
    ) -> tuple[float, int, float | None, dict[str, float], dict[str, float]]:
        """One optimizer step over this process's micro-batches.

        Returns the global loss, the global supervised-token count, the gradient norm, the learning
        rates this step used (the scheduler has moved on by the time the step is logged) and each loss
        part's global mean (only those the model computed somewhere in the global batch).
        """
        acc = self.accelerator
        lrs = self._lrs()
        counts = self._loss_counts(micro_batches)
        names = list(counts[0])
        local = [sum(supervised_tokens(b.labels) for b in micro_batches)]
        local += [sum(c[name] for c in counts) for name in names]
        tokens, *totals = acc.reduce(
            torch.tensor(local, dtype=torch.float32, device=acc.device), "sum"
        ).tolist()
        if tokens == 0:
            raise DataError(f"step {self.step + 1}: the global batch has no supervised token")
        global_counts = dict(zip(names, totals, strict=True))
        # DDP averages gradients over processes and accelerate divides each backward by the accumulation
        # steps; this factor undoes both, so the gradients are those of the global batch's loss.
        factor = acc.num_processes * self.grad_accum
        # per part over this process's micro-batches: its sum, whether the forward returned it, its weight
        sums, seen, weights = torch.zeros(3, len(names), device=acc.device)
        grad_norm = None
        for batch, batch_counts in zip(micro_batches, counts, strict=True):
            batch = batch.to(acc.device)
            with acc.accumulate(self.prepared):
                out = self.prepared(**batch.model_inputs(), loss_reduction="sum", use_cache=False)
                parts = self._loss_parts(out, batch_counts)
                terms = [
                    part.weight * part.total * (factor / global_counts[name])
                    for name, part in parts.items()
                    if global_counts[name]
                ]
                if not terms:
                    raise RuntimeError(f"{type(self.model).__name__}: no loss part with a count in this step")
                acc.backward(sum(terms[1:], terms[0]))
                for name, part in parts.items():
                    k = names.index(name)
                    sums[k] += part.total.detach().float()
                    seen[k], weights[k] = 1.0, part.weight
                if acc.sync_gradients:
                    if self.config.max_grad_norm is not None:
                        norm = acc.clip_grad_norm_(self.prepared.parameters(), self.config.max_grad_norm)
                        grad_norm = None if norm is None else float(norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
        # flags and weights go with the sums (one collective), so every process logs the same parts
        part_sums, flags, weight_sums = acc.reduce(torch.stack([sums, seen, weights]), "sum").tolist()
        metrics: dict[str, float] = {}
        loss = 0.0
        for k, name in enumerate(names):
            if flags[k] and global_counts[name]:
                metrics[name] = part_sums[k] / global_counts[name]
                loss += weight_sums[k] / flags[k] * metrics[name]
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {self.step + 1}: loss is {loss}")
        return loss, int(tokens), grad_norm, lrs, metrics

    def train(self) -> TrainResult:
        config, acc = self.config, self.accelerator
        result = TrainResult(step=self.step, data_report=self.dataset.report)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.checkpoints.prune(None)
            (self.output_dir / CONFIG_NAME).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        report = self.dataset.report.as_dict()
        self._log(
            {
                "event": "resume" if self.resume_from else "start",
                "from": None if self.resume_from is None else str(self.resume_from),
                "step": self.step,
                "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch,
                "global_batch_size": self.global_batch_size,
                "per_device_batch_size": config.per_device_batch_size,
                "gradient_accumulation": self.grad_accum,
                "num_processes": acc.num_processes,
                "trainable_parameters": sum(p.numel() for p in self.trainable_state().values()),
                "data": report,
            }
        )
        acc.print(
            f"data: {report['kept']}/{report['total']} samples kept, {report['truncated']} truncated, "
            f"{report['skipped_no_supervision']} skipped without supervised tokens, "
            f"{report['skipped_image_cut']} skipped that would lose an image"
        )
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (config.progress and self.is_main),
        )
        self.prepared.train()
        window: list[float] = []
        window_metrics: dict[str, list[float]] = {}
        window_start = time.perf_counter()
        epoch_samples = self.steps_per_epoch * self.global_batch_size
        while self.step < self.total_steps:
            iterator = iter(self._loader())
            epoch = self.epoch
            while self.step < self.total_steps and self.epoch == epoch:
                micro_batches = [next(iterator) for _ in range(self.grad_accum)]
                loss, tokens, grad_norm, lrs, metrics = self._train_step(micro_batches)
                self.step += 1
                self.samples_in_epoch += self.global_batch_size
                epoch_position = self.epoch + self.samples_in_epoch / epoch_samples
                if self.samples_in_epoch >= epoch_samples:
                    self.epoch, self.samples_in_epoch = self.epoch + 1, 0
                result.losses[self.step] = loss
                result.metrics[self.step] = metrics
                window.append(loss)
                for key, value in metrics.items():
                    window_metrics.setdefault(key, []).append(value)
                if self.step % config.log_every == 0 or self.step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    rate = len(window) * self.global_batch_size / max(elapsed, 1e-9)
                    self._log(
                        {
                            "step": self.step,
                            "epoch": epoch_position,
                            "samples": self.step * self.global_batch_size,
                            "loss": sum(window) / len(window),
                            **{k: sum(v) / len(v) for k, v in window_metrics.items()},
                            "lr": lrs,
                            "grad_norm": grad_norm,
                            "supervised_tokens": tokens,
                            "samples_per_s": rate,
                        }
                    )
                    bar.set_postfix(
                        loss=f"{loss:.4f}", lr=f"{max(lrs.values()):.2e}", samples_s=f"{rate:.1f}"
                    )
                    window, window_metrics, window_start = [], {}, time.perf_counter()
                bar.update(1)
                if config.save_every_steps and self.step % config.save_every_steps == 0:
                    self.save_checkpoint()
        bar.close()
        result.step = self.step
        result.model_dir = self.save_model()
        self._log({"event": "end", "step": self.step, "model_dir": str(result.model_dir)})
        return result

    # -- export --------------------------------------------------------------------------------------

    def _model_for_export(self) -> LlavaModel | None:
        """The trained model as a plain (unsharded, unquantized) LlavaModel on the main process."""
        acc = self.accelerator
        if not (self._sharded or self.config.train_llm == "qlora"):
            return self.model if self.is_main else None
        state = acc.get_state_dict(self.prepared) if self._sharded else self.trainable_state()
        if not self.is_main:
            return None
        fresh = self._build_model(quantize=False)
        own = dict(fresh.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                if name in own:
                    own[name].copy_(tensor.to(own[name].device, own[name].dtype))
        return fresh

    def save_model(self) -> Path:
        """Write `output_dir/model`: merged weights in the unillava layout, plus `adapter/` for LoRA runs."""
        acc = self.accelerator
        acc.wait_for_everyone()
        model = self._model_for_export()
        target = self.output_dir / MODEL_DIR
        if model is not None:
            staging = Path(tempfile.mkdtemp(dir=self.output_dir, prefix=f"{ckpt.TMP_PREFIX}{MODEL_DIR}-"))
            try:
                export_model(model, staging, self.config.train_llm in ("lora", "qlora"))
                if target.exists():
                    old = self.output_dir / f"{ckpt.TMP_PREFIX}old-{MODEL_DIR}"
                    os.replace(target, old)
                    shutil.rmtree(old)
                os.replace(staging, target)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
        acc.wait_for_everyone()
        return target


def export_model(model: LlavaModel, path: Path, lora: bool) -> None:
    """Save `model` to `path`; with LoRA, the adapter and the other trained weights go to `path/adapter`
    first, then the adapter is merged into the LLM in place (the run is over) and the merged model saved."""
    if lora:
        adapter_dir = path / ADAPTER_DIR
        model.language_model.save_pretrained(adapter_dir)
        others = {
            name: p
            for name, p in model.named_parameters()
            if p.requires_grad and not name.startswith("language_model.")
        }
        if others:
            ckpt.write_tensors(adapter_dir / NON_LORA_NAME, others)
        model.language_model = model.language_model.merge_and_unload()
    model.save_pretrained(path)


def train(config: TrainConfig) -> TrainResult:
    """Run one training stage end to end."""
    return Trainer(config).train()
