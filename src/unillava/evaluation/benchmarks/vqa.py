"""Open-ended VQA benchmarks: VQAv2, GQA, VizWiz, TextVQA (VQA accuracy / exact match) and DocVQA (ANLS).

Each scorer reproduces the tool the papers' numbers came from: LLaVA's EvalAI answer processing then
vqaEval.py (VQAv2, VizWiz), LLaVA's m4c TextVQAAccuracyEvaluator (TextVQA), LLaVA's GQA converter then
GQA's eval.py (GQA), and the Robust Reading Competition's DocVQA script (ANLS).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
    first_existing,
    get_id,
    get_str,
    group_means,
    image_dir,
    json_records,
    keyed_records,
    mean,
    read_json,
    read_json_object,
    split_mismatch,
    texts,
    where,
    with_prompt,
    write_json,
)
from unillava.evaluation.benchmarks.common import answer_strings, attach_answers, dedupe, llava_questions
from unillava.prompts import PROMPT_SHORT, PROMPT_UNANSWERABLE

evalai_answer = metrics.evalai_answer


def _vqa_scores(
    items: Sequence[Item],
    predictions: Mapping[str, Prediction],
    group: str | None,
    accuracy: Callable[[str, Sequence[str]], float],
) -> dict[str, Any]:
    preds = texts(items, predictions)
    acc = [
        0.0 if p is None else accuracy(p, item.answer["answers"])
        for item, p in zip(items, preds, strict=True)
    ]
    out: dict[str, Any] = {"metrics": {"accuracy": mean(acc)}, "breakdown": {}}
    if group:
        out["breakdown"][group] = group_means([item.answer.get(group) for item in items], {"accuracy": acc})
    return out


# --------------------------------------------------------------------------------------------------
# VQAv2
# --------------------------------------------------------------------------------------------------


class VQAv2(Benchmark):
    name = "vqav2"
    title = "VQAv2"
    dirs = ("vqav2", "VQAv2")
    columns = (Column("accuracy", "VQAv2"),)
    download = (
        "test-dev (the paper's split, scored by the EvalAI server): LLaVA's `llava_vqav2_mscoco_test-dev2015.jsonl` "
        "and `llava_vqav2_mscoco_test2015.jsonl` (from LLaVA's eval.zip) plus COCO `test2015/` images. "
        "val (scored locally): `v2_OpenEnded_mscoco_val2014_questions.json`, `v2_mscoco_val2014_annotations.json` "
        "and COCO `val2014/` images, from visualqa.org."
    )
    metric_note = (
        "VQA accuracy as LLaVA's numbers were made: the answer through LLaVA's EvalAIAnswerProcessor, then "
        "vqaEval.py master (min(#other humans that agree / 3, 1), averaged over the 10 leave-one-out subsets)"
    )

    LLAVA = {"test-dev": "llava_vqav2_mscoco_test-dev2015.jsonl", "test": "llava_vqav2_mscoco_test2015.jsonl"}

    def recognises(self, root: Path) -> bool:
        return any((root / f).is_file() for f in self.LLAVA.values()) or any(
            root.glob("v2_OpenEnded_mscoco_*_questions.json")
        )

    def load(self, root: Path, split: str | None = None) -> LoadResult:
        if split is None:
            split = "test-dev" if (root / self.LLAVA["test-dev"]).is_file() else "val"
        problems = Problems()
        llava_file = root / self.LLAVA.get(split, "")
        if split in self.LLAVA and llava_file.is_file():
            images = image_dir(root, ("test2015",))
            items = dedupe(llava_questions(llava_file, images, [PROMPT_SHORT], problems), problems)
            return LoadResult(
                items,
                split,
                problems.messages,
                [f"{split}: answers are not public; scored by the EvalAI server"],
            )
        subtype = f"{split}2015" if split.startswith("test") else f"{split}2014"
        q_path = root / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
        if not q_path.is_file():
            raise DataError(f"{root}: no {q_path.name} (or LLaVA question file) for split {split!r}")
        questions = read_json(q_path)
        if isinstance(questions, dict) and questions.get("data_subtype", subtype) != subtype:
            raise split_mismatch(q_path, "data_subtype", questions["data_subtype"], subtype)
        images = image_dir(root, (subtype.replace("test-dev", "test"), "images"))
        items = []
        for number, q in json_records(q_path, questions, problems, "questions"):
            at = where(q_path, number, "record")
            qid = get_id(q, ("question_id",), at, problems)
            text = get_str(q, "question", at, problems)
            image_id = q.get("image_id")
            if not isinstance(image_id, int) or isinstance(image_id, bool):
                problems.add(at, "field 'image_id' must be an integer")
                continue
            if qid is None or text is None:
                continue
            folder = subtype.replace("test-dev", "test")
            items.append(
                Item(
                    qid,
                    with_prompt(text, PROMPT_SHORT),
                    [images / f"COCO_{folder}_{image_id:012d}.jpg"],
                    meta={"at": at, "question_id": q["question_id"]},
                )
            )
        items = dedupe(items, problems)
        a_path = root / f"v2_mscoco_{subtype}_annotations.json"
        if not a_path.is_file():
            return LoadResult(
                items, split, problems.messages, [f"no {a_path.name}: predictions only, no score"]
            )
        anns = read_json(a_path)
        if isinstance(anns, dict) and anns.get("data_subtype", subtype) != subtype:
            raise split_mismatch(a_path, "data_subtype", anns["data_subtype"], subtype)
        answers: dict[str, Any] = {}
        for number, ann in json_records(a_path, anns, problems, "annotations"):
            at = where(a_path, number, "record")
            qid = get_id(ann, ("question_id",), at, problems)
            strings = answer_strings(ann.get("answers"))
            if strings is None:
                problems.add(at, "field 'answers' must be a non-empty list of {'answer': str}")
                continue
            if qid is not None:
                answers[qid] = {"answers": strings, "answer_type": ann.get("answer_type")}
        return LoadResult(attach_answers(items, answers, a_path, problems), split, problems.messages)

    def score(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], *, meteor: bool = True
    ) -> dict[str, Any]:
        """metrics.llava_vqav2_accuracy per question; per answer type in the breakdown."""
        return _vqa_scores(items, predictions, "answer_type", metrics.llava_vqav2_accuracy)

    def write_submission(
        self,
        items: Sequence[Item],
        predictions: Mapping[str, Prediction],
        out_dir: Path,
        split: str,
        root: Path,
    ) -> list[Path]:
        """EvalAI's JSON list [{"question_id", "answer"}]; for test-dev it covers every test2015 question
        (the server requires them all), with "" where there is no prediction."""
        by_qid = {item.meta["question_id"]: predictions.get(item.id) for item in items}
        full = root / self.LLAVA["test"]
        rows: list[dict[str, Any]] = []
        if split == "test-dev" and full.is_file():
            problems = Problems()
            for item in llava_questions(full, full.parent, [], problems):
                pred = by_qid.get(item.meta["question_id"])
                rows.append(
                    {
                        "question_id": item.meta["question_id"],
                        "answer": evalai_answer(pred.text) if pred else "",
                    }
                )
        else:
            for qid, pred in by_qid.items():
                rows.append({"question_id": qid, "answer": evalai_answer(pred.text) if pred else ""})
        return [write_json(out_dir / f"vqav2_{split}_submission.json", rows)]


# --------------------------------------------------------------------------------------------------
# GQA
# --------------------------------------------------------------------------------------------------


def gqa_prediction(text: str) -> str:
    """The prediction LLaVA's scripts/convert_gqa_for_eval.py (commit ce1aa08) writes for GQA's eval.py:
    trailing periods removed, then lower-cased; nothing else (no whitespace stripping)."""
    return text.rstrip(".").lower()


def gqa_correct(text: str, answer: str) -> bool:
    """GQA eval.py (v1.2, gqadataset.org eval.zip): `predicted == gold`, exact string equality with the
    question's answer, applied to gqa_prediction(text)."""
    return gqa_prediction(text) == answer


