"""Inference speed: unillava vs transformers' LlavaForConditionalGeneration on the same weights.

The model is exported with `unillava export --to hf` and loaded back by transformers, so both run the
same weights on the same token ids and pixels. Prints time to first token (TTFT) and decode tokens/s at
batch 1 and 8, fp32 and bf16, with the ratio unillava/transformers (>1 means unillava is faster).

    .venv/bin/python benchmarks/infer.py [--model DIR] [--new-tokens 32] [--repeats 3]

Without --model, a model with the embedded default LLM (SmolLM2-135M) and the demo's CLIP geometry
(random vision weights: speed does not depend on their values) is built and used.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
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
from unillava.modeling import LlavaModel


def default_model() -> LlavaModel:
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


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()

    ours_fp32 = load_model(args.model) if args.model else default_model()
    hf_dir = Path(tempfile.mkdtemp(prefix="unillava-bench-"))
    export_hf(ours_fp32, hf_dir)
    theirs_fp32 = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()

    table = Table(
        title=f"unillava vs transformers Llava ({torch.get_num_threads()} threads, {args.new_tokens} new tokens)"
    )
    for col in (
        "dtype",
        "batch",
        "TTFT ours (s)",
        "TTFT hf (s)",
        "TTFT ratio",
        "decode ours (tok/s)",
        "decode hf (tok/s)",
        "decode ratio",
    ):
        table.add_column(col, justify="right")
    for dtype in (torch.float32, torch.bfloat16):
        ours = InferenceModel(ours_fp32.to(dtype).eval())
        theirs = theirs_fp32.to(dtype)
        for batch_size in [int(b) for b in args.batches.split(",")]:
            images = [
                [Image.new("RGB", (64 + 8 * i, 64), (40 * i % 255, 90, 160))] for i in range(batch_size)
            ]
            prompts = [[user_message(f"Describe image number {i} in detail.", 1)] for i in range(batch_size)]
            batch, _ = ours.processor.prompt_batch(prompts, images)
            pixels = torch.stack(batch.images).to(dtype)
            stop = ours.processor.stop_token_ids
            common = {"do_sample": False, "pad_token_id": ours.tokenizer.pad_token_id, "eos_token_id": stop}

            def run_ours(n: int, ours=ours, batch=batch, common=common) -> None:
                with torch.inference_mode():
                    ours.model.generate(
                        batch.input_ids,
                        attention_mask=batch.attention_mask,
                        images=batch.images,
                        max_new_tokens=n,
                        min_new_tokens=n,
                        **common,
                    )

            def run_theirs(n: int, theirs=theirs, batch=batch, pixels=pixels, common=common) -> None:
                with torch.inference_mode():
                    theirs.generate(
                        input_ids=batch.input_ids,
                        attention_mask=batch.attention_mask,
                        pixel_values=pixels,
                        max_new_tokens=n,
                        min_new_tokens=n,
                        **common,
                    )

            ttft_ours = _time(lambda: run_ours(1), args.repeats)
            ttft_theirs = _time(lambda: run_theirs(1), args.repeats)
            full_ours = _time(lambda: run_ours(args.new_tokens), args.repeats)
            full_theirs = _time(lambda: run_theirs(args.new_tokens), args.repeats)
            decode_ours = batch_size * (args.new_tokens - 1) / max(full_ours - ttft_ours, 1e-9)
            decode_theirs = batch_size * (args.new_tokens - 1) / max(full_theirs - ttft_theirs, 1e-9)
            table.add_row(
                str(dtype).replace("torch.", ""),
                str(batch_size),
                f"{ttft_ours:.3f}",
                f"{ttft_theirs:.3f}",
                f"{ttft_theirs / ttft_ours:.2f}",
                f"{decode_ours:.1f}",
                f"{decode_theirs:.1f}",
                f"{decode_ours / decode_theirs:.2f}",
            )
    Console().print(table)


if __name__ == "__main__":
    main()
