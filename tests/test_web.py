"""The web page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright; no browser download).

Two live servers: the tiny chatty model (streamed answers, visual prompts refused) and a fake segmenting
model (the mask overlay end to end). Skipped, with the reason, where Chromium or Playwright is missing.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

import unillava
from unillava.data.masks import to_rle
from unillava.inference import InferenceModel
from unillava.serving import ServerConfig, ServerThread, create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)


class FakeSegmenter(InferenceModel):
    """Stands in for a pixel-level model: it masks the first box prompt, calling it 'the red square'."""

    supports_visual_prompts = True
    supports_segmentation = True

    def answer_pixels(self, encoded, pixels, images, visual_prompts, *, settings, return_masks):
        width, height = images[-1].size
        box = next((p["box"] for p in visual_prompts if p["type"] == "box"), [0, 0, width // 2, height // 2])
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        mask = np.zeros((height, width), dtype=bool)
        mask[y0:y1, x0:x1] = True
        return "Here is [SEG] the red square.", [{"mask": mask, "phrase": "the red square", "score": 0.93}]


@pytest.fixture(scope="module")
def model(chatty_model_dir, one_torch_thread) -> InferenceModel:
    return unillava.load(chatty_model_dir)


@pytest.fixture(scope="module")
def server(model) -> Iterator[ServerThread]:
    with ServerThread(create_app(model, ServerConfig(model_name="tiny", threads=1))) as running:
        yield running


@pytest.fixture(scope="module")
def segmenter(model) -> Iterator[ServerThread]:
    with ServerThread(create_app(FakeSegmenter(model.model), ServerConfig(model_name="fake-seg"))) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda err: errors.append(str(err)))
    yield tab
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    image = Image.new("RGB", (160, 120), (235, 235, 225))
    image.paste((210, 40, 40), (40, 30, 100, 80))
    path = tmp_path / "square.png"
    image.save(path)
    return path


def open_page(page: Any, url: str, picture: Path) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]", timeout=15_000)
    page.set_input_files("#image-input", str(picture))
    page.wait_for_selector("#stage:not([hidden])")
    page.wait_for_function("() => document.getElementById('image').complete")


def draw_box(page: Any, x0: float, y0: float, x1: float, y1: float) -> None:
    """Drag on the prompt layer; coordinates are fractions of the displayed image."""
    page.click("#tools [data-tool=box]")
    rect = page.locator("#prompt-layer").bounding_box()
    page.mouse.move(rect["x"] + x0 * rect["width"], rect["y"] + y0 * rect["height"])
    page.mouse.down()
    page.mouse.move(rect["x"] + x1 * rect["width"], rect["y"] + y1 * rect["height"], steps=4)
    page.mouse.up()


def ask(page: Any, text: str) -> Any:
    page.fill("#prompt", text)
    with page.expect_response("**/v1/chat/completions") as response:
        page.press("#prompt", "Enter")
    page.wait_for_selector("#log > :last-child[data-state=done]", timeout=30_000)
    return response.value


def test_upload_ask_and_see_the_streamed_answer(page, server, picture, tmp_path):
    open_page(page, server.url, picture)
    assert "tiny" in page.inner_text("#model-name")
    assert "does not take visual prompts" in page.inner_text("#capability-note")
    page.fill("#max-tokens", "8")
    response = ask(page, "What is in the picture?")
    assert response.headers["content-type"].startswith("text/event-stream")
    answer = page.inner_text("#log .msg.assistant:last-child .text")
    data = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    expected = httpx.post(
        f"{server.url}/v1/chat/completions",
        timeout=30,
        json={
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data}},
                        {"type": "text", "text": "What is in the picture?"},
                    ],
                }
            ],
            "max_tokens": 8,
        },
    ).json()["choices"][0]["message"]["content"]
    assert answer == expected and answer
    assert "8 tokens" in page.inner_text("#log .msg.assistant:last-child .meta")

    draw_box(page, 0.25, 0.25, 0.6, 0.65)
    assert page.locator("#prompt-list li").count() == 1
    box = page.evaluate("unillava.state.prompts[0].box")
    assert 35 <= box[0] <= 45 and 25 <= box[1] <= 35 and 90 <= box[2] <= 100 and 73 <= box[3] <= 83
    ask(page, "And this region?")
    assert "does not take visual prompts" in page.inner_text("#log .msg.error:last-child")
    assert page.locator("#prompt-list li").count() == 1  # kept, so the user can clear or resend them
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)


def test_mask_overlay_from_a_segmenting_model(page, segmenter, picture, tmp_path):
    open_page(page, segmenter.url, picture)
    assert "returns masks" in page.inner_text("#capability-note")
    page.check("#return-masks")
    draw_box(page, 0.25, 0.25, 0.625, 2 / 3)
    ask(page, "Segment the red square.")
    assert page.inner_text("#log .msg.assistant:last-child .text") == "Here is [SEG] the red square."
    assert page.inner_text("#mask-legend").strip() == "the red square (0.93)"
    alpha = """([x, y]) => {
        const layer = document.getElementById('mask-layer'), k = layer.width / unillava.state.image.width;
        return layer.getContext('2d').getImageData(x * k, y * k, 1, 1).data[3];
    }"""
    assert page.evaluate(alpha, [70, 55]) > 0  # inside the drawn box, in image pixels
    assert page.evaluate(alpha, [140, 110]) == 0
    shot = tmp_path / "web.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_render_function_draws_a_synthetic_rle(page, server, picture):
    open_page(page, server.url, picture)
    mask = np.zeros((120, 160), dtype=bool)
    mask[10:50, 20:60] = True
    rle = to_rle(mask)
    fake = [
        {
            "phrase": "a block",
            "image_index": 0,
            "bbox": [20, 10, 40, 40],
            "segmentation": {"size": [120, 160], "counts": rle["counts"].decode("ascii")},
        }
    ]
    assert page.evaluate("masks => unillava.renderMasks(masks, 0)", fake) == 1
    decoded = page.evaluate("rle => Array.from(unillava.decodeRle(rle).data)", fake[0]["segmentation"])
    assert np.array_equal(np.array(decoded, dtype=bool).reshape(120, 160), mask)
    png = page.locator("#mask-layer").screenshot()
    assert Image.open(io.BytesIO(png)).size[0] > 0
    assert page.inner_text("#mask-legend").strip() == "a block"
    assert page.evaluate("masks => unillava.renderMasks(masks, 1)", fake) == 0  # another image's masks
