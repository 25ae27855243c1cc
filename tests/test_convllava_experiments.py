"""benchmarks/convllava.py experiments 5(b) `detail` and 5(c) `frozen` wire up end to end (1 step per arm).

The measured runs take tens of minutes (docs/convllava.md); this only checks that every arm builds its
recipe, trains through unillava's trainer, is evaluated and lands in the table.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml


@pytest.fixture(scope="module")
def bench(load_benchmark) -> ModuleType:
    return load_benchmark("convllava")


def _args(tmp_path: Path, experiment: str, arms: str) -> list[str]:
    return [
        f"--experiment={experiment}",
        f"--threads={torch.get_num_threads()}",
        f"--data={tmp_path / 'data'}",
        f"--out={tmp_path / experiment}",
        "--n-train=20",
        "--n-test=10",
        "--steps=1",
        "--pretrain-steps=1",
        "--batch=2",
        "--eval-limit=2",
        f"--arms={arms}",
    ]


def test_scaled_geometry_keeps_the_token_ratios(bench: ModuleType) -> None:
    """1536/4 px ConvNeXt + stage 5 and the 336/4 px ViT/14 both hand the LLM 36 tokens, as 576 at full size."""
    arms = {arm.name: arm.vision for arm in bench.detail_arms()}
    assert (arms["vit14-84"].hf_config["image_size"] // 14) ** 2 == 36
    assert [arms[f"convnext-{s}"].image_size // 64 for s in (192, 256, 384)] == [3, 4, 6]


def test_detail_and_frozen_experiments_run(bench: ModuleType, tmp_path: Path, capsys) -> None:
    bench.main(_args(tmp_path, "detail", "vit14-84,convnext-192"))
    table = capsys.readouterr().out
    assert "| ViT/14 @ 84 px (336/4) | 36 |" in table and "| ConvNeXt+s5 @ 192 px (768/4) | 9 |" in table
    assert "majority answer (no image)" in table
    recipe = yaml.safe_load((tmp_path / "detail" / "convnext-192" / "recipe.yaml").read_text())
    assert recipe["max_steps"] == 1 and recipe["model"]["vision"]["image_size"] == 192

    bench.main(_args(tmp_path, "frozen", "pretrain-128,stage3-llrd"))
    recipe = yaml.safe_load((tmp_path / "frozen" / "stage3-llrd" / "recipe.yaml").read_text())
    assert recipe["vision_unfreeze_from_stage"] == 3 and recipe["vision_lr_layer_decay"] == 0.5
    assert recipe["model"]["vision"]["pretrained"] == str(tmp_path / "frozen" / "pretrained-tower")
    assert "| stages 3-5 train, LLRD 0.5 | 36 |" in capsys.readouterr().out


def test_single_text_scenes(bench: ModuleType, tmp_path: Path, capsys) -> None:
    """--scenes single-text: every scene fine with one character; another data set in the same --data is refused."""
    import json

    args = _args(tmp_path, "detail", "vit14-84")
    bench.main([*args, "--scenes=single-text"])
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["arguments"]["fine_every"] == 1 and manifest["arguments"]["max_texts"] == 1
    assert manifest["splits"]["train"]["tasks"]["fine_text"] >= 15  # about one question per scene
    row = tmp_path / "detail" / "vit14-84" / "row.json"
    trained_at = row.stat().st_mtime_ns
    capsys.readouterr()
    bench.main([*args, "--scenes=single-text"])  # a finished arm with the same recipe is not trained again
    assert (
        row.stat().st_mtime_ns == trained_at and "| ViT/14 @ 84 px (336/4) | 36 |" in capsys.readouterr().out
    )
    bench.main([*args, "--scenes=single-text", "--steps=2"])  # a changed recipe trains again
    assert json.loads(row.read_text())["steps"] == 2
    with pytest.raises(SystemExit, match="another shapes data set"):
        bench.main(args)
