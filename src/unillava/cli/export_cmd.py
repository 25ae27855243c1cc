"""`unillava export --to hf|compact MODEL OUT`: the llava-hf layout (transformers, vLLM, ...) or a compact
unillava directory (only what training changed on top of named pretrained parts)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from unillava.errors import CheckpointError
from unillava.hub import export_hf, load_model
from unillava.hub.compact import export_compact

DTYPES = ("float32", "float16", "bfloat16")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `export` command."""
    parser = subparsers.add_parser(
        "export",
        help="convert a model directory to another layout (llava-hf, compact)",
        description=(
            "hf: read MODEL in any layout unillava loads (unillava, llava-hf, original LLaVA) and write it to OUT "
            "in the llava-hf layout (LlavaForConditionalGeneration + LlavaProcessor). compact: read a unillava "
            "directory whose tower and LLM came from named pretrained sources and write only the difference "
            "(projector, LoRA adapter, new token rows); it loads bit for bit like MODEL. Exit status 2 when "
            "MODEL cannot be read or cannot be represented."
        ),
    )
    parser.add_argument(
        "--to",
        required=True,
        choices=["hf", "compact"],
        help="target layout (hf: llava-hf; compact: unillava, difference from the base parts)",
    )
    parser.add_argument("model", metavar="MODEL", help="model directory")
    parser.add_argument("out", metavar="OUT", help="output directory (new or empty)")
    parser.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="weights dtype to write (default float32)"
    )
    parser.add_argument(
        "--vision-tower",
        metavar="DIR",
        default=None,
        help="original LLaVA: local CLIP directory for mm_vision_tower",
    )
    parser.add_argument(
        "--base-llm",
        metavar="DIR",
        default=None,
        help="original LLaVA stage-1 output: the base LLM directory",
    )
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty OUT")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load MODEL, refuse to clobber OUT unless asked, export, and print where it went."""
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        raise CheckpointError(
            f"{out}: exists and is not an empty directory; choose another OUT or pass --overwrite"
        )
    if Path(args.model).expanduser().resolve() == out.resolve():
        raise CheckpointError(f"{out}: OUT must differ from MODEL")
    if args.to == "compact":
        stats = export_compact(args.model, out)
        print(f"wrote compact model to {out} ({stats['mib']} MiB of weights, adapter: {stats['adapter']})")
        return 0
    model = load_model(
        args.model,
        dtype=getattr(torch, args.dtype),
        vision_tower_path=args.vision_tower,
        base_llm_path=args.base_llm,
    )
    export_hf(model, out, overwrite=args.overwrite)
    print(f"wrote llava-hf model to {out}")
    return 0
