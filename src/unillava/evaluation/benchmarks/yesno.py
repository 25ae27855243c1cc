"""Yes/no benchmarks: POPE (per-split accuracy, precision, recall, F1, yes-ratio) and MME (acc + acc+ sums)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unillava.errors import DataError
from unillava.evaluation import metrics
from unillava.evaluation.benchmarks.base import (
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
from unillava.prompts import PROMPT_SHORT

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
                items.append(
                    Item(
                        f"{category}-{qid}",
                        with_prompt(text, PROMPT_SHORT),
                        [images / image],
                        {"label": label.strip().lower(), "category": category},
                        {"at": at},
                    )
                )
        notes = [f"split file(s) not found, skipped: {', '.join(missing)}"] if missing else []
        return LoadResult(dedupe(items, problems), split or "all", problems.messages, notes)

    def score(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], *, meteor: bool = True
    ) -> dict[str, Any]:
        preds = texts(items, predictions)
        per: dict[str, dict[str, Any]] = {}
        for category in POPE_SPLITS:
            idx = [i for i, item in enumerate(items) if item.answer["category"] == category]
            if idx:
                result = metrics.pope_metrics(
                    [preds[i] for i in idx], [items[i].answer["label"] for i in idx]
                )
                per[category] = {**{k: result[k] for k in POPE_KEYS}, "n": len(idx)}
        averaged = {k: mean([v[k] for v in per.values()]) for k in POPE_KEYS}
        return {"metrics": averaged, "breakdown": {"split": per}}


# --------------------------------------------------------------------------------------------------
# MME
# --------------------------------------------------------------------------------------------------

MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")


def mme_answer(text: str) -> str:
    """calculation.py's reading of an answer: "yes", "no" or "other" (always wrong).

    LLaVA's convert_answer_to_mme.py (in LLaVA's eval.zip; a copy is in haotian-liu/LLaVA PR #1279,
    commit 5c134a5) writes the raw answer as the last field of a tab-separated line,
    and calculation.py (MME eval_tool, BradyFU/Awesome-Multimodal-Large-Language-Models, Evaluation
    branch, tools/eval_tool.zip of commit 1c1d69e) splits the line it read, newline included, and only
    lower-cases the field. So the field is never exactly "yes"/"no"; the label is "yes" if "yes" occurs
    in its first four characters, else "no" if "no" does: "Not sure", "Nope" and "Know" read as no,
    "Eyes" as yes, while "I think yes" and "  yes" (two leading spaces) are other.
    """
    field = (text + "\n").lower()
    if field in ("yes", "no"):
        return field
    prefix = field[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_line_breaks(text: str) -> bool:
    """Whether an answer would break LLaVA's converted line (a tab, or a newline in either convention,
    which text-mode reading turns into a line end); calculation.py then stops with an unpacking error."""
    return any(ch in text for ch in "\t\n\r")


def mme_scores(tasks: Sequence[str], correct: Sequence[bool]) -> dict[str, dict[str, float]]:
    """Per subtask: acc, acc_plus and score = acc + acc_plus (in %), exactly as calculation.py.

    calculation.py pairs the lines of a subtask file two by two in file order ("one image corresponds
    to two questions"), so acc+ is the share of consecutive pairs with both answers right and a
    subtask with an odd count has a last pair of one (the reference asserts there; here that pair can
    never count for acc+). acc is accuracy_score over the lines. score = acc*100 + acc_plus*100 in that
    order, as the script sums them.
    """
    lines: dict[str, list[bool]] = {}
    for task, ok in zip(tasks, correct, strict=True):
        lines.setdefault(task, []).append(bool(ok))
    out = {}
    for task, oks in lines.items():
        pairs = [oks[i : i + 2] for i in range(0, len(oks), 2)]
        acc = sum(oks) / len(oks)
        acc_plus = sum(len(pair) == 2 and all(pair) for pair in pairs) / len(pairs)
        score = 0.0
        score += acc * 100
        score += acc_plus * 100
        out[task] = {"acc": acc * 100, "acc_plus": acc_plus * 100, "score": score, "n": len(oks)}
    return out


class MME(Benchmark):
    name = "mme"
    title = "MME"
    dirs = ("MME/MME_Benchmark_release_version", "MME_Benchmark_release_version", "MME", "mme")
    columns = (Column("perception", "MME", scale=1.0),)
    default_split = "test"
    download = "`MME_Benchmark_release_version/` from the MME authors (BradyFU/Awesome-Multimodal-Large-Language-Models, Evaluation branch)."
    metric_note = (
        "MME calculation.py on LLaVA's converted lines: yes/no read from the first 4 characters; perception "
        "score = sum over the 10 perception subtasks of acc + acc+ (questions paired two by two, max 2000); "
        "cognition likewise over 4 subtasks (max 800)"
    )

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
            stems = (
                {p.stem: p for p in img_dir.iterdir() if p.suffix in _IMAGE_SUFFIXES}
                if img_dir.is_dir()
                else {}
            )
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
                    items.append(
                        Item(
                            f"{task}/{image.name}#{line}",
                            with_prompt(parts[0].strip(), PROMPT_SHORT),
                            [image],
                            {"answer": answer, "task": task, "image": image.name},
                            {"at": at},
                        )
                    )
        if not items and not problems.messages:
            raise DataError(
                f"{root}: no MME question files (<subtask>/*.txt or <subtask>/questions_answers_YN/*.txt)"
            )
        notes = [f"subtask folder(s) not found, left out of the sums: {', '.join(absent)}"] if absent else []
        return LoadResult(dedupe(items, problems), split or "test", problems.messages, notes)

    def score(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], *, meteor: bool = True
    ) -> dict[str, Any]:
        """calculation.py on the lines LLaVA's convert_answer_to_mme.py writes (items in question-file
        order, so each image's two questions are consecutive). A missing answer is a wrong line here
        (LLaVA's converter would leave the line out and shift the pairs after it). The perception and
        cognition sums run over the subtasks present, in calculation.py's order."""
        preds = texts(items, predictions)
        correct = [
            p is not None and mme_answer(p) == item.answer["answer"]
            for item, p in zip(items, preds, strict=True)
        ]
        per = mme_scores([i.answer["task"] for i in items], correct)
        perception = 0.0
        for task in MME_PERCEPTION:
            perception += per[task]["score"] if task in per else 0.0
        cognition = 0.0
        for task in MME_COGNITION:
            cognition += per[task]["score"] if task in per else 0.0
        warnings = []
        broken = sum(p is not None and mme_line_breaks(p) for p in preds)
        if broken:
            warnings.append(
                f"{broken} answer(s) hold a tab or line break: MME's calculation.py would stop on LLaVA's "
                "converted line; they are read as if the line were whole (only the first 4 characters count)"
            )
        odd = sorted(task for task, v in per.items() if v["n"] % 2)
        if odd:
            warnings.append(
                f"subtask(s) with an odd number of questions ({', '.join(odd)}): calculation.py pairs lines "
                "two by two and would stop; the last question forms a pair of one"
            )
        return {
            "metrics": {"perception": perception, "cognition": cognition, "total": perception + cognition},
            "breakdown": {"subtask": per},
            "warnings": warnings,
        }
