"""Tiny model configs for tests, examples and smoke runs: real code paths, seconds on a CPU."""

from __future__ import annotations

from typing import Any

from accelerate.state import AcceleratorState, GradientState

from unillava.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from unillava.llm import EMBEDDED_DEFAULT


def tiny_clip_config(image_size: int = 32, patch_size: int = 8, hidden_size: int = 32) -> dict[str, Any]:
    return {
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
    }


def tiny_llama_config(vocab_size: int = 49152, hidden_size: int = 64) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab_size,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
    }


def tiny_model_config(template: str = "auto", projector: str = "mlp2x_gelu", **vision: Any) -> ModelConfig:
    """A random tiny CLIP + tiny Llama with the embedded default's tokenizer (SmolLM2, ChatML)."""
    return ModelConfig(
        vision=VisionConfig(hf_config=tiny_clip_config(), image_size=32, **vision),
        projector=ProjectorConfig(type=projector),
        llm=LLMConfig(pretrained=None, tokenizer=EMBEDDED_DEFAULT, hf_config=tiny_llama_config()),
        template=template,
        max_length=512,
    )


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state (mixed precision, gradient accumulation), so the next
    Trainer in the same process (tests, notebooks) starts from scratch."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
