"""Request schemas of the OpenAI-compatible API, its error bodies, and the pixel-level extensions.

Requests are validated strictly (a string is not a number, unknown fields are rejected as OpenAI does),
so a client bug surfaces as a 400 naming the field instead of a silently ignored setting.

Pixel-level extensions (for OMG-LLaVA-style models) on `POST /v1/chat/completions`:

- `visual_prompts`: boxes, points and masks on the request's images, in image pixels;
- `return_masks` / `mask_png`: ask a segmenting model for masks, each returned as COCO RLE + bbox +
  phrase (+ an optional PNG data URL) under `choices[i].message.masks` (or the last stream chunk's delta).
"""

from __future__ import annotations

import base64
import io
from typing import Any, Literal

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from unillava.data.masks import decode_mask, to_rle


class APIError(Exception):
    """An error answered with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error object, for places that build a body without raising (streams, handlers)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(_Strict):
    """A text or image part; one flat model (not a tagged union) so error paths read like JSON paths."""

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class RLE(_Strict):
    """COCO run-length encoding: size [height, width], counts compressed (str) or plain (list of ints)."""

    size: tuple[int, int]
    counts: str | list[int]


class VisualPrompt(_Strict):
    """A region the user points at: a box [x0, y0, x1, y1], a point [x, y] or a mask, in image pixels.

    `label` is 1 for foreground (the default) and 0 for a background point; `image_index` counts the
    request's images in reading order.
    """

    type: Literal["box", "point", "mask"]
    box: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None
    mask: RLE | None = None
    label: Literal[0, 1] = 1
    image_index: int = Field(0, ge=0)


class ChatCompletionRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # Extensions (vLLM's ignore_eos; unillava's pixel-level fields).
    ignore_eos: bool = False
    visual_prompts: list[VisualPrompt] | None = None
    return_masks: bool = False
    mask_png: bool = False

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


_TYPE_LABELS = {"str", "int", "float", "bool", "list", "dict", "tuple", "none", "json-or-python"}


def _param_path(loc: tuple[Any, ...]) -> str | None:
    """`("messages", 0, "content", "list[ContentPart]", 1, "text")` -> `messages[0].content[1].text`."""
    path = ""
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
        elif isinstance(item, str) and item not in _TYPE_LABELS and not any(c in item for c in "[]-"):
            path += f".{item}" if path else item
    return path or None


def parse_request(body: bytes) -> ChatCompletionRequest:
    """Strict parse; the most specific validation error becomes the 400's message and param."""
    try:
        request = ChatCompletionRequest.model_validate_json(body)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise APIError(
                400, f"the request body is not valid JSON ({errors[0]['msg']})", code="invalid_json"
            ) from None
        if errors and errors[0]["type"] == "model_type" and not errors[0]["loc"]:
            raise APIError(400, "the request body must be a JSON object", code="invalid_json") from None
        worst = max(errors, key=lambda e: len(e["loc"]))
        param = _param_path(tuple(worst["loc"]))
        if worst["type"] == "extra_forbidden":
            raise APIError(
                400, f"unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
            ) from None
        raise APIError(
            400, f"{param}: {worst['msg']}" if param else worst["msg"], param=param, code="invalid_value"
        ) from None
    _check_supported(request)
    return request


def _unsupported(param: str, what: str) -> APIError:
    return APIError(
        400, f"{param}: {what} is not supported by this server", param=param, code="unsupported_parameter"
    )


def _check_supported(request: ChatCompletionRequest) -> None:
    """OpenAI fields we accept only at their neutral value, so a client never gets a setting silently dropped."""
    if request.n != 1:
        raise _unsupported("n", "more than one choice")
    if request.logprobs or request.top_logprobs:
        raise _unsupported("logprobs", "returning log probabilities")
    if request.presence_penalty or request.frequency_penalty:
        raise _unsupported(
            "presence_penalty" if request.presence_penalty else "frequency_penalty", "a penalty"
        )
    if request.logit_bias:
        raise _unsupported("logit_bias", "a logit bias")
    if request.tools or request.tool_choice not in (None, "none", "auto"):
        raise _unsupported("tools", "tool calling")
    if request.response_format is not None and request.response_format.get("type", "text") != "text":
        raise _unsupported("response_format", "a structured response format")
    stops = request.stop_list()
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop: at most 4 non-empty strings", param="stop", code="invalid_value")
    if request.mask_png and not request.return_masks:
        raise APIError(400, "mask_png needs return_masks: true", param="mask_png", code="invalid_value")


