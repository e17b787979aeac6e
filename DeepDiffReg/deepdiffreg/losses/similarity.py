"""Image similarity losses on (B, 1, D, H, W) tensors on the same grid (lower is better)."""
from __future__ import annotations

import torch

from ..field.filters import box_sum as _box_sum


def local_ncc(fixed: torch.Tensor, moving: torch.Tensor, win: int = 9, eps: float = 1e-5,
              squared: bool = True, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean local normalised cross-correlation in a win³ window (VoxelMorph / NODEO form).

    Returns the mean of cc² (``squared``) or cc over voxels (inside ``mask`` if given), in [0, 1] / [-1, 1].
    Variances are clamped at 0 so round-off cannot make them negative (a known NaN source).
    """
    if win % 2 == 0:
        raise ValueError("local_ncc(): window must be odd")
    n = float(win ** 3)
    s_f, s_m = _box_sum(fixed, win), _box_sum(moving, win)
    s_ff, s_mm = _box_sum(fixed * fixed, win), _box_sum(moving * moving, win)
    s_fm = _box_sum(fixed * moving, win)
    cross = s_fm - s_f * s_m / n
    var_f = (s_ff - s_f * s_f / n).clamp_min(0)
    var_m = (s_mm - s_m * s_m / n).clamp_min(0)
    cc = cross * cross / (var_f * var_m + eps) if squared else cross / torch.sqrt(var_f * var_m + eps)
    if mask is not None:
        return (cc * mask).sum() / mask.sum().clamp_min(1)
    return cc.mean()


def ncc_loss(fixed, moving, win: int = 9, eps: float = 1e-5, mask=None) -> torch.Tensor:
    """1 − mean squared local NCC (NODEO's L_sim; VoxelMorph uses −NCC, the same up to a constant)."""
    return 1.0 - local_ncc(fixed, moving, win=win, eps=eps, squared=True, mask=mask)


def mse(fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    sq = (fixed - moving) ** 2
    if mask is not None:
        return (sq * mask).sum() / mask.sum().clamp_min(1)
    return sq.mean()
