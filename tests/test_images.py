"""Image loading (every mode PIL reads becomes RGB; every broken file a one-line DataError) and preprocessing."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from unillava.data.images import CLIP_MEAN, CLIP_STD, ImagePreprocessor, load_image, to_rgb
from unillava.errors import ConfigError, DataError


def _save(path: Path, img: Image.Image, fmt: str, **kwargs) -> Path:
    img.save(path, fmt, **kwargs)
    return path


def _bytes(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, CLIP_MEAN, CLIP_STD, strict=True)])


# --- conversions ------------------------------------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = _save(tmp_path / "cmyk.jpg", Image.new("CMYK", (16, 8), (0, 255, 0, 0)), "JPEG", quality=95)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (16, 8)
    r, g, b = img.getpixel((8, 4))
    assert r > 240 and g < 15 and b > 240  # magenta


def test_sixteen_bit_png_scales_to_eight_bit(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    source = Image.fromarray(values)
    assert source.mode == "I;16"
    img = load_image(_save(tmp_path / "deep.png", source, "PNG"))
    assert img.mode == "RGB"
    assert [img.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [("I", 65535, 255), ("I", 200, 200), ("F", 0.5, 128), ("F", 1000.0, 4)],
)
def test_int32_and_float_images(tmp_path: Path, mode: str, value: float, expected: int) -> None:
    source = Image.new(mode, (4, 2), value)
    source.putpixel((0, 0), 0)
    img = load_image(_save(tmp_path / "x.tif", source, "TIFF"))
    assert img.mode == "RGB"
    assert img.getpixel((3, 1)) == (expected,) * 3
    assert img.getpixel((0, 0)) == (0, 0, 0)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_composites_on_white(tmp_path: Path, fmt: str) -> None:
    source = Image.new("P", (4, 4), 0)
    source.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    source.putpixel((0, 0), 1)
    img = load_image(_save(tmp_path / f"p.{fmt.lower()}", source, fmt, transparency=0))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (0, 0, 255)
    assert img.getpixel((2, 2)) == (255, 255, 255)


def test_palette_without_transparency(tmp_path: Path) -> None:
    source = Image.new("P", (4, 4), 1)
    source.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    assert load_image(_save(tmp_path / "p.png", source, "PNG")).getpixel((1, 1)) == (0, 0, 255)


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("RGBA", (0, 0, 0, 0), (255, 255, 255)),
        ("RGBA", (0, 0, 0, 255), (0, 0, 0)),
        ("LA", (0, 0), (255, 255, 255)),
    ],
)
def test_alpha_composites_on_white(tmp_path: Path, mode: str, colour: tuple, expected: tuple) -> None:
    img = load_image(_save(tmp_path / "a.png", Image.new(mode, (4, 4), colour), "PNG"))
    assert img.mode == "RGB" and img.getpixel((1, 1)) == expected


def test_half_alpha_blends(tmp_path: Path) -> None:
    img = load_image(_save(tmp_path / "a.png", Image.new("RGBA", (4, 4), (0, 0, 0, 128)), "PNG"))
    assert img.getpixel((0, 0)) == (127, 127, 127)


def test_pa_and_premultiplied_modes_convert() -> None:
    pa = Image.new("PA", (2, 2))
    pa.putpalette([10, 20, 30] * 256)
    assert to_rgb(pa).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("RGBa", (2, 2), (0, 0, 0, 255))).getpixel((0, 0)) == (0, 0, 0)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    source = Image.new("RGB", (40, 20), (255, 0, 0))
    source.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = source.getexif()
    exif[0x0112] = 6  # stored rotated: the viewer must turn it 90 degrees clockwise
    img = load_image(_save(tmp_path / "phone.jpg", source, "JPEG", exif=exif, quality=95))
    assert img.size == (20, 40)
    top, bottom = img.getpixel((10, 5)), img.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # red ends up on top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize(("mode", "value", "expected"), [("L", 77, (77, 77, 77)), ("1", 1, (255, 255, 255))])
def test_greyscale_and_bilevel(tmp_path: Path, mode: str, value: int, expected: tuple) -> None:
    img = load_image(_save(tmp_path / "g.png", Image.new(mode, (3, 3), value), "PNG"))
    assert img.mode == "RGB" and img.getpixel((1, 1)) == expected


def test_bytes_source_and_result_is_detached(tmp_path: Path) -> None:
    img = load_image(_bytes(Image.new("RGB", (5, 4), (1, 2, 3)), "PNG"))
    assert img.size == (5, 4) and img.getpixel((0, 0)) == (1, 2, 3)
    path = _save(tmp_path / "x.png", Image.new("RGB", (5, 4)), "PNG")
    img = load_image(path)
    path.unlink()
    assert img.getpixel((4, 3)) == (0, 0, 0)


# --- errors -------------------------------------------------------------------------------------------


def _error(source, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_image(source, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    message = _error(tmp_path / "nope.jpg")
    assert "nope.jpg" in message and "not found" in message


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    message = _error(tmp_path / "empty.png")
    assert "empty.png" in message and "empty" in message
    assert "empty" in _error(b"", name="blob")


def test_directory(tmp_path: Path) -> None:
    assert "directory" in _error(tmp_path)


@pytest.mark.parametrize("pil_accepts_truncated", [False, True])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path: Path, fmt: str, pil_accepts_truncated: bool, monkeypatch) -> None:
    """Refused even where another library (lmms-eval does, at import) switched PIL's global flag on."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", pil_accepts_truncated)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    data = _bytes(noise, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    message = _error(path)
    assert path.name in message and "truncated" in message
    assert ImageFile.LOAD_TRUNCATED_IMAGES is pil_accepts_truncated


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "page.png"
    path.write_text("<html>403 Forbidden</html>")
    message = _error(path)
    assert "page.png" in message and "not an image" in message


