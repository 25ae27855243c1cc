"""`unillava score`: score a prediction file against task annotations with the official metrics."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from unillava.evaluation.scoring import TASKS, results_table, score_files, write_results


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `score` command."""
    parser = subparsers.add_parser(
        "score",
        help="score predictions against task annotations",
        description="Score a prediction JSONL against a task's annotations with the official metrics; "
        "prints a table and writes results_{task}.json.",
    )
    parser.add_argument("--task", required=True, choices=TASKS, help="task to score")
    parser.add_argument(
        "--pred", required=True, type=Path, help="prediction JSONL ({id, text, masks?, phrases?})"
    )
    parser.add_argument(
        "--ann",
        required=True,
        type=Path,
        help="annotation JSONL, or a tasks/{split}/ directory holding {task}.jsonl",
    )
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: beside --pred)")
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (its Java start takes ~10 s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Score, print the table, the counts and any warnings, and write the results JSON."""
    results = score_files(args.task, args.pred, args.ann, meteor=not args.no_meteor)
    out_dir = args.out if args.out is not None else args.pred.parent
    path = write_results(results, out_dir)
    console = Console()
    console.print(results_table(results))
    counts = results["counts"]
    console.print(
        f"{counts['annotations']} annotations, {counts['predictions']} predictions: "
        f"{counts['missing']} missing, {counts['unknown']} unknown, {counts['duplicates']} duplicates",
        markup=False,
    )
    errors = Console(stderr=True)
    for warning in results["warnings"]:
        errors.print(f"warning: {warning}", style="yellow", markup=False, highlight=False)
    console.print(f"wrote {path}", markup=False)
    return 0
