"""Training end to end on tiny models: what trains, LoRA export, resume, atomic checkpoints, 2 processes."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file

from unillava.cli import COMMAND_MODULES, train_cmd
from unillava.config import load_config
from unillava.errors import ConfigError
from unillava.modeling import TEXT_LOSS, LlavaModel, LossPart
from unillava.testing import reset_accelerate_state
from unillava.training import TrainConfig, Trainer, check_qlora_support, load_train_config
from unillava.training import checkpoint as ckpt
from unillava.training.trainer import ADAPTER_DIR, LOG_NAME, NON_LORA_NAME

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny"
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four captioned colour images and two text-only chats: both modalities, a few tokens each."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    records = []
    for i, (name, rgb) in enumerate(COLORS.items()):
        Image.new("RGB", (32 + 8 * (i % 2), 32), rgb).save(root / "images" / f"{name}.png")
        turns = [
            {"from": "human", "value": "<image>\nWhat color is this?"},
            {"from": "gpt", "value": f"It is {name}."},
        ]
        records.append({"id": name, "image": f"{name}.png", "conversations": turns})
    for q, a in (("Say hi.", "Hi there!"), ("Count to three.", "One, two, three.")):
        records.append({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:4]))
    (root / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def _overrides(data: Path, out: Path, file: str, *extra: str) -> list[str]:
    return [
        f"data.train_files=[{data / file}]",
        f"data.image_root={data / 'images'}",
        f"output_dir={out}",
        *extra,
    ]


def _trainer(recipe: str, data: Path, out: Path, file: str, *extra: str) -> Trainer:
    return Trainer(load_train_config(TINY / recipe, _overrides(data, out, file, *extra)))


def _logged_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def stage1(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Stage 1 on the caption set (same 4 samples every step), with parameter snapshots around training."""
    out = tmp_path_factory.mktemp("stage1")
    trainer = _trainer(
        "stage1.yaml", data, out, "captions.jsonl", "max_steps=8", "lr=0.05", "lr_scheduler=constant"
    )
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.train()
    after = trainer.model.state_dict()
    reset_accelerate_state()
    return {"out": out, "result": result, "before": before, "after": after, "model": trainer.model}


def test_stage1_trains_only_the_projector_and_loss_decreases(stage1: dict) -> None:
    before, after = stage1["before"], stage1["after"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("projector.") for k in changed)
    assert {k for k in before if k.startswith("projector.")} == changed
    losses = stage1["result"].losses
    assert len(losses) == 8 and losses[8] < losses[1] - 0.2
    assert _logged_losses(stage1["out"]) == pytest.approx(losses)
    saved = LlavaModel.from_pretrained(stage1["out"] / "model")
    for key, value in saved.state_dict().items():
        assert torch.equal(value, after[key]), key


def test_training_log_reports_the_data_policy(stage1: dict) -> None:
    first = json.loads((stage1["out"] / LOG_NAME).read_text().splitlines()[0])
    assert first["event"] == "start" and first["data"]["kept"] == 4 and first["data"]["truncated"] == 0
    step = json.loads((stage1["out"] / LOG_NAME).read_text().splitlines()[1])
    assert set(step) >= {"step", "loss", "lr", "samples_per_s", "supervised_tokens", "epoch"}


