"""ConvLLaVA's compute argument, measured: tokens, vision time and LLM prefill time vs resolution (5a,
the default); then what the resolution buys after training: fine-detail accuracy (5b, `--experiment
detail`) and a low-resolution pre-trained tower frozen vs updated at high resolution (5c, `--experiment
frozen`). 5(b)/5(c) are described beside their code below and in docs/convllava.md.

Compares a ViT tower (CLIP-style, patch 14) with a ConvNeXt tower of 4 stages (stride 32) and of 5 stages
(stride 64, ConvLLaVA). A ViT's token count grows with the pixel count and its attention with the square
of that; a ConvNeXt is convolutional, so its time grows linearly with pixels, and stage 5 divides the
tokens the LLM must prefill by 4. Prints a markdown table plus fitted growth exponents
(time ~ pixels^k for vision, time ~ tokens^k for prefill).

    .venv/bin/python benchmarks/convllava.py [--geometry scaled|real] [--cap 30] [--resolutions 336,448,...]
    .venv/bin/python benchmarks/convllava.py --experiment detail|frozen [--steps 500] [--batch 16] ...

Geometry: `real` is CLIP ViT-L/14 (1024 wide, 24 layers) and ConvNeXt-L (depths 3/3/27/3, widths
192..1536) + stage 5 (6 blocks, 3072 wide); on a CPU its large resolutions take minutes per cell.
`scaled` (default) keeps the shapes that decide the growth (patch 14, stem 4, strides 32/64) and
shrinks both towers by the same factors, width / 4 and depth / 3, so their cost ratio stays roughly the
real one: ViT 256 wide, 8 layers, 4 heads; ConvNeXt widths 48..384 (stage 5: 768) with depths 1/1/9/1
(stage 5: 2). Prefill always uses the same small random LLM (Llama, 4 layers, 512 wide,
8 heads) on the image tokens plus 32 text tokens, batch 1, so only the token count differs.

Inputs: the ViT takes the side rounded down to a multiple of 14 (position embeddings interpolated); the
ConvNeXt takes the side rounded to the nearest multiple of its stride, as unillava's `any` mode does
(336 -> 352 / 320, 672 -> 672 / 704). A cell whose time, extrapolated from the smaller resolutions of
its row, would pass `--cap` seconds is skipped and shown as "skipped (>N s)". Times are seconds, fp32,
batch 1, the best of up to 3 runs after a warm-up (cells of 3 s or more: the warm-up run alone), on
`--threads` CPU threads (default 1: on a shared machine a multi-threaded op stalls whenever one of its
threads is descheduled). Every cell is measured on its own, so the spread between equal token counts
in different rows shows the noise.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from unillava.config import VisionConfig
from unillava.vision import build_vision_tower

TEXT_TOKENS = 32
LLM = {
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "vocab_size": 1024,
    "max_position_embeddings": 32768,
}
GEOMETRIES: dict[str, dict[str, Any]] = {
    "scaled": {
        "vit": {
            "hidden_size": 256,
            "intermediate_size": 1024,
            "num_hidden_layers": 8,
            "num_attention_heads": 4,
        },
        "convnext": {"depths": [1, 1, 9, 1], "hidden_sizes": [48, 96, 192, 384]},
        "stage5": {"depth": 2, "width": 768},
    },
    "real": {
        "vit": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
        },
        "convnext": {"depths": [3, 3, 27, 3], "hidden_sizes": [192, 384, 768, 1536]},
        "stage5": {"depth": 6, "width": 3072},
    },
}


@dataclass
class Row:
    """One tower's measurements across resolutions; `work` is what time is extrapolated from."""

    name: str
    cells: dict[int, float | None] = field(default_factory=dict)
    work: dict[int, int] = field(default_factory=dict)


