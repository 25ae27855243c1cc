"""Multiple-choice benchmarks: ScienceQA-IMG, MMBench (+CN, circular), SEED-Bench, MMMU and RealWorldQA."""

from __future__ import annotations

import ast
import csv
import io
import json
import re
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from unillava.errors import DataError
from unillava.evaluation import metrics
from unillava.evaluation.benchmarks.base import (
    Benchmark,
    Column,
    EmbeddedImage,
    Item,
    LoadResult,
    Prediction,
    Problems,
    get_id,
    get_str,
    group_means,
    image_dir,
    json_records,
    mean,
    read_json,
    read_json_object,
    read_jsonl,
    read_text,
    split_mismatch,
    texts,
    where,
    with_prompt,
    write_json,
)
from unillava.evaluation.benchmarks.common import attach_answers, dedupe, llava_questions
from unillava.prompts import PROMPT_LETTER, PROMPT_LETTER_CN, PROMPT_SHORT

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def options_block(options: Sequence[str]) -> str:
    """ "A. first\\nB. second" -- the option layout of LLaVA's and lmms-eval's multiple-choice prompts."""
    return "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options))


# --------------------------------------------------------------------------------------------------
# ScienceQA-IMG
# --------------------------------------------------------------------------------------------------

SQA_OPTIONS = ("A", "B", "C", "D", "E")
SQA_FAILED = "FAILED"
# Transcribed as written: the "." after the group is any character but a newline, not a full stop.
_SQA_PATTERN = re.compile(r"The answer is ([A-Z]).")


def sqa_parse(text: str) -> str:
    """The answer LLaVA's llava/eval/eval_science_qa.py (commit ce1aa08, unchanged at c121f04) parses.

    The text is used exactly as given (no stripping): a bare option letter A-E; else a text of 3+
    characters starting with a letter A-E and ". "; else the one match of `The answer is ([A-Z]).`
    (any capital letter, followed by any character but a newline, so "The answer is B" at the very
    end does not match and two matches, even equal, fail). Otherwise "FAILED"; an empty text fails.
    """
    if text in SQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _SQA_PATTERN.findall(text)
    return found[0] if len(found) == 1 else SQA_FAILED


def sqa_choice_index(parsed: str, n_choices: int) -> int:
    """eval_science_qa.py's get_pred_idx: the parsed letter's index among the problem's choices (letters
    A-E only), -1 otherwise ("FAILED", a letter past the choices, F-Z); -1 never equals the answer."""
    allowed = SQA_OPTIONS[:n_choices]
    return allowed.index(parsed) if parsed in allowed else -1


