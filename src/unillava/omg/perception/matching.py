"""Hungarian assignment without scipy, so transformers' `Mask2FormerLoss` runs on our dependencies.

transformers' Hungarian matcher calls scipy's `linear_sum_assignment`, and its loss refuses to build when
scipy is missing. scipy is not a unillava dependency, so we ship an exact solver (shortest augmenting
paths with potentials, O(n^2 m)) and hand it to transformers only when scipy is absent.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.models.mask2former import modeling_mask2former

_CLIP = 1e9  # matcher costs are O(10); NaN/inf become this so potentials keep their precision


def linear_sum_assignment(cost: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of a minimum-cost one-to-one assignment, rows ascending (scipy's contract)."""
    c = np.asarray(cost.detach().cpu().numpy() if isinstance(cost, torch.Tensor) else cost, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"cost must be 2-D, got shape {c.shape}")
    c = np.clip(np.nan_to_num(c, nan=_CLIP, posinf=_CLIP, neginf=-_CLIP), -_CLIP, _CLIP)
    transposed = c.shape[0] > c.shape[1]
    if transposed:
        c = c.T
    n, m = c.shape
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    owner = np.zeros(m + 1, dtype=np.int64)  # owner[j]: row (1-based) assigned to column j, 0 = free
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        owner[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = owner[j0]
            reduced = c[i0 - 1] - u[i0] - v[1:]
            free = ~used[1:]
            better = free & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            candidates = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(candidates)) + 1
            delta = candidates[j1 - 1]
            u[owner[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    cols = np.nonzero(owner[1:])[0]
    rows = owner[1:][cols] - 1
    if transposed:
        rows, cols = cols, rows
    order = np.argsort(rows, kind="stable")
    return rows[order].astype(np.int64), cols[order].astype(np.int64)


def install_fallback_solver() -> None:
    """Give transformers' matcher our solver when scipy is not installed (a no-op when it is)."""
    if not hasattr(modeling_mask2former, "linear_sum_assignment"):
        modeling_mask2former.linear_sum_assignment = linear_sum_assignment
