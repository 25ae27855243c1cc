"""The OpenAI-compatible HTTP server (FastAPI on uvicorn) and its web page.

Every request is checked and encoded here, on the event loop's thread pool, before it is queued, so a
bad request costs a 4xx and never reaches the model, and the worker (`Batcher`) only runs the model.
Every error is an OpenAI-style body {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from unillava.conversation import Encoded, Message
from unillava.data.images import load_image
from unillava.errors import DataError, UnillavaError
from unillava.inference import InferenceModel, messages_from_openai
from unillava.segmentation import with_prompt_markers
from unillava.serving.batcher import Batcher, BatcherStoppedError, Event, Job, PixelTask, QueueFullError
from unillava.serving.schemas import (
    APIError,
    ChatCompletionRequest,
    encode_mask,
    error_body,
    parse_request,
    prompt_as_dict,
    validate_visual_prompts,
)

log = logging.getLogger("unillava.serving")

STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class ServerConfig:
    """Limits and switches of one server; the CLI flags map onto these fields."""

    model_name: str = "unillava"
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    batch_wait_ms: float = 250.0
    allow_remote_images: bool = False
    request_timeout: float = 300.0
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8
    default_max_tokens: int = 512
    threads: int | None = None
    remote_image_timeout: float = 10.0


def capability(model: InferenceModel, name: str) -> bool:
    """A capability flag declared by the InferenceModel or by the model it wraps (False when absent)."""
    return bool(getattr(model, name, False) or getattr(model.model, name, False))


class _Channel:
    """Events from the worker thread into this request's asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def push(self, event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class _TimedOut(Exception):
    pass


class _Gone(Exception):
    pass


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