class ScienceQA(Benchmark):
    name = "scienceqa"
    title = "SQA-IMG"
    dirs = ("scienceqa", "ScienceQA")
    columns = (Column("accuracy", "SQA-IMG"),)
    default_split = "test"
    download = (
        "ScienceQA's `problems.json` and `pid_splits.json` (github.com/lupantech/ScienceQA) and the test images in "
        "`images/test/<pid>/image.png` (or `test/`); LLaVA's `llava_test_CQM-A.json` is used for the prompts if present."
    )
    metric_note = (
        "accuracy on the test questions that have an image (LLaVA eval_science_qa.py: its parsing and regex "
        "on the raw answer; FAILED is wrong; no_answer = share of FAILED)"
    )

    def recognises(self, root: Path) -> bool:
        return (root / "problems.json").is_file()

    def load(self, root: Path, split: str | None = None) -> LoadResult:
        split = split or "test"
        problems = Problems()
        p_path, s_path = root / "problems.json", root / "pid_splits.json"
        data = read_json_object(p_path, "mapping problem ids to problems")
        splits = read_json(s_path) if s_path.is_file() else None
        if splits is not None and (not isinstance(splits, dict) or not isinstance(splits.get(split), list)):
            raise DataError(f"{s_path}: no list for split {split!r}")
        pids = (
            [str(p) for p in splits[split]]
            if splits is not None
            else [k for k, v in data.items() if isinstance(v, dict) and v.get("split") == split]
        )
        images = image_dir(root, (f"images/{split}", split))
        llava_prompts = self._llava_prompts(root, split, problems)
        items = []
        for number, pid in enumerate(pids, start=1):
            at = f"{s_path} {split}[{number - 1}] (problem {pid!r})"
            prob = data.get(pid)
            if not isinstance(prob, dict):
                problems.add(at, f"problem {pid!r} is not in {p_path.name}")
                continue
            if prob.get("split", split) != split:
                raise split_mismatch(p_path, f"{pid}.split", prob["split"], split)
            if not prob.get("image"):
                continue
            choices, answer = prob.get("choices"), prob.get("answer")
            if (
                not isinstance(choices, list)
                or len(choices) < 2
                or not isinstance(answer, int)
                or not 0 <= answer < len(choices)
            ):
                problems.add(at, "needs 'choices' (a list) and 'answer' (an index into it)")
                continue
            question = get_str(prob, "question", at, problems)
            if question is None:
                continue
            prompt = llava_prompts.get(pid)
            if prompt is None:
                hint = str(prob.get("hint") or "").strip()
                context = f"Context: {hint}\n" if hint else ""
                prompt = f"{context}{question}\n{options_block([str(c) for c in choices])}"
            items.append(
                Item(
                    pid,
                    with_prompt(prompt, PROMPT_LETTER),
                    [images / pid / str(prob["image"])],
                    {"answer": LETTERS[answer], "n": len(choices), "subject": prob.get("subject")},
                    {"at": at},
                )
            )
        return LoadResult(items, split, problems.messages)

    @staticmethod
    def _llava_prompts(root: Path, split: str, problems: Problems) -> dict[str, str]:
        path = root / f"llava_{split}_CQM-A.json"
        if not path.is_file():
            return {}
        out = {}
        for number, rec in json_records(path, read_json(path), problems):
            convs = rec.get("conversations")
            if (
                isinstance(convs, list)
                and convs
                and isinstance(convs[0], dict)
                and isinstance(convs[0].get("value"), str)
            ):
                out[str(rec.get("id"))] = convs[0]["value"].replace("<image>", "").strip()
            else:
                problems.add(where(path, number, "record"), "no 'conversations'[0].value")
        return out

    def score(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], *, meteor: bool = True
    ) -> dict[str, Any]:
        """eval_science_qa.py: right when get_pred_idx equals the answer index; FAILED (an unparsed, empty or
        missing answer) is wrong and counted in no_answer."""
        preds = texts(items, predictions)
        parsed = [SQA_FAILED if p is None else sqa_parse(p) for p in preds]
        correct = [
            float(sqa_choice_index(letter, item.answer["n"]) == LETTERS.index(item.answer["answer"]))
            for item, letter in zip(items, parsed, strict=True)
        ]
        failed = [float(letter == SQA_FAILED) for letter in parsed]
        return {
            "metrics": {"accuracy": mean(correct), "no_answer": mean(failed)},
            "breakdown": {
                "subject": group_means([i.answer.get("subject") for i in items], {"accuracy": correct})
            },
        }


# --------------------------------------------------------------------------------------------------
# MMBench (circular evaluation)
# --------------------------------------------------------------------------------------------------

CIRCULAR_OFFSET = 1_000_000


def _is_none(value: str | None) -> bool:
    return value is None or value.strip() == "" or value.strip().lower() in ("nan", "none")


def circular_accuracy(groups: Sequence[str], correct: Sequence[bool]) -> tuple[float, dict[str, bool]]:
    """MMBench CircularEval: a question counts only if every circular shift of its options was answered
    right. Returns the fraction of questions passed and the verdict per question (group)."""
    verdict: dict[str, bool] = {}
    for group, ok in zip(groups, correct, strict=True):
        verdict[group] = verdict.get(group, True) and bool(ok)
    return (sum(verdict.values()) / len(verdict) if verdict else 0.0), verdict


