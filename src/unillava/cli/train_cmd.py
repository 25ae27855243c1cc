"""`unillava train CONFIG.yaml [key=value ...] [--resume]`: run one training stage from a recipe.

For several processes or GPUs, launch this module with accelerate, e.g.
`accelerate launch --config_file configs/accelerate/zero3.yaml -m unillava.cli.train_cmd CONFIG.yaml`.
"""

from __future__ import annotations

import argparse
import os
import sys

from unillava.errors import UnillavaError
from unillava.training import Trainer, load_train_config


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG.yaml", help="training recipe (see configs/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override recipe fields, e.g. data.train_files=[a.jsonl] lr=1e-4 lora.r=64",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir"
    )
    parser.set_defaults(func=run)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train` command."""
    parser = subparsers.add_parser(
        "train",
        help="train a model from a YAML recipe",
        description="Train one stage (projector alignment, full or LoRA fine-tuning) from a YAML recipe.",
    )
    _add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Load the recipe with its overrides and train; errors in the recipe name the field."""
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("resume=true")
    config = load_train_config(args.config, overrides)
    result = Trainer(config).train()
    if result.model_dir is not None:
        print(f"trained {result.step} steps; model saved to {result.model_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m unillava.cli.train_cmd` (what `accelerate launch -m` runs per process)."""
    parser = argparse.ArgumentParser(prog="unillava train", description="Train one stage from a YAML recipe.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UnillavaError as err:
        if args.debug or os.environ.get("UNILLAVA_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
