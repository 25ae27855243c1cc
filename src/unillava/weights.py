"""Reading weights (safetensors or torch pickles, sharded or not) and checking a state dict against a
model before loading: a half-loaded model still runs, silently wrong. Every tower and checkpoint layout
reads its files through here."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from unillava.errors import CheckpointError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# Looked for in this order in a checkpoint directory.
WEIGHT_FILES = (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX)


def key_list(keys: list[str], limit: int = 8) -> str:
    """`a, b, c, ... (N in all)`: enough keys to act on, short enough for one error line."""
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_state_dict(
    own: Mapping[str, Any], state: Mapping[str, Any], source: str, optional: Collection[str] = ()
) -> None:
    """Raise CheckpointError naming missing, unused and misshapen keys; `optional` keys may be absent."""
    missing = sorted(k for k in own if k not in state and k not in optional)
    unused = sorted(k for k in state if k not in own)
    if missing or unused:
        raise CheckpointError(
            f"{source}: {len(missing)} missing key(s) [{key_list(missing)}], "
            f"{len(unused)} unused key(s) [{key_list(unused)}]"
        )
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape
    ]
    if wrong:
        raise CheckpointError(f"{source}: shape mismatch (checkpoint vs model): {key_list(wrong)}")


def read_json(file: Path) -> dict[str, Any]:
    """A JSON object from a checkpoint's `file`, or a CheckpointError naming it."""
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: cannot read ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


def has_weights(path: Path, names: Sequence[str] = WEIGHT_FILES) -> bool:
    """Whether directory `path` holds one of the weights files `names`."""
    return any((path / name).is_file() for name in names)


def read_state_dict(source: str | Path, names: Sequence[str] = WEIGHT_FILES) -> dict[str, torch.Tensor]:
    """Tensors from a weights file, a shard index, or a directory holding one of `names` (first found).

    Torch pickles are read with `weights_only=True`, so a pickle that would run code is refused.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return read_state_dict(path / name)
        found = sorted(p.name for p in path.iterdir())[:12]
        raise CheckpointError(
            f"{path}: no weights file (looked for {', '.join(names)}); found: {', '.join(found) or 'nothing'}"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.name.endswith(".index.json"):
        return read_sharded(path)
    return read_weights_file(path)


def read_weights_file(file: Path) -> dict[str, torch.Tensor]:
    """One `.safetensors` or torch-pickle file; a `{"state_dict": ...}` wrapper and DDP's `module.`
    prefixes are unwrapped, entries that are not tensors (epoch counters, optimiser state) dropped."""
    try:
        if file.suffix == ".safetensors":
            return load_file(str(file))
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as err:
        message = " ".join(str(err).split())[:300]
        raise CheckpointError(f"{file}: cannot read weights ({message})") from None
    except Exception as err:  # torch raises many types for a bad pickle; all mean the same here
        raise CheckpointError(f"{file}: cannot read weights ({type(err).__name__}: {err})") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    tensors = (
        {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if isinstance(state, Mapping)
        else {}
    )
    if not tensors:
        raise CheckpointError(f"{file}: not a mapping of tensor names to tensors")
    return tensors


def read_sharded(index_file: Path) -> dict[str, torch.Tensor]:
    """The tensors of every shard named by a `*.index.json`, each indexed tensor checked present."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_file}: malformed index ({err})") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_file = index_file.parent / shard
        if not shard_file.is_file():
            raise CheckpointError(f"{index_file}: shard {shard} is missing")
        state.update(read_weights_file(shard_file))
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise CheckpointError(
            f"{index_file}: {len(absent)} indexed tensor(s) not in their shards: {absent[:5]}"
        )
    return state
