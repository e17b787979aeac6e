"""register(): the one place where the stages of a registration run are strung together.

load → check → initial alignment A → working grid (fixed box, method spacing) → method → field on the fixed
grid in LPS mm, chained with A → Jacobian, grid, warped image, metrics → result directory (atomic).

The written transform is T(x) = A(x + u(x)) for fixed-space points x (ITK resampling direction): the
displacement T(x) − x sampled on the fixed image's own grid, in LPS mm. The inverse (when the method has one)
is T⁻¹(y) = W⁻¹(A⁻¹(y)) on the moving image's own grid, with W⁻¹ the method's inverse field.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__
from .align import affine_matrix, alignment_mask, initial_alignment, overlap_fraction
from .errors import BadInput, DeviceUnavailable, OutOfMemory
from .frames import Geometry, displacement_image, lps_from_vox_disp
from .io import images
from .io.result_writer import (FILES, AtomicResultDir, deformation_grid_lines, write_grid_vtk_lps, write_image,
                               write_report, write_scalar, write_transform)
from .methods.base import FieldEstimate, Method, PairOnGrid, get_method
from .metrics import dice_per_label, dice_summary, fold_stats, inverse_consistency_vox, jacobian_det_lps, tre_mm
from .preprocess import (foreground_mask, intensity_window, resample, robust_normalise, smooth_for_downsampling,
                         working_grid)
from .progress import Reporter

# Share of the progress bar each stage gets (the method's own loop dominates).
_SPAN = {"load": (0.0, 0.03), "align": (0.03, 0.15), "preprocess": (0.15, 0.18), "register": (0.18, 0.9),
         "write": (0.9, 1.0)}


@dataclass
class RegisterRequest:
    fixed: str
    moving: str
    method: str
    out_dir: str
    device: str = "auto"
    fixed_seg: str | None = None
    moving_seg: str | None = None
    fixed_landmarks: str | None = None
    moving_landmarks: str | None = None
    fixed_mask: str | None = None    # region of interest on the fixed grid: the similarity is computed inside it
    align: str | None = None         # None: the method's default (Capabilities.default_align)
    align_erode_mm: float | None = None  # None: automatic (whole-head scans: top of the head, scalp dropped);
                                         # 0: whole image; >0: foreground eroded by this many mm
    spacing_mm: float | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    grid_lines: int = 16


def check_request(req: RegisterRequest) -> None:
    """Refuse options that are out of range before any file is read (BadInput, one line, exit code 2).

    A zero, negative or NaN ``--spacing`` would otherwise run on some other grid, a negative ``--align-erode-mm``
    would grow the alignment region instead of eroding it. (Per-method options are checked by the method.)"""
    def number(value, flag: str, positive: bool) -> None:
        if value is None:
            return
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise BadInput(f"{flag} must be a number, got {value!r}") from None
        if not np.isfinite(v) or (v <= 0 if positive else v < 0):
            raise BadInput(f"{flag} must be a finite number {'> 0' if positive else '>= 0'} (mm), got {value!r}")

    number(req.spacing_mm, "--spacing", positive=True)
    number(req.align_erode_mm, "--align-erode-mm", positive=False)
    if req.align not in ("affine", "rigid", "none"):
        raise BadInput(f"unknown alignment {req.align!r}; use affine, rigid or none")
    if not isinstance(req.grid_lines, int) or req.grid_lines < 2:
        raise BadInput(f"grid_lines must be an integer >= 2, got {req.grid_lines!r}")
    for flag, path in (("--fixed", req.fixed), ("--moving", req.moving), ("--out", req.out_dir)):
        if not path or not str(path).strip():
            raise BadInput(f"{flag} is empty")


def check_inputs(req: RegisterRequest, method: Method) -> None:
    """The input gate, before any voxel is read: every input's header (io.images.check_header: size, memory,
    spacing, direction, NIfTI pixdim/qform/sform/file size; DICOM slice sizes), the pairing of optional inputs,
    the landmark files (three finite coordinates per row, equal counts) and a learned method's weights (present,
    inside the model folder, sha256). Fails in well under a second with exit code 2, 3 or 6."""
    if (req.fixed_seg is None) != (req.moving_seg is None):
        raise BadInput("give both --fixed-seg and --moving-seg, or neither")
    if (req.fixed_landmarks is None) != (req.moving_landmarks is None):
        raise BadInput("give both --fixed-landmarks and --moving-landmarks, or neither")
    for path, what in ((req.fixed, "fixed image"), (req.moving, "moving image"), (req.fixed_seg, "fixed segmentation"),
                       (req.moving_seg, "moving segmentation"), (req.fixed_mask, "fixed mask")):
        if path:
            images.check_header(path, what)
    if req.fixed_landmarks:
        n_f = len(images.read_landmarks(req.fixed_landmarks, "fixed landmarks"))
        n_m = len(images.read_landmarks(req.moving_landmarks, "moving landmarks"))
        if n_f != n_m:
            raise BadInput(f"landmark files have different lengths: {n_f} fixed vs {n_m} moving")
    method.check_ready()


def resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            built = "without CUDA" if torch.version.cuda is None else f"for CUDA {torch.version.cuda}"
            raise DeviceUnavailable(f"CUDA was requested but no CUDA device is available (torch {torch.__version__} "
                                    f"built {built}); use --device cpu or auto")
        return torch.device("cuda")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    raise BadInput(f"unknown device {name!r}; use auto, cpu or cuda")


def _span(reporter: Reporter, stage: str):
    a, b = _SPAN[stage]
    return lambda f, msg="": reporter.progress(a + (b - a) * min(max(f, 0.0), 1.0), msg)


def _padded_field_transform(disp_lps: np.ndarray, geom: Geometry) -> sitk.DisplacementFieldTransform:
    """DisplacementFieldTransform of a working-grid field padded by one edge-replicated voxel, so that points on
    the fixed grid's outermost voxels (which lie exactly on the working grid's border) are inside it."""
    padded = np.pad(disp_lps, ((1, 1), (1, 1), (1, 1), (0, 0)), mode="edge")
    origin = np.asarray(geom.origin_lps) - geom.direction @ np.asarray(geom.spacing_ijk)
    g = Geometry(tuple(origin), geom.spacing_ijk, geom.direction_lps, tuple(s + 2 for s in geom.size_ijk))
    return sitk.DisplacementFieldTransform(sitk.Cast(displacement_image(padded, g), sitk.sitkVectorFloat64))


def displacement_on_grid(transforms: list[sitk.Transform], reference: sitk.Image) -> sitk.Image:
    """T(x) − x (float64 vectors, LPS mm) on ``reference``'s grid for T = transforms[0] ∘ transforms[1] ∘ …
    (the last one is applied first)."""
    comp = sitk.CompositeTransform(3)
    for t in transforms:
        comp.AddTransform(t)
    f = sitk.TransformToDisplacementFieldFilter()
    f.SetReferenceImage(reference)
    f.SetOutputPixelType(sitk.sitkVectorFloat64)
    return f.Execute(comp)


def _normalise_onto(image: sitk.Image, geom: Geometry, transform: sitk.Transform | None) -> np.ndarray:
    """Anti-aliased resample onto the working grid, intensities scaled by the source image's own percentiles
    (taken before resampling, so the zeros outside the moving field of view do not shift them)."""
    window = intensity_window(sitk.GetArrayViewFromImage(image))
    src = smooth_for_downsampling(image, min(geom.spacing_ijk))
    return robust_normalise(sitk.GetArrayFromImage(resample(src, geom, transform, default=window[0])), window)


def _fold_region(det: np.ndarray, fixed: sitk.Image, user_fg: sitk.Image | None) -> sitk.Image | None:
    """Where percent_folded_foreground is counted (uint8 on the fixed grid): the user's mask, else the automatic
    foreground (Otsu, preprocess.foreground_mask). None when no voxel folds (det ≤ 0): the percentage is then 0 in
    any region (fold_stats reports the overall 0), so the automatic mask — ~0.9 s on a 1 mm brain, and learned
    diffeomorphic fields rarely fold — is only computed when it can change the number."""
    if user_fg is not None:
        return user_fg
    if not (det <= 0).any():
        return None
    return foreground_mask(fixed)


def _peak_cpu_memory_mb() -> float | None:
    """Peak resident memory of this process in MB, on every platform (None when it cannot be told).

    POSIX: ``getrusage`` ru_maxrss, which Linux gives in KiB and macOS in bytes. Windows (no ``resource``
    module): psutil's ``peak_wset`` when psutil is installed, else None.
    """
    try:
        import resource  # POSIX only: imported here so that the engine loads on Windows
    except ImportError:
        resource = None
    if resource is not None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(rss / (2 ** 20 if sys.platform == "darwin" else 1024.0), 1)
    try:
        import psutil
        info = psutil.Process().memory_info()
        peak = getattr(info, "peak_wset", None) or info.rss
        return round(peak / 2 ** 20, 1)
    except Exception:  # noqa: BLE001 - psutil absent or the call unsupported: no number rather than a failure
        return None


def _peak_memory_mb(device: torch.device) -> dict:
    out = {"cpu": _peak_cpu_memory_mb()}
    if device.type == "cuda":
        out["gpu"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return out


def available_memory_mb(device: torch.device) -> float | None:
    """Free memory on ``device`` in MB (None when it cannot be told)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free / 2 ** 20
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        import psutil
        return psutil.virtual_memory().available / 2 ** 20
    except ImportError:
        return None


