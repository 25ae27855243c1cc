"""The OpenAI-compatible server against live uvicorn threads, driven by the official `openai` client.

Three servers share one tiny model's weights: `server` (batching, remote images allowed, small limits),
`strict` (a slowed copy of the model, one request at a time, one waiting, a 3 s timeout and an API key)
and `pixel` (a fake segmenting model, to check the pixel-level request and response fields).
"""

from __future__ import annotations

import base64
import http.server
import io
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

import unillava
from unillava.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from unillava.data.masks import decode_mask, to_rle
from unillava.inference import InferenceModel
from unillava.llm import EMBEDDED_DEFAULT
from unillava.modeling import LlavaModel
from unillava.omg import OMGLlavaModel
from unillava.omg.perception import tiny_perception_config
from unillava.serving import ServerConfig, ServerThread, create_app
from unillava.testing import tiny_llama_config

MODEL = "tiny"
KEY = "sekret"


def png_bytes(width: int = 40, height: int = 30, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def image_message(text: str, *urls: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(chatty_model_dir) -> InferenceModel:
    return unillava.load(chatty_model_dir)


@pytest.fixture(scope="module")
def server(model) -> Iterator[ServerThread]:
    config = ServerConfig(
        model_name=MODEL,
        max_batch=8,
        batch_wait_ms=30,
        allow_remote_images=True,
        max_images=3,
        max_image_pixels=500_000,
        max_body_bytes=2_000_000,
        threads=1,
        request_timeout=60,
    )
    with ServerThread(create_app(model, config)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def strict(chatty_model_dir) -> Iterator[ServerThread]:
    slow = unillava.load(chatty_model_dir, fast=False)  # generate calls forward once per step
    language_model = slow.model.language_model
    forward = language_model.forward

    def slowed(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.02)  # every decoding step takes >= 20 ms, so a 400-token answer outlasts the timeout
        return forward(*args, **kwargs)

    language_model.forward = slowed
    config = ServerConfig(
        model_name=MODEL, api_key=KEY, max_batch=1, max_queue=1, request_timeout=3, threads=1
    )
    with ServerThread(create_app(slow, config)) as running:
        yield running


class FakeSegmenter(InferenceModel):
    """Stands in for a pixel-level model: it masks the first box prompt (or the image's centre)."""

    supports_visual_prompts = True
    supports_segmentation = True

    def answer_pixels(self, encoded, pixels, images, visual_prompts, *, settings, return_masks):
        width, height = images[-1].size
        box = next(
            (p["box"] for p in visual_prompts if p["type"] == "box"),
            [width / 4, height / 4, width * 3 / 4, height * 3 / 4],
        )
        x0, y0, x1, y1 = (int(v) for v in box)
        mask = np.zeros((height, width), dtype=bool)
        mask[y0:y1, x0:x1] = True
        masks = [{"mask": mask, "phrase": "the red square", "score": 0.9, "image_index": len(images) - 1}]
        return "It is [SEG] the red square.", masks if return_masks else []


@pytest.fixture(scope="module")
def pixel(model) -> Iterator[ServerThread]:
    with ServerThread(create_app(FakeSegmenter(model.model), ServerConfig(model_name=MODEL))) as running:
        yield running


def health(server: ServerThread) -> dict[str, Any]:
    return httpx.get(f"{server.url}/health", timeout=10).json()


def wait_for(server: ServerThread, check, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        state = health(server)
        if check(state):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"server never reached the expected state: {state}")
        time.sleep(0.02)


# -- the happy path ------------------------------------------------------------------------------


def test_plain_completion_matches_the_inference_api(client, model):
    messages = [{"role": "user", "content": "Describe the weather today."}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    text = reply.choices[0].message.content
    assert text and text == model.chat(messages, max_new_tokens=8)
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert reply.choices[0].finish_reason == "length"
    usage = reply.usage
    assert usage.completion_tokens == 8 and usage.prompt_tokens > 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streaming_gives_the_same_text_in_pieces(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=10, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1
    assert "".join(pieces).strip() == plain.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_image_request_and_stop_strings(client, model):
    url = data_url(png_bytes())
    reply = client.chat.completions.create(
        model=MODEL, messages=image_message("What is this?", url), max_tokens=6
    )
    expected = model.chat(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": Image.open(io.BytesIO(png_bytes()))},
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ],
        max_new_tokens=6,
    )
    assert reply.choices[0].message.content == expected
    text_only = client.chat.completions.create(
        model=MODEL, messages=image_message("What is this?"), max_tokens=1
    )
    tower = model.model.vision_tower
    assert reply.usage.prompt_tokens == text_only.usage.prompt_tokens + tower.num_tokens(32, 32)
    stop = expected.split()[2]
    cut = client.chat.completions.create(
        model=MODEL, messages=image_message("What is this?", url), max_tokens=6, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == expected[: expected.index(stop)].strip()


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    card = models.data[0].model_dump()
    assert card["capabilities"] == {"vision": True, "visual_prompts": False, "segmentation": False}
    assert health(server)["status"] == "ok"


def test_concurrent_requests_are_batched(client, server, model):
    before = health(server)["batch_sizes"]
    prompts = [f"Question number {i}: what do you see?" for i in range(8)]
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        messages = [{"role": "user", "content": prompts[i]}]
        if i % 2:
            stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stream=True)
            answers[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip()
        else:
            answers[i] = (
                client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
                .choices[0]
                .message.content
            )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(answers) == list(range(8)) and all(answers.values())
    after = health(server)["batch_sizes"]
    new = {int(k): v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    assert sum(size * n for size, n in new.items()) == 8
    assert max(new) > 1, f"no batching happened: {new}"
    assert answers[0] == model.chat([{"role": "user", "content": prompts[0]}], max_new_tokens=6)


# -- bad input -------------------------------------------------------------------------------------


def _truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()[:400]


BAD_REQUESTS = {
    "malformed json": (b'{"messages": [', 400, "invalid_json", None),
    "not an object": (b"[1, 2]", 400, "invalid_json", None),
    "wrong type": ({"temperature": "hot"}, 400, "invalid_value", "temperature"),
    "wrong nested type": (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        400,
        "invalid_value",
        "messages[0].content[0].text",
    ),
    "unknown field": ({"frobnicate": 1}, 400, "unknown_parameter", "frobnicate"),
    "unsupported n": ({"n": 2}, 400, "unsupported_parameter", "n"),
    "not an image": (
        {"messages": image_message("hi", data_url(b"hello, world"))},
        400,
        "invalid_image",
        "messages[0].content[0].image_url",
    ),
    "text data url": (
        {"messages": image_message("hi", data_url(b"hello", "text/plain"))},
        400,
        "invalid_image",
        "messages[0].content[0].image_url",
    ),
    "bad base64": (
        {"messages": image_message("hi", "data:image/png;base64,@@@")},
        400,
        "invalid_image_url",
        "messages[0].content[0].image_url",
    ),
    "truncated image": (
        {"messages": image_message("hi", data_url(_truncated_png()))},
        400,
        "invalid_image",
        "messages[0].content[0].image_url",
    ),
    "huge image": (
        {"messages": image_message("hi", data_url(png_bytes(1000, 1000)))},
        400,
        "image_too_large",
        "messages[0].content[0].image_url",
    ),
    "too many images": (
        {"messages": image_message("hi", *[data_url(png_bytes())] * 4)},
        400,
        "too_many_images",
        "messages",
    ),
    "prompt over context": (
        {"messages": [{"role": "user", "content": "word " * 600}]},
        400,
        "context_length_exceeded",
        "messages",
    ),
    "max_tokens over context": ({"max_tokens": 600}, 400, "context_length_exceeded", "max_tokens"),
    "assistant last": (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        400,
        "invalid_value",
        "messages",
    ),
    "unknown model": ({"model": "gpt-17"}, 404, "model_not_found", "model"),
    "visual prompt": (
        {
            "messages": image_message("hi", data_url(png_bytes())),
            "visual_prompts": [{"type": "box", "box": [1, 1, 20, 20]}],
        },
        400,
        "visual_prompts_unsupported",
        "visual_prompts",
    ),
    "masks": (
        {"messages": image_message("hi", data_url(png_bytes())), "return_masks": True},
        400,
        "segmentation_unsupported",
        "return_masks",
    ),
    "box outside": (
        {
            "messages": image_message("hi", data_url(png_bytes())),
            "visual_prompts": [{"type": "box", "box": [1, 1, 50, 20]}],
        },
        400,
        "invalid_visual_prompt",
        "visual_prompts[0].box",
    ),
    "body too large": ({"messages": image_message("x" * 2_100_000)}, 413, "request_too_large", None),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_clear_openai_error(server, case):
    body, status, code, param = BAD_REQUESTS[case]
    if isinstance(body, dict):
        response = httpx.post(
            f"{server.url}/v1/chat/completions",
            timeout=30,
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body},
        )
    else:
        response = httpx.post(
            f"{server.url}/v1/chat/completions",
            content=body,
            timeout=30,
            headers={"content-type": "application/json"},
        )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param)
    assert error["message"] and "Traceback" not in error["message"]


def test_the_server_keeps_serving_after_bad_requests(client, server):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=image_message("hi", data_url(png_bytes(900, 900)))
        )
    assert caught.value.code == "image_too_large" and "500000" in caught.value.message
    assert (
        client.chat.completions.create(model=MODEL, messages=image_message("hi"), max_tokens=2)
        .choices[0]
        .message.content
    )
    assert health(server)["requests"]["failed"] == 0


def test_remote_images_are_fetched_only_when_allowed(client, strict):
    image = png_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            found = self.path == "/cat.png"
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(image if found else b"")

        def log_message(self, *args: Any) -> None:
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    try:
        reply = client.chat.completions.create(
            model=MODEL, messages=image_message("hi", f"{base}/cat.png"), max_tokens=3
        )
        local = client.chat.completions.create(
            model=MODEL, messages=image_message("hi", data_url(image)), max_tokens=3
        )
        assert reply.choices[0].message.content == local.choices[0].message.content
        with pytest.raises(openai.BadRequestError) as missing:
            client.chat.completions.create(model=MODEL, messages=image_message("hi", f"{base}/nope.png"))
        assert missing.value.code == "image_fetch_failed"
        guarded = openai.OpenAI(base_url=f"{strict.url}/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.BadRequestError) as refused:
            guarded.chat.completions.create(model=MODEL, messages=image_message("hi", f"{base}/cat.png"))
        assert (
            refused.value.code == "remote_images_disabled"
            and "--allow-remote-images" in refused.value.message
        )
    finally:
        files.shutdown()


# -- limits: API key, queue, disconnects, timeouts ------------------------------------------------------


def test_api_key_is_enforced(strict):
    wrong = openai.OpenAI(base_url=f"{strict.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    missing = httpx.post(
        f"{strict.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
    )
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    right = openai.OpenAI(base_url=f"{strict.url}/v1", api_key=KEY, max_retries=0)
    assert right.models.list().data[0].id == MODEL
    assert health(strict)["status"] == "ok"


def test_full_queue_429_and_a_disconnect_frees_the_slot(strict):
    client = openai.OpenAI(base_url=f"{strict.url}/v1", api_key=KEY, max_retries=0, timeout=30)
    long = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Talk."}],
        "max_tokens": 400,
        "extra_body": {"ignore_eos": True},
    }
    before = health(strict)
    stream = client.chat.completions.create(stream=True, **long)
    assert next(iter(stream)).choices[0].delta.role == "assistant"
    wait_for(strict, lambda s: s["running"] == 1)
    queued: dict[str, Any] = {}
    waiting = threading.Thread(
        target=lambda: queued.update(
            reply=client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi."}], max_tokens=2
            )
        )
    )
    waiting.start()
    wait_for(strict, lambda s: s["waiting"] == 1)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Me too."}], max_tokens=2
        )
    assert caught.value.code == "queue_full"
    stream.close()  # the client goes away mid-stream: its row stops and the queued request runs
    waiting.join(20)
    assert queued["reply"].choices[0].message.content
    after = wait_for(strict, lambda s: s["running"] == 0 and s["waiting"] == 0)
    assert after["requests"]["cancelled"] == before["requests"]["cancelled"] + 1
    assert after["requests"]["rejected"] == before["requests"]["rejected"] + 1
    assert after["requests"]["timed_out"] == before["requests"]["timed_out"]
    assert after["tokens"]["completion"] - before["tokens"]["completion"] < 200


def test_a_request_over_the_timeout_gets_504_and_frees_its_slot(strict):
    client = openai.OpenAI(base_url=f"{strict.url}/v1", api_key=KEY, max_retries=0, timeout=30)
    before = health(strict)["requests"]["timed_out"]
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Talk."}],
            max_tokens=400,
            extra_body={"ignore_eos": True},
        )
    assert caught.value.status_code == 504 and caught.value.code == "request_timeout"
    assert 2.5 < time.monotonic() - started < 15
    assert health(strict)["requests"]["timed_out"] == before + 1
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi."}], max_tokens=2
    )
    assert reply.choices[0].message.content


