"""VoxelMorph-diff model pieces shared by training (train/loop.py) and inference (methods/vxm_diff.py).

Grids: the network sees (moving, fixed) on a grid whose sizes are multiples of 2**len(enc); it predicts the
velocity on the ½-resolution grid; exp(v) is integrated there by scaling and squaring and the displacement is
then resized to the full grid (values rescaled to the full grid's voxel units, ``field.resize_disp``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..field import integrate_ss, resize_disp, warp
from ..losses.kl import kl_laplacian, recon_mse
from .unet import DEFAULT_DEC, DEFAULT_ENC, VxmDiffUNet

DEFAULT_CONFIG: dict[str, Any] = {
    "arch": "vxm-diff-unet", "enc": list(DEFAULT_ENC), "dec": list(DEFAULT_DEC), "int_steps": 7,
    "image_sigma": 0.02, "prior_lambda": 20.0, "spacing_mm": 2.0, "dice_weight": 0.0, "dice_grid": "full",
}


def build_net(config: dict[str, Any]) -> VxmDiffUNet:
    return VxmDiffUNet(config.get("enc", DEFAULT_ENC), config.get("dec", DEFAULT_DEC))


def velocity_to_disp(v_half: torch.Tensor, full_shape: tuple[int, int, int], steps: int = 7) -> torch.Tensor:
    """v_half: (B, 3, d, h, w) SVF in ½-grid voxels → (B, 3, *full_shape) displacement of exp(v) in full-grid voxels."""
    return resize_disp(integrate_ss(v_half, steps), tuple(full_shape))


def sample_velocity(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Reparameterised sample z = μ + exp(logvar/2)·ε (training)."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def soft_dice_loss(fixed_lab: torch.Tensor, moving_lab: torch.Tensor, disp: torch.Tensor,
                   labels: list[int]) -> torch.Tensor:
    """1 − mean soft Dice of the one-hot moving labels warped (trilinear) by ``disp`` vs the fixed labels.

    ``disp`` is on the label grid, or on a grid half its size in every axis (the ½-resolution grid of the velocity,
    voxel units of that grid): then both one-hot maps are first averaged over 2×2×2 blocks (label fractions), which
    makes the warp — the costly part of a training step — 8× cheaper."""
    mo = torch.cat([(moving_lab == l).float() for l in labels], dim=1)
    fo = torch.cat([(fixed_lab == l).float() for l in labels], dim=1)
    if tuple(disp.shape[2:]) != tuple(mo.shape[2:]):
        mo, fo = F.avg_pool3d(mo, 2), F.avg_pool3d(fo, 2)
        if tuple(disp.shape[2:]) != tuple(mo.shape[2:]):
            raise ValueError(f"soft_dice_loss() disp grid {tuple(disp.shape[2:])} is neither the label grid "
                             f"{tuple(fixed_lab.shape[2:])} nor half of it")
    wo = warp(mo, disp)
    inter = (wo * fo).sum(dim=(2, 3, 4))
    den = wo.sum(dim=(2, 3, 4)) + fo.sum(dim=(2, 3, 4))
    return 1.0 - (2 * inter / den.clamp_min(1e-6)).mean()


def training_step_loss(net: VxmDiffUNet, moving: torch.Tensor, fixed: torch.Tensor, config: dict[str, Any],
                       generator: torch.Generator | None = None, fixed_lab: torch.Tensor | None = None,
                       moving_lab: torch.Tensor | None = None, dice_labels: list[int] | None = None
                       ) -> dict[str, torch.Tensor]:
    """Negative ELBO for one pair (one sample, K = 1): recon_mse(f, m∘φ_z)/σ² + KL, plus an optional Dice term."""
    mu, logvar = net(moving, fixed)
    z = sample_velocity(mu, logvar, generator)
    u_half = integrate_ss(z, config["int_steps"])
    disp = resize_disp(u_half, tuple(fixed.shape[2:]))
    warped = warp(moving, disp)
    recon = recon_mse(fixed, warped, config["image_sigma"])
    kl = kl_laplacian(mu, logvar, config["prior_lambda"])
    loss = recon + kl
    out = {"recon": recon, "kl": kl}
    if config.get("dice_weight", 0) > 0 and fixed_lab is not None and dice_labels:
        dl = soft_dice_loss(fixed_lab, moving_lab, u_half if config.get("dice_grid") == "half" else disp, dice_labels)
        loss = loss + config["dice_weight"] * dl
        out["dice_loss"] = dl
    out["loss"] = loss
    return out