def validate_visual_prompts(prompts: list[VisualPrompt], image_sizes: list[tuple[int, int]]) -> None:
    """Each prompt names an existing image and lies inside it; masks must be valid RLE of that image's size.

    `image_sizes` are (width, height) of the decoded images, in reading order.
    """
    for i, prompt in enumerate(prompts):
        where = f"visual_prompts[{i}]"
        if prompt.image_index >= len(image_sizes):
            raise APIError(
                400,
                f"{where}.image_index is {prompt.image_index} but the request has {len(image_sizes)} image(s)",
                param=f"{where}.image_index",
                code="invalid_visual_prompt",
            )
        width, height = image_sizes[prompt.image_index]
        field = {"box": prompt.box, "point": prompt.point, "mask": prompt.mask}
        present = [name for name, value in field.items() if value is not None]
        if present != [prompt.type]:
            raise APIError(
                400,
                f"{where}: a {prompt.type!r} prompt carries exactly the field {prompt.type!r} (got {present or 'none'})",
                param=where,
                code="invalid_visual_prompt",
            )
        if prompt.box is not None:
            x0, y0, x1, y1 = prompt.box
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                raise APIError(
                    400,
                    f"{where}.box must be [x0, y0, x1, y1] with 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}"
                    f" (the image's pixels), got {list(prompt.box)}",
                    param=f"{where}.box",
                    code="invalid_visual_prompt",
                )
        elif prompt.point is not None:
            x, y = prompt.point
            if not (0 <= x <= width and 0 <= y <= height):
                raise APIError(
                    400,
                    f"{where}.point must lie inside the {width}x{height} image, got {list(prompt.point)}",
                    param=f"{where}.point",
                    code="invalid_visual_prompt",
                )
        elif prompt.mask is not None:
            if tuple(prompt.mask.size) != (height, width):
                raise APIError(
                    400,
                    f"{where}.mask.size must be the image's [height, width] = [{height}, {width}], got {list(prompt.mask.size)}",
                    param=f"{where}.mask.size",
                    code="invalid_visual_prompt",
                )
            try:
                decode_mask({"size": list(prompt.mask.size), "counts": prompt.mask.counts})
            except ValueError as err:
                raise APIError(
                    400, f"{where}.mask: {err}", param=f"{where}.mask.counts", code="invalid_visual_prompt"
                ) from None


def prompt_as_dict(prompt: VisualPrompt) -> dict[str, Any]:
    """A visual prompt as plain data for a model's pixel hook; masks arrive decoded (bool H x W)."""
    out: dict[str, Any] = {"type": prompt.type, "label": prompt.label, "image_index": prompt.image_index}
    if prompt.box is not None:
        out["box"] = list(prompt.box)
    if prompt.point is not None:
        out["point"] = list(prompt.point)
    if prompt.mask is not None:
        out["mask"] = decode_mask({"size": list(prompt.mask.size), "counts": prompt.mask.counts})
    return out


def encode_mask(
    mask: Any, *, phrase: str = "", image_index: int = 0, score: float | None = None, png: bool = False
) -> dict[str, Any]:
    """A model's mask (bool array or RLE dict) as the response's mask object: RLE, xywh bbox, area, phrase."""
    rle = to_rle(mask if isinstance(mask, dict) else np.asarray(mask))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    out: dict[str, Any] = {
        "phrase": phrase,
        "image_index": image_index,
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "bbox": bbox,
        "area": int(mask_utils.area(rle)),
    }
    if score is not None:
        out["score"] = float(score)
    if png:
        pixels = decode_mask(out["segmentation"]).astype(np.uint8) * 255
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="PNG", optimize=True)
        out["png"] = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return out
