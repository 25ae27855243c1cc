"""Procedural "shapes" scenes: rendering and exact ground truth.

A scene is a background plus 1-10 antialiased shapes with a colour, a size class, an optional
character and a z-order. Ground truth is exact because we draw it: every object carries the mask of
its *visible* pixels (after occlusion), so masks of one scene never overlap and every object in the
ground truth can actually be seen. Task files (VQA, referring segmentation, ...) are built from the
scene dicts by `unillava.data.shapes.tasks`; `writer` renders a dataset to disk.

Characters are drawn inside their object (never beside it), in a spot that later objects may not
cover, so every character in the ground truth is legible in the image.

Everything random is drawn from a generator seeded by (split seed, scene index), so a scene does not
depend on which worker rendered it or on how many scenes came before it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from unillava.data.masks import encode_local_mask
from unillava.errors import DataError

GENERATOR_VERSION = "1.0.0"

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "hexagon",
    "ellipse",
    "cross",
    "heart",
    "pentagon",
    "diamond",
)
# Non-uniform on purpose: POPE "popular" negatives need some shapes/colours to be more frequent.
SHAPE_WEIGHTS: tuple[float, ...] = (1.6, 1.5, 1.4, 1.2, 1.0, 0.9, 0.8, 0.8, 0.7, 0.7)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 28),
    "orange": (245, 130, 20),
    "yellow": (250, 215, 30),
    "green": (40, 160, 60),
    "cyan": (30, 200, 220),
    "blue": (35, 70, 210),
    "purple": (130, 50, 170),
    "pink": (245, 120, 190),
    "brown": (125, 75, 35),
    "white": (248, 248, 248),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
COLOR_WEIGHTS: tuple[float, ...] = (1.5, 1.0, 1.2, 1.5, 0.9, 1.5, 1.0, 0.8, 0.7, 0.9, 0.8, 0.9)

# Polygon vertices; round shapes have none. Hearts count their tip and cusp.
CORNERS: dict[str, int] = {
    "circle": 0,
    "ellipse": 0,
    "heart": 2,
    "triangle": 3,
    "square": 4,
    "diamond": 4,
    "pentagon": 5,
    "hexagon": 6,
    "star": 10,
    "cross": 12,
}

SIZE_CLASSES: tuple[str, ...] = ("small", "medium", "large")
# Extent (unrotated bounding-box side) as a fraction of the image's shorter side, and a pixel floor.
# The gaps between classes keep "small/medium/large" unambiguous.
SIZE_RANGES: dict[str, tuple[float, float, int]] = {
    "small": (0.06, 0.10, 10),
    "medium": (0.14, 0.20, 20),
    "large": (0.26, 0.36, 32),
}

# No I/O/0/1: they are too easy to confuse at a few pixels.
TEXT_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
BACKGROUNDS: tuple[str, ...] = ("flat", "gradient", "noise")
SPLITS: tuple[str, ...] = ("train", "val", "test")
FINE_TEXT_MAX_FONT = 10
MIN_VISIBLE_PIXELS = 12


@dataclass(frozen=True)
class Difficulty:
    """Knobs that one difficulty level turns."""

    n_objects: tuple[int, int]
    min_visible: float  # fraction of an object's own area that must stay visible; 1.0 = no occlusion
    background_weights: tuple[float, float, float]  # flat, gradient, noise
    text_prob: float
    text_scale: tuple[float, float]  # font size as a fraction of the largest that fits in the shape
    min_font: int
    grain: int  # amplitude of per-pixel noise on noise backgrounds


DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty((1, 4), 1.0, (0.6, 0.4, 0.0), 0.3, (0.75, 1.0), 10, 0),
    "medium": Difficulty((1, 7), 0.6, (0.4, 0.35, 0.25), 0.4, (0.45, 1.0), 7, 0),
    "hard": Difficulty((2, 10), 0.35, (0.2, 0.3, 0.5), 0.5, (0.25, 1.0), 5, 6),
}


@dataclass(frozen=True)
class SceneSpec:
    """What a scene may look like: image size limits, difficulty, and the "fine" (large image,
    small objects, tiny text) profile used by the fine_text / fine_count tasks."""

    min_size: int = 128
    max_size: int = 1536
    aspect_range: tuple[float, float] = (0.5, 2.0)
    difficulty: str = "medium"
    fine: bool = False
    max_texts: int | None = None  # at most this many objects carry a character (None: no cap)

    def validate(self) -> SceneSpec:
        """Raise DataError naming the bad field; return self so calls chain."""
        if self.max_texts is not None and (not isinstance(self.max_texts, int) or self.max_texts < 0):
            raise DataError(f"max-texts must be a non-negative integer, got {self.max_texts!r}")
        if self.difficulty not in DIFFICULTIES:
            raise DataError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {self.difficulty!r}")
        if not 64 <= self.min_size <= 8192 or not 64 <= self.max_size <= 8192:
            # Below 64 px a large object (32 px floor, rotated) may not fit and a scene could be empty.
            raise DataError(
                f"image sizes must be within 64..8192 px, got min {self.min_size}, max {self.max_size}"
            )
        if self.min_size > self.max_size:
            raise DataError(f"min-size ({self.min_size}) is larger than max-size ({self.max_size})")
        lo, hi = self.aspect_range
        if not (lo > 0 and hi > 0 and lo <= hi):
            raise DataError(f"aspect range must be two positive numbers lo,hi with lo <= hi, got {lo},{hi}")
        if _aspect_bounds(self) is None:
            raise DataError(
                f"no aspect ratio in {lo},{hi} fits both sides within {self.min_size}..{self.max_size} px"
            )
        return self


def _aspect_bounds(spec: SceneSpec) -> tuple[float, float] | None:
    """Aspect ratios (w/h) for which both sides can lie within [min_size, max_size]."""
    lo = max(spec.aspect_range[0], spec.min_size / spec.max_size)
    hi = min(spec.aspect_range[1], spec.max_size / spec.min_size)
    return (lo, hi) if lo <= hi + 1e-12 else None


def _image_size(rng: np.random.Generator, spec: SceneSpec) -> tuple[int, int]:
    """Both sides in [min_size, max_size], w/h in the aspect range (log-uniform)."""
    bounds = _aspect_bounds(spec)
    assert bounds is not None
    lo, hi = bounds
    aspect = math.exp(rng.uniform(math.log(lo), math.log(hi))) if hi > lo else lo
    factor = max(aspect, 1.0 / aspect)
    long_min = min(spec.max_size, math.ceil(spec.min_size * factor - 1e-9))
    if spec.fine:
        long_min = max(long_min, min(spec.max_size, int(0.75 * spec.max_size)))
    long_side = int(rng.integers(long_min, spec.max_size + 1))
    short_side = min(spec.max_size, max(spec.min_size, round(long_side / factor)))
    return (long_side, short_side) if aspect >= 1.0 else (short_side, long_side)


# ----------------------------------------------------------------------------------------------
# Shape geometry


def _regular(n: int, start_deg: float, radii: Sequence[float] = (1.0,)) -> np.ndarray:
    angles = np.deg2rad(start_deg + np.arange(n) * 360.0 / n)
    r = np.resize(np.asarray(radii, dtype=np.float64), n)
    return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)


def _normalise(points: np.ndarray) -> np.ndarray:
    """Centre the bounding box on the origin and scale its longer side to 2."""
    lo, hi = points.min(0), points.max(0)
    return (points - (lo + hi) / 2.0) * (2.0 / float((hi - lo).max()))


@cache
def _unit_polygon(shape: str) -> np.ndarray:
    """Vertices of the unrotated shape in [-1, 1]^2 (y down); ellipses are squashed later."""
    if shape in ("circle", "ellipse"):
        pts = _regular(96, 0.0)
    elif shape == "square":
        pts = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    elif shape == "diamond":
        pts = np.array([[0.0, -1.0], [0.7, 0.0], [0.0, 1.0], [-0.7, 0.0]])
    elif shape == "triangle":
        pts = _regular(3, -90.0)
    elif shape == "pentagon":
        pts = _regular(5, -90.0)
    elif shape == "hexagon":
        pts = _regular(6, 0.0)
    elif shape == "star":
        pts = _regular(10, -90.0, (1.0, 0.42))
    elif shape == "cross":
        t = 0.34
        pts = np.array(
            [
                [-t, -1],
                [t, -1],
                [t, -t],
                [1, -t],
                [1, t],
                [t, t],
                [t, 1],
                [-t, 1],
                [-t, t],
                [-1, t],
                [-1, -t],
                [-t, -t],
            ],
            dtype=np.float64,
        )
    elif shape == "heart":
        tt = np.linspace(0.0, 2.0 * np.pi, 72, endpoint=False)
        pts = np.stack(
            [
                16 * np.sin(tt) ** 3,
                -(13 * np.cos(tt) - 5 * np.cos(2 * tt) - 2 * np.cos(3 * tt) - np.cos(4 * tt)),
            ],
            axis=1,
        )
    else:
        raise DataError(f"unknown shape {shape!r}")
    return _normalise(pts)


def _inside(points: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test for many points at once."""
    x, y = points[:, :1], points[:, 1:]
    x1, y1 = poly[:, 0][None], poly[:, 1][None]
    x2, y2 = np.roll(poly[:, 0], -1)[None], np.roll(poly[:, 1], -1)[None]
    crosses = (y1 > y) != (y2 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        xint = (x2 - x1) * (y - y1) / (y2 - y1) + x1
    return ((crosses & (x < xint)).sum(1) % 2) == 1


def _edge_distance(points: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Distance from each point to the polygon outline."""
    a = poly[None]
    b = np.roll(poly, -1, axis=0)[None]
    p = points[:, None]
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0.0, 1.0)
    closest = a + t[..., None] * ab
    return np.sqrt(((p - closest) ** 2).sum(-1)).min(1)


@cache
def _unit_pole(shape: str) -> tuple[np.ndarray, float]:
    """A point deep inside the unit shape (where its text goes) and its distance to the outline.

    Rotation and scaling preserve both, so this is computed once per shape.
    """
    poly = _unit_polygon(shape)
    if shape in ("circle", "ellipse"):
        return np.zeros(2), float(_edge_distance(np.zeros((1, 2)), poly)[0])
    lo, hi = poly.min(0), poly.max(0)
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 61), np.linspace(lo[1], hi[1], 61))
    cands = np.concatenate([poly.mean(0, keepdims=True), np.stack([gx.ravel(), gy.ravel()], 1)])
    dist = np.where(_inside(cands, poly), _edge_distance(cands, poly), -1.0)
    # Prefer the vertex mean on near-ties so symmetric shapes keep their text centred.
    best = int(np.argmax(dist - 1e-3 * np.linalg.norm(cands - cands[0], axis=1)))
    return cands[best], float(dist[best])


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's embedded scalable font (Aileron); no font file to ship or install."""
    return ImageFont.load_default(size=size)


@cache
def _glyph_box(ch: str, size: int) -> tuple[float, float, float, float]:
    """Ink box of a centred ("mm" anchor) character, relative to the anchor."""
    return tuple(float(v) for v in _font(size).getbbox(ch, anchor="mm"))  # type: ignore[return-value]


def _fits(ch: str, size: int, half: float) -> bool:
    left, top, right, bottom = _glyph_box(ch, size)
    return right - left <= 2 * half and bottom - top <= 2 * half


def _largest_font(ch: str, half: float) -> int:
    size = int(2 * half / 0.7) + 1
    while size >= 4 and not _fits(ch, size, half):
        size -= 1
    return size


@dataclass
class _Sprite:
    """One object rasterised at bbox-local size, before it is placed."""

    shape: str
    color: str
    size: str
    extent: int
    coverage: Image.Image  # antialiased alpha, mode "L"
    own: np.ndarray  # coverage >= 50%
    anchor: tuple[float, float]  # local pixel coordinates of the text/centre point
    inner_half: float
    text: str | None = None
    text_size: int | None = None
    text_box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # relative to the anchor


def _make_sprite(rng: np.random.Generator, shape: str, color: str, size: str, extent: int) -> _Sprite:
    """Rasterise one shape with supersampling; masks come from the same coverage as the pixels."""
    poly = _unit_polygon(shape).copy()
    pole, inradius = _unit_pole(shape)
    if shape == "ellipse":
        ratio = rng.uniform(0.5, 0.65)
        poly[:, 1] *= ratio
        inradius *= ratio
        theta = rng.uniform(0.0, 180.0)
    elif shape in ("star", "hexagon"):
        theta = rng.uniform(0.0, 360.0)
    elif shape == "circle":
        theta = 0.0
    else:
        theta = rng.uniform(-10.0, 10.0)
    c, s = math.cos(math.radians(theta)), math.sin(math.radians(theta))
    rot = np.array([[c, s], [-s, c]]) * (extent / 2.0)
    poly = poly @ rot
    lo, hi = poly.min(0), poly.max(0)
    w, h = int(math.ceil(hi[0] - lo[0])) + 2, int(math.ceil(hi[1] - lo[1])) + 2
    local = poly - lo + 1.0
    ss = 4 if max(w, h) < 48 else 3 if max(w, h) < 160 else 2
    canvas = Image.new("L", (w * ss, h * ss), 0)
    ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in local * ss - 0.5], fill=255)
    coverage = canvas.reduce(ss)
    own = np.asarray(coverage) >= 128
    anchor = pole @ rot - lo + 1.0
    return _Sprite(
        shape=shape,
        color=color,
        size=size,
        extent=extent,
        coverage=coverage,
        own=own,
        anchor=(float(anchor[0]), float(anchor[1])),
        inner_half=0.7 * inradius * extent / 2.0,
    )


