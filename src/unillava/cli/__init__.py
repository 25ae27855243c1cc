"""The `unillava` command line. Each command lives in its own module with `register(subparsers)`."""

from __future__ import annotations

import argparse
import os
import sys

from unillava.cli import (
    convert_cmd,
    data_cmd,
    demo_cmd,
    eval_cmd,
    export_cmd,
    generate_cmd,
    score_cmd,
    segment_cmd,
    serve_cmd,
    train_cmd,
    validate_cmd,
)
from unillava.errors import UnillavaError

# Each module adds one or more commands with `register(subparsers)`, in this order in `--help`.
COMMAND_MODULES = [
    data_cmd,
    score_cmd,
    generate_cmd,
    validate_cmd,
    eval_cmd,
    demo_cmd,
    export_cmd,
    convert_cmd,
    train_cmd,
    serve_cmd,
    segment_cmd,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unillava", description="LLaVA-family multimodal models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except UnillavaError as err:
        if args.debug or os.environ.get("UNILLAVA_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
