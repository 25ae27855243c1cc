"""Visual prompts (point, box, mask) as region-restricted queries of the frozen decoder.

OMG-LLaVA encodes a user's marked region with the segmenter itself. The query starts at a sine
position of the region's anchor, meaning the box centre, the point, or a mask's deepest interior
point. Its cross-attention is restricted to the region in every decoder layer, so the query ends up
describing what is inside. A point becomes a small box, +-3 px at 1024 px input, scaled with the input.
The final query (content ++ position) stands in for a `<region>` or `<mark>` token. A segmenter
converted from OMG-Seg starts and restricts the query with OMG-Seg's own weights and rules instead
(`prompt_queries: omg_seg`, perception/omg_seg.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unillava.data.masks import decode_mask
from unillava.errors import DataError
from unillava.omg.perception.geometry import PadGeometry
from unillava.omg.perception.model import PerceptionMemory, PerceptionModel
from unillava.omg.perception.omg_seg import PROMPT_ATTENTION, sine_encoding

POINT_HALF_SIDE = 3 / 1024  # of the input side


@dataclass
class PromptRegion:
    """One prompt in the segmenter's input frame: a (S, S) bool region, its anchor as (x, y) in [0, 1],
    and which of the sample's images it marks."""

    region: torch.Tensor
    anchor: tuple[float, float]
    image_index: int = 0
    kind: str = "box"


def _mask_array(mask: Any) -> np.ndarray:
    if isinstance(mask, Mapping):
        return decode_mask(mask)
    return np.asarray(mask, dtype=bool)


def deepest_point(region: torch.Tensor) -> tuple[int, int]:
    """(x, y) of a bool mask's pixel farthest from its border (iterated 3x3 erosion), as OMG places a
    mask prompt's query."""
    current = region.float()[None, None]
    last = current
    while current.sum() > 0:
        last = current
        current = -F.max_pool2d(-current, 3, stride=1, padding=1)
    ys, xs = torch.nonzero(last[0, 0] > 0, as_tuple=True)
    middle = len(ys) // 2
    return int(xs[middle]), int(ys[middle])


def _numbers(prompt: Mapping[str, Any], key: str, count: int) -> tuple[float, ...]:
    value = prompt.get(key)
    try:
        numbers = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        raise DataError(f"a {prompt.get('type')} prompt needs {key!r} as {count} numbers, got {value!r}")
    return numbers


def clip_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """The stated rule for boxes: corners in either order, clipped to the image; a box with nothing
    inside the image is an error rather than a query that would silently see the whole image."""
    x0, x1 = sorted((float(box[0]), float(box[2])))
    y0, y1 = sorted((float(box[1]), float(box[3])))
    cx0, cy0, cx1, cy1 = max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)
    if cx0 >= cx1 or cy0 >= cy1:
        if x0 == x1 or y0 == y1:
            raise DataError(f"box {list(box)} has no area")
        raise DataError(f"box {list(box)} lies outside the {width}x{height} image")
    return cx0, cy0, cx1, cy1


def prompt_region(prompt: Mapping[str, Any], width: int, height: int, size: int) -> PromptRegion:
    """A prompt dict ({"type": "box"|"point"|"mask", "box": [x0, y0, x1, y1] | "point": [x, y] | "mask":
    bool H x W or COCO RLE, "image_index"}) in image pixels -> its region in the input frame."""
    geometry = PadGeometry(width, height, size)
    kind = prompt.get("type")
    region = torch.zeros(size, size, dtype=torch.bool)
    if kind in ("box", "point"):
        if kind == "box":
            x0, y0, x1, y1 = clip_box(_numbers(prompt, "box", 4), width, height)
            x0, y0, x1, y1 = geometry.box_to_input((x0, y0, x1, y1))
        else:
            x, y = _numbers(prompt, "point", 2)
            if not (0 <= x <= width and 0 <= y <= height):
                raise DataError(f"point ({x:g}, {y:g}) lies outside the {width}x{height} image")
            cx, cy, _, _ = geometry.box_to_input((x, y, x, y))
            half = max(1.0, POINT_HALF_SIDE * size)
            x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
        left, top = max(0, math.floor(x0)), max(0, math.floor(y0))
        right, bottom = min(size, max(left + 1, math.ceil(x1))), min(size, max(top + 1, math.ceil(y1)))
        region[top:bottom, left:right] = True
        anchor = ((x0 + x1) / 2 / size, (y0 + y1) / 2 / size)
    elif kind == "mask":
        mask = _mask_array(prompt["mask"])
        if mask.shape != (height, width):
            raise DataError(
                f"a mask prompt must be {height}x{width} (the image), got {mask.shape[0]}x{mask.shape[1]}"
            )
        region = geometry.mask_to_input(mask) > 0.5
        if not region.any():
            region = geometry.mask_to_input(mask) > 0
        if not region.any():
            raise DataError("a mask prompt is empty")
        x, y = deepest_point(region)
        anchor = ((x + 0.5) / size, (y + 0.5) / size)
    else:
        raise DataError(f"visual prompt type must be box, point or mask, got {kind!r}")
    return PromptRegion(
        region, (float(anchor[0]), float(anchor[1])), int(prompt.get("image_index", 0) or 0), str(kind)
    )