class GQA(Benchmark):
    name = "gqa"
    title = "GQA"
    dirs = ("gqa", "GQA")
    columns = (Column("accuracy", "GQA"),)
    default_split = "testdev"
    download = (
        "`testdev_balanced_questions.json` (GQA questions 1.2, which carry the answers) and the GQA images in "
        "`images/` (or LLaVA's `data/images/`); LLaVA's `llava_gqa_testdev_balanced.jsonl` is used for the prompts if present."
    )
    metric_note = (
        "accuracy over the balanced questions: LLaVA's convert_gqa_for_eval.py (trailing periods dropped, "
        "lower-cased), then GQA eval.py's exact string equality with the answer"
    )

    def recognises(self, root: Path) -> bool:
        return any(root.glob("*_balanced_questions.json")) or any(root.glob("data/*_balanced_questions.json"))

    def load(self, root: Path, split: str | None = None) -> LoadResult:
        split = split or self.default_split or "testdev"
        problems = Problems()
        images = image_dir(root, ("data/images", "images"))
        q_path = first_existing(
            root, [f"{split}_balanced_questions.json", f"data/{split}_balanced_questions.json"]
        )
        if q_path is None:
            raise DataError(
                f"{root}: no {split}_balanced_questions.json (GQA's question file holds the answers; "
                "also looked in data/)"
            )
        raw = read_json_object(q_path, "mapping question ids to questions")
        answers: dict[str, Any] = {}
        built: list[Item] = []
        for at, qid, q in keyed_records(q_path, raw, problems):
            answer = get_str(q, "answer", at, problems)
            question = get_str(q, "question", at, problems)
            image_id = get_id(q, ("imageId",), at, problems)
            if answer is None or question is None or image_id is None:
                continue
            structural = q.get("types", {}).get("structural") if isinstance(q.get("types"), dict) else None
            answers[qid] = {
                "answer": answer,
                "structural": structural,
                "balanced": q.get("isBalanced", True) is not False,
            }
            built.append(
                Item(qid, with_prompt(question, PROMPT_SHORT), [images / f"{image_id}.jpg"], meta={"at": at})
            )
        llava_file = root / f"llava_gqa_{split}_balanced.jsonl"
        if llava_file.is_file():
            items = dedupe(llava_questions(llava_file, images, [PROMPT_SHORT], problems), problems)
            items = attach_answers(items, answers, q_path, problems)
        else:
            items = [item for item in built if item.id in answers]
            for item in items:
                item.answer = answers[item.id]
        return LoadResult(items, split, problems.messages)

    def score(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], *, meteor: bool = True
    ) -> dict[str, Any]:
        """GQA eval.py's accuracy: only questions with isBalanced count (a question without the field is
        taken as balanced); "binary"/"open" (structural type "query") and per structural type as eval.py."""
        balanced = [item for item in items if item.answer.get("balanced", True)]
        preds = texts(balanced, predictions)
        hits = [
            float(p is not None and gqa_correct(p, item.answer["answer"]))
            for item, p in zip(balanced, preds, strict=True)
        ]
        kinds = [
            None
            if i.answer.get("structural") is None
            else "open"
            if i.answer["structural"] == "query"
            else "binary"
            for i in balanced
        ]
        out: dict[str, Any] = {
            "metrics": {"accuracy": mean(hits)},
            "breakdown": {
                "structural": group_means([i.answer.get("structural") for i in balanced], {"accuracy": hits}),
                "answer_type": group_means(kinds, {"accuracy": hits}),
            },
        }
        if len(balanced) < len(items):
            out["warnings"] = [
                f"{len(items) - len(balanced)} question(s) are not balanced (isBalanced false) and are "
                "not scored, as in GQA's eval.py"
            ]
        return out

    def write_submission(
        self,
        items: Sequence[Item],
        predictions: Mapping[str, Prediction],
        out_dir: Path,
        split: str,
        root: Path,
    ) -> list[Path]:
        """GQA eval.py's prediction list [{"questionId", "prediction"}]."""
        rows = [
            {
                "questionId": item.id,
                "prediction": gqa_prediction(p.text) if (p := predictions.get(item.id)) else "",
            }
            for item in items
        ]
        return [write_json(out_dir / f"{split}_balanced_predictions.json", rows)]