class _JobStream(StreamingResponse):
    """A streaming response that runs `on_close` however it ends, even if the client left before the
    first chunk (an async generator that never started never runs its `finally`)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def _api_error(_: Request, err: APIError) -> JSONResponse:
    return _error_response(err)


async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
    return JSONResponse(
        error_body(str(err.detail), "invalid_request_error", None, code), status_code=err.status_code
    )


async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    return JSONResponse(error_body(str(err), "invalid_request_error", None, "invalid_value"), status_code=400)


async def _server_error(_: Request, err: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return JSONResponse(error_body(f"internal error: {type(err).__name__}", "server_error"), status_code=500)


def _busy() -> APIError:
    return APIError(
        429,
        "the server is busy: its request queue is full, retry later",
        type="rate_limit_error",
        code="queue_full",
    )


def _failure(event: Event) -> APIError:
    """The error a request gets when its job ended without an answer."""
    if isinstance(event.error, BatcherStoppedError):
        return APIError(503, str(event.error), type="server_error", code="unavailable")
    if event.kind == "done":
        return APIError(503, "the request was cancelled", type="server_error", code="cancelled")
    return APIError(
        500, f"generation failed: {type(event.error).__name__}: {event.error}", type="server_error"
    )


class ImageReader:
    """A request's image URLs -> PIL images, within the server's limits (data URLs; http(s) when allowed)."""

    def __init__(self, config: ServerConfig):
        self.config = config

    async def read(self, url: str, where: str) -> Image.Image:
        """The image at `url`; `where` (the field's JSON path) names it in errors."""
        data = await self._bytes(url, where)
        return await run_in_threadpool(self._decode, data, where)

    async def _bytes(self, url: str, where: str) -> bytes:
        if url.startswith("data:"):
            return self._data_url(url, where)
        if url.startswith(("http://", "https://")):
            if not self.config.allow_remote_images:
                raise APIError(
                    400,
                    f"{where}: remote image URLs are disabled on this server (start it with --allow-remote-images),"
                    " send the image as a base64 data URL instead",
                    param=where,
                    code="remote_images_disabled",
                )
            return await self._fetch(url, where)
        raise APIError(
            400,
            f"{where}: the image URL must be a base64 data URL or http(s)",
            param=where,
            code="invalid_image_url",
        )

    @staticmethod
    def _data_url(url: str, where: str) -> bytes:
        header, sep, payload = url.partition(",")
        fields = [f.strip().lower() for f in header[5:].split(";")]
        if not sep or "base64" not in fields[1:]:
            raise APIError(
                400,
                f"{where}: a data URL must be 'data:image/...;base64,...'",
                param=where,
                code="invalid_image_url",
            )
        if fields[0] and not fields[0].startswith("image/"):
            raise APIError(
                400,
                f"{where}: the data URL's media type is {fields[0]!r}, not an image",
                param=where,
                code="invalid_image",
            )
        try:
            return base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise APIError(
                400, f"{where}: the data URL is not valid base64", param=where, code="invalid_image_url"
            ) from None

    async def _fetch(self, url: str, where: str) -> bytes:
        import httpx  # lazy: only servers started with --allow-remote-images ever fetch an image

        limit = self.config.max_body_bytes
        try:
            async with httpx.AsyncClient(
                timeout=self.config.remote_image_timeout, follow_redirects=True
            ) as client:
                async with client.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise APIError(
                            400,
                            f"{where}: fetching the image gave HTTP {response.status_code}",
                            param=where,
                            code="image_fetch_failed",
                        )
                    data = bytearray()
                    async for chunk in response.aiter_bytes():
                        data += chunk
                        if len(data) > limit:
                            raise APIError(
                                400,
                                f"{where}: the image is over {limit} bytes",
                                param=where,
                                code="image_too_large",
                            )
                    return bytes(data)
        except httpx.HTTPError as err:
            raise APIError(
                400,
                f"{where}: could not fetch the image ({type(err).__name__})",
                param=where,
                code="image_fetch_failed",
            ) from None

    def _decode(self, data: bytes, where: str) -> Image.Image:
        """Check the pixel count from the header before decoding, so a huge image costs no memory."""
        limit = self.config.max_image_pixels
        too_large = "{where}: the image is {w}x{h} = {n} pixels, over this server's limit of {limit} pixels"
        try:
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
        except Image.DecompressionBombError:
            raise APIError(
                400,
                f"{where}: the image is far over this server's limit of {limit} pixels",
                param=where,
                code="image_too_large",
            ) from None
        except Exception:  # unreadable: load_image below names the problem
            width = height = 0
        if width * height > limit:
            raise APIError(
                400,
                too_large.format(where=where, w=width, h=height, n=width * height, limit=limit),
                param=where,
                code="image_too_large",
            )
        try:
            return load_image(data, name=where, max_pixels=limit)
        except DataError as err:
            raise APIError(400, str(err), param=where, code="invalid_image") from None


class _Reply:
    """One admitted request's response bodies: its id, creation time and token usage."""

    def __init__(self, req: ChatCompletionRequest, job: Job, model_name: str):
        self.req = req
        self.job = job
        self.model_name = model_name
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def usage(self, event: Event) -> dict[str, int]:
        prompt = self.job.prompt_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": event.completion_tokens,
            "total_tokens": prompt + event.completion_tokens,
        }

    def completion(self, event: Event) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": event.text}
        if self.req.return_masks:
            message["masks"] = event.masks
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model_name,
            "system_fingerprint": None,
            "choices": [
                {"index": 0, "message": message, "finish_reason": event.finish_reason, "logprobs": None}
            ],
            "usage": self.usage(event),
        }

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model_name,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }
        if self.include_usage:
            body["usage"] = None
        return _sse(body)

    def final_chunks(self, event: Event) -> list[str]:
        """The chunk that ends the answer (with the masks), then the usage chunk when asked for."""
        chunks = [self.chunk({"masks": event.masks} if self.req.return_masks else {}, event.finish_reason)]
        if self.include_usage:
            usage = {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model_name,
                "choices": [],
                "usage": self.usage(event),
            }
            chunks.append(_sse(usage))
        return chunks


