"""The one mask codec: COCO RLE dicts <-> boolean arrays, validated.

pycocotools decodes malformed RLE strings without a word (and can read past its buffer), so every RLE
read from data, a request or a prediction is checked here first; encoding uses pycocotools itself, so
the strings match what COCO tools write.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

MaskLike = np.ndarray | Mapping[str, Any]


def rle_string_counts(counts: str) -> list[int]:
    """The run lengths of a COCO compressed RLE string (pycocotools' `rleFrString`); ValueError if the
    string is not one."""
    out: list[int] = []
    pos = 0
    while pos < len(counts):
        value = 0
        shift = 0
        more = True
        while more:
            if pos >= len(counts):
                raise ValueError("RLE counts string ends inside a number")
            code = ord(counts[pos]) - 48
            if not 0 <= code < 64:
                raise ValueError(f"RLE counts string has an invalid character {counts[pos]!r}")
            value |= (code & 0x1F) << (5 * shift)
            more = bool(code & 0x20)
            pos += 1
            shift += 1
            if not more and code & 0x10:
                value |= -1 << (5 * shift)
        if len(out) > 2:
            value += out[-2]
        out.append(value)
    return out


def _rle_runs(mask: Mapping[str, Any]) -> tuple[int, int, list[int], bool]:
    """(height, width, run lengths, counts-was-a-string) of a validated RLE dict; ValueError if malformed."""
    size = mask.get("size")
    counts = mask.get("counts")
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in size)
    ):
        raise ValueError("RLE 'size' must be [height, width] with non-negative integers")
    h, w = int(size[0]), int(size[1])
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", errors="replace")
    if isinstance(counts, str):
        runs = rle_string_counts(counts)
    elif isinstance(counts, list) and all(
        isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in counts
    ):
        runs = [int(c) for c in counts]
    else:
        raise ValueError("RLE 'counts' must be a string or a list of integers")
    if any(r < 0 for r in runs):
        raise ValueError("RLE 'counts' has a negative run length")
    if sum(runs) != h * w:
        raise ValueError(f"RLE runs cover {sum(runs)} pixels but size {h}x{w} has {h * w}")
    return h, w, runs, isinstance(counts, str)


def to_rle(mask: MaskLike) -> dict[str, Any]:
    """A validated compressed COCO RLE ({"size": [h, w], "counts": bytes}) for pycocotools."""
    if isinstance(mask, np.ndarray):
        if mask.ndim != 2:
            raise ValueError(f"a mask array must be 2-D, got shape {mask.shape}")
        return dict(mask_utils.encode(np.asfortranarray(mask != 0, dtype=np.uint8)))
    if not isinstance(mask, Mapping):
        raise TypeError(f"a mask must be a numpy array or an RLE dict, got {type(mask).__name__}")
    h, w, runs, compressed = _rle_runs(mask)
    if compressed:
        counts = mask["counts"]
        return {"size": [h, w], "counts": counts if isinstance(counts, bytes) else counts.encode("ascii")}
    return dict(mask_utils.frPyObjects({"size": [h, w], "counts": runs}, h, w))


def decode_mask(mask: MaskLike) -> np.ndarray:
    """A 2-D bool array from a numpy mask or a COCO RLE dict (validated, decoded column-major as COCO does)."""
    if isinstance(mask, np.ndarray):
        if mask.ndim != 2:
            raise ValueError(f"a mask array must be 2-D, got shape {mask.shape}")
        return mask != 0
    if not isinstance(mask, Mapping):
        raise TypeError(f"a mask must be a numpy array or an RLE dict, got {type(mask).__name__}")
    h, w, runs, _ = _rle_runs(mask)
    flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
    return flat.reshape(w, h).T


def rle_json(mask: np.ndarray) -> dict[str, Any]:
    """A 2-D mask as compressed COCO RLE with counts as str (JSON-ready)."""
    rle = to_rle(mask)
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def encode_local_mask(local: np.ndarray, x0: int, y0: int, height: int, width: int) -> dict[str, Any]:
    """COCO RLE (counts as str) of a bbox-local mask placed at (x0, y0) in a height x width image.

    Runs are computed only over the mask's columns, so cost scales with the object, not the image.
    """
    h, w = local.shape
    block = np.zeros((height, w), dtype=np.int8)
    block[y0 : y0 + h] = local
    flat = block.ravel(order="F")
    edges = np.flatnonzero(np.diff(np.concatenate(([0], flat, [0]))))
    total = height * width
    bounds = np.concatenate(([0], edges + x0 * height, [total]))
    counts = np.diff(bounds).tolist()
    rle = mask_utils.frPyObjects({"counts": counts, "size": [height, width]}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}
