"""Initial (linear) alignment of a moving image to a fixed image, for pairs that are not pre-aligned.

Returns an ``sitk.AffineTransform`` A in the ITK resampling direction (fixed point → moving point), so that
``sitk.Resample(moving, fixed, A)`` is the linearly aligned moving image. The deformable stage then works on
that resampled image and the full map is x ↦ A(x + u(x)).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import SimpleITK as sitk

from .preprocess import foreground_mask, resample, smooth_for_downsampling, working_grid

ALIGN_MODES = ("affine", "rigid", "none")


def _to_affine(t: sitk.Transform) -> sitk.AffineTransform:
    """Any linear sitk transform (possibly composite) → one AffineTransform with the same point map."""
    pts = np.array([[0, 0, 0], [100, 0, 0], [0, 100, 0], [0, 0, 100]], float)
    mapped = np.array([t.TransformPoint(tuple(p)) for p in pts])
    m = np.stack([(mapped[i + 1] - mapped[0]) / 100.0 for i in range(3)], axis=1)
    a = sitk.AffineTransform(3)
    a.SetMatrix(m.ravel().tolist())
    a.SetTranslation(tuple(mapped[0]))
    return a


def affine_matrix(t: sitk.AffineTransform) -> np.ndarray:
    """4×4 homogeneous matrix of an affine point map."""
    m = np.eye(4)
    a = np.asarray(t.GetMatrix()).reshape(3, 3)
    c, tr = np.asarray(t.GetCenter()), np.asarray(t.GetTranslation())
    m[:3, :3] = a
    m[:3, 3] = tr + c - a @ c
    return m


# Whole-head scans (scalp, skull, neck) pull a whole-image affine towards the head's outline and the neck, whose
# extent differs from scan to scan. Measured on the 9 consecutive pairs of the 10 held-out IXI subjects (whole head,
# 2 mm, DLMUSE label Dice after the affine alone): whole image 0.409 mean (min 0.274); the top 150 mm of the head
# eroded by 10 mm 0.445 (min 0.329) — the idea of FSL's robustfov (crop the neck before FLIRT) plus dropping the
# scalp; a brain mask from the labels (oracle) reaches 0.41–0.48 on the three hardest pairs, where this gives
# 0.33–0.41. A skull-stripped brain has 1.3–2.0 L of foreground and a whole head 4.1–5.3 L (IXI, OASIS, BraTS and the
# benchmark's synthetic brains measured), so the foreground volume decides.
WHOLE_HEAD_LITRES = (2.5, 10.0)
HEAD_TOP_MM = 150.0
HEAD_ERODE_MM = 10.0


def _foreground_2mm(fixed: sitk.Image) -> sitk.Image:
    """The automatic foreground on a ≤ 2 mm copy of ``fixed`` (cheap on 1 mm scans; fine enough for a metric mask)."""
    spacing = max(2.0, min(fixed.GetSpacing()))
    return foreground_mask(resample(smooth_for_downsampling(fixed, spacing), working_grid(fixed, spacing)))


def whole_head_region(fixed: sitk.Image, top_mm: float = HEAD_TOP_MM, erode_mm: float = HEAD_ERODE_MM
                      ) -> sitk.Image | None:
    """For a whole-head scan, the part of the head that holds the brain: foreground voxels within ``top_mm`` of
    the top of the head (the most superior foreground point, LPS +z), eroded by ``erode_mm`` (the automatic
    foreground has a 2-voxel margin, so about ``erode_mm`` − 4 mm inside the skin). None when the
    foreground volume is not head-sized (WHOLE_HEAD_LITRES: a skull-stripped brain, a phantom, a small field of
    view), or nothing is left. Returned on a ≤ 2 mm copy of the fixed grid (UInt8)."""
    fg = _foreground_2mm(fixed)
    a = sitk.GetArrayFromImage(fg).astype(bool)
    litres = a.sum() * float(np.prod(fg.GetSpacing())) / 1e6
    if not WHOLE_HEAD_LITRES[0] <= litres <= WHOLE_HEAD_LITRES[1]:
        return None
    # superior (LPS z) coordinate of every voxel centre: z = origin_z + Σ_c direction[2, c]·spacing_c·index_c,
    # built by broadcasting the three index axes (array order k, j, i)
    d = np.asarray(fg.GetDirection()).reshape(3, 3)[2] * np.asarray(fg.GetSpacing())
    nk, nj, ni = a.shape
    s_mm = (fg.GetOrigin()[2] + d[0] * np.arange(ni)[None, None, :] + d[1] * np.arange(nj)[None, :, None]
            + d[2] * np.arange(nk)[:, None, None])
    keep = a & (s_mm > s_mm[a].max() - top_mm)
    region = sitk.GetImageFromArray(keep.astype(np.uint8))
    region.CopyInformation(fg)
    region = sitk.BinaryErode(region, [max(1, int(round(erode_mm / sp))) for sp in fg.GetSpacing()])
    return region if sitk.GetArrayViewFromImage(region).any() else None


def alignment_mask(fixed: sitk.Image, user_mask: sitk.Image | None, erode_mm: float | None = None
                   ) -> tuple[sitk.Image | None, str]:
    """Where the alignment metric is measured on the fixed image, and a description for the report.

    - the user's mask if given;
    - ``erode_mm`` > 0: the automatic foreground eroded by ``erode_mm`` (drops the scalp);
    - ``erode_mm`` == 0: everywhere (None);
    - ``erode_mm`` None (default): whole-head scans get ``whole_head_region`` (top of the head, scalp dropped),
      anything else (skull-stripped brains, small fields of view) everywhere.
    """
    if user_mask is not None:
        return sitk.Cast(user_mask > 0, sitk.sitkUInt8), "the fixed mask"
    if erode_mm is None:
        region = whole_head_region(fixed)
        if region is not None:
            return region, (f"whole-head scan: the top {HEAD_TOP_MM:g} mm of the head, eroded by "
                            f"{HEAD_ERODE_MM:g} mm (automatic)")
        return None, "whole image (not a whole-head scan)"
    if erode_mm <= 0:
        return None, "whole image"
    fg = _foreground_2mm(fixed)          # the same ≤ 2 mm foreground as the automatic whole-head region
    mask = sitk.BinaryErode(fg, [max(1, int(round(erode_mm / s))) for s in fg.GetSpacing()])
    if not sitk.GetArrayViewFromImage(mask).any():
        return None, f"whole image (foreground eroded by {erode_mm:g} mm is empty)"
    return mask, f"foreground eroded by {erode_mm:g} mm"


# An affine whose scale factors (singular values) or volume change (determinant) leave this range is treated as a
# failure of the metric (a known MI failure on small fields of view is shrinking the moving image: det 0.69 on the
# module's synthetic test pair), and the rigid result is kept instead. Adult heads differ by up to ~20 % in volume.
PLAUSIBLE_SCALE = (0.75, 1.33)


# Metric samples and stopping step. Measured on the benchmark pairs (ixi-1, ixi-2, synth-15-16, brats-002; 2026-12-02,
# the 2-core machine at load ~4): 15 % of the coarse voxels and a 0.01 step (instead of 25 % and 0.001) need about
# half the iterations at 60 % of the cost each; the affine moved by 0.1–1.0 mm RMS over the fixed foreground — as far
# as the sampling noise moves it (a different anti-aliasing alone moved it 0.1–1.0 mm) — and label Dice after the
# affine went 0.505 / 0.497 / 0.510 → 0.505 / 0.495 / 0.525, BraTS TRE 2.49 → 2.51 mm.
METRIC_SAMPLING = 0.15
MIN_STEP = 1e-2


def _execute_single_threaded(reg: sitk.ImageRegistrationMethod, fixed: sitk.Image, moving: sitk.Image) -> None:
    """Run ``reg`` with SimpleITK's global thread count at 1, then restore it.

    The metric's multi-threaded sums are reduced in an order that depends on the threads' timing: with 2 threads the
    same pair gave translations up to 0.05 mm apart from run to run (OASIS 1 mm). The registration object's own
    SetNumberOfThreads does not reach the metric; the global default does. On the coarse alignment grid the cost
    is ~0.1 s.
    """
    n = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        reg.Execute(fixed, moving)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)


def alignment_spacing(fixed: sitk.Image, coarsest_mm: float = 4.0, min_voxels: int = 32) -> float:
    """4 mm for head-sized images; finer for small fields of view, so the coarse copy keeps ≥ 32 voxels per axis."""
    extent = np.asarray(fixed.GetSpacing()) * (np.asarray(fixed.GetSize()) - 1)
    return float(max(min(fixed.GetSpacing()), min(coarsest_mm, extent.min() / min_voxels)))


def plausible(t: sitk.AffineTransform) -> bool:
    m = affine_matrix(t)[:3, :3]
    s = np.linalg.svd(m, compute_uv=False)
    lo, hi = PLAUSIBLE_SCALE
    return bool(lo <= s.min() and s.max() <= hi and lo <= abs(np.linalg.det(m)) <= hi)


def initial_alignment(fixed: sitk.Image, moving: sitk.Image, mode: str = "affine", spacing_mm: float | None = None,
                      progress: Callable[[float, str], None] | None = None,
                      fixed_mask: sitk.Image | None = None, info: dict | None = None) -> sitk.AffineTransform:
    """Moments initialisation, then rigid (and affine) Mattes-MI registration on coarse copies of both images,
    the metric measured inside ``fixed_mask`` (on the fixed grid) when one is given. An implausible affine
    (see PLAUSIBLE_SCALE) falls back to the rigid result; ``info`` (if given) records what happened."""
    if mode == "none":
        return sitk.AffineTransform(3)
    report = progress or (lambda f, m: None)
    spacing_mm = spacing_mm or alignment_spacing(fixed)
    info = info if info is not None else {}
    info["alignment_spacing_mm"] = round(spacing_mm, 3)
    f_lo = resample(smooth_for_downsampling(fixed, spacing_mm), working_grid(fixed, spacing_mm))
    m_lo = resample(smooth_for_downsampling(moving, spacing_mm), working_grid(moving, spacing_mm))
    mask_lo = None
    if fixed_mask is not None:
        mask_lo = resample(sitk.Cast(fixed_mask, sitk.sitkUInt8), working_grid(fixed, spacing_mm), None,
                           sitk.sitkNearestNeighbor)
    init = sitk.CenteredTransformInitializer(f_lo, m_lo, sitk.Euler3DTransform(),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    stages: list[tuple[str, sitk.Transform]] = [("rigid", sitk.Euler3DTransform(init))]
    if mode == "affine":
        stages.append(("affine", None))
    current: sitk.Transform = init
    rigid_result = None
    for n, (name, t) in enumerate(stages):
        if t is None:  # affine stage starts from the rigid result
            rigid = current
            t = sitk.AffineTransform(3)
            t.SetCenter(rigid.GetCenter())
            t.SetMatrix(rigid.GetMatrix())
            t.SetTranslation(rigid.GetTranslation())
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(METRIC_SAMPLING, seed=7)
        if mask_lo is not None:
            reg.SetMetricFixedMask(mask_lo)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=MIN_STEP, numberOfIterations=150,
                                                     relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([2, 1])
        reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
        reg.SetInitialTransform(t, inPlace=True)
        reg.AddCommand(sitk.sitkIterationEvent,
                       lambda n=n: report((n + min(reg.GetOptimizerIteration(), 150) / 150) / len(stages),
                                          f"{name} alignment, metric {reg.GetMetricValue():.4f}"))
        _execute_single_threaded(reg, f_lo, m_lo)
        current = t
        if name == "rigid":
            rigid_result = _to_affine(t)
    result = _to_affine(current)
    info["stage_used"] = stages[-1][0]
    if mode == "affine" and not plausible(result):
        s = np.linalg.svd(affine_matrix(result)[:3, :3], compute_uv=False)
        info["stage_used"] = "rigid"
        info["rejected_affine_scales"] = [round(float(v), 4) for v in s]
        info["rejected_affine_det"] = round(float(np.prod(s)), 4)
        result = rigid_result
    return result


def overlap_fraction(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    """Fraction of the fixed image's foreground whose mapped point falls inside the moving image."""
    g = working_grid(fixed, 4.0)
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    inside = sitk.GetArrayFromImage(resample(ones, g, transform, sitk.sitkNearestNeighbor)) > 0
    f = sitk.GetArrayFromImage(resample(fixed, g))
    fg = f > np.percentile(f, 50) if f.max() > f.min() else np.ones_like(inside)
    return float(inside[fg].mean()) if fg.any() else float(inside.mean())
