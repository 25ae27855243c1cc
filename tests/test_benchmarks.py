"""The papers' benchmarks: loaders for each released format, official scoring rules on hand-computed cases,
resumable runs, judges behind a fake local server, server submissions, bad inputs. The
lmms-eval plugin has its own file, tests/test_lmms_eval.py.

Every fixture is a few records with 8x8 images; most runs use a scripted fake model so the numbers are known.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from unillava.cli import main
from unillava.errors import DataError
from unillava.evaluation import metrics
from unillava.evaluation.benchmarks import BENCHMARKS, PAPER_TABLES, SUITES, Prediction
from unillava.evaluation.benchmarks.choice import (
    SQA_FAILED,
    circular_accuracy,
    mmmu_correct,
    realworldqa_correct,
    sqa_choice_index,
    sqa_parse,
)
from unillava.evaluation.benchmarks.grounding import box_iou, parse_box, polygon_or_rle
from unillava.evaluation.benchmarks.judged import llava_bench_scores, mmvet_score
from unillava.evaluation.benchmarks.vqa import anls, evalai_answer
from unillava.evaluation.benchmarks.yesno import mme_answer
from unillava.evaluation.runner import RunOptions, read_predictions, run_benchmark, run_benchmarks

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------------
# Fixture writers: a few records in each benchmark's released format
# --------------------------------------------------------------------------------------------------


def png(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 90, 200)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write(path: Path, content: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def make_vqav2(root: Path, *, ann_subtype: str = "val2014") -> Path:
    d = root / "vqav2"
    write(
        d / "v2_OpenEnded_mscoco_val2014_questions.json",
        {
            "data_subtype": "val2014",
            "questions": [
                {"image_id": 1, "question": "What color is the bus?", "question_id": 11},
                {"image_id": 2, "question": "How many dogs?", "question_id": 22},
            ],
        },
    )
    write(
        d / "v2_mscoco_val2014_annotations.json",
        {
            "data_subtype": ann_subtype,
            "annotations": [
                {
                    "question_id": 11,
                    "answer_type": "other",
                    "answers": [{"answer": a} for a in ["red"] * 2 + ["blue"] * 8],
                },
                {"question_id": 22, "answer_type": "number", "answers": [{"answer": "2"}] * 10},
            ],
        },
    )
    for i in (1, 2):
        png(d / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    return d


def make_vqav2_testdev(root: Path) -> Path:
    d = root / "vqav2"
    suffix = "\nAnswer the question using a single word or phrase."
    jsonl(
        d / "llava_vqav2_mscoco_test-dev2015.jsonl",
        [
            {
                "question_id": 5,
                "image": "COCO_test2015_000000000005.jpg",
                "text": "Is it sunny?" + suffix,
                "category": "default",
            }
        ],
    )
    jsonl(
        d / "llava_vqav2_mscoco_test2015.jsonl",
        [
            {"question_id": 5, "image": "COCO_test2015_000000000005.jpg", "text": "Is it sunny?" + suffix},
            {"question_id": 6, "image": "COCO_test2015_000000000006.jpg", "text": "What is it?" + suffix},
        ],
    )
    png(d / "test2015" / "COCO_test2015_000000000005.jpg")
    return d


def make_pope(root: Path) -> Path:
    d = root / "pope"
    splits = {"random": ["yes", "no", "yes", "no"], "popular": ["yes", "no"], "adversarial": ["no", "yes"]}
    for split, labels in splits.items():
        jsonl(
            d / "coco" / f"coco_pope_{split}.json",
            [
                {
                    "question_id": i + 1,
                    "image": f"img{i}.jpg",
                    "text": f"Is there a thing{i} in the image?",
                    "label": label,
                }
                for i, label in enumerate(labels)
            ],
        )
    for i in range(4):
        png(d / "val2014" / f"img{i}.jpg")
    return d


def make_mme(root: Path) -> Path:
    d = root / "MME" / "MME_Benchmark_release_version"
    q = " Please answer yes or no."
    for name in ("a", "b"):  # flat layout
        png(d / "existence" / f"{name}.jpg")
        write(d / "existence" / f"{name}.txt", f"Is there a cat?{q}\tYes\nIs there a dog?{q}\tNo\n")
    png(d / "artwork" / "images" / "c.jpg")  # images/ + questions_answers_YN/ layout
    write(
        d / "artwork" / "questions_answers_YN" / "c.txt",
        f"Is this by Monet?{q}\tYes\nIs this by Dali?{q}\tNo\n",
    )
    png(d / "code_reasoning" / "d.png")
    write(d / "code_reasoning" / "d.txt", f"Does it print 3?{q}\tYes\nDoes it print 4?{q}\tNo\n")
    return d


def make_mmbench(root: Path, name: str = "mmbench_dev_20230712.tsv", answers: bool = True) -> Path:
    d = root / "mmbench"
    image = png_b64()
    header = [
        "index",
        "question",
        "hint",
        "A",
        "B",
        "C",
        "D",
        *(["answer"] if answers else []),
        "category",
        "image",
    ]
    rows = [
        [
            "0",
            "Which colour?",
            "nan",
            "red",
            "blue",
            "nan",
            "nan",
            *(["A"] if answers else []),
            "color",
            image,
        ],
        [
            "1",
            "Which shape?",
            "Look closely.",
            "circle",
            "square",
            "star",
            "nan",
            *(["C"] if answers else []),
            "shape",
            image,
        ],
    ]
    write(d / name, "\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    return d


def make_scienceqa(root: Path) -> Path:
    d = root / "scienceqa"
    write(
        d / "problems.json",
        {
            "1": {
                "question": "Which is a mammal?",
                "choices": ["cat", "fish"],
                "answer": 0,
                "hint": "",
                "image": "image.png",
                "split": "test",
                "subject": "natural science",
            },
            "2": {
                "question": "No picture here?",
                "choices": ["a", "b"],
                "answer": 1,
                "hint": "",
                "image": None,
                "split": "test",
            },
            "3": {
                "question": "Pick one.",
                "choices": ["a", "b", "c"],
                "answer": 2,
                "hint": "Look.",
                "image": "image.png",
                "split": "test",
                "subject": "language science",
            },
        },
    )
    write(d / "pid_splits.json", {"test": ["1", "2", "3"]})
    png(d / "images" / "test" / "1" / "image.png")
    png(d / "images" / "test" / "3" / "image.png")
    return d


def make_mmvet(root: Path) -> Path:
    d = root / "mm-vet"
    write(
        d / "mm-vet.json",
        {
            "v1_0": {
                "imagename": "v1_0.png",
                "question": "What is x in the equation?",
                "answer": "-1<AND>-5",
                "capability": ["math", "ocr"],
            },
            "v1_1": {
                "imagename": "v1_1.png",
                "question": "What is shown?",
                "answer": "a cat",
                "capability": ["rec"],
            },
        },
    )
    png(d / "images" / "v1_0.png")
    png(d / "images" / "v1_1.png")
    return d


def make_llava_bench(root: Path) -> Path:
    d = root / "llava-bench-in-the-wild"
    jsonl(
        d / "questions.jsonl",
        [
            {"question_id": 0, "image": "001.jpg", "text": "Describe the image.", "category": "detail"},
            {"question_id": 1, "image": "001.jpg", "text": "What animal is it?", "category": "conv"},
        ],
    )
    jsonl(
        d / "answers_gpt4.jsonl",
        [{"question_id": 0, "text": "A cat on a mat."}, {"question_id": 1, "text": "A cat."}],
    )
    jsonl(d / "context.jsonl", [{"id": "001", "image": "001.jpg", "caption": "A cat sits on a mat."}])
    png(d / "images" / "001.jpg")
    return d


def make_refer(root: Path) -> Path:
    d = root / "refer_seg"
    refs = [
        {
            "ref_id": 0,
            "ann_id": 100,
            "image_id": 1,
            "split": "val",
            "category_id": 1,
            "sentences": [{"sent": "left square", "sent_id": 0}, {"sent": "the square", "sent_id": 1}],
        },
        {
            "ref_id": 1,
            "ann_id": 100,
            "image_id": 1,
            "split": "testA",
            "sentences": [{"sent": "x", "sent_id": 2}],
        },
    ]
    (d / "refcoco").mkdir(parents=True)
    with (d / "refcoco" / "refs(unc).p").open("wb") as fh:
        pickle.dump(refs, fh, protocol=2)
    write(
        d / "refcoco" / "instances.json",
        {
            "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 8, "width": 8}],
            "annotations": [
                {"id": 100, "image_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]], "bbox": [0, 0, 4, 4]}
            ],
        },
    )
    png(d / "images" / "mscoco" / "images" / "train2014" / "COCO_train2014_000000000001.jpg")
    return d


def rle(mask: np.ndarray) -> dict:
    r = metrics.to_rle(mask)
    return {"size": r["size"], "counts": r["counts"].decode("ascii")}


def square(top: int, left: int, size: int) -> np.ndarray:
    m = np.zeros((8, 8), dtype=bool)
    m[top : top + size, left : left + size] = True
    return m


# --------------------------------------------------------------------------------------------------
# A scripted model
# --------------------------------------------------------------------------------------------------


@dataclass
class FakeModel:
    """Answers from a table keyed by a substring of the prompt; counts how many prompts it answered."""

    answers: dict[str, str]
    default: str = "no"
    calls: int = 0

    def generate_conversations(self, conversations, images, *, batch_size=8, progress=None, **settings):
        out = []
        for conversation in conversations:
            text = conversation[-1].text
            out.append(next((a for key, a in self.answers.items() if key in text), self.default))
        self.calls += len(conversations)
        if progress is not None:
            progress.update(len(conversations))
        return out


def preds(mapping: dict[str, str]) -> dict[str, Prediction]:
    return {k: Prediction(v) for k, v in mapping.items()}


def load(name: str, root: Path, split: str | None = None):
    bench = BENCHMARKS[name]
    found = bench.find_root(root)
    assert found is not None, f"{name} not recognised under {root}"
    return bench, bench.load(found, split)


# --------------------------------------------------------------------------------------------------
# Registry, suites, paper tables
# --------------------------------------------------------------------------------------------------


def test_registry_covers_every_paper_benchmark():
    assert set(SUITES["llava-1.5"]) == {
        "vqav2",
        "gqa",
        "vizwiz",
        "scienceqa",
        "textvqa",
        "pope",
        "mme",
        "mmbench",
        "mmbench-cn",
        "seed",
        "llava-bench",
        "mm-vet",
    }
    assert {"docvqa", "realworldqa", "mmmu"} <= set(SUITES["convllava"])
    assert {"refcoco", "refcoco+", "refcocog", "gcg", "refcocog-regcap"} <= set(SUITES["omg-llava"])
    assert set(PAPER_TABLES) == set(SUITES) - {"shapes"}  # the procedural suite has no paper
    for names in SUITES.values():
        assert all(n in BENCHMARKS for n in names)
    for table in PAPER_TABLES.values():
        assert all(b in BENCHMARKS for c in table.columns for b in c.benchmarks)
    for bench in BENCHMARKS.values():
        assert bench.download and bench.columns and bench.metric_note
    assert PAPER_TABLES["llava-1.5"].references["LLaVA-1.5-7B (paper)"]["MME"] == 1510.7


# --------------------------------------------------------------------------------------------------
# Loaders and scorers, hand-computed
# --------------------------------------------------------------------------------------------------


def test_vqav2_val_loads_prompts_and_scores_vqa_accuracy(tmp_path):
    make_vqav2(tmp_path)
    bench, loaded = load("vqav2", tmp_path)
    assert loaded.split == "val" and [i.id for i in loaded.items] == ["11", "22"]
    assert (
        loaded.items[0].prompt == "What color is the bus?\nAnswer the question using a single word or phrase."
    )
    assert loaded.items[0].images[0].name == "COCO_val2014_000000000001.jpg"
    # "Red" matches 2 of 10 humans -> 0.6; "two" -> "2" matches all 10 -> 1.0
    result = bench.score(loaded.items, preds({"11": "Red", "22": "two"}))
    assert result["metrics"]["accuracy"] == pytest.approx(0.8)
    assert result["breakdown"]["answer_type"]["other"]["accuracy"] == pytest.approx(0.6)
    assert bench.score(loaded.items, preds({"22": "2"}))["metrics"]["accuracy"] == pytest.approx(0.5)


def test_gqa_exact_match_and_submission(tmp_path):
    d = tmp_path / "gqa"
    write(
        d / "testdev_balanced_questions.json",
        {
            "q1": {
                "imageId": "n1",
                "question": "Is it red?",
                "answer": "yes",
                "types": {"structural": "verify"},
            },
            "q2": {
                "imageId": "n2",
                "question": "What is it?",
                "answer": "table",
                "types": {"structural": "query"},
            },
        },
    )
    bench, loaded = load("gqa", tmp_path)
    assert loaded.items[1].images[0] == d / "n2.jpg"
    result = bench.score(loaded.items, preds({"q1": "Yes.", "q2": "the table"}))
    assert result["metrics"]["accuracy"] == 0.5
    assert result["breakdown"]["structural"]["verify"]["accuracy"] == 1.0
    [path] = bench.write_submission(loaded.items, preds({"q1": "Yes."}), tmp_path / "out", "testdev", d)
    assert json.loads(path.read_text()) == [
        {"questionId": "q1", "prediction": "yes"},
        {"questionId": "q2", "prediction": ""},
    ]


def test_vizwiz_prompt_scoring_and_submission(tmp_path):
    d = tmp_path / "vizwiz"
    write(
        d / "val.json",
        [
            {
                "image": "VizWiz_val_00000000.jpg",
                "question": "What is this?",
                "answers": [{"answer": "unanswerable"}] * 3 + [{"answer": "soup"}] * 7,
                "answer_type": "other",
            }
        ],
    )
    bench, loaded = load("vizwiz", tmp_path)
    assert loaded.items[0].prompt == (
        "What is this?\nWhen the provided information is insufficient, respond with "
        "'Unanswerable'.\nAnswer the question using a single word or phrase."
    )
    assert bench.score(loaded.items, preds({"VizWiz_val_00000000.jpg": "Unanswerable"}))["metrics"][
        "accuracy"
    ] == pytest.approx(0.9)
    [path] = bench.write_submission(
        loaded.items, preds({"VizWiz_val_00000000.jpg": "Soup."}), tmp_path / "o", "val", d
    )
    assert json.loads(path.read_text()) == [{"image": "VizWiz_val_00000000.jpg", "answer": "soup"}]


def test_textvqa_llava_prompts_with_ocr_tokens(tmp_path):
    d = tmp_path / "textvqa"
    write(
        d / "TextVQA_0.5.1_val.json",
        {
            "dataset_split": "val",
            "data": [
                {"question_id": 7, "image_id": "abc", "question": "what brand?", "answers": ["nikon"] * 10}
            ],
        },
    )
    jsonl(
        d / "llava_textvqa_val_v051_ocr.jsonl",
        [
            {
                "question_id": 7,
                "image": "abc.jpg",
                "text": "what brand?\nReference OCR token: Nikon\nAnswer the question using a single word or phrase.",
            }
        ],
    )
    bench, loaded = load("textvqa", tmp_path)
    assert "Reference OCR token: Nikon" in loaded.items[0].prompt
    assert loaded.items[0].prompt.count("single word or phrase") == 1
    assert loaded.items[0].images[0] == d / "abc.jpg"
    assert bench.score(loaded.items, preds({"7": "Nikon"}))["metrics"]["accuracy"] == 1.0


def test_scienceqa_image_subset_prompt_and_official_letter_parsing(tmp_path):
    make_scienceqa(tmp_path)
    bench, loaded = load("scienceqa", tmp_path)
    assert [i.id for i in loaded.items] == ["1", "3"]  # SQA-IMG: problem 2 has no image
    assert loaded.items[1].prompt == (
        "Context: Look.\nPick one.\nA. a\nB. b\nC. c\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert loaded.items[0].prompt.startswith("Which is a mammal?\nA. cat")
    assert bench.score(loaded.items, preds({"1": "A", "3": "The answer is C."}))["metrics"]["accuracy"] == 1.0
    assert bench.score(loaded.items, preds({"1": "cat", "3": "C"}))["metrics"] == {
        "accuracy": 0.5,
        "no_answer": 0.5,
    }


def test_llava_question_files_and_server_only_splits(tmp_path):
    v = tmp_path / "vizwiz"
    jsonl(
        v / "llava_test.jsonl",
        [{"question_id": 0, "image": "VizWiz_test_00000000.jpg", "text": "What is this?"}],
    )
    bench, loaded = load("vizwiz", tmp_path)
    assert (
        loaded.split == "test"
        and not loaded.has_answers
        and loaded.items[0].images[0] == v / "VizWiz_test_00000000.jpg"
    )
    assert loaded.items[0].prompt.endswith(
        "'Unanswerable'.\nAnswer the question using a single word or phrase."
    )
    [path] = bench.write_submission(loaded.items, preds({"0": "Two"}), tmp_path / "o", "test", v)
    assert json.loads(path.read_text()) == [{"image": "VizWiz_test_00000000.jpg", "answer": "2"}]
    s = make_scienceqa(tmp_path)
    write(
        s / "llava_test_CQM-A.json",
        [
            {
                "id": "1",
                "image": "1/image.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nContext: N/A\nWhich is a mammal?\nA. cat\nB. fish"}
                ],
            }
        ],
    )
    _, sqa = load("scienceqa", tmp_path)
    assert sqa.items[0].prompt == (
        "Context: N/A\nWhich is a mammal?\nA. cat\nB. fish\n"
        "Answer with the option's letter from the given choices directly."
    )
    e = tmp_path / "seed_bench"
    write(
        e / "SEED-Bench.json",
        {
            "question_type": {"Action Recognition": 10},
            "questions": [
                {
                    "question_id": "v1",
                    "question": "What happens?",
                    "choice_a": "a",
                    "choice_b": "b",
                    "choice_c": "c",
                    "choice_d": "d",
                    "answer": "D",
                    "data_id": "clip.mp4",
                    "data_type": "video",
                    "question_type_id": 10,
                }
            ],
        },
    )
    jsonl(
        e / "llava-seed-bench.jsonl",
        [
            {
                "question_id": "v1",
                "image": "SEED-Bench-video-image/v1.png",
                "text": "What happens?\nA. a\nB. b\nC. c\nD. d",
            }
        ],
    )
    seed, seed_loaded = load("seed", tmp_path)
    assert seed_loaded.items[0].images[0] == e / "SEED-Bench-video-image" / "v1.png"
    assert (
        seed.score(seed_loaded.items, preds({"v1": "D"}))["breakdown"]["data_type"]["video"]["accuracy"]
        == 1.0
    )
    d = tmp_path / "docvqa"
    write(
        d / "test" / "test_v1.0.json",
        {
            "dataset_split": "test",
            "data": [{"questionId": 9, "question": "Who signed?", "image": "documents/x.png"}],
        },
    )
    doc, doc_loaded = load("docvqa", tmp_path, "test")
    assert not doc_loaded.has_answers
    [path] = doc.write_submission(doc_loaded.items, preds({"9": "J. Smith"}), tmp_path / "o", "test", d)
    assert json.loads(path.read_text()) == [{"questionId": 9, "answer": "J. Smith"}]


def test_pope_per_split_metrics(tmp_path):
    make_pope(tmp_path)
    bench, loaded = load("pope", tmp_path)
    assert len(loaded.items) == 8 and loaded.items[0].prompt.endswith(
        "\nAnswer the question using a single word or phrase."
    )
    answers = {
        "random-1": "Yes",
        "random-2": "No",
        "random-3": "No, there is not.",
        "random-4": "Yes",
        "popular-1": "Yes",
        "popular-2": "No",
    }  # adversarial answers missing: scored wrong
    result = bench.score(loaded.items, preds(answers))
    rnd, pop, adv = (result["breakdown"]["split"][s] for s in ("random", "popular", "adversarial"))
    assert rnd == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5, "n": 4}
    assert pop == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 0.5, "n": 2}
    # adversarial labels [no, yes], both missing -> read as [yes, no]: tp 0, fp 1, fn 1
    assert adv["accuracy"] == 0.0 and adv["f1"] == 0.0 and adv["yes_ratio"] == 0.5
    assert result["metrics"]["f1"] == pytest.approx(0.5)
    assert BENCHMARKS["pope"].headline(result["metrics"]) == pytest.approx(50.0)


def test_mme_acc_plus_and_perception_cognition_sums(tmp_path):
    make_mme(tmp_path)
    bench, loaded = load("mme", tmp_path)
    ids = [i.id for i in loaded.items]
    assert ids[:2] == ["existence/a.jpg#1", "existence/a.jpg#2"] and "artwork/c.jpg#1" in ids
    assert (
        loaded.items[0].prompt
        == "Is there a cat? Please answer yes or no.\nAnswer the question using a single word or phrase."
    )
    answers = {
        "existence/a.jpg#1": "Yes",
        "existence/a.jpg#2": "No",
        "existence/b.jpg#1": "Yes, there is.",
        "existence/b.jpg#2": "Yes",
        "artwork/c.jpg#1": "yes",
        "artwork/c.jpg#2": "No.",
        "code_reasoning/d.png#1": "I think so",
        "code_reasoning/d.png#2": "Yes",
    }
    result = bench.score(loaded.items, preds(answers))
    existence = result["breakdown"]["subtask"]["existence"]
    assert existence["acc"] == 75.0 and existence["acc_plus"] == 50.0 and existence["score"] == 125.0
    assert result["metrics"]["perception"] == 325.0  # existence 125 + artwork 200
    assert result["metrics"]["cognition"] == 0.0
    assert bench.headline(result["metrics"]) == 325.0


def test_mmbench_circular_evaluation(tmp_path):
    make_mmbench(tmp_path)
    bench, loaded = load("mmbench", tmp_path)
    assert [i.id for i in loaded.items] == ["0", "0@1", "1", "1@1", "1@2"]
    assert loaded.items[2].prompt == (
        "Look closely.\nWhich shape?\nA. circle\nB. square\nC. star\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert loaded.items[3].prompt.startswith("Look closely.\nWhich shape?\nA. square\nB. star\nC. circle")
    assert loaded.items[0].images[0].open().size == (8, 8)
    # question 0 right in both shifts; question 1 right unshifted and shift 1, wrong in shift 2
    answers = {"0": "A", "0@1": "B", "1": "C", "1@1": "B. star", "1@2": "C"}
    result = bench.score(loaded.items, preds(answers))
    assert result["metrics"]["circular_accuracy"] == 0.5
    assert result["metrics"]["accuracy"] == 1.0  # single pass on the unshifted questions
    assert result["breakdown"]["category"]["shape"]["circular_accuracy"] == 0.0
    assert circular_accuracy(["a", "a", "b"], [True, True, True]) == (1.0, {"a": True, "b": True})


def test_mmbench_cn_uses_its_own_tsv_and_prompt(tmp_path):
    make_mmbench(tmp_path)
    make_mmbench(tmp_path, "mmbench_dev_cn_20231003.tsv")
    _, en = load("mmbench", tmp_path)
    _, cn = load("mmbench-cn", tmp_path)
    assert en.items[0].prompt.endswith("directly.") and cn.items[0].prompt.endswith("请直接回答选项字母。")


def test_mmbench_test_split_writes_server_xlsx(tmp_path):
    make_mmbench(tmp_path, "mmbench_test_20230712.tsv", answers=False)
    bench, loaded = load("mmbench", tmp_path)
    assert loaded.split == "test" and len(loaded.items) == 2 and not loaded.has_answers
    [path] = bench.write_submission(
        loaded.items, preds({"0": "A", "1": "C"}), tmp_path / "o", "test", tmp_path
    )
    with zipfile.ZipFile(path) as zf:
        sheet = zf.read("xl/worksheets/sheet1.xml").decode()
    assert ">prediction<" in sheet and ">circle<" in sheet and "<v>1</v>" in sheet


def test_seed_official_exact_match_and_letter_extraction(tmp_path):
    d = tmp_path / "seed_bench"
    q = {
        "question": "What is it?",
        "choice_a": "x",
        "choice_b": "y",
        "choice_c": "z",
        "choice_d": "w",
        "data_type": "image",
        "question_type_id": 1,
    }
    write(
        d / "SEED-Bench.json",
        {
            "question_type": {"Scene Understanding": 1},
            "questions": [
                {**q, "question_id": "1", "answer": "B", "data_id": "i1.jpg"},
                {**q, "question_id": "2", "answer": "A", "data_id": "i2.jpg"},
            ],
        },
    )
    bench, loaded = load("seed", tmp_path)
    assert loaded.items[0].prompt == (
        "What is it?\nA. x\nB. y\nC. z\nD. w\n"
        "Answer with the option's letter from the given choices directly."
    )
    result = bench.score(loaded.items, preds({"1": "B", "2": "A."}))
    assert result["metrics"] == {"accuracy": 0.5, "accuracy_letter_extracted": 1.0}
    assert result["breakdown"]["question_type"]["Scene Understanding"]["n"] == 2


def test_docvqa_anls_edge_cases(tmp_path):
    assert anls("1/2/2000", ["1/2/2000"]) == 1.0
    assert anls("  The  DATE ", ["the date"]) == 1.0  # case and whitespace do not count
    assert anls("ab", ["abcd"]) == 0.5  # 1 - NL = 0.5 is not below the 0.5 threshold: kept
    assert anls("abc", ["abcd"]) == pytest.approx(0.75)  # NL = 1/4
    assert anls("", [""]) == 1.0 and anls("x", [""]) == 0.0
    assert anls("abcd", ["zzzz", "abce"]) == pytest.approx(0.75)  # best ground truth counts
    d = tmp_path / "docvqa"
    write(
        d / "val_v1.0.json",
        {
            "dataset_split": "val",
            "data": [
                {
                    "questionId": 1,
                    "question": "What is the date?",
                    "image": "documents/d1.png",
                    "answers": ["1/2/2000", "Jan 2"],
                }
            ],
        },
    )
    bench, loaded = load("docvqa", tmp_path)
    assert loaded.items[0].images[0] == d / "documents" / "d1.png"
    assert bench.score(loaded.items, preds({"1": "1/2/200"}))["metrics"]["anls"] == pytest.approx(1 - 1 / 8)


def test_realworldqa_and_mmmu(tmp_path):
    d = tmp_path / "realworldqa"
    write(
        d / "annotations.json",
        [
            {
                "image": "0.png",
                "question": "Which way? A. left B. right Please answer directly with only the letter.",
                "answer": "B",
            },
            {
                "image": "1.png",
                "question": "How many cars? Please answer directly with a single word or number.",
                "answer": "3",
            },
        ],
    )
    bench, loaded = load("realworldqa", tmp_path)
    assert loaded.items[0].prompt.endswith("only the letter.")
    assert bench.score(loaded.items, preds({"1": "(B)", "2": "3."}))["metrics"]["accuracy"] == 1.0
    assert not realworldqa_correct("B is right", "B")
    m = tmp_path / "mmmu"
    jsonl(
        m / "mmmu_validation.jsonl",
        [
            {
                "id": "validation_Art_1",
                "question": "<image 1> Which style?",
                "options": "['baroque', 'cubism']",
                "answer": "B",
                "question_type": "multiple-choice",
                "image_1": "a.png",
            },
            {
                "id": "validation_Math_2",
                "question": "Compute it.",
                "options": "[]",
                "answer": "3.50",
                "question_type": "open",
            },
        ],
    )
    bench, loaded = load("mmmu", tmp_path)
    assert loaded.items[0].prompt == (
        "<image 1> Which style?\nA. baroque\nB. cubism\n\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert loaded.items[0].images == [m / "a.png"] and loaded.items[1].images == []
    # VLMEvalKit: the open question is options A = "3.50", B = "Other Answers"; "3.5" matches neither
    assert (
        bench.score(loaded.items, preds({"validation_Art_1": "B", "validation_Math_2": "3.5"}))["metrics"][
            "accuracy"
        ]
        == 0.5
    )
    assert (
        bench.score(loaded.items, preds({"validation_Art_1": "B", "validation_Math_2": "It is 3.50"}))[
            "metrics"
        ]["accuracy"]
        == 1.0
    )
    assert mmmu_correct("1,000 apples", "open", [], "1,000") and not mmmu_correct("3.6", "open", [], "3.50")


def test_refcoco_segmentation_scores_and_rec_boxes(tmp_path):
    make_refer(tmp_path)
    bench, loaded = load("refcoco", tmp_path)
    assert [i.id for i in loaded.items] == ["0-0", "0-1"]  # val only, one item per expression
    assert loaded.items[0].prompt == "Please segment left square in this image."
    assert loaded.items[0].images[0].is_file()
    a = loaded.items[0].answer
    gt = metrics.decode_mask(polygon_or_rle(a["segmentation"], a["h"], a["w"]))
    perfect = {
        "0-0": Prediction("[SEG]", [rle(gt)]),
        "0-1": Prediction("[SEG]", [rle(np.zeros((8, 8), bool))]),
    }
    result = bench.score(loaded.items, perfect)
    assert result["metrics"]["ciou"] == pytest.approx(0.5) and result["metrics"]["giou"] == pytest.approx(0.5)
    assert bench.score(loaded.items, preds({"0-0": "no masks"}))["metrics"]["ciou"] == 0.0
    _, testa = load("refcoco", tmp_path, "testA")
    assert [i.id for i in testa.items] == ["1-2"]
    rec, rec_loaded = load("rec-refcoco", tmp_path)
    assert rec_loaded.items[0].answer["box"] == [0.0, 0.0, 4.0, 4.0]
    assert (
        rec.score(rec_loaded.items, preds({"0-0": "[0.0, 0.0, 0.5, 0.5]", "0-1": "[0.5, 0.5, 1.0, 1.0]"}))[
            "metrics"
        ]["accuracy"]
        == 0.5
    )
    assert parse_box("[0.25, 0.0, 0.75, 0.5]", 8, 4) == (2.0, -2.0, 6.0, 2.0)  # y through the square padding
    assert parse_box("12 4 30 40", 100, 100) == (12.0, 4.0, 30.0, 40.0) and parse_box("none", 8, 8) is None
    assert box_iou((0, 0, 4, 4), (2, 0, 6, 4)) == pytest.approx(8 / 24)


def test_gcg_and_region_captions_score_text_only_models(tmp_path):
    d = tmp_path / "GranDf" / "annotations" / "val_test"
    write(
        d / "test_gcg_coco_caption_gt.json",
        {
            "images": [{"id": "g1", "file_name": "g1.jpg"}, {"id": "g2", "file_name": "g2.jpg"}],
            "annotations": [
                {"image_id": "g1", "caption": "A dog on the grass.", "labels": ["A dog", "the grass"]},
                {"image_id": "g2", "caption": "A red car.", "labels": ["A red car"]},
            ],
        },
    )
    write(
        d / "test_gcg_coco_mask_gt.json",
        {
            "images": [{"id": "g1", "height": 8, "width": 8}, {"id": "g2", "height": 8, "width": 8}],
            "annotations": [
                {"image_id": "g1", "segmentation": rle(square(0, 0, 4))},
                {"image_id": "g1", "segmentation": rle(square(4, 4, 4))},
                {"image_id": "g2", "segmentation": rle(square(2, 2, 4))},
            ],
        },
    )
    bench, loaded = load("gcg", tmp_path)
    assert loaded.items[0].prompt.startswith("Could you please give me a detailed description of the image?")
    answers = {"g1": "<p> A dog </p> [SEG] on <p> the grass </p> [SEG].", "g2": "A red car."}
    result = bench.score(loaded.items, preds(answers), meteor=False)
    assert (
        result["metrics"]["ap50"] == 0.0
        and result["metrics"]["miou"] == 0.0
        and result["metrics"]["recall"] == 0.0
    )
    assert result["metrics"]["cider"] > 0
    with_masks = {
        "g1": Prediction(answers["g1"], [rle(square(0, 0, 4)), rle(square(4, 4, 4))]),
        "g2": Prediction("A red car.", [rle(square(2, 2, 4))]),
    }
    full = bench.score(loaded.items, with_masks, meteor=False)["metrics"]
    assert (
        full["miou"] == 1.0 and full["recall"] == pytest.approx(2 / 3) and full["ap50"] == pytest.approx(1.0)
    )
    r = tmp_path / "RefCoco_Reg"
    write(
        r / "mdetr_annotations" / "finetune_refcocog_val_captions.json",
        {
            "images": [
                {"id": 1, "file_name": "COCO_train2014_000000000001.jpg"},
                {"id": 2, "file_name": "COCO_train2014_000000000002.jpg"},
            ],
            "annotations": [
                {"image_id": 1, "bbox": [0, 0, 4, 4], "caption": "a brown dog lying down"},
                {"image_id": 2, "bbox": [1, 1, 4, 4], "caption": "a man in a red shirt"},
            ],
        },
    )
    reg, reg_loaded = load("refcocog-regcap", tmp_path)
    assert "<mark>" in reg_loaded.items[0].prompt and reg_loaded.items[0].answer["bbox"] == [0, 0, 4, 4]
    scored = reg.score(
        reg_loaded.items, preds({"1": "a brown dog lying down", "2": "a man in a red shirt"}), meteor=False
    )
    assert scored["metrics"]["cider"] > 1.0


def make_regcap(root: Path) -> Path:
    r = root / "RefCoco_Reg"
    write(
        r / "mdetr_annotations" / "finetune_refcocog_val_captions.json",
        {
            "images": [
                {"id": 1, "file_name": "COCO_train2014_000000000001.jpg"},
                {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": 8, "width": 8},
            ],
            "annotations": [
                {"image_id": 1, "bbox": [1, 2, 3, 4], "caption": "a brown dog lying down"},
                {
                    "image_id": 2,
                    "bbox": [0, 0, 4, 4],
                    "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]],
                    "caption": "a man in a red shirt",
                },
            ],
        },
    )
    for i in (1, 2):
        png(r / "train2014" / f"COCO_train2014_{i:012d}.jpg")
    return r


@dataclass
class FakeRegionModel(FakeModel):
    """A scripted model that takes visual prompts through generate_with_masks, recording what it got."""

    supports_visual_prompts: bool = True
    supports_segmentation: bool = True
    seen: list = field(default_factory=list)

    def generate_with_masks(
        self, conversations, images, *, batch_size=8, max_new_tokens=64, progress=None, visual_prompts=None
    ):
        self.seen += [(c[-1].text, p) for c, p in zip(conversations, visual_prompts, strict=True)]
        texts = self.generate_conversations(conversations, images, progress=progress)
        return [(t, []) for t in texts]


def test_region_captioning_passes_the_region_to_models_that_take_it(tmp_path):
    r = make_regcap(tmp_path)
    bench, loaded = load("refcocog-regcap", tmp_path)
    assert loaded.items[0].visual_prompts == [
        {
            "type": "box",
            "box": [1.0, 2.0, 4.0, 6.0],
        }
    ]  # xywh -> xyxy
    assert loaded.items[1].visual_prompts[0]["type"] == "mask"  # OMG-LLaVA marks a region by its mask
    model = FakeRegionModel({"region": "a dog"})
    res = run_benchmark(model, bench, r, tmp_path / "out", RunOptions(progress=False, meteor=False))
    assert [prompt for _, prompt in model.seen][0] == [{"type": "box", "box": [1.0, 2.0, 4.0, 6.0]}]
    assert all(text.endswith("marked by region1 <mark>?") for text, _ in model.seen)
    assert len(model.seen) == 2 and all(len(p) == 1 for _, p in model.seen)  # one prompt per <mark>
    assert not any("visual prompts" in f for f in res["flags"]) and res["counts"]["predicted"] == 2
    # a model without visual prompts is still asked (prompt text only) and the result is flagged
    text_only = FakeModel({"region": "a dog"})
    res = run_benchmark(text_only, bench, r, tmp_path / "out2", RunOptions(progress=False, meteor=False))
    assert text_only.calls == 2 and any("takes no visual prompts" in f for f in res["flags"])


def test_region_captioning_reaches_omg_llava_as_a_box_region(tmp_path, monkeypatch, one_torch_thread):
    import torch

    from unillava.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
    from unillava.inference import InferenceModel
    from unillava.llm import EMBEDDED_DEFAULT
    from unillava.modeling import LlavaModel
    from unillava.omg import OMGLlavaModel
    from unillava.omg.perception import tiny_perception_config
    from unillava.testing import tiny_llama_config

    torch.manual_seed(0)
    config = ModelConfig(
        vision=VisionConfig(type="omg", hf_config=tiny_perception_config(), image_size=128),
        projector=ProjectorConfig(),
        llm=LLMConfig(pretrained=None, tokenizer=EMBEDDED_DEFAULT, hf_config=tiny_llama_config()),
        max_length=512,
    )
    omg = LlavaModel.from_config(config).eval()
    answer = omg.tokenizer("a brown dog", add_special_tokens=False)["input_ids"] + [
        omg.tokenizer.eos_token_id
    ]
    seen = []

    def generate_recording(self, input_ids, attention_mask=None, images=None, visual_prompts=None, **kwargs):
        seen.append((input_ids.tolist(), visual_prompts))
        return torch.tensor([answer] * input_ids.shape[0])

    monkeypatch.setattr(OMGLlavaModel, "generate", generate_recording)
    r = make_regcap(tmp_path)
    res = run_benchmark(
        InferenceModel(omg),
        BENCHMARKS["refcocog-regcap"],
        r,
        tmp_path / "out",
        RunOptions(progress=False, meteor=False, batch_size=2),
    )
    assert res["counts"]["failed"] == 0 and not any("visual prompts" in f for f in res["flags"])
    [(ids, regions)] = seen
    mark = omg.token_ids["<mark>"]
    assert [row.count(mark) for row in ids] == [1, 1] and [len(r) for r in regions] == [1, 1]
    assert [r[0].kind for r in regions] == ["box", "mask"]
    box = regions[0][0].region  # the 8x8 image padded to a square and resized to 128: box (1,2)-(4,6) x16
    assert box.shape == (128, 128) and box.sum() == (4 - 1) * 16 * (6 - 2) * 16
    preds = read_predictions(tmp_path / "out" / "refcocog-regcap" / "predictions_val.jsonl")[0]
    assert preds["1"].text == "a brown dog" and preds["1"].masks is None


def test_refcoco_ground_truth_is_built_as_lisa_builds_it(tmp_path):
    d = make_refer(tmp_path)
    instances = json.loads((d / "refcoco" / "instances.json").read_text())
    # two polygons of one object overlapping in columns 2-3: LISA's summed label there is 2, i.e. background
    instances["annotations"][0]["segmentation"] = [[0, 0, 4, 0, 4, 4, 0, 4], [2, 0, 6, 0, 6, 4, 2, 4]]
    write(d / "refcoco" / "instances.json", instances)
    bench, loaded = load("refcoco", tmp_path)
    union = square(0, 0, 4) | square(0, 2, 4)  # 24 pixels; LISA's ground truth has 16 of them
    result = bench.score(
        loaded.items, {"0-0": Prediction("[SEG]", [rle(union)]), "0-1": Prediction("[SEG]", [rle(union)])}
    )
    assert result["metrics"]["ciou"] == pytest.approx(16 / 24) and result["metrics"]["giou"] == pytest.approx(
        16 / 24
    )


def test_gqa_scores_only_balanced_questions(tmp_path):
    d = tmp_path / "gqa"
    write(
        d / "testdev_balanced_questions.json",
        {
            "q1": {
                "imageId": "n1",
                "question": "Is it red?",
                "answer": "yes",
                "isBalanced": True,
                "types": {"structural": "verify"},
            },
            "q2": {
                "imageId": "n2",
                "question": "What is it?",
                "answer": "table",
                "isBalanced": False,
                "types": {"structural": "query"},
            },
        },
    )
    bench, loaded = load("gqa", tmp_path)
    result = bench.score(loaded.items, preds({"q1": "Yes.", "q2": "chair"}))
    assert result["metrics"]["accuracy"] == 1.0 and result["breakdown"]["answer_type"] == {
        "binary": {"accuracy": 1.0, "n": 1}
    }
    assert any("not balanced" in w for w in result["warnings"])


def test_mme_pairs_lines_and_warns_where_calculation_py_would_stop(tmp_path):
    make_mme(tmp_path)
    bench, loaded = load("mme", tmp_path)
    answers = {item.id: "Yes" if item.answer["answer"] == "yes" else "No" for item in loaded.items}
    answers["existence/a.jpg#1"] = "Yes\nIt is."
    result = bench.score(loaded.items, preds(answers))
    assert result["breakdown"]["subtask"]["existence"]["score"] == 200.0  # read from the first 4 characters
    assert any("tab or line break" in w for w in result["warnings"])
    odd = [item for item in loaded.items if item.id != "artwork/c.jpg#2"]
    result = bench.score(odd, preds(answers))
    assert result["breakdown"]["subtask"]["artwork"] == {
        "acc": 100.0,
        "acc_plus": 0.0,
        "score": 100.0,
        "n": 1,
    }
    assert any("odd number" in w for w in result["warnings"])


# --------------------------------------------------------------------------------------------------
# Our scorers against the official algorithms on tricky answers
# --------------------------------------------------------------------------------------------------

# (answer, what the official VQA evaluator's processPunctuation + processDigitArticle give)
OFFICIAL_VQA = [
    ("Two", "2"),
    ("none", "0"),
    ("the cat", "cat"),
    ("an apple", "apple"),
    ("dont", "don't"),
    ("Yes.", "yes"),
    ("1,000", "1000"),
    ("3.5", "3.5"),
    ("t-shirt", "t shirt"),
    ("black & white", "black & white"),
    ("left, right", "left right"),
    ("It's", "it's"),
    ("  Three  dogs ", "3 dogs"),
]


@pytest.mark.parametrize(("answer", "official"), OFFICIAL_VQA)
def test_vqa_normalisation_matches_the_official_evaluator(answer, official):
    assert metrics.normalize_vqa_answer(answer) == official


def test_vqa_accuracy_and_letters_match_the_official_rules():
    humans = ["2"] * 3 + ["3"] * 7
    assert metrics.vqa_accuracy("two", humans) == pytest.approx(0.9)  # 3 of 10: mean of (2/3 x3, 1 x7)
    assert metrics.vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(0.3)
    assert metrics.vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == 1.0
    assert (
        metrics.llava_vqav2_accuracy("Two", ["2"] * 10) == 1.0
        and metrics.vqaeval_accuracy("Two", ["2"] * 10) == 0.0
    )
    assert evalai_answer("The Dog's bowl, blue?") == "dog 's bowl blue"
    options = ["red", "blue", "green"]
    assert metrics.extract_option_letter("B", options) == "B"
    assert metrics.extract_option_letter("(C) green", options) == "C"
    assert metrics.extract_option_letter("The answer is B.", options) == "B"
    assert metrics.extract_option_letter("blue", options) == "B"
    assert metrics.extract_option_letter("A or B", options) is None
    assert sqa_parse("B. fish") == "B" and sqa_parse("The answer is A.") == "A"
    assert sqa_parse("The answer is A") == SQA_FAILED  # LLaVA's regex needs a character after the letter
    assert sqa_choice_index(sqa_parse("C"), 2) == -1 and sqa_parse("I think A") == SQA_FAILED
    assert (
        mme_answer("Yes, it is.") == "yes"
        and mme_answer("No.") == "no"
        and mme_answer("I think yes") == "other"
    )
    assert mme_answer("Not really") == "no"
    assert metrics.parse_pope_answer("No, there is not.") == "no" and metrics.parse_pope_answer("NO") == "yes"


# --------------------------------------------------------------------------------------------------
# Runner: results, report, resumption, submissions, bad inputs
# --------------------------------------------------------------------------------------------------


def test_run_writes_results_report_and_resumes(tmp_path):
    make_pope(tmp_path / "data")
    model = FakeModel({"thing0": "Yes", "thing1": "No"})
    out = tmp_path / "out"
    summary = run_benchmarks(model, tmp_path / "data", out, names=["pope"], opts=RunOptions(progress=False))
    res = summary["benchmarks"]["pope"]
    assert res["status"] == "scored" and res["counts"]["predicted"] == 8 and model.calls == 8
    assert (
        json.loads((out / "results.json").read_text())["benchmarks"]["pope"]["metrics"]["f1"]
        == res["metrics"]["f1"]
    )
    report = (out / "report.md").read_text()
    assert "| LLaVA-1.5-7B (paper) |" in report and "85.9" in report and "89.7" in report
    # a killed run: two complete lines and a partial one
    path = out / "pope" / "predictions_all.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:7])
    model.calls = 0
    again = run_benchmarks(model, tmp_path / "data", out, names=["pope"], opts=RunOptions(progress=False))
    assert model.calls == 6
    assert sorted(path.read_text().splitlines()) == sorted(lines)
    assert again["benchmarks"]["pope"]["metrics"] == res["metrics"]
    assert any("partial prediction line" in n for n in again["benchmarks"]["pope"]["notes"])
    assert read_predictions(path)[1] == 0


def test_missing_image_is_named_counted_and_scored_wrong(tmp_path):
    make_pope(tmp_path)
    (tmp_path / "pope" / "val2014" / "img3.jpg").unlink()
    model = FakeModel({}, default="yes")
    res = run_benchmark(
        model, BENCHMARKS["pope"], tmp_path / "pope", tmp_path / "out", RunOptions(progress=False)
    )
    assert res["counts"]["missing_images"] == 1 and res["counts"]["missing_predictions"] == 1
    assert "random-4: image not found" in res["problems"]["missing_images"][0]
    assert model.calls == 7
    assert any("scored as wrong" in w for w in res["warnings"])


def test_invalid_records_are_named_refused_or_counted(tmp_path):
    d = make_pope(tmp_path)
    path = d / "coco" / "coco_pope_random.json"
    rows = path.read_text().splitlines()
    rows[1] = json.dumps({"image": "img1.jpg", "text": "Is there a cat?", "label": "no"})  # no question id
    rows[2] = rows[2][:-5]  # malformed JSON
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as err:
        run_benchmark(FakeModel({}), BENCHMARKS["pope"], d, tmp_path / "out", RunOptions(progress=False))
    message = str(err.value)
    assert "2 invalid record(s)" in message and "--skip-invalid" in message
    assert f"{path} line 2: no question id" in message and f"{path} line 3: invalid JSON" in message
    res = run_benchmark(
        FakeModel({}), BENCHMARKS["pope"], d, tmp_path / "out", RunOptions(progress=False, skip_invalid=True)
    )
    assert res["counts"]["invalid_records"] == 2 and res["counts"]["items"] == 6
    assert sorted(p.split(":")[0] for p in res["problems"]["invalid_records"]) == [
        f"{path} line 2",
        f"{path} line 3",
    ]


def test_keyed_json_files_name_bad_entries(tmp_path):
    """MM-Vet and GQA map ids to records: an entry that is not an object is a named problem, a file that is
    not an object is refused with what it should map."""
    d = make_mmvet(tmp_path)
    path = d / "mm-vet.json"
    data = json.loads(path.read_text())
    data["v1_2"] = ["not", "a", "record"]
    write(path, data)
    _, result = load("mm-vet", tmp_path)
    assert [item.id for item in result.items] == ["v1_0", "v1_1"]
    assert result.problems == [f"{path} record 3 (id 'v1_2'): expected a JSON object"]
    write(path, list(data.values()))
    with pytest.raises(DataError, match="expected a JSON object mapping ids"):
        BENCHMARKS["mm-vet"].load(d)


def test_answer_file_for_another_split_is_refused(tmp_path):
    make_vqav2(tmp_path, ann_subtype="train2014")
    with pytest.raises(DataError, match="split 'train2014'.*'val2014'.*another split"):
        load("vqav2", tmp_path)
    d = tmp_path / "textvqa"
    write(d / "TextVQA_0.5.1_val.json", {"dataset_split": "train", "data": []})
    with pytest.raises(DataError, match="dataset_split"):
        load("textvqa", tmp_path)
    g = tmp_path / "gqa"
    write(g / "testdev_balanced_questions.json", {"q9": {"imageId": "n", "question": "Q?", "answer": "a"}})
    jsonl(g / "llava_gqa_testdev_balanced.jsonl", [{"question_id": "q1", "image": "n1.jpg", "text": "Q?"}])
    with pytest.raises(DataError, match="none of the 1 question ids"):
        load("gqa", tmp_path)
    make_refer(tmp_path / "r")
    with pytest.raises(DataError, match="no refs of split 'testB'"):
        load("refcoco", tmp_path / "r", "testB")


def test_server_only_split_writes_submission(tmp_path):
    make_vqav2_testdev(tmp_path)
    res = run_benchmark(
        FakeModel({"sunny": "Yes."}),
        BENCHMARKS["vqav2"],
        tmp_path / "vqav2",
        tmp_path / "out",
        RunOptions(progress=False),
    )
    assert res["status"] == "submission only" and res["headline"]["value"] is None
    rows = json.loads(Path(res["submission"][0]).read_text())
    assert rows == [
        {"question_id": 5, "answer": "yes"},
        {"question_id": 6, "answer": ""},
    ]  # every test2015 question
    assert any("submit" in f for f in res["flags"])


def test_segmentation_benchmarks_run_text_models_and_flag_them(tmp_path):
    make_refer(tmp_path / "data")
    make_pope(tmp_path / "data")
    lines: list[str] = []
    summary = run_benchmarks(
        FakeModel({}),
        tmp_path / "data",
        tmp_path / "out",
        suite="omg-llava",
        opts=RunOptions(progress=False),
        echo=lines.append,
    )
    res = summary["benchmarks"]["refcoco"]
    assert res["metrics"]["ciou"] == 0.0 and any("model does not segment" in f for f in res["flags"])
    assert "gcg" in summary["skipped"] and any("skipping gcg" in line for line in lines)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| 0.0 † |" in report and "78.0" in report


# --------------------------------------------------------------------------------------------------
# Judged benchmarks against a fake OpenAI-compatible server
# --------------------------------------------------------------------------------------------------


@pytest.fixture()
def judge_server():
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, "body": body})
            content = body["messages"][-1]["content"]
            if "Correctness" in content:
                # the first grade is unusable, so the runner asks again
                reply = (
                    "n/a"
                    if sum("Correctness" in s["body"]["messages"][-1]["content"] for s in seen) == 1
                    else "0.7"
                )
            else:
                reply = "8 6\nAssistant 2 is shorter."
            payload = json.dumps(
                {
                    "id": "x",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": reply},
                        }
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    server.shutdown()
    server.server_close()


def test_judged_benchmarks_write_requests_then_score_with_a_judge(tmp_path, judge_server):
    url, seen = judge_server
    make_mmvet(tmp_path)
    make_llava_bench(tmp_path)
    model = FakeModel({"equation": "x = -1 or x = -5"}, default="A cat.")
    pending = run_benchmark(
        model, BENCHMARKS["mm-vet"], tmp_path / "mm-vet", tmp_path / "out", RunOptions(progress=False)
    )
    assert pending["status"] == "awaiting judge" and pending["metrics"] == {} and not seen
    request = json.loads((tmp_path / "out" / "mm-vet" / "judge_requests.jsonl").read_text().splitlines()[0])
    assert request["url"] == "/v1/chat/completions" and request["body"]["model"] == "gpt-4-0613"
    assert request["body"]["messages"][0]["content"].endswith(
        "What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | "
    )
    opts = RunOptions(progress=False, judge_endpoint=url, judge_model="judge-1", judge_backend="openai")
    res = run_benchmark(model, BENCHMARKS["mm-vet"], tmp_path / "mm-vet", tmp_path / "out", opts)
    assert res["status"] == "scored" and res["metrics"]["total"] == pytest.approx(0.7)
    assert res["breakdown"]["capability"]["math"]["score"] == pytest.approx(0.7)
    assert (
        len(seen) == 3 and seen[0]["path"] == "/v1/chat/completions" and seen[0]["body"]["model"] == "judge-1"
    )
    again = run_benchmark(model, BENCHMARKS["mm-vet"], tmp_path / "mm-vet", tmp_path / "out", opts)
    assert len(seen) == 3 and again["metrics"] == res["metrics"]  # replies are reused
    opts.judge_backend = "httpx"
    bench = run_benchmark(
        model, BENCHMARKS["llava-bench"], tmp_path / "llava-bench-in-the-wild", tmp_path / "out", opts
    )
    assert bench["metrics"]["relative_score"] == pytest.approx(75.0)
    assert bench["breakdown"]["category"]["detail"]["n"] == 1
    content = seen[-1]["body"]["messages"][1]["content"]
    assert content.startswith("[Context]\nA cat sits on a mat.\n\n[Question]\nWhat animal is it?")
    assert (
        "[Assistant 1]\nA cat.\n\n[End of Assistant 1]" in content and seen[-1]["body"]["temperature"] == 0.2
    )
    assert mmvet_score("0.4 because") == 0.4 and mmvet_score("1.5") is None
    assert llava_bench_scores("7, 9\nwhy") == (7.0, 9.0) and llava_bench_scores("seven") is None


# --------------------------------------------------------------------------------------------------
# CLI end to end on the tiny model
# --------------------------------------------------------------------------------------------------


def test_cli_eval_benchmarks_on_tiny_model(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    make_pope(data)
    make_mme(data)
    make_scienceqa(data)
    out = tmp_path / "out"
    args = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--benchmark",
        "pope",
        "--benchmark",
        "mme",
        "--benchmark",
        "scienceqa",
        "--out",
        str(out),
        "--max-new-tokens",
        "2",
        "--batch-size",
        "4",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "pope" in printed and "mme" in printed and "report.md" in printed
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["benchmarks"]) == {"pope", "mme", "scienceqa"}
    assert summary["benchmarks"]["mme"]["counts"]["predicted"] == 8
    assert len((out / "scienceqa" / "predictions_test.jsonl").read_text().splitlines()) == 2
    assert "SQA-IMG" in (out / "report.md").read_text()
    assert main([*args[:5], "--benchmark", "gqa", "--out", str(out)]) == 2
    assert "gqa: no data" in capsys.readouterr().err
    assert main([*args[:5], "--benchmark", "nope", "--out", str(out)]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_cli_judge_flags(tiny_model_dir, tmp_path, judge_server, capsys):
    url, seen = judge_server
    make_llava_bench(tmp_path / "data")
    base = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(tmp_path / "data"),
        "--benchmark",
        "llava-bench",
        "--out",
        str(tmp_path / "out"),
        "--max-new-tokens",
        "2",
    ]
    assert main([*base, "--judge-endpoint", url]) == 2
    assert "--judge-model" in capsys.readouterr().err
    assert main([*base, "--judge-endpoint", url, "--judge-model", "local-judge"]) == 0
    res = json.loads((tmp_path / "out" / "llava-bench" / "results.json").read_text())
    assert res["status"] == "scored" and res["metrics"]["relative_score"] == pytest.approx(75.0)
    assert {s["body"]["model"] for s in seen} == {"local-judge"}
