"""Uncertainty maps of VoxelMorph-diff: the standard deviation of the displacement, in mm, per voxel.

Two estimates of the posterior over the stationary velocity v (½-resolution grid, ½-grid voxel units):

``laplace`` (the default) — the posterior of the model's own objective for *this* pair, approximated at the predicted
mean μ (diagonal Laplace approximation). The training objective, per ½-grid voxel and component c, with the
reference code's mean normalisation (losses/kl.py: the KL is 1.5·mean over 3·N½ elements, the image term a mean
over N = 8·N½ full voxels) is, for a Gaussian q with variance s,

    ½·(λ·D·s − log s)  +  s · g_c² / σ²        g_c = ∂(m∘φ)/∂v_c (per ½-grid voxel), σ = image noise

whose minimum is at 1/s = λ·D + 2·g_c²/σ²: the prior's precision (Laplacian prior, D = 6-neighbour degree) plus
the data's. The model assumes one global σ (0.02); a registration that is wrong somewhere leaves a residual
there, so σ is re-estimated locally, σ_loc² = σ² + box-mean((f − m∘φ)²) over 5³ voxels — i.e. the maximum
likelihood noise level of the Gaussian likelihood in that neighbourhood. Where the images agree and edges are
strong, the velocity is pinned (small s); where they disagree or nothing constrains the velocity (flat regions),
s grows towards the prior's 1/(λ·D). The map is √(Σ_c s_c·mm_c²) (exp(v) ≈ id + v to first order).

``sampled`` — the network's own amortised posterior q = N(μ, exp(logvar)) as in the paper: S samples of the
velocity are integrated and the map is √trace of the sample covariance of the displacement (S = 0: the
velocity variance exp(logvar) itself, no integration). With the bundled weights this map is high in flat regions
and low at edges, and it does not rise with the registration error (docs/benchmarks.md); it is kept for study.

All tensors are in the network's canonical array order; ``mm_per_half_vox`` (3,) gives the physical size of a
½-grid voxel along each canonical axis. Returns (1, 1, d, h, w) on the ½ grid; the caller resizes it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..field import integrate_ss, warp
from ..field.filters import box_sum
from ..losses.kl import degree_map

RESIDUAL_WINDOW = 5          # box window (net-grid voxels) of the local noise estimate, ≈ Gaussian σ 1.4 voxels


def _local_mean(x: torch.Tensor, win: int) -> torch.Tensor:
    """Box mean over win³ that divides by the number of voxels inside the grid (no fading at the border)."""
    return box_sum(x, win) / box_sum(torch.ones_like(x[:, :1]), win)


def laplace_std_mm(mu: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor, disp_net: torch.Tensor,
                   prior_lambda: float, image_sigma: float, mm_per_half_vox: torch.Tensor) -> torch.Tensor:
    """Diagonal Laplace posterior std of the displacement (mm) on the ½ grid.

    mu: (1, 3, d, h, w) velocity mean (½-grid voxels); fixed, moving: (1, 1, D, H, W) net-grid images in [0, 1];
    disp_net: (1, 3, D, H, W) displacement exp(μ) on the net grid (net-grid voxels).
    """
    half = tuple(mu.shape[2:])
    warped = warp(moving, disp_net)
    resid2 = _local_mean((fixed - warped) ** 2, RESIDUAL_WINDOW)
    # gradient of the warped moving image per net-grid voxel, then per ½-grid voxel (net/½ size ratio per axis)
    grads = torch.stack(torch.gradient(warped[0, 0]), 0)[None]
    ratio = torch.tensor([(n - 1) / max(h - 1, 1) for n, h in zip(fixed.shape[2:], half)],
                         dtype=mu.dtype, device=mu.device).view(1, 3, 1, 1, 1)
    g2 = _local_mean(grads ** 2, RESIDUAL_WINDOW) * ratio ** 2
    data_prec = F.interpolate(2.0 * g2 / (image_sigma ** 2 + resid2), size=half, mode="trilinear",
                              align_corners=True)
    prec = prior_lambda * degree_map(half, mu.device, mu.dtype) + data_prec
    var_mm2 = (mm_per_half_vox.view(1, 3, 1, 1, 1) ** 2) / prec
    return torch.sqrt(var_mm2.sum(1, keepdim=True))


def sampled_std_mm(mu: torch.Tensor, logvar: torch.Tensor, samples: int, steps: int, seed: int,
                   mm_per_half_vox: torch.Tensor) -> torch.Tensor:
    """Std of the displacement (mm) under the network's q = N(μ, exp(logvar)), on the ½ grid (see module doc)."""
    std = torch.exp(0.5 * logvar)
    if samples <= 0:
        var = std * std
    else:
        g = torch.Generator(device=mu.device).manual_seed(int(seed))
        u0 = integrate_ss(mu, steps)
        s1, s2 = torch.zeros_like(u0), torch.zeros_like(u0)
        for _ in range(samples):
            u = integrate_ss(mu + std * torch.randn(mu.shape, generator=g, device=mu.device), steps) - u0
            s1 += u
            s2 += u * u
        var = (s2 / samples - (s1 / samples) ** 2).clamp_min(0)
    return torch.sqrt((var * mm_per_half_vox.view(1, 3, 1, 1, 1) ** 2).sum(1, keepdim=True))