def prompt_regions(
    prompts: Sequence[Mapping[str, Any]], image_sizes: Sequence[tuple[int, int]], size: int
) -> list[PromptRegion]:
    """Prompt dicts in image pixels (the server's and the data's format) -> regions in the input frame;
    `image_sizes` are the sample's images as (width, height), which `image_index` picks from."""
    regions = []
    for i, prompt in enumerate(prompts):
        index = int(prompt.get("image_index", 0) or 0)
        if not 0 <= index < len(image_sizes):
            raise DataError(
                f"visual_prompts[{i}] marks image {index} but there are {len(image_sizes)} image(s)"
            )
        width, height = image_sizes[index]
        try:
            regions.append(prompt_region(prompt, width, height, size))
        except DataError as err:
            raise DataError(f"visual_prompts[{i}]: {err}") from None
    return regions


def mask_targets(rles: Sequence[Mapping[str, Any]], width: int, height: int, size: int) -> torch.Tensor:
    """[SEG] targets (n, size, size) in 0..1 for COCO RLEs over a width x height image: padded and resized
    into the segmenter's input frame exactly as the image is (`PadGeometry.mask_to_input`)."""
    geometry = PadGeometry(width, height, size)
    targets = []
    for i, rle in enumerate(rles):
        mask = decode_mask(rle)
        if mask.shape != (height, width):
            raise DataError(
                f"masks[{i}] is {mask.shape[0]}x{mask.shape[1]} but the image is {height}x{width}"
            )
        targets.append(geometry.mask_to_input(mask))
    return torch.stack(targets) if targets else torch.zeros(0, size, size)


def sine_position(anchors: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(K, 2) anchors (x, y) in [0, 1] -> (K, dim) sine/cosine features, y half then x half (DETR order)."""
    return sine_encoding(anchors, (1, 0), dim // 2, temperature)


def encode_prompts(
    model: PerceptionModel, memory: PerceptionMemory, prompts: list[PromptRegion]
) -> torch.Tensor:
    """The final query embedding (K, 2D) of each prompt on one image's memory (batch 1): independent
    queries (one per batch row). By default each starts from the mean learned query content at a sine
    position of its anchor and is restricted to its region; a segmenter with OMG-Seg's prompt-query
    weights starts and restricts them as OMG-Seg does (`perception/omg_seg.py`)."""
    if not prompts:
        return memory.mask_features.new_zeros(0, 2 * model.hidden_dim)
    k = len(prompts)
    dtype = memory.mask_features.dtype
    device = memory.mask_features.device
    anchors = torch.tensor([p.anchor for p in prompts], device=device)
    regions = torch.stack([p.region for p in prompts]).to(device)[:, None]
    if model.prompt_query is None:
        position = sine_position(anchors, model.hidden_dim).to(dtype)
        content = model.model.transformer_module.queries_features.weight.mean(0).to(dtype).expand(k, -1)
        out = model.decode(memory.select(0, repeat=k), content[:, None], position[:, None], region=regions)
        return torch.cat([out.queries[:, 0], position], dim=-1)
    unknown = sorted({p.kind for p in prompts} - set(PROMPT_ATTENTION))
    if unknown:
        raise ValueError(
            f"prompt kind(s) {unknown}: OMG-Seg's prompt queries know {sorted(PROMPT_ATTENTION)}"
        )
    content, position = model.prompt_query(anchors, tuple(prompts[0].region.shape[-2:]))
    content, position = content.to(dtype), position.to(dtype)
    queries = content.new_zeros(k, model.hidden_dim)
    for kind, rule in PROMPT_ATTENTION.items():
        rows = [i for i, p in enumerate(prompts) if p.kind == kind]
        if not rows:
            continue
        index = torch.tensor(rows, device=device)
        out = model.decode(
            memory.select(0, repeat=len(rows)),
            content[index, None],
            position[index, None],
            region=regions[index],
            region_rule=rule,
        )
        queries[index] = out.queries[:, 0]
    return torch.cat([queries, position], dim=-1)
