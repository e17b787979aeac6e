"""Identity grids (the voxel ↔ grid_sample conversion is in ``warp.warp`` / ``warp.sample_normalised``).

Tensors are (B, C, D, H, W) = (B, C, k, j, i). Voxel displacements have channel c along array axis c.
``torch.nn.functional.grid_sample`` wants (B, D, H, W, 3) with the last axis in (x, y, z) = (i, j, k) order,
normalised to [-1, 1] with ``align_corners=True`` (−1 and +1 are the centres of the first and last voxel).
"""
from __future__ import annotations

import torch


def identity_vox(shape: tuple[int, ...], device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, 3, D, H, W) voxel coordinates along the array axes (channel c = index along axis c)."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)[None]
