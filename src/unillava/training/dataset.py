"""Supervised training data: LLaVA-format files -> token ids, labels and pixel tensors, plus the batch sampler.

Every sample is encoded once up front (text only, images are not decoded) to apply the truncation policy
before training starts, so skipped samples never reach a batch and the counts are known for the log:

- a sample longer than `max_length` is cut on the right, but never inside or before an image's token run:
  a sample that would lose (part of) an image is skipped;
- a sample left without a supervised token is skipped (it would add nothing but a zero to the loss);
- if every sample of the data is skipped, that is an error naming files and lines, not a run at loss 0.

A model may train from more than ids, labels and images (OMG-LLaVA: [SEG] masks and visual prompts). It
says so with the `BatchFields` it returns from `batch_fields()`, and this module only calls its hooks:
the fields travel with each sample (`TrainItem.fields`) and reach the forward by name (`TrainBatch`). A
field's entries are tied to tokens, so a sample cut on the right keeps the first k entries for the k
tokens that survive; the report counts the rest per field (`dropped`). Records without such fields, and
models without any, train exactly as before.

The plan (kept samples, token lengths, modality, counts) can be cached in `cache_dir`, keyed by everything
it depends on, so other processes and resumed runs do not encode a 665K-sample mix again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from unillava.conversation import IGNORE_INDEX, Encoded
from unillava.data.images import load_image
from unillava.data.llava_format import ConversationFile, Sample, apply_response_format
from unillava.errors import DataError
from unillava.modeling import BatchFields, supervised_tokens
from unillava.processor import Batch, Processor

MAX_EXAMPLES = 5
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # `load_image` turns these upright, swapping width and height


class Status(IntEnum):
    KEPT = 0
    TRUNCATED = 1
    NO_SUPERVISION = 2
    IMAGE_CUT = 3


def truncate(encoded: Encoded, max_length: int, image_token_id: int) -> tuple[Encoded, Status]:
    """Apply the truncation policy to one encoded sample; the returned Encoded is only meaningful if kept.

    Supervised tokens are counted from position 1: the label at position 0 is never predicted.
    """
    ids, labels = encoded.input_ids, encoded.labels
    status = Status.KEPT
    if len(ids) > max_length:
        if image_token_id in ids[max_length:]:
            return encoded, Status.IMAGE_CUT
        ids, labels = ids[:max_length], labels[:max_length]
        status = Status.TRUNCATED
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return encoded, Status.NO_SUPERVISION
    return Encoded(ids, labels, encoded.num_image_slots), status


@dataclass
class DataReport:
    """What the truncation policy did, for the training log."""

    total: int = 0
    kept: int = 0
    truncated: int = 0
    skipped_no_supervision: int = 0
    skipped_image_cut: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # per batch field: entries cut with their tokens
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, status: Status, source: str) -> None:
        self.total += 1
        if status in (Status.KEPT, Status.TRUNCATED):
            self.kept += 1
        if status == Status.KEPT:
            return
        name = {
            Status.TRUNCATED: "truncated",
            Status.NO_SUPERVISION: "skipped_no_supervision",
            Status.IMAGE_CUT: "skipped_image_cut",
        }[status]
        setattr(self, name, getattr(self, name) + 1)
        examples = self.examples.setdefault(name, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(source)

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "kept": self.kept,
            "truncated": self.truncated,
            "skipped_no_supervision": self.skipped_no_supervision,
            "skipped_image_cut": self.skipped_image_cut,
            "dropped": dict(self.dropped),
            "examples": self.examples,
        }


@dataclass
class TrainItem:
    """One sample; `fields` holds the model's batch fields its record has (`BatchFields.build`)."""

    encoded: Encoded
    pixel_values: list[torch.Tensor]
    source: str
    fields: dict[str, Any] = field(default_factory=dict)


