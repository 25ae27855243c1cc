"""Inference: `unillava.load(path)` gives an `InferenceModel` with batched `generate` and streaming `chat`,
and for pixel-level models (OMG-LLaVA) `segment`, `generate_with_masks` and the server's `answer_pixels`
(run by `unillava.segmentation`). Decoding settings and stop strings: `unillava.generation`."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import TextIteratorStreamer

from unillava.conversation import TEMPLATE_NAMES, Encoded, ImageSlot, Message, user_message
from unillava.data.images import load_image
from unillava.decoding import (
    HANDLED_GENERATE_KWARGS,
    FastDecoder,
    check_quantize,
    fast_decoding_unsupported,
    lora_factors,
)
from unillava.errors import UnillavaError
from unillava.generation import GenerationSettings, autocast, cut_at_stop, seed_sampling
from unillava.hub import load_model
from unillava.modeling import LlavaModel
from unillava.omg import OMGLlavaModel
from unillava.processor import Processor
from unillava.segmentation import SegmentationResult, Segmenter, with_prompt_markers

ImageInput = str | Path | Image.Image


def _as_image(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    return load_image(image)


def messages_from_openai(messages: Sequence[dict[str, Any]]) -> tuple[list[Message], list[Any]]:
    """OpenAI-style messages (content a string or a list of text / image parts) -> our messages.

    Image parts carry the image itself under `image` (a PIL image or a path); the server decodes
    `image_url` parts into that before calling here.
    """
    out: list[Message] = []
    images: list[Any] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise UnillavaError(f"messages[{i}].role must be system, user or assistant, got {role!r}")
        content = message.get("content")
        parts: list[str | ImageSlot] = []
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append(str(part.get("text", "")))
                elif kind in ("image", "image_url"):
                    if "image" not in part:
                        raise UnillavaError(f"messages[{i}].content[{j}]: image part without decoded image")
                    parts.append(ImageSlot())
                    images.append(part["image"])
                else:
                    raise UnillavaError(
                        f"messages[{i}].content[{j}].type must be text or image, got {kind!r}"
                    )
        else:
            raise UnillavaError(f"messages[{i}].content must be a string or a list of parts")
        out.append(Message(role, parts))
    return out, images


class InferenceModel:
    """A loaded model with its processor; all inputs are validated before the model runs.

    Text is decoded by `FastDecoder` where the language model allows it (`decode_path` says which path
    runs and why): its greedy text equals `generate`'s. `fast=False` forces `generate`; `quantize="int4"`
    runs the fast path on int4 weights (lossy; 1.6-2.2x faster batch-1 decoding measured on a 2-core
    CPU: docs/inference.md).
    """

    def __init__(
        self,
        model: LlavaModel,
        processor: Processor | None = None,
        *,
        fast: bool = True,
        quantize: str = "none",
    ):
        self.model = model.eval()
        self.processor = processor or Processor.for_model(model)
        self.decoder: FastDecoder | None = None
        self._segmenter: Segmenter | None = None
        self.decode_path = self._choose_decoder(fast, quantize)

    def _choose_decoder(self, fast: bool, quantize: str) -> str:
        check_quantize(quantize)
        if not fast and quantize == "none":
            return "generate (fast decoding turned off)"
        reason = fast_decoding_unsupported(self.model.language_model)
        if reason is None and type(self.model).generate is not LlavaModel.generate:
            reason = f"{type(self.model).__name__} has its own generate"
        if reason is not None:
            if quantize != "none":
                raise UnillavaError(
                    f"quantize={quantize} needs the fast decoding path, which {reason} rules out"
                )
            return f"generate ({reason})"
        adapter = self.model.merged_adapter
        lora = lora_factors(adapter) if quantize == "int4" and adapter is not None else None
        self.decoder = FastDecoder(self.model.language_model, quantize=quantize, lora=lora)
        return "fast" if quantize == "none" else f"fast {quantize}"

    def generate_ids(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        images: list[torch.Tensor] | None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """New token ids for a left-padded batch, on the fast path when it handles every argument."""
        if self.decoder is not None and HANDLED_GENERATE_KWARGS.issuperset(generate_kwargs):
            embeds = self.model.embed_inputs(input_ids, images)
            return self.decoder.generate(embeds, attention_mask, **generate_kwargs)
        return self.model.generate(input_ids, attention_mask=attention_mask, images=images, **generate_kwargs)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def supports_segmentation(self) -> bool:
        """True for pixel-level models (OMG-LLaVA) that answer with masks for `[SEG]` tokens."""
        return bool(getattr(self.model, "supports_segmentation", False))

    @property
    def supports_visual_prompts(self) -> bool:
        """True for models whose `<region>`/`<mark>` tokens take box / point / mask prompts (OMG-LLaVA)."""
        return bool(getattr(self.model, "supports_visual_prompts", False))

    @property
    def segmenter(self) -> Segmenter | None:
        """What runs a pixel-level model (OMG-LLaVA) for text and masks; None for other models."""
        if self._segmenter is None and isinstance(self.model, OMGLlavaModel):
            self._segmenter = Segmenter(self.model, self.processor)
        return self._segmenter

    def _require_segmenter(self) -> Segmenter:
        if self.segmenter is None:
            raise UnillavaError("this model does not segment: it has no [SEG] decoder")
        return self.segmenter

    @property
    def answers_pixels(self) -> bool:
        """Whether `answer_pixels` can run: the model decodes [SEG] itself, or a subclass brings the hook."""
        return self.segmenter is not None or type(self).answer_pixels is not InferenceModel.answer_pixels

    def segment(
        self,
        image: ImageInput,
        prompt: str,
        *,
        max_new_tokens: int = 64,
        visual_prompts: Sequence[Mapping[str, Any]] | None = None,
    ) -> SegmentationResult:
        """One image and one prompt -> the answer and a mask per [SEG] (`Segmenter.segment`)."""
        return self._require_segmenter().segment(
            _as_image(image), prompt, max_new_tokens=max_new_tokens, visual_prompts=visual_prompts
        )

    def generate_with_masks(
        self,
        conversations: Sequence[list[Message]],
        images: Sequence[Sequence[ImageInput]],
        *,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        progress: Any = None,
        visual_prompts: Sequence[Sequence[Mapping[str, Any]] | None] | None = None,
    ) -> list[tuple[str, list[dict[str, Any]]]]:
        """The benchmark runner's hook: (text, masks as COCO RLE dicts) per conversation, `batch_size` at
        a time (images are loaded per batch); `visual_prompts` (per conversation, None for none) fill the
        `<region>`/`<mark>` markers of region tasks."""
        segmenter = self._require_segmenter()
        out: list[tuple[str, list[dict[str, Any]]]] = []
        for start in range(0, len(conversations), batch_size):
            chunk = slice(start, start + batch_size)
            pictures = [[_as_image(im) for im in entry] for entry in images[chunk]]
            results = segmenter.generate_results(
                conversations[chunk],
                pictures,
                max_new_tokens=max_new_tokens,
                visual_prompts=None if visual_prompts is None else visual_prompts[chunk],
            )
            out += [(result.text, result.rles) for result in results]
            if progress is not None:
                progress.update(len(pictures))
        return out

    def chat_pixels(
        self,
        conversation: list[Message],
        images: Sequence[ImageInput],
        visual_prompts: Sequence[Mapping[str, Any]],
        *,
        settings: GenerationSettings,
        return_masks: bool,
    ) -> tuple[str, list[dict[str, Any]]]:
        """A pixel-level reply to a conversation: its prompts' markers appended when the text has none
        ("region1 <region>", "point1 <mark>"), encoded, then answered by `answer_pixels`."""
        if visual_prompts:
            conversation = with_prompt_markers(conversation, visual_prompts)
        pictures = [_as_image(im) for im in images]
        encoded, pixels = self.processor.encode_prompt(conversation, pictures)
        return self.answer_pixels(
            encoded, pixels, pictures, visual_prompts, settings=settings, return_masks=return_masks
        )

    def answer_pixels(
        self,
        encoded: Encoded,
        pixels: list[torch.Tensor],
        images: Sequence[Image.Image],
        visual_prompts: Sequence[Mapping[str, Any]],
        *,
        settings: GenerationSettings,
        return_masks: bool,
    ) -> tuple[str, list[dict[str, Any]]]:
        """The server's pixel-level hook (docs/serving.md), given the prompt it already encoded: the
        greedy answer (up to `settings.max_new_tokens`) and, with `return_masks`, one mask per [SEG]
        ({"mask": bool H x W, "phrase", "score", "image_index"}). Prompts fill the `<region>`/`<mark>`
        tokens of `encoded` in order."""
        return self._require_segmenter().answer_pixels(
            encoded, pixels, images, visual_prompts, settings=settings, return_masks=return_masks
        )

    def _answer_text(self, new_ids: torch.Tensor, gen: GenerationSettings) -> str:
        """Generated ids -> the answer: special tokens dropped, cut at the first stop string."""
        return cut_at_stop(self.tokenizer.decode(new_ids, skip_special_tokens=True), gen.stop).strip()

    def _run(
        self, conversations: list[list[Message]], images: list[list[Image.Image]], settings, streamer=None
    ):
        batch, _ = self.processor.prompt_batch(conversations, images)
        batch = batch.to(self.model.device)
        seed_sampling(settings.seed)
        with torch.inference_mode(), autocast(self.model):
            return self.generate_ids(
                batch.input_ids,
                batch.attention_mask,
                batch.images,
                streamer=streamer,
                **settings.generate_kwargs(self.processor),
            )

    def generate(
        self,
        prompts: str | Sequence[str],
        images: ImageInput | Sequence[ImageInput] | Sequence[Sequence[ImageInput]] | None = None,
        *,
        batch_size: int = 8,
        **settings: Any,
    ) -> str | list[str]:
        """Answer one prompt or a batch (left-padded, `batch_size` at a time).

        `images` for one prompt: an image or a list of images; for a batch: one entry (image, list,
        or None) per prompt. Prompt text is literal: "<image>" typed in it stays text.
        """
        single = isinstance(prompts, str)
        prompt_list = [prompts] if single else list(prompts)
        if single:
            per_prompt = [_image_list(images)]
        elif images is None:
            per_prompt = [[] for _ in prompt_list]
        else:
            if len(images) != len(prompt_list):  # type: ignore[arg-type]
                raise UnillavaError(f"{len(prompt_list)} prompts but {len(images)} image entries")  # type: ignore[arg-type]
            per_prompt = [_image_list(entry) for entry in images]  # type: ignore[union-attr]
        loaded = [[_as_image(im) for im in entry] for entry in per_prompt]
        conversations = [[user_message(p, len(ims))] for p, ims in zip(prompt_list, loaded, strict=True)]
        outputs = self.generate_conversations(conversations, loaded, batch_size=batch_size, **settings)
        return outputs[0] if single else outputs

    def generate_conversations(
        self,
        conversations: Sequence[list[Message]],
        images: Sequence[Sequence[ImageInput]],
        *,
        batch_size: int = 8,
        progress: Any = None,
        **settings: Any,
    ) -> list[str]:
        """Answer many conversations, `batch_size` at a time; `progress` (a tqdm bar) is advanced per sample."""
        gen = GenerationSettings(**settings)
        outputs: list[str] = []
        for start in range(0, len(conversations), batch_size):
            chunk = slice(start, start + batch_size)
            chunk_images = [[_as_image(im) for im in entry] for entry in images[chunk]]
            new_ids = self._run(list(conversations[chunk]), chunk_images, gen)
            outputs += [self._answer_text(row, gen) for row in new_ids]
            if progress is not None:
                progress.update(len(chunk_images))
        return outputs

    def chat(
        self,
        messages: Sequence[dict[str, Any]] | list[Message],
        images: Sequence[ImageInput] | None = None,
        *,
        stream: bool = False,
        **settings: Any,
    ) -> str | Iterator[str]:
        """One assistant reply to a multi-turn conversation; with `stream=True`, an iterator of text pieces.

        `messages` are OpenAI-style dicts or our `Message`s; images fill the image slots in order.
        """
        if messages and isinstance(messages[0], Message):
            conversation = list(messages)  # type: ignore[arg-type]
            image_list = [_as_image(im) for im in (images or [])]
        else:
            conversation, embedded = messages_from_openai(messages)  # type: ignore[arg-type]
            image_list = [_as_image(im) for im in [*embedded, *(images or [])]]
        if not conversation or conversation[-1].role != "user":
            raise UnillavaError("the last message must be from the user")
        slots = sum(m.num_images for m in conversation)
        if slots != len(image_list):
            raise UnillavaError(
                f"the messages have {slots} image slot(s) but {len(image_list)} image(s) were given"
            )
        gen = GenerationSettings(**settings)
        if not stream:
            row = self._run([conversation], [image_list], gen)[0]
            return self._answer_text(row, gen)
        return self._stream(conversation, image_list, gen)

    def _stream(
        self, conversation: list[Message], images: list[Image.Image], gen: GenerationSettings
    ) -> Iterator[str]:
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                self._run([conversation], [images], gen, streamer=streamer)
            except BaseException as err:  # re-raised in the consumer's thread
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        emitted = ""
        for piece in streamer:
            if gen.stop:
                candidate = cut_at_stop(emitted + piece, gen.stop)
                if len(candidate) < len(emitted + piece):
                    yield candidate[len(emitted) :]
                    break
            emitted += piece
            yield piece
        thread.join()
        if errors:
            raise errors[0]


def _image_list(entry: Any) -> list[ImageInput]:
    if entry is None:
        return []
    if isinstance(entry, (str, Path, Image.Image)):
        return [entry]
    return list(entry)


def load(
    path: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    template: str | None = None,
    fast: bool = True,
    quantize: str = "none",
) -> InferenceModel:
    """Load any supported layout (ours, llava-hf, original LLaVA) for inference.

    The prompt format is the checkpoint's own (docs/templates.md); `template` overrides it by name.
    `fast` and `quantize` choose the decoding path (`InferenceModel`)."""
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise UnillavaError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        dtype = getattr(torch, dtype)
    model = load_model(path, dtype=dtype)
    if template is not None:
        if template not in TEMPLATE_NAMES:
            raise UnillavaError(f"template: unknown {template!r}; known: {', '.join(TEMPLATE_NAMES)}")
        model.config.template = template
    return InferenceModel(model.to(device), fast=fast, quantize=quantize)