def _add_text(rng: np.random.Generator, sprite: _Sprite, diff: Difficulty, fine: bool) -> None:
    ch = TEXT_CHARS[int(rng.integers(len(TEXT_CHARS)))]
    fit = _largest_font(ch, sprite.inner_half)
    if fine:
        size = int(rng.integers(5, FINE_TEXT_MAX_FONT))
    else:
        size = int(round(fit * rng.uniform(*diff.text_scale)))
        size = max(size, diff.min_font)
    if size > fit or size < 5:
        return
    sprite.text, sprite.text_size = ch, size
    sprite.text_box = _glyph_box(ch, size)


# ----------------------------------------------------------------------------------------------
# Backgrounds


def _color_dist(a: Sequence[float], b: Sequence[float]) -> float:
    return math.dist(a, b)


def _hsv_to_rgb(h: float, s: float, v: float) -> list[int]:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r, g, b = ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))[i]
    return [round(255 * r), round(255 * g), round(255 * b)]


def _pick_background_color(
    rng: np.random.Generator, present: list[tuple[int, int, int]], near: list[int] | None = None
) -> list[int]:
    """A muted colour far from the scene's objects and from every named colour, so the backdrop is
    never mistaken for an object and "Is there a purple ..." never depends on it. With `near`, the
    hue stays within 60 degrees of that colour (gradient end points)."""
    named = list(COLORS.values())
    best, best_score = None, -1.0
    if near is not None:
        r, g, b = (v / 255.0 for v in near)
        mx, mn = max(r, g, b), min(r, g, b)
        if mx == mn:
            base_hue = 0.0
        elif mx == r:
            base_hue = ((g - b) / (mx - mn) / 6.0) % 1.0
        elif mx == g:
            base_hue = ((b - r) / (mx - mn) / 6.0 + 1 / 3) % 1.0
        else:
            base_hue = ((r - g) / (mx - mn) / 6.0 + 2 / 3) % 1.0
    for _ in range(200):
        hue = rng.uniform(0.0, 1.0) if near is None else (base_hue + rng.uniform(-1 / 6, 1 / 6)) % 1.0
        cand = _hsv_to_rgb(hue, rng.uniform(0.08, 0.45), rng.uniform(0.4, 0.95))
        d_present = min((_color_dist(cand, p) for p in present), default=999.0)
        d_named = min(_color_dist(cand, p) for p in named)
        if d_present >= 100 and d_named >= 60:
            return cand
        score = min(d_present / 100, d_named / 60)
        if score > best_score:
            best, best_score = cand, score
    assert best is not None
    return best


