"""Separable box filters by cumulative sums (O(N) whatever the window; conv3d with thin kernels is ~10× slower on CPU)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def box_sum(x: torch.Tensor, win: int) -> torch.Tensor:
    """Sum over a win³ box centred on each voxel of (B, C, D, H, W), zero padding outside.

    Each axis: pad (w//2 + 1, w//2) zeros, cumulative sum, difference of the sums w apart.
    """
    if win <= 1:
        return x
    p = win // 2
    for dim in (2, 3, 4):
        pad = [0, 0, 0, 0, 0, 0]
        i = (4 - dim) * 2  # F.pad lists the last axis first
        pad[i], pad[i + 1] = p + 1, p
        c = F.pad(x, pad).cumsum(dim)
        n = x.shape[dim]
        x = c.narrow(dim, win, n) - c.narrow(dim, 0, n)
    return x


def box_mean(x: torch.Tensor, win: int) -> torch.Tensor:
    """Average over a win³ box with zero padding (values fade towards 0 within win/2 of the border)."""
    return box_sum(x, win) / float(win ** 3) if win > 1 else x
