"""Compact directories: a LoRA run's difference from its named base parts, rebuilt bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from unillava.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from unillava.errors import CheckpointError
from unillava.hub import load_model
from unillava.hub.compact import export_compact
from unillava.modeling import CONFIG_NAME, WEIGHTS_NAME, LlavaModel
from unillava.testing import tiny_llama_config
from unillava.training import TrainConfig, Trainer
from unillava.training.config import DataConfig, LoraSettings
from unillava.vision.mobilenet import MobileNetV2

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, make_tokenizer) -> dict[str, Path]:
    """A tiny 'pretrained' LLM directory and a tiny torchvision-layout MobileNetV2 file, plus data."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("compact-sources")
    torch.manual_seed(0)
    hf = dict(tiny_llama_config())
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf))
    llm.save_pretrained(root / "llm")
    make_tokenizer().save_pretrained(root / "llm")
    torch.save(MobileNetV2(width_mult=0.25).state_dict(), root / "tower.pth")
    records = []
    for i, rgb in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0), (250, 250, 250)]):
        Image.new("RGB", (64, 64), rgb).save(root / f"{i}.png")
        records.append(
            {
                "id": str(i),
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat color is it?"},
                    {"from": "gpt", "value": f"colour {i}"},
                ],
            }
        )
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"root": root, "llm": root / "llm", "tower": root / "tower.pth"}


def _train(sources: dict[str, Path], out: Path, lora: bool) -> Path:
    model = ModelConfig(
        vision=VisionConfig(
            type="mobilenet_v2", pretrained=str(sources["tower"]), image_size=64, select_layer=-1
        ),
        projector=ProjectorConfig("mlp2x_gelu"),
        llm=LLMConfig(pretrained=str(sources["llm"])),
        max_length=256,
    )
    config = TrainConfig(
        model=model,
        data=DataConfig(
            train_files=[str(sources["root"] / "data.jsonl")], image_root=str(sources["root"]), num_workers=0
        ),
        train_llm="lora" if lora else "none",
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
        lr=1e-2,
        max_steps=3,
        per_device_batch_size=2,
        global_batch_size=2,
        bf16=True,
        output_dir=str(out),
        progress=False,
    )
    return Trainer(config).train().model_dir


def _outputs(model: LlavaModel) -> torch.Tensor:
    ids = torch.tensor(
        [[1, 2, model.image_token_id, model.image_token_id, model.image_token_id, model.image_token_id, 5, 6]]
    )
    with torch.no_grad():
        return model(
            input_ids=ids, images=[torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(0))]
        ).logits


@pytest.mark.parametrize("lora", [True, False])
def test_compact_rebuilds_the_full_model_exactly(sources, tmp_path: Path, lora: bool) -> None:
    full_dir = _train(sources, tmp_path / "run", lora)
    stats = export_compact(full_dir, tmp_path / "compact")
    meta = json.loads((tmp_path / "compact" / CONFIG_NAME).read_text())
    assert meta["base"]["dtype"] == "bfloat16" and meta["base"]["llm"] == str(sources["llm"])
    assert bool(meta["base"]["adapter"]) == lora == (tmp_path / "compact" / "adapter").is_dir()
    # only the projector and the new <image> row are stored, not the tower or the LLM
    stored = set(stats["keys"])
    assert {k.split(".")[0] for k in stored} == {"projector", "language_model"}
    assert all("embed_tokens" in k for k in stored if k.startswith("language_model."))
    assert stats["rows"] == {"language_model.model.embed_tokens.weight": 49152}
    assert (tmp_path / "compact" / WEIGHTS_NAME).stat().st_size < (full_dir / WEIGHTS_NAME).stat().st_size / 4
    full, compact = load_model(full_dir), load_model(tmp_path / "compact")
    for key, value in full.state_dict().items():
        assert torch.equal(value, compact.state_dict()[key]), key
    assert torch.equal(_outputs(full), _outputs(compact))


def test_compact_needs_named_sources(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="do not name both pretrained parts"):
        export_compact(tiny_model_dir, tmp_path / "c")


def test_compact_refuses_a_missing_adapter(sources, tmp_path: Path) -> None:
    export_compact(_train(sources, tmp_path / "run", True), tmp_path / "compact")
    for f in (tmp_path / "compact" / "adapter").iterdir():
        f.unlink()
    with pytest.raises(CheckpointError, match="adapter: missing adapter_config.json"):
        load_model(tmp_path / "compact")
