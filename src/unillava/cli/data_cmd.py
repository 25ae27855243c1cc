"""`unillava data ...`: dataset generators. `data shapes` writes the procedural shapes benchmark."""

from __future__ import annotations

import argparse
import json
import sys

from unillava.data.shapes import generate_dataset
from unillava.errors import DataError


def _parse_aspect(text: str) -> tuple[float, float]:
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 2:
        raise DataError(f"--aspect-range must be two numbers 'lo,hi' (e.g. 0.5,2.0), got {text!r}")
    return values[0], values[1]


def _run_shapes(args: argparse.Namespace) -> int:
    manifest = generate_dataset(
        args.out,
        args.n,
        args.seed,
        n_val=args.n_val,
        n_test=args.n_test,
        min_size=args.min_size,
        max_size=args.max_size,
        aspect_range=_parse_aspect(args.aspect_range),
        difficulty=args.difficulty,
        fine_every=args.fine_every,
        max_texts=args.max_texts,
        workers=args.workers,
        tasks=args.tasks,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    summary = {
        split: {"scenes": info["scenes"], **info["tasks"]} for split, info in manifest["splits"].items()
    }
    print(json.dumps({"out": str(args.out), "splits": summary}, indent=2), file=sys.stdout)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command group and its `shapes` subcommand."""
    data = subparsers.add_parser("data", help="generate datasets", description="Generate datasets.")
    sub = data.add_subparsers(dest="data_command", required=True)
    shapes = sub.add_parser(
        "shapes",
        help="procedural shapes benchmark (scenes, COCO masks, task files)",
        description="Render train/val/test shapes scenes with exact masks and write LLaVA-format task files.",
    )
    shapes.add_argument("--out", required=True, help="output directory")
    shapes.add_argument("--n", type=int, required=True, help="number of train scenes")
    shapes.add_argument("--seed", type=int, default=0, help="base seed; each split derives its own")
    shapes.add_argument("--n-val", type=int, default=None, help="val scenes (default max(1, n//10))")
    shapes.add_argument("--n-test", type=int, default=None, help="test scenes (default max(1, n//10))")
    shapes.add_argument("--min-size", type=int, default=128, help="smallest image side in px")
    shapes.add_argument("--max-size", type=int, default=1536, help="largest image side in px")
    shapes.add_argument("--aspect-range", default="0.5,2.0", help="width/height range 'lo,hi'")
    shapes.add_argument("--difficulty", default="medium", help="easy, medium or hard")
    shapes.add_argument(
        "--fine-every", type=int, default=5, help="every Nth scene has the fine profile (1: all, 0: none)"
    )
    shapes.add_argument(
        "--max-texts", type=int, default=None, help="at most this many objects per scene carry a character"
    )
    shapes.add_argument("--workers", type=int, default=None, help="processes (default: all CPU cores)")
    shapes.add_argument("--tasks", default="all", help="'all' or a comma list of task names")
    shapes.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    shapes.add_argument("--quiet", action="store_true", help="no progress bar")
    shapes.set_defaults(func=_run_shapes)
