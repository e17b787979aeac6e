"""Resizing images and voxel displacement fields between grids that span the same physical box."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_image(image: torch.Tensor, size: tuple[int, int, int], mode: str = "trilinear") -> torch.Tensor:
    """(B, C, D, H, W) → (B, C, *size); corner voxels stay at the corners (align_corners=True)."""
    if tuple(image.shape[2:]) == tuple(size):
        return image
    if mode == "nearest":
        return F.interpolate(image, size=size, mode="nearest")
    return F.interpolate(image, size=size, mode=mode, align_corners=True)


def resize_disp(disp_vox: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Resize a voxel displacement field and rescale each channel to the new voxel units.

    With align_corners=True, one voxel of an axis of n voxels becomes (m−1)/(n−1) voxels on m voxels.
    """
    old = disp_vox.shape[2:]
    scale = torch.tensor([(m - 1) / max(n - 1, 1) for n, m in zip(old, size)], dtype=disp_vox.dtype,
                         device=disp_vox.device).view(1, 3, 1, 1, 1)
    return resize_image(disp_vox, size) * scale
