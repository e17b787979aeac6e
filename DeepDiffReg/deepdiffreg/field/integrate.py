"""Integration of stationary velocity fields (scaling and squaring) and fixed-point inversion."""
from __future__ import annotations

import torch

from .warp import warp


def integrate_ss(velocity_vox: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """exp(v) by scaling and squaring: u ← v / 2^steps, then ``steps`` times u ← u + u∘(id+u).

    Args:
        velocity_vox: (B, 3, D, H, W) stationary velocity in voxel units.
        steps: number of squarings (7 as in VoxelMorph / VoxelMorph-diff).
    Returns:
        (B, 3, D, H, W) displacement of φ = exp(v), voxel units. exp(−v) is its inverse.
    """
    disp = velocity_vox / (2 ** steps)
    for _ in range(steps):
        disp = disp + warp(disp, disp, padding="border")
    return disp


def invert_fixed_point(disp_vox: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Approximate inverse displacement w with (id+u)∘(id+w) ≈ id, by w ← −u∘(id+w).

    Converges where the map is a small-ish diffeomorphism (|∇u| < 1); used for methods without an analytic
    inverse (e.g. NODEO). Returns (B, 3, D, H, W) voxel units on the same grid.
    """
    inv = -disp_vox.clone()
    for _ in range(iterations):
        inv = -warp(disp_vox, inv, padding="border")
    return inv
