"""benchmarks/omg.py builds the ablation's recipes right: one flag set per arm, the same LLM, segmenter,
captions and VQA samples everywhere, the pixel-level tasks only in the mix arms, and the stage-1
regulariser switched off for stage 2. The measured run takes an hour (docs/omg-llava.md); here the
train and eval commands are recorded instead of run."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from unillava.training.config import load_train_config


@pytest.fixture(scope="module")
def bench(load_benchmark) -> ModuleType:
    return load_benchmark("omg")


def _fake_data(root: Path) -> None:
    for task in ("caption", "vqa", "refseg", "reasonseg", "gcg", "region_caption", "region_vqa"):
        path = root / "tasks" / "train" / f"{task}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"id": f"{task}{i}", "task": task}) + "\n" for i in range(5)))


def test_ablation_arms_differ_only_in_their_flags_and_data(bench, tmp_path, monkeypatch, capsys):
    _fake_data(tmp_path / "data")
    commands = []

    def fake_run(command, log):
        commands.append(command)
        if command[3] == "train":
            recipe = load_train_config(command[4])
            model = Path(recipe.output_dir) / "model"
            model.mkdir(parents=True)
            (model / "unillava_config.json").write_text("{}")
        else:
            out = Path(command[command.index("--out") + 1])
            out.mkdir(parents=True)
            tasks = {t: {"metrics": {bench.METRICS[t]: 0.5}} for t in bench.EVAL_TASKS}
            (out / "results.json").write_text(json.dumps({"tasks": tasks}))
        return 1.0

    monkeypatch.setattr(bench, "run_logged", fake_run)
    bench.main(
        [
            "--data",
            str(tmp_path / "data"),
            "--segmenter",
            str(tmp_path / "seg"),
            "--out",
            str(tmp_path / "b"),
            "--vqa-samples",
            "3",
            "--pixel-samples",
            "2",
            "--stage1-steps",
            "1",
            "--batch",
            "2",
        ]
    )
    table = capsys.readouterr().out
    assert "| full | yes | yes | mix | 0.500 |" in table and "| llava | no | no | VQA only |" in table
    recipes = {
        Path(c[4]).parent.name + "/" + Path(c[4]).stem: load_train_config(c[4])
        for c in commands
        if c[3] == "train"
    }
    assert len(recipes) == 8
    for arm in bench.ABLATION:
        flags = bench.ARMS[arm]
        stage1, stage2 = recipes[f"{arm}/stage1"], recipes[f"{arm}/stage2"]
        extra = stage1.model.vision.extra
        assert (extra["use_prior"], extra["object_tokens"]) == (flags["use_prior"], flags["object_tokens"])
        assert stage1.model.vision.pretrained == str(tmp_path / "seg")
        assert stage2.model_overrides == {"vision.extra.object_regularizer": 0.0}
        lines = Path(stage2.data.train_files[0]).read_text().splitlines()
        tasks = sorted(json.loads(line)["task"] for line in lines)
        expected = ["vqa"] * 3 + (
            sorted(t for t in bench.PIXEL_TASKS for _ in range(2)) if flags["pixel_level"] else []
        )
        assert tasks == sorted(expected)
    bench.main(
        [
            "--data",
            str(tmp_path / "data"),
            "--segmenter",
            str(tmp_path / "seg"),
            "--out",
            str(tmp_path / "b"),
            "--arms",
            "full",
        ]
    )
    assert len(commands) == 12  # a finished arm is not trained or evaluated again
