"""Loader pieces shared by several benchmarks: LLaVA's question JSONL, attaching answers, de-duplication."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from unillava.errors import DataError
from unillava.evaluation.benchmarks.base import (
    Item,
    Problems,
    check_unique,
    get_id,
    get_str,
    read_jsonl,
    where,
    with_prompt,
)


def llava_questions(
    path: Path, images: Path, suffixes: Sequence[str], problems: Problems, *, prefix: str = ""
) -> list[Item]:
    """Items from LLaVA's eval question JSONL (`{"question_id", "image", "text", "category"}`).

    The response-format prompts are appended unless the text already ends with them; `image` is relative
    to `images`. Lines without an id, text or image are recorded in `problems`.
    """
    items: list[Item] = []
    for line, obj in read_jsonl(path, problems):
        at = where(path, line)
        qid = get_id(obj, ("question_id", "id"), at, problems)
        text = get_str(obj, "text", at, problems)
        image = obj.get("image")
        if image is not None and (not isinstance(image, str) or not image.strip()):
            problems.add(at, "field 'image' must be a non-empty string")
            continue
        if qid is None or text is None:
            continue
        items.append(
            Item(
                id=prefix + qid,
                prompt=with_prompt(text, *suffixes),
                images=[images / image] if image else [],
                meta={
                    "at": at,
                    "question_id": obj["question_id"] if "question_id" in obj else obj.get("id"),
                    "category": obj.get("category"),
                    "image": image,
                },
            )
        )
    return items


def dedupe(items: list[Item], problems: Problems) -> list[Item]:
    """Keep the first item of each id; every repeat is recorded as a problem."""
    repeated = check_unique(((item.id, item.meta.get("at", item.id)) for item in items), problems)
    if not repeated:
        return items
    seen: set[str] = set()
    out = []
    for item in items:
        if item.id not in seen:
            seen.add(item.id)
            out.append(item)
    return out


def attach_answers(
    items: list[Item],
    answers: Mapping[str, Any],
    ann_path: Path,
    problems: Problems,
    *,
    key: Callable[[Item], str] = lambda item: item.id,
) -> list[Item]:
    """Set each item's answer from `answers` (keyed by `key(item)`); items without one are problems.

    If none of the questions has an answer the annotation file is for another split (or another
    benchmark): that is a DataError, since nothing could be scored.
    """
    if items and not any(key(item) in answers for item in items):
        raise DataError(
            f"{ann_path}: none of the {len(items)} question ids appear in this answer file "
            "(an answer file for another split?)"
        )
    out = []
    for item in items:
        k = key(item)
        if k not in answers:
            problems.add(item.meta.get("at", item.id), f"question id {k!r} has no answer in {ann_path}")
            continue
        item.answer = answers[k]
        out.append(item)
    return out


def answer_strings(raw: Any) -> list[str] | None:
    """VQA-style answers: a list of strings or of {"answer": str} dicts (VQAv2, VizWiz); None if malformed."""
    if not isinstance(raw, list) or not raw:
        return None
    out = []
    for a in raw:
        value = a.get("answer") if isinstance(a, dict) else a
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            return None
        out.append(str(value))
    return out
