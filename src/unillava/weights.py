"""Checking a state dict against a model before loading: a half-loaded model still runs, silently wrong."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from unillava.errors import CheckpointError


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
