"""Projectors from vision features to the LLM's embedding space, chosen by a type string."""

from __future__ import annotations

import re

from torch import nn

from unillava.errors import ConfigError

_MLP = re.compile(r"^mlp(\d+)x_gelu$")


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """`linear`, `identity` or `mlp{N}x_gelu` (N linear layers with GELU between, as in LLaVA-1.5).

    Layers sit in an `nn.Sequential` so keys read `0.weight`, `2.weight`, ... like the original
    LLaVA `mm_projector`, which keeps checkpoint conversion a renaming.
    """
    if kind == "identity":
        if in_dim != out_dim:
            raise ConfigError(
                f"projector.type identity needs equal sizes, got vision {in_dim} and LLM {out_dim}"
            )
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    match = _MLP.match(kind)
    if match:
        depth = int(match.group(1))
        if depth < 1:
            raise ConfigError(f"projector.type {kind!r}: depth must be at least 1")
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        return nn.Sequential(*layers)
    raise ConfigError(f"projector.type: unknown {kind!r}; use linear, identity or mlp<N>x_gelu")
