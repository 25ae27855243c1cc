"""The LLaVA conversation data format, read lazily and validated record by record.

A record is `{"id": ..., "image": path | [paths] (optional), "conversations": [{"from": "human" | "gpt" |
"system", "value": str}, ...], ...}`, stored as a JSON list (`.json`) or one record per line (JSON Lines).
Fields other than id / image / conversations are kept in `Sample.extra` for tasks that need them (boxes,
masks, answers for scoring). Two of them are checked here because training feeds them to OMG-LLaVA's
[SEG] decoder and visual prompts: `masks`, one COCO RLE per `[SEG]` in the answers (in text order), and
`visual_prompts`, one box / point / mask prompt in image pixels per `<region>` / `<mark>` in the user
turns (in text order); see `check_pixel_fields`.

Large files are common (LLaVA-1.5's mix is 665k records), so a JSON Lines file is indexed by byte offset on
open and a line is only parsed when its sample is asked for: one malformed line costs one sample (and one
clear error naming FILE:LINE when it is read), not the whole run.
"""

from __future__ import annotations

import json
import math
import random
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast, overload

from unillava.conversation import (
    IMAGE_MARKER,
    ROLE_FROM_LLAVA,
    Message,
    Role,
    split_image_markers,
)
from unillava.data.masks import rle_string_counts
from unillava.errors import ConfigError, DataError
from unillava.prompts import RESPONSE_FORMATS

_RECORD_KEYS = ("id", "image", "conversations")
SEG_TOKEN = "[SEG]"
REGION_TOKEN = "<region>"
MARK_TOKEN = "<mark>"
PROMPT_TYPES = ("box", "point", "mask")
_SNIFF_BYTES = 4096
_BLANK = b"\xef\xbb\xbf \t\r\n"  # whitespace and the UTF-8 byte-order mark


class RecordError(DataError):
    """A problem with one record (or a whole file); keeps where and what apart so reports print FILE:LINE."""

    def __init__(self, source: str, detail: str) -> None:
        super().__init__(f"{source}: {detail}")
        self.source = source
        self.detail = detail


@dataclass
class Sample:
    """One parsed record: image paths as written in the file, messages with image slots, and where it came from."""

    id: str
    images: list[str]
    messages: list[Message]
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return len(self.images)


