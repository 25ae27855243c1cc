"""The `unillava` command line. Each command lives in its own module with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from unillava.errors import UnillavaError

# Modules under unillava.cli that define `register(subparsers)`; each adds one or more commands.
COMMAND_MODULES = [
    "data_cmd",
    "score_cmd",
    "generate_cmd",
    "validate_cmd",
    "eval_cmd",
    "demo_cmd",
    "export_cmd",
    "convert_cmd",
    "train_cmd",
    "serve_cmd",
    "segment_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unillava", description="LLaVA-family multimodal models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"unillava.cli.{name}").register(subparsers)
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