def _render_background(
    rng: np.random.Generator, w: int, h: int, kind: str, present: list
) -> tuple[Image.Image, dict]:
    base = _pick_background_color(rng, present)
    if kind == "flat":
        return Image.new("RGB", (w, h), tuple(base)), {"type": "flat", "color": base}
    if kind == "gradient":
        other = _pick_background_color(rng, present, near=base)
        direction = ("horizontal", "vertical", "diagonal")[int(rng.integers(3))]
        steps = {"horizontal": w, "vertical": h, "diagonal": w + h - 1}[direction]
        t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
        a, b = np.asarray(base, np.float32), np.asarray(other, np.float32)
        ramp = np.ascontiguousarray((a + (b - a) * t + 0.5).astype(np.uint8))
        if direction == "horizontal":
            arr = np.broadcast_to(ramp[None], (h, w, 3))
        elif direction == "vertical":
            arr = np.broadcast_to(ramp[:, None], (h, w, 3))
        else:  # row y is ramp[y : y + w]: a strided view, copied once by fromarray
            arr = np.lib.stride_tricks.as_strided(ramp, shape=(h, w, 3), strides=(3, 3, 1))
        image = Image.fromarray(np.ascontiguousarray(arr), "RGB")
        return image, {"type": "gradient", "colors": [base, other], "direction": direction}
    amplitude, cell = 28, int(rng.integers(24, 65))
    gh, gw = h // cell + 2, w // cell + 2
    # Mostly luminance: strong chroma noise would tint patches towards named colours.
    grid = rng.integers(-amplitude, amplitude + 1, (gh, gw, 1)) + rng.integers(-8, 9, (gh, gw, 3))
    low = Image.fromarray(np.clip(np.asarray(base) + grid, 0, 255).astype(np.uint8), "RGB")
    img = low.resize((w, h), Image.Resampling.BILINEAR)
    return img, {"type": "noise", "color": base, "amplitude": amplitude, "cell": cell}