# --------------------------------------------------------------------------------------------------
# VizWiz
# --------------------------------------------------------------------------------------------------


class VizWiz(Benchmark):
    name = "vizwiz"
    title = "VizWiz"
    dirs = ("vizwiz", "VizWiz")
    columns = (Column("accuracy", "VizWiz"),)
    download = (
        "test (the paper's split, scored by the EvalAI server): `test.json` from vizwiz.org (or LLaVA's `llava_test.jsonl`) "
        "and the `test/` images. val (scored locally): `val.json` and `val/` images."
    )
    metric_note = (
        "VQA accuracy over the 10 VizWiz answers, by the VQAv2 pipeline: LLaVA's EvalAIAnswerProcessor on "
        "the answer, then vqaEval.py master"
    )

    def recognises(self, root: Path) -> bool:
        return any((root / f).is_file() for f in ("val.json", "test.json", "llava_test.jsonl"))

    def load(self, root: Path, split: str | None = None) -> LoadResult:
        if split is None:
            split = (
                "test" if (root / "test.json").is_file() or (root / "llava_test.jsonl").is_file() else "val"
            )
        problems = Problems()
        images = image_dir(root, (split,))
        suffixes = [PROMPT_UNANSWERABLE, PROMPT_SHORT]
        llava_file = root / f"llava_{split}.jsonl"
        if llava_file.is_file():
            items = dedupe(llava_questions(llava_file, images, suffixes, problems), problems)
            notes = ["answers are not public; scored by the EvalAI server"] if split == "test" else []
            return LoadResult(items, split, problems.messages, notes)
        path = root / f"{split}.json"
        if not path.is_file():
            raise DataError(f"{root}: no {path.name} or llava_{split}.jsonl for split {split!r}")
        items = []
        for number, q in json_records(path, read_json(path), problems):
            at = where(path, number, "record")
            image = get_id(q, ("image",), at, problems)
            question = get_str(q, "question", at, problems)
            if image is None or question is None:
                continue
            if image.startswith("VizWiz_") and not image.startswith(f"VizWiz_{split}_"):
                raise split_mismatch(path, "image", image, split)
            answer = None
            if "answers" in q:
                strings = answer_strings(q["answers"])
                if strings is None:
                    problems.add(at, "field 'answers' must be a non-empty list of {'answer': str}")
                    continue
                answer = {"answers": strings, "answer_type": q.get("answer_type")}
            items.append(
                Item(
                    image,
                    with_prompt(question, *suffixes),
                    [images / image],
                    answer,
                    {"at": at, "image": image},
                )
            )
        return LoadResult(dedupe(items, problems), split, problems.messages)

    def score(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], *, meteor: bool = True
    ) -> dict[str, Any]:
        return _vqa_scores(items, predictions, "answer_type", metrics.llava_vqav2_accuracy)

    def write_submission(
        self,
        items: Sequence[Item],
        predictions: Mapping[str, Prediction],
        out_dir: Path,
        split: str,
        root: Path,
    ) -> list[Path]:
        """EvalAI's VizWiz list [{"image", "answer"}]."""
        rows = [
            {
                "image": item.meta.get("image") or item.id,
                "answer": evalai_answer(p.text) if (p := predictions.get(item.id)) else "",
            }
            for item in items
        ]
        return [write_json(out_dir / f"vizwiz_{split}_submission.json", rows)]