# Bytes per fixed-grid voxel for the outputs (float64 field, Jacobian and its gradients, warped image, grid).
_BYTES_PER_FIXED_VOXEL = 260


def check_memory(method_cls, fixed_size: tuple[int, ...], moving_size: tuple[int, ...], fixed_spacing: tuple[float, ...],
                 spacing_mm: float | None, device: torch.device) -> dict:
    """Estimate the peak memory of a run and refuse it up front (OutOfMemory) when it cannot fit."""
    n_fixed, n_moving = float(np.prod(fixed_size)), float(np.prod(moving_size))
    ratio = 1.0 if not spacing_mm else float(np.prod([min(1.0, s / spacing_mm) for s in fixed_spacing]))
    n_work = n_fixed * ratio
    host_mb = (n_fixed * _BYTES_PER_FIXED_VOXEL + n_moving * 40) / 2 ** 20
    method_mb = n_work * method_cls.caps.bytes_per_working_voxel / 2 ** 20
    need = {"cpu": host_mb + (method_mb if device.type == "cpu" else 0.0)}
    if device.type == "cuda":
        need["gpu"] = method_mb
    for where, mb in need.items():
        avail = available_memory_mb(torch.device("cuda") if where == "gpu" else torch.device("cpu"))
        if avail is not None and mb > avail:
            raise OutOfMemory(f"this run needs about {mb / 1024:.1f} GB of {where.upper()} memory but only "
                              f"{avail / 1024:.1f} GB is free (fixed image {'x'.join(map(str, fixed_size))}); crop the "
                              f"images or use a coarser --spacing" + (" or --device cpu" if where == "gpu" else ""))
    return {k: round(v, 1) for k, v in need.items()}


