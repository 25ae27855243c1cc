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
ROLE_FROM_LLAVA = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


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
    text after an assistant message; supervised), "special" (one special token, by its name, as a
    tokenizer adds it around a plain call: the BOS of Llama tokenizers).
    """

    kind: str
    text: str = ""
    role: str = ""


class Template:
    name = "base"
    # Tokenize the rendered conversation as one string, as a processor does (`encode_segments`).
    joint_tokenization = False

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

    def _render(
        self, messages: list[Message], add_generation_prompt: bool
    ) -> tuple[str, list[tuple[str, list[Segment]]]]:
        """The rendered string with sentinel k standing for `pieces[k]`: (the role it belongs to, segments)."""
        rendered = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": _SENTINEL.format(i)} for i, m in enumerate(messages)],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
        return rendered, [(m.role, _content_segments(m)) for m in messages]

    def _template_text(self, text: str) -> list[Segment]:
        return [Segment("template", text)]

    def segments(self, messages: list[Message], add_generation_prompt: bool) -> list[Segment]:
        rendered, pieces = self._render(messages, add_generation_prompt)
        out: list[Segment] = []
        previous_role = ""
        for k, piece in enumerate(_SENTINEL_RE.split(rendered)):
            if k % 2 == 1:
                previous_role, segments = pieces[int(piece)]
                out += segments
                continue
            if not piece:
                continue
            if previous_role == "assistant":
                end = _split_end_of_turn(piece)
                if end:
                    out.append(Segment("end", end))
                    piece = piece[len(end) :]
            if piece:
                out += self._template_text(piece)
            previous_role = ""
        return out


class ProcessorChatTemplate(TokenizerChatTemplate):
    """A multimodal processor's chat template (llava-hf): content is a list of `{"type": "image"}` and
    `{"type": "text", "text": ...}` entries and the template itself writes the image token.

    The prompt is what `processor.apply_chat_template` + `processor(text=...)` build: each text entry is a
    sentinel, the image token the template writes becomes an image slot, and the special tokens the
    tokenizer adds to a plain call (a BOS for Llama tokenizers) come first. A text part that follows an
    image slot loses the newline our messages put there (`user_message`, LLaVA data): the template writes
    its own separator after the image, as transformers' typed messages carry none.
    """

    name = "processor_chat_template"
    joint_tokenization = True

    def __init__(self, tokenizer, image_token: str):
        super().__init__(tokenizer)
        self.image_token = image_token
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        n = len(with_special) - len(plain)
        start = next((i for i in range(n + 1) if with_special[i : i + len(plain)] == plain), 0)
        self.prefix_ids = with_special[:start]

    def _render(
        self, messages: list[Message], add_generation_prompt: bool
    ) -> tuple[str, list[tuple[str, list[Segment]]]]:
        pieces: list[tuple[str, list[Segment]]] = []
        rendered_messages = []
        for message in messages:
            content: list[dict[str, str]] = []
            after_image = False
            for part in message.content:
                if isinstance(part, ImageSlot):
                    content.append({"type": "image"})
                    after_image = True
                    continue
                text = part[1:] if after_image and part.startswith("\n") else part
                after_image = False
                if text:
                    content.append({"type": "text", "text": _SENTINEL.format(len(pieces))})
                    pieces.append((message.role, [Segment("text", text, message.role)]))
            rendered_messages.append({"role": message.role, "content": content})
        rendered = self.tokenizer.apply_chat_template(
            rendered_messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        prefix = "".join(_SENTINEL.format(len(pieces) + i) for i in range(len(self.prefix_ids)))
        pieces += [
            ("", [Segment("special", self.tokenizer.convert_ids_to_tokens(i))]) for i in self.prefix_ids
        ]
        return prefix + rendered, pieces

    def _template_text(self, text: str) -> list[Segment]:
        out: list[Segment] = []
        for k, piece in enumerate(text.split(self.image_token)):
            if k:
                out.append(Segment("image"))
            if piece:
                out.append(Segment("template", piece))
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


TEMPLATE_NAMES = ("auto", "chat_template", "processor_chat_template", "vicuna_v1", "plain")


def resolve_template_name(name: str, tokenizer) -> str:
    """`auto` is the tokenizer's chat template when it has one, else `vicuna_v1`; other names stay."""
    if name == "auto":
        return "chat_template" if getattr(tokenizer, "chat_template", None) else "vicuna_v1"
    return name


def get_template(name: str, tokenizer, image_token: str = IMAGE_MARKER) -> Template:
    """The template called `name` (see `resolve_template_name` for `auto`)."""
    bos = tokenizer.bos_token or ""
    eos = tokenizer.eos_token or ""
    name = resolve_template_name(name, tokenizer)
    if name == "chat_template":
        return TokenizerChatTemplate(tokenizer)
    if name == "processor_chat_template":
        return ProcessorChatTemplate(tokenizer, image_token)
    if name == "vicuna_v1":
        return VicunaV1(bos, eos)
    if name == "plain":
        return Plain(eos)
    raise ConfigError(f"template: unknown {name!r}; known: {', '.join(TEMPLATE_NAMES)}")


def _encode_joint(
    segments: list[Segment], tokenizer, image_token_id: int, image_token_counts: list[int]
) -> Encoded | None:
    """`encode_segments(joint=True)`; None where piecewise tokenization must be used instead."""
    if not getattr(tokenizer, "is_fast", False) or len([s for s in segments if s.kind == "image"]) != len(
        image_token_counts
    ):
        return None
    image_text = tokenizer.convert_ids_to_tokens(image_token_id)
    text, owners = "", []  # owners[i]: the segment that wrote character i
    for segment in segments:
        piece = image_text if segment.kind == "image" else segment.text
        text += piece
        owners += [segment] * len(piece)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    special = set(tokenizer.all_special_ids) | {image_token_id}
    input_ids: list[int] = []
    labels: list[int] = []
    counts = iter(image_token_counts)
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        owner = owners[end - 1] if end > start else owners[start]
        if token in special and owner.kind == "text":
            return None
        if token == image_token_id:
            input_ids += [image_token_id] * next(counts)
            labels += [IGNORE_INDEX] * (len(input_ids) - len(labels))
            continue
        supervised = (owner.kind == "text" and owner.role == "assistant") or owner.kind == "end"
        input_ids.append(token)
        labels.append(token if supervised else IGNORE_INDEX)
    return Encoded(input_ids, labels, len(image_token_counts))


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
    segments: list[Segment],
    tokenizer,
    image_token_id: int,
    image_token_counts: list[int],
    joint: bool = False,
) -> Encoded:
    """Token ids and labels for rendered segments.

    Labels come from the segment kinds, never from counting tokens: assistant text and the end-of-turn
    after it are supervised, everything else is IGNORE_INDEX. Message text is tokenized with
    `split_special_tokens=True`, so a user typing "<|im_end|>" or "<image>" gets plain text tokens.

    `joint`: tokenize the whole rendered string at once, as `processor(text=...)` does, so merges across
    a template/text boundary (" A" after "ASSISTANT:") come out as the processor's. A token is supervised
    when its last character is; a conversation whose text would yield a special token falls back to the
    piecewise tokenization above, so user text still never becomes a special token or an image slot.
    """
    if joint:
        encoded = _encode_joint(segments, tokenizer, image_token_id, image_token_counts)
        if encoded is not None:
            return encoded
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
        elif segment.kind == "special":
            ids = [tokenizer.convert_tokens_to_ids(segment.text)]
            supervised = False
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