# --------------------------------------------------------------------------------------------------
# TextVQA
# --------------------------------------------------------------------------------------------------


class TextVQA(Benchmark):
    name = "textvqa"
    title = "TextVQA"
    dirs = ("textvqa", "TextVQA")
    columns = (Column("accuracy", "TextVQA"),)
    default_split = "val"
    download = (
        "`TextVQA_0.5.1_val.json` and `train_images/` (val images live there) from textvqa.org; LLaVA-1.5's "
        "prompts with OCR tokens come from `llava_textvqa_val_v051_ocr.jsonl` (LLaVA eval.zip) if present."
    )
    metric_note = (
        "VQA accuracy by LLaVA's m4c_evaluator.TextVQAAccuracyEvaluator: EvalAIAnswerProcessor on the answer "
        "and on every human answer, then the 10 leave-one-out subsets"
    )

    def recognises(self, root: Path) -> bool:
        return any(root.glob("TextVQA_0.5.1_*.json"))

    def load(self, root: Path, split: str | None = None) -> LoadResult:
        split = split or "val"
        problems = Problems()
        path = root / f"TextVQA_0.5.1_{split}.json"
        if not path.is_file():
            raise DataError(f"{root}: no {path.name}")
        raw = read_json(path)
        if isinstance(raw, dict) and raw.get("dataset_split", split) != split:
            raise split_mismatch(path, "dataset_split", raw["dataset_split"], split)
        images = image_dir(root, ("test_images",) if split == "test" else ("train_images",))
        items, answers = [], {}
        for number, q in json_records(path, raw, problems, "data"):
            at = where(path, number, "record")
            qid = get_id(q, ("question_id",), at, problems)
            question = get_str(q, "question", at, problems)
            image_id = get_id(q, ("image_id",), at, problems)
            if qid is None or question is None or image_id is None:
                continue
            if "answers" in q:
                strings = answer_strings(q["answers"])
                if strings is None:
                    problems.add(at, "field 'answers' must be a non-empty list of strings")
                    continue
                answers[qid] = {"answers": strings}
            items.append(
                Item(qid, with_prompt(question, PROMPT_SHORT), [images / f"{image_id}.jpg"], meta={"at": at})
            )
        llava_file = root / f"llava_textvqa_{split}_v051_ocr.jsonl"
        notes = []
        if llava_file.is_file():
            items = llava_questions(llava_file, images, [PROMPT_SHORT], problems)
            notes.append(f"prompts from {llava_file.name} (with reference OCR tokens, as LLaVA-1.5)")
        items = dedupe(items, problems)
        if answers:
            items = attach_answers(items, answers, path, problems)
        return LoadResult(items, split, problems.messages, notes)

    def score(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], *, meteor: bool = True
    ) -> dict[str, Any]:
        return _vqa_scores(items, predictions, None, metrics.textvqa_accuracy)

    def write_submission(
        self,
        items: Sequence[Item],
        predictions: Mapping[str, Prediction],
        out_dir: Path,
        split: str,
        root: Path,
    ) -> list[Path]:
        rows = [
            {
                "question_id": item.meta.get("question_id", item.id),
                "answer": evalai_answer(p.text) if (p := predictions.get(item.id)) else "",
            }
            for item in items
        ]
        return [write_json(out_dir / f"textvqa_{split}_submission.json", rows)]


