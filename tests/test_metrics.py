"""Hand-computed cases for the metric functions, including the official scorers' quirks."""

from __future__ import annotations

import os

import numpy as np
import pytest

from unillava.evaluation import metrics as M


def box(h: int, w: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[top:bottom, left:right] = True
    return m


def rle_str(mask: np.ndarray) -> dict:
    rle = M.to_rle(mask)
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


# ---------------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two dogs.", "2 dogs"),
        ("1,000", "1000"),
        ("yes, it is", "yes it is"),
        ("red/blue", "red blue"),
        ("Dont", "don't"),
        ("e.g. 2.5", "eg 2.5"),
        ("3.14.", "3.14"),
        ("  Yes\t\n", "yes"),
        ("a\u00a0cat", "cat"),
        ("\u3000yes\u2003", "yes"),
        ("Café!", "café"),
        ("the an a", ""),
        ("none", "0"),
        ("(left)", "left"),
        ("x-ray", "x ray"),
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert M.normalize_vqa_answer(raw) == expected


def test_vqa_accuracy_ten_answers_official_leave_one_out() -> None:
    expected = [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    for matches, want in enumerate(expected):
        answers = ["2"] * matches + ["3"] * (10 - matches)
        assert M.vqa_accuracy("two", answers) == pytest.approx(want)


def test_vqa_accuracy_few_answers_is_any_match() -> None:
    assert M.vqa_accuracy("The red one.", ["red one", "crimson"]) == 1.0
    assert M.vqa_accuracy("crimson", ["red one", "crimson"]) == 1.0
    assert M.vqa_accuracy("blue", ["red one", "crimson"]) == 0.0
    assert M.vqa_accuracy("", ["red"]) == 0.0
    assert M.vqa_accuracy("  Three\n", ["3"]) == 1.0
    with pytest.raises(ValueError):
        M.vqa_accuracy("x", [])


def test_exact_match() -> None:
    assert M.exact_match("Yes.", "yes") == 1.0
    assert M.exact_match("  the  Red\tcar ", ["the red car"]) == 1.0
    assert M.exact_match("two", ["2"]) == 0.0
    assert M.exact_match("yes...", ["yes"]) == 1.0
    assert M.exact_match("", ["a"]) == 0.0


# ------------------------------------------------------------------------------------------------ MC

OPTS = ["red", "blue", "green"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("The answer is B", "B"),
        ("C: green", "C"),
        ("blue", "B"),
        ("it is Blue", "B"),
        ("A and B", None),
        ("b", None),
        ("D", None),
        ("I think the colour of the shape is blue", "B"),  # VLMEvalKit c6bdffd3: no answer-length limit
        ("Cannot determine the answer", "Z"),  # a refusal reads as "Z", never a right letter
        ("Z", "Z"),
        ("", None),
        ("A cat", "A"),
    ],
)
def test_extract_option_letter(text: str, expected: str | None) -> None:
    assert M.extract_option_letter(text, OPTS) == expected


def test_extract_option_letter_text_ambiguity() -> None:
    assert M.extract_option_letter("dark red", ["red", "dark red"]) is None
    assert M.extract_option_letter("verde ü", ["rot", "verde ü"]) == "B"


# ---------------------------------------------------------------------------------------------- POPE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes, there is a dog.", "yes"),
        ("No, there is not.", "no"),
        ("There is no dog in the image.", "no"),
        ("There is not a dog", "no"),
        ("Yes. No.", "yes"),
        ("no.", "no"),
        ("", "yes"),
        ("NO", "yes"),
    ],
)
def test_parse_pope_answer(text: str, expected: str) -> None:
    assert M.parse_pope_answer(text) == expected


def test_pope_metrics_with_missing_prediction() -> None:
    out = M.pope_metrics(["Yes", "No", "yes", None], ["yes", "no", "no", "yes"])
    assert (out["tp"], out["tn"], out["fp"], out["fn"]) == (1, 1, 1, 1)
    assert out["accuracy"] == 0.5
    assert out["precision"] == 0.5
    assert out["recall"] == 0.5
    assert out["f1"] == 0.5
    assert out["yes_ratio"] == 0.5


def test_pope_metrics_no_positive_predictions() -> None:
    out = M.pope_metrics(["no", "no"], ["yes", "no"])
    assert out["precision"] == 0.0 and out["recall"] == 0.0 and out["f1"] == 0.0
    assert out["accuracy"] == 0.5 and out["yes_ratio"] == 0.0
    with pytest.raises(ValueError):
        M.pope_metrics(["yes"], ["maybe"])


