"""Scoring files end to end: dispatch per task, id bookkeeping, bad input, and `unillava score`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import unillava.cli as cli
from unillava.errors import DataError
from unillava.evaluation import metrics
from unillava.evaluation.scoring import results_table, score_files, score_task


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def rle(mask: np.ndarray) -> dict:
    r = metrics.to_rle(mask)
    return {"size": r["size"], "counts": r["counts"].decode("ascii")}


def box(top: int, left: int, bottom: int, right: int, h: int = 8, w: int = 8) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[top:bottom, left:right] = True
    return m


VQA_ANNS = [
    {"id": "q1", "image": "a.png", "task": "vqa", "conversations": [], "answers": ["red"], "qtype": "color"},
    {"id": "q2", "image": "b.png", "task": "vqa", "conversations": [], "answers": ["2"], "qtype": "count"},
    {
        "id": "q3",
        "image": "c.png",
        "task": "vqa",
        "conversations": [],
        "answers": ["circle"],
        "qtype": "shape",
    },
    {"id": "q4", "image": "d.png", "task": "vqa", "conversations": [], "answers": ["blue"], "qtype": "color"},
]
VQA_PREDS = [
    {"id": "q1", "text": "Red."},
    {"id": "q2", "text": "Two"},
    {"id": "q2", "text": "five"},
    {"id": "zz", "text": "red"},
    {"id": "q4", "text": "green"},
]


def test_vqa_scores_counts_and_breakdown() -> None:
    out = score_task("vqa", VQA_PREDS, VQA_ANNS)
    assert out["metrics"]["accuracy"] == pytest.approx(2 / 4)
    assert out["metrics"]["exact_match"] == pytest.approx(1 / 4)
    assert out["counts"] == {"annotations": 4, "predictions": 5, "missing": 1, "unknown": 1, "duplicates": 1}
    qtype = out["breakdown"]["qtype"]
    assert qtype["color"] == {"accuracy": 0.5, "exact_match": 0.5, "n": 2}
    assert qtype["count"] == {"accuracy": 1.0, "exact_match": 0.0, "n": 1}
    assert qtype["shape"]["accuracy"] == 0.0
    text = " ".join(out["warnings"])
    assert "'q3'" in text and "'zz'" in text and "first on line 2" in text
    assert results_table(out).row_count > 5


def test_long_style_vqa_counts_the_short_answer_inside_the_sentence() -> None:
    anns = [
        {
            "id": "l1",
            "image": "a.png",
            "task": "vqa",
            "conversations": [],
            "answers": ["2", "two"],
            "style": "long",
        },
        {
            "id": "l2",
            "image": "a.png",
            "task": "vqa",
            "conversations": [],
            "answers": ["left"],
            "style": "long",
        },
        {
            "id": "l3",
            "image": "a.png",
            "task": "vqa",
            "conversations": [],
            "answers": ["red"],
            "style": "long",
        },
        {
            "id": "s1",
            "image": "a.png",
            "task": "vqa",
            "conversations": [],
            "answers": ["red"],
            "style": "short",
        },
    ]
    preds = [
        {"id": "l1", "text": "There are two blue stars."},
        {"id": "l2", "text": "The circle is to the right of it."},
        {"id": "l3", "text": "It is reddish."},
        {"id": "s1", "text": "The shape is red."},
    ]
    out = score_task("vqa", preds, anns)
    # l1 right (number word normalised), l2 and l3 wrong (whole words only), s1 wrong (short style is strict).
    assert out["metrics"]["accuracy"] == pytest.approx(1 / 4)


def test_score_files_reads_directory_and_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    ann_dir = tmp_path / "tasks" / "val"
    write_jsonl(
        ann_dir / "fine_count.jsonl",
        [
            {"id": "c1", "task": "fine_count", "answers": ["3"]},
            {"id": "c2", "task": "fine_count", "answers": ["10"]},
        ],
    )
    pred = write_jsonl(
        tmp_path / "run" / "preds.jsonl", [{"id": "c1", "text": "three"}, "", {"id": "c2", "text": "1 0"}]
    )
    out = score_files("fine_count", pred, ann_dir)
    assert out["metrics"]["accuracy"] == 0.5
    assert out["ann_file"].endswith("fine_count.jsonl")

    monkeypatch.setattr(cli, "COMMAND_MODULES", [cli.score_cmd])
    assert cli.main(["score", "--task", "fine_count", "--pred", str(pred), "--ann", str(ann_dir)]) == 0
    written = json.loads((tmp_path / "run" / "results_fine_count.json").read_text())
    assert written["metrics"]["accuracy"] == 0.5 and written["counts"]["missing"] == 0
    assert "accuracy" in capsys.readouterr().out

    other = tmp_path / "elsewhere"
    assert (
        cli.main(
            ["score", "--task", "fine_count", "--pred", str(pred), "--ann", str(ann_dir), "--out", str(other)]
        )
        == 0
    )
    assert (other / "results_fine_count.json").is_file()

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "c1", "text": "3"}, {"id": "c2", "text": 3}])
    assert cli.main(["score", "--task", "fine_count", "--pred", str(bad), "--ann", str(ann_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {bad} line 2: field 'text' must be a string"


def test_mc_and_pope() -> None:
    anns = [
        {"id": "m1", "options": ["red", "blue", "green"], "answer": "B", "qtype": "color"},
        {"id": "m2", "options": ["red", "blue", "green"], "answer": "C", "qtype": "color"},
        {"id": "m3", "options": ["red", "blue", "green"], "answer": "A", "qtype": "shape"},
    ]
    out = score_task(
        "mc", [{"id": "m1", "text": "The answer is (B)."}, {"id": "m2", "text": "A and B"}], anns
    )
    assert out["metrics"] == {"accuracy": pytest.approx(1 / 3), "no_answer": pytest.approx(2 / 3)}
    assert out["breakdown"]["qtype"]["color"] == {"accuracy": 0.5, "no_answer": 0.5, "n": 2}

    anns = [
        {"id": "p1", "answer": "yes", "category": "random"},
        {"id": "p2", "answer": "No", "category": "random"},
        {"id": "p3", "answer": "no", "category": "adversarial"},
        {"id": "p4", "answer": "yes", "category": "adversarial"},
    ]
    preds = [
        {"id": "p1", "text": "Yes, there is."},
        {"id": "p2", "text": "There is no cat."},
        {"id": "p3", "text": "yes"},
    ]
    out = score_task("pope", preds, anns)
    assert out["metrics"]["accuracy"] == 0.5 and out["metrics"]["yes_ratio"] == 0.5
    cats = out["breakdown"]["category"]
    assert cats["random"]["accuracy"] == 1.0 and cats["random"]["n"] == 2
    assert cats["adversarial"]["accuracy"] == 0.0 and cats["adversarial"]["precision"] == 0.0
    assert out["counts"]["missing"] == 1


def test_refseg_missing_is_empty_mask() -> None:
    gt1, gt2, gt3 = box(0, 0, 2, 4), box(4, 4, 8, 8), box(0, 0, 1, 1)
    anns = [
        {"id": "s1", "masks": [rle(gt1)]},
        {"id": "s2", "masks": [rle(gt2)]},
        {"id": "s3", "masks": [rle(gt3)]},
    ]
    preds = [
        {"id": "s1", "text": "[SEG]", "masks": [rle(box(0, 2, 2, 6)), rle(gt1)]},
        {"id": "s2", "masks": [rle(gt2)]},
    ]
    out = score_task("refseg", preds, anns)
    assert out["metrics"]["ciou"] == pytest.approx((4 + 16 + 0) / (12 + 16 + 1))
    assert out["metrics"]["giou"] == pytest.approx((4 / 12 + 1 + 0) / 3)
    assert out["metrics"]["precision@0.5"] == pytest.approx(1 / 3)
    assert any("beyond" in w for w in out["warnings"])
    assert any("empty mask" in w for w in out["warnings"])


def test_gcg_phrases_from_markup() -> None:
    a, b = box(0, 0, 3, 3), box(4, 4, 8, 8)
    anns = [
        {
            "id": "g1",
            "phrases": ["a red circle", "a blue square"],
            "masks": [rle(a), rle(b)],
            "answers": ["A red circle is left of a blue square."],
        },
        {"id": "g2", "phrases": ["a green triangle"], "masks": [rle(b)], "answers": ["A green triangle."]},
    ]
    preds = [
        {
            "id": "g1",
            "text": "<p>A red circle</p> [SEG] is left of <p>a blue square</p> [SEG].",
            "masks": [rle(a), rle(b)],
        },
        {"id": "g2", "text": "A dog.", "masks": [], "phrases": []},
    ]
    out = score_task("gcg", preds, anns, meteor=False)
    m = out["metrics"]
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["miou"] == pytest.approx(0.5) and m["miou_per_gt"] == pytest.approx(0.5)
    assert m["ap50"] == pytest.approx(2 / 3 * 1.0, abs=0.01)
    assert m["cider"] is not None and m["meteor"] is None


def test_region_caption_attributes() -> None:
    anns = [
        {
            "id": "r1",
            "answers": ["a small red circle"],
            "attributes": {"color": "red", "shape": "circle", "size": "small"},
        },
        {
            "id": "r2",
            "answers": ["a large blue square"],
            "attributes": {"color": "blue", "shape": "square", "size": "large"},
        },
    ]
    preds = [{"id": "r1", "text": "A small red circle."}, {"id": "r2", "text": "a large green square"}]
    out = score_task("region_caption", preds, anns, meteor=False)
    assert out["metrics"]["attribute_accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert out["breakdown"]["attribute"]["color"] == {"accuracy": 0.5, "n": 2}
    assert out["metrics"]["cider"] > 0


def test_caption_with_meteor() -> None:
    if not metrics.java_available():
        pytest.skip("java is not installed")
    anns = [
        {"id": "k1", "answers": ["a red circle", "one red circle"]},
        {"id": "k2", "answers": ["two blue squares"]},
    ]
    out = score_task("caption", [{"id": "k1", "text": "A red circle."}], anns)
    assert 0.0 < out["metrics"]["meteor"] < 1.0
    assert out["counts"]["missing"] == 1


@pytest.mark.parametrize(
    ("task", "preds", "anns", "message"),
    [
        (
            "vqa",
            [{"id": "q1"}],
            [{"id": "q1", "answers": ["a"]}],
            "predictions line 1: field 'text' must be a string",
        ),
        (
            "vqa",
            [{"text": "a"}],
            [{"id": "q1", "answers": ["a"]}],
            "predictions line 1: field 'id' must be a string",
        ),
        (
            "vqa",
            [],
            [{"id": "q1", "answers": "a"}],
            "annotations line 1: field 'answers' must be a list of strings",
        ),
        (
            "vqa",
            [],
            [{"id": "q1", "answers": []}],
            "annotations line 1: field 'answers' must have at least 1",
        ),
        (
            "vqa",
            [],
            [{"id": "q1", "answers": ["a"]}, {"id": "q1", "answers": ["b"]}],
            "line 2: field 'id' 'q1' repeats",
        ),
        ("vqa", [], [{"id": "q1", "task": "mc", "answers": ["a"]}], "field 'task' is 'mc'"),
        ("mc", [], [{"id": "m", "options": ["x", "y"], "answer": "C"}], "field 'answer' must be one of A, B"),
        ("pope", [], [{"id": "p", "answer": "maybe"}], "field 'answer' must be 'yes' or 'no'"),
        (
            "refseg",
            [],
            [{"id": "s", "masks": [{"size": [2, 2], "counts": "zz"}]}],
            "field 'masks'[0]: RLE counts",
        ),
        (
            "refseg",
            [{"id": "s", "masks": [{"size": [3, 3], "counts": [9]}]}],
            [{"id": "s", "masks": [{"size": [2, 2], "counts": [4]}]}],
            "predictions line 1: field 'masks'[0] has size",
        ),
        ("gcg", [], [{"id": "g", "phrases": ["x"], "masks": [], "answers": ["x"]}], "differ in length"),
        ("vqa", [], [], "annotations: no annotations"),
    ],
)
def test_bad_records(task: str, preds: list, anns: list, message: str) -> None:
    with pytest.raises(DataError) as info:
        score_task(task, preds, anns)
    assert message in str(info.value)


def test_bad_files(tmp_path: Path) -> None:
    ann = write_jsonl(tmp_path / "vqa.jsonl", [{"id": "q1", "answers": ["a"]}])
    pred = write_jsonl(tmp_path / "preds.jsonl", [{"id": "q1", "text": "a"}, "{not json", "[1]"])
    with pytest.raises(DataError, match=r"preds.jsonl line 2: invalid JSON"):
        score_files("vqa", pred, ann)
    with pytest.raises(DataError, match="no such file"):
        score_files("vqa", tmp_path / "nope.jsonl", ann)
    with pytest.raises(DataError, match="has no caption.jsonl"):
        score_files("caption", pred, tmp_path)
