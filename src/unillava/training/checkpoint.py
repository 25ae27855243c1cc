"""Training checkpoints: safetensors files written to a temp dir and renamed into place, then `latest`.

A run killed at any moment leaves either the old or the new checkpoint complete and loadable: files are
written into `checkpoints/.tmp-step-N` (same parent, so the rename is atomic), fsynced, the directory is
renamed to `step-N`, and only then is the `latest` pointer replaced (write `latest.tmp`, `os.replace`).
`trainer_state.json` is written last, so a directory without it is never taken as a checkpoint.

Layout of `step-N/`:
  trainable.safetensors        weights with requires_grad (projector, LoRA, LLM, ... by name)
  optimizer.safetensors/.json  optimizer tensors / the rest of its state dict (param groups, counters)
  scheduler.json               LR scheduler state
  rng-<rank>.safetensors/.json torch (CPU, CUDA) / python and numpy RNG states of each process
  trainer_state.json           step, epoch, samples consumed, and the settings a resume must match
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from unillava.errors import CheckpointError

STATE_NAME = "trainer_state.json"
LATEST_NAME = "latest"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def fsync_path(path: Path) -> None:
    """Flush a file or directory to disk so a rename after it cannot expose half-written data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2))
    fsync_path(path)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"}
    )
    fsync_path(path)


# -- pieces of state ------------------------------------------------------------------------------


def split_state_dict(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict as (flat tensors, JSON rest); `join_state_dict` is the inverse."""
    tensors: dict[str, torch.Tensor] = {}
    per_param: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        plain: dict[str, Any] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                plain[key] = value
        per_param[str(index)] = plain
    return tensors, {"state": per_param, "param_groups": state["param_groups"]}


def join_state_dict(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(index): dict(values) for index, values in rest["state"].items()}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    groups = [dict(group) for group in rest["param_groups"]]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_rng(directory: Path, rank: int) -> None:
    tensors, plain = rng_state()
    write_tensors(directory / f"rng-{rank}.safetensors", tensors)
    write_json(directory / f"rng-{rank}.json", plain)


def load_rng(directory: Path, rank: int) -> bool:
    """Restore this process's RNG states; False if the checkpoint has none for this rank."""
    tensors_file, plain_file = directory / f"rng-{rank}.safetensors", directory / f"rng-{rank}.json"
    if not (tensors_file.is_file() and plain_file.is_file()):
        return False
    set_rng_state(load_file(str(tensors_file)), json.loads(plain_file.read_text()))
    return True


# -- directories ---------------------------------------------------------------------------------


class CheckpointDir:
    """The `checkpoints/` folder of a run: staging, publishing, finding and pruning checkpoints."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def staging(self, step: int) -> Path:
        """A fresh temp dir for `step`, in the same parent as the final one (deterministic: every rank writes)."""
        return self.root / f"{TMP_PREFIX}{step_dir_name(step)}"

    def begin(self, step: int) -> Path:
        """Main process: create an empty staging dir for `step`, removing leftovers of a crashed attempt."""
        path = self.staging(step)
        self.root.mkdir(parents=True, exist_ok=True)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir()
        return path

    def publish(self, step: int) -> Path:
        """Main process: rename the complete staging dir into place, then point `latest` at it."""
        staging = self.staging(step)
        if not (staging / STATE_NAME).is_file():
            raise CheckpointError(f"{staging}: incomplete, {STATE_NAME} missing")
        fsync_path(staging)
        final = self.root / step_dir_name(step)
        if final.exists():
            old = self.root / f"{TMP_PREFIX}old-{final.name}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old)
        else:
            os.replace(staging, final)
        fsync_path(self.root)
        pointer = self.root / f"{LATEST_NAME}.tmp"
        pointer.write_text(final.name + "\n")
        fsync_path(pointer)
        os.replace(pointer, self.root / LATEST_NAME)
        fsync_path(self.root)
        return final

    def complete(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as (step, dir), oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and (path / STATE_NAME).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint: `latest` if it is complete, or a newer complete one if the pointer
        update was cut short."""
        candidates = self.complete()
        pointer = self.root / LATEST_NAME
        if pointer.is_file():
            named = self.root / pointer.read_text().strip()
            match = _STEP_DIR.match(named.name)
            if match and (named / STATE_NAME).is_file():
                candidates.append((int(match.group(1)), named))
        return max(candidates)[1] if candidates else None

    def prune(self, keep_last: int | None) -> None:
        """Delete all but the newest `keep_last` complete checkpoints and any stale staging dirs."""
        if self.root.is_dir():
            for path in self.root.iterdir():
                if path.name.startswith(TMP_PREFIX) and path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
        if keep_last is None:
            return
        for _, path in self.complete()[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)


def read_trainer_state(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{directory / STATE_NAME}: unreadable ({err})") from None
