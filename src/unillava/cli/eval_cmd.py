"""`unillava eval`: generate predictions on procedural task files or on the papers' benchmarks, and score them."""

from __future__ import annotations

import argparse
from pathlib import Path

from unillava.cli.decoding_flags import add_decoding_flags, decoding_options
from unillava.cli.template_flag import add_template_flag
from unillava.errors import UnillavaError
from unillava.evaluation.benchmarks import SUITES, task_benchmarks
from unillava.evaluation.runner import IMAGE_SOURCES, RunOptions, print_summary, resolve, run_benchmarks
from unillava.inference import load


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model on procedural task files or on the papers' benchmarks",
        description="With --task/--suite shapes: procedural task files written by `unillava data shapes`. "
        "With --benchmark NAME or --suite llava-1.5|convllava|omg-llava: the papers' benchmarks, read from "
        "their released files under --data (see docs/evaluation.md).",
    )
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "--data",
        required=True,
        help="`unillava data shapes` output, or the directory holding the benchmarks' folders",
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--task", action="append", help="a procedural task name; repeat for several")
    group.add_argument(
        "--benchmark", action="append", help="a benchmark name (e.g. pope, mme, gqa); repeat for several"
    )
    group.add_argument(
        "--suite",
        choices=list(SUITES),
        help="every task of the shapes suite, or every benchmark of a paper whose data exists",
    )
    parser.add_argument(
        "--split", default=None, help="shapes: default test; benchmarks: default each benchmark's paper split"
    )
    parser.add_argument("--limit", type=int, default=None, help="first N samples of each task or benchmark")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="default 128 for tasks; for benchmarks each benchmark's own default",
    )
    parser.add_argument(
        "--out", default=None, help="output directory (default: MODEL/eval-SPLIT or MODEL/eval-BENCHMARKS)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    add_template_flag(parser)
    add_decoding_flags(parser)
    parser.add_argument(
        "--images",
        default="own",
        choices=list(IMAGE_SOURCES),
        help="tasks: the image ablation: ask the same questions about a grey image (blank) or "
        "another record's image (other); default each record's own image",
    )
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="evaluate the rest when some records are invalid (they are counted and listed)",
    )
    parser.add_argument("--no-meteor", action="store_true", help="skip METEOR (needs Java)")
    parser.add_argument(
        "--judge-endpoint",
        default=None,
        help="OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1) for MM-Vet / LLaVA-Bench",
    )
    parser.add_argument("--judge-model", default=None, help="the judge model's name on that server")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Every selection (tasks, benchmarks, a suite) runs through `run_benchmarks`; the shapes tasks keep their
    own default split (test) and output folder (MODEL/eval-SPLIT[-IMAGES-image])."""
    if args.limit is not None and args.limit < 1:
        raise UnillavaError("--limit must be at least 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UnillavaError("--max-new-tokens must be at least 1")
    if args.batch_size < 1:
        raise UnillavaError("--batch-size must be at least 1")
    if args.judge_endpoint and not args.judge_model:
        raise UnillavaError("--judge-endpoint needs --judge-model (the judge's model name on that server)")
    data = Path(args.data)
    if not data.is_dir():
        raise UnillavaError(f"{data}: data directory not found")
    shapes = bool(args.task) or args.suite == "shapes"
    if args.images != "own" and not shapes:
        raise UnillavaError("--images applies to procedural tasks (--task / --suite shapes), not benchmarks")
    names = task_benchmarks(args.task) if args.task else args.benchmark
    resolve(names, args.suite)  # an unknown name fails before the model loads
    split = args.split or ("test" if shapes else None)
    if args.out:
        out = Path(args.out)
    elif shapes:
        suffix = "" if args.images == "own" else f"-{args.images}-image"
        out = Path(args.model) / f"eval-{split}{suffix}"
    else:
        out = Path(args.model) / f"eval-{args.suite or '-'.join(args.benchmark)}"
    opts = RunOptions(
        split=split,
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        skip_invalid=args.skip_invalid,
        meteor=not args.no_meteor,
        judge_endpoint=args.judge_endpoint,
        judge_model=args.judge_model,
        images_from=args.images,
    )
    model = load(args.model, dtype=args.dtype, template=args.template, **decoding_options(args))
    summary = run_benchmarks(
        model, data, out, names=names, suite=args.suite, opts=opts, model_name=Path(args.model).name
    )
    print_summary(summary)
    print(f"results: {out / 'results.json'}  report: {out / 'report.md'}")
    return 0
