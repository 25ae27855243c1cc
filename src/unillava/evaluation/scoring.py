"""Score a prediction file against a task's annotation file: read, validate, pair by id, dispatch.

Annotation lines come from the procedural task generator (``{"id", "image", "task", ...}`` plus
task fields); prediction lines are ``{"id", "text", "masks"?, "phrases"?}``. Every malformed line
raises DataError naming the file, the line and the field. Predictions for unknown ids, duplicate
prediction ids (the first is kept) and annotations without a prediction (scored as wrong, or as an
empty mask) are counted in ``results["counts"]`` and explained in ``results["warnings"]``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from unillava.errors import DataError, UnillavaError
from unillava.evaluation import metrics

VQA_TASKS = ("vqa", "fine_text", "fine_count", "region_vqa")
CAPTION_TASKS = ("caption", "detail")
SEG_TASKS = ("refseg", "reasonseg")
TASKS = (*VQA_TASKS, "mc", "pope", *CAPTION_TASKS, *SEG_TASKS, "region_caption", "gcg")


@dataclass
class _Source:
    """Where records come from, so errors can say "file line N: field 'x' ..."."""

    name: str

    def error(self, line: int, message: str) -> DataError:
        return DataError(f"{self.name} line {line}: {message}")


@dataclass
class _Annotation:
    id: str
    line: int
    data: dict[str, Any]


@dataclass
class _Prediction:
    id: str
    line: int
    text: str
    masks: list[dict[str, Any]] = field(default_factory=list)
    phrases: list[str] | None = None


# --------------------------------------------------------------------------------------------------
# Reading and validation
# --------------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file; DataError on bad JSON."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{p}: is a directory, expected a .jsonl file") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{p}: not UTF-8 text ({err})") from None
    except OSError as err:
        raise DataError(f"{p}: cannot read ({err.strerror})") from None
    records: list[tuple[int, dict[str, Any]]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataError(f"{p} line {number}: invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{p} line {number}: expected a JSON object, got {type(obj).__name__}")
        records.append((number, obj))
    return records


def resolve_annotation_path(task: str, ann: str | Path) -> Path:
    """The annotation file: ``ann`` itself, or ``ann/{task}.jsonl`` when ``ann`` is a directory."""
    p = Path(ann)
    if p.is_dir():
        candidate = p / f"{task}.jsonl"
        if not candidate.is_file():
            raise DataError(f"{p}: directory has no {task}.jsonl")
        return candidate
    return p


def _id(src: _Source, line: int, obj: Mapping[str, Any]) -> str:
    value = obj.get("id")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise src.error(line, "field 'id' must be a string")
    return str(value)


def _str_list(src: _Source, line: int, obj: Mapping[str, Any], name: str, *, min_len: int = 0) -> list[str]:
    value = obj.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise src.error(line, f"field '{name}' must be a list of strings")
    if len(value) < min_len:
        raise src.error(line, f"field '{name}' must have at least {min_len} item(s)")
    return value


def _masks(src: _Source, line: int, obj: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    value = obj.get(name)
    if not isinstance(value, list):
        raise src.error(line, f"field '{name}' must be a list of COCO RLE dicts")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict):
            raise src.error(line, f"field '{name}'[{k}] must be a COCO RLE dict {{'size', 'counts'}}")
        try:
            out.append(metrics.to_rle(m))
        except ValueError as err:
            raise src.error(line, f"field '{name}'[{k}]: {err}") from None
    return out


def _check_annotation(task: str, src: _Source, line: int, obj: dict[str, Any]) -> None:
    """Validate the task-specific fields and normalise them in place (masks become checked RLEs)."""
    if "task" in obj and obj["task"] != task:
        raise src.error(line, f"field 'task' is {obj['task']!r} but the file is scored as {task!r}")
    if task in (*VQA_TASKS, *CAPTION_TASKS, "region_caption", "gcg"):
        answers = _str_list(src, line, obj, "answers", min_len=1)
        if not all(a.strip() for a in answers):
            raise src.error(line, "field 'answers' must not contain empty strings")
    if "qtype" in obj and not isinstance(obj["qtype"], str):
        raise src.error(line, "field 'qtype' must be a string")
    if task == "mc":
        options = _str_list(src, line, obj, "options", min_len=2)
        if len(options) > 26 or not all(o.strip() for o in options):
            raise src.error(line, "field 'options' must hold 2 to 26 non-empty strings")
        letters = metrics.option_letters(len(options))
        answer = obj.get("answer")
        if answer not in letters:
            raise src.error(line, f"field 'answer' must be one of {', '.join(letters)}")
    if task == "pope":
        answer = obj.get("answer")
        if not isinstance(answer, str) or answer.strip().lower() not in ("yes", "no"):
            raise src.error(line, "field 'answer' must be 'yes' or 'no'")
        obj["answer"] = answer.strip().lower()
        if "category" in obj and not isinstance(obj["category"], str):
            raise src.error(line, "field 'category' must be a string")
    if task in SEG_TASKS:
        obj["masks"] = _masks(src, line, obj, "masks")
        if not obj["masks"]:
            raise src.error(line, "field 'masks' must hold at least one mask")
        if len({tuple(m["size"]) for m in obj["masks"]}) > 1:
            raise src.error(line, "field 'masks' must all have the same size")
    if task == "region_caption":
        attrs = obj.get("attributes", {})
        if not isinstance(attrs, dict) or not all(
            v is None or (isinstance(v, str | int | float) and not isinstance(v, bool))
            for v in attrs.values()
        ):
            raise src.error(line, "field 'attributes' must map names to strings or numbers")
    if task == "gcg":
        phrases = _str_list(src, line, obj, "phrases")
        obj["masks"] = _masks(src, line, obj, "masks")
        if len(phrases) != len(obj["masks"]):
            raise src.error(
                line, f"fields 'phrases' ({len(phrases)}) and 'masks' ({len(obj['masks'])}) differ in length"
            )
        if len({tuple(m["size"]) for m in obj["masks"]}) > 1:
            raise src.error(line, "field 'masks' must all have the same size")


def _load_annotations(task: str, src: _Source, records: Iterable[tuple[int, Any]]) -> list[_Annotation]:
    out: list[_Annotation] = []
    seen: dict[str, int] = {}
    for line, obj in records:
        if not isinstance(obj, dict):
            raise src.error(line, f"expected a JSON object, got {type(obj).__name__}")
        obj = dict(obj)
        ann_id = _id(src, line, obj)
        if ann_id in seen:
            raise src.error(
                line, f"field 'id' {ann_id!r} repeats line {seen[ann_id]} (annotation ids must be unique)"
            )
        seen[ann_id] = line
        _check_annotation(task, src, line, obj)
        out.append(_Annotation(ann_id, line, obj))
    if not out:
        raise DataError(f"{src.name}: no annotations")
    return out


def _parse_prediction(task: str, src: _Source, line: int, obj: Any) -> _Prediction:
    if not isinstance(obj, dict):
        raise src.error(line, f"expected a JSON object, got {type(obj).__name__}")
    pred_id = _id(src, line, obj)
    text = obj.get("text", "" if task in SEG_TASKS else None)
    if not isinstance(text, str):
        raise src.error(line, "field 'text' must be a string")
    masks = _masks(src, line, obj, "masks") if obj.get("masks") is not None else []
    phrases = _str_list(src, line, obj, "phrases") if obj.get("phrases") is not None else None
    return _Prediction(pred_id, line, text, masks, phrases)


def _pair(
    task: str, src: _Source, records: Iterable[tuple[int, Any]], annotations: Sequence[_Annotation]
) -> tuple[list[_Prediction | None], dict[str, int], list[str]]:
    """The prediction for each annotation (None if missing) plus the counts of everything unmatched."""
    known = {a.id for a in annotations}
    chosen: dict[str, _Prediction] = {}
    n_preds = duplicates = unknown = 0
    unknown_examples: list[str] = []
    duplicate_examples: list[str] = []
    for line, obj in records:
        pred = _parse_prediction(task, src, line, obj)
        n_preds += 1
        if pred.id in chosen:
            duplicates += 1
            duplicate_examples.append(f"{pred.id!r} (line {pred.line}, first on line {chosen[pred.id].line})")
        elif pred.id not in known:
            unknown += 1
            unknown_examples.append(f"{pred.id!r} (line {pred.line})")
        else:
            chosen[pred.id] = pred
    paired: list[_Prediction | None] = [chosen.get(a.id) for a in annotations]
    missing = [a.id for a, p in zip(annotations, paired, strict=True) if p is None]
    counts = {
        "annotations": len(annotations),
        "predictions": n_preds,
        "missing": len(missing),
        "unknown": unknown,
        "duplicates": duplicates,
    }
    warnings: list[str] = []
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
        how = "an empty mask" if task in (*SEG_TASKS, "gcg") else "wrong"
        warnings.append(f"{len(missing)} annotation(s) have no prediction, scored as {how}: {shown}")
    if unknown:
        shown = ", ".join(unknown_examples[:5]) + (" ..." if unknown > 5 else "")
        warnings.append(f"{unknown} prediction(s) have ids not in the annotations, ignored: {shown}")
    if duplicates:
        shown = ", ".join(duplicate_examples[:5]) + (" ..." if duplicates > 5 else "")
        warnings.append(f"{duplicates} duplicate prediction id(s), the first of each kept: {shown}")
    return paired, counts, warnings


def _check_pred_sizes(src: _Source, pred: _Prediction, size: Sequence[int] | None) -> None:
    if size is None:
        return
    for k, m in enumerate(pred.masks):
        if list(m["size"]) != list(size):
            raise src.error(
                pred.line,
                f"field 'masks'[{k}] has size {list(m['size'])} but the annotation's masks are {list(size)}",
            )


# --------------------------------------------------------------------------------------------------
# Per-task scoring
# --------------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _by_qtype(anns: Sequence[_Annotation], columns: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """Per-question-type means of each score column, for annotations that carry a string 'qtype'."""
    groups: dict[str, list[int]] = {}
    for i, ann in enumerate(anns):
        qtype = ann.data.get("qtype")
        if isinstance(qtype, str):
            groups.setdefault(qtype, []).append(i)
    if not groups:
        return {}
    return {
        "qtype": {
            k: {**{name: _mean([col[i] for i in idx]) for name, col in columns.items()}, "n": len(idx)}
            for k, idx in sorted(groups.items())
        }
    }


def _vqa_accuracy(ann: _Annotation, pred: _Prediction | None) -> float:
    """Short-style questions use the official VQA accuracy. Long-style ones (asked without the
    response-format prompt, answered by a sentence) count as right when a normalised short answer
    appears in the normalised sentence as whole words: a rule of ours, as VQAv2 has no long answers."""
    if pred is None:
        return 0.0
    if ann.data.get("style") == "long":
        return metrics.answer_in_sentence(pred.text, ann.data["answers"])
    return metrics.vqa_accuracy(pred.text, ann.data["answers"])


def _score_vqa(anns: Sequence[_Annotation], preds: Sequence[_Prediction | None]) -> dict[str, Any]:
    acc = [_vqa_accuracy(a, p) for a, p in zip(anns, preds, strict=True)]
    em = [
        0.0 if p is None else metrics.exact_match(p.text, a.data["answers"])
        for a, p in zip(anns, preds, strict=True)
    ]
    return {
        "metrics": {"accuracy": _mean(acc), "exact_match": _mean(em)},
        "breakdown": _by_qtype(anns, {"accuracy": acc, "exact_match": em}),
    }


def _score_mc(anns: Sequence[_Annotation], preds: Sequence[_Prediction | None]) -> dict[str, Any]:
    letters = [
        None if p is None else metrics.extract_option_letter(p.text, a.data["options"])
        for a, p in zip(anns, preds, strict=True)
    ]
    correct = [float(letter == a.data["answer"]) for a, letter in zip(anns, letters, strict=True)]
    unanswered = [
        float(letter not in metrics.option_letters(len(a.data["options"])))
        for a, letter in zip(anns, letters, strict=True)
    ]
    return {
        "metrics": {"accuracy": _mean(correct), "no_answer": _mean(unanswered)},
        "breakdown": _by_qtype(anns, {"accuracy": correct, "no_answer": unanswered}),
    }


def _score_pope(anns: Sequence[_Annotation], preds: Sequence[_Prediction | None]) -> dict[str, Any]:
    texts = [None if p is None else p.text for p in preds]
    labels = [a.data["answer"] for a in anns]
    overall = metrics.pope_metrics(texts, labels)
    groups: dict[str, list[int]] = {}
    for i, ann in enumerate(anns):
        if "category" in ann.data:
            groups.setdefault(ann.data["category"], []).append(i)
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    out: dict[str, Any] = {"metrics": {k: overall[k] for k in keys}}
    if groups:
        out["breakdown"] = {
            "category": {
                cat: {
                    **{
                        k: v
                        for k, v in metrics.pope_metrics(
                            [texts[i] for i in idx], [labels[i] for i in idx]
                        ).items()
                        if k in keys
                    },
                    "n": len(idx),
                }
                for cat, idx in sorted(groups.items())
            }
        }
    return out


def _caption_part(
    texts: Sequence[str], refs: Sequence[Sequence[str]], meteor: bool
) -> tuple[dict[str, Any], list[str]]:
    result = metrics.caption_metrics(texts, refs, meteor=meteor)
    return {"cider": result["cider"], "meteor": result["meteor"]}, result["warnings"]


def _score_captions(
    anns: Sequence[_Annotation], preds: Sequence[_Prediction | None], meteor: bool
) -> dict[str, Any]:
    texts = ["" if p is None else p.text for p in preds]
    scores, warnings = _caption_part(texts, [a.data["answers"] for a in anns], meteor)
    return {"metrics": scores, "warnings": warnings}


def _score_seg(
    src: _Source, anns: Sequence[_Annotation], preds: Sequence[_Prediction | None]
) -> dict[str, Any]:
    pred_masks: list[dict[str, Any] | None] = []
    gt_masks: list[dict[str, Any]] = []
    extra = 0
    for ann, pred in zip(anns, preds, strict=True):
        gts = ann.data["masks"]
        if pred is not None:
            _check_pred_sizes(src, pred, gts[0]["size"])
            extra += max(0, len(pred.masks) - len(gts))
        for k, gt in enumerate(gts):
            gt_masks.append(gt)
            pred_masks.append(pred.masks[k] if pred is not None and k < len(pred.masks) else None)
    result = metrics.segmentation_metrics(pred_masks, gt_masks)
    out: dict[str, Any] = {
        "metrics": {"ciou": result["ciou"], "giou": result["giou"], "precision@0.5": result["precision@0.5"]}
    }
    empty = sum(m is None for m in pred_masks)
    warnings = []
    if empty:
        warnings.append(f"{empty} ground-truth mask(s) had no predicted mask, scored against an empty mask")
    if extra:
        warnings.append(
            f"{extra} predicted mask(s) beyond the annotation's masks were ignored (masks pair by order)"
        )
    out["warnings"] = warnings
    return out


def _score_region_caption(
    anns: Sequence[_Annotation], preds: Sequence[_Prediction | None], meteor: bool
) -> dict[str, Any]:
    texts = ["" if p is None else p.text for p in preds]
    scores, warnings = _caption_part(texts, [a.data["answers"] for a in anns], meteor)
    attrs = metrics.attribute_accuracy(
        [None if p is None else p.text for p in preds], [a.data.get("attributes", {}) for a in anns]
    )
    scores["attribute_accuracy"] = attrs["mean"]
    breakdown = {
        "attribute": {
            k: {"accuracy": v, "n": attrs["n"][k]} for k, v in sorted(attrs["per_attribute"].items())
        }
    }
    return {"metrics": scores, "breakdown": breakdown, "warnings": warnings}


def _score_gcg(
    src: _Source, anns: Sequence[_Annotation], preds: Sequence[_Prediction | None], meteor: bool
) -> dict[str, Any]:
    pred_masks: list[list[dict[str, Any]]] = []
    pred_phrases: list[list[str]] = []
    texts: list[str] = []
    for ann, pred in zip(anns, preds, strict=True):
        gts = ann.data["masks"]
        if pred is None:
            pred_masks.append([])
            pred_phrases.append([])
            texts.append("")
            continue
        _check_pred_sizes(src, pred, gts[0]["size"] if gts else None)
        pred_masks.append(pred.masks)
        pred_phrases.append(
            pred.phrases if pred.phrases is not None else metrics.extract_gcg_phrases(pred.text)
        )
        texts.append(metrics.strip_gcg_markup(pred.text))
    gt_masks = [a.data["masks"] for a in anns]
    scores: dict[str, Any] = {
        "ap50": metrics.gcg_ap50(pred_masks, gt_masks),
        "miou": metrics.gcg_miou(pred_masks, gt_masks),
        "miou_per_gt": metrics.gcg_miou(pred_masks, gt_masks, per_gt=True),
        "recall": metrics.gcg_recall(pred_masks, pred_phrases, gt_masks, [a.data["phrases"] for a in anns]),
    }
    caption_scores, warnings = _caption_part(texts, [a.data["answers"] for a in anns], meteor)
    scores.update(caption_scores)
    return {"metrics": scores, "warnings": warnings}


def _score(
    task: str,
    pred_src: _Source,
    pred_records: Iterable[tuple[int, Any]],
    ann_src: _Source,
    ann_records: Iterable[tuple[int, Any]],
    meteor: bool,
) -> dict[str, Any]:
    if task not in TASKS:
        raise UnillavaError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    anns = _load_annotations(task, ann_src, ann_records)
    preds, counts, warnings = _pair(task, pred_src, pred_records, anns)
    if task in VQA_TASKS:
        part = _score_vqa(anns, preds)
    elif task == "mc":
        part = _score_mc(anns, preds)
    elif task == "pope":
        part = _score_pope(anns, preds)
    elif task in CAPTION_TASKS:
        part = _score_captions(anns, preds, meteor)
    elif task in SEG_TASKS:
        part = _score_seg(pred_src, anns, preds)
    elif task == "region_caption":
        part = _score_region_caption(anns, preds, meteor)
    else:
        part = _score_gcg(pred_src, anns, preds, meteor)
    return {
        "task": task,
        "metrics": part["metrics"],
        "breakdown": part.get("breakdown", {}),
        "counts": counts,
        "warnings": warnings + part.get("warnings", []),
    }


def score_task(
    task: str,
    predictions: Sequence[Mapping[str, Any]],
    annotations: Sequence[Mapping[str, Any]],
    *,
    meteor: bool = True,
) -> dict[str, Any]:
    """Score in-memory prediction and annotation records (as parsed from their JSONL lines).

    Returns {"task", "metrics": {name: value}, "breakdown": {group: {key: {...}}},
    "counts": {"annotations", "predictions", "missing", "unknown", "duplicates"}, "warnings": [...]}.
    Fractions are in [0, 1]; CIDEr is on its usual 0-10 scale. meteor=False skips the METEOR jar.
    Errors name "predictions"/"annotations" and the 1-based record index as the line.
    """
    return _score(
        task,
        _Source("predictions"),
        enumerate(predictions, start=1),
        _Source("annotations"),
        enumerate(annotations, start=1),
        meteor,
    )


def score_files(
    task: str, pred_path: str | Path, ann_path: str | Path, *, meteor: bool = True
) -> dict[str, Any]:
    """Score a prediction JSONL against an annotation JSONL (or a ``tasks/{split}/`` directory)."""
    ann_file = resolve_annotation_path(task, ann_path)
    results = _score(
        task,
        _Source(str(pred_path)),
        read_jsonl(pred_path),
        _Source(str(ann_file)),
        read_jsonl(ann_file),
        meteor,
    )
    results["pred_file"] = str(pred_path)
    results["ann_file"] = str(ann_file)
    return results


def score_records(
    task: str,
    predictions: Iterable[tuple[int, Any]],
    annotations: Iterable[tuple[int, Any]],
    *,
    pred_source: str,
    ann_source: str,
    meteor: bool = True,
) -> dict[str, Any]:
    """Score (line number, record) pairs that a loader has already read (the runner's shapes tasks), so
    errors still name the file and line they came from; returns what `score_task` returns."""
    return _score(task, _Source(pred_source), predictions, _Source(ann_source), annotations, meteor)


def check_annotation(task: str, record: Any, source: str, line: int) -> None:
    """DataError ("SOURCE line N: ...") if one annotation record cannot be scored as `task`: lets a loader
    list bad records before any question is asked instead of failing after all of them were answered."""
    if task not in TASKS:
        raise UnillavaError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    src = _Source(source)
    if not isinstance(record, dict):
        raise src.error(line, f"expected a JSON object, got {type(record).__name__}")
    _id(src, line, record)
    _check_annotation(task, src, line, dict(record))


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def results_table(results: Mapping[str, Any]) -> Table:
    """A rich table of the metrics, the breakdowns (one row per group) and the id counts."""
    table = Table(title=f"unillava score: {results['task']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in results["metrics"].items():
        table.add_row(name, _fmt(value))
    for group, entries in results.get("breakdown", {}).items():
        table.add_section()
        for key, values in entries.items():
            n = values.get("n")
            for name, value in values.items():
                if name != "n":
                    table.add_row(
                        f"{group}={key} {name}" + (f" (n={n})" if n is not None else ""), _fmt(value)
                    )
    table.add_section()
    for name, value in results["counts"].items():
        table.add_row(f"count {name}", str(value))
    return table


def write_results(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    """Write ``out_dir/results_{task}.json`` and return its path."""
    out = Path(out_dir)
    path = out / f"results_{results['task']}.json"
    try:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as err:
        raise UnillavaError(f"{path}: cannot write results ({err.strerror or err})") from None
    return path