# -- pixel-level extensions -------------------------------------------------------------------------


def test_pixel_model_returns_masks_for_a_box_prompt(pixel):
    url = data_url(png_bytes(40, 30))
    body = {
        "model": MODEL,
        "messages": image_message("Segment it.", url),
        "return_masks": True,
        "mask_png": True,
        "visual_prompts": [{"type": "box", "box": [4, 6, 20, 16]}, {"type": "point", "point": [10, 10]}],
    }
    reply = httpx.post(f"{pixel.url}/v1/chat/completions", json=body, timeout=30).json()
    message = reply["choices"][0]["message"]
    assert message["content"] == "It is [SEG] the red square."
    [mask] = message["masks"]
    assert mask["phrase"] == "the red square" and mask["score"] == 0.9 and mask["image_index"] == 0
    assert mask["bbox"] == [4.0, 6.0, 16.0, 10.0] and mask["area"] == 160
    expected = np.zeros((30, 40), dtype=bool)
    expected[6:16, 4:20] = True
    assert (decode_mask(mask["segmentation"]) == expected).all()
    png = base64.b64decode(mask["png"].split(",", 1)[1])
    assert (np.asarray(Image.open(io.BytesIO(png))) > 0).tolist() == expected.tolist()

    with httpx.stream(
        "POST", f"{pixel.url}/v1/chat/completions", json={**body, "stream": True}, timeout=30
    ) as response:
        lines = [
            line for line in response.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"
        ]
    import json

    final = json.loads(lines[-1][6:])
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["choices"][0]["delta"]["masks"][0]["segmentation"] == mask["segmentation"]


