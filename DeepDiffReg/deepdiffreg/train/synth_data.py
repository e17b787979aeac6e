"""Seeded synthetic training pairs from label maps (SynthMorph-style images, VoxelMorph-diff's MSE likelihood).

``random_deformation`` draws a smooth diffeomorphism (an SVF of low-resolution Gaussian noise, upsampled and
integrated by scaling and squaring) composed with a random affine about the grid centre. ``render`` turns a label
map into an image: random per-label mean and std (one lookup table per pair, so fixed and moving share a
contrast — the Gaussian-likelihood loss assumes that), Gaussian blur, a smooth multiplicative bias field, noise,
and the pipeline's robust [0, 1] normalisation. ``SynthPairs.pair(i, independent_contrast=True)`` gives each image
its own table (SynthMorph-style, contrast-agnostic training; such pairs are flagged ``same_contrast: False`` so that
a method drops its intensity-matching term). ``same_subject_pair`` makes two scans of one subject (two small known
deformations, or none) with their true map. Every draw comes from one ``torch.Generator``: same seed, same pair.

All tensors are (1, C, D, H, W) on the label map's grid; displacements are voxel units, channel c along axis c.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..field import compose, integrate_ss, resize_disp, resize_image, warp


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


def random_svf_half(shape, g: torch.Generator, max_std_vox: float = 3.0, coarse: int = 8) -> torch.Tensor:
    """(1, 3, d, h, w) random smooth stationary velocity on the ½ grid of ``shape`` (values in ½-grid voxels):
    Gaussian noise with a std drawn in [0, max_std_vox] (full-grid voxels) on a 1/``coarse`` grid, upsampled.
    exp(v) (``field.integrate_ss``) is a diffeomorphism and exp(−v) its inverse."""
    std = _u(g, 0.0, max_std_vox)
    cshape = [max(2, n // coarse) for n in shape]
    v = torch.randn((1, 3, *cshape), generator=g) * std    # SVF, voxel units of the full grid
    half = tuple(max(2, n // 2) for n in shape)
    to_half = torch.tensor([(h - 1) / max(n - 1, 1) for h, n in zip(half, shape)]).view(1, 3, 1, 1, 1)
    return resize_image(v, half) * to_half                 # values: full-grid voxels → ½-grid voxels


def rigid_svf_half(shape, g: torch.Generator, rot_deg: float, trans_vox: float) -> torch.Tensor:
    """(1, 3, d, h, w) velocity on the ½ grid of ``shape`` whose exponential is a small rigid motion about the grid
    centre: v(x) = W·(x − c) + t with W skew-symmetric (rotation angles up to ``rot_deg`` per axis) and t up to
    ``trans_vox`` full-grid voxels per axis. As an SVF its inverse is exp(−v), like the smooth deformations."""
    half = tuple(max(2, n // 2) for n in shape)
    w = torch.zeros(3, 3)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        a = math.radians(_u(g, -rot_deg, rot_deg))
        w[i, j], w[j, i] = -a, a
    to_half = torch.tensor([(h - 1) / max(n - 1, 1) for h, n in zip(half, shape)])
    t = torch.tensor([_u(g, -trans_vox, trans_vox) for _ in range(3)]) * to_half
    axes = [torch.arange(n, dtype=torch.float32) for n in half]
    x = torch.stack(torch.meshgrid(*axes, indexing="ij"), 0)
    c = torch.tensor([(n - 1) / 2 for n in half]).view(3, 1, 1, 1)
    return (torch.einsum("ij,jdhw->idhw", w, x - c) + t.view(3, 1, 1, 1))[None]


def svf_disp(v_half: torch.Tensor, shape, steps: int = 7) -> torch.Tensor:
    """exp(v) of a ½-grid velocity (``random_svf_half``) as a (1, 3, *shape) full-grid voxel displacement."""
    return resize_disp(integrate_ss(v_half, steps), tuple(shape))   # integrate on the ½ grid (cheap), back to full


def random_deformation(shape, g: torch.Generator, max_std_vox: float = 3.0, coarse: int = 8,
                       affine: bool = True) -> torch.Tensor:
    """(1, 3, D, H, W) voxel displacement: exp(SVF) (smooth, diffeomorphic) then a random affine."""
    disp = svf_disp(random_svf_half(shape, g, max_std_vox, coarse), shape)
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
    return bias_and_noise(img, g, _blur((lab > 0).float(), 1.0) > 0.01)   # skull-stripped look of real inputs


def bias_and_noise(img: torch.Tensor, g: torch.Generator, mask: torch.Tensor, max_bias: float = 0.3,
                   max_noise: float = 0.03) -> torch.Tensor:
    """A smooth multiplicative bias field (log-amplitude up to ``max_bias``, on a 4³ grid), Gaussian noise (std up
    to ``max_noise`` of the [0, 1] range), zero outside ``mask`` (1, 1, D, H, W), then the pipeline's robust
    normalisation. (1, 1, D, H, W) float → same, in [0, 1]."""
    bias = torch.randn((1, 1, 4, 4, 4), generator=g) * _u(g, 0.0, max_bias)
    img = img * torch.exp(resize_image(bias, tuple(img.shape[2:])))
    img = img + torch.randn(img.shape, generator=g) * _u(g, 0.0, max_noise)
    return robust_normalise_t(img * mask)


class SynthPairs:
    """Pairs from label maps: ``pair(index)`` is fully determined by (seed, index).

    label_maps: list of (D, H, W) integer arrays on one grid (already roughly aligned, e.g. real_data's cache).
    cross_prob: probability that fixed and moving come from two different label maps (else the same one).
    Returns dict(fixed, moving: (1, 1, D, H, W) float32 in [0, 1]; fixed_labels, moving_labels: (1, 1, D, H, W)
    int64; disp_fixed, disp_moving: the random deformations applied to the label maps; same_contrast: whether
    both images were rendered with one intensity table).
    ``pair(index, independent_contrast=True)`` renders the two images with independent random intensity tables
    (SynthMorph-style contrast-agnostic pairs: an intensity-matching loss must not be applied to them); blur, bias
    and noise are drawn independently per image in both cases.
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

    def pair(self, index: int, independent_contrast: bool = False) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        n = len(self.maps)
        i = int(torch.randint(n, (1,), generator=g))
        j = int(torch.randint(n, (1,), generator=g)) if (n > 1 and _u(g, 0, 1) < self.cross_prob) else i
        shape = tuple(self.maps[0].shape[2:])
        lut = random_lut(self.max_label, g)
        out: dict = {"same_contrast": not independent_contrast}
        for role, k in (("fixed", i), ("moving", j)):
            d = random_deformation(shape, g, self.max_std, affine=self.affine)
            lab = warp(self.maps[k], d, mode="nearest")
            out[f"{role}_labels"] = lab
            out[role] = render(lab, random_lut(self.max_label, g) if independent_contrast and role == "moving"
                               else lut, g)
            out[f"disp_{role}"] = d
        return out


def same_subject_pair(image: torch.Tensor, labels: torch.Tensor, g: torch.Generator, max_std_vox: float = 1.0,
                      rigid_deg: float = 0.0, rigid_vox: float = 0.0, zero: bool = False) -> dict[str, torch.Tensor]:
    """Two scans of one subject: ``image`` (1, 1, D, H, W) in [0, 1] (a real scan or a rendered label map) and its
    ``labels`` (1, 1, D, H, W) int64, each copy deformed by its own small random SVF (std up to ``max_std_vox``
    full-grid voxels; the moving one also by a small rigid motion, up to ``rigid_deg`` / ``rigid_vox``) and given
    its own bias field and noise (``bias_and_noise``). ``zero``: no deformation at all (the same anatomy twice,
    independent noise). Returns the SynthPairs keys plus ``disp_true`` (1, 3, D, H, W): the true fixed → moving
    voxel displacement, φ_moving⁻¹ ∘ φ_fixed (exactly 0 for ``zero``)."""
    shape = tuple(image.shape[2:])
    mask = image > 0
    out: dict = {"same_contrast": True}
    if zero:
        out["disp_true"] = torch.zeros((1, 3, *shape))
    else:
        v_f = random_svf_half(shape, g, max_std_vox)
        v_m = random_svf_half(shape, g, max_std_vox)
        if rigid_deg > 0 or rigid_vox > 0:
            v_m = v_m + rigid_svf_half(shape, g, rigid_deg, rigid_vox)
        d_f, d_m = svf_disp(v_f, shape), svf_disp(v_m, shape)
        out["disp_true"] = compose(svf_disp(-v_m, shape), d_f)
    for role in ("fixed", "moving"):
        if zero:
            img, lab, m = image, labels, mask
        else:
            d = d_f if role == "fixed" else d_m
            img, lab, m = warp(image, d), warp(labels, d, mode="nearest"), warp(mask.float(), d) > 0.5
        out[role] = bias_and_noise(img, g, m)
        out[f"{role}_labels"] = lab
    return out