# --------------------------------------------------------------------------------------------- masks


def test_rle_round_trip_and_formats() -> None:
    m = box(4, 5, 1, 2, 3, 4)
    assert np.array_equal(M.decode_mask(rle_str(m)), m)
    assert np.array_equal(M.decode_mask({"size": [4, 5], "counts": [9, 2, 2, 2, 5]}), m)
    assert np.array_equal(M.decode_mask(m.astype(np.uint8)), m)
    rng = np.random.default_rng(0)
    noisy = rng.random((7, 9)) > 0.5
    assert np.array_equal(M.decode_mask(rle_str(noisy)), noisy)
    assert np.array_equal(M.decode_mask(M.to_rle(noisy)), noisy)


@pytest.mark.parametrize(
    "bad",
    [
        {"size": [4, 5], "counts": ""},
        {"size": [4, 5], "counts": "zz"},
        {"size": [4, 5], "counts": [1, 2]},
        {"size": [4], "counts": "0"},
        {"size": [4, 5], "counts": 3},
        {"size": [4, 5], "counts": [25, -5]},
    ],
)
def test_bad_rle_is_rejected(bad: dict) -> None:
    with pytest.raises(ValueError):
        M.decode_mask(bad)


def test_mask_iou() -> None:
    a = box(4, 6, 0, 0, 2, 3)
    b = box(4, 6, 0, 1, 2, 4)
    assert M.mask_iou(a, b) == pytest.approx(4 / 8)
    assert M.mask_iou(rle_str(a), rle_str(a)) == 1.0
    empty = np.zeros((4, 6), bool)
    assert M.mask_iou(empty, empty) == 1.0
    assert M.mask_iou(None, a) == 0.0
    assert M.mask_iou(None, empty) == 1.0
    with pytest.raises(ValueError):
        M.mask_iou(np.zeros((3, 3), bool), a)


def test_segmentation_metrics_ciou_giou() -> None:
    gt1, pred1 = box(4, 6, 0, 0, 1, 4), box(4, 6, 0, 2, 1, 6)
    gt2 = box(4, 6, 1, 1, 3, 3)
    empty = np.zeros((4, 6), bool)
    gt4 = box(4, 6, 3, 0, 4, 3)
    out = M.segmentation_metrics([pred1, rle_str(gt2), empty, None], [gt1, gt2, empty, gt4])
    assert out["ciou"] == pytest.approx((2 + 4 + 0 + 0) / (6 + 4 + 0 + 3))
    assert out["giou"] == pytest.approx((2 / 6 + 1 + 1 + 0) / 4)
    assert out["precision@0.5"] == pytest.approx(0.5)
    assert out["n"] == 4
    assert M.segmentation_metrics([], [])["ciou"] == 0.0


# ------------------------------------------------------------------------------------------ captions


def test_simple_tokenize() -> None:
    assert M.simple_tokenize("Don't STOP,\tcafé!") == "don t stop café"


