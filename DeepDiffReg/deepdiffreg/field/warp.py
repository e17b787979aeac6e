"""Warping images and fields by a voxel displacement ("pull": out(x) = image(x + u(x)))."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .grid import identity_vox, vox_to_sample_grid


def warp(image: torch.Tensor, disp_vox: torch.Tensor, mode: str = "bilinear", padding: str = "border") -> torch.Tensor:
    """Sample ``image`` at x + u(x).

    Args:
        image: (B, C, D, H, W) on the same grid as ``disp_vox`` (or any grid of the same shape).
        disp_vox: (B, 3, D, H, W) voxel displacement, channel c along array axis c.
        mode: "bilinear" (trilinear in 3D) or "nearest" (labels; keeps the dtype).
        padding: "border" (replicate the edge), "zeros" or "reflection".
    Returns:
        (B, C, D, H, W) warped image with ``image``'s dtype.
    """
    if image.shape[2:] != disp_vox.shape[2:]:
        raise ValueError(f"warp(): image grid {tuple(image.shape[2:])} != field grid {tuple(disp_vox.shape[2:])}")
    coords = identity_vox(disp_vox.shape[2:], disp_vox.device, disp_vox.dtype) + disp_vox
    grid = vox_to_sample_grid(coords)
    src = image if image.is_floating_point() else image.to(disp_vox.dtype)
    if grid.shape[0] != src.shape[0]:
        grid = grid.expand(src.shape[0], *grid.shape[1:])
    out = F.grid_sample(src.to(grid.dtype), grid, mode=mode, padding_mode=padding, align_corners=True)
    return out if image.is_floating_point() else out.round().to(image.dtype)


def compose(disp_outer: torch.Tensor, disp_inner: torch.Tensor) -> torch.Tensor:
    """Displacement of (id + u_outer) ∘ (id + u_inner): x ↦ x + u_inner(x) + u_outer(x + u_inner(x))."""
    return disp_inner + warp(disp_outer, disp_inner, padding="border")