def write_xlsx(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """A one-sheet .xlsx of inline strings/numbers (what MMBench's server reads), without openpyxl."""

    def cell(col: int, row: int, value: Any) -> str:
        ref = f"{_column_name(col)}{row}"
        if isinstance(value, int | float) and not isinstance(value, bool):
            return f'<c r="{ref}"><v>{value}</v></c>'
        text = "" if value is None else escape(str(value))
        return f'<c r="{ref}" t="inlineStr"><is><t xml:space="preserve">{text}</t></is></c>'

    sheet_rows = []
    for r, values in enumerate([list(header), *[list(v) for v in rows]], start=1):
        sheet_rows.append(f'<row r="{r}">' + "".join(cell(c, r, v) for c, v in enumerate(values)) + "</row>")
    ns = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
    rel_ns = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    files = {
        "[Content_Types].xml": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="xml" ContentType="application/xml"/>'
            '<Override PartName="/xl/workbook.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
            '<Override PartName="/xl/worksheets/sheet1.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/></Types>'
        ),
        "_rels/.rels": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            f'<Relationship Id="rId1" Type="{rel_ns}/officeDocument" Target="xl/workbook.xml"/></Relationships>'
        ),
        "xl/workbook.xml": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><workbook {ns} xmlns:r="{rel_ns}">'
            '<sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>'
        ),
        "xl/_rels/workbook.xml.rels": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
            '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            f'<Relationship Id="rId1" Type="{rel_ns}/worksheet" Target="worksheets/sheet1.xml"/></Relationships>'
        ),
        "xl/worksheets/sheet1.xml": (
            f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><worksheet {ns}><sheetData>'
            + "".join(sheet_rows)
            + "</sheetData></worksheet>"
        ),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return path


def _column_name(index: int) -> str:
    name = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        name = chr(65 + rem) + name
    return name