def register(req: RegisterRequest, reporter: Reporter | None = None) -> dict:
    """Run one registration and write its result directory. Returns the report (also in report.json)."""
    reporter = reporter or Reporter(stream=None)
    t_start = time.perf_counter()
    method_cls = get_method(req.method)
    method = method_cls(**req.method_options)        # options checked before any work (one-line BadInput)
    if req.align is None:
        req = dataclasses.replace(req, align=method_cls.caps.default_align)
    check_request(req)
    device = resolve_device(req.device)
    result_dir = AtomicResultDir(req.out_dir, overwrite=req.overwrite,
                                 inputs=(req.fixed, req.moving, req.fixed_seg, req.moving_seg, req.fixed_landmarks,
                                         req.moving_landmarks, req.fixed_mask))
    check_inputs(req, method)  # headers, landmarks, weights: before the output is locked or any voxel read
    result_dir.check()  # fail before any work when the output place is unusable

    # -- load ---------------------------------------------------------------------------------------------
    reporter.stage("load", "reading images", _SPAN["load"][0])
    reporter.info("device", device=device.type, torch=torch.__version__)
    headers = images.read_header(req.fixed), images.read_header(req.moving)
    if all(headers):  # refuse runs that cannot fit before reading the voxels
        check_memory(method_cls, headers[0][0], headers[1][0], headers[0][1],
                     req.spacing_mm if req.spacing_mm is not None else method_cls.default_spacing(device), device)
    fixed = images.read_image(req.fixed, "fixed image")
    moving = images.read_image(req.moving, "moving image")
    images.check_intensities(fixed, "fixed image")
    images.check_intensities(moving, "moving image")
    fixed_seg = images.read_segmentation(req.fixed_seg, fixed, "fixed segmentation") if req.fixed_seg else None
    moving_seg = images.read_segmentation(req.moving_seg, moving, "moving segmentation") if req.moving_seg else None
    if (fixed_seg is None) != (moving_seg is None):
        raise BadInput("give both --fixed-seg and --moving-seg, or neither")
    if (req.fixed_landmarks is None) != (req.moving_landmarks is None):
        raise BadInput("give both --fixed-landmarks and --moving-landmarks, or neither")
    fixed_pts = moving_pts = None
    if req.fixed_landmarks:
        fixed_pts = images.read_landmarks(req.fixed_landmarks, "fixed landmarks")
        moving_pts = images.read_landmarks(req.moving_landmarks, "moving landmarks")
        if len(fixed_pts) != len(moving_pts):
            raise BadInput(f"landmark files have different lengths: {len(fixed_pts)} fixed vs {len(moving_pts)} moving")
    fixed_geom, moving_geom = Geometry.of(fixed), Geometry.of(moving)
    user_mask = images.read_segmentation(req.fixed_mask, fixed, "fixed mask") if req.fixed_mask else None
    if user_mask is not None and not sitk.GetArrayViewFromImage(user_mask).any():
        raise BadInput("fixed mask is empty")

    # -- initial alignment --------------------------------------------------------------------------------
    reporter.stage("align", f"initial alignment ({req.align})", _SPAN["align"][0])
    align_info: dict[str, Any] = {}
    if req.align == "none":
        align_t = sitk.AffineTransform(3)
    else:
        align_mask, align_info["metric_region"] = alignment_mask(fixed, user_mask, req.align_erode_mm)
        align_t = initial_alignment(fixed, moving, req.align, progress=_span(reporter, "align"),
                                    fixed_mask=align_mask, info=align_info)
    overlap = overlap_fraction(fixed, moving, align_t)
    if overlap < 0.2:
        hint = "" if req.align != "none" else " (initial alignment is off; try without --no-align)"
        raise BadInput(f"fixed and moving images do not overlap (only {100 * overlap:.0f}% of the fixed image maps "
                       f"into the moving image){hint}")

    # -- working grid ---------------------------------------------------------------------------------------
    reporter.stage("preprocess", "resampling onto the working grid", _SPAN["preprocess"][0])
    spacing = req.spacing_mm if req.spacing_mm is not None else method_cls.default_spacing(device)
    geom = working_grid(fixed, spacing)
    fixed_w = _normalise_onto(fixed, geom, None)
    moving_w = _normalise_onto(moving, geom, align_t)
    # The user's mask restricts the similarity; without one the methods use the whole grid, and the automatic
    # foreground (Otsu) only serves the fold statistics (see _fold_region).
    user_fg = sitk.Cast(user_mask > 0, sitk.sitkUInt8) if user_mask is not None else None
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))[None, None].to(device)  # noqa: E731
    mask_w = None
    if user_fg is not None:
        mask_w = to_t(sitk.GetArrayFromImage(resample(user_fg, geom, None, sitk.sitkNearestNeighbor)).astype(np.float32))
    pair = PairOnGrid(to_t(fixed_w), to_t(moving_w), geom, mask_w)

    # -- deformable registration ------------------------------------------------------------------------------
    reporter.stage("register", f"{req.method} on a {'x'.join(map(str, geom.size_ijk))} grid "
                               f"({'/'.join(f'{s:.2f}' for s in geom.spacing_ijk)} mm) on {device.type}",
                   _SPAN["register"][0])
    try:
        est: FieldEstimate = method.estimate(pair, device, _span(reporter, "register"))
    except (torch.OutOfMemoryError, MemoryError) as e:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise OutOfMemory(f"out of {'GPU' if device.type == 'cuda' else 'CPU'} memory during {req.method} on a "
                          f"{'x'.join(map(str, geom.size_ijk))} grid; retry with --device cpu or a coarser --spacing"
                          ) from e

    # -- map to the fixed grid, chain A, derived outputs -------------------------------------------------------
    reporter.stage("write", "writing results", _SPAN["write"][0])
    disp_vox = est.disp_vox.detach().double().cpu()[0].numpy()
    u_w_lps = lps_from_vox_disp(disp_vox, geom)
    fwd_field_t = _padded_field_transform(u_w_lps, geom)
    # T = A ∘ W as one field on the fixed grid. The transform takes the buffer of the filter's output and hands it
    # back without copying, so the ~165 MB float64 field of a 1 mm brain exists once; everything below reads it.
    T = sitk.DisplacementFieldTransform(displacement_on_grid([align_t, fwd_field_t], fixed))
    total_img = T.GetDisplacementField()
    total = sitk.GetArrayViewFromImage(total_img)                   # (K, J, I, 3) LPS mm, read-only view
    det = jacobian_det_lps(total, fixed_geom, dtype=torch.float32)  # float32: rounding ~1e-6 on O(1) values
    fold_region = _fold_region(det, fixed, user_fg)
    folds = fold_stats(det, None if fold_region is None else sitk.GetArrayViewFromImage(fold_region))
    inv_t = None
    extra_info: dict[str, Any] = {}
    if est.inverse_disp_vox is not None:
        inv_lps = lps_from_vox_disp(est.inverse_disp_vox.detach().double().cpu()[0].numpy(), geom)
        # the transform takes the buffer of this temporary field image: no copy
        inv_t = sitk.DisplacementFieldTransform(
            displacement_on_grid([_padded_field_transform(inv_lps, geom), align_t.GetInverse()], moving))
        extra_info["inverse_consistency_working_grid"] = inverse_consistency_vox(  # float32, as the method made them
            est.disp_vox.detach().float().cpu(), est.inverse_disp_vox.detach().float().cpu())
    warped = sitk.Resample(moving, fixed, T, sitk.sitkLinear, 0.0, sitk.sitkFloat32)

    report: dict[str, Any] = {
        "deepdiffreg_version": __version__,
        "method": req.method,
        "method_options": method.options,
        "method_info": {**est.info, **extra_info},
        "model": est.model,
        "device": device.type + (f" ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else ""),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "inputs": {"fixed": {"path": os.path.abspath(req.fixed), "geometry": fixed_geom.to_dict()},
                   "moving": {"path": os.path.abspath(req.moving), "geometry": moving_geom.to_dict()},
                   "fixed_seg": req.fixed_seg and os.path.abspath(req.fixed_seg),
                   "moving_seg": req.moving_seg and os.path.abspath(req.moving_seg),
                   "fixed_landmarks": req.fixed_landmarks and os.path.abspath(req.fixed_landmarks),
                   "moving_landmarks": req.moving_landmarks and os.path.abspath(req.moving_landmarks)},
        "preprocessing": {"working_grid": geom.to_dict(), "requested_spacing_mm": spacing,
                          "normalisation": "clip to the 0.5–99.5 percentiles of each image's non-background voxels, "
                                           "scale to [0, 1]; Gaussian anti-aliasing before downsampling",
                          "fixed_mask": req.fixed_mask and os.path.abspath(req.fixed_mask),
                          "foreground_for_fold_statistics": "the fixed mask" if user_mask is not None else
                          "Otsu on the smoothed fixed image, largest component, filled, dilated 2 voxels"},
        "initial_alignment": {"mode": req.align, **align_info, "matrix_lps": affine_matrix(align_t).round(6).tolist(),
                              "overlap_fraction": round(overlap, 4)},
        "transform_chain": "transform.h5 holds T(x) = A(x + u(x)) for fixed-space LPS points x (A: initial_alignment."
                           "matrix_lps, u: the method's field), as one displacement field on the fixed grid; "
                           "inverse.h5 holds T^-1 on the moving grid.",
        "folds": folds,
        "files": {},
    }
    warped_seg = None
    if fixed_seg is not None:
        warped_seg = sitk.Resample(moving_seg, fixed, T, sitk.sitkNearestNeighbor, 0)
    report.update(evaluate_transforms({"before": sitk.Transform(), "initial_alignment": align_t, "after": T},
                                      fixed, fixed_seg, moving_seg, fixed_pts, moving_pts,
                                      warped_segs={"after": warped_seg} if warped_seg is not None else None))

    with result_dir as tmp:
        p = lambda key: os.path.join(tmp, FILES[key])  # noqa: E731
        write_transform(T, p("transform"))
        report["files"]["transform"] = FILES["transform"]
        if inv_t is not None:
            write_transform(inv_t, p("inverse"))
            report["files"]["inverse"] = FILES["inverse"]
        write_scalar(det, fixed_geom, p("jacobian"), deflate=False)
        report["files"]["jacobian"] = FILES["jacobian"]
        sitk.WriteImage(warped, p("warped"), useCompression=True)
        report["files"]["warped"] = FILES["warped"]
        if warped_seg is not None:
            sitk.WriteImage(warped_seg, p("warped_seg"), useCompression=True)
            report["files"]["warped_seg"] = FILES["warped_seg"]
        for name, m in est.maps.items():
            arr = m.data.detach().float().cpu()[0, 0].numpy()
            fname = f"{name}.nii.gz"
            write_image(resample(geom.apply_to(sitk.GetImageFromArray(arr)), fixed_geom), os.path.join(tmp, fname),
                        deflate=False)
            report["files"][name] = fname
            report.setdefault("maps", {})[name] = {"file": fname, "unit": m.unit, "description": m.description}
        write_grid_vtk_lps(deformation_grid_lines(total, fixed_geom, det, lines_per_axis=req.grid_lines), p("grid"))
        report["files"]["grid"] = FILES["grid"]
        reporter.end_stage()
        report["timings_s"] = {k: round(v, 3) for k, v in reporter.stage_times.items()}
        report["timings_s"]["total"] = round(time.perf_counter() - t_start, 3)
        report["peak_memory_mb"] = _peak_memory_mb(device)
        write_report(report, p("report"))
    return report