def _json_type(value: Any) -> str:
    """JSON's name for a Python value's type, so messages speak the file's language."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return type(value).__name__


def parse_record(record: Any, *, source: str) -> Sample:
    """Validate one LLaVA record and turn it into a `Sample`; a `RecordError` names `source` and the field.

    Rules: `conversations` is a non-empty list of `{"from", "value"}` string pairs; an optional leading system
    turn, then user and assistant turns alternating, starting with a user turn and ending with an assistant
    turn whose text is not blank. `image` is absent, null, one path or a list of paths, and the number of
    `<image>` markers (allowed in user turns only) must equal the number of images — except that, as in
    LLaVA's own preprocessing, a record with exactly one image and no marker gets `<image>\\n` prepended to
    its first user turn. A missing `id` falls back to `source`; an integer id becomes a string.
    """
    if not isinstance(record, dict):
        raise RecordError(source, f"record must be a JSON object, got {_json_type(record)}")

    sample_id = record.get("id", source)
    if isinstance(sample_id, bool) or not isinstance(sample_id, str | int):
        raise RecordError(source, f"field 'id' must be a string or integer, got {_json_type(sample_id)}")

    images = _parse_images(record.get("image"), source)

    if "conversations" not in record:
        raise RecordError(source, "missing field 'conversations'")
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise RecordError(source, f"field 'conversations' must be an array of turns, got {_json_type(turns)}")
    if not turns:
        raise RecordError(source, "field 'conversations' is empty")

    roles: list[Role] = []
    values: list[str] = []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(
                source, f"{where} must be an object with 'from' and 'value', got {_json_type(turn)}"
            )
        for key in ("from", "value"):
            if key not in turn:
                raise RecordError(source, f"{where}: missing field '{key}'")
            if not isinstance(turn[key], str):
                raise RecordError(source, f"{where}.{key} must be a string, got {_json_type(turn[key])}")
        role = ROLE_FROM_LLAVA.get(turn["from"])
        if role is None:
            raise RecordError(
                source, f"{where}.from: unknown role {turn['from']!r} (expected 'human', 'gpt' or 'system')"
            )
        roles.append(cast(Role, role))
        values.append(turn["value"])

    _check_turn_order(roles, values, source)

    markers = [value.count(IMAGE_MARKER) for value in values]
    for i, (role, count) in enumerate(zip(roles, markers, strict=True)):
        if count and role != "user":
            raise RecordError(
                source,
                f"conversations[{i}].value: '{IMAGE_MARKER}' marker in a turn from the {role}; only user turns hold images",
            )
    first_user = roles.index("user")
    if len(images) == 1 and sum(markers) == 0:
        values[first_user] = f"{IMAGE_MARKER}\n{values[first_user]}"
    elif sum(markers) != len(images):
        raise RecordError(
            source,
            f"field 'image': {len(images)} image(s) but {sum(markers)} '{IMAGE_MARKER}' marker(s) "
            "in the conversation",
        )

    check_pixel_fields(record, roles, values, len(images), source)
    messages = [Message(role, split_image_markers(value)) for role, value in zip(roles, values, strict=True)]
    extra = {key: value for key, value in record.items() if key not in _RECORD_KEYS}
    return Sample(id=str(sample_id), images=images, messages=messages, source=source, extra=extra)


def rle_problem(rle: Any) -> str | None:
    """Why `rle` is not a COCO RLE ({"size": [h, w], "counts": compressed str | run lengths}) whose runs
    cover h x w exactly, or None; checked without decoding the mask."""
    if not isinstance(rle, dict):
        return f"expected a COCO RLE object with 'size' and 'counts', got {_json_type(rle)}"
    size, counts = rle.get("size"), rle.get("counts")
    if not (
        isinstance(size, list)
        and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        return f"'size' must be [height, width] as positive integers, got {size!r}"
    if isinstance(counts, str):
        try:
            runs = rle_string_counts(counts)
        except ValueError:
            return "'counts' is not a COCO compressed RLE string"
    elif isinstance(counts, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
        runs = counts
    else:
        return (
            f"'counts' must be a compressed RLE string or an array of run lengths, got {_json_type(counts)}"
        )
    if any(run < 0 for run in runs) or sum(runs) != size[0] * size[1]:
        return f"'counts' does not cover the {size[0]}x{size[1]} mask (runs sum to {sum(runs)}, some may be negative)"
    return None


def _prompt_problem(prompt: Any, num_images: int) -> str | None:
    """Why `prompt` is not a visual prompt in image pixels (`PROMPT_TYPES`), or None."""
    if not isinstance(prompt, dict):
        return f"expected an object with 'type', got {_json_type(prompt)}"
    kind = prompt.get("type")
    if kind not in PROMPT_TYPES:
        return f"'type' must be one of {', '.join(PROMPT_TYPES)}, got {kind!r}"
    index = prompt.get("image_index", 0)
    if index is not None and (
        isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_images
    ):
        return f"'image_index' must be an image of the record (0..{num_images - 1}), got {index!r}"
    if kind == "mask":
        problem = rle_problem(prompt.get("mask"))
        return None if problem is None else f"'mask': {problem}"
    want = 4 if kind == "box" else 2
    coords = prompt.get(kind)
    if not (
        isinstance(coords, list)
        and len(coords) == want
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in coords)
    ):
        shape = "[x0, y0, x1, y1]" if kind == "box" else "[x, y]"
        return f"'{kind}' must be {shape} as numbers, got {coords!r}"
    return None


def check_pixel_fields(
    record: dict[str, Any], roles: list[Role], values: list[str], num_images: int, source: str
) -> None:
    """Check a record's `masks` and `visual_prompts` (absent or null: nothing to check).

    `masks`: an array of COCO RLEs, exactly one per `[SEG]` in the answers, which only answers may hold
    (the [SEG] decoder reads them in order and decodes over the last image). `visual_prompts`: an array of
    {"type": "box", "box": [x0, y0, x1, y1]} | {"type": "point", "point": [x, y]} | {"type": "mask", "mask":
    RLE} in image pixels, optional "image_index", exactly one per `<region>` / `<mark>` marker, which only
    user turns may hold. Image sizes are not known here; they are checked when the images load.
    """
    fields = (
        ("masks", SEG_TOKEN, "assistant", "'[SEG]' token(s) in the answers", "mask(s)"),
        ("visual_prompts", None, "user", "'<region>'/'<mark>' marker(s) in the user turns", "prompt(s)"),
    )
    for name, token, holder, what, items in fields:
        value = record.get(name)
        if value is None:
            continue
        if not isinstance(value, list):
            raise RecordError(source, f"field '{name}' must be an array, got {_json_type(value)}")
        for i, item in enumerate(value):
            problem = rle_problem(item) if name == "masks" else _prompt_problem(item, num_images)
            if problem is not None:
                raise RecordError(source, f"{name}[{i}]: {problem}")
        tokens = (token,) if token is not None else (REGION_TOKEN, MARK_TOKEN)
        count = 0
        for i, (role, text) in enumerate(zip(roles, values, strict=True)):
            found = sum(text.count(t) for t in tokens)
            if found and role != holder:
                raise RecordError(
                    source,
                    f"conversations[{i}].value: {'/'.join(repr(t) for t in tokens)} in a turn from the {role}; "
                    f"with '{name}', only {holder} turns may hold it",
                )
            count += found
        if count != len(value):
            raise RecordError(source, f"field '{name}': {len(value)} {items} but {count} {what}")
        if value and num_images == 0:
            raise RecordError(source, f"field '{name}': {len(value)} {items} but the record has no image")


def _parse_images(value: Any, source: str) -> list[str]:
    if value is None:
        return []
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list):
        raise RecordError(
            source, f"field 'image' must be a path or an array of paths, got {_json_type(value)}"
        )
    for i, path in enumerate(paths):
        where = "field 'image'" if isinstance(value, str) else f"image[{i}]"
        if not isinstance(path, str):
            raise RecordError(source, f"{where} must be a string path, got {_json_type(path)}")
        if not path.strip():
            raise RecordError(source, f"{where} is an empty path")
    return list(paths)


def _check_turn_order(roles: list[Role], values: list[str], source: str) -> None:
    """Optional leading system turn, then user/assistant alternating, ending on a non-blank assistant turn."""
    start = 1 if roles[0] == "system" else 0
    if "assistant" not in roles:
        raise RecordError(source, "conversations: no assistant turn (nothing to learn or score)")
    for i in range(start, len(roles)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        role = roles[i]
        if role == "system":
            raise RecordError(source, f"conversations[{i}].from: a system turn is only allowed first")
        if role != expected:
            name = "'human'" if expected == "user" else "'gpt'"
            raise RecordError(
                source,
                f"conversations[{i}].from: turns must alternate user/assistant; expected {expected} ({name}), "
                f"got {role}",
            )
        text = values[i]
        if role == "assistant" and not text.strip():
            raise RecordError(source, f"conversations[{i}].value: empty assistant turn")
        if role == "user" and not text.strip():
            raise RecordError(source, f"conversations[{i}].value: empty user turn")
    if roles[-1] != "assistant":
        raise RecordError(source, f"conversations[{len(roles) - 1}]: last user turn has no assistant reply")


class ConversationFile(Sequence[Sample]):
    """A LLaVA-format file as a lazy sequence of `Sample`s.

    JSON Lines: a byte-offset index is built on open (no JSON parsing) and a line is parsed on access, so a
    malformed line only fails when its sample is read; blank lines are skipped and sources keep the real
    line numbers ("train.jsonl:17"). JSON list (first non-blank character `[`): loaded once, records
    parsed on access; sources read "data.json:item N" with N the 0-based index (`jq '.[N]'`), because a
    list is often written on a single line. Relative image paths resolve against `image_root`, or the data
    file's folder when none is given.
    """

    def __init__(self, path: str | Path, image_root: str | Path | None = None) -> None:
        self.path = Path(path)
        self.name = str(path)
        if not self.path.exists():
            raise DataError(f"{self.name}: dataset file not found")
        if self.path.is_dir():
            raise DataError(f"{self.name}: is a directory, not a dataset file")
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self._items: list[Any] | None = None
        self._offsets = array("q")
        self._lines = array("q")
        self._stats: tuple[list[int], list[bool]] | None = None
        if self._looks_like_json_list():
            self.format = "json"
            self._items = self._load_json_list()
        else:
            self.format = "jsonl"
            self._build_index()

    def _looks_like_json_list(self) -> bool:
        """Sniff the first non-blank byte: `[` means a JSON list whatever the suffix, else JSON Lines."""
        try:
            with self.path.open("rb") as f:
                while chunk := f.read(_SNIFF_BYTES):
                    head = chunk.lstrip(_BLANK)
                    if head:
                        return head.startswith(b"[")
        except OSError as err:
            raise DataError(f"{self.name}: cannot read dataset file ({err})") from err
        return False

    def _load_json_list(self) -> list[Any]:
        try:
            data = json.loads(self.path.read_bytes())
        except json.JSONDecodeError as err:
            raise RecordError(
                f"{self.name}:{err.lineno}", f"malformed JSON ({err.msg}, column {err.colno})"
            ) from err
        except UnicodeDecodeError as err:
            raise RecordError(self.name, f"not valid UTF-8 text ({err.reason} at byte {err.start})") from err
        if not isinstance(data, list):
            raise RecordError(self.name, f"expected a JSON array of records, got {_json_type(data)}")
        return data

    def _build_index(self) -> None:
        offset = 0
        with self.path.open("rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.isspace():
                    self._offsets.append(offset)
                    self._lines.append(lineno)
                offset += len(line)

    def __len__(self) -> int:
        return len(self._items) if self._items is not None else len(self._offsets)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...

    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = self._normalise(index)
        return parse_record(self.raw(i), source=self.source(i))

    def _normalise(self, index: int) -> int:
        n = len(self)
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError(f"sample index {index} out of range for {n} samples in {self.name}")
        return i

    def source(self, index: int) -> str:
        """Where sample `index` lives: "FILE:LINE" for JSON Lines, "FILE:item N" for a JSON list."""
        i = self._normalise(index)
        if self._items is not None:
            return f"{self.name}:item {i}"
        return f"{self.name}:{self._lines[i]}"

    def raw(self, index: int) -> Any:
        """The record as decoded JSON, unvalidated; a malformed JSON line raises `RecordError`."""
        i = self._normalise(index)
        if self._items is not None:
            return self._items[i]
        with self.path.open("rb") as f:
            f.seek(self._offsets[i])
            line = f.readline()
        return _decode_line(line, self.source(i))

    def lengths(self) -> list[int]:
        """Approximate text length (characters over all turns) per sample, for length-grouped batching.

        Computed with `has_images` in one pass that decodes JSON but does not validate; unreadable records
        count as 0 characters without images.
        """
        return self._compute_stats()[0]

    def has_images(self) -> list[bool]:
        """Whether each sample names at least one image (for grouping batches by modality)."""
        return self._compute_stats()[1]

    def _compute_stats(self) -> tuple[list[int], list[bool]]:
        if self._stats is None:
            lengths: list[int] = []
            flags: list[bool] = []
            for _, record in self.iter_raw():
                length, has_image = _text_length_and_images(record)
                lengths.append(length)
                flags.append(has_image)
            self._stats = (lengths, flags)
        return self._stats

    def iter_raw(self) -> Iterator[tuple[str, Any]]:
        """Every record in file order as (source, decoded JSON), read sequentially for fast full scans.

        Records are not validated (use `parse_record`); an undecodable JSON line yields its `RecordError` in
        place of the record, so one bad line does not end the scan.
        """
        if self._items is not None:
            for i, item in enumerate(self._items):
                yield f"{self.name}:item {i}", item
            return
        with self.path.open("rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.isspace():
                    continue
                source = f"{self.name}:{lineno}"
                try:
                    yield source, _decode_line(line, source)
                except RecordError as err:
                    yield source, err

    def image_path(self, sample: Sample, i: int) -> Path:
        """The file of the sample's i-th image: relative paths are joined to `image_root`."""
        return self.image_root / sample.images[i]

    def __repr__(self) -> str:
        return f"ConversationFile({self.name!r}, {len(self)} samples, format={self.format})"


