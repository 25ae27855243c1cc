"""`--box`, `--point` and `--mask` visual prompts, shared by `segment`, `generate` and `chat`.

The three flags append to one list, `args.visual_prompts`, as (kind, text) pairs, so prompts keep the
order they were typed in: the n-th prompt fills the n-th `<region>`/`<mark>` of the prompt text.
Parsing waits until the command runs, so a bad value is a one-line error with exit code 2 like other
bad input (not argparse's usage message), and until the image is known (a mask must have its size).
Prompts mark the last image given (OMG-LLaVA takes one image per conversation).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from unillava.errors import ConfigError

KINDS = ("box", "point", "mask")
NO_PROMPTS = "this model takes no visual prompts (--box/--point/--mask need an OMG-LLaVA model)"


class _Tagged(argparse.Action):
    """Append (kind, raw text) to the list shared by the three flags, keeping command-line order."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), (self.const, values)])


def add_prompt_flags(parser: argparse.ArgumentParser, *, scope: str = "") -> None:
    """Add `--box`, `--point` and `--mask` (all repeatable, into `args.visual_prompts`)."""
    suffix = f"; {scope}" if scope else ""
    common: dict[str, Any] = {"action": _Tagged, "dest": "visual_prompts", "default": []}
    parser.add_argument(
        "--box",
        const="box",
        metavar="X0,Y0,X1,Y1",
        **common,
        help=f"a box visual prompt in image pixels (repeatable); fills a <region>{suffix}",
    )
    parser.add_argument(
        "--point",
        const="point",
        metavar="X,Y",
        **common,
        help=f"a point visual prompt in image pixels (repeatable); fills a <mark>{suffix}",
    )
    parser.add_argument(
        "--mask",
        const="mask",
        metavar="FILE.png",
        **common,
        help=f"a mask visual prompt: a PNG of the image's size whose nonzero pixels are the "
        f"region (repeatable); fills a <region>{suffix}",
    )


def _numbers(text: str, count: int, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{flag} takes {count} comma-separated numbers, got {text!r}")
    return values


def read_mask(path: str, size: tuple[int, int], flag: str = "--mask") -> np.ndarray:
    """A mask image -> bool (H, W): pixels nonzero in any colour channel (alpha ignored) are the region.
    `size` is the marked image's (width, height), which the mask must match."""
    try:
        with Image.open(path) as picture:
            picture.load()
            plain = picture if picture.mode in ("1", "L", "I", "I;16", "F") else picture.convert("RGB")
            pixels = np.asarray(plain)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ConfigError(f"{flag} {path}: cannot read it as an image ({err})") from None
    height, width = pixels.shape[:2]
    if (width, height) != tuple(size):
        raise ConfigError(
            f"{flag} {path}: the mask is {width}x{height} but the image is {size[0]}x{size[1]} "
            "(width x height); they must match"
        )
    mask = pixels.any(axis=-1) if pixels.ndim == 3 else pixels != 0
    if not mask.any():
        raise ConfigError(f"{flag} {path}: the mask has no nonzero pixels")
    return mask


def parse_prompt(
    kind: str, text: str, image: Image.Image, image_index: int, *, prefix: str = "--"
) -> dict[str, Any]:
    """One flag's text -> a prompt dict in image pixels (the format `OMGLlavaModel` takes)."""
    flag = prefix + kind
    if kind == "box":
        return {"type": "box", "box": _numbers(text, 4, flag), "image_index": image_index}
    if kind == "point":
        return {"type": "point", "point": _numbers(text, 2, flag), "image_index": image_index}
    if kind == "mask":
        return {"type": "mask", "mask": read_mask(text, image.size, flag), "image_index": image_index}
    raise ConfigError(f"visual prompt type must be one of {', '.join(KINDS)}, got {kind!r}")


def prompts_from_flags(
    items: Sequence[tuple[str, str]], images: Sequence[Image.Image]
) -> list[dict[str, Any]]:
    """The command line's prompts, in typed order, on the last of `images`."""
    if not items:
        return []
    if not images:
        raise ConfigError("--box/--point/--mask mark an image: give one with --image")
    return [parse_prompt(kind, text, images[-1], len(images) - 1) for kind, text in items]