class MMBench(Benchmark):
    name = "mmbench"
    title = "MMBench"
    dirs = ("mmbench", "MMBench")
    columns = (Column("circular_accuracy", "MMB"),)
    lang = "en"
    download = (
        "MMBench's TSV with base64 images: `mmbench_dev_20230712.tsv` (dev, scored locally with CircularEval) or "
        "`mmbench_test_*.tsv` (test, the paper's split: an .xlsx for the MMBench server is written)."
    )
    metric_note = (
        "CircularEval accuracy: a question counts only if the answers to all circular shifts of its options "
        "are right; letters by VLMEvalKit's can_infer (c6bdffd3) under its exact_matching policy (no judge)"
    )

    def _tsvs(self, root: Path) -> list[Path]:
        found = sorted(root.glob("*.tsv"))
        return [
            p for p in found if ("cn" in p.stem.lower().replace("-", "_").split("_")) == (self.lang == "cn")
        ]

    def recognises(self, root: Path) -> bool:
        return bool(self._tsvs(root))

    def load(self, root: Path, split: str | None = None) -> LoadResult:
        tsvs = self._tsvs(root)
        if split is not None:
            tsvs = [p for p in tsvs if split in p.stem.lower()]
        else:
            tsvs = sorted(tsvs, key=lambda p: "dev" not in p.stem.lower())
        if not tsvs:
            raise DataError(
                f"{root}: no MMBench{'-CN' if self.lang == 'cn' else ''} .tsv"
                + (f" for split {split!r}" if split else "")
            )
        path = tsvs[0]
        split = split or (
            "dev" if "dev" in path.stem.lower() else "test" if "test" in path.stem.lower() else path.stem
        )
        problems = Problems()
        rows = self._read_tsv(path, problems)
        images_by_index = {r["index"]: r.get("image", "") for _, r in rows}
        has_copies = any(
            _int(r["index"]) is not None and _int(r["index"]) >= CIRCULAR_OFFSET for _, r in rows
        )
        suffix = PROMPT_LETTER_CN if self.lang == "cn" else PROMPT_LETTER
        items = []
        for line, row in rows:
            at = where(path, line)
            index = row.get("index", "")
            if _is_none(index):
                problems.add(at, "no question id (column 'index' is empty)")
                continue
            question = row.get("question", "")
            if _is_none(question):
                problems.add(at, "column 'question' is empty")
                continue
            options = []
            for letter in "ABCDEFGHI":
                if _is_none(row.get(letter)):
                    break
                options.append(row[letter])
            if len(options) < 2:
                problems.add(at, "needs at least options A and B")
                continue
            answer = None if _is_none(row.get("answer")) else row["answer"].strip()
            if answer is not None and answer not in LETTERS[: len(options)]:
                problems.add(at, f"answer {answer!r} is not one of the options' letters")
                continue
            image = row.get("image", "")
            if image and len(image) < 64 and image in images_by_index:
                image = images_by_index[image]
            if _is_none(image):
                problems.add(at, "column 'image' is empty")
                continue
            base = str(_int(index) % CIRCULAR_OFFSET) if _int(index) is not None else index
            hint = "" if _is_none(row.get("hint")) else row["hint"]
            rounds = 1 if has_copies or answer is None else len(options)
            for k in range(rounds):
                shown = options[k:] + options[:k]
                original = [LETTERS[(p + k) % len(options)] for p in range(len(options))]
                text = (f"{hint}\n" if hint else "") + f"{question}\n{options_block(shown)}"
                items.append(
                    Item(
                        index if k == 0 else f"{index}@{k}",
                        with_prompt(text, suffix),
                        [EmbeddedImage(image, f"{path} line {line} (image of index {index})")],
                        None
                        if answer is None
                        else {
                            "answer": answer,
                            "options": shown,
                            "original": original,
                            "group": base,
                            "category": row.get("category"),
                        },
                        {
                            "at": at,
                            "index": index,
                            "round": k,
                            "row": {c: row.get(c) for c in ("question", *LETTERS[: len(options)], "answer")},
                        },
                    )
                )
        items = dedupe(items, problems)
        notes = (
            []
            if items and items[0].answer is not None
            else ["answers are not public: submit the .xlsx to the MMBench server"]
        )
        return LoadResult(items, split, problems.messages, notes)

    @staticmethod
    def _read_tsv(path: Path, problems: Problems) -> list[tuple[int, dict[str, str]]]:
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t")
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file") from None
        header = [h.strip() for h in header]
        missing = [c for c in ("index", "question", "A", "B") if c not in header]
        if missing:
            raise DataError(f"{path} line 1: header lacks column(s) {', '.join(missing)}")
        rows = []
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                problems.add(where(path, line), f"has {len(row)} columns, the header has {len(header)}")
                continue
            rows.append((line, dict(zip(header, row, strict=True))))
        return rows

    def score(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], *, meteor: bool = True
    ) -> dict[str, Any]:
        preds = texts(items, predictions)
        correct, answered = [], []
        for item, p in zip(items, preds, strict=True):
            letter = None if p is None else metrics.extract_option_letter(p, item.answer["options"])
            shown = LETTERS[: len(item.answer["options"])]
            picked = (
                item.answer["original"][shown.index(letter)]
                if letter is not None and letter in shown
                else None
            )
            correct.append(picked == item.answer["answer"])
            answered.append(picked is not None)
        groups = [item.answer["group"] for item in items]
        circular, verdict = circular_accuracy(groups, correct)
        first = [c for item, c in zip(items, correct, strict=True) if item.meta.get("round", 0) == 0]
        categories: dict[str, str | None] = {
            item.answer["group"]: item.answer.get("category") for item in items
        }
        per_question = list(verdict)
        return {
            "metrics": {
                "circular_accuracy": circular,
                "accuracy": mean([float(c) for c in first]),
                "no_answer": mean([float(not a) for a in answered]),
            },
            "breakdown": {
                "category": group_means(
                    [categories[g] for g in per_question],
                    {"circular_accuracy": [float(verdict[g]) for g in per_question]},
                )
            },
        }

    def write_submission(
        self,
        items: Sequence[Item],
        predictions: Mapping[str, Prediction],
        out_dir: Path,
        split: str,
        root: Path,
    ) -> list[Path]:
        """The .xlsx LLaVA's convert_mmbench_for_submission.py uploads: the TSV's columns without the image,
        hint and category columns, with a "prediction" column (the unshifted question's answer)."""
        first = [item for item in items if item.meta.get("round", 0) == 0]
        n_opts = max(
            (sum(1 for c in LETTERS[:9] if item.meta["row"].get(c) is not None) for item in first), default=4
        )
        letters = list(LETTERS[:n_opts])
        has_answer = any(item.meta["row"].get("answer") not in (None, "") for item in first)
        header = ["index", "question", *letters, *(["answer"] if has_answer else []), "prediction"]
        rows = []
        for item in first:
            row = item.meta["row"]
            pred = predictions.get(item.id)
            index = _int(item.meta["index"])
            rows.append(
                [
                    index if index is not None else item.meta["index"],
                    row["question"],
                    *[row.get(c) for c in letters],
                    *([row.get("answer")] if has_answer else []),
                    pred.text if pred else "",
                ]
            )
        name = f"mmbench{'_cn' if self.lang == 'cn' else ''}_{split}_submission.xlsx"
        return [write_xlsx(out_dir / name, header, rows)]


