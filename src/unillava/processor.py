"""The processor: conversations and images in, padded token ids, labels and pixel tensors out.

It asks the vision tower how many tokens each image yields and expands every image slot into exactly
that many image tokens, so the model can splice features without guessing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from unillava.config import ModelConfig
from unillava.conversation import (
    END_OF_TURN_STRINGS,
    IGNORE_INDEX,
    Encoded,
    Message,
    Template,
    encode_segments,
    get_template,
)
from unillava.data.images import ImagePreprocessor
from unillava.errors import UnillavaError
from unillava.vision import VisionTower


class PromptTooLongError(UnillavaError):
    """A prompt does not fit in the model's context."""


@dataclass
class Batch:
    """Padded ids, mask, labels and the flat image list. A model's extra training inputs (OMG-LLaVA's
    [SEG] targets) travel beside it in `unillava.training.dataset.TrainBatch`."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    images: list[torch.Tensor]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            None if self.labels is None else self.labels.to(device),
            [image.to(device) for image in self.images],
        )

    def model_inputs(self) -> dict[str, Any]:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "images": self.images}
        if self.labels is not None:
            inputs["labels"] = self.labels
        return inputs


class Processor:
    def __init__(
        self,
        tokenizer,
        template: Template,
        image_preprocessor: ImagePreprocessor,
        tower: VisionTower,
        image_token_id: int,
        max_length: int,
        system_prompt: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.template = template
        self.image_preprocessor = image_preprocessor
        self.tower = tower
        self.image_token_id = image_token_id
        self.max_length = max_length
        self.system_prompt = system_prompt
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def for_model(cls, model, template: str | None = None) -> Processor:
        config: ModelConfig = model.config
        vision = config.vision
        preprocessor = ImagePreprocessor(
            size=vision.image_size,
            mode=vision.image_mode,
            mean=tuple(vision.image_mean),
            std=tuple(vision.image_std),
            **{k: v for k, v in vision.extra.items() if k in ("multiple_of", "max_long_side")},
        )
        return cls(
            model.tokenizer,
            get_template(template or config.template, model.tokenizer, config.image_token),
            preprocessor,
            model.vision_tower,
            model.image_token_id,
            config.max_length,
            config.system_prompt,
        )

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end an assistant turn: EOS and the template's end-of-turn token."""
        vocab = self.tokenizer.get_vocab()
        ids = {self.tokenizer.eos_token_id} | {vocab[s] for s in END_OF_TURN_STRINGS if s in vocab}
        return sorted(i for i in ids if i is not None)

    def preprocess_images(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        return [self.image_preprocessor(image) for image in images]

    def encode(
        self, messages: list[Message], pixel_values: list[torch.Tensor], add_generation_prompt: bool = False
    ) -> Encoded:
        """Ids and labels; the model's default system prompt is used when the conversation has none,
        in training and inference alike."""
        counts = [self.tower.num_tokens(int(p.shape[-2]), int(p.shape[-1])) for p in pixel_values]
        if self.system_prompt is not None and (not messages or messages[0].role != "system"):
            messages = [Message("system", [self.system_prompt]), *messages]
        segments = self.template.segments(messages, add_generation_prompt=add_generation_prompt)
        return encode_segments(
            segments, self.tokenizer, self.image_token_id, counts, joint=self.template.joint_tokenization
        )

    def collate(self, encoded: list[Encoded], images: list[list[torch.Tensor]], padding_side: str) -> Batch:
        """Pad to the longest sequence; images of all samples are flattened in sample order."""
        longest = max(len(e.input_ids) for e in encoded)
        pad_id = self.tokenizer.pad_token_id
        ids = torch.full((len(encoded), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(encoded), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(encoded), longest), dtype=torch.long)
        for row, e in enumerate(encoded):
            n = len(e.input_ids)
            span = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
            ids[row, span] = torch.tensor(e.input_ids, dtype=torch.long)
            labels[row, span] = torch.tensor(e.labels, dtype=torch.long)
            mask[row, span] = 1
        flat = [image for sample_images in images for image in sample_images]
        return Batch(ids, mask, labels, flat)

    def encode_prompt(
        self, conversation: list[Message], images: Sequence[Image.Image]
    ) -> tuple[Encoded, list[torch.Tensor]]:
        """A conversation as a prompt to answer (generation prompt added) and its image tensors: what a
        request is encoded into once, then batched, generated from and counted in usage."""
        pixels = self.preprocess_images(list(images))
        return self.encode(conversation, pixels, add_generation_prompt=True), pixels

    def batch_prompts(self, encoded: Sequence[Encoded], pixel_lists: Sequence[list[torch.Tensor]]) -> Batch:
        """Left-padded generation inputs from encoded prompts; a prompt that fills the context is refused."""
        for e in encoded:
            if len(e.input_ids) >= self.max_length:
                raise PromptTooLongError(
                    f"prompt is {len(e.input_ids)} tokens, over the context of {self.max_length} tokens"
                )
        batch = self.collate(list(encoded), list(pixel_lists), padding_side="left")
        batch.labels = None
        return batch

    def prompt_batch(
        self, conversations: list[list[Message]], images: list[list[Image.Image]]
    ) -> tuple[Batch, list[int]]:
        """Left-padded generation inputs; returns the batch and each prompt's length."""
        prepared = [self.encode_prompt(m, ims) for m, ims in zip(conversations, images, strict=True)]
        encoded = [e for e, _ in prepared]
        return self.batch_prompts(encoded, [p for _, p in prepared]), [len(e.input_ids) for e in encoded]
