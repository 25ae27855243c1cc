"""`unillava validate-data`: check data files and their images before a run, listing every problem."""

from __future__ import annotations

import argparse
from pathlib import Path

from unillava.data.images import DEFAULT_MAX_PIXELS
from unillava.data.validate import ValidationReport, default_workers, validate_dataset
from unillava.errors import DataError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `validate-data` command."""
    parser = subparsers.add_parser(
        "validate-data",
        help="check LLaVA-format data files and every image they name",
        description=(
            "Read every record and fully decode every image, then print each problem as FILE:LINE: message "
            "and a summary. Exit status: 0 clean, 1 problems found, 2 a file could not be opened."
        ),
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="LLaVA-format .json (list) or .jsonl file")
    parser.add_argument(
        "--image-root",
        metavar="DIR",
        default=None,
        help="folder relative image paths start from (default: each FILE's folder)",
    )
    parser.add_argument("--no-images", action="store_true", help="check the records only; do not open images")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"reject images with more pixels than this (default {DEFAULT_MAX_PIXELS})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="threads decoding images (default: CPU count, max 8)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate each FILE in turn, print its problems as they are found, then one summary line."""
    for name in args.files:
        if not Path(name).is_file():
            raise DataError(
                f"{name}: dataset file not found" if not Path(name).exists() else f"{name}: not a file"
            )
    if args.image_root is not None and not args.no_images and not Path(args.image_root).is_dir():
        raise DataError(f"--image-root {args.image_root}: directory not found")
    total = ValidationReport(images_checked=not args.no_images)
    for name in args.files:
        report = validate_dataset(
            name,
            args.image_root,
            check_images=not args.no_images,
            max_pixels=args.max_pixels,
            workers=args.workers,
            progress=not args.no_progress,
        )
        for problem in report.problems:
            print(f"{problem.source}: {problem.message}", flush=True)
        for warning in report.warnings:
            print(f"{warning.source}: warning: {warning.message}", flush=True)
        total = total.merge(report)
    print(total.summary())
    return 0 if total.ok else 1
