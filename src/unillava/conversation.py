"""Conversations as structured messages, and the templates that turn them into token ids and labels.

A message's content is a list of text pieces and `ImageSlot`s. Only data files (the LLaVA format) turn the
literal marker `<image>` into a slot; text typed by a user is always text, so it can never become an image
slot or a special token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from unillava.errors import ConfigError

IMAGE_MARKER = "<image>"

Role = Literal["system", "user", "assistant"]
ROLE_FROM_LLAVA = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class ImageSlot:
    """The place of one image in a message; images are matched to slots in reading order."""


@dataclass
class Message:
    role: Role
    content: list[str | ImageSlot] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The message's text with slots dropped (for display and scoring)."""
        return "".join(part for part in self.content if isinstance(part, str))

    @property
    def num_images(self) -> int:
        return sum(isinstance(part, ImageSlot) for part in self.content)


def split_image_markers(text: str) -> list[str | ImageSlot]:
    """Turn a data-file string with `<image>` markers into content parts (LLaVA format only).

    The newline LLaVA puts right after a leading `<image>` stays with the text, as in the original data.
    """
    parts: list[str | ImageSlot] = []
    for i, piece in enumerate(text.split(IMAGE_MARKER)):
        if i > 0:
            parts.append(ImageSlot())
        if piece:
            parts.append(piece)
    return parts


def user_message(text: str, num_images: int = 0) -> Message:
    """A user turn typed by a person: images first, then the text taken literally."""
    content: list[str | ImageSlot] = [ImageSlot() for _ in range(num_images)]
    if num_images and text:
        content.append("\n" + text)
    elif text:
        content.append(text)
    return Message("user", content)


# ---------------------------------------------------------------------------------------------------
# Templates: a conversation becomes a list of segments, then token ids and labels.
# ---------------------------------------------------------------------------------------------------

IGNORE_INDEX = -100

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# End-of-turn strings of common chat templates; the first one after an assistant turn is supervised.
END_OF_TURN_STRINGS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


@dataclass(frozen=True)
class Segment:
    """One piece of a rendered conversation.

    kind: "template" (text written by the template, may contain special tokens), "text" (message text,
    never parsed for special tokens), "image" (one image's slots), "end" (the template's end-of-turn
    text after an assistant message; supervised).
    """

    kind: str
    text: str = ""
    role: str = ""


class Template:
    name = "base"

    def segments(self, messages: list[Message], add_generation_prompt: bool) -> list[Segment]:
        raise NotImplementedError


def _content_segments(message: Message) -> list[Segment]:
    return [
        Segment("image") if isinstance(part, ImageSlot) else Segment("text", part, message.role)
        for part in message.content
    ]


class VicunaV1(Template):
    """`<s>SYSTEM USER: ... ASSISTANT: ...</s>USER: ...` as in LLaVA-1.5 (Vicuna v1.5)."""

    name = "vicuna_v1"

    def __init__(self, bos: str, eos: str):
        self.bos, self.eos = bos, eos

    def segments(self, messages: list[Message], add_generation_prompt: bool) -> list[Segment]:
        system = VICUNA_SYSTEM
        if messages and messages[0].role == "system":
            system, messages = messages[0].text, messages[1:]
        out = [Segment("template", self.bos + system + " ")]
        for message in messages:
            if message.role == "user":
                out.append(Segment("template", "USER: "))
                out += _content_segments(message)
                out.append(Segment("template", " "))
            else:
                out.append(Segment("template", "ASSISTANT: "))
                out += _content_segments(message)
                out.append(Segment("end", self.eos))
        if add_generation_prompt:
            out.append(Segment("template", "ASSISTANT:"))
        return out


class Plain(Template):
    """Stage-1 alignment: image tokens then the caption and EOS; user text is dropped as in LLaVA."""

    name = "plain"

    def __init__(self, eos: str):
        self.eos = eos

    def segments(self, messages: list[Message], add_generation_prompt: bool) -> list[Segment]:
        if sum(m.role == "assistant" for m in messages) > 1:
            raise ValueError("the plain template takes one caption per sample (one assistant turn)")
        out: list[Segment] = []
        for message in messages:
            if message.role == "user":
                out += [Segment("image") for _ in range(message.num_images)]
            elif message.role == "assistant":
                out += _content_segments(message)
                out.append(Segment("end", self.eos))
        return out


