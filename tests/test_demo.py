"""The main job end to end on the tiny preset (the default's code path on random tiny parts): data, both
stages with cached tower features, the compact export, evaluation with the image ablation, report, chat."""

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
    report = (out / "REPORT.md").read_text()
    assert report.count("| vqa |") >= 1 and "| own image | blank image | other image |" in report
    assert "![" in (out / "eval" / "report.md").read_text()
    assert set(summary["ablation"]) == {"own", "blank", "other"}
    assert all(set(summary["ablation"][k]) == {"vqa", "mc", "pope"} for k in summary["ablation"])
    # Stage 2 started from stage 1's output; the compact export of its model is what the evaluation loaded,
    # and it holds only the projector, the LoRA adapter and the new token's row.
    assert summary["model_dir"] == str(out / "model")
    meta = json.loads((out / "model" / "unillava_config.json").read_text())
    assert meta["base"]["adapter"] == "adapter" and meta["model"]["template"] == "chat_template"
    card = (out / "model" / "README.md").read_text()
    assert (
        "unillava demo --preset tiny --seed 0" in card and "| own image | blank image | other image |" in card
    )
    # the ablation runs answer the same (limited) questions
    assert (out / "eval-blank-image" / "predictions_vqa.jsonl").read_text().count('"id"') == 4
    capsys.readouterr()
    image = next((out / "data" / "images" / "test").glob("*.png"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {image}\nWhat colour is it?\n/quit\n"))
    assert main(["chat", "--model", summary["model_dir"], "--max-new-tokens", "4"]) == 0
    assert "attached" in capsys.readouterr().out