def best_time(fn: Callable[[], Any]) -> float:
    """Best of 1-3 timed runs after one warm-up run; a warm-up of 3 s or more is the measurement.

    The warm-up absorbs one-time costs (oneDNN builds convolution kernels per input shape), which are
    negligible next to a slow cell; the best of the rest is the least disturbed by other processes on a
    shared machine.
    """
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if first >= 3.0:
        return first
    times = []
    for _ in range(3 if first < 1.0 else 1):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def estimate(row: Row, work: int) -> float | None:
    """Extrapolated seconds for `work` from the row's last measured cells (exponent clamped to 1..2)."""
    done = [(row.work[r], t) for r, t in row.cells.items() if t is not None]
    if not done:
        return None
    (w1, t1) = done[-1]
    exponent = 2.0
    if len(done) >= 2:
        (w0, t0) = done[-2]
        if w1 > w0 and t0 > 0:
            exponent = min(2.0, max(1.0, math.log(t1 / t0) / math.log(w1 / w0)))
    return t1 * (work / w1) ** exponent


def measure(row: Row, resolution: int, work: int, fn: Callable[[], Any], cap: float) -> None:
    row.work[resolution] = work
    guess = estimate(row, work)
    if guess is not None and guess > cap or None in row.cells.values():
        row.cells[resolution] = None
        return
    row.cells[resolution] = best_time(fn)


def exponent(row: Row) -> str:
    """Growth exponent over the measured cells (least squares on logs) and over the last step alone.

    At small sizes a ViT's linear layers dominate and its attention's square only shows at the top, so
    the last step says more about where the curve is heading than the fit over all cells.
    """
    points = [(math.log(row.work[r]), math.log(t)) for r, t in row.cells.items() if t]
    if len(points) < 2:
        return "n/a"
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    (x0, y0), (x1, y1) = points[-2:]
    return f"{slope:.2f} (last step {(y1 - y0) / (x1 - x0):.2f})"


def nearest_multiple(value: int, multiple: int) -> int:
    return max(multiple, int(value / multiple + 0.5) * multiple)