def _add_grain(rng: np.random.Generator, img: Image.Image, grain: int) -> Image.Image:
    """Per-pixel luminance grain; one value per pixel keeps PNG encoding affordable."""
    arr = np.asarray(img).astype(np.int16)
    arr += rng.integers(-grain, grain + 1, arr.shape[:2], dtype=np.int16)[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------------------------
# Scene rendering


def _weighted(rng: np.random.Generator, items: Sequence[str], weights: Sequence[float]) -> str:
    p = np.asarray(weights, dtype=np.float64)
    return items[int(rng.choice(len(items), p=p / p.sum()))]


def _extent(rng: np.random.Generator, size: str, short_side: int) -> int:
    lo, hi, floor = SIZE_RANGES[size]
    a, b = max(floor, lo * short_side), max(floor + 2, hi * short_side)
    return int(round(rng.uniform(a, b)))


def render_scene(
    rng_seed: int | Sequence[int], spec: SceneSpec | Mapping[str, Any] | None = None
) -> tuple[Image.Image, dict]:
    """Render one scene; returns the RGB image and its ground-truth dict (image_id/file_name None).

    The same rng_seed and spec always give the same pixels and the same dict.
    """
    if spec is None:
        spec = SceneSpec()
    elif not isinstance(spec, SceneSpec):
        spec = SceneSpec(**{**dict(spec), "aspect_range": tuple(spec.get("aspect_range", (0.5, 2.0)))})
    spec.validate()
    rng = np.random.default_rng(rng_seed)
    diff = DIFFICULTIES[spec.difficulty]
    width, height = _image_size(rng, spec)
    short = min(width, height)

    if spec.fine:
        n_target = int(rng.integers(6, 11))
        size_w, text_prob = (0.7, 0.2, 0.1), 0.6
    else:
        n_target = int(rng.integers(diff.n_objects[0], diff.n_objects[1] + 1))
        size_w, text_prob = (0.35, 0.4, 0.25), diff.text_prob

    top = np.full((height, width), -1, dtype=np.int16)  # id of the object visible at each pixel
    protected = np.zeros((height, width), dtype=bool)  # text / centre areas nobody may cover
    placed: list[dict[str, Any]] = []
    texts = 0
    for _ in range(n_target):
        shape = _weighted(rng, SHAPES, SHAPE_WEIGHTS)
        color = _weighted(rng, COLOR_NAMES, COLOR_WEIGHTS)
        size = _weighted(rng, SIZE_CLASSES, size_w)
        sprite = _make_sprite(rng, shape, color, size, _extent(rng, size, short))
        if rng.random() < text_prob and (spec.max_texts is None or texts < spec.max_texts):
            _add_text(rng, sprite, diff, spec.fine)
        h, w = sprite.own.shape
        if w > width or h > height:
            continue
        full = int(sprite.own.sum())
        oid = len(placed)
        for _attempt in range(25):
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            if protected[y0 : y0 + h, x0 : x0 + w][sprite.own].any():
                continue
            under = top[y0 : y0 + h, x0 : x0 + w][sprite.own]
            lost = np.bincount(under[under >= 0], minlength=oid) if oid else np.zeros(0, np.int64)
            ok = True
            for j in np.flatnonzero(lost):
                left = placed[j]["visible"] - int(lost[j])
                need = max(MIN_VISIBLE_PIXELS, math.ceil(diff.min_visible * placed[j]["full_area"] - 1e-9))
                if diff.min_visible >= 1.0 or left < need:
                    ok = False
                    break
            if not ok:
                continue
            for j in np.flatnonzero(lost):
                placed[j]["visible"] -= int(lost[j])
                placed[j]["occluded_by"].append(oid)
            top[y0 : y0 + h, x0 : x0 + w][sprite.own] = oid
            ax, ay = x0 + sprite.anchor[0], y0 + sprite.anchor[1]
            if sprite.text:
                left_, top_, right_, bottom_ = sprite.text_box
                box = (ax + left_ - 1, ay + top_ - 1, ax + right_ + 1, ay + bottom_ + 1)
            else:
                r = max(1.5, 0.5 * sprite.inner_half)
                box = (ax - r, ay - r, ax + r, ay + r)
            bx0, by0 = max(0, int(math.floor(box[0]))), max(0, int(math.floor(box[1])))
            bx1, by1 = min(width, int(math.ceil(box[2])) + 1), min(height, int(math.ceil(box[3])) + 1)
            protected[by0:by1, bx0:bx1] = True
            placed.append(
                {
                    "sprite": sprite,
                    "x0": x0,
                    "y0": y0,
                    "full_area": full,
                    "visible": full,
                    "occluded_by": [],
                    "anchor": (ax, ay),
                }
            )
            texts += sprite.text is not None
            break

    present = sorted({COLORS[p["sprite"].color] for p in placed})
    kind = _weighted(rng, BACKGROUNDS, diff.background_weights)
    image, background = _render_background(rng, width, height, kind, present)
    if kind == "noise" and diff.grain:
        image = _add_grain(rng, image, diff.grain)
        background["grain"] = diff.grain
    draw = ImageDraw.Draw(image)
    objects = []
    for oid, p in enumerate(placed):
        sp: _Sprite = p["sprite"]
        h, w = sp.own.shape
        x0, y0 = p["x0"], p["y0"]
        image.paste(COLORS[sp.color], (x0, y0, x0 + w, y0 + h), mask=sp.coverage)
        ax, ay = p["anchor"]
        if sp.text:
            r, g, b = COLORS[sp.color]
            ink = (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)
            draw.text((ax, ay), sp.text, fill=ink, font=_font(sp.text_size), anchor="mm")
        visible = top[y0 : y0 + h, x0 : x0 + w] == oid
        ys, xs = np.nonzero(visible)
        area = int(ys.size)
        bx, by = int(xs.min()), int(ys.min())
        bbox = [x0 + bx, y0 + by, int(xs.max()) - bx + 1, int(ys.max()) - by + 1]
        cx, cy = int(ax), int(ay)
        if not (0 <= cy - y0 < h and 0 <= cx - x0 < w and visible[cy - y0, cx - x0]):
            k = int(np.argmin((xs + x0 - ax) ** 2 + (ys + y0 - ay) ** 2))
            cx, cy = int(xs[k]) + x0, int(ys[k]) + y0
        objects.append(
            {
                "id": oid,
                "shape": sp.shape,
                "color": sp.color,
                "size": sp.size,
                "text": sp.text,
                "bbox": bbox,
                "area": area,
                "segmentation": encode_local_mask(visible, x0, y0, height, width),
                "z": oid,
                "center": [cx, cy],
                "extent": sp.extent,
                "full_area": p["full_area"],
                "text_size": sp.text_size,
                "occluded_by": p["occluded_by"],
            }
        )
    scene = {
        "image_id": None,
        "file_name": None,
        "width": width,
        "height": height,
        "background": background,
        "difficulty": spec.difficulty,
        "profile": "fine" if spec.fine else "regular",
        "objects": objects,
    }
    return image, scene


# ----------------------------------------------------------------------------------------------
# Dataset writer


def split_seed(seed: int, split: str) -> int:
    """Each split draws from its own seed so splits never share scenes."""
    return seed * 1000 + SPLITS.index(split)


def is_fine_scene(index: int, every: int = 5) -> bool:
    """Every `every`-th scene (by default 1-based indices 2, 7, 12, ...) uses the large-image / tiny-text
    profile; 1 makes every scene fine, 0 none."""
    return every > 0 and index % every == 2 % every


def image_path(split: str, index: int) -> str:
    """Path of a scene's PNG relative to the dataset root."""
    return f"images/{split}/{split}_{index:06d}.png"
