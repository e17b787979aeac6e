"""VoxelMorph-diff KL term with the Laplacian prior (reference-code normalisation, seed spec §3.3/§3.5).

KL(q‖p) for q = N(μ, diag exp(logvar)) and p = N(0, (λL)⁻¹), L the 6-neighbour graph Laplacian of the voxel grid:
    sigma_term = mean_{voxels, 3 comps}( λ·D·exp(logvar) − logvar )        D = degree (6 inside, 5/4/3 on the border)
    prec_term  = 0.5/3 · Σ_{d=1..3} mean( (μ[x+e_d] − μ[x])² )             forward differences, all 3 components
    KL         = 0.5 · 3 · ( sigma_term + λ · prec_term )
Every term is a mean over its own elements (as in voxelmorph ``losses.KL``), so λ and the image σ are the code's
values, not the paper's summed form. The image term is ``recon_mse`` = mean((f − m∘φ)²)/σ².
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def degree_map(shape: tuple[int, int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, 1, D, H, W) number of 6-neighbours of each voxel inside the grid (zero 'same' padding)."""
    filt = torch.zeros(1, 1, 3, 3, 3, device=device, dtype=dtype)
    for a in range(3):
        idx = [1, 1, 1]
        for v in (0, 2):
            idx[a] = v
            filt[0, 0, idx[0], idx[1], idx[2]] = 1.0
        idx[a] = 1
    ones = torch.ones(1, 1, *shape, device=device, dtype=dtype)
    return F.conv3d(ones, filt, padding=1)


def kl_laplacian(mu: torch.Tensor, logvar: torch.Tensor, lam: float = 20.0) -> torch.Tensor:
    """KL(q‖p) of VoxelMorph-diff. mu, logvar: (B, 3, D, H, W) velocity mean / log-variance (voxel units of
    their own grid). Returns a scalar (reference-code normalisation, see module docstring)."""
    if mu.shape != logvar.shape or mu.dim() != 5 or mu.shape[1] != 3:
        raise ValueError(f"kl_laplacian() 'mu'/'logvar' must be equal (B, 3, D, H, W), got {tuple(mu.shape)}, "
                         f"{tuple(logvar.shape)}")
    deg = degree_map(tuple(mu.shape[2:]), mu.device, mu.dtype)
    sigma_term = (lam * deg * logvar.exp() - logvar).mean()
    prec_term = laplacian_prec(mu)
    return 0.5 * 3 * (sigma_term + lam * prec_term)


def laplacian_prec(mu: torch.Tensor) -> torch.Tensor:
    """0.5/3 · Σ_d mean((μ[x+e_d] − μ[x])²): the μᵀΛμ part of the KL without λ (also the refinement prior)."""
    return sum(torch.diff(mu, dim=d).pow(2).mean() for d in (2, 3, 4)) * 0.5 / 3


def recon_mse(fixed: torch.Tensor, warped: torch.Tensor, sigma: float = 0.02) -> torch.Tensor:
    """Gaussian image likelihood term: mean((f − m∘φ)²) / σ² (reference code: 1/σ², a mean, not a sum)."""
    return ((fixed - warped) ** 2).mean() / sigma ** 2