def compute_experiment(args: argparse.Namespace) -> None:
    """Experiment 5(a): tokens, vision time and prefill time of random towers vs resolution."""
    resolutions = sorted(int(r) for r in args.resolutions.split(","))
    geometry = GEOMETRIES[args.geometry]
    torch.manual_seed(0)
    started = time.perf_counter()

    vit_config = CLIPVisionConfig(**geometry["vit"], patch_size=14, image_size=336)
    vit_config._attn_implementation = "sdpa"
    vit = CLIPVisionModel(vit_config).eval()
    towers = {
        "ConvNeXt-4": build_vision_tower(
            VisionConfig(type="convnext", hf_config=geometry["convnext"], select_layer=-1, image_size=512)
        ).eval(),
        "ConvNeXt-5": build_vision_tower(
            VisionConfig(
                type="convnext",
                hf_config=geometry["convnext"],
                select_layer=-1,
                image_size=512,
                extra={"add_stage5": geometry["stage5"]},
            )
        ).eval(),
    }
    llm = LlamaForCausalLM(LlamaConfig(**LLM)).eval()

    def prefill(tokens: int) -> Callable[[], Any]:
        embeds = torch.randn(1, tokens + TEXT_TOKENS, LLM["hidden_size"])
        return lambda: llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)

    def vit_call(pixels: torch.Tensor) -> Callable[[], Any]:
        return lambda: vit(pixels, interpolate_pos_encoding=True)

    def tower_call(tower: Any, pixels: torch.Tensor) -> Callable[[], Any]:
        return lambda: tower.encode_batch(pixels)

    names = ["ViT/14", *towers]
    tokens: dict[str, dict[int, int]] = {n: {} for n in names}
    sides: dict[str, dict[int, int]] = {n: {} for n in names}
    vision = {n: Row(n) for n in names}
    prefill_rows = {n: Row(n) for n in names}
    with torch.inference_mode():
        vit(torch.zeros(1, 3, 336, 336))  # warm-up: first calls allocate and pick kernels
        for tower in towers.values():
            tower.encode_batch(torch.zeros(1, 3, 256, 256))
        prefill(64)()
        for res in resolutions:
            for name in names:
                if name == "ViT/14":
                    side = res // 14 * 14
                    n = (side // 14) ** 2
                    pixels = torch.randn(1, 3, side, side)
                    run = vit_call(pixels)
                else:
                    tower = towers[name]
                    side = nearest_multiple(res, tower.stride)
                    n = tower.num_tokens(side, side)
                    pixels = torch.randn(1, 3, side, side)
                    run = tower_call(tower, pixels)
                tokens[name][res], sides[name][res] = n, side
                measure(vision[name], res, side * side, run, args.cap)
                measure(prefill_rows[name], res, n + TEXT_TOKENS, prefill(n), args.cap)

    def cell(row: Row, res: int) -> str:
        value = row.cells.get(res)
        return f"{value:.3f}" if value is not None else f"skipped (>{args.cap:g} s)"

    header = ["res"] + [f"{n} {what}" for n in names for what in ("tokens", "vision s", "prefill s")]
    print(
        f"geometry: {args.geometry}; torch threads: {torch.get_num_threads()}; cap {args.cap:g} s per cell\n"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for res in resolutions:
        values = [str(res)]
        for name in names:
            side = sides[name][res]
            note = "" if side == res else f" ({side}px)"
            values += [f"{tokens[name][res]}{note}", cell(vision[name], res), cell(prefill_rows[name], res)]
        print("| " + " | ".join(values) + " |")
    print(
        "\ngrowth exponent k (vision: time ~ pixels^k; prefill: time ~ (tokens + text)^k), measured cells only:"
    )
    for name in names:
        print(f"  {name}: vision {exponent(vision[name])}, prefill {exponent(prefill_rows[name])}")
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")


# -- experiments 5(b) and 5(c): fine detail after training -------------------------------------------------
#
# Every resolution of the issue divided by 4 (768/1024/1536 -> 192/256/384 px for the ConvNeXt with stage 5,
# stride 64 -> 9/16/36 tokens; CLIP ViT-L/14 at 336 px -> a ViT/14 at 84 px, 36 tokens, as many as the
# ConvNeXt at 384 px), small towers trained from scratch and a tiny random Llama trained fully, so that the
# input resolution is what differs between arms. Data: `unillava data shapes` scenes at 384 px whose "fine"
# profile carries 5-9 px characters (legible at 384 px, a 1-2 px smudge at 84 px) and small objects.

DETAIL_TASKS = ("fine_text", "fine_count")
DETAIL_SCENE_SIZE = 384
DETAIL_LLM: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 49152,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
DETAIL_CONVNEXT: dict[str, Any] = {"depths": [1, 1, 2, 1], "hidden_sizes": [16, 32, 64, 128]}
DETAIL_STAGE5: dict[str, Any] = {"depth": 1, "width": 256}
DETAIL_VIT: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
}
PRETRAIN_SIZE = 128  # the low-resolution pre-training of 5(c): the analog of CLIP ConvNeXt's 256 px (/2)


@dataclass
class Arm:
    """One trained model of an experiment: its tower and what of the tower trains."""

    name: str
    label: str
    vision: VisionConfig
    train_vision: bool = True
    unfreeze_from_stage: int | None = None
    layer_decay: float | None = None


def convnext_vision(size: int, pretrained: str | None = None) -> VisionConfig:
    return VisionConfig(
        type="convnext",
        pretrained=pretrained,
        hf_config=None if pretrained else DETAIL_CONVNEXT,
        select_layer=-1,
        image_size=size,
        extra={"add_stage5": DETAIL_STAGE5},
    )


def vit_vision(size: int, patch: int) -> VisionConfig:
    hf_config = {**DETAIL_VIT, "image_size": size, "patch_size": patch}
    return VisionConfig(type="clip", hf_config=hf_config, select_layer=-1, image_size=size)


def detail_arms() -> list[Arm]:
    """5(b): ConvNeXt + stage 5 at 192/256/384 px against ViTs with 36 tokens, all from scratch."""
    return [
        Arm("vit14-84", "ViT/14 @ 84 px (336/4)", vit_vision(84, 14)),
        Arm("vit64-384", "ViT/64 @ 384 px", vit_vision(384, 64)),
        Arm("convnext-192", "ConvNeXt+s5 @ 192 px (768/4)", convnext_vision(192)),
        Arm("convnext-256", "ConvNeXt+s5 @ 256 px (1024/4)", convnext_vision(256)),
        Arm("convnext-384", "ConvNeXt+s5 @ 384 px (1536/4)", convnext_vision(384)),
    ]


def frozen_arms(tower: str) -> list[Arm]:
    """5(c): the low-resolution pre-trained tower at 384 px, frozen or trained from stage 3 (+ LLRD)."""
    return [
        Arm("frozen", "frozen", convnext_vision(384, tower), train_vision=False),
        Arm("stage3", "stages 3-5 train", convnext_vision(384, tower), unfreeze_from_stage=3),
        Arm(
            "stage3-llrd",
            "stages 3-5 train, LLRD 0.5",
            convnext_vision(384, tower),
            unfreeze_from_stage=3,
            layer_decay=0.5,
        ),
    ]


def make_data(args: argparse.Namespace) -> Path:
    """The procedural fine-detail data set; generated once and reused when its manifest matches."""
    from unillava.data.shapes import generate_dataset

    data = Path(args.data)
    wanted = {
        "n": args.n_train,
        "n_val": 1,
        "n_test": args.n_test,
        "seed": 0,
        "min_size": DETAIL_SCENE_SIZE,
        "max_size": DETAIL_SCENE_SIZE,
        "aspect_range": [1.0, 1.0],
        "difficulty": "easy",
        "fine_every": 1 if args.scenes == "single-text" else 5,
        "max_texts": 1 if args.scenes == "single-text" else None,
        "tasks": list(DETAIL_TASKS),
    }
    manifest = data / "manifest.json"
    if manifest.is_file():
        if json.loads(manifest.read_text()).get("arguments") == wanted:
            return data
        raise SystemExit(f"{data} holds another shapes data set; pass another --data (or delete it)")
    arguments = {**wanted, "aspect_range": (1.0, 1.0)}
    generate_dataset(data, arguments.pop("n"), arguments.pop("seed"), **arguments, workers=1)
    return data


def train_config(arm: Arm, data: Path, out: Path, args: argparse.Namespace, steps: int) -> Any:
    """The arm's recipe: the same LLM, data, steps, batch, LR and seed for every arm."""
    from unillava.config import LLMConfig, ModelConfig, ProjectorConfig
    from unillava.llm import EMBEDDED_DEFAULT
    from unillava.training.config import DataConfig, TrainConfig

    return TrainConfig(
        model=ModelConfig(
            vision=arm.vision,
            projector=ProjectorConfig(type="mlp2x_gelu"),
            llm=LLMConfig(pretrained=None, tokenizer=EMBEDDED_DEFAULT, hf_config=DETAIL_LLM),
            max_length=256,
        ),
        data=DataConfig(
            train_files=[str(data / "tasks" / "train" / f"{t}.jsonl") for t in DETAIL_TASKS],
            image_root=str(data),
            num_workers=0,
        ),
        train_projector=True,
        train_llm="full",
        train_vision=arm.train_vision,
        vision_unfreeze_from_stage=arm.unfreeze_from_stage,
        vision_lr_layer_decay=arm.layer_decay,
        lr=args.lr,
        warmup_ratio=0.05,
        lr_scheduler="cosine",
        max_steps=steps,
        per_device_batch_size=args.batch,
        global_batch_size=args.batch,
        seed=0,
        output_dir=str(out / arm.name),
        log_every=max(1, steps // 20),
        progress=False,
    )


def vision_gflops(model: Any) -> float:
    """Forward GFLOPs of the tower on one image (matmuls and convolutions, as torch counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = model.config.vision.image_size
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.vision_tower.encode_batch(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def run_arm(arm: Arm, data: Path, out: Path, args: argparse.Namespace, steps: int) -> dict[str, Any]:
    """Train one arm with unillava's trainer (what `unillava train` runs), then `unillava eval` it."""
    import yaml

    import unillava
    from unillava.config import to_dict
    from unillava.evaluation.runner import evaluate
    from unillava.training.trainer import Trainer

    config = train_config(arm, data, out, args, steps)
    (out / arm.name).mkdir(parents=True, exist_ok=True)
    recipe = out / arm.name / "recipe.yaml"  # `unillava train recipe.yaml` reproduces the arm
    recipe_text = yaml.safe_dump(to_dict(config), sort_keys=False)
    finished = out / arm.name / "row.json"
    if finished.is_file() and recipe.is_file() and recipe.read_text() == recipe_text:
        row = json.loads(finished.read_text())  # this arm already ran with this recipe: reuse its row
        print(json.dumps(row), flush=True)
        return row
    recipe.write_text(recipe_text)
    trainer = Trainer(config)
    trainable = sum(p.numel() for p in trainer.model.vision_tower.parameters() if p.requires_grad)
    started = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - started
    assert result.model_dir is not None
    model = unillava.load(result.model_dir)
    size = arm.vision.image_size
    row: dict[str, Any] = {
        "arm": arm.name,
        "label": arm.label,
        "tokens": model.model.vision_tower.num_tokens(size, size),
        "gflops": vision_gflops(model.model),
        "trainable_tower_m": trainable / 1e6,
        "train_s": train_s,
        "steps": steps,
        "final_loss": result.losses[max(result.losses)] if result.losses else float("nan"),
        "model_dir": str(result.model_dir),
    }
    started = time.perf_counter()
    summary = evaluate(
        model,
        data,
        list(DETAIL_TASKS),
        out / arm.name / "eval",
        limit=args.eval_limit,
        batch_size=16,
        max_new_tokens=4,
        report_samples=2,
    )
    row["eval_s"] = time.perf_counter() - started
    for task in DETAIL_TASKS:
        results = summary["tasks"][task]
        row[task] = 100 * results["metrics"]["accuracy"]
        row[f"{task}_n"] = results["counts"]["annotations"]
    finished.write_text(json.dumps(row))
    print(json.dumps(row), flush=True)
    return row


def majority_row(data: Path, limit: int | None) -> dict[str, Any]:
    """The most frequent training answer of each task, scored on the test split: the no-image floor."""
    row: dict[str, Any] = {"label": "majority answer (no image)", "tokens": 0}
    for task in DETAIL_TASKS:
        train = [json.loads(line) for line in (data / "tasks" / "train" / f"{task}.jsonl").open()]
        test = [json.loads(line) for line in (data / "tasks" / "test" / f"{task}.jsonl").open()][:limit]
        top = Counter(r["conversations"][1]["value"].lower() for r in train).most_common(1)[0][0]
        hits = sum(top in [a.lower() for a in r["answers"]] for r in test)
        row[task] = 100 * hits / max(1, len(test))
        row[f"{task}_n"] = len(test)
    return row


def print_detail_table(rows: list[dict[str, Any]]) -> None:
    header = [
        "arm",
        "tokens",
        "tower GFLOP/img",
        "fine_text acc %",
        "fine_count acc %",
        "train s",
        "final loss",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        trained = "train_s" in row
        cells = [
            row["label"],
            str(row["tokens"]) if trained else "-",
            f"{row['gflops']:.3f}" if trained else "-",
            f"{row['fine_text']:.1f}",
            f"{row['fine_count']:.1f}",
            f"{row['train_s']:.0f}" if trained else "-",
            f"{row['final_loss']:.3f}" if trained else "-",
        ]
        print("| " + " | ".join(cells) + " |")
    n = ", ".join(f"{t} n={rows[0][f'{t}_n']}" for t in DETAIL_TASKS)
    print(f"\ntest questions: {n}")


def export_tower(model_dir: str, tower_dir: Path) -> str:
    """Save a trained model's ConvNeXt as a transformers directory, the form `vision.pretrained` loads."""
    from unillava.modeling import LlavaModel

    LlavaModel.from_pretrained(model_dir).vision_tower.model.save_pretrained(tower_dir)
    return str(tower_dir)


def training_experiment(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Experiments 5(b) (`detail`) and 5(c) (`frozen`); prints a markdown table, returns its rows."""
    started = time.perf_counter()
    out = Path(args.out)
    data = make_data(args)
    print(
        f"data: {data} ({args.n_train} train / {args.n_test} test scenes at {DETAIL_SCENE_SIZE} px)",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    if args.experiment == "detail":
        arms = detail_arms()
    else:
        pretrain = Arm("pretrain-128", f"pre-training @ {PRETRAIN_SIZE} px", convnext_vision(PRETRAIN_SIZE))
        if args.arms is None or pretrain.name in args.arms:
            rows.append(run_arm(pretrain, data, out, args, args.pretrain_steps))
            tower = export_tower(rows[-1]["model_dir"], out / "pretrained-tower")
        else:
            tower = str(out / "pretrained-tower")
        arms = frozen_arms(tower)
    for arm in arms:
        if args.arms is None or arm.name in args.arms:
            rows.append(run_arm(arm, data, out, args, args.steps))
    print(
        f"\nexperiment {args.experiment}: {args.steps} steps x batch {args.batch} per arm, lr {args.lr}, "
        f"torch threads {torch.get_num_threads()}\n"
    )
    print_detail_table([*rows, majority_row(data, args.eval_limit)])
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiment", choices=["compute", "detail", "frozen"], default="compute")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is steadiest under load)"
    )
    compute = parser.add_argument_group("compute (5a)")
    compute.add_argument("--geometry", choices=sorted(GEOMETRIES), default="scaled")
    compute.add_argument("--resolutions", default="336,448,672,768,1024,1536")
    compute.add_argument("--cap", type=float, default=30.0, help="skip cells estimated to take longer (s)")
    trained = parser.add_argument_group("detail (5b) and frozen (5c)")
    trained.add_argument(
        "--data", default="runs/convllava-detail/data", help="shapes data set (made if absent)"
    )
    trained.add_argument(
        "--scenes",
        choices=["mixed", "single-text"],
        default="mixed",
        help="mixed: every 5th scene fine, any number of characters; single-text: every scene fine with "
        "exactly one character, so fine_text is answered by reading alone (no object to find)",
    )
    trained.add_argument("--out", default=None, help="runs/convllava-EXPERIMENT by default")
    trained.add_argument("--n-train", type=int, default=5000, help="train scenes (every 5th is a fine one)")
    trained.add_argument("--n-test", type=int, default=600, help="test scenes")
    trained.add_argument("--steps", type=int, default=500, help="optimizer steps per arm")
    trained.add_argument("--pretrain-steps", type=int, default=500, help="5(c): low-resolution steps")
    trained.add_argument("--batch", type=int, default=16)
    trained.add_argument("--lr", type=float, default=1e-3)
    trained.add_argument("--eval-limit", type=int, default=None, help="test questions per task")
    trained.add_argument("--arms", type=lambda v: v.split(","), default=None, help="run only these arms")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.experiment == "compute":
        compute_experiment(args)
    else:
        args.out = args.out or f"runs/convllava-{args.experiment}"
        training_experiment(args)


if __name__ == "__main__":
    main()