class ChatService:
    """What the server does, one method per endpoint: it holds the model, the limits and the batcher.

    Requests are read, checked and encoded here (on the event loop's thread pool) before they are queued;
    the batcher's worker thread only runs the model.
    """

    def __init__(self, model: InferenceModel, config: ServerConfig):
        self.model = model
        self.config = config
        self.processor = model.processor
        self.segments = capability(model, "supports_segmentation")
        self.takes_prompts = capability(model, "supports_visual_prompts")
        self.images = ImageReader(config)
        self.batcher = Batcher(
            model,
            max_batch=config.max_batch,
            max_queue=config.max_queue,
            batch_wait=config.batch_wait_ms / 1000,
            threads=config.threads,
            encode_mask=encode_mask,
        )

    @contextlib.asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        """The batcher's worker thread runs while the app does."""
        self.batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(self.batcher.stop)

    # -- small endpoints ---------------------------------------------------------------------------

    async def index(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.config.model_name, **self.batcher.snapshot()}

    async def list_models(self, request: Request) -> dict[str, Any]:
        self.check_key(request)
        return {"object": "list", "data": [self.model_card()]}

    async def get_model(self, model_id: str, request: Request) -> dict[str, Any]:
        self.check_key(request)
        if model_id != self.config.model_name:
            raise APIError(
                404, f"the model '{model_id}' does not exist", param="model", code="model_not_found"
            )
        return self.model_card()

    def check_key(self, request: Request) -> None:
        """401 unless the request carries the server's API key (when it has one)."""
        if self.config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(
                401, "no API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key"
            )
        if not secrets.compare_digest(token.strip().encode(), self.config.api_key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.config.model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "unillava",
            "max_model_len": self.processor.max_length,
            "capabilities": {
                "vision": True,
                "visual_prompts": self.takes_prompts,
                "segmentation": self.segments,
            },
        }

    # -- chat completions --------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        """One answer, whole (JSON) or streamed (server-sent events), for an OpenAI chat request."""
        deadline = time.monotonic() + self.config.request_timeout
        self.check_key(request)
        channel = _Channel(asyncio.get_running_loop())
        with self.batcher.admission():
            req = parse_request(await self.read_body(request))
            job = await self.admit(req, channel)
        reply = _Reply(req, job, self.config.model_name)
        if req.stream:
            return self.stream(reply, channel, deadline, request)
        return await self.complete(reply, channel, deadline, request)

    async def complete(self, reply: _Reply, channel: _Channel, deadline: float, request: Request) -> Response:
        """The whole answer once the job is done."""
        try:
            while (event := await self.next_event(channel, reply.job, deadline, request)).kind == "delta":
                pass
        except _TimedOut:
            raise self.timed_out() from None
        except _Gone:
            return Response(status_code=499)
        if event.kind == "error" or event.finish_reason == "cancelled":
            raise _failure(event)
        return JSONResponse(reply.completion(event))

    def stream(
        self, reply: _Reply, channel: _Channel, deadline: float, request: Request
    ) -> StreamingResponse:
        """The answer as server-sent events: a role chunk, text deltas, the final chunk, `[DONE]`."""
        job = reply.job

        async def events() -> AsyncIterator[str]:
            yield reply.chunk({"role": "assistant", "content": ""})
            while True:
                try:
                    event = await self.next_event(channel, job, deadline, request)
                except _TimedOut:
                    yield _sse(self.timed_out().body())
                    break
                except _Gone:
                    return
                if event.kind == "delta":
                    yield reply.chunk({"content": event.text})
                    continue
                if event.kind == "error" or event.finish_reason == "cancelled":
                    yield _sse(_failure(event).body())
                    break
                for chunk in reply.final_chunks(event):
                    yield chunk
                break
            yield _sse("[DONE]")

        def closed() -> None:
            if not job.finished.is_set():  # the client left early: free its place in the batch
                self.batcher.cancel(job, "disconnect")

        return _JobStream(events(), closed)

    async def read_body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it is over the limit, before it is all read."""
        limit = self.config.max_body_bytes
        too_large = APIError(
            413, f"the request body is over this server's limit of {limit} bytes", code="request_too_large"
        )
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def build_conversation(self, req: ChatCompletionRequest) -> tuple[list[Message], list[Image.Image]]:
        """The request's messages as our conversation, with its images read and decoded."""
        refs: list[tuple[str, str]] = []
        for i, message in enumerate(req.messages):
            where = f"messages[{i}].content"
            if message.content is None and message.role != "assistant":
                raise APIError(
                    400,
                    f"{where} is required for a {message.role} message",
                    param=where,
                    code="invalid_value",
                )
            for j, part in enumerate(message.content if isinstance(message.content, list) else []):
                field, other = ("text", part.image_url) if part.type == "text" else ("image_url", part.text)
                if getattr(part, field) is None or other is not None:
                    raise APIError(
                        400,
                        f"{where}[{j}]: a {part.type!r} part carries exactly the field {field!r}",
                        param=f"{where}[{j}]",
                        code="invalid_value",
                    )
                if part.image_url is not None:
                    refs.append((part.image_url.url, f"{where}[{j}].image_url"))
        if len(refs) > self.config.max_images:
            raise APIError(
                400,
                f"the request has {len(refs)} images, over this server's limit of {self.config.max_images}",
                param="messages",
                code="too_many_images",
            )
        images = [await self.images.read(url, where) for url, where in refs]
        plain: list[dict[str, Any]] = []
        pending = iter(images)
        for message in req.messages:
            content: Any = message.content if message.content is not None else ""
            if isinstance(content, list):
                content = [
                    {"type": "text", "text": p.text}
                    if p.type == "text"
                    else {"type": "image", "image": next(pending)}
                    for p in content
                ]
            plain.append(
                {"role": "system" if message.role == "developer" else message.role, "content": content}
            )
        try:
            conversation, _ = messages_from_openai(plain)
        except UnillavaError as err:
            raise APIError(400, str(err), param="messages", code="invalid_value") from None
        if conversation[-1].role != "user":
            raise APIError(
                400, "the last message must be from the user", param="messages", code="invalid_value"
            )
        return conversation, images

    def encode(self, conversation: list[Message], images: list[Image.Image]) -> tuple[Encoded, list[Any]]:
        """The prompt the job runs on, encoded once here; 400 if it does not fit the context."""
        processor = self.processor
        try:
            encoded, pixels = processor.encode_prompt(conversation, images)
        except (UnillavaError, ValueError) as err:
            raise APIError(400, str(err), param="messages", code="invalid_value") from None
        if len(encoded.input_ids) >= processor.max_length:
            raise APIError(
                400,
                f"this model's maximum context length is {processor.max_length} tokens, but the messages are "
                f"{len(encoded.input_ids)} tokens (images included)",
                param="messages",
                code="context_length_exceeded",
            )
        return encoded, pixels

    def pixel_task(
        self, req: ChatCompletionRequest, conversation: list[Message], images: list[Image.Image]
    ) -> tuple[PixelTask | None, list[Message]]:
        """For a pixel-level request: its task, and the conversation with a marker per visual prompt
        (when it has none), so the prompt encoded on admission is the one the model answers."""
        if not (req.visual_prompts or req.return_masks):
            return None, conversation
        validate_visual_prompts(req.visual_prompts or [], [im.size for im in images])
        if req.visual_prompts and not self.takes_prompts:
            raise APIError(
                400,
                "this model does not take visual prompts (boxes, points or masks)",
                param="visual_prompts",
                code="visual_prompts_unsupported",
            )
        if req.return_masks and not self.segments:
            raise APIError(
                400,
                "this model does not segment: it cannot return masks",
                param="return_masks",
                code="segmentation_unsupported",
            )
        if not self.model.answers_pixels:
            raise APIError(
                501,
                "the model declares pixel-level support but has no answer_pixels hook",
                type="server_error",
                code="not_implemented",
            )
        prompts = [prompt_as_dict(p) for p in req.visual_prompts or []]
        if prompts:
            conversation = with_prompt_markers(conversation, prompts)
        return PixelTask(images, prompts, req.return_masks, req.mask_png), conversation

    async def admit(self, req: ChatCompletionRequest, channel: _Channel) -> Job:
        """Check, read and encode a request, then queue its job (429 when the queue is full)."""
        config = self.config
        if req.model is not None and req.model != config.model_name:
            raise APIError(
                404,
                f"the model '{req.model}' does not exist; this server serves '{config.model_name}'",
                param="model",
                code="model_not_found",
            )
        try:
            self.batcher.check_room()
        except QueueFullError:
            raise _busy() from None
        except BatcherStoppedError as err:
            raise APIError(503, str(err), type="server_error", code="unavailable") from None
        conversation, images = await self.build_conversation(req)
        pixel, conversation = self.pixel_task(req, conversation, images)
        encoded, pixels = await run_in_threadpool(self.encode, conversation, images)
        max_length = self.processor.max_length
        room = max_length - len(encoded.input_ids)
        requested = req.requested_max_tokens()
        if requested is not None and requested > room:
            raise APIError(
                400,
                f"this model's maximum context length is {max_length} tokens, but you requested "
                f"{len(encoded.input_ids) + requested} tokens ({len(encoded.input_ids)} in the messages, "
                f"{requested} in the completion)",
                param="max_tokens",
                code="context_length_exceeded",
            )
        job = Job(
            encoded=encoded,
            pixels=pixels,
            max_new_tokens=min(requested or config.default_max_tokens, room),
            sink=channel.push,
            temperature=req.temperature if req.temperature is not None else 0.0,
            top_p=req.top_p if req.top_p is not None else 1.0,
            seed=req.seed,
            stop=req.stop_list(),
            ignore_eos=req.ignore_eos,
            stream=req.stream,
            pixel=pixel,
        )
        try:
            self.batcher.submit(job)
        except QueueFullError:
            raise _busy() from None
        except BatcherStoppedError as err:
            raise APIError(503, str(err), type="server_error", code="unavailable") from None
        return job

    async def next_event(self, channel: _Channel, job: Job, deadline: float, request: Request) -> Event:
        """The job's next event; cancels it when the deadline passes or the client disconnects."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.batcher.cancel(job, "timeout")
                raise _TimedOut
            try:
                return await asyncio.wait_for(channel.queue.get(), timeout=min(remaining, 0.5))
            except TimeoutError:
                if await request.is_disconnected():
                    self.batcher.cancel(job, "disconnect")
                    raise _Gone from None

    def timed_out(self) -> APIError:
        return APIError(
            504,
            f"the request took longer than this server's timeout of {self.config.request_timeout:g} s",
            type="timeout_error",
            code="request_timeout",
        )


def create_app(model: InferenceModel, config: ServerConfig | None = None) -> FastAPI:
    """The ASGI app serving `model` through a `ChatService`; its batcher thread starts and stops with the
    app's lifespan."""
    service = ChatService(model, config or ServerConfig())
    app = FastAPI(
        title="unillava", lifespan=service.lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.service = service
    app.state.batcher = service.batcher
    app.state.config = service.config
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _server_error)
    app.add_api_route("/", service.index, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_api_route("/health", service.health, methods=["GET"])
    app.add_api_route("/v1/models", service.list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", service.get_model, methods=["GET"])
    app.add_api_route("/v1/chat/completions", service.chat_completions, methods=["POST"])
    return app


class ServerThread:
    """uvicorn serving `app` in a background thread on a loopback port (0 = a free one): tests, notebooks.

    Use as a context manager; `url` is the base URL once entered.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn  # lazy: building the app (create_app) needs no server, only running it does

        self.host = host
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.port = self._socket.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_keep_alive=5)
        )
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server thread did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(30)
        self._socket.close()
