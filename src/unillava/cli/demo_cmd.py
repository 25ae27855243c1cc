"""`unillava demo`: the main job on the embedded default."""

from __future__ import annotations

import argparse

from unillava.demo import run_demo


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="train a small LLaVA on the embedded default LLM with procedural data, evaluate, report"
    )
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--preset", default="default", choices=["default", "convnext", "clip", "tiny"])
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    run_demo(args.out, args.preset, args.seed)
    return 0
