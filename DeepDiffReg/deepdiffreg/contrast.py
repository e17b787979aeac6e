"""Do the two images show one contrast? A label-free check on the working grid, before a method that handles one
contrast only (``Capabilities.contrasts == "same"``, or its model's statement) is run on a T1 ↔ T2 pair (issue 18).

Such a method explains the other contrast's intensities by deformation: VoxelMorph-diff v0.5.0 took the synthetic
T1 ↔ T2 pair contrast-15-16 from Dice 0.525 after the initial alignment to 0.110, with no folded voxel. Neither the
local NCC² (window 9: 0.191 → 0.234) nor the mutual information (0.204 → 0.282) of the result showed the harm — both
rose — so the check is made before the method runs, not after.

The statistic: Spearman's rank correlation of the two normalised images on the working grid after the initial
alignment, each averaged over 2×2×2 blocks and smoothed by a Gaussian of 2 mm, over the voxels where both are
foreground (each above its own Otsu threshold, capped at 10 % of the range, so the background and its noise — dark in
every MR contrast, and a positive correlation whatever the tissues do — are left out; the joint foreground eroded by
4 mm; inside the user's mask when one is given): ``rank_correlation``. One contrast, even of two different brains or
with a bias field, keeps the order of the tissue intensities (positive ρ); another contrast reverses part of it (CSF
bright in T2, dark in T1). Measured 2026-12-07 through the engine (2 mm working grid) on the benchmark's pairs: same
contrast 0.58–0.60 (synth-15-16 and 16-15, two label maps), 0.82–0.84 (ixi-1, ixi-2, two subjects), 0.94–0.99 (one
subject or label map with a known deformation), 0.75–0.82 (T1 and T1ce of BraTSReg_002); T1 ↔ T2 (contrast-15-16)
−0.43 (docs/benchmarks.md, "Contrast check"). The threshold, 0.2, lies between.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from .metrics import spearman

SAME_CONTRAST_MIN_RHO = 0.2     # below: the images "look like different contrasts"
MAX_FOREGROUND_THRESHOLD = 0.1  # of the normalised [0, 1] range (foreground_threshold)
SMOOTH_MM = 2.0                 # Gaussian σ applied to both images first (smoothing)
MAX_VOXELS = 200_000            # a regular subsample of the joint foreground (ranks of 200k values: ~0.05 s)
STATISTIC = (f"Spearman rank correlation of the normalised images on the working grid after the initial alignment, "
             f"both averaged over 2x2x2 blocks and smoothed by a Gaussian of {SMOOTH_MM:g} mm, where both are "
             f"foreground (eroded by {2 * SMOOTH_MM:g} mm)")
MODES = ("error", "warn", "off")


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (the one that maximises the between-class variance of a 256-bin histogram)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (s0 / w0 - (s0[-1] - s0) / w1) ** 2
    between[~np.isfinite(between)] = -1.0
    return float(edges[int(np.argmax(between)) + 1])


def foreground_threshold(values: np.ndarray) -> float:
    """Otsu's threshold, at most ``MAX_FOREGROUND_THRESHOLD``: on a skull-stripped T2 (zero background) Otsu
    separates the dark white matter from the bright CSF rather than the background from the brain, and the white
    matter must stay in (without the cap ρ on contrast-15-16 at 1 mm was −0.08 instead of −0.34)."""
    return min(otsu_threshold(values), MAX_FOREGROUND_THRESHOLD)


def _image(arr: np.ndarray, spacing_ijk) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(v) for v in spacing_ijk))
    return img


def rank_correlation(fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor | None = None,
                     spacing_ijk=None, sigma_mm: float = SMOOTH_MM) -> float | None:
    """Spearman ρ of two normalised images on one grid ((1, 1, D, H, W) in [0, 1]) over their joint foreground
    (each image above its own Otsu threshold, capped; inside ``mask``); None when fewer than 1000 voxels are left.

    With ``spacing_ijk`` (the pipeline's case) both images are first averaged over 2×2×2 blocks (``BinShrink``,
    axes of at least 64 voxels) and smoothed by a Gaussian of ``sigma_mm``, and the joint foreground is eroded by
    2σ, so the blurred object border — where both images rise from the dark background, a positive correlation
    whatever the contrasts — is left out. Why smooth: the images are compared before the method has registered them,
    and a residual misalignment of a few mm puts one tissue beside another at every edge, lowering ρ for one
    contrast, while the order of whole tissues that two contrasts reverse survives a 2 mm blur. Why the blocks: the
    Gaussian and the erosion on the full 2 mm working grid of a 1 mm brain took 0.2 s of one core, on the
    block-averaged grid ~0.03 s. Measured 2026-12-07 on the 2 mm grid, unsmoothed → blocks, smoothed and eroded:
    see docs/benchmarks.md, "Contrast check" (e.g. ixi-1 0.611 → 0.836, contrast-15-16 −0.404 → −0.433); smoothing
    without the erosion took the test phantom's T2-like pair from −0.50 to −0.05."""
    f = fixed.detach()[0, 0].float().cpu().numpy()
    m = moving.detach()[0, 0].float().cpu().numpy()
    if f.max() <= f.min() or m.max() <= m.min():
        return None
    roi = mask.detach()[0, 0].float().cpu().numpy() if mask is not None else None
    smooth = spacing_ijk is not None and sigma_mm > 0
    if smooth:
        shrink = [2 if n >= 64 else 1 for n in f.shape[::-1]]          # (i, j, k); small images stay
        spacing = [float(s) * k for s, k in zip(spacing_ijk, shrink)]
        f, m, roi = (None if a is None else sitk.GetArrayFromImage(sitk.BinShrink(_image(a, spacing_ijk), shrink))
                     for a in (f, m, roi))
    both = (f > foreground_threshold(f.ravel())) & (m > foreground_threshold(m.ravel()))
    if roi is not None:
        both &= roi >= 0.5                   # a {0, 1} mask, or its block means: at least half of a block inside
    if smooth:
        radius = [max(1, int(round(2.0 * sigma_mm / s))) for s in spacing]
        both = sitk.GetArrayFromImage(sitk.BinaryErode(_image(both.astype(np.uint8), spacing), radius)) > 0
        f, m = (sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(_image(a, spacing), float(sigma_mm)))
                for a in (f, m))
    idx = np.flatnonzero(both.ravel())
    if len(idx) < 1000:
        return None
    idx = idx[::max(1, len(idx) // MAX_VOXELS)]
    rho = spearman(f.ravel()[idx], m.ravel()[idx])
    return float(rho) if np.isfinite(rho) else None


def check(fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor | None, handles: str,
          spacing_ijk=None) -> dict[str, Any]:
    """report.json's ``contrast_check``: ρ, what the images look like ("same" | "different" | null when too
    little foreground overlaps), what the method handles, and whether the method's result is at risk.
    ``spacing_ijk``: the grid's spacing (mm), for the smoothing (None: none)."""
    rho = rank_correlation(fixed, moving, mask, spacing_ijk)
    looks = None if rho is None else ("same" if rho >= SAME_CONTRAST_MIN_RHO else "different")
    return {"rank_correlation": None if rho is None else round(rho, 4), "threshold": SAME_CONTRAST_MIN_RHO,
            "looks": looks, "method_handles": handles, "mismatch": bool(looks == "different" and handles == "same"),
            "statistic": STATISTIC if spacing_ijk is not None else
                         "Spearman rank correlation of the normalised images, where both are foreground"}


def mismatch_warning(method: str, result: dict[str, Any], aligned: bool = True) -> str:
    """What report.json and the Slicer panel say when a one-contrast method ran on such a pair anyway. ``aligned``:
    whether an initial alignment ran (without one, images far apart also correlate poorly: one of the 24³
    training phantom's validation pairs, deformed by ~2 voxels, with --no-align gave −0.13)."""
    where = "after the initial alignment" if aligned else "with no initial alignment"
    return (f"the images look like different contrasts, or are far from aligned (rank correlation of their "
            f"intensities {result['rank_correlation']:.2f} {where}, below {result['threshold']:g}) and {method} "
            f"handles one contrast only: its result would likely be worse than the initial alignment")


def mismatch_message(method: str, result: dict[str, Any], alternatives: list[str], aligned: bool = True) -> str:
    """The refusal, one line: the warning and what to do instead."""
    instead = f"use a method that handles different contrasts ({', '.join(alternatives)}), or " if alternatives else ""
    return f"{mismatch_warning(method, result, aligned)}; {instead}--contrast-check warn to run it anyway"