class MMBenchCN(MMBench):
    name = "mmbench-cn"
    title = "MMBench-CN"
    dirs = ("mmbench_cn", "mmbench-cn", "mmbench", "MMBench")
    columns = (Column("circular_accuracy", "MMB-CN"),)
    lang = "cn"
    download = (
        "MMBench-CN's TSV: `mmbench_dev_cn_20231003.tsv` (dev) or `mmbench_test_cn_*.tsv` (test; an .xlsx for the "
        "server is written). It may sit beside the English TSV: files with `cn` in the name are MMBench-CN."
    )


def _int(value: str) -> int | None:
    try:
        return int(str(value).strip())
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------
# SEED-Bench
# --------------------------------------------------------------------------------------------------


class SEEDBench(Benchmark):
    name = "seed"
    title = "SEED-Bench"
    dirs = ("seed_bench", "SEED-Bench", "seed")
    columns = (Column("accuracy", "SEED"),)
    default_split = "test"
    download = (
        "`SEED-Bench.json` and the `SEED-Bench-image/` folder (SEED-Bench-1, HF AILab-CVC/SEED-Bench); the video "
        "questions need LLaVA's `llava-seed-bench.jsonl` and its extracted middle frames (LLaVA's extract_video_frames.py)."
    )
    metric_note = (
        "accuracy: the answer text must equal the option letter (LLaVA convert_seed_for_submission.py); "
        "accuracy_letter_extracted: VLMEvalKit's can_infer (c6bdffd3), as SEEDBench_IMG is scored there"
    )

    def recognises(self, root: Path) -> bool:
        return (root / "SEED-Bench.json").is_file()

    def load(self, root: Path, split: str | None = None) -> LoadResult:
        problems = Problems()
        path = root / "SEED-Bench.json"
        data = read_json_object(path, "with 'questions' and 'question_type'")
        type_names = (
            {v: k for k, v in data.get("question_type", {}).items()}
            if isinstance(data.get("question_type"), dict)
            else {}
        )
        images = image_dir(root, ("SEED-Bench-image",))
        answers: dict[str, dict[str, Any]] = {}
        built: list[Item] = []
        for number, q in json_records(path, data, problems, "questions"):
            at = where(path, number, "record")
            qid = get_id(q, ("question_id",), at, problems)
            question = get_str(q, "question", at, problems)
            answer = get_str(q, "answer", at, problems)
            choices = [q.get(f"choice_{c}") for c in "abcd"]
            if qid is None or question is None or answer is None:
                continue
            if not all(isinstance(c, str | int | float) for c in choices) or answer not in "ABCD":
                problems.add(at, "needs 'choice_a'..'choice_d' and an 'answer' letter A-D")
                continue
            kind = q.get("data_type", "image")
            answers[qid] = {
                "answer": answer,
                "type": type_names.get(q.get("question_type_id"), str(q.get("question_type_id"))),
                "data_type": kind,
                "options": [str(c) for c in choices],
            }
            if kind == "image":
                data_id = get_str(q, "data_id", at, problems)
                if data_id is None:
                    continue
                prompt = with_prompt(f"{question}\n{options_block([str(c) for c in choices])}", PROMPT_LETTER)
                built.append(Item(qid, prompt, [images / data_id], answers[qid], {"at": at}))
        llava_file = root / "llava-seed-bench.jsonl"
        if llava_file.is_file():
            items = dedupe(llava_questions(llava_file, root, [PROMPT_LETTER], problems), problems)
            items = attach_answers(items, answers, path, problems)
        else:
            items = dedupe(built, problems)
        return LoadResult(items, split or "test", problems.messages)

    def score(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], *, meteor: bool = True
    ) -> dict[str, Any]:
        preds = texts(items, predictions)
        exact = [
            float(p is not None and p == item.answer["answer"]) for item, p in zip(items, preds, strict=True)
        ]
        extracted = [
            float(
                p is not None
                and metrics.extract_option_letter(p, item.answer["options"]) == item.answer["answer"]
            )
            for item, p in zip(items, preds, strict=True)
        ]
        return {
            "metrics": {"accuracy": mean(exact), "accuracy_letter_extracted": mean(extracted)},
            "breakdown": {
                "data_type": group_means([i.answer["data_type"] for i in items], {"accuracy": exact}),
                "question_type": group_means([i.answer["type"] for i in items], {"accuracy": exact}),
            },
        }

    def write_submission(
        self,
        items: Sequence[Item],
        predictions: Mapping[str, Prediction],
        out_dir: Path,
        split: str,
        root: Path,
    ) -> list[Path]:
        """The leaderboard's JSONL of {"question_id", "prediction"}."""
        path = out_dir / "seed_bench_submission.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as fh:
            for item in items:
                pred = predictions.get(item.id)
                fh.write(json.dumps({"question_id": item.id, "prediction": pred.text if pred else ""}) + "\n")
        return [path]


