"""Jacobian determinant of x ↦ x + u(x).

det ∇φ is invariant to the voxel → mm change of frame when computed consistently: for a voxel displacement
d on a grid with direction D and spacing S, u_lps = D·S·d and det(I + ∂u_lps/∂x) = det(I + ∂d/∂ijk).
So one implementation in voxel units serves physical fields too (convert with frames.vox_from_lps_disp).
"""
from __future__ import annotations

from typing import Callable

import torch


def _gradients(disp_vox: torch.Tensor, mode: str) -> list[list[torch.Tensor]]:
    """g[a][b] = ∂u_a/∂x_b, each (B, D', H', W')."""
    if mode == "central":  # np.gradient semantics: central inside, one-sided at the edges
        grads = [torch.gradient(disp_vox[:, a], dim=(1, 2, 3)) if min(disp_vox.shape[2:]) > 1 else None
                 for a in range(3)]
        if grads[0] is None:
            raise ValueError("jacobian_det(): every axis needs at least 2 voxels")
        return [[grads[a][b] for b in range(3)] for a in range(3)]
    if mode == "forward":  # (D−1, H−1, W−1) grid, as R2Net / NODEO losses use
        u = disp_vox
        d = [u[:, :, 1:, :-1, :-1] - u[:, :, :-1, :-1, :-1],
             u[:, :, :-1, 1:, :-1] - u[:, :, :-1, :-1, :-1],
             u[:, :, :-1, :-1, 1:] - u[:, :, :-1, :-1, :-1]]
        return [[d[b][:, a] for b in range(3)] for a in range(3)]
    raise ValueError(f"jacobian_det(): unknown mode {mode!r}")


def jacobian_det(disp_vox: torch.Tensor, mode: str = "central") -> torch.Tensor:
    """det(I + ∇u) for a voxel displacement (B, 3, D, H, W); returns (B, D, H, W) (forward: one smaller per axis)."""
    g = _gradients(disp_vox, mode)
    a = [[g[r][c] + (1.0 if r == c else 0.0) for c in range(3)] for r in range(3)]
    return (a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
            - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
            + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]))


def jacobian_det_slabs(read: Callable[[int, int], torch.Tensor], n: int, slab: int = 32) -> torch.Tensor:
    """``jacobian_det(u)`` (central differences) of a field read ``slab`` planes of axis 2 at a time, each with a
    one-plane halo: the same numbers as one pass (central differences reach one plane; the grid's own first and
    last planes keep their one-sided ones), but the nine derivative arrays of a large grid never exist at once and
    the field itself need never be whole (``read`` may make each slab on demand, e.g. interpolate a coarse field).

    ``read(lo, hi)`` → (B, 3, hi − lo, H, W) voxel displacement of planes lo … hi − 1; ``n``: planes in all.
    Returns (B, n, H, W) in the dtype and device of what ``read`` gives."""
    out = None
    for k0 in range(0, n, slab):
        k1 = min(k0 + slab, n)
        lo, hi = max(k0 - 1, 0), min(k1 + 1, n)          # halo plane on each side, inside the grid
        det = jacobian_det(read(lo, hi))[:, k0 - lo:k1 - lo]
        if out is None:
            out = torch.empty((det.shape[0], n) + tuple(det.shape[2:]), dtype=det.dtype, device=det.device)
        out[:, k0:k1] = det
    return out