def evaluate_transforms(transforms: dict[str, sitk.Transform], fixed: sitk.Image, fixed_seg: sitk.Image | None,
                        moving_seg: sitk.Image | None, fixed_pts: np.ndarray | None,
                        moving_pts: np.ndarray | None, warped_segs: dict[str, sitk.Image] | None = None) -> dict:
    """Dice (labels present in both segmentations) and landmark TRE for each named fixed → moving transform.

    ``warped_segs``: moving_seg already resampled (nearest neighbour, onto ``fixed``) through some of the named
    transforms; those are not resampled again. Returns {"dice": {"labels": [...], name: summary, ...},
    "tre_mm": {name: ..., ...}} for what was given.
    """
    warped_segs = warped_segs or {}
    out: dict[str, Any] = {}
    if fixed_seg is not None and moving_seg is not None:
        f_lab = sitk.GetArrayFromImage(fixed_seg)
        labels = sorted(set(np.unique(f_lab).tolist()) & set(np.unique(sitk.GetArrayFromImage(moving_seg)).tolist()) - {0})
        out["dice"] = {"labels": labels}
        for name, t in transforms.items():
            warped = warped_segs.get(name)
            if warped is None:
                warped = sitk.Resample(moving_seg, fixed, t, sitk.sitkNearestNeighbor, 0)
            # the view is read while ``warped`` (the image that owns the buffer) is alive
            out["dice"][name] = dice_summary(dice_per_label(f_lab, sitk.GetArrayViewFromImage(warped), labels))
    if fixed_pts is not None and moving_pts is not None:
        out["tre_mm"] = {"definition": "|T(fixed landmark) - moving landmark| in mm"}
        for name, t in transforms.items():
            mapped = np.array([t.TransformPoint(tuple(float(c) for c in p)) for p in fixed_pts])
            out["tre_mm"][name] = tre_mm(mapped, moving_pts)
    return out


def summary_of(report: dict) -> dict:
    """The few numbers a person looks at first (printed by the CLI, shown by the Slicer panel)."""
    s = {"method": report["method"], "device": report["device"], "seconds": report["timings_s"]["total"],
         "percent_folded": round(report["folds"]["percent_folded"], 4), "min_det": round(report["folds"]["min_det"], 4)}
    if "dice" in report:
        s["dice_before"] = round(report["dice"]["before"]["mean"], 4)
        s["dice_initial_alignment"] = round(report["dice"]["initial_alignment"]["mean"], 4)
        s["dice_after"] = round(report["dice"]["after"]["mean"], 4)
    if "tre_mm" in report:
        s["tre_before_mm"] = round(report["tre_mm"]["before"]["mean"], 3)
        s["tre_after_mm"] = round(report["tre_mm"]["after"]["mean"], 3)
    return s
