"""Between image pixels and the segmenter's padded square input (`pad` mode: centred, then resized).

Ground-truth masks and visual prompts go into the square frame; predicted mask logits come back out of
it at the image's own size, so masks line up with the picture the user sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PadGeometry:
    """Where a width x height image sits in its `size` x `size` input: square side, offsets, scale."""

    width: int
    height: int
    size: int

    @property
    def side(self) -> int:
        return max(self.width, self.height)

    @property
    def offset(self) -> tuple[int, int]:
        """(x, y) of the image's top-left corner in the unscaled square (as `expand_to_square` pastes)."""
        return ((self.side - self.width) // 2, (self.side - self.height) // 2)

    @property
    def scale(self) -> float:
        return self.size / self.side

    def box_to_input(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """An (x0, y0, x1, y1) box in image pixels -> input pixels."""
        ox, oy = self.offset
        x0, y0, x1, y1 = box
        s = self.scale
        return ((x0 + ox) * s, (y0 + oy) * s, (x1 + ox) * s, (y1 + oy) * s)

    def mask_to_input(self, mask: np.ndarray) -> torch.Tensor:
        """An (height, width) mask -> (size, size) float in the input frame (area-resampled, 0..1)."""
        ox, oy = self.offset
        square = torch.zeros(1, 1, self.side, self.side)
        square[0, 0, oy : oy + self.height, ox : ox + self.width] = torch.from_numpy(
            np.asarray(mask, dtype=np.float32)
        )
        if self.side == self.size:
            return square[0, 0]
        mode = "area" if self.side > self.size else "nearest"
        return F.interpolate(square, size=(self.size, self.size), mode=mode)[0, 0]

    def logits_to_image(self, logits: torch.Tensor) -> torch.Tensor:
        """(K, h, w) logits over the input square -> (K, height, width) over the image (bilinear)."""
        ox, oy = self.offset
        device, dtype = logits.device, torch.float32
        xs = (torch.arange(self.width, device=device, dtype=dtype) + 0.5 + ox) / self.side * 2 - 1
        ys = (torch.arange(self.height, device=device, dtype=dtype) + 0.5 + oy) / self.side * 2 - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (height, width, 2) as (x, y)
        grid = grid.unsqueeze(0).expand(logits.shape[0], -1, -1, -1)
        out = F.grid_sample(logits.float().unsqueeze(1), grid, mode="bilinear", align_corners=False)
        return out[:, 0]