# --------------------------------------------------------------------------------------------------
# MMMU
# --------------------------------------------------------------------------------------------------


MMMU_OTHER = "Other Answers"


def mmmu_correct(prediction: str, kind: str, options: Sequence[str], answer: str) -> bool:
    """MMMU scored as VLMEvalKit (c6bdffd3) scores MMMU_DEV_VAL: every question as multiple choice.

    MMMU_preproc turns an open question into options A = the raw gold answer, B = "Other Answers"
    with gold "A"; a multiple-choice gold that is not one capital letter becomes "A" (its answer_map).
    The letter is can_infer's; so an open answer counts when the gold text occurs in it (lower-cased)
    and "other answers" does not, or when it holds "A" as a lone token.
    """
    if kind == "multiple-choice" and options:
        choices = dict(zip(LETTERS, options, strict=False))
        gold = answer if len(answer) == 1 and answer in LETTERS else "A"
    else:
        choices = {"A": answer, "B": MMMU_OTHER}
        gold = "A"
    return metrics.can_infer(prediction, choices) == gold


class MMMU(Benchmark):
    name = "mmmu"
    title = "MMMU"
    dirs = ("mmmu", "MMMU")
    columns = (Column("accuracy", "MMMU"),)
    default_split = "validation"
    download = (
        "MMMU (HF MMMU/MMMU) validation parquet files (`<Subject>/validation-*.parquet`, needs pyarrow), or an "
        "export `mmmu_validation.jsonl` with fields id, question, options, answer, question_type and image paths "
        "`image_1`..`image_7` relative to the directory."
    )
    metric_note = (
        "accuracy as VLMEvalKit (c6bdffd3) scores MMMU: can_infer letters; open questions become options "
        "A = the gold answer, B = 'Other Answers'"
    )

    def recognises(self, root: Path) -> bool:
        return any(root.glob("mmmu_*.jsonl")) or any(root.glob("*/*.parquet"))

    def load(self, root: Path, split: str | None = None) -> LoadResult:
        split = split or "validation"
        problems = Problems()
        records: list[tuple[str, dict[str, Any], Path, Path]] = []
        jsonl = root / f"mmmu_{split}.jsonl"
        if jsonl.is_file():
            records = [(where(jsonl, n), obj, root, jsonl) for n, obj in read_jsonl(jsonl, problems)]
        else:
            parquet = sorted(root.glob(f"*/{split}-*.parquet"))
            if not parquet:
                raise DataError(f"{root}: no mmmu_{split}.jsonl and no <Subject>/{split}-*.parquet files")
            try:
                # pyarrow is optional: only MMMU's released parquet files need it.
                import pyarrow.parquet as pq
            except ImportError:
                raise DataError(
                    f"{root}: reading MMMU's parquet files needs pyarrow (pip install pyarrow)"
                ) from None
            for file in parquet:
                for n, obj in enumerate(pq.read_table(file).to_pylist(), start=1):
                    records.append((where(file, n, "row"), obj, file.parent, file))
        items = []
        for at, obj, base, source in records:
            qid = get_id(obj, ("id",), at, problems)
            question = get_str(obj, "question", at, problems)
            if qid is None or question is None:
                continue
            if not qid.startswith(f"{split}_") and qid.split("_")[0] in ("dev", "validation", "test"):
                raise split_mismatch(source, "id", qid, split)
            images = []
            for k in range(1, 8):
                value = obj.get(f"image_{k}")
                if isinstance(value, dict) and value.get("bytes"):
                    images.append(EmbeddedImage(value["bytes"], f"{at} image_{k}"))
                elif isinstance(value, str) and value:
                    images.append(base / value)
            kind = obj.get("question_type", "multiple-choice")
            options = obj.get("options", [])
            if isinstance(options, str):
                try:
                    options = ast.literal_eval(options) if options.strip() else []
                except (ValueError, SyntaxError):
                    problems.add(at, "field 'options' is not a list")
                    continue
            answer = obj.get("answer")
            if kind == "multiple-choice":
                if not isinstance(options, list) or len(options) < 2:
                    problems.add(at, "a multiple-choice question needs at least 2 options")
                    continue
                prompt = f"{question}\n{options_block([str(o) for o in options])}\n\n{PROMPT_LETTER}"
            else:
                prompt = f"{question}\n\n{PROMPT_SHORT}"
            gold = None
            if isinstance(answer, str) and answer.strip() and answer.strip() != "?":
                gold = {
                    "kind": kind,
                    "options": [str(o) for o in options] if isinstance(options, list) else [],
                    "answer": answer,
                    "subject": "_".join(qid.split("_")[1:-1]) or None,
                }
            items.append(Item(qid, prompt, images, gold, {"at": at}))
        return LoadResult(dedupe(items, problems), split, problems.messages)

    def score(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], *, meteor: bool = True
    ) -> dict[str, Any]:
        preds = texts(items, predictions)
        correct = [
            float(
                p is not None and mmmu_correct(p, i.answer["kind"], i.answer["options"], i.answer["answer"])
            )
            for i, p in zip(items, preds, strict=True)
        ]
        return {
            "metrics": {"accuracy": mean(correct)},
            "breakdown": {
                "subject": group_means([i.answer.get("subject") for i in items], {"accuracy": correct}),
                "question_type": group_means([i.answer["kind"] for i in items], {"accuracy": correct}),
            },
        }

    def write_submission(
        self,
        items: Sequence[Item],
        predictions: Mapping[str, Prediction],
        out_dir: Path,
        split: str,
        root: Path,
    ) -> list[Path]:
        """MMMU's test server takes {id: answer}."""
        rows = {item.id: (p.text if (p := predictions.get(item.id)) else "") for item in items}
        return [write_json(out_dir / f"mmmu_{split}_submission.json", rows)]


