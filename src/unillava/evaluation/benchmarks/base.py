"""What every benchmark shares: items, image references, problem bookkeeping and the Benchmark interface.

A benchmark turns its released files into `Item`s (an id, the paper's prompt, image references and the
answer data), scores a mapping of predictions with the official rules, and may write the file a remote
evaluation server expects. Records that cannot be read are never dropped silently: each one is named in
`LoadResult.problems` as "FILE line N: what is wrong", and the runner refuses to continue unless asked to
skip them, in which case they are counted in the results.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from unillava.conversation import Message
from unillava.data.images import load_image
from unillava.errors import DataError


@dataclass(frozen=True)
class EmbeddedImage:
    """An image stored inside a data file (MMBench's base64 TSV column, MMMU's parquet bytes), decoded
    only when needed so a large file does not become a large list of decoded images."""

    data: str | bytes
    label: str

    def open(self) -> Image.Image:
        raw = self.data
        if isinstance(raw, str):
            try:
                raw = base64.b64decode(raw, validate=False)
            except (binascii.Error, ValueError) as err:
                raise DataError(f"{self.label}: image is not valid base64 ({err})") from None
        return load_image(raw, name=self.label)


ImageRef = Path | EmbeddedImage


def open_image(ref: ImageRef) -> Image.Image:
    """An RGB image from a file path or an embedded image; DataError names the file or record."""
    return ref.open() if isinstance(ref, EmbeddedImage) else load_image(ref)


@dataclass
class Item:
    """One question to ask: `prompt` is the full user text (the paper's response-format prompt included);
    images go before it in the user turn, as LLaVA's `<image>\\n` prefix does. `answer` is None when the
    split's answers are not public (scored on a server).

    `conversation` replaces the one user turn built from `prompt` where a data file gives the exact turns
    (the shapes tasks: the record's turns up to its first answer, images where its markers put them);
    `prompt` is then only shown in the report. `visual_prompts` are the box / point / mask prompts (image pixels) of the item's marked regions,
    given to models that take them."""

    id: str
    prompt: str
    images: list[ImageRef] = field(default_factory=list)
    answer: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    conversation: list[Message] | None = None
    visual_prompts: list[dict[str, Any]] | None = None


@dataclass
class Prediction:
    """A model's answer; `masks` are COCO RLE dicts for segmentation benchmarks (None: the model gave none)."""

    text: str
    masks: list[dict[str, Any]] | None = None


@dataclass
class LoadResult:
    items: list[Item]
    split: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def has_answers(self) -> bool:
        return any(item.answer is not None for item in self.items)


class Problems:
    """Collects "FILE line N: message" strings for records that cannot be used."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.messages.append(f"{where}: {message}")


def where(path: Path, line: int, unit: str = "line") -> str:
    return f"{path} {unit} {line}"


# --------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a file") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None


def read_json(path: Path) -> Any:
    """A whole JSON file; a syntax error names the file, line and column (the file is unusable)."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None


def read_json_object(path: Path, expected: str) -> dict[str, Any]:
    """A whole JSON file that must be an object; `expected` says what it should map, for the error."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object {expected}")
    return data


def keyed_records(path: Path, data: Mapping[str, Any], problems: Problems) -> list[tuple[str, str, dict]]:
    """(location, id, record) per entry of a JSON object mapping ids to records (MM-Vet, GQA);
    entries that are not objects are recorded as problems."""
    out = []
    for number, (key, record) in enumerate(data.items(), start=1):
        at = f"{path} record {number} (id {key!r})"
        if isinstance(record, dict):
            out.append((at, str(key), record))
        else:
            problems.add(at, "expected a JSON object")
    return out


def read_jsonl(path: Path, problems: Problems) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line; malformed lines are recorded in `problems`, not raised."""
    records: list[tuple[int, dict[str, Any]]] = []
    for number, raw in enumerate(read_text(path).splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            problems.add(where(path, number), f"invalid JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(obj, dict):
            problems.add(where(path, number), f"expected a JSON object, got {type(obj).__name__}")
            continue
        records.append((number, obj))
    return records


def json_records(path: Path, data: Any, problems: Problems, key: str | None = None) -> list[tuple[int, dict]]:
    """(record number, object) of a JSON list (or `data[key]`); non-objects are recorded as problems."""
    seq = data.get(key) if key is not None and isinstance(data, dict) else data
    if not isinstance(seq, list):
        what = f"field '{key}'" if key else "the top level"
        raise DataError(f"{path}: {what} must be a JSON list of records")
    out: list[tuple[int, dict]] = []
    for number, obj in enumerate(seq, start=1):
        if isinstance(obj, dict):
            out.append((number, obj))
        else:
            problems.add(where(path, number, "record"), f"expected a JSON object, got {type(obj).__name__}")
    return out


def get_id(obj: Mapping[str, Any], keys: Sequence[str], at: str, problems: Problems) -> str | None:
    """The record's id under the first present key, or None after recording the problem."""
    for key in keys:
        value = obj.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, str | int):
            problems.add(at, f"field '{key}' must be a string or an integer")
            return None
        if str(value).strip() == "":
            problems.add(at, f"field '{key}' is empty")
            return None
        return str(value)
    problems.add(at, f"no question id (expected field {' or '.join(repr(k) for k in keys)})")
    return None


def get_str(
    obj: Mapping[str, Any], key: str, at: str, problems: Problems, *, allow_empty: bool = False
) -> str | None:
    value = obj.get(key)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        problems.add(at, f"field '{key}' must be a non-empty string")
        return None
    return value


def check_unique(items: Iterable[tuple[str, str]], problems: Problems) -> set[str]:
    """Ids seen more than once (each repeat recorded as a problem); the pairs are (id, location)."""
    seen: dict[str, str] = {}
    repeated: set[str] = set()
    for item_id, at in items:
        if item_id in seen:
            problems.add(at, f"question id {item_id!r} repeats {seen[item_id]}")
            repeated.add(item_id)
        else:
            seen[item_id] = at
    return repeated


def first_existing(root: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        candidate = root / name
        if candidate.exists():
            return candidate
    return None


def image_dir(root: Path, folders: Sequence[str]) -> Path:
    """The first of `folders` under `root` that exists (images are then looked up inside it), else root."""
    found = first_existing(root, folders)
    return found if found is not None and found.is_dir() else root


def with_prompt(text: str, *suffixes: str) -> str:
    """Append response-format prompts on their own lines unless the text already ends with them
    (LLaVA's released question files already carry them)."""
    out = text.rstrip()
    for suffix in suffixes:
        if not out.endswith(suffix):
            out = f"{out}\n{suffix}"
    return out


def split_mismatch(path: Path, field_name: str, found: Any, expected: str) -> DataError:
    return DataError(
        f"{path}: field '{field_name}' says this file is for split {found!r}, but split {expected!r} is "
        "being evaluated (an answer file for another split?)"
    )


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def group_means(
    keys: Sequence[str | None], columns: Mapping[str, Sequence[float]]
) -> dict[str, dict[str, float]]:
    """Per-group means of each column, with the group size as "n"."""
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            groups.setdefault(key, []).append(i)
    return {
        key: {**{name: mean([col[i] for i in idx]) for name, col in columns.items()}, "n": len(idx)}
        for key, idx in sorted(groups.items())
    }


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# The benchmark interface
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column of a paper's results table: which metric, its label, and the factor to paper units."""

    metric: str
    label: str
    scale: float = 100.0


class Benchmark:
    """Base class: subclasses set the class attributes and implement `load` and `score`."""

    name: str = ""
    title: str = ""
    #: Sub-directories of --data where this benchmark's files are looked for (the LLaVA playground names first).
    dirs: tuple[str, ...] = ()
    #: What a user must download, for the docs and for "data not found" errors.
    download: str = ""
    #: The metric reported in paper tables, and how it maps to paper units.
    columns: tuple[Column, ...] = ()
    metric_note: str = ""
    default_split: str | None = None
    max_new_tokens: int = 128
    judged: bool = False
    segmentation: bool = False
    visual_prompt: bool = False
    #: The procedural task name of a shapes benchmark (None otherwise): runs also list its results under
    #: this name in results.json's "tasks", the layout scripts of `unillava eval --task` read.
    task: str | None = None

    def find_root(self, data: Path) -> Path | None:
        """This benchmark's directory: a known sub-directory of `data`, or `data` itself if it holds the files."""
        for name in self.dirs:
            candidate = data / name
            if candidate.is_dir() and self.recognises(candidate):
                return candidate
        return data if data.is_dir() and self.recognises(data) else None

    def output_dir(self, out_dir: Path) -> Path:
        """Where this benchmark's files (judge requests, submissions) go inside a run's directory."""
        return out_dir / self.name

    def predictions_path(self, out_dir: Path, split: str) -> Path:
        """The resumable predictions file of `split` inside a run's directory."""
        return self.output_dir(out_dir) / f"predictions_{split}.jsonl"

    def results_path(self, out_dir: Path) -> Path:
        """This benchmark's results file inside a run's directory."""
        return self.output_dir(out_dir) / "results.json"

    def reference(self, item: Item) -> str | None:
        """The expected answer as text, for the report's sample answers (None: not shown)."""
        answer = item.answer
        if isinstance(answer, str):
            return answer
        if isinstance(answer, list | tuple) and answer and all(isinstance(a, str) for a in answer):
            return " | ".join(answer)
        return None

    def recognises(self, root: Path) -> bool:
        """Whether `root` holds this benchmark's files (cheap: looks at file names only)."""
        raise NotImplementedError

    def load(self, root: Path, split: str | None = None) -> LoadResult:
        raise NotImplementedError

    def score(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], *, meteor: bool = True
    ) -> dict[str, Any]:
        """{"metrics": {...}, "breakdown": {...}, "warnings": [...]}, and optionally "counts" that the runner
        adds to its own; a missing prediction scores as wrong."""
        raise NotImplementedError

    def write_submission(
        self,
        items: Sequence[Item],
        predictions: Mapping[str, Prediction],
        out_dir: Path,
        split: str,
        root: Path,
    ) -> list[Path]:
        """Files in the evaluation server's format (none by default); `root` is the benchmark's data directory."""
        return []

    def headline(self, metrics: Mapping[str, Any]) -> float | None:
        """The first column's value in paper units (None if not computed)."""
        if not self.columns:
            return None
        value = metrics.get(self.columns[0].metric)
        return None if value is None else float(value) * self.columns[0].scale

    # Judged benchmarks override these two.
    def judge_requests(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], model: str
    ) -> list[dict]:
        return []

    def score_judged(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], replies: Mapping[str, str]
    ) -> dict[str, Any]:
        raise NotImplementedError


def texts(items: Sequence[Item], predictions: Mapping[str, Prediction]) -> list[str | None]:
    """Each item's predicted text, None where the prediction is missing."""
    return [p.text if (p := predictions.get(item.id)) is not None else None for item in items]
