"""Check a LLaVA-format dataset and every image it names before training, reporting all problems at once.

A training run that dies on line 431,207 because of one truncated JPEG wastes hours; fixing problems one
crash at a time wastes days. `validate_dataset` reads every record (a malformed JSON line is recorded and
skipped), validates it with the same rules training uses (`parse_record`), fully decodes every referenced
image with the same loader (`load_image`), and returns every problem with its FILE:LINE.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from unillava.data.images import DEFAULT_MAX_PIXELS, load_image
from unillava.data.llava_format import ConversationFile, RecordError, parse_record
from unillava.errors import DataError


class Problem(NamedTuple):
    """One finding: where ("train.jsonl:17", "data.json:item 3", or just the file) and what."""

    source: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


@dataclass
class ValidationReport:
    """Everything found in one or more files, plus counts for the summary line.

    `samples` counts every record read, good or bad; `images` counts image references in valid records
    (`unique_images` the distinct files among them); `text_only` counts valid records without images.
    `warnings` (duplicate ids) are worth a look but do not make the data invalid.
    """

    files: list[str] = field(default_factory=list)
    samples: int = 0
    bad_samples: int = 0
    text_only: int = 0
    images: int = 0
    unique_images: int = 0
    images_checked: bool = True
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def merge(self, other: ValidationReport) -> ValidationReport:
        """Combine reports of several files (the CLI validates one file at a time)."""
        return ValidationReport(
            files=self.files + other.files,
            samples=self.samples + other.samples,
            bad_samples=self.bad_samples + other.bad_samples,
            text_only=self.text_only + other.text_only,
            images=self.images + other.images,
            unique_images=self.unique_images + other.unique_images,
            images_checked=self.images_checked and other.images_checked,
            problems=self.problems + other.problems,
            warnings=self.warnings + other.warnings,
        )

    def summary(self) -> str:
        """One line: what was checked and how many problems were found."""
        files = f"{len(self.files)} file" + ("" if len(self.files) == 1 else "s")
        images = f"{self.images} image reference(s)"
        images += f" ({self.unique_images} files checked)" if self.images_checked else " (not opened)"
        checked = f"{files}, {self.samples} samples ({self.text_only} text-only), {images}"
        found = (
            "no problems"
            if self.ok
            else f"{len(self.problems)} problem(s) in {self.bad_samples} sample(s)"
            if self.bad_samples
            else f"{len(self.problems)} problem(s)"
        )
        if self.warnings:
            found += f", {len(self.warnings)} warning(s)"
        return f"{checked}: {found}"


def validate_dataset(
    path: str | Path,
    image_root: str | Path | None = None,
    *,
    check_images: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    progress: bool = True,
) -> ValidationReport:
    """Validate one data file and (unless `check_images` is False) fully decode every image it names.

    Never stops at the first problem: malformed lines, invalid records and bad images (missing, empty,
    unreadable, truncated, over `max_pixels`) are all collected in file order. Each distinct image file is
    decoded once, by `workers` threads (PIL releases the GIL while decoding; default: `default_workers()`). Relative image paths resolve
    against `image_root`, or the data file's folder. A missing data file raises `DataError`; a data file
    that cannot be read as a whole (a broken JSON list) becomes a single problem.
    """
    name = str(path)
    if not Path(path).exists():
        raise DataError(f"{name}: dataset file not found")
    report = ValidationReport(files=[name], images_checked=check_images)
    try:
        data = ConversationFile(path, image_root)
    except RecordError as err:
        report.problems.append(Problem(err.source, err.detail))
        return report

    found: list[list[Problem]] = []
    image_refs: list[tuple[int, str, Path]] = []
    first_seen: dict[str, str] = {}
    disable = None if progress else True
    for index, (source, record) in enumerate(
        tqdm(data.iter_raw(), total=len(data), desc=f"records {Path(name).name}", unit="rec", disable=disable)
    ):
        found.append([])
        if isinstance(record, RecordError):
            found[index].append(Problem(record.source, record.detail))
            continue
        try:
            sample = parse_record(record, source=source)
        except RecordError as err:
            found[index].append(Problem(err.source, err.detail))
            continue
        if sample.id in first_seen:
            report.warnings.append(
                Problem(source, f"duplicate id {sample.id!r} (first at {first_seen[sample.id]})")
            )
        else:
            first_seen[sample.id] = source
        report.images += len(sample.images)
        report.text_only += not sample.images
        image_refs.extend((index, source, data.image_path(sample, j)) for j in range(len(sample.images)))

    report.samples = len(found)
    if not found:
        report.problems.append(Problem(name, "no records"))
    unique_paths = list(dict.fromkeys(image_path for _, _, image_path in image_refs))
    if check_images and unique_paths:
        report.unique_images = len(unique_paths)
        errors = dict(
            zip(
                unique_paths,
                _check_images(unique_paths, max_pixels, workers or default_workers(), disable, name),
                strict=True,
            )
        )
        for index, source, image_path in image_refs:
            error = errors[image_path]
            if error is not None:
                found[index].append(Problem(source, error))

    for problems in found:
        report.problems.extend(problems)
        report.bad_samples += bool(problems)
    return report


def _check_images(
    paths: list[Path], max_pixels: int, workers: int, disable: bool | None, name: str
) -> Iterable[str | None]:
    """Decode each image; yields None for a good one and a one-line message for a bad one, in order."""

    def check(image_path: Path) -> str | None:
        try:
            load_image(image_path, max_pixels=max_pixels).close()
        except DataError as err:
            return str(err)
        except Exception as err:  # a validator reports a broken file instead of crashing on it
            detail = " ".join(str(err).split())
            return f"{image_path}: unexpected error reading image ({type(err).__name__}: {detail})"
        return None

    bar = tqdm(total=len(paths), desc=f"images {Path(name).name}", unit="img", disable=disable)
    with bar:
        if workers <= 1:
            for image_path in paths:
                yield check(image_path)
                bar.update()
            return
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(check, paths):
                yield result
                bar.update()


def default_workers() -> int:
    """Threads for image checks: decoding is mostly GIL-free C, so use the cores, within reason."""
    return max(1, min(8, os.cpu_count() or 1))
