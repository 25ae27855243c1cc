"""Inference speed on the CPU: each unillava decoding path, transformers, and (optionally) llama.cpp.

Paths, all on the same weights, token ids and pixels:
- `transformers`: `LlavaForConditionalGeneration` on our model exported with `unillava export --to hf`;
- `generate`: unillava with `fast=False` (the model's `generate`);
- `fast`: unillava's default `FastDecoder` (same greedy text as `generate`: column `same text`);
- `fast int4`: the fast path on int4 weights (`--quantize int4`; lossy).
Per path: time to first token with one image (TTFT), prefill tokens/s (prompt incl. image tokens /
TTFT), batch-1 decode tokens/s, and batch-8 decode tokens/s summed over the rows.

With `--llama-bench PATH` (a llama.cpp `llama-bench` binary), llama.cpp runs the embedded default
LLM's own GGUF file (SmolLM2-135M-Instruct Q4_1, text only) with the same thread count, `-p 64 -n 64`,
and the last line is `decode_vs_llamacpp=<best unillava batch-1 decode / llama.cpp decode>`.

    .venv/bin/python benchmarks/infer.py [--model DIR] [--new-tokens 64] [--llama-bench PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from transformers import LlavaForConditionalGeneration

from unillava.config import LLMConfig, ModelConfig, VisionConfig
from unillava.conversation import user_message
from unillava.hub import export_hf, load_model
from unillava.inference import InferenceModel
from unillava.llm import smollm2_gguf_path
from unillava.modeling import LlavaModel


def default_model() -> LlavaModel:
    """The embedded default LLM (SmolLM2-135M) with a small random CLIP (64 image tokens): decoding
    speed does not depend on the vision weights' values."""
    torch.manual_seed(0)
    vision = VisionConfig(
        hf_config={
            "hidden_size": 192,
            "intermediate_size": 768,
            "num_hidden_layers": 4,
            "num_attention_heads": 3,
            "image_size": 64,
            "patch_size": 8,
        },
        image_size=64,
    )
    return LlavaModel.from_config(ModelConfig(vision=vision, llm=LLMConfig()))


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def llama_bench(binary: str, threads: int, tokens: int) -> dict[str, float]:
    """llama.cpp's prefill and decode tokens/s for the embedded default's GGUF."""
    command = [
        binary,
        "-m",
        str(smollm2_gguf_path()),
        "-t",
        str(threads),
        "-p",
        str(tokens),
        "-n",
        str(tokens),
    ]
    out = subprocess.run([*command, "-o", "json"], capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    prefill = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0)
    decode = next(r["avg_ts"] for r in rows if r["n_gen"] > 0)
    return {"prefill": prefill, "decode": decode}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="a model directory (default: SmolLM2 + small CLIP)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="rows of the batched decode column")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--llama-bench", default=None, help="path of llama.cpp's llama-bench binary")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    model = (load_model(args.model) if args.model else default_model()).to(dtype).eval()
    hf_dir = Path(tempfile.mkdtemp(prefix="unillava-bench-"))
    export_hf(model, hf_dir)
    transformers_model = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype).eval()
    paths = {
        "generate": InferenceModel(model, fast=False),
        "fast": InferenceModel(model),
        "fast int4": InferenceModel(model, quantize="int4"),
    }
    base = paths["generate"]
    size = model.config.vision.image_size
    pictures = [Image.new("RGB", (size + 8 * i, size), (40 * i % 255, 90, 160)) for i in range(args.batch)]
    prompts = [[user_message(f"Describe image number {i} in detail.", 1)] for i in range(args.batch)]
    batches = {
        n: base.processor.prompt_batch(prompts[:n], [[p] for p in pictures[:n]])[0] for n in (1, args.batch)
    }
    prompt_tokens = int(batches[1].attention_mask.sum())
    common = {"do_sample": False, "pad_token_id": base.tokenizer.pad_token_id, "eos_token_id": None}

    def runner(name: str, rows: int, new_tokens: int) -> Callable[[], torch.Tensor]:
        batch = batches[rows]
        settings = {**common, "max_new_tokens": new_tokens}
        if name == "transformers":
            pixels = torch.stack(batch.images).to(dtype)
            return lambda: transformers_model.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                pixel_values=pixels,
                **settings,
            )[:, batch.input_ids.shape[1] :]
        path = paths[name]
        return lambda: path.generate_ids(batch.input_ids, batch.attention_mask, batch.images, **settings)

    threads = torch.get_num_threads()
    table = Table(
        title=f"decoding paths ({threads} threads, {args.dtype}, prompt {prompt_tokens} tokens incl. image, "
        f"{args.new_tokens} new tokens)"
    )
    for column in (
        "path",
        "TTFT, 1 image (s)",
        "prefill (tok/s)",
        "decode b=1 (tok/s)",
        f"decode b={args.batch} (tok/s)",
        "same text as generate",
    ):
        table.add_column(column, justify="right")
    reference = runner("generate", 1, args.new_tokens)()
    decode_rates: dict[str, float] = {}
    with torch.inference_mode():
        for name in ("transformers", "generate", "fast", "fast int4"):
            ttft = _median_time(runner(name, 1, 1), args.repeats)
            full = _median_time(runner(name, 1, args.new_tokens), max(1, args.repeats - 1))
            batched_first = _median_time(runner(name, args.batch, 1), 1)
            batched = _median_time(runner(name, args.batch, args.new_tokens), 1)
            decode_rates[name] = (args.new_tokens - 1) / max(full - ttft, 1e-9)
            batched_rate = args.batch * (args.new_tokens - 1) / max(batched - batched_first, 1e-9)
            same = torch.equal(runner(name, 1, args.new_tokens)(), reference)
            table.add_row(
                name,
                f"{ttft:.3f}",
                f"{prompt_tokens / ttft:.0f}",
                f"{decode_rates[name]:.1f}",
                f"{batched_rate:.1f}",
                "yes" if same else "no",
            )
    if args.llama_bench:
        reference_rates = llama_bench(args.llama_bench, threads, 64)
        table.add_row(
            "llama.cpp (Q4_1 GGUF, text)",
            "",
            f"{reference_rates['prefill']:.0f}",
            f"{reference_rates['decode']:.1f}",
            "",
            "",
        )
    Console().print(table)
    if args.llama_bench:
        best = max(decode_rates, key=decode_rates.get)
        for name, rate in decode_rates.items():
            print(f"{name}: decode {rate / reference_rates['decode']:.2f} x llama.cpp")
        print(f"decode_vs_llamacpp={decode_rates[best] / reference_rates['decode']:.2f}  (path: {best})")


if __name__ == "__main__":
    main()
