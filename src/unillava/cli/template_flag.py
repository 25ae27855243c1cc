"""`--template NAME`: override the prompt format a loaded checkpoint ships (docs/templates.md)."""

from __future__ import annotations

import argparse

from unillava.conversation import TEMPLATE_NAMES


def add_template_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--template",
        default=None,
        choices=TEMPLATE_NAMES,
        help="prompt format; default: the checkpoint's own (its chat template, or the one it was trained with)",
    )
