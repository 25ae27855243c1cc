"""`unillava eval`: predictions are written as they come, a rerun resumes, results and report are written."""

from __future__ import annotations

import json

import pytest

from unillava.cli import main
from unillava.data.shapes import generate_dataset
from unillava.evaluation.runner import evaluate
from unillava.inference import load


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_dataset(
        out,
        4,
        7,
        n_val=1,
        n_test=3,
        min_size=128,
        max_size=128,
        difficulty="easy",
        workers=1,
        tasks=["vqa", "pope", "refseg"],
    )
    return out


def test_eval_writes_predictions_results_and_report(tiny_model_dir, shapes_dir, tmp_path):
    lm = load(tiny_model_dir)
    summary = evaluate(lm, shapes_dir, ["vqa", "pope", "refseg"], tmp_path, limit=5, max_new_tokens=4)
    for task in ("vqa", "pope", "refseg"):
        preds = (tmp_path / f"predictions_{task}.jsonl").read_text().splitlines()
        assert len(preds) == 5
        assert summary["tasks"][task]["counts"]["missing"] == 0
    assert "accuracy" in summary["tasks"]["vqa"]["metrics"]
    assert "cIoU" in summary["tasks"]["refseg"]["metrics"] or "ciou" in summary["tasks"]["refseg"]["metrics"]
    report = (tmp_path / "report.md").read_text()
    assert "## vqa" in report and "report_images/" in report
    assert json.loads((tmp_path / "results.json").read_text())["tasks"].keys() == {"vqa", "pope", "refseg"}


def test_interrupted_eval_resumes(tiny_model_dir, shapes_dir, tmp_path):
    lm = load(tiny_model_dir)
    evaluate(lm, shapes_dir, ["vqa"], tmp_path, limit=3, max_new_tokens=4)
    preds = tmp_path / "predictions_vqa.jsonl"
    lines = preds.read_text().splitlines()
    # A run killed mid-write: one complete line and a partial one.
    preds.write_text(lines[0] + "\n" + lines[1][:10])
    calls = []
    original = lm.generate_conversations

    def counting(conversations, *args, **kwargs):
        calls.append(len(conversations))
        return original(conversations, *args, **kwargs)

    lm.generate_conversations = counting
    evaluate(lm, shapes_dir, ["vqa"], tmp_path, limit=3, max_new_tokens=4)
    assert sum(calls) == 2
    assert preds.read_text().splitlines() == lines


def test_eval_cli_and_unknown_task(tiny_model_dir, shapes_dir, tmp_path, capsys):
    code = main(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(shapes_dir),
            "--task",
            "pope",
            "--limit",
            "2",
            "--out",
            str(tmp_path),
            "--max-new-tokens",
            "3",
        ]
    )
    assert code == 0
    assert "pope" in capsys.readouterr().out
    code = main(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(shapes_dir),
            "--task",
            "gcg",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert "gcg.jsonl" in capsys.readouterr().err


def test_summary_table_shows_each_tasks_headline_metric():
    from rich.console import Console

    from unillava.evaluation.runner import summary_table

    results = {
        "gcg": {"metrics": {"ap50": 0.1, "miou": 0.4}, "counts": {"annotations": 3}},
        "refseg": {"metrics": {"ciou": 0.7, "giou": 0.6}, "counts": {"annotations": 2}},
        "mystery": {"metrics": {"score": 0.25}, "counts": {"annotations": 1}},
    }
    console = Console(width=120, record=True)
    console.print(summary_table(results))
    text = console.export_text()
    assert "mIoU" in text and "0.4000" in text and "0.1000" not in text
    assert "cIoU" in text and "0.7000" in text
    assert "score" in text and "0.2500" in text