def test_trainer_logs_every_loss_part_the_model_returns(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part the trainer has never heard of (a per-image projector penalty, weight 0.5) is trained with
    its global count and logged under its name next to `text_ce`, over 2 accumulated micro-batches."""
    trainer = _trainer(
        "stage1.yaml",
        data,
        tmp_path,
        "captions.jsonl",
        "max_steps=2",
        "log_every=1",
        "per_device_batch_size=2",
        "global_batch_size=4",
    )
    assert trainer.grad_accum == 2
    model = trainer.model
    plain_forward, plain_counts = model.forward, model.loss_counts

    def penalty() -> torch.Tensor:
        return sum(p.float().pow(2).sum() for p in model.projector.parameters())

    def forward(*args, **kwargs):
        out = plain_forward(*args, **kwargs)
        images = len(kwargs["images"])
        out.loss_parts["projector_penalty"] = LossPart(penalty() * images, images, 0.5)
        return out

    def loss_counts(inputs):
        return {**plain_counts(inputs), "projector_penalty": len(inputs["images"])}

    monkeypatch.setattr(model, "forward", forward)
    monkeypatch.setattr(model, "loss_counts", loss_counts)
    before = float(penalty().detach())
    result = trainer.train()
    assert result.metrics[1]["projector_penalty"] == pytest.approx(before, rel=1e-5)
    logged = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert {TEXT_LOSS, "projector_penalty"} <= set(record)
        assert record["loss"] == pytest.approx(
            record[TEXT_LOSS] + 0.5 * record["projector_penalty"], rel=1e-6
        )
        assert record["loss"] == pytest.approx(result.losses[record["step"]])
    # the penalty's gradient shrank the projector between the steps
    assert steps[1]["projector_penalty"] < steps[0]["projector_penalty"]


def _lora_model(base_dir: Path, model_dir: Path) -> LlavaModel:
    """Base model + the saved adapter + the saved non-LoRA weights: the unmerged LoRA model."""
    model = LlavaModel.from_pretrained(base_dir)
    model.language_model = PeftModel.from_pretrained(model.language_model, model_dir / ADAPTER_DIR)
    others = load_file(str(model_dir / ADAPTER_DIR / NON_LORA_NAME))
    model.load_state_dict(others, strict=False)
    return model.eval()


def test_stage2_lora_trains_lora_and_projector_and_exports_merged(
    stage1: dict, data: Path, tmp_path: Path
) -> None:
    base = stage1["out"] / "model"
    trainer = _trainer("stage2-lora.yaml", data, tmp_path, "mixed.jsonl", f"init_from={base}", "max_steps=3")
    trainable = set(trainer.trainable_state())
    assert trainable and all(".lora_" in k or k.startswith("projector.") for k in trainable)
    assert any(".lora_B." in k for k in trainable) and any(k.startswith("projector.") for k in trainable)
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs == {"llm": 1e-2, "projector": 1e-3}
    trainer.train()

    out = tmp_path / "model"
    adapter = load_file(str(out / ADAPTER_DIR / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    others = load_file(str(out / ADAPTER_DIR / NON_LORA_NAME))
    initial = LlavaModel.from_pretrained(base).state_dict()
    assert set(others) == {k for k in initial if k.startswith("projector.")}
    assert any(not torch.equal(others[k], initial[k]) for k in others)

    merged = LlavaModel.from_pretrained(out).eval()
    lora = _lora_model(base, out)
    ids = torch.tensor([[1, 2, merged.image_token_id, *([merged.image_token_id] * 15), 5, 6, 7]])
    image = [torch.randn(3, 32, 32)]
    with torch.no_grad():
        a = merged(ids, images=image).logits
        b = lora(ids, images=image).logits
    assert (a - b).abs().max() < 1e-4
    merged_llm = merged.state_dict()
    assert any(
        not torch.equal(merged_llm[k], v)
        for k, v in initial.items()
        if k.startswith("language_model.") and v.ndim == 2
    )


def test_train_vision_gets_its_own_learning_rate(stage1: dict, data: Path, tmp_path: Path) -> None:
    base = stage1["out"] / "model"
    trainer = _trainer(
        "stage2.yaml",
        data,
        tmp_path,
        "captions.jsonl",
        f"init_from={base}",
        "train_llm=none",
        "train_vision=true",
        "lr=1e-3",
        "projector_lr=2e-3",
        "vision_lr=3e-3",
        "weight_decay=0.1",
        "max_steps=1",
    )
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert {n: g["lr"] for n, g in groups.items()} == {
        "projector": 2e-3,
        "projector.no_decay": 2e-3,
        "vision": 3e-3,
        "vision.no_decay": 3e-3,
    }
    assert groups["vision"]["weight_decay"] == 0.1 and groups["vision.no_decay"]["weight_decay"] == 0.0
    before = {k: v.clone() for k, v in trainer.model.vision_tower.state_dict().items()}
    trainer.train()
    after = trainer.model.vision_tower.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


# -- resume and atomic checkpoints -------------------------------------------------------------------


class Killed(Exception):
    """Stands in for the process being killed."""


RESUME_ARGS = ("max_steps=4", "save_every_steps=2", "keep_last=1", "lora.dropout=0.1")


@pytest.fixture(scope="module")
def uninterrupted(stage1: dict, data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("uninterrupted")
    base = stage1["out"] / "model"
    result = _trainer("stage2-lora.yaml", data, out, "mixed.jsonl", f"init_from={base}", *RESUME_ARGS).train()
    reset_accelerate_state()
    return result.losses


def _resume_run(stage1: dict, data: Path, out: Path, *extra: str) -> Trainer:
    base = stage1["out"] / "model"
    return _trainer("stage2-lora.yaml", data, out, "mixed.jsonl", f"init_from={base}", *RESUME_ARGS, *extra)


def test_resume_continues_with_the_same_losses(
    stage1: dict, data: Path, tmp_path: Path, uninterrupted: dict[int, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = Trainer.save_checkpoint

    def save_then_die(self: Trainer) -> None:
        real_save(self)
        raise Killed

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        _resume_run(stage1, data, tmp_path).train()
    monkeypatch.setattr(Trainer, "save_checkpoint", real_save)
    reset_accelerate_state()

    with pytest.raises(ConfigError, match="output_dir: .* already holds checkpoints"):
        _resume_run(stage1, data, tmp_path)
    reset_accelerate_state()
    resumed = _resume_run(stage1, data, tmp_path, "resume=true")
    assert resumed.step == 2
    result = resumed.train()
    assert sorted(result.losses) == [3, 4]
    logged = _logged_losses(tmp_path)
    assert sorted(logged) == [1, 2, 3, 4]
    for step, loss in uninterrupted.items():
        assert logged[step] == pytest.approx(loss, abs=1e-6), step


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(
    stage1: dict, data: Path, tmp_path: Path, uninterrupted: dict[int, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = ckpt.write_json

    def write_json(path: Path, value: object) -> None:
        if path.name == "scheduler.json" and path.parent.name.endswith("step-00000004"):
            raise Killed  # optimizer and weights of step 4 are on disk, the rest is not
        real_write(path, value)

    monkeypatch.setattr(ckpt, "write_json", write_json)
    with pytest.raises(Killed):
        _resume_run(stage1, data, tmp_path).train()
    monkeypatch.setattr(ckpt, "write_json", real_write)
    reset_accelerate_state()

    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000002"
    partial = root / ".tmp-step-00000004"
    assert (partial / "optimizer.safetensors").is_file() and not (partial / ckpt.STATE_NAME).exists()
    assert ckpt.CheckpointDir(root).latest() == root / "step-00000002"

    resumed = _resume_run(stage1, data, tmp_path, "resume=true")
    assert resumed.step == 2
    result = resumed.train()
    for step in (3, 4):
        assert result.losses[step] == pytest.approx(uninterrupted[step], abs=1e-6)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000004"]


# -- processes ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(stage1: dict, data: Path, tmp_path: Path) -> None:
    base = stage1["out"] / "model"
    common = _overrides(data, tmp_path / "two", "mixed.jsonl", f"init_from={base}", "max_steps=3")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNILLAVA_DEBUG": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs/accelerate/cpu-2proc.yaml"),
        "--main_process_port",
        str(_free_port()),
        "-m",
        "unillava.cli.train_cmd",
        str(TINY / "stage2.yaml"),
        *common,
        "per_device_batch_size=2",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = _logged_losses(tmp_path / "two")
    start = json.loads((tmp_path / "two" / LOG_NAME).read_text().splitlines()[0])
    assert start["num_processes"] == 2 and start["per_device_batch_size"] == 2

    for name, extra in (("one", ["per_device_batch_size=4"]), ("accum", ["per_device_batch_size=2"])):
        overrides = _overrides(
            data, tmp_path / name, "mixed.jsonl", f"init_from={base}", "max_steps=3", *extra
        )
        losses = Trainer(load_train_config(TINY / "stage2.yaml", overrides)).train().losses
        reset_accelerate_state()
        assert sorted(losses) == sorted(two) == [1, 2, 3]
        for step, loss in losses.items():
            assert two[step] == pytest.approx(loss, abs=1e-5), (name, step)


def test_bf16_autocast_runs_on_cpu(stage1: dict, data: Path, tmp_path: Path) -> None:
    trainer = _trainer("stage1.yaml", data, tmp_path, "captions.jsonl", "max_steps=2", "bf16=true")
    assert trainer.accelerator.mixed_precision == "bf16"
    dtypes = {p.dtype for p in trainer.model.projector.parameters()}
    assert dtypes == {torch.float32} and trainer.model.language_model.dtype == torch.bfloat16
    losses = trainer.train().losses
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


# -- configuration -----------------------------------------------------------------------------------


def test_qlora_without_bitsandbytes_is_a_clear_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ConfigError, match="train_llm: qlora needs bitsandbytes .* not installed"):
        check_qlora_support()


def test_config_errors_name_the_field(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _overrides(data, tmp_path, "captions.jsonl")
    for override, field in (
        ("lr=fast", "lr"),
        ("lora.rr=8", "rr"),
        ("train_llm=half", "train_llm"),
        ("global_batch_size=6", "global_batch_size"),
        ("train_projector=false", "train_projector"),
        ("lr_scheduler=cosine_annealing", "lr_scheduler"),
        ("data.template=chatml", "data.template"),
    ):
        code = train_cmd.main([str(TINY / "stage1.yaml"), *base, override])
        assert code == 2
        assert field in capsys.readouterr().err, override
        reset_accelerate_state()
    assert train_cmd.main([str(TINY / "stage1.yaml"), *base, "--resume"]) == 2
    assert "resume: no complete checkpoint" in capsys.readouterr().err
    assert train_cmd in COMMAND_MODULES


def test_global_batch_semantics() -> None:
    config = load_train_config(TINY / "stage1.yaml", ["global_batch_size=16", "per_device_batch_size=2"])
    assert config.gradient_accumulation_for(1) == 8 and config.gradient_accumulation_for(4) == 2
    with pytest.raises(ConfigError, match="global_batch_size"):
        config.gradient_accumulation_for(3)
    config = load_train_config(TINY / "stage1.yaml", ["global_batch_size=null", "gradient_accumulation=3"])
    assert config.gradient_accumulation_for(2) == 3


def test_recipes_parse_and_match_llava_1_5() -> None:
    names = [f"{d}/{n}.yaml" for d in ("tiny", "llava-1.5-7b") for n in ("stage1", "stage2", "stage2-lora")]
    recipes = {name: REPO / "configs" / name for name in names}
    loaded = {name: load_config(TrainConfig, path) for name, path in recipes.items()}
    s1, s2, lora = (loaded[f"llava-1.5-7b/{n}.yaml"] for n in ("stage1", "stage2", "stage2-lora"))
    assert (s1.train_llm, s1.data.template, s1.lr, s1.global_batch_size, s1.epochs) == (
        "none",
        "plain",
        1e-3,
        256,
        1,
    )
    assert (s1.warmup_ratio, s1.lr_scheduler) == (0.03, "cosine")
    assert (s2.train_llm, s2.train_projector, s2.lr, s2.global_batch_size) == ("full", True, 2e-5, 128)
    assert (lora.train_llm, lora.lora.r, lora.lora.alpha, lora.lr, lora.projector_lr) == (
        "lora",
        128,
        256,
        2e-4,
        2e-5,
    )
