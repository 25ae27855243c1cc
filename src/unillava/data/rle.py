"""COCO RLE strings read in Python: pycocotools decodes malformed strings without a word (and can read
past its buffer), so data validation and the scorers check them here first."""

from __future__ import annotations


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
