"""The main job end to end on the tiny preset: data, both stages, evaluation, report, then chat on the result."""

from __future__ import annotations

import io
import json
import sys

from unillava.cli import main


def test_demo_tiny_runs_end_to_end_and_chat_works_on_its_model(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    assert main(["demo", "--preset", "tiny", "--out", str(out)]) == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["metrics"]) == {"vqa", "mc", "pope"}
    assert summary["stage1_final_loss"] is not None and summary["stage2_final_loss"] is not None
    assert (out / "REPORT.md").read_text().count("| vqa |") >= 1
    assert "![" in (out / "eval" / "report.md").read_text()
    # Stage 2 started from stage 1's output and its merged model is what the evaluation loaded.
    assert summary["model_dir"].endswith("stage2/model")
    capsys.readouterr()
    image = next((out / "data" / "images" / "test").glob("*.png"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {image}\nWhat colour is it?\n/quit\n"))
    assert main(["chat", "--model", summary["model_dir"], "--max-new-tokens", "4"]) == 0
    assert "attached" in capsys.readouterr().out
