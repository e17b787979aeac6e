"""Image similarity losses on (B, 1, D, H, W) tensors on the same grid (lower is better)."""
from __future__ import annotations

import torch

from ..field.filters import box_sum as _box_sum


class LocalNCC:
    """Local normalised cross-correlation against one fixed image in a win³ window (VoxelMorph / NODEO form), the
    fixed image's window sums and variance computed once: an optimisation loop (NODEO) compares many moving images
    with the same fixed one, and 2 of the 5 box sums are the fixed image's. ``fixed`` (B, 1, D, H, W) must not
    change (nor need gradients) while the object is in use; ``mask`` the same shape or None.
    """

    def __init__(self, fixed: torch.Tensor, win: int = 9, eps: float = 1e-5, mask: torch.Tensor | None = None):
        if win % 2 == 0:
            raise ValueError("local_ncc(): window must be odd")
        self.fixed, self.win, self.eps, self.mask = fixed, win, eps, mask
        self.n = float(win ** 3)
        self.s_f = _box_sum(fixed, win)
        # variances are clamped at 0 so round-off cannot make them negative (a known NaN source)
        self.var_f = (_box_sum(fixed * fixed, win) - self.s_f * self.s_f / self.n).clamp_min(0)

    def __call__(self, moving: torch.Tensor, squared: bool = True) -> torch.Tensor:
        """The mean of cc² (``squared``) or cc over voxels (inside ``mask`` if given), in [0, 1] / [-1, 1]."""
        s_m = _box_sum(moving, self.win)
        s_mm, s_fm = _box_sum(moving * moving, self.win), _box_sum(self.fixed * moving, self.win)
        cross = s_fm - self.s_f * s_m / self.n
        var_m = (s_mm - s_m * s_m / self.n).clamp_min(0)
        cc = (cross * cross / (self.var_f * var_m + self.eps) if squared
              else cross / torch.sqrt(self.var_f * var_m + self.eps))
        if self.mask is not None:
            return (cc * self.mask).sum() / self.mask.sum().clamp_min(1)
        return cc.mean()


def local_ncc(fixed: torch.Tensor, moving: torch.Tensor, win: int = 9, eps: float = 1e-5,
              squared: bool = True, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean local normalised cross-correlation in a win³ window (LocalNCC, for one pair of images).

    Returns the mean of cc² (``squared``) or cc over voxels (inside ``mask`` if given), in [0, 1] / [-1, 1].
    """
    return LocalNCC(fixed, win, eps, mask)(moving, squared)


def ncc_loss(fixed, moving, win: int = 9, eps: float = 1e-5, mask=None) -> torch.Tensor:
    """1 − mean squared local NCC (NODEO's L_sim; VoxelMorph uses −NCC, the same up to a constant)."""
    return 1.0 - local_ncc(fixed, moving, win=win, eps=eps, squared=True, mask=mask)


def mse(fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    sq = (fixed - moving) ** 2
    if mask is not None:
        return (sq * mask).sum() / mask.sum().clamp_min(1)
    return sq.mean()