def test_cider_identical_beats_different_without_java(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(M, "java_available", lambda: False)
    refs = [["a red circle on the left"], ["two blue squares"], ["a green triangle at the top"]]
    same = M.caption_metrics([r[0] for r in refs], refs)
    diff = M.caption_metrics(["a dog", "the sky", "nothing here"], refs)
    assert same["tokenizer"] == "simple"
    assert same["cider"] > 5.0 > 0.5 > diff["cider"]
    assert same["meteor"] is None
    assert M.METEOR_NEEDS_JAVA in same["warnings"]
    single = M.caption_metrics(["a red circle"], [["a red circle"]], meteor=False)
    assert single["cider"] == 0.0 and any("idf" in w for w in single["warnings"])
    with pytest.raises(ValueError):
        M.caption_metrics(["x"], [[]])


def test_broken_java_falls_back(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "java"
    fake.write_text("#!/bin/sh\necho broken >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ.get('PATH', '')}")
    monkeypatch.setattr(M, "_meteor_scorer", None)
    out = M.caption_metrics(["a red circle", "two squares"], [["a red circle"], ["two blue squares"]])
    assert out["tokenizer"] == "simple" and out["cider"] > 0
    assert out["meteor"] is None
    assert any("PTB tokenizer failed" in w for w in out["warnings"])
    assert any("METEOR failed" in w for w in out["warnings"])
    assert M._meteor_scorer is None


def test_caption_metrics_with_java() -> None:
    if not M.java_available():
        pytest.skip("java is not installed")
    refs = [["A red circle, on the left."], ["Two blue squares."], ["A green triangle at the top"]]
    same = M.caption_metrics([r[0] for r in refs], refs)
    diff = M.caption_metrics(["a dog", "", "café ||| crème"], refs)
    assert same["tokenizer"] == "ptb"
    assert same["cider"] > diff["cider"]
    assert 0.0 <= diff["meteor"] < same["meteor"] <= 1.0
    assert same["meteor"] == pytest.approx(1.0, abs=0.05)


# ------------------------------------------------------------------------------------ attributes


def test_attribute_in_caption() -> None:
    assert M.attribute_in_caption("red", "A Red circle.")
    assert not M.attribute_in_caption("red", "a reddish circle")
    assert M.attribute_in_caption("light blue", "a light-blue box")
    assert not M.attribute_in_caption("light blue", "a blue light")
    assert M.attribute_in_caption("7", "it says seven")
    assert not M.attribute_in_caption("", "anything")


def test_attribute_accuracy() -> None:
    captions = ["a small red circle with the text 7", "a large blue square", None]
    attrs = [
        {"color": "red", "shape": "circle", "size": "small", "text": "7"},
        {"color": "green", "shape": "square", "size": "large", "text": None},
        {"color": "red", "shape": "circle"},
    ]
    out = M.attribute_accuracy(captions, attrs)
    assert out["per_attribute"] == {
        "color": pytest.approx(1 / 3),
        "shape": pytest.approx(2 / 3),
        "size": 1.0,
        "text": 1.0,
    }
    assert out["n"] == {"color": 3, "shape": 3, "size": 2, "text": 1}
    assert out["mean"] == pytest.approx((1 / 3 + 2 / 3 + 1 + 1) / 4)
    assert M.attribute_accuracy([], [])["mean"] is None


# ----------------------------------------------------------------------------------------------- GCG


def test_gcg_markup() -> None:
    text = "<p> A red circle </p> [SEG] is left of\n<p>a blue square</p> [SEG]."
    assert M.strip_gcg_markup(text) == "A red circle is left of a blue square ."
    assert M.extract_gcg_phrases(text) == ["A red circle", "a blue square"]
    assert M.extract_gcg_phrases("no markup") == []


def test_phrase_similarity() -> None:
    assert M.phrase_similarity("the red circle", "Red circle") == 1.0
    assert M.phrase_similarity("red circle", "blue circle") == pytest.approx(0.5)
    assert M.phrase_similarity("", "") == 1.0
    assert M.phrase_similarity("a", "red") == 0.0


A = box(6, 6, 0, 0, 2, 2)
B = box(6, 6, 3, 3, 5, 5)
B_HALF = box(6, 6, 3, 3, 5, 4)


def test_greedy_pairs_and_miou() -> None:
    assert M.greedy_iou_pairs([A, A], [A]) == [1.0]
    assert M.greedy_iou_pairs([B_HALF, A], [A, B]) == [1.0, 0.5]
    preds = [[A, B_HALF], [A], []]
    gts = [[A, B], [A, B], [A]]
    assert M.gcg_miou(preds, gts) == pytest.approx((0.75 + 1.0 + 0.0) / 3)
    assert M.gcg_miou(preds, gts, per_gt=True) == pytest.approx((0.75 + 0.5 + 0.0) / 3)


def test_gcg_recall_rules() -> None:
    gts, gp = [[A, B]], [["red circle", "blue square"]]
    assert M.gcg_recall([[A, B]], [["the red circle", "green triangle"]], gts, gp) == 0.5
    assert M.gcg_recall([[A, B]], [["wrong", "blue square"]], gts, gp) == 0.0
    assert M.gcg_recall([[A]], [[]], gts, gp) == 0.0
    assert M.gcg_recall([[B_HALF, A]], [["blue square", "red circle"]], gts, gp) == 1.0
    assert M.gcg_recall([[]], [[]], [[]], [[]]) == 0.0


def test_gcg_ap50() -> None:
    assert M.gcg_ap50([[A, B]], [[A, B]]) == pytest.approx(1.0)
    assert M.gcg_ap50([[A, A]], [[A]]) == pytest.approx(1.0)
    assert M.gcg_ap50([[A], []], [[A], [B]]) == pytest.approx(51 / 101)
    assert M.gcg_ap50([[]], [[A]]) == 0.0
    assert M.gcg_ap50([[B]], [[A]]) == 0.0
    assert M.gcg_ap50([[A]], [[]]) is None
