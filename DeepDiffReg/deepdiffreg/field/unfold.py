"""Remove the few folds a displacement field has, changing it only around them.

A learned integrator (R2Net's LC blocks) does not guarantee det ∇φ > 0 the way scaling and squaring of a smooth
velocity nearly does: on real pairs a trained R2Net leaves a few hundred isolated folded voxels (0.02–0.06 % of a
2 mm brain, docs/r2net.md). A clinician asked for a fold-free, invertible transform; this makes it one with the
smallest local change we know how to make: where det(I + ∇u) < ``min_det``, and in a ``radius``-voxel shell around
those voxels, u is replaced by its 3×3×3 local mean, and that is repeated until no voxel is below ``min_det`` (the
shell grows by one voxel every ``grow_every`` rounds, for folds that one shell cannot smooth out). Voxels far from
every fold keep their value bit for bit, and a field without folds is returned unchanged (the same tensor).

Frames: (B, 3, D, H, W) in voxel units of its grid, channel c along array axis c (the ``field`` convention); the
determinant is ``jacobian_det``'s central differences, the same as the pipeline's Jacobian map, and it does not
depend on the voxel size (docs in field/jacobian.py).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .jacobian import jacobian_det


def unfold(disp_vox: torch.Tensor, min_det: float = 0.05, max_rounds: int = 200, radius: int = 1,
           grow_every: int = 25) -> tuple[torch.Tensor, dict[str, Any]]:
    """(field, info): ``disp_vox`` with every voxel's det(I + ∇u) ≥ ``min_det`` where that was reached in
    ``max_rounds`` rounds of local averaging (see the module docstring), and info (JSON-able): folded voxels
    (det ≤ 0) before and after, voxels below ``min_det`` after, rounds, voxels changed and the largest change
    (voxels). The input is not modified."""
    if disp_vox.dim() != 5 or disp_vox.shape[1] != 3:
        raise ValueError(f"unfold(): expected a (B, 3, D, H, W) displacement, got {tuple(disp_vox.shape)}")
    det = jacobian_det(disp_vox)
    info: dict[str, Any] = {"min_det": float(min_det), "folded_before": int((det <= 0).sum()),
                            "below_min_before": int((det < min_det).sum())}
    u = disp_vox
    changed = torch.zeros((disp_vox.shape[0], 1) + tuple(disp_vox.shape[2:]), dtype=torch.bool,
                          device=disp_vox.device)
    rounds = 0
    while rounds < max_rounds:
        bad = (det < min_det)[:, None]
        if not bool(bad.any()):
            break
        r = radius + rounds // grow_every
        region = F.max_pool3d(bad.to(u.dtype), 2 * r + 1, stride=1, padding=r) > 0
        mean = F.avg_pool3d(u, 3, stride=1, padding=1, count_include_pad=False)
        u = torch.where(region, mean, u)
        changed |= region
        det = jacobian_det(u)
        rounds += 1
    info.update(rounds=rounds, folded_after=int((det <= 0).sum()), below_min_after=int((det < min_det).sum()),
                voxels_changed=int(changed.sum()),
                max_change_vox=float((u - disp_vox).norm(dim=1).max()) if rounds else 0.0)
    return u, info
