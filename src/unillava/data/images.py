"""Loading images robustly (any mode PIL can read, one-line errors) and turning them into model input.

Real datasets hold CMYK JPEGs, 16-bit PNGs, palette GIFs with transparency, phone photos that rely on the
EXIF orientation tag, truncated downloads and the odd HTML page saved as `.jpg`. `load_image` turns every
readable one into an RGB image and every unreadable one into a `DataError` naming the file, so a bad image
costs one line in a report instead of a crash deep inside a data loader worker.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from unillava.errors import ConfigError, DataError

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_PIXELS = 64_000_000

PreprocessMode = Literal["pad", "resize", "center_crop", "any"]
PREPROCESS_MODES: tuple[str, ...] = ("pad", "resize", "center_crop", "any")

_WHITE = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
# Exceptions PIL raises while decoding broken data; SyntaxError and struct errors come from plugin parsers.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, ArithmeticError)


def load_image(
    source: str | Path | bytes, *, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Read an image file (or its bytes) fully into an upright RGB image.

    The size is checked against `max_pixels` from the header before any pixel is decoded, so a
    decompression bomb never allocates memory. The whole image is decoded here (`load()`), so a truncated
    file fails now, not later in a worker; truncated images are never accepted. `name` labels errors
    (default: the path, or "<bytes>").
    """
    label = (
        name if name is not None else ("<bytes>" if isinstance(source, bytes | bytearray) else str(source))
    )
    if isinstance(source, bytes | bytearray):
        if not source:
            raise DataError(f"{label}: empty image data (0 bytes)")
        stream: Any = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"{label}: image file not found")
        if path.is_dir():
            raise DataError(f"{label}: is a directory, not an image file")
        try:
            if path.stat().st_size == 0:
                raise DataError(f"{label}: empty image file (0 bytes)")
            stream = path.open("rb")
        except OSError as err:
            raise DataError(f"{label}: cannot read image file ({_one_line(err)})") from err
    with stream:
        img = _open_checked(stream, label, max_pixels)
        with img:
            try:
                with _truncated_images_refused():
                    img.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
                raise DataError(f"{label}: image too large, possible decompression bomb ({err})") from err
            except _DECODE_ERRORS as err:
                raise DataError(f"{label}: truncated or corrupt image ({_one_line(err)})") from err
            img = _upright(img)
        try:
            return to_rgb(img)
        except ValueError as err:
            raise DataError(
                f"{label}: cannot convert image mode {img.mode} to RGB ({_one_line(err)})"
            ) from err


_TRUNCATION_FLAG_LOCK = threading.Lock()


