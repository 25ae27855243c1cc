"""Decoding helpers shared by `InferenceModel` and the server's batcher, so both sample, autocast and cut
at stop strings the same way (the server's answers must equal the Python API's).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from unillava.errors import UnillavaError
from unillava.modeling import LlavaModel
from unillava.processor import Processor


def sampling_kwargs(temperature: float, top_p: float) -> dict[str, Any]:
    """`generate`'s sampling arguments: greedy at temperature 0 (with the sampling fields cleared, so a
    checkpoint's generation_config cannot turn sampling back on), otherwise nucleus sampling, top-k off."""
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def autocast(model: LlavaModel) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast for a bf16 model, so tensors made in float32 on the way (image features, masks)
    meet its bf16 weights without dtype errors; nothing for other dtypes."""
    if model.dtype != torch.bfloat16:
        return contextlib.nullcontext()
    return torch.autocast(model.device.type, dtype=torch.bfloat16)


def stop_index(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in `text`, or -1 (empty stop strings never match)."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to (not including) its earliest stop string: the answer OpenAI's `stop` asks for."""
    cut = stop_index(text, stops)
    return text[:cut] if cut >= 0 else text


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still grow into a stop string, so must not be streamed yet."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def seed_sampling(seed: int | None) -> None:
    """Seed torch's generator when a request asks for reproducible sampling (`seed`)."""
    if seed is not None:
        torch.manual_seed(seed)


@dataclass
class GenerationSettings:
    """One request's decoding settings, checked before the model runs."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def generate_kwargs(self, processor: Processor) -> dict[str, Any]:
        """`generate` arguments: the processor's end-of-turn ids end a row, stop strings end it too."""
        if self.max_new_tokens < 1:
            raise UnillavaError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UnillavaError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UnillavaError(f"top_p must be in (0, 1], got {self.top_p}")
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "eos_token_id": processor.stop_token_ids,
            "pad_token_id": processor.tokenizer.pad_token_id,
            **sampling_kwargs(self.temperature, self.top_p),
        }
        if self.stop:
            kwargs.update(stop_strings=list(self.stop), tokenizer=processor.tokenizer)
        return kwargs
