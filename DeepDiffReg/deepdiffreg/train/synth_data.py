"""Seeded synthetic training pairs from label maps (SynthMorph-style images, VoxelMorph-diff's MSE likelihood).

``random_deformation`` draws a smooth diffeomorphism (an SVF of low-resolution Gaussian noise, upsampled and
integrated by scaling and squaring) composed with a random affine about the grid centre. ``render`` turns a label
map into an image: random per-label mean and std (one lookup table per pair, so fixed and moving share a
contrast — the Gaussian-likelihood loss assumes that), Gaussian blur, a smooth multiplicative bias field, noise,
and the pipeline's robust [0, 1] normalisation. Every draw comes from one ``torch.Generator``: same seed, same pair.

All tensors are (1, C, D, H, W) on the label map's grid; displacements are voxel units, channel c along axis c.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..field import integrate_ss, resize_disp, resize_image, warp


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def random_affine_disp(shape, g: torch.Generator, rot_deg: float = 4.0, scale: float = 0.04,
                       shear: float = 0.02, trans_vox: float = 2.0) -> torch.Tensor:
    """(1, 3, D, H, W) voxel displacement of a random affine about the grid centre."""
    angles = [math.radians(_u(g, -rot_deg, rot_deg)) for _ in range(3)]
    r = torch.eye(3, dtype=torch.float64)
    for a, ang in enumerate(angles):
        c, s = math.cos(ang), math.sin(ang)
        i, j = [k for k in range(3) if k != a]
        m = torch.eye(3, dtype=torch.float64)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        r = r @ m
    sc = torch.diag(torch.tensor([1 + _u(g, -scale, scale) for _ in range(3)], dtype=torch.float64))
    sh = torch.eye(3, dtype=torch.float64)
    for i in range(3):
        for j in range(3):
            if i != j:
                sh[i, j] = _u(g, -shear, shear)
    a = (r @ sc @ sh).float()
    t = torch.tensor([_u(g, -trans_vox, trans_vox) for _ in range(3)])
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    x = torch.stack(torch.meshgrid(*axes, indexing="ij"), 0)          # (3, D, H, W) voxel coords
    c = torch.tensor([(n - 1) / 2 for n in shape]).view(3, 1, 1, 1)
    y = torch.einsum("ij,jdhw->idhw", a, x - c) + c + t.view(3, 1, 1, 1)
    return (y - x)[None]


def random_deformation(shape, g: torch.Generator, max_std_vox: float = 3.0, coarse: int = 8,
                       affine: bool = True) -> torch.Tensor:
    """(1, 3, D, H, W) voxel displacement: exp(SVF) (smooth, diffeomorphic) then a random affine."""
    std = _u(g, 0.0, max_std_vox)
    cshape = [max(2, n // coarse) for n in shape]
    v = torch.randn((1, 3, *cshape), generator=g) * std    # SVF, voxel units of the full grid
    half = tuple(max(2, n // 2) for n in shape)
    to_half = torch.tensor([(h - 1) / max(n - 1, 1) for h, n in zip(half, shape)]).view(1, 3, 1, 1, 1)
    v_half = resize_image(v, half) * to_half               # values: full-grid voxels → ½-grid voxels
    disp = resize_disp(integrate_ss(v_half, 7), tuple(shape))   # integrate on the ½ grid (cheap), back to full
    if affine:
        aff = random_affine_disp(shape, g)
        disp = aff + warp(disp, aff)                      # x ↦ A(x) + u(A(x)): deformation, then affine (pull)
    return disp


def _blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma < 0.1:
        return img
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=img.dtype) / sigma) ** 2)
    k = k / k.sum()
    out = img
    for a in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + a] = 2 * r + 1
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - a)] = pad[2 * (2 - a) + 1] = r
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k.view(shape))
    return out


def robust_normalise_t(img: torch.Tensor, lo_pct: float = 0.5, hi_pct: float = 99.5) -> torch.Tensor:
    """Torch version of the pipeline's robust_normalise (percentiles of non-background voxels → [0, 1])."""
    vals = img[img > img.min()]
    if vals.numel() < 16:
        vals = img.flatten()
    if vals.numel() > 200_000:
        vals = vals[:: vals.numel() // 200_000 + 1]
    lo, hi = torch.quantile(vals, torch.tensor([lo_pct / 100, hi_pct / 100], dtype=vals.dtype))
    if hi <= lo:
        lo, hi = img.min(), img.max()
    return ((img.clamp(lo, hi) - lo) / (hi - lo).clamp_min(1e-12)).float()


def random_lut(max_label: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-label mean in [0, 1] and std in [0, 0.05] (label 0, the background, is black and noiseless)."""
    mean = torch.rand(max_label + 1, generator=g)
    std = torch.rand(max_label + 1, generator=g) * 0.05
    mean[0], std[0] = 0.0, 0.0
    return mean, std


def render(labels: torch.Tensor, lut: tuple[torch.Tensor, torch.Tensor], g: torch.Generator) -> torch.Tensor:
    """labels (1, 1, D, H, W) int64 → image (1, 1, D, H, W) float32 in [0, 1]."""
    mean, std = lut
    lab = labels.clamp(0, mean.numel() - 1)
    img = mean[lab] + std[lab] * torch.randn(lab.shape, generator=g)
    img = _blur(img, _u(g, 0.3, 1.0))
    shape = labels.shape[2:]
    bias = torch.randn((1, 1, 4, 4, 4), generator=g) * _u(g, 0.0, 0.3)
    img = img * torch.exp(resize_image(bias, tuple(shape)))
    img = img + torch.randn(img.shape, generator=g) * _u(g, 0.0, 0.03)
    img = img * (_blur((lab > 0).float(), 1.0) > 0.01)      # keep the skull-stripped look of real inputs
    return robust_normalise_t(img)


class SynthPairs:
    """Pairs from label maps: ``pair(index)`` is fully determined by (seed, index).

    label_maps: list of (D, H, W) integer arrays on one grid (already roughly aligned, e.g. real_data's cache).
    cross_prob: probability that fixed and moving come from two different label maps (else the same one).
    Returns dict(fixed, moving: (1, 1, D, H, W) float32 in [0, 1]; fixed_labels, moving_labels: (1, 1, D, H, W)
    int64; disp_fixed, disp_moving: the random deformations applied to the label maps).
    """

    def __init__(self, label_maps: list[np.ndarray], seed: int = 0, cross_prob: float = 0.5,
                 max_std_vox: float = 3.0, affine: bool = True):
        if not label_maps:
            raise ValueError("SynthPairs() needs at least one label map")
        self.maps = [torch.as_tensor(np.asarray(m), dtype=torch.int64)[None, None] for m in label_maps]
        if len({tuple(m.shape) for m in self.maps}) != 1:
            raise ValueError("SynthPairs() label maps must share one grid")
        self.max_label = int(max(int(m.max()) for m in self.maps))
        self.seed, self.cross_prob, self.max_std, self.affine = seed, cross_prob, max_std_vox, affine

    def pair(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        n = len(self.maps)
        i = int(torch.randint(n, (1,), generator=g))
        j = int(torch.randint(n, (1,), generator=g)) if (n > 1 and _u(g, 0, 1) < self.cross_prob) else i
        shape = tuple(self.maps[0].shape[2:])
        lut = random_lut(self.max_label, g)
        out = {}
        for role, k in (("fixed", i), ("moving", j)):
            d = random_deformation(shape, g, self.max_std, affine=self.affine)
            lab = warp(self.maps[k], d, mode="nearest")
            out[f"{role}_labels"] = lab
            out[role] = render(lab, lut, g)
            out[f"disp_{role}"] = d
        return out
