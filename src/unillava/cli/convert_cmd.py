"""`unillava convert omg-xtuner`: a released OMG-LLaVA (XTuner .pth + OMG-Seg + InternLM2) -> a unillava model."""

from __future__ import annotations

import argparse

import torch

from unillava.omg.converter import convert_xtuner_checkpoint

DTYPES = ("bfloat16", "float16", "float32")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `convert` command; each source layout is a subcommand."""
    parser = subparsers.add_parser(
        "convert",
        help="convert weights released by another codebase into a unillava model directory",
        description="Convert weights released in another codebase's layout into a unillava model directory.",
    )
    sources = parser.add_subparsers(dest="source", required=True)
    omg = sources.add_parser(
        "omg-xtuner",
        help="OMG-LLaVA: XTuner .pth + OMG-Seg segmenter + InternLM2 directory",
        description=(
            "Convert a released OMG-LLaVA: the XTuner .pth (projectors, LLM embeddings, LoRA deltas), the "
            "OMG-Seg segmenter (omg_seg_convl.pth), its class text embeddings and the InternLM2-Chat-7B "
            "directory. Keys not loaded are printed with the reason and listed in OUT/xtuner_conversion.json. "
            "Exit status 2 when an input is missing weights or has another layout."
        ),
    )
    omg.add_argument("--pth", required=True, help="the XTuner OMG-LLaVA .pth")
    omg.add_argument("--segmenter", required=True, help="OMG-Seg checkpoint (omg_seg_convl.pth)")
    omg.add_argument(
        "--llm", required=True, metavar="DIR", help="InternLM2 directory (config, weights, tokenizer.model)"
    )
    omg.add_argument(
        "--class-embeddings",
        metavar="PTH",
        default=None,
        help="the segmenter's class text embeddings (convnext_large_d_320_CocoPanopticOVDataset.pth)",
    )
    omg.add_argument(
        "--backbone",
        default=None,
        help="open_clip ConvNeXt checkpoint, only for a segmenter file without backbone weights",
    )
    omg.add_argument(
        "--lora-alpha",
        type=float,
        default=256.0,
        help="LoRA alpha the .pth was trained with (peft does not store it; released: 256)",
    )
    omg.add_argument("--image-size", type=int, default=1024, help="input side in pixels (released: 1024)")
    omg.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="weights dtype to write")
    omg.add_argument("--out", required=True, help="output model directory (new or empty)")
    omg.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty OUT")
    omg.set_defaults(func=run_omg_xtuner)


def run_omg_xtuner(args: argparse.Namespace) -> int:
    """Convert and print what was written and what was not loaded."""
    result = convert_xtuner_checkpoint(
        args.pth,
        args.out,
        segmenter=args.segmenter,
        llm=args.llm,
        class_embeddings=args.class_embeddings,
        backbone=args.backbone,
        lora_alpha=args.lora_alpha,
        image_size=args.image_size,
        dtype=getattr(torch, args.dtype),
        overwrite=args.overwrite,
    )
    print(result.summary())
    return 0