def test_bomb_rejected_before_decoding(tmp_path: Path) -> None:
    path = _save(tmp_path / "big.png", Image.new("RGB", (200, 100)), "PNG")
    message = _error(path, max_pixels=10_000)
    assert "big.png" in message and "200x100" in message and "decompression bomb" in message
    assert load_image(path, max_pixels=20_000).size == (200, 100)


def test_pil_bomb_error_becomes_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    message = _error(_bytes(Image.new("RGB", (30, 30)), "PNG"), name="huge.png", max_pixels=10**9)
    assert message.startswith("huge.png: ") and "decompression bomb" in message


# --- preprocessing ----------------------------------------------------------------------------------------


def test_pad_mode_fills_with_mean_colour_and_keeps_image_centred() -> None:
    pre = ImagePreprocessor(size=64, mode="pad")
    assert pre.pad_color == tuple(int(m * 255) for m in CLIP_MEAN)
    pixels = pre(Image.new("RGB", (200, 100), (255, 0, 0)))
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    assert torch.allclose(pixels[:, 0, 32], _normalised(pre.pad_color), atol=1e-3)  # top padding
    assert torch.allclose(pixels[:, 63, 5], _normalised(pre.pad_color), atol=1e-3)  # bottom padding
    assert torch.allclose(pixels[:, 32, 2], _normalised((255, 0, 0)), atol=1e-3)  # image, full width


def test_pad_mode_on_square_image_is_plain_resize() -> None:
    pixels = ImagePreprocessor(size=32, mode="pad")(Image.new("RGB", (50, 50), (0, 255, 0)))
    assert torch.allclose(pixels[:, 0, 0], _normalised((0, 255, 0)), atol=1e-3)


def test_resize_mode_stretches() -> None:
    pre = ImagePreprocessor(size=48, mode="resize")
    pixels = pre(Image.new("RGB", (300, 20), (0, 0, 255)))
    assert pixels.shape == (3, 48, 48)
    assert torch.allclose(pixels[:, 0, 0], _normalised((0, 0, 255)), atol=1e-3)
    assert pre.output_size(300, 20) == (48, 48)


def test_non_rgb_input_is_converted() -> None:
    assert ImagePreprocessor(size=8, mode="resize")(Image.new("L", (4, 4), 9)).shape == (3, 8, 8)


@pytest.mark.parametrize(
    ("kwargs", "width", "height", "expected"),
    [
        ({}, 1000, 500, (336, 672)),
        ({}, 500, 1000, (672, 336)),
        ({"multiple_of": 32}, 1000, 500, (352, 672)),  # 336 is not a multiple of 32: nearest is 352
        ({"multiple_of": 14}, 640, 480, (336, 448)),
        ({"max_long_side": 500}, 1000, 500, (250, 500)),  # aspect kept, short side shrinks
        ({"multiple_of": 32, "max_long_side": 768}, 3000, 300, (64, 768)),
        ({"multiple_of": 32}, 3000, 3, (352, 336_000)),  # no cap set: the long side is not limited
    ],
)
def test_any_mode_sizes(kwargs: dict, width: int, height: int, expected: tuple[int, int]) -> None:
    pre = ImagePreprocessor(size=336, mode="any", **kwargs)
    assert pre.output_size(width, height) == expected
    h, w = expected
    assert h % pre.multiple_of == 0 and w % pre.multiple_of == 0


def test_any_mode_output_matches_output_size() -> None:
    pre = ImagePreprocessor(size=32, mode="any", multiple_of=8, max_long_side=64)
    for width, height in [(100, 50), (50, 100), (33, 33), (1000, 40)]:
        pixels = pre(Image.new("RGB", (width, height)))
        assert tuple(pixels.shape[1:]) == pre.output_size(width, height)


def test_preprocessor_dict_round_trip_and_validation() -> None:
    pre = ImagePreprocessor(size=384, mode="any", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), multiple_of=32)
    data = pre.to_dict()
    assert data == {
        "size": 384,
        "mode": "any",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "multiple_of": 32,
        "max_long_side": None,
    }
    assert ImagePreprocessor.from_dict(data) == pre
    with pytest.raises(ConfigError, match="unknown key"):
        ImagePreprocessor.from_dict({**data, "szie": 3})
    with pytest.raises(ConfigError, match="mode"):
        ImagePreprocessor(size=10, mode="crop")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="std"):
        ImagePreprocessor(size=10, std=(0.1, 0.0, 0.1))


@pytest.mark.parametrize("width,height", [(57, 40), (31, 64), (48, 48)])
def test_pad_mode_equals_original_llava_expand2square_then_clip_processor(width: int, height: int) -> None:
    """Original LLaVA-1.5 (`image_aspect_ratio: pad`): expand2square with int(mean * 255), then
    CLIPImageProcessor (shortest edge + centre crop, a plain resize on a square)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image = Image.fromarray(np.random.default_rng(width).integers(0, 255, (height, width, 3), dtype=np.uint8))
    side = max(width, height)
    square = Image.new("RGB", (side, side), tuple(int(x * 255) for x in CLIP_MEAN))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    reference = CLIPImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    want = reference(images=square, return_tensors="pt")["pixel_values"][0]
    got = ImagePreprocessor(size=32, mode="pad", mean=CLIP_MEAN, std=CLIP_STD)(image)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