# --------------------------------------------------------------------------------------------------
# RealWorldQA
# --------------------------------------------------------------------------------------------------

_LETTER_ONLY = re.compile(r"^\(?([A-Z])\)?[.:]?$")


def realworldqa_correct(prediction: str, answer: str) -> bool:
    """Letter answers accept "B", "B.", "(B)"; other answers need normalize_exact equality."""
    gold = answer.strip()
    if len(gold) == 1 and gold.isalpha():
        match = _LETTER_ONLY.match(prediction.strip())
        return bool(match) and match.group(1) == gold.upper()
    return metrics.normalize_exact(prediction) == metrics.normalize_exact(gold)


class RealWorldQA(Benchmark):
    name = "realworldqa"
    title = "RealWorldQA"
    dirs = ("realworldqa", "RealWorldQA")
    columns = (Column("accuracy", "RWQA"),)
    default_split = "test"
    download = (
        "xAI's RealWorldQA release: `annotations.json` (image, question, answer) and the `images/` folder."
    )
    metric_note = "exact match (letters accept 'B', 'B.', '(B)'); the questions carry their own answer-format instruction"

    def recognises(self, root: Path) -> bool:
        return (root / "annotations.json").is_file() or (root / "realworldqa.jsonl").is_file()

    def load(self, root: Path, split: str | None = None) -> LoadResult:
        problems = Problems()
        images = image_dir(root, ("images",))
        path = root / "annotations.json"
        if path.is_file():
            records = [
                (where(path, n, "record"), obj) for n, obj in json_records(path, read_json(path), problems)
            ]
        else:
            path = root / "realworldqa.jsonl"
            records = [(where(path, n), obj) for n, obj in read_jsonl(path, problems)]
        items = []
        for number, (at, obj) in enumerate(records, start=1):
            image = get_str(obj, "image", at, problems)
            question = get_str(obj, "question", at, problems)
            answer = get_str(obj, "answer", at, problems)
            if image is None or question is None or answer is None:
                continue
            qid = str(obj.get("id", number))
            items.append(Item(qid, question, [images / image], {"answer": answer}, {"at": at}))
        return LoadResult(dedupe(items, problems), split or "test", problems.messages)

    def score(
        self, items: Sequence[Item], predictions: Mapping[str, Prediction], *, meteor: bool = True
    ) -> dict[str, Any]:
        preds = texts(items, predictions)
        correct = [
            float(p is not None and realworldqa_correct(p, item.answer["answer"]))
            for item, p in zip(items, preds, strict=True)
        ]
        return {"metrics": {"accuracy": mean(correct)}, "breakdown": {}}
