"""OMG-LLaVA's ablation on the procedural data: what the perception prior and the object tokens buy.

Trains each arm with unillava's own recipe path (`unillava train`, stage 1 then stage 2) over one frozen
stage-0 segmenter, evaluates it with `unillava eval`, and prints one markdown table like the paper's
ablation (Table 5 of arXiv 2406.19389), plus the LLaVA-1.5-style arm the issue compares VQA against:

| arm | tokens the LLM sees | stage-2 data |
|---|---|---|
| llava | pixel tokens of the frozen encoder through the MLP projector (LLaVA-1.5's design) | image-level only (VQA) |
| baseline | the same pixel tokens | image-level + pixel-level mix |
| prior | + the Perception Prior Embedding | mix |
| full | + prior + separator + object tokens (OMG-LLaVA) | mix |

Every arm has the same LLM, the same frozen segmenter, the same stage-1 captions and the same VQA samples;
the mix arms also see refseg / reasonseg / GCG / region-captioning / region-VQA samples. On a CPU the
LLM is a small Llama trained from scratch with the SmolLM2 tokenizer (stated in the table header), so the
numbers measure the token design, not a pretrained LLM's knowledge.

    unillava data shapes --out data/omg --n 3000 --min-size 128 --max-size 256 --difficulty easy
    unillava train-segmenter --data data/omg --out runs/omg-seg --config configs/omg-shapes/perception.json \\
        --image-size 192 --steps 2500 --batch-size 8 --lr 3e-4
    python benchmarks/omg.py --data data/omg --segmenter runs/omg-seg --out runs/omg-bench

Each arm's runs are kept under --out (recipes, logs, models, eval results); a finished stage or eval is
not redone, so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ARMS: dict[str, dict[str, Any]] = {
    "llava": {"use_prior": False, "object_tokens": False, "pixel_level": False},
    "baseline": {"use_prior": False, "object_tokens": False, "pixel_level": True},
    "prior": {"use_prior": True, "object_tokens": False, "pixel_level": True},
    "full": {"use_prior": True, "object_tokens": True, "pixel_level": True},
    # Not part of the paper's ablation (run it with --arms full-decoder): OMG-LLaVA plus the optional
    # trainable copy of the decoder for [SEG] queries.
    "full-decoder": {
        "use_prior": True,
        "object_tokens": True,
        "pixel_level": True,
        "seg_decoder": "trainable",
    },
}
ABLATION = ("llava", "baseline", "prior", "full")
PIXEL_TASKS = ("refseg", "reasonseg", "gcg", "region_caption", "region_vqa")
EVAL_TASKS = ("refseg", "reasonseg", "gcg", "region_caption", "vqa")
METRICS = {
    "refseg": "ciou",
    "reasonseg": "ciou",
    "gcg": "miou",
    "region_caption": "attribute_accuracy",
    "vqa": "accuracy",
}


def llm_config(width: int, layers: int) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, width // 64),
        "num_key_value_heads": max(1, width // 128),
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    }


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_mix(data: Path, tasks: dict[str, int], out: Path, seed: int) -> Path:
    """The first n records of each task file (the generator already shuffles scenes), shuffled together."""
    records: list[dict[str, Any]] = []
    for task, n in tasks.items():
        records += read_jsonl(data / "tasks" / "train" / f"{task}.jsonl")[:n]
    random.Random(seed).shuffle(records)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return out


def model_section(args: argparse.Namespace, arm: dict[str, Any]) -> dict[str, Any]:
    # Records of one scene share its image, so a cache over every image runs the segmenter once per image
    # instead of once per record (about 1 MB per 192 px image).
    extra = {
        "use_prior": arm["use_prior"],
        "object_tokens": arm["object_tokens"],
        "cache_size": args.cache_size,
        "object_regularizer": 10.0 if arm["object_tokens"] else 0.0,
        "seg_decoder": arm.get("seg_decoder", "frozen"),
    }
    return {
        "vision": {
            "type": "omg",
            "pretrained": str(args.segmenter),
            "image_size": args.image_size,
            "image_mode": "pad",
            "extra": extra,
        },
        "projector": {"type": "mlp2x_gelu"},
        "llm": {
            "pretrained": None,
            "tokenizer": "smollm2-135m-instruct",
            "hf_config": llm_config(args.llm_width, args.llm_layers),
        },
        "template": "auto",
        "max_length": 320,
    }


def recipe(
    args: argparse.Namespace, out: Path, train_file: Path, length: dict[str, Any], lr: float, **fields: Any
) -> Path:
    """A training recipe; `length` is {"max_steps": n} or {"epochs": e}."""
    config = {
        "data": {"train_files": [str(train_file)], "image_root": str(args.data), "num_workers": 0},
        "lr": lr,
        "warmup_ratio": 0.03,
        "lr_scheduler": "cosine",
        **length,
        "per_device_batch_size": args.batch,
        "global_batch_size": args.batch,
        "seed": args.seed,
        "output_dir": str(out),
        "log_every": 20,
        "progress": False,
        "keep_last": 1,
        **fields,
    }
    path = out.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def run_logged(command: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as sink:
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def train_arm(args: argparse.Namespace, name: str, arm: dict[str, Any]) -> tuple[Path, float]:
    root = args.out / name
    model_dir = root / "stage2" / "model"
    timing = root / "train_seconds.json"
    if (model_dir / "unillava_config.json").is_file() and timing.is_file():
        return model_dir, json.loads(timing.read_text())["seconds"]
    captions = write_mix(
        args.data, {"caption": args.stage1_steps * args.batch}, root / "stage1.jsonl", args.seed
    )
    stage2_tasks = {"vqa": args.vqa_samples}
    if arm["pixel_level"]:
        stage2_tasks |= {task: args.pixel_samples for task in PIXEL_TASKS}
    mix = write_mix(args.data, stage2_tasks, root / "stage2.jsonl", args.seed)
    cli = [sys.executable, "-m", "unillava.cli"]
    stage1 = recipe(
        args,
        root / "stage1",
        captions,
        {"max_steps": args.stage1_steps},
        1e-3,
        model=model_section(args, arm),
        train_projector=True,
        train_vision=True,
        train_llm="full",
    )
    seconds = run_logged([*cli, "train", str(stage1)], root / "stage1.log")
    stage2 = recipe(
        args,
        root / "stage2",
        mix,
        {"epochs": args.stage2_epochs},
        1e-3,
        init_from=str(root / "stage1" / "model"),
        train_projector=True,
        train_vision=True,
        train_llm="full",
        model_overrides={"vision.extra.object_regularizer": 0.0},
    )
    seconds += run_logged([*cli, "train", str(stage2)], root / "stage2.log")
    timing.write_text(json.dumps({"seconds": seconds}))
    return model_dir, seconds


def evaluate_arm(args: argparse.Namespace, name: str, model_dir: Path) -> dict[str, float]:
    out = args.out / name / "eval"
    results = out / "results.json"
    if not results.is_file():
        command = [
            sys.executable,
            "-m",
            "unillava.cli",
            "eval",
            "--model",
            str(model_dir),
            "--data",
            str(args.data),
            "--limit",
            str(args.limit),
            "--batch-size",
            "16",
            "--out",
            str(out),
            "--max-new-tokens",
            str(args.max_new_tokens),
        ]
        for task in EVAL_TASKS:
            command += ["--task", task]
        run_logged(command, args.out / name / "eval.log")
    tasks = json.loads(results.read_text())["tasks"]
    return {task: float(tasks[task]["metrics"][METRICS[task]]) for task in EVAL_TASKS if task in tasks}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True, help="a `unillava data shapes` directory")
    parser.add_argument(
        "--segmenter", type=Path, required=True, help="a `unillava train-segmenter` directory"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/omg-bench"))
    parser.add_argument("--arms", default=",".join(ABLATION), help=f"comma list of {', '.join(ARMS)}")
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--llm-width", type=int, default=256)
    parser.add_argument("--llm-layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--stage1-steps", type=int, default=150)
    parser.add_argument("--stage2-epochs", type=float, default=1.0, help="over each arm's own stage-2 mix")
    parser.add_argument("--vqa-samples", type=int, default=6000, help="VQA records in every arm's stage 2")
    parser.add_argument("--pixel-samples", type=int, default=2000, help="records of each pixel-level task")
    parser.add_argument("--limit", type=int, default=150, help="test records per task")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-size", type=int, default=4096, help="segmenter outputs kept in memory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    names = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in names if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; known: {', '.join(ARMS)}")
    rows = []
    for name in names:
        model_dir, seconds = train_arm(args, name, ARMS[name])
        scores = evaluate_arm(args, name, model_dir)
        rows.append((name, scores, seconds))
        print(f"{name}: {json.dumps(scores)} ({seconds:.0f} s training)", file=sys.stderr, flush=True)
    print(
        f"\nLLM: Llama {args.llm_layers} x {args.llm_width} from scratch; segmenter {args.segmenter} (frozen); "
        f"{args.image_size} px; batch {args.batch}; stage 1 {args.stage1_steps} steps of captions; stage 2 "
        f"{args.stage2_epochs:g} epoch of {args.vqa_samples} VQA (+ {args.pixel_samples} of each pixel-level task "
        f"in the mix arms); {args.limit} test records per task\n"
    )
    header = (
        "| arm | prior | object tokens | stage-2 data | "
        + " | ".join(f"{t} {METRICS[t]}" for t in EVAL_TASKS)
        + " | train s |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, scores, seconds in rows:
        arm = ARMS[name]
        cells = " | ".join(f"{scores[t]:.3f}" if t in scores else "-" for t in EVAL_TASKS)
        data = "mix" if arm["pixel_level"] else "VQA only"
        print(
            f"| {name} | {'yes' if arm['use_prior'] else 'no'} | {'yes' if arm['object_tokens'] else 'no'} | "
            f"{data} | {cells} | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
