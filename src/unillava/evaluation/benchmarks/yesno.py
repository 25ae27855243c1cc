"""Yes/no benchmarks: POPE (per-split accuracy, precision, recall, F1, yes-ratio) and MME (acc + acc+ sums)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unillava.errors import DataError
from unillava.evaluation import metrics
from unillava.evaluation.benchmarks.base import (
    PROMPT_SHORT,
    Benchmark,
    Column,
    Item,
    LoadResult,
    Prediction,
    Problems,
    get_id,
    get_str,
    image_dir,
    mean,
    read_jsonl,
    read_text,
    texts,
    where,
    with_prompt,
)
from unillava.evaluation.benchmarks.common import dedupe

POPE_SPLITS = ("adversarial", "popular", "random")
POPE_KEYS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


class POPE(Benchmark):
    name = "pope"
    title = "POPE"
    dirs = ("pope", "POPE")
    columns = (Column("f1", "POPE"),)
    download = (
        "POPE's COCO files `coco/coco_pope_{adversarial,popular,random}.json` (github.com/RUCAIBox/POPE, also in "
        "LLaVA's eval.zip) and COCO `val2014/` images."
    )
    metric_note = "F1 with 'yes' as positive, averaged over the adversarial, popular and random splits (per-split accuracy, precision, recall, F1 and yes-ratio in the breakdown)"

    def _files(self, root: Path) -> dict[str, Path]:
        found = {}
        for split in POPE_SPLITS:
            for candidate in (root / "coco" / f"coco_pope_{split}.json", root / f"coco_pope_{split}.json"):
                if candidate.is_file():
                    found[split] = candidate
                    break
        return found

    def recognises(self, root: Path) -> bool:
        return bool(self._files(root))

    def load(self, root: Path, split: str | None = None) -> LoadResult:
        files = self._files(root)
        wanted = [split] if split and split != "all" else list(POPE_SPLITS)
        unknown = [s for s in wanted if s not in POPE_SPLITS]
        if unknown:
            raise DataError(f"POPE splits are {', '.join(POPE_SPLITS)} (or 'all'), not {unknown[0]!r}")
        missing = [s for s in wanted if s not in files]
        if len(missing) == len(wanted):
            raise DataError(f"{root}: no coco_pope_{{{','.join(wanted)}}}.json")
        problems = Problems()
        images = image_dir(root, ("val2014", "images"))
        items = []
        for category in wanted:
            if category not in files:
                continue
            path = files[category]
            for line, obj in read_jsonl(path, problems):
                at = where(path, line)
                qid = get_id(obj, ("question_id",), at, problems)
                text = get_str(obj, "text", at, problems)
                image = get_str(obj, "image", at, problems)
                label = obj.get("label")
                if isinstance(label, str) and label.strip().lower() not in ("yes", "no"):
                    problems.add(at, f"field 'label' must be 'yes' or 'no', got {label!r}")
                    continue
                if not isinstance(label, str):
                    problems.add(at, "field 'label' must be 'yes' or 'no'")
                    continue
                if qid is None or text is None or image is None:
                    continue
                items.append(Item(f"{category}-{qid}", with_prompt(text, PROMPT_SHORT), [images / image],
                                  {"label": label.strip().lower(), "category": category}, {"at": at}))
        notes = [f"split file(s) not found, skipped: {', '.join(missing)}"] if missing else []
        return LoadResult(dedupe(items, problems), split or "all", problems.messages, notes)

    def score(self, items: Sequence[Item], predictions: Mapping[str, Prediction], *, meteor: bool = True) -> dict[str, Any]:
        preds = texts(items, predictions)
        per: dict[str, dict[str, Any]] = {}
        for category in POPE_SPLITS:
            idx = [i for i, item in enumerate(items) if item.answer["category"] == category]
            if idx:
                result = metrics.pope_metrics([preds[i] for i in idx], [items[i].answer["label"] for i in idx])
                per[category] = {**{k: result[k] for k in POPE_KEYS}, "n": len(idx)}
        averaged = {k: mean([v[k] for v in per.values()]) for k in POPE_KEYS}
        return {"metrics": averaged, "breakdown": {"split": per}}


# --------------------------------------------------------------------------------------------------
# MME
# --------------------------------------------------------------------------------------------------

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")


def mme_answer(text: str) -> str:
    """MME calculation.py's reading of an answer: "yes", "no" or "other" (always wrong).

    Lower-cased, stripped and without periods; "yes"/"no" as such, else whichever of "yes" / "no"
    occurs in the first four characters ("yes" checked first).
    """
    t = text.lower().strip().replace(".", "")
    if t in ("yes", "no"):
        return t
    prefix = t[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_scores(tasks: Sequence[str], images: Sequence[str], correct: Sequence[bool]) -> dict[str, dict[str, float]]:
    """Per subtask: acc (% of questions right), acc_plus (% of images whose questions are all right) and
    score = acc + acc_plus, as MME's calculation.py."""
    by_task: dict[str, dict[str, list[bool]]] = {}
    for task, image, ok in zip(tasks, images, correct, strict=True):
        by_task.setdefault(task, {}).setdefault(image, []).append(bool(ok))
    out = {}
    for task, per_image in by_task.items():
        answers = [ok for oks in per_image.values() for ok in oks]
        acc = 100.0 * sum(answers) / len(answers)
        acc_plus = 100.0 * sum(all(oks) for oks in per_image.values()) / len(per_image)
        out[task] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "n": len(answers)}
    return out


