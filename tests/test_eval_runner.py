"""`unillava eval`: predictions are written as they come, a rerun resumes, results and report are written;
the shapes tasks go through the same runner as the papers' benchmarks."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from rich.console import Console

from unillava.cli import main
from unillava.data.shapes import generate_dataset
from unillava.evaluation.benchmarks import BENCHMARKS, SUITES
from unillava.evaluation.runner import RunOptions, evaluate, run_benchmarks, summary_table
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
    assert "ciou" in summary["tasks"]["refseg"]["metrics"]
    assert summary["tasks"]["vqa"] is summary["benchmarks"]["shapes-vqa"]
    assert json.loads((tmp_path / "results_vqa.json").read_text())["counts"]["annotations"] == 5
    report = (tmp_path / "report.md").read_text()
    assert "(`shapes-vqa`, split `test`)" in report and "](report_images/" in report
    assert "- **truth**: " in report
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["tasks"].keys() == {"vqa", "pope", "refseg"}
    assert written["benchmarks"].keys() == {"shapes-vqa", "shapes-pope", "shapes-refseg"}


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


def test_summary_table_names_each_headline_metric_as_its_scorer_does():
    def result(metric, metrics, n):
        return {
            "split": "test",
            "status": "scored",
            "flags": [],
            "metrics": metrics,
            "headline": {"label": metric, "metric": metric, "value": metrics[metric]},
            "counts": {"items": n},
        }

    summary = {
        "benchmarks": {
            "shapes-gcg": result("miou", {"ap50": 0.1, "miou": 0.4}, 3),
            "shapes-refseg": result("ciou", {"ciou": 0.7, "giou": 0.6}, 2),
            "pope": result("f1", {"accuracy": 0.25, "f1": 0.5}, 1),
        },
        "skipped": {"mme": "no data"},
    }
    console = Console(width=120, record=True)
    console.print(summary_table(summary))
    text = console.export_text()
    assert "miou" in text and "0.4000" in text and "0.1000" not in text
    assert "ciou" in text and "0.7000" in text
    assert "f1" in text and "0.5000" in text and "skipped" in text
    # the headline names are the scorer's own metric names, for every shapes task
    for name in SUITES["shapes"]:
        bench = BENCHMARKS[name]
        assert bench.columns[0].metric in SCORER_METRICS[bench.task]


# What evaluation.scoring reports for each task (its `metrics` keys).
SCORER_METRICS = {
    **dict.fromkeys(("vqa", "fine_text", "fine_count", "region_vqa"), ("accuracy", "exact_match")),
    "mc": ("accuracy", "no_answer"),
    "pope": ("accuracy", "precision", "recall", "f1", "yes_ratio"),
    **dict.fromkeys(("caption", "detail"), ("cider", "meteor")),
    **dict.fromkeys(("refseg", "reasonseg"), ("ciou", "giou", "precision@0.5")),
    "region_caption": ("cider", "meteor", "attribute_accuracy"),
    "gcg": ("ap50", "miou", "miou_per_gt", "recall", "cider", "meteor"),
}


class ScriptedModel:
    """A text model that answers "yes" and counts the questions it is asked."""

    def __init__(self):
        self.asked = []

    def generate_conversations(self, conversations, images, *, batch_size, max_new_tokens, progress=None):
        self.asked += [c[-1].text for c in conversations]
        if progress is not None:
            progress.update(len(conversations))
        return ["yes"] * len(conversations)


def _pope_benchmark(root):
    """Four questions in the released POPE layout (a real benchmark beside the shapes task)."""
    (root / "pope" / "val2014").mkdir(parents=True)
    rows = []
    for i in range(4):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / "pope" / "val2014" / f"img{i}.jpg")
        rows.append(
            {"question_id": i, "image": f"img{i}.jpg", "text": f"Is there a thing{i}?", "label": "yes"}
        )
    (root / "pope" / "coco_pope_random.json").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_shapes_task_and_real_benchmark_share_the_runner_path(shapes_dir, tmp_path):
    """A shapes task is just another benchmark: one run_benchmarks call predicts, resumes and reports both."""
    data = tmp_path / "data"
    _pope_benchmark(data)
    (data / "tasks").symlink_to(shapes_dir / "tasks")
    (data / "images").symlink_to(shapes_dir / "images")
    out = tmp_path / "out"
    model = ScriptedModel()
    opts = RunOptions(progress=False, limit=3, meteor=False)
    names = ["shapes-pope", "pope"]
    first = run_benchmarks(model, data, out, names=names, opts=opts)
    assert len(model.asked) == 6
    assert first["benchmarks"].keys() == {"shapes-pope", "pope"} and first["tasks"].keys() == {"pope"}
    shapes_preds = out / "predictions_pope.jsonl"  # the shapes layout, beside the benchmark's folder
    bench_preds = out / "pope" / "predictions_all.jsonl"
    # both interrupted mid-write: the last line cut in half
    for path in (shapes_preds, bench_preds):
        lines = path.read_text().splitlines()
        path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:5])
    model.asked.clear()
    again = run_benchmarks(model, data, out, names=names, opts=opts)
    assert len(model.asked) == 2  # only each one's redone question
    for name in names:
        res = again["benchmarks"][name]
        assert res["metrics"] == first["benchmarks"][name]["metrics"]
        assert res["counts"]["predicted"] == 3
        assert any("partial prediction line" in note for note in res["notes"])
    report = (out / "report.md").read_text()
    assert "(`shapes-pope`, split `test`)" in report and "(`pope`, split `all`)" in report
    assert report.count("- **answer**: yes") == 6  # three samples each, through the same report code