def test_pixel_prompts_are_validated(pixel):
    url = data_url(png_bytes(40, 30))
    good = np.zeros((30, 40), dtype=bool)
    good[2:5, 3:9] = True
    rle = to_rle(good)
    rle = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    cases = [
        ({"type": "mask", "mask": rle}, 200, None),
        (
            {"type": "mask", "mask": {"size": [30, 40], "counts": [5, 5]}},
            400,
            "visual_prompts[0].mask.counts",
        ),
        (
            {"type": "mask", "mask": {"size": [40, 30], "counts": rle["counts"]}},
            400,
            "visual_prompts[0].mask.size",
        ),
        ({"type": "point", "point": [41, 3]}, 400, "visual_prompts[0].point"),
        ({"type": "box", "box": [5, 5, 2, 9]}, 400, "visual_prompts[0].box"),
        ({"type": "box", "point": [1, 1]}, 400, "visual_prompts[0]"),
        ({"type": "point", "point": [1, 1], "image_index": 1}, 400, "visual_prompts[0].image_index"),
        ({"type": "lasso"}, 400, "visual_prompts[0].type"),
    ]
    for prompt, status, param in cases:
        body = {"model": MODEL, "messages": image_message("Which?", url), "visual_prompts": [prompt]}
        response = httpx.post(f"{pixel.url}/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == status, (prompt, response.text)
        if status != 200:
            assert response.json()["error"]["param"] == param
        else:
            assert "masks" not in response.json()["choices"][0]["message"]


def test_a_masks_request_is_encoded_once_and_answered_on_that_prompt(monkeypatch):
    """A real (tiny) OMG-LLaVA behind the server: the conversation is encoded once, on admission, with a
    marker appended for the box prompt, and the model answers on exactly that prompt."""
    torch.manual_seed(0)
    config = ModelConfig(
        vision=VisionConfig(type="omg", hf_config=tiny_perception_config(), image_size=128),
        projector=ProjectorConfig(),
        llm=LLMConfig(pretrained=None, tokenizer=EMBEDDED_DEFAULT, hf_config=tiny_llama_config()),
        max_length=512,
    )
    omg = LlavaModel.from_config(config).eval()
    tokenizer = omg.tokenizer
    answer = tokenizer("<p> it </p> [SEG].", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    seen: list[tuple[list[int], Any]] = []

    def scripted(self, input_ids, attention_mask=None, images=None, visual_prompts=None, **kwargs):
        seen.append((input_ids[0].tolist(), visual_prompts))  # a random tiny LM never says [SEG] itself
        return torch.tensor([answer] * input_ids.shape[0])

    monkeypatch.setattr(OMGLlavaModel, "generate", scripted)
    lm = InferenceModel(omg)
    encoded: list[Any] = []
    encode = lm.processor.encode

    def counted(*args: Any, **kwargs: Any) -> Any:
        encoded.append(encode(*args, **kwargs))
        return encoded[-1]

    monkeypatch.setattr(lm.processor, "encode", counted)
    body = {
        "model": MODEL,
        "messages": image_message("What is in the box?", data_url(png_bytes(120, 90))),
        "return_masks": True,
        "visual_prompts": [{"type": "box", "box": [10, 10, 60, 40]}],
    }
    with ServerThread(create_app(lm, ServerConfig(model_name=MODEL, threads=1))) as running:
        reply = httpx.post(f"{running.url}/v1/chat/completions", json=body, timeout=60).json()
    assert len(encoded) == 1, "the server encoded the request more than once"
    [(ids, regions)] = seen
    assert ids == encoded[0].input_ids and ids.count(omg.token_ids["<region>"]) == 1
    assert [len(row) for row in regions] == [1]
    assert reply["usage"]["prompt_tokens"] == len(ids)
    [mask] = reply["choices"][0]["message"]["masks"]
    assert mask["phrase"] == "it" and decode_mask(mask["segmentation"]).shape == (90, 120)


def test_serve_command_checks_its_flags(chatty_model_dir, capsys):
    from unillava.cli import main

    assert main(["serve", "--model", str(chatty_model_dir), "--max-batch", "0"]) == 2
    assert "--max-batch must be at least 1" in capsys.readouterr().err