def _to_device(value: Any, device: torch.device | str) -> Any:
    """Tensors moved, lists and tuples walked; anything else (a prompt region) goes as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if type(value) is tuple:
        return tuple(_to_device(v, device) for v in value)
    return value


@dataclass
class TrainBatch(Batch):
    """A collated batch plus the model's batch fields, per row (None for a row whose record lacks one),
    passed to the forward by name."""

    fields: dict[str, list[Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, batch: Batch, extra: dict[str, list[Any]]) -> TrainBatch:
        return cls(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(Batch)}, fields=extra)

    def to(self, device: torch.device | str) -> TrainBatch:
        return TrainBatch.of(super().to(device), {k: _to_device(v, device) for k, v in self.fields.items()})

    def model_inputs(self) -> dict[str, Any]:
        return {**super().model_inputs(), **self.fields}


class SupervisedDataset(Dataset):
    """Kept samples of one or more LLaVA-format files, encoded and truncated; images loaded on access.

    `fields`: the model's extra per-record inputs (`model.batch_fields()`; none by default), see the
    module docstring for how truncation treats them.
    """

    def __init__(
        self,
        files: Sequence[str | Path | ConversationFile],
        processor: Processor,
        *,
        image_root: str | Path | None = None,
        response_format: str | None = None,
        max_length: int,
        progress: bool = False,
        cache_dir: str | Path | None = None,
        fields: BatchFields | None = None,
    ) -> None:
        if not files:
            raise DataError("no training files given")
        if max_length < 2:
            raise DataError(f"max_length must be at least 2, got {max_length}")
        self.files = [
            f if isinstance(f, ConversationFile) else ConversationFile(f, image_root) for f in files
        ]
        self.processor = processor
        self.response_format = response_format
        self.max_length = max_length
        self.fields = fields if fields is not None else BatchFields()
        self.fields.check(processor.tokenizer, processor.image_preprocessor)
        self.report = DataReport()
        self._index: list[tuple[int, int]] = []
        self.lengths: list[int] = []
        self.has_images: list[bool] = []
        self.cache_file = Path(cache_dir) / f"plan-{self._cache_key()[:20]}.json" if cache_dir else None
        if self.cache_file is not None and self.cache_file.is_file():
            self._load_plan(self.cache_file)
        else:
            self._scan(progress)
            if self.cache_file is not None:
                self._save_plan(self.cache_file)
        self._check_not_empty()

    def _cache_key(self) -> str:
        """Everything the plan depends on: files (by size and mtime), tokenizer, template, image token counts."""
        processor = self.processor
        tokenizer = processor.tokenizer
        vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
        preprocessor = processor.image_preprocessor
        parts = {
            "version": 2,
            "files": [
                [str(f.path.resolve()), f.path.stat().st_size, f.path.stat().st_mtime_ns, str(f.image_root)]
                for f in self.files
            ],
            "max_length": self.max_length,
            "response_format": self.response_format,
            "template": [type(processor.template).__name__, getattr(processor.template, "name", "")],
            "system_prompt": getattr(processor, "system_prompt", None),
            "chat_template": getattr(tokenizer, "chat_template", None),
            "special": [tokenizer.bos_token, tokenizer.eos_token],
            "vocab": vocab,
            "image_token_id": processor.image_token_id,
            "preprocessor": preprocessor.to_dict(),
            "tower": [type(processor.tower).__name__, processor.tower.hf_config_dict()],
            "fields": [type(self.fields).__module__, type(self.fields).__qualname__, list(self.fields.names)],
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def _save_plan(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "index": self._index,
            "lengths": self.lengths,
            "has_images": self.has_images,
            "report": self.report.as_dict(),
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    def _load_plan(self, path: Path) -> None:
        data = json.loads(path.read_text())
        self._index = [(int(f), int(i)) for f, i in data["index"]]
        self.lengths = list(data["lengths"])
        self.has_images = list(data["has_images"])
        self.report = DataReport(**data["report"])

    def _scan(self, progress: bool) -> None:
        total = sum(len(f) for f in self.files)
        bar = tqdm(total=total, desc="encoding data", unit="sample", disable=not progress)
        for file_index, file in enumerate(self.files):
            for i in range(len(file)):
                sample = file[i]
                encoded = self._encode(
                    sample, [self._image_size(file, sample, k) for k in range(sample.num_images)]
                )
                kept, status = truncate(encoded, self.max_length, self.processor.image_token_id)
                self.report.add(status, sample.source)
                if status in (Status.KEPT, Status.TRUNCATED):
                    for name, (entries, held) in self.fields.kept(sample, kept.input_ids).items():
                        self.report.dropped[name] = self.report.dropped.get(name, 0) + entries - held
                    self._index.append((file_index, i))
                    self.lengths.append(len(kept.input_ids))
                    self.has_images.append(sample.num_images > 0)
                bar.update(1)
        bar.close()

    def _check_not_empty(self) -> None:
        if not self._index:
            names = ", ".join(f.name for f in self.files)
            reasons = "; ".join(
                f"{count} {what} (e.g. {', '.join(self.report.examples.get(key, []))})"
                for key, what, count in (
                    (
                        "skipped_no_supervision",
                        "with no supervised token within max_length",
                        self.report.skipped_no_supervision,
                    ),
                    ("skipped_image_cut", "that would lose an image", self.report.skipped_image_cut),
                )
                if count
            )
            raise DataError(
                f"{names}: all {self.report.total} samples were skipped with max_length={self.max_length}: "
                f"{reasons or 'the files are empty'}"
            )

    def _image_size(self, file: ConversationFile, sample: Sample, k: int) -> tuple[int, int]:
        """The (H, W) image k becomes; only variable-size preprocessing needs to read the file's header."""
        preprocessor = self.processor.image_preprocessor
        if preprocessor.mode != "any":
            return preprocessor.output_size(1, 1)
        path = file.image_path(sample, k)
        try:
            with Image.open(path) as image:
                width, height = image.size
                if image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED_ORIENTATIONS:
                    width, height = height, width
        except (OSError, ValueError, SyntaxError) as err:
            raise DataError(f"{sample.source}: image {path}: cannot read its size ({err})") from err
        return preprocessor.output_size(width, height)

    def _encode(self, sample: Sample, sizes: list[tuple[int, int]]) -> Encoded:
        sample = apply_response_format(sample, self.response_format)
        shapes = [torch.empty(()).expand(3, h, w) for h, w in sizes]
        try:
            return self.processor.encode(sample.messages, shapes)
        except ValueError as err:
            raise DataError(f"{sample.source}: {err}") from err

    def __len__(self) -> int:
        return len(self._index)

    def source(self, index: int) -> str:
        file_index, i = self._index[index]
        return self.files[file_index].source(i)

    def __getitem__(self, index: int) -> TrainItem:
        file_index, i = self._index[index]
        file = self.files[file_index]
        sample = file[i]
        pictures = [
            load_image(file.image_path(sample, k), name=f"{sample.source}: image {k}")
            for k in range(sample.num_images)
        ]
        pixels = [self.processor.image_preprocessor(picture) for picture in pictures]
        encoded, status = truncate(
            self._encode(sample, [tuple(p.shape[-2:]) for p in pixels]),
            self.max_length,
            self.processor.image_token_id,
        )
        if status not in (Status.KEPT, Status.TRUNCATED):
            raise DataError(
                f"{sample.source}: changed since the data was planned (now {status.name.lower()})"
            )
        kept = {name: held for name, (_, held) in self.fields.kept(sample, encoded.input_ids).items()}
        try:
            extra = self.fields.build(sample, kept, [(p.width, p.height) for p in pictures]) if kept else {}
        except DataError as err:
            raise DataError(f"{sample.source}: {err}") from None
        return TrainItem(encoded, pixels, sample.source, extra)

    def collate(self, items: list[TrainItem]) -> TrainBatch:
        """Right-padded batch; a batch without any supervised token is an error, never a silent zero loss.
        A batch field is set (per row, None for a row whose record lacks it) only when some item has it,
        so batches of other data and models are unchanged."""
        batch = self.processor.collate(
            [it.encoded for it in items], [it.pixel_values for it in items], "right"
        )
        assert batch.labels is not None
        if supervised_tokens(batch.labels) == 0:
            raise DataError(f"batch without supervised tokens: {', '.join(it.source for it in items)}")
        names = dict.fromkeys(name for it in items for name in it.fields)
        return TrainBatch.of(batch, {name: [it.fields.get(name) for it in items] for name in names})