_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


class TokenizerChatTemplate(Template):
    """The tokenizer's own Jinja chat template (ChatML for SmolLM2/Qwen2, Llama-3, ...).

    Each message's content is rendered as a sentinel, the rendered string is split at the sentinels, and
    our content segments go back in their place, so template text and user text are never mixed.
    """

    name = "chat_template"

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template")
        self.tokenizer = tokenizer

    def segments(self, messages: list[Message], add_generation_prompt: bool) -> list[Segment]:
        rendered = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": _SENTINEL.format(i)} for i, m in enumerate(messages)],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
        pieces = _SENTINEL_RE.split(rendered)
        out: list[Segment] = []
        previous_role = ""
        for k, piece in enumerate(pieces):
            if k % 2 == 1:
                message = messages[int(piece)]
                out += _content_segments(message)
                previous_role = message.role
                continue
            if not piece:
                continue
            if previous_role == "assistant":
                end = _split_end_of_turn(piece)
                if end:
                    out.append(Segment("end", end))
                    piece = piece[len(end) :]
            if piece:
                out.append(Segment("template", piece))
            previous_role = ""
        return out


def _split_end_of_turn(piece: str) -> str:
    """The prefix of `piece` up to and including the first end-of-turn string, or "" if none."""
    best = -1
    best_len = 0
    for marker in END_OF_TURN_STRINGS:
        pos = piece.find(marker)
        if pos >= 0 and (best < 0 or pos < best):
            best, best_len = pos, len(marker)
    return piece[: best + best_len] if best >= 0 and not piece[:best].strip() else ""


TEMPLATE_NAMES = ("auto", "chat_template", "vicuna_v1", "plain")


def get_template(name: str, tokenizer) -> Template:
    """`auto` uses the tokenizer's chat template when it has one, else `vicuna_v1`."""
    bos = tokenizer.bos_token or ""
    eos = tokenizer.eos_token or ""
    if name == "auto":
        name = "chat_template" if getattr(tokenizer, "chat_template", None) else "vicuna_v1"
    if name == "chat_template":
        return TokenizerChatTemplate(tokenizer)
    if name == "vicuna_v1":
        return VicunaV1(bos, eos)
    if name == "plain":
        return Plain(eos)
    raise ConfigError(f"template: unknown {name!r}; known: {', '.join(TEMPLATE_NAMES)}")


def _merge_template_runs(segments: list[Segment]) -> list[Segment]:
    """Join neighbouring template pieces so they tokenize as the template's author wrote them."""
    merged: list[Segment] = []
    for segment in segments:
        if segment.kind == "template" and merged and merged[-1].kind == "template":
            merged[-1] = Segment("template", merged[-1].text + segment.text)
        else:
            merged.append(segment)
    return merged


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_image_slots: int


def encode_segments(
    segments: list[Segment], tokenizer, image_token_id: int, image_token_counts: list[int]
) -> Encoded:
    """Token ids and labels for rendered segments.

    Labels come from the segment kinds, never from counting tokens: assistant text and the end-of-turn
    after it are supervised, everything else is IGNORE_INDEX. Message text is tokenized with
    `split_special_tokens=True`, so a user typing "<|im_end|>" or "<image>" gets plain text tokens.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    images = 0
    for segment in _merge_template_runs(segments):
        if segment.kind == "image":
            if images >= len(image_token_counts):
                raise ValueError(
                    f"the conversation has more image slots than the {len(image_token_counts)} image(s) given"
                )
            ids = [image_token_id] * image_token_counts[images]
            images += 1
            supervised = False
        elif segment.kind == "text":
            ids = tokenizer(segment.text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            supervised = segment.role == "assistant"
        else:
            ids = tokenizer(segment.text, add_special_tokens=False)["input_ids"]
            supervised = segment.kind == "end"
        input_ids += ids
        labels += ids if supervised else [IGNORE_INDEX] * len(ids)
    if images != len(image_token_counts):
        raise ValueError(
            f"the conversation has {images} image slot(s) but {len(image_token_counts)} image(s) were given"
        )
    return Encoded(input_ids, labels, images)
