"""Stage-2 training speed of the embedded default: samples/s, achieved GFLOPS vs. measured matmul peak,
peak memory, in bf16 (autocast) and fp32.

    .venv/bin/python benchmarks/train.py [--steps 6] [--batch 8] [--llm full|lora]

The model is the demo's (SmolLM2-135M-Instruct + a 96 px CLIP ViT trained here, random weights here
since speed does not depend on them), on procedural VQA samples. Model FLOPs per step are counted as
2*N*T forward + 4*N*T backward for trained weights (2*N*T when only input gradients flow), with N the
parameters of each part and T its tokens; attention's T^2 terms are left out (sequences are short).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from unillava.data.images import load_image
from unillava.data.llava_format import ConversationFile
from unillava.data.shapes import generate_dataset
from unillava.demo import PRESETS, model_config
from unillava.inference import load
from unillava.training.config import DataConfig, LoraSettings, TrainConfig
from unillava.training.trainer import train


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--llm", default="lora", choices=["lora", "full"])
    args = parser.parse_args()

    preset = PRESETS["default"]
    work = Path(tempfile.mkdtemp(prefix="unillava-train-bench-"))
    data = work / "data"
    generate_dataset(
        data,
        64,
        0,
        n_val=1,
        n_test=1,
        min_size=128,
        max_size=128,
        aspect_range=(1.0, 1.0),
        difficulty="easy",
        tasks=["vqa", "mc"],
    )
    table = Table(
        title=f"stage-2 training, {args.llm} LLM, batch {args.batch}, {torch.get_num_threads()} threads"
    )
    for col in (
        "dtype",
        "samples/s",
        "tokens/step",
        "model TFLOP/step",
        "GFLOPS",
        "matmul peak GFLOPS",
        "fraction of peak",
        "peak RSS (GiB)",
    ):
        table.add_column(col, justify="right")
    for bf16 in (True, False):
        out = work / ("bf16" if bf16 else "fp32")
        config = TrainConfig(
            model=model_config(preset),
            data=DataConfig(
                train_files=[str(data / "tasks/train/vqa.jsonl"), str(data / "tasks/train/mc.jsonl")],
                image_root=str(data),
                num_workers=0,
            ),
            train_projector=True,
            train_vision=True,
            train_llm=args.llm,
            lora=LoraSettings(r=16, alpha=32, dropout=0.0),
            lr=2e-4,
            max_steps=args.steps,
            per_device_batch_size=args.batch,
            global_batch_size=args.batch,
            bf16=bf16,
            output_dir=str(out),
            log_every=1,
            progress=False,
        )
        result = train(config)
        records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        steps = [r for r in records if "samples_per_s" in r][1:]  # the first step pays warm-up
        rate = sum(r["samples_per_s"] for r in steps) / len(steps)
        model = result.model_dir
        flops, tokens = step_flops(model, data, args.batch, args.llm)
        seconds_per_step = args.batch / rate
        achieved = flops / seconds_per_step / 1e9
        peak = matmul_peak(torch.bfloat16 if bf16 else torch.float32)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        table.add_row(
            "bf16" if bf16 else "fp32",
            f"{rate:.2f}",
            str(tokens),
            f"{flops / 1e12:.3f}",
            f"{achieved:.0f}",
            f"{peak:.0f}",
            f"{achieved / peak:.2f}",
            f"{rss:.1f}",
        )
    Console().print(table)


def step_flops(model_dir: Path, data: Path, batch: int, llm_mode: str) -> tuple[float, int]:
    """Model FLOPs of one step on a typical batch (see the module docstring for the formula)."""
    lm = load(model_dir)
    file = ConversationFile(data / "tasks/train/vqa.jsonl", image_root=data)
    tokens = 0
    for sample in file[:batch]:
        pixels = lm.processor.preprocess_images([load_image(file.image_path(sample, 0))])
        tokens += len(lm.processor.encode(sample.messages, pixels).input_ids)
    llm_params = sum(p.numel() for p in lm.model.language_model.parameters())
    vision_params = sum(p.numel() for p in lm.model.vision_tower.parameters())
    patches = lm.model.vision_tower.num_tokens(*pixels[0].shape[-2:]) + 1
    llm_factor = 6 if llm_mode == "full" else 4
    flops = llm_factor * llm_params * tokens + 6 * vision_params * patches * batch
    return float(flops), tokens


if __name__ == "__main__":
    main()