# --------------------------------------------------------------------------------------------------
# DocVQA (ANLS)
# --------------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """ANLS of one answer exactly as the Robust Reading Competition's DocVQA script computes it
    (evaluate_method of the Task 1 script from rrc.cvc.uab.es/?ch=17, the same code as its InfographicVQA
    script): DocVQA's leaderboard numbers come from it.

    The edit distance is taken between the answers lower-cased, stripped and with whitespace runs
    collapsed, but it is divided by the longer of the *raw* strings' lengths after upper-casing (so
    surrounding or doubled spaces lengthen the denominator, and "ß" counts 2); a raw length of 0 gives
    NL 0. The score is 1 - the smallest NL over the ground truths, set to 0 when it is below `threshold`
    (so NL exactly 0.5 keeps 0.5).
    """
    if not answers:
        raise ValueError("anls needs at least one ground-truth answer")
    det = " ".join(prediction.strip().lower().split())
    values = []
    for answer in answers:
        gt = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else float(levenshtein(gt, det)) / float(length))
    result = 1 - min(values)
    return 0.0 if result < threshold else result


class DocVQA(Benchmark):
    name = "docvqa"
    title = "DocVQA"
    dirs = ("docvqa", "DocVQA")
    columns = (Column("anls", "DocVQA"),)
    default_split = "val"
    download = (
        "Single Document VQA from rrc.cvc.uab.es (DocVQA): `val_v1.0.json` (or `val_v1.0_withQT.json`) with its "
        "`documents/` folder, in the benchmark directory or its `val/` sub-directory; `test_v1.0.json` for a "
        "server submission."
    )
    metric_note = (
        "ANLS with threshold 0.5 (the RRC DocVQA script: distance on cleaned answers over raw lengths)"
    )

    def recognises(self, root: Path) -> bool:
        return any(root.glob("*_v1.0*.json")) or any(root.glob("*/*_v1.0*.json"))

    def load(self, root: Path, split: str | None = None) -> LoadResult:
        split = split or "val"
        problems = Problems()
        names = [f"{split}_v1.0_withQT.json", f"{split}_v1.0.json"]
        path = first_existing(root, names) or first_existing(root / split, names)
        if path is None:
            raise DataError(f"{root}: no {' or '.join(names)} (also looked in {root / split})")
        raw = read_json(path)
        if isinstance(raw, dict) and raw.get("dataset_split", split) != split:
            raise split_mismatch(path, "dataset_split", raw["dataset_split"], split)
        items = []
        for number, q in json_records(path, raw, problems, "data"):
            at = where(path, number, "record")
            qid = get_id(q, ("questionId", "question_id"), at, problems)
            question = get_str(q, "question", at, problems)
            image = get_str(q, "image", at, problems)
            if qid is None or question is None or image is None:
                continue
            answer = None
            if "answers" in q:
                strings = answer_strings(q["answers"])
                if strings is None:
                    problems.add(at, "field 'answers' must be a non-empty list of strings")
                    continue
                answer = {"answers": strings, "question_types": q.get("question_types")}
            items.append(
                Item(
                    qid,
                    with_prompt(question, PROMPT_SHORT),
                    [path.parent / image],
                    answer,
                    {"at": at, "question_id": q.get("questionId", q.get("question_id"))},
                )
            )
        return LoadResult(dedupe(items, problems), split, problems.messages)

    def score(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], *, meteor: bool = True
    ) -> dict[str, Any]:
        preds = texts(items, predictions)
        values = [
            0.0 if p is None else anls(p, item.answer["answers"])
            for item, p in zip(items, preds, strict=True)
        ]
        return {"metrics": {"anls": mean(values)}, "breakdown": {}}

    def write_submission(
        self,
        items: Sequence[Item],
        predictions: Mapping[str, Prediction],
        out_dir: Path,
        split: str,
        root: Path,
    ) -> list[Path]:
        """The RRC server's list [{"questionId", "answer"}]."""
        rows = [
            {
                "questionId": item.meta.get("question_id", item.id),
                "answer": p.text if (p := predictions.get(item.id)) else "",
            }
            for item in items
        ]
        return [write_json(out_dir / f"docvqa_{split}_submission.json", rows)]
