"""Uncertainty maps of VoxelMorph-diff: the standard deviation of the displacement, in mm, per voxel.

``refine`` (the default, ``refine_shift_mm``) is an estimate of the result's error, not of a posterior: how far a
few more optimisation steps of a bias-blind objective (squared local NCC plus the model's prior) move the
displacement. The other candidates are kept for study (their measured ρ: docs/benchmarks.md). Two of them estimate
the posterior over the stationary velocity v (½-resolution grid, ½-grid voxel units):

``laplace`` — the posterior of the model's own objective for *this* pair, approximated at the predicted
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


def _norm_mm(disp: torch.Tensor, mm_per_vox: torch.Tensor) -> torch.Tensor:
    """|u| in mm of a (1, 3, d, h, w) displacement in voxels of a grid with ``mm_per_vox`` (3,) per canonical axis."""
    return torch.sqrt(((disp * mm_per_vox.view(1, 3, 1, 1, 1)) ** 2).sum(1, keepdim=True))


def stage_std_mm(last_disp: torch.Tensor, mm_per_vox: torch.Tensor) -> torch.Tensor:
    """``stages``: the size of the last cascade stage's correction |exp(v_K)| in mm — where the earlier stages left
    much to do, the whole cascade is assumed less sure."""
    return _norm_mm(last_disp, mm_per_vox)


def inconsistency_mm(fwd: torch.Tensor, back: torch.Tensor, mm_per_vox: torch.Tensor) -> torch.Tensor:
    """``consistency``: |u + w∘(id+u)| in mm, u the forward-only prediction for (moving, fixed), w the forward-only
    prediction for the swapped pair, both (1, 3, D, H, W) net-grid voxels: zero when the two estimates are exact
    inverses of each other."""
    return _norm_mm(fwd + warp(back, fwd), mm_per_vox)


def flip_std_mm(disp: torch.Tensor, flipped_back: torch.Tensor, mm_per_vox: torch.Tensor) -> torch.Tensor:
    """``flip``: test-time augmentation — the std of two estimates (the prediction, and the prediction for the
    left-right mirrored pair mirrored back), |a − b| / 2 in mm."""
    return 0.5 * _norm_mm(disp - flipped_back, mm_per_vox)


REFINE_WINDOW = 3            # box window (½-grid voxels) of the ``refine`` map
LK_WINDOW = 7                # box window (net-grid voxels) of the local residual-displacement estimate
LK_RIDGE = 0.1               # ridge of the local 3×3 system, × the mean squared gradient over the image


def residual_disp_mm(fixed: torch.Tensor, warped: torch.Tensor, mm_per_vox: torch.Tensor,
                     win: int = LK_WINDOW, ridge: float = LK_RIDGE) -> torch.Tensor:
    """``residual``: the displacement the images still ask for after registration, in mm — per voxel the local
    least-squares shift δ of the warped moving image towards the fixed one (Lucas–Kanade over a win³ box:
    (Σ∇w∇wᵀ + εI) δ = Σ∇w (f − w)), ε = ``ridge`` × the mean |∇w|², so flat regions give small shifts rather
    than noise divided by nothing. fixed, warped: (1, 1, D, H, W) net grid in [0, 1]. Returns (1, 1, D, H, W)."""
    g = torch.stack(torch.gradient(warped[0, 0]), 0)[None]                      # (1, 3, D, H, W) per voxel
    r = fixed - warped
    a = torch.stack([box_sum(g[:, i:i + 1] * g[:, j:j + 1], win)[0, 0] for i in range(3) for j in range(3)], -1)
    b = torch.stack([box_sum(g[:, i:i + 1] * r, win)[0, 0] for i in range(3)], -1)
    eps = ridge * float((g ** 2).sum(1).mean()) * win ** 3
    a = a.reshape(*a.shape[:3], 3, 3) + eps * torch.eye(3, dtype=a.dtype, device=a.device)
    delta = torch.linalg.solve(a, b.unsqueeze(-1))[..., 0]                      # (D, H, W, 3) voxels
    return _norm_mm(delta.permute(3, 0, 1, 2)[None], mm_per_vox)


def refine_shift_mm(mu: torch.Tensor, loss_of_velocity, steps: int, lr: float, int_steps: int,
                    mm_per_half_vox: torch.Tensor, stop=None) -> torch.Tensor:
    """``refine``: how far the model's own objective still moves the result — |exp(v') − exp(μ)| in mm on the ½
    grid, v' = μ after ``steps`` more Adam steps (lr ``lr``, ½-grid voxels) on ``loss_of_velocity(v)`` (the
    objective of ``--vxm-refine``: an image term — by default weight·(1 − local NCC²) — plus the model's Laplacian
    prior term). ``stop``: a ``threading.Event`` (``base.Deferred``); once set, the next step raises
    ``Deferred.Stopped``."""
    from .base import Deferred
    from .refine import refine

    def check(fraction, message):
        if stop is not None and stop.is_set():
            raise Deferred.Stopped()
    # where the steps go, not the best of them: after --vxm-refine the result is at the objective's minimum, every
    # step raises the loss and the best seen is μ itself (an all-zero map: benchmark run of 2026-12-02 15:16)
    v, _ = refine(mu, loss_of_velocity, steps, lr=lr, keep_best=False, progress=check)
    shift = _norm_mm(integrate_ss(v, int_steps) - integrate_ss(mu, int_steps), mm_per_half_vox)
    # averaged over 3³ ½-grid voxels: the error it stands for is smooth (a velocity error, integrated), the shift of
    # a few steps is noisy (measured: ρ 0.48 → 0.53 on same-1 with 10 steps)
    return _local_mean(shift, REFINE_WINDOW)
