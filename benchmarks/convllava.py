"""ConvLLaVA's compute argument, measured: tokens, vision time and LLM prefill time vs resolution.

Compares a ViT tower (CLIP-style, patch 14) with a ConvNeXt tower of 4 stages (stride 32) and of 5 stages
(stride 64, ConvLLaVA). A ViT's token count grows with the pixel count and its attention with the square
of that; a ConvNeXt is convolutional, so its time grows linearly with pixels, and stage 5 divides the
tokens the LLM must prefill by 4. Prints a markdown table plus fitted growth exponents
(time ~ pixels^k for vision, time ~ tokens^k for prefill).

    .venv/bin/python benchmarks/convllava.py [--geometry scaled|real] [--cap 30] [--resolutions 336,448,...]

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
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="scaled")
    parser.add_argument("--resolutions", default="336,448,672,768,1024,1536")
    parser.add_argument("--cap", type=float, default=30.0, help="skip cells estimated to take longer (s)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is steadiest under load)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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


if __name__ == "__main__":
    main()