class MME(Benchmark):
    name = "mme"
    title = "MME"
    dirs = ("MME/MME_Benchmark_release_version", "MME_Benchmark_release_version", "MME", "mme")
    columns = (Column("perception", "MME", scale=1.0),)
    default_split = "test"
    download = "`MME_Benchmark_release_version/` from the MME authors (BradyFU/Awesome-Multimodal-Large-Language-Models, Evaluation branch)."
    metric_note = "perception score = sum over the 10 perception subtasks of acc + acc+ (max 2000); cognition likewise over 4 subtasks (max 800)"

    def recognises(self, root: Path) -> bool:
        return sum((root / task).is_dir() for task in (*MME_PERCEPTION, *MME_COGNITION)) >= 1

    def load(self, root: Path, split: str | None = None) -> LoadResult:
        problems = Problems()
        items: list[Item] = []
        absent = []
        for task in (*MME_PERCEPTION, *MME_COGNITION):
            folder = root / task
            if not folder.is_dir():
                absent.append(task)
                continue
            if (folder / "questions_answers_YN").is_dir():
                qa_dir, img_dir = folder / "questions_answers_YN", folder / "images"
            else:
                qa_dir = img_dir = folder
            stems = {p.stem: p for p in img_dir.iterdir() if p.suffix in _IMAGE_SUFFIXES} if img_dir.is_dir() else {}
            for txt in sorted(qa_dir.glob("*.txt")):
                image = stems.get(txt.stem, img_dir / f"{txt.stem}.jpg")
                for line, raw in enumerate(read_text(txt).splitlines(), start=1):
                    if not raw.strip():
                        continue
                    at = where(txt, line)
                    parts = raw.split("\t")
                    if len(parts) < 2 or not parts[0].strip():
                        problems.add(at, "expected 'question<TAB>answer'")
                        continue
                    answer = parts[-1].strip().lower()
                    if answer not in ("yes", "no"):
                        problems.add(at, f"answer must be Yes or No, got {parts[-1].strip()!r}")
                        continue
                    items.append(Item(f"{task}/{image.name}#{line}", with_prompt(parts[0].strip(), PROMPT_SHORT), [image],
                                      {"answer": answer, "task": task, "image": image.name}, {"at": at}))
        if not items and not problems.messages:
            raise DataError(f"{root}: no MME question files (<subtask>/*.txt or <subtask>/questions_answers_YN/*.txt)")
        notes = [f"subtask folder(s) not found, left out of the sums: {', '.join(absent)}"] if absent else []
        return LoadResult(dedupe(items, problems), split or "test", problems.messages, notes)

    def score(self, items: Sequence[Item], predictions: Mapping[str, Prediction], *, meteor: bool = True) -> dict[str, Any]:
        preds = texts(items, predictions)
        correct = [p is not None and mme_answer(p) == item.answer["answer"] for item, p in zip(items, preds, strict=True)]
        per = mme_scores([i.answer["task"] for i in items], [i.answer["image"] for i in items], correct)
        perception = sum(v["score"] for k, v in per.items() if k in MME_PERCEPTION)
        cognition = sum(v["score"] for k, v in per.items() if k in MME_COGNITION)
        return {
            "metrics": {"perception": perception, "cognition": cognition, "total": perception + cognition},
            "breakdown": {"subtask": per},
        }
