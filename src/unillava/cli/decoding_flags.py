"""`--quantize` and `--no-fast`: which decoding path a loaded model runs (docs/inference.md)."""

from __future__ import annotations

import argparse
from typing import Any

from unillava.decoding import QUANTIZE_CHOICES


def add_decoding_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantize",
        default="none",
        choices=QUANTIZE_CHOICES,
        help="int4: weight-only int4 language model on the fast path (lossy; faster decoding on a CPU, docs/inference.md)",
    )
    parser.add_argument(
        "--no-fast",
        dest="fast",
        action="store_false",
        help="decode with transformers' generate instead of the fast path (same greedy text, slower)",
    )


def decoding_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"fast": args.fast, "quantize": args.quantize}
