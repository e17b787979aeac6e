"""Warping images and fields by a voxel displacement ("pull": out(x) = image(x + u(x)))."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .grid import identity_vox


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
    shape = disp_vox.shape[2:]
    coords = identity_vox(shape, disp_vox.device, disp_vox.dtype) + disp_vox
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape], device=disp_vox.device, dtype=disp_vox.dtype)
    return sample_normalised(image, coords * scale.view(1, 3, 1, 1, 1) - 1.0, mode, padding)


def sample_normalised(image: torch.Tensor, points: torch.Tensor, mode: str = "bilinear",
                      padding: str = "border") -> torch.Tensor:
    """Sample ``image`` (B, C, D, H, W) at ``points`` (B, 3, D', H', W') given in the normalised frame of the image's
    grid: channel c along array axis c, −1 and +1 the centres of its first and last voxel (align_corners=True).

    ``warp`` comes here after converting x + u(x) to that frame; a method whose state already lives in it (NODEO's
    q) samples directly, without building the identity grid and converting back and forth on every iteration.
    "nearest" keeps an integer image's dtype."""
    grid = points.flip(1).permute(0, 2, 3, 4, 1)        # grid_sample wants (B, D', H', W', 3) in x, y, z order
    src = image if image.is_floating_point() else image.to(points.dtype)
    if grid.shape[0] != src.shape[0]:
        grid = grid.expand(src.shape[0], *grid.shape[1:])
    out = F.grid_sample(src.to(grid.dtype), grid, mode=mode, padding_mode=padding, align_corners=True)
    return out if image.is_floating_point() else out.round().to(image.dtype)


def compose(disp_outer: torch.Tensor, disp_inner: torch.Tensor) -> torch.Tensor:
    """Displacement of (id + u_outer) ∘ (id + u_inner): x ↦ x + u_inner(x) + u_outer(x + u_inner(x))."""
    return disp_inner + warp(disp_outer, disp_inner, padding="border")
