"""`unillava eval`: generate predictions on task files and score them."""

from __future__ import annotations

import argparse
from pathlib import Path

from unillava.errors import UnillavaError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a model on procedural task files")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="a directory written by `unillava data shapes`")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--task", action="append", help="a task name; repeat for several")
    group.add_argument("--suite", choices=["shapes"], help="every task of a suite")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="first N samples of each task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", default=None, help="output directory (default: MODEL/eval-SPLIT)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import unillava
    from unillava.evaluation.runner import SUITES, evaluate, print_summary

    if args.limit is not None and args.limit < 1:
        raise UnillavaError("--limit must be at least 1")
    data = Path(args.data)
    if not data.is_dir():
        raise UnillavaError(f"{data}: data directory not found")
    tasks = list(SUITES[args.suite]) if args.suite else args.task
    if args.suite:
        tasks = [t for t in tasks if (data / "tasks" / args.split / f"{t}.jsonl").is_file()]
    model = unillava.load(args.model, dtype=args.dtype)
    out = Path(args.out) if args.out else Path(args.model) / f"eval-{args.split}"
    summary = evaluate(
        model, data, tasks, out, split=args.split, limit=args.limit, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    print_summary(summary["tasks"])
    print(f"results: {out / 'results.json'}  report: {out / 'report.md'}")
    return 0