@contextmanager
def _truncated_images_refused() -> Iterator[None]:
    """Decode with PIL's process-wide `LOAD_TRUNCATED_IMAGES` off: libraries (lmms-eval among them) switch it
    on at import, which would turn a truncated download into an image with a grey lower half."""
    with _TRUNCATION_FLAG_LOCK:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _open_checked(stream: Any, label: str, max_pixels: int) -> Image.Image:
    """Open (header only) and enforce the pixel limit before decoding."""
    try:
        img = Image.open(stream)
    except UnidentifiedImageError as err:
        raise DataError(f"{label}: not an image, or a format PIL cannot read") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"{label}: image too large, possible decompression bomb ({_one_line(err)})") from err
    except _DECODE_ERRORS as err:
        raise DataError(f"{label}: truncated or corrupt image ({_one_line(err)})") from err
    width, height = img.size
    if width <= 0 or height <= 0:
        img.close()
        raise DataError(f"{label}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        img.close()
        raise DataError(
            f"{label}: image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
            "(possible decompression bomb)"
        )
    return img


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block leaves the image as stored rather than failing it."""
    try:
        upright = ImageOps.exif_transpose(img)
    except _DECODE_ERRORS + (KeyError,):
        return img.copy()
    return upright if upright is not None else img.copy()


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: alpha is composited onto white, high bit depths are scaled down.

    16-bit modes (`I;16*`) are divided by 257 so 65535 maps to 255. For 32-bit `I` and float `F` images the
    range is guessed from the data: values already in 0..255 are kept, 0..65535 are treated as 16-bit, `F`
    in 0..1 is multiplied by 255, anything else is min-max stretched to 0..255
    (a constant out-of-range image becomes white if positive, black if negative).
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img.copy()
    if mode in _SIXTEEN_BIT_MODES or mode in {"I", "F"}:
        return Image.fromarray(_to_uint8(np.asarray(img), mode), mode="L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale a high-bit-depth single-channel array to uint8 (policy in `to_rgb`)."""
    data = values.astype(np.float64)
    if mode in _SIXTEEN_BIT_MODES:
        data = data / 257.0
    else:
        finite = data[np.isfinite(data)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if mode == "F" and low >= 0.0 and high <= 1.0:
            data = data * 255.0
        elif low >= 0.0 and high <= 255.0:
            pass
        elif low >= 0.0 and high <= 65535.0:
            data = data / 257.0
        elif high > low:
            data = (data - low) / (high - low) * 255.0
        else:
            data = np.full_like(data, 255.0 if low > 0 else 0.0)
    data = np.nan_to_num(data, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(data), 0, 255).astype(np.uint8)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _round_to_multiple(value: float, multiple: int) -> int:
    """Nearest multiple (halves round up), never below one multiple."""
    return max(multiple, int(value / multiple + 0.5) * multiple)


@dataclass
class ImagePreprocessor:
    """Turns an image into a normalised (3, H, W) float tensor for a vision tower.

    Modes:
    - `pad` (LLaVA-1.5's expand2square): pad to a square with the mean colour, centred, then resize to
      size x size, so nothing is cropped and the aspect ratio survives.
    - `resize`: stretch to size x size.
    - `center_crop` (CLIPImageProcessor, the llava-hf checkpoints' processor): resize the shortest edge to
      `size` (the long edge to int(size * long / short)), then crop the centre size x size, as transformers'
      PIL backend does (bicubic, top/left offsets rounded down).
    - `any` (ConvLLaVA-style variable resolution): keep the aspect ratio with the short side at `size`; both
      sides are rounded to the nearest multiple of `multiple_of` (the patch or stride size). If the long side
      would exceed `max_long_side`, the whole image is scaled down so the long side fits instead (the short
      side then ends up below `size`): the aspect ratio is kept and the token count stays bounded.
    """

    size: int
    mode: PreprocessMode = "pad"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    multiple_of: int = 1
    max_long_side: int | None = None
    _mean_t: torch.Tensor = field(init=False, repr=False, compare=False)
    _std_t: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in PREPROCESS_MODES:
            raise ConfigError(
                f"image mode: unknown '{self.mode}' (expected one of {', '.join(PREPROCESS_MODES)})"
            )
        if not isinstance(self.size, int) or self.size <= 0:
            raise ConfigError(f"image size: must be a positive integer, got {self.size!r}")
        if not isinstance(self.multiple_of, int) or self.multiple_of <= 0:
            raise ConfigError(f"image multiple_of: must be a positive integer, got {self.multiple_of!r}")
        if self.max_long_side is not None and (
            not isinstance(self.max_long_side, int) or self.max_long_side < self.multiple_of
        ):
            raise ConfigError(
                f"image max_long_side: must be an integer >= multiple_of ({self.multiple_of}), "
                f"got {self.max_long_side!r}"
            )
        self.mean = _three_floats(self.mean, "mean")
        self.std = _three_floats(self.std, "std")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"image std: values must be positive, got {self.std}")
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """The padding colour of `pad` mode, as LLaVA computes it: tuple(int(m * 255) for m in mean)."""
        r, g, b = (int(m * 255) for m in self.mean)
        return (r, g, b)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """The (H, W) an image of this size becomes, without touching pixels (for batching and token counts)."""
        if width <= 0 or height <= 0:
            raise DataError(f"image size must be positive, got {width}x{height}")
        if self.mode != "any":
            return (self.size, self.size)
        m = self.multiple_of
        scale = self.size / min(width, height)
        if self.max_long_side is not None and max(width, height) * scale > self.max_long_side:
            scale = self.max_long_side / max(width, height)
        out_w = _round_to_multiple(width * scale, m)
        out_h = _round_to_multiple(height * scale, m)
        if self.max_long_side is not None:
            cap = max(m, self.max_long_side // m * m)
            out_w, out_h = min(out_w, cap), min(out_h, cap)
        return (out_h, out_w)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Resize / pad per `mode` and normalise with mean and std; returns float32 (3, H, W)."""
        img = to_rgb(img) if img.mode != "RGB" else img
        if self.mode == "pad":
            img = expand_to_square(img, self.pad_color).resize(
                (self.size, self.size), Image.Resampling.BICUBIC
            )
        elif self.mode == "center_crop":
            img = shortest_edge_center_crop(img, self.size)
        else:
            out_h, out_w = self.output_size(*img.size)
            if img.size != (out_w, out_h):
                img = img.resize((out_w, out_h), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
        return ((pixels / 255.0 - self._mean_t) / self._std_t).contiguous()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-friendly settings (saved with a checkpoint so inference preprocesses the same)."""
        return {
            "size": self.size,
            "mode": self.mode,
            "mean": list(self.mean),
            "std": list(self.std),
            "multiple_of": self.multiple_of,
            "max_long_side": self.max_long_side,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImagePreprocessor:
        """Inverse of `to_dict`; unknown keys are an error so a typo cannot silently fall back to a default."""
        known = {"size", "mode", "mean", "std", "multiple_of", "max_long_side"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"image preprocessor: unknown key(s) {', '.join(unknown)}")
        if "size" not in data:
            raise ConfigError("image preprocessor: missing key 'size'")
        return cls(**data)


def shortest_edge_center_crop(img: Image.Image, size: int) -> Image.Image:
    """transformers' `get_resize_output_image_size(default_to_square=False)` + bicubic resize + `center_crop`."""
    width, height = img.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return img.crop((left, top, left + size, top + size))


def expand_to_square(img: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """Pad to a square with `color`, image centred (LLaVA-1.5's expand2square)."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    square = Image.new(img.mode, (side, side), color)
    square.paste(img, ((side - width) // 2, (side - height) // 2))
    return square


def _three_floats(values: Any, what: str) -> tuple[float, float, float]:
    try:
        floats = tuple(float(v) for v in values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"image {what}: expected three numbers, got {values!r}") from err
    if len(floats) != 3:
        raise ConfigError(f"image {what}: expected three numbers, got {len(floats)}")
    return (floats[0], floats[1], floats[2])