class ModalityLengthGroupedSampler(Sampler[list[int]]):
    """Yields this process's micro-batches of dataset indices, one optimizer step's worth at a time.

    Per epoch a global order is drawn from (seed, epoch) alone, so every process computes the same order
    without communication and a run can resume at any step. The order is cut into global batches of
    `micro_batch_size * num_processes * grad_accum` samples; with grouping (LLaVA's
    `group_by_modality_length`) each global batch holds only image or only text-only samples, sorted by
    length so that the micro-batches cut from it pad little. The leftovers of both modalities make the
    last, mixed batches; the final batch is filled up with samples from the start of the epoch so every
    step sees a full global batch (as DistributedSampler pads). A global batch is cut into
    `num_processes * grad_accum` micro-batches and chunk `c` goes to process `c % num_processes`: the
    shards are disjoint and together are exactly the global batch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        has_images: Sequence[bool],
        *,
        micro_batch_size: int,
        num_processes: int = 1,
        process_index: int = 0,
        grad_accum: int = 1,
        seed: int = 0,
        group_by_modality_length: bool = True,
    ) -> None:
        if len(lengths) != len(has_images):
            raise ValueError("lengths and has_images differ in length")
        if not lengths:
            raise ValueError("no samples to sample from")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} outside 0..{num_processes - 1}")
        self.lengths = list(lengths)
        self.has_images = list(has_images)
        self.micro_batch_size = micro_batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.grad_accum = grad_accum
        self.seed = seed
        self.group = group_by_modality_length
        self.epoch = 0
        self.start_step = 0

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_processes * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.lengths) / self.global_batch_size)

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        """Iterate epoch `epoch` from global sample position `start_sample` (a multiple of the global batch)."""
        if start_sample % self.global_batch_size:
            raise ValueError(
                f"start_sample {start_sample} is not a multiple of the global batch size {self.global_batch_size}"
            )
        self.epoch = epoch
        self.start_step = start_sample // self.global_batch_size

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All global batches of an epoch, identical on every process."""
        size = self.global_batch_size
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

        def shuffled(indices: list[int]) -> list[int]:
            return [indices[int(j)] for j in torch.randperm(len(indices), generator=generator)]

        def by_length(indices: list[int]) -> list[int]:
            return sorted(indices, key=lambda i: -self.lengths[i]) if self.group else indices

        if self.group:
            groups = [
                shuffled([i for i, flag in enumerate(self.has_images) if flag == modality])
                for modality in (True, False)
            ]
        else:
            groups = [shuffled(list(range(len(self.lengths))))]
        full: list[list[int]] = []
        leftover: list[int] = []
        for order in groups:
            cut = len(order) - len(order) % size
            full += [by_length(order[k : k + size]) for k in range(0, cut, size)]
            leftover += order[cut:]
        if self.group and full:
            full = [full[int(j)] for j in torch.randperm(len(full), generator=generator)]
        if leftover:
            pool = [i for batch in full for i in batch] or leftover
            padding = (-len(leftover)) % size
            leftover += [pool[k % len(pool)] for k in range(padding)]
            full += [by_length(leftover[k : k + size]) for k in range(0, len(leftover), size)]
        return full

    def __iter__(self) -> Iterator[list[int]]:
        micro = self.micro_batch_size
        for batch in self.global_batches(self.epoch)[self.start_step :]:
            for m in range(self.grad_accum):
                chunk = m * self.num_processes + self.process_index
                yield batch[chunk * micro : (chunk + 1) * micro]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.grad_accum