def _decode_line(line: bytes, source: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise RecordError(source, f"malformed JSON ({err.msg} at column {err.colno})") from err
    except UnicodeDecodeError as err:
        raise RecordError(source, f"not valid UTF-8 text ({err.reason} at byte {err.start})") from err


def _text_length_and_images(record: Any) -> tuple[int, bool]:
    """Cheap stats without validation; anything that is not a record counts as empty and text-only."""
    if not isinstance(record, dict):
        return 0, False
    turns = record.get("conversations")
    length = 0
    if isinstance(turns, list):
        for turn in turns:
            if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                length += len(turn["value"])
    return length, bool(record.get("image"))


def apply_response_format(sample: Sample, kind: str | None) -> Sample:
    """Append a response-format prompt (`RESPONSE_FORMATS[kind]`) as "\\n" + prompt to every user turn.

    Evaluation sets expect a short answer, an option letter, or "Unanswerable"; the prompt is data, not part
    of the chat template, so it is added here. Turns that already end with it are left alone, so applying
    twice is harmless. `None` returns the sample unchanged. The input sample is not modified.
    """
    if kind is None:
        return sample
    if kind not in RESPONSE_FORMATS:
        raise ConfigError(
            f"response format: unknown {kind!r} (expected one of {', '.join(RESPONSE_FORMATS)})"
        )
    prompt = RESPONSE_FORMATS[kind]
    messages = []
    for message in sample.messages:
        content = list(message.content)
        if message.role == "user" and not message.text.rstrip().endswith(prompt):
            if content and isinstance(content[-1], str):
                content[-1] = f"{content[-1]}\n{prompt}"
            else:
                content.append(f"\n{prompt}")
        messages.append(Message(message.role, content))
    return replace(sample, images=list(sample.images), messages=messages, extra=dict(sample.extra))


__all__ = [
    "MARK_TOKEN",
    "PROMPT_TYPES",
    "REGION_TOKEN",
    "RESPONSE_FORMATS",
    "SEG_TOKEN",
    "ConversationFile",
    "RecordError",
    "Sample",
    "apply_response_format",
    "check_pixel_fields",
    "parse_record",
    "rle_problem",
]


def merge_turns(records: Sequence[dict[str, Any]], max_turns: int, seed: int = 0) -> list[dict[str, Any]]:
    """Single-turn records about the same image, merged into multi-turn conversations of <= `max_turns`.

    LLaVA-1.5 trains on such conversations (VQAv2's questions of one image in one sample): the image and
    the system prompt are encoded once for several answers, so a step teaches more per token. Records keep
    their file order within an image unless `seed` shuffles them (seed < 0 keeps the order); the `<image>`
    marker stays in the first human turn only. Records without exactly one image, or with more than one
    exchange, pass through unchanged.
    """
    if max_turns < 1:
        raise ConfigError(f"max_turns must be >= 1, got {max_turns}")
    rng = random.Random(seed)
    by_image: dict[str, list[dict[str, Any]]] = {}
    passed: list[dict[str, Any]] = []
    for record in records:
        turns = record.get("conversations", [])
        if isinstance(record.get("image"), str) and len(turns) == 2:
            by_image.setdefault(record["image"], []).append(record)
        else:
            passed.append(record)
    merged: list[dict[str, Any]] = []
    for image, group in by_image.items():
        if seed >= 0:
            rng.shuffle(group)
        for start in range(0, len(group), max_turns):
            chunk = group[start : start + max_turns]
            conversations = []
            for k, record in enumerate(chunk):
                human, gpt = record["conversations"]
                question = human["value"].replace(IMAGE_MARKER, "").strip()
                conversations += [
                    {"from": "human", "value": f"{IMAGE_MARKER}\n{question}" if k == 0 else question},
                    {"from": "gpt", "value": gpt["value"]},
                ]
            merged.append(
                {"id": "+".join(str(r["id"]) for r in chunk), "image": image, "conversations": conversations}
            )
    return merged + passed
