"""Compact model directories: only what training changed, on top of named pretrained parts.

A trained unillava directory holds every weight (540 MB for SmolLM2-135M). When the tower and the LLM
came from sources any installation has (the embedded SmolLM2, torchvision's MobileNetV2 wheel, or a
local directory), a compact directory stores just the difference: the projector and other trained
tensors, the LoRA adapter (`adapter/`, as the trainer wrote it), and the rows of tokens added to the
vocabulary. `LlavaModel.from_pretrained` rebuilds the same weights bit for bit: base parts in the dtype
the run kept frozen weights in, the adapter merged in that dtype, then the stored tensors.

The export proves it before writing: every tensor it leaves out must equal the rebuilt base exactly.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from unillava.errors import CheckpointError
from unillava.modeling import ADAPTER_DIR, CONFIG_NAME, WEIGHTS_NAME, LlavaModel, model_class_for


def _stored_dtype(weights: Path, prefix: str) -> torch.dtype:
    """The dtype the full directory stores frozen weights of `prefix` in (what the run computed with)."""
    with safe_open(str(weights), "pt") as f:
        key = next((k for k in f.keys() if k.startswith(prefix) and k.endswith("norm.weight")), None)  # noqa: SIM118
        if key is None:
            raise CheckpointError(f"{weights}: no {prefix}*norm.weight tensor")
        return f.get_tensor(key).dtype


def export_compact(model_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the compact form of the unillava directory `model_dir` to `out`; returns what was stored."""
    src, out = Path(model_dir), Path(out)
    meta_file = src / CONFIG_NAME
    if not meta_file.is_file():
        raise CheckpointError(f"{src}: no {CONFIG_NAME}; compact export reads unillava directories")
    meta = json.loads(meta_file.read_text())
    if "base" in meta:
        raise CheckpointError(f"{src}: already compact")
    sources = meta.get("sources") or {}
    if not sources.get("vision") or not sources.get("llm"):
        raise CheckpointError(
            f"{meta_file}: sources {sources} do not name both pretrained parts (the tower's and the LLM's), so "
            "there is no base to store the difference from; keep the full directory"
        )
    full = LlavaModel.from_pretrained(src, dtype=torch.float32)
    has_adapter = (src / ADAPTER_DIR / "adapter_config.json").is_file()
    out.mkdir(parents=True, exist_ok=True)
    if has_adapter:
        _copy_lora_weights(src / ADAPTER_DIR, out / ADAPTER_DIR)
    base_dtype = _stored_dtype(src / WEIGHTS_NAME, "language_model.")
    base, vocab = model_class_for(full.config).build_base(
        copy.deepcopy(full.config),
        sources,
        full.tokenizer,
        base_dtype,
        out / ADAPTER_DIR if has_adapter else None,
    )
    base_state = base.state_dict()
    tied = set(full._tied_keys())
    stored: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    for key, value in full.state_dict().items():
        reference = base_state[key].to(torch.float32)
        if key in tied or torch.equal(value, reference):
            continue
        grown = _original_rows(key, vocab, value)
        if grown is not None and torch.equal(value[:grown], reference[:grown]):
            rows[key] = grown
            stored[key] = value[grown:].contiguous()
        else:
            stored[key] = value.contiguous()
    llm_keys = sorted(k for k in stored if k.startswith("language_model.") and k not in rows)
    if llm_keys:
        raise CheckpointError(
            f"{src}: {len(llm_keys)} LLM tensor(s) differ from {sources['llm']!r} + its adapter "
            f"(e.g. {llm_keys[0]}); the LLM was trained in full, so a compact copy would not be smaller"
        )
    save_file(stored, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    full.tokenizer.save_pretrained(out)
    meta["base"] = {
        "vision": sources["vision"],
        "llm": sources["llm"],
        "dtype": str(base_dtype).removeprefix("torch."),
        "adapter": ADAPTER_DIR if has_adapter else None,
        "rows": rows,
    }
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, default=str))
    return {
        "keys": sorted(stored),
        "mib": round(sum(v.numel() * v.element_size() for v in stored.values()) / 2**20, 2),
        "rows": rows,
        "adapter": has_adapter,
    }


def _copy_lora_weights(src: Path, dst: Path) -> None:
    """The adapter with its LoRA matrices only: peft also saves the whole embedding matrix of a model whose
    vocabulary grew (113 MB for SmolLM2), although LoRA never trains it; the new rows are stored instead."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "adapter_config.json", dst / "adapter_config.json")
    weights = src / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{src}: missing adapter_model.safetensors")
    with safe_open(str(weights), "pt") as f:
        lora = {k: f.get_tensor(k) for k in f.keys() if ".lora_" in k}  # noqa: SIM118
    save_file(lora, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})


def _original_rows(key: str, vocab: int, value: torch.Tensor) -> int | None:
    """For the embedding / LM-head matrices grown by added tokens: how many rows the base vocabulary has."""
    return vocab if ("embed_tokens" in key or "lm_head" in key) and value.shape[0] > vocab else None
