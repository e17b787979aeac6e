"""register(): the one place where the stages of a registration run are strung together.

check → load → initial alignment A_init → working grid (fixed box, method spacing) → contrast check (contrast.py:
a one-contrast method on images that look like two is refused) → method (OOM guard) →
compose the result (compose.py: T = A ∘ (id + u) as an ITK composite, Jacobian, grid, warped images) →
report → result directory (io.result_writer.write_result, atomic).

The written transform is T(x) = A(x + u(x)) for fixed-space points x (ITK resampling direction), A = A_init after
the method's own affine, kept as its own transform beside the displacement u on the (padded) working grid, so T = A
outside the field's grid too. The inverse (when the method has one) is T⁻¹(y) = A⁻¹(y) + w(A⁻¹(y)), w the method's
inverse field in fixed space. compose.py and report.json's "transform_chain" say exactly how the files chain.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__, contrast
from .align import affine_matrix, alignment_mask, initial_alignment, overlap_fraction
from .compat import OUT_OF_MEMORY_ERRORS
from .compose import FIELD_GRIDS, TRANSFORM_CHAIN, ComposedResult, compose_result
from .cores import spare_core, usable_cores
from .devices import resolve_device
from .errors import BadInput, OutOfMemory, RegistrationError
from .frames import Geometry
from .io import images
from .io.result_writer import AtomicResultDir, write_result
from .methods.base import FieldEstimate, Method, PairOnGrid, all_methods, get_method
from .metrics import dice_per_label_many, dice_summary, present_labels, tre_mm
from .peak_memory import peak_cpu_memory_mb
from .preprocess import (foreground_mask, intensity_window, resample, robust_normalise, smooth_for_downsampling,
                         working_grid, working_size)
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
    spacing_scale: float | None = None   # with no spacing_mm: the method's default spacing for this image times this
    method_options: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    grid_lines: int = 16
    field_grid: str = "working"      # where transform.h5's u and inverse.h5's w are stored (compose.FIELD_GRIDS):
                                     # the method's working grid (default) or the full-resolution fixed grid
    follow_up: bool = False          # the images are one patient's (a follow-up scan): PairOnGrid.follow_up
    contrast_check: str = "error"    # contrast.MODES: a one-contrast method on images that look like two contrasts
                                     # is refused ("error"), run with a warning ("warn") or not checked ("off")


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
            raise BadInput(f"{flag} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")

    number(req.spacing_mm, "--spacing", positive=True)
    number(req.spacing_scale, "--spacing-scale", positive=True)
    if req.spacing_mm is not None and req.spacing_scale is not None:
        raise BadInput("give --spacing or --spacing-scale, not both")
    number(req.align_erode_mm, "--align-erode-mm", positive=False)
    if req.align not in ("affine", "rigid", "none"):
        raise BadInput(f"unknown alignment {req.align!r}; use affine, rigid or none")
    if req.contrast_check not in contrast.MODES:
        raise BadInput(f"--contrast-check must be one of {', '.join(contrast.MODES)}, got {req.contrast_check!r}")
    if req.field_grid not in FIELD_GRIDS:
        raise BadInput(f"--field-grid must be one of {', '.join(FIELD_GRIDS)}, got {req.field_grid!r}")
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


def _span(reporter: Reporter, stage: str):
    a, b = _SPAN[stage]
    return lambda f, msg="": reporter.progress(a + (b - a) * min(max(f, 0.0), 1.0), msg)


def displacement_on_grid(transforms: list[sitk.Transform], reference: sitk.Image) -> sitk.Image:
    """T(x) − x (float64 vectors, LPS mm) on ``reference``'s grid for T = transforms[0] ∘ transforms[1] ∘ …
    (the last one is applied first). Any transform a file holds will do, the result contract's composites too:
    this is the baked field of the whole T (evaluate, benchmark), not what transform.h5 stores."""
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


class _FoldRegion:
    """Where percent_folded_foreground is counted (uint8 on the fixed grid): the user's mask, else the automatic
    foreground (Otsu, ``preprocess.foreground_mask``). ``for_det(det)`` is None when no voxel folds (det ≤ 0): the
    percentage is then 0 in any region (fold_stats reports the overall 0).

    The automatic mask takes ~0.8 s of one core on a 1 mm brain (Gaussian 0.36, dilation 0.15, Otsu 0.14) and was
    made in the write stage whenever a field folded a voxel (R2Net, NODEO on 1 mm pairs). With ``spare_core`` it is
    made beside the registration, on a helper thread started here (ITK releases the GIL), on the core that torch's
    threads leave free (``cli.default_threads``: cores − 1), and taken when a voxel folds; otherwise it is made
    then. ``close()`` waits for the thread: the pipeline calls it on every way out of a run (a thread still in ITK
    at the interpreter's exit must not be torn down)."""

    def __init__(self, fixed: sitk.Image, user_fg: sitk.Image | None, spare_core: bool):
        self._fixed, self._user_fg, self._mask = fixed, user_fg, None
        self._thread = None
        if user_fg is None and spare_core:
            self._thread = threading.Thread(target=self._make, name="deepdiffreg-fold-mask")
            self._thread.start()

    def _make(self) -> None:
        try:
            self._mask = foreground_mask(self._fixed)
        except Exception:          # made again on the calling thread, where its error is raised (for_det)
            self._mask = None

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def for_det(self, det: np.ndarray) -> sitk.Image | None:
        if self._user_fg is not None:
            return self._user_fg
        if not (det <= 0).any():
            return None
        self.close()
        if self._mask is None:
            self._mask = foreground_mask(self._fixed)
        return self._mask


def _peak_memory_mb(device: torch.device) -> dict:
    out = {"cpu": peak_cpu_memory_mb()}
    if device.type == "cuda":
        out["gpu"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return out


def available_memory_mb(device: torch.device) -> float | None:
    """Free memory on ``device`` in MB (None when it cannot be told)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free / 2 ** 20
    avail = images.available_memory_bytes()
    return None if avail is None else avail / 2 ** 20


# The run's CPU memory besides the method's own (``Capabilities.bytes_per_working_voxel``), from what each stage
# holds; checked against measured peaks by Testing/engine/test_memory_estimate.py (docs/memory.md):
_BASE_MB = 500                # interpreter, torch, SimpleITK, numpy and the engine imported, allocator slack
# per fixed voxel: the fixed image (float32), its segmentation, det ∇T (float32), the warped image (float32) and
# segmentation, the label copy of the Dice pass and the transient copies of reading and smoothing; the Jacobian,
# fold statistics and label counts run over slabs and chunks (compose.py, metrics.py)
_BYTES_PER_FIXED_VOXEL = 60    # 24 until the ct-512 benchmark run of 2026-12-02 14:48 (docs/benchmarks-large.md):
                                # peaks 4334 / 4751 / 4927 MB (nodeo / demons / vxm-diff), nodeo's above its estimate;
# 30 until 2026-12-07: the write stage's helper threads (the writer, the warp beside the Jacobian) and the fold mask
# made beside a short registration hold more fixed-grid arrays at once — 128×144×160 measured 637–641 MB without the
# fold-mask helper, 662–698 MB with it (64×64×56: 387–396 MB), i.e. up to ~113 B per added fixed voxel with the
# moving image's and the working grid's parts
_BYTES_PER_MOVING_VOXEL = 8   # the moving image (float32) and its segmentation
# per working voxel, the result stage's part on the working grid: u and w in LPS mm (float64, tapered and padded)
# held by the two transforms and the copy each composite makes, the method's float32 fields, FieldOnGrid's float32
# and float64 copies of u
_BYTES_PER_WORKING_VOXEL = 150
# --field-grid fixed: u and w resampled onto the padded fixed grid (float64 vectors) and the composite's copy of u
_BYTES_PER_FIXED_VOXEL_FULL_FIELD = 56
# Measured peaks of a run with a method that holds next to nothing, 2 mm working grid, 1 mm voxels: 96³ 555 MB,
# 160×192×224 865 MB, 512×512×300 (0.8×0.8×1.5 mm) 4331 MB; these constants give 550, 885, 4819 MB. With VmHWM
# (peak_memory.py; 2026-12-02): 128×144×160 561 MB (estimate 665), 160×224×192 at 1.5 / 2 / 3 mm 838 / 762 /
# 689 MB: the per-working-voxel part measures ~70-120 B, so 150 B keeps a margin (docs/field-grid.md).


def memory_budget_mb(method_cls, fixed_size, moving_size, fixed_spacing, spacing_mm: float | None,
                     field_grid: str = "working") -> dict[str, float]:
    """The up-front estimate of a run's peak memory in MB, by part: "base" (imports), "fixed" and "moving" (what
    the run holds per voxel of each image), "working" (the result stage's fields on the working grid), "method"
    (the method's estimate, ``bytes_per_working_voxel`` and ``extra_memory_mb``) and "full_field" (``field_grid="fixed"`` only)."""
    n_fixed, n_moving = float(np.prod(fixed_size)), float(np.prod(moving_size))
    n_work = float(np.prod(working_size(fixed_size, fixed_spacing, spacing_mm)))   # the grid working_grid makes
    mb = 1.0 / 2 ** 20
    return {"base": float(_BASE_MB), "fixed": n_fixed * _BYTES_PER_FIXED_VOXEL * mb,
            "moving": n_moving * _BYTES_PER_MOVING_VOXEL * mb, "working": n_work * _BYTES_PER_WORKING_VOXEL * mb,
            "method": n_work * method_cls.caps.bytes_per_working_voxel * mb + method_cls.caps.extra_memory_mb,
            "full_field": n_fixed * _BYTES_PER_FIXED_VOXEL_FULL_FIELD * mb if field_grid == "fixed" else 0.0}


def check_memory(method_cls, fixed_size: tuple[int, ...], moving_size: tuple[int, ...], fixed_spacing: tuple[float, ...],
                 spacing_mm: float | None, device: torch.device, field_grid: str = "working") -> dict:
    """Estimate the peak memory of a run (``memory_budget_mb``) and refuse it up front (OutOfMemory) when it cannot
    fit, naming what would make it fit."""
    parts = memory_budget_mb(method_cls, fixed_size, moving_size, fixed_spacing, spacing_mm, field_grid)
    host = sum(v for k, v in parts.items() if k != "method")
    need = {"cpu": host + (parts["method"] if device.type == "cpu" else 0.0)}
    if device.type == "cuda":
        need["gpu"] = parts["method"]
    for where, mb in need.items():
        avail = available_memory_mb(torch.device("cuda") if where == "gpu" else torch.device("cpu"))
        if avail is not None and mb > avail:
            hints = []
            if where == "gpu":
                hints.append("--device cpu")
            if parts["method"] + parts["working"] > 0.2 * mb:
                hints.append(f"a coarser --spacing (now {spacing_mm:g} mm)" if spacing_mm else "a coarser --spacing")
            if parts["full_field"] > 0:
                hints.append(f"--field-grid working (saves {parts['full_field'] / 1024:.1f} GB)")
            hints.append("crop the images to the region of interest")
            raise OutOfMemory(f"this run needs about {mb / 1024:.1f} GB of {where.upper()} memory but only "
                              f"{avail / 1024:.1f} GB is free (fixed image {'x'.join(map(str, fixed_size))}); "
                              + ", or ".join(hints))
    return {k: round(v, 1) for k, v in need.items()}


@dataclass
class _Inputs:
    """What load/check read: the images, the optional segmentations, landmarks and mask, their geometry."""
    fixed: sitk.Image
    moving: sitk.Image
    fixed_seg: sitk.Image | None
    moving_seg: sitk.Image | None
    fixed_pts: np.ndarray | None
    moving_pts: np.ndarray | None
    user_mask: sitk.Image | None
    fixed_geom: Geometry
    moving_geom: Geometry


@dataclass
class _Alignment:
    transform: sitk.Transform   # A_init: fixed point -> moving point
    info: dict[str, Any]
    overlap: float


def register(req: RegisterRequest, reporter: Reporter | None = None) -> dict:
    """Run one registration and write its result directory. Returns the report (also in report.json).

    The data flow, one function each: check the request → load and check the inputs → initial alignment →
    working grid → contrast check → the method's estimate (out-of-memory guard) → compose the result
    (compose.compose_result) → report → files (io.result_writer.write_result, which writes every file)."""
    reporter = reporter or Reporter(stream=None)
    t_start = time.perf_counter()
    req, method_cls, method, device, result_dir = _check_request(req)
    check_s = time.perf_counter() - t_start   # no progress event yet: a refused run never enters a stage
    inputs = _load(req, method_cls, device, reporter)
    alignment = _align(req, inputs, reporter)
    pair, spacing, user_fg = _working_pair(req, method_cls, inputs, alignment, device, reporter)
    run = _Run(req, method, device, result_dir, inputs, alignment, pair, spacing,
               _FoldRegion(inputs.fixed, user_fg, spare_core()), reporter, t_start, check_s)
    try:
        return _register_pair(run)
    finally:
        run.fold_region.close()


@dataclass
class _Run:
    """What ``register`` has made by the time the working pair is ready: what the method and the write stage use."""
    req: RegisterRequest
    method: Method
    device: torch.device
    result_dir: AtomicResultDir
    inputs: _Inputs
    alignment: _Alignment
    pair: PairOnGrid
    spacing: float
    fold_region: _FoldRegion
    reporter: Reporter
    t_start: float                    # perf_counter at the start of register
    check_s: float                    # the request/header checks, counted as loading


def _register_pair(run: _Run) -> dict:
    """``register`` from the working pair on: the contrast check, the method, the composition, report and files."""
    contrast_check = _contrast_check(run.req, run.method, run.pair, run.reporter)
    run.pair.contrast = contrast_check  # a method's own checks read the pipeline's, not a second statistic
    run.pair.follow_up = bool(run.req.follow_up)
    est = _estimate(run.req, run.method, run.pair, run.device, run.reporter)
    try:
        return _write(run, est, contrast_check)
    finally:
        for m in est.maps.values():
            m.close()                         # a map made beside the write stage: its thread has ended


def _write(run: _Run, est: FieldEstimate, contrast_check: dict | None) -> dict:
    """The write stage: compose the estimate into the result contract, then the report and the files."""
    req, inputs, reporter = run.req, run.inputs, run.reporter
    reporter.stage("write", "writing results", _SPAN["write"][0])
    parts: dict[str, float] = {}          # report.json timings_s.write_parts: where the write stage goes
    # a map still being made holds the spare core: the write stage then keeps to this thread (a helper of its own
    # beside it would slow the map down, which the write stage ends up waiting for)
    helpers = not any(m.deferred for m in est.maps.values())
    t0 = time.perf_counter()
    composed = compose_result(est, run.pair.geometry, run.alignment.transform, inputs.fixed, inputs.moving,
                              moving_seg=inputs.moving_seg if inputs.fixed_seg is not None else None,
                              fold_region=run.fold_region.for_det,
                              grid_lines=req.grid_lines, field_grid=req.field_grid, helpers=helpers)
    parts["compose"] = round(time.perf_counter() - t0, 3)   # transforms, Jacobian, folds, grid, warped images

    def make_report() -> dict:   # Dice, TRE and the rest of report.json, while the files are written beside it
        t0 = time.perf_counter()
        rep = _report(req, run.method, run.device, inputs, run.alignment, run.pair.geometry, run.spacing, est,
                      composed)
        rep["contrast_check"] = contrast_check
        parts["metrics"] = round(time.perf_counter() - t0, 3)
        return rep

    def finish(rep: dict) -> None:  # when every other file is written, just before report.json
        reporter.end_stage()
        times = dict(reporter.stage_times)
        times["load"] = times.get("load", 0.0) + run.check_s   # the request/header checks count as loading, so
        rep["timings_s"] = {k: round(v, 3) for k, v in times.items()}   # the stages add up to the total
        rep["timings_s"]["total"] = round(time.perf_counter() - run.t_start, 3)
        rep["timings_s"]["write_parts"] = dict(parts)
        beside = {}    # maps made on a helper beside the write stage: how long each took, and how long its file
        for name, m in est.maps.items():    # waited for it (a part of write_parts' time for that file)
            if m.deferred:
                beside.update({name: m.deferred.seconds, f"{name} (waited for)": m.deferred.waited})
        if beside:
            rep["timings_s"]["maps_beside_write_parts"] = beside
        rep["peak_memory_mb"] = _peak_memory_mb(run.device)

    return write_result(run.result_dir, composed.data, make_report, before_report=finish, parts=parts,
                        helper=helpers)


def _check_request(req: RegisterRequest):
    """The method and its options, the alignment mode, the device and the output place, checked before any work."""
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
    return req, method_cls, method, device, result_dir


def working_spacing_mm(req: RegisterRequest, method_cls, device: torch.device, fixed_size, fixed_spacing) -> float:
    """The working grid's spacing (mm): ``--spacing``, else the method's default for this fixed image
    (``Method.default_spacing``: device, and a finer grid for fine images) times ``--spacing-scale``, in quarter
    millimetres (the Slicer panel's Fast / Accurate presets ask for 1.5x / 0.75x of what the engine would choose)."""
    if req.spacing_mm is not None:
        return float(req.spacing_mm)
    spacing = float(method_cls.default_spacing(device, fixed_size, fixed_spacing))
    if req.spacing_scale is None:
        return spacing
    return max(round(spacing * float(req.spacing_scale) * 4) / 4, 0.25)


def _load(req: RegisterRequest, method_cls, device: torch.device, reporter: Reporter) -> _Inputs:
    """Read and check the images, segmentations, landmarks and mask (refusing runs that cannot fit first). Runs
    after ``check_inputs`` (headers, pairing of the optional inputs, landmark counts)."""
    reporter.stage("load", "reading images", _SPAN["load"][0])
    reporter.info("device", device=device.type, torch=torch.__version__)
    headers = images.read_header(req.fixed), images.read_header(req.moving)
    if all(headers):  # refuse runs that cannot fit before reading the voxels
        check_memory(method_cls, headers[0][0], headers[1][0], headers[0][1],
                     working_spacing_mm(req, method_cls, device, headers[0][0], headers[0][1]), device,
                     req.field_grid)
    fixed = images.read_image(req.fixed, "fixed image")
    moving = images.read_image(req.moving, "moving image")
    images.check_intensities(fixed, "fixed image")
    images.check_intensities(moving, "moving image")
    fixed_seg = images.read_segmentation(req.fixed_seg, fixed, "fixed segmentation") if req.fixed_seg else None
    moving_seg = images.read_segmentation(req.moving_seg, moving, "moving segmentation") if req.moving_seg else None
    fixed_pts = moving_pts = None     # given in pairs and of equal length: check_inputs made sure
    if req.fixed_landmarks:
        fixed_pts = images.read_landmarks(req.fixed_landmarks, "fixed landmarks")
        moving_pts = images.read_landmarks(req.moving_landmarks, "moving landmarks")
    user_mask = images.read_segmentation(req.fixed_mask, fixed, "fixed mask") if req.fixed_mask else None
    if user_mask is not None and not sitk.GetArrayViewFromImage(user_mask).any():
        raise BadInput("fixed mask is empty")
    return _Inputs(fixed, moving, fixed_seg, moving_seg, fixed_pts, moving_pts, user_mask, Geometry.of(fixed),
                   Geometry.of(moving))


def _align(req: RegisterRequest, inputs: _Inputs, reporter: Reporter) -> _Alignment:
    """The initial alignment A_init (identity with --no-align), refused when the images then barely overlap."""
    reporter.stage("align", f"initial alignment ({req.align})", _SPAN["align"][0])
    info: dict[str, Any] = {}
    if req.align == "none":
        align_t = sitk.AffineTransform(3)
    else:
        align_mask, info["metric_region"] = alignment_mask(inputs.fixed, inputs.user_mask, req.align_erode_mm)
        align_t = initial_alignment(inputs.fixed, inputs.moving, req.align, progress=_span(reporter, "align"),
                                    fixed_mask=align_mask, info=info)
    overlap = overlap_fraction(inputs.fixed, inputs.moving, align_t)
    if overlap < 0.2:
        hint = "" if req.align != "none" else " (initial alignment is off; try without --no-align)"
        raise BadInput(f"fixed and moving images do not overlap (only {100 * overlap:.0f}% of the fixed image maps "
                       f"into the moving image){hint}")
    return _Alignment(align_t, info, overlap)


def _working_pair(req: RegisterRequest, method_cls, inputs: _Inputs, alignment: _Alignment, device: torch.device,
                  reporter: Reporter) -> tuple[PairOnGrid, float, sitk.Image | None]:
    """Fixed and aligned moving image on the working grid (the fixed box at the method's spacing), normalised.
    Returns (the pair, the requested spacing, the user's mask as uint8 on the fixed grid or None)."""
    reporter.stage("preprocess", "resampling onto the working grid", _SPAN["preprocess"][0])
    spacing = working_spacing_mm(req, method_cls, device, inputs.fixed.GetSize(), inputs.fixed.GetSpacing())
    geom = working_grid(inputs.fixed, spacing)
    fixed_w = _normalise_onto(inputs.fixed, geom, None)
    moving_w = _normalise_onto(inputs.moving, geom, alignment.transform)
    # The user's mask restricts the similarity; without one the methods use the whole grid, and the automatic
    # foreground (Otsu) only serves the fold statistics (see _FoldRegion).
    user_fg = sitk.Cast(inputs.user_mask > 0, sitk.sitkUInt8) if inputs.user_mask is not None else None
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))[None, None].to(device)  # noqa: E731
    mask_w = None
    if user_fg is not None:
        mask_w = to_t(sitk.GetArrayFromImage(resample(user_fg, geom, None, sitk.sitkNearestNeighbor)).astype(np.float32))
    return PairOnGrid(to_t(fixed_w), to_t(moving_w), geom, mask_w), spacing, user_fg


def _contrast_check(req: RegisterRequest, method, pair: PairOnGrid, reporter: Reporter) -> dict | None:
    """report.json's ``contrast_check`` (contrast.check; None with --contrast-check off). A method that handles one
    contrast, on images that look like two, is refused before it runs (BadInput) or, with --contrast-check warn,
    run with a warning that report.json and the Slicer panel carry."""
    if req.contrast_check == "off":
        return None
    result = contrast.check(pair.fixed, pair.moving, pair.fixed_mask, method.contrasts(), pair.geometry.spacing_ijk)
    if result["mismatch"]:
        aligned = req.align != "none"
        if req.contrast_check == "error":
            raise BadInput(contrast.mismatch_message(req.method, result, _methods_for_two_contrasts(), aligned))
        result["warning"] = contrast.mismatch_warning(req.method, result, aligned)
        reporter.info(result["warning"], warning=True)
    return result


def _methods_for_two_contrasts() -> list[str]:
    """The methods that handle different contrasts and can run here with their defaults (weights installed)."""
    names = []
    for name, cls in sorted(all_methods().items()):
        if name.startswith("_") or (cls.caps.contrasts != "different" and not cls.caps.learned):
            continue                 # a test's method, or one declared for one contrast that no model can change
        try:
            m = cls()
            m.check_ready()
        except RegistrationError:
            continue
        if m.contrasts() == "different":
            names.append(name)
    return names


def _estimate(req: RegisterRequest, method, pair: PairOnGrid, device: torch.device, reporter: Reporter) -> FieldEstimate:
    """The method's estimate; running out of memory becomes OutOfMemory (exit code 3) with a hint."""
    geom = pair.geometry
    reporter.stage("register", f"{req.method} on a {'x'.join(map(str, geom.size_ijk))} grid "
                               f"({'/'.join(f'{s:.2f}' for s in geom.spacing_ijk)} mm) on {device.type}",
                   _SPAN["register"][0])
    try:
        return method.estimate(pair, device, _span(reporter, "register"))
    except OUT_OF_MEMORY_ERRORS as e:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise OutOfMemory(f"out of {'GPU' if device.type == 'cuda' else 'CPU'} memory during {req.method} on a "
                          f"{'x'.join(map(str, geom.size_ijk))} grid; retry with --device cpu or a coarser --spacing"
                          ) from e


def _report(req: RegisterRequest, method, device: torch.device, inputs: _Inputs, alignment: _Alignment,
            geom: Geometry, spacing: float, est: FieldEstimate, composed: ComposedResult) -> dict:
    """report.json's content (the files, timings and peak memory are added when they are written), with Dice and
    TRE before, after the initial alignment and after."""
    report: dict[str, Any] = {
        "deepdiffreg_version": __version__,
        "method": req.method,
        "method_options": method.options,
        "method_info": {**est.info, **composed.method_info},
        "model": est.model,
        "device": device.type + (f" ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else ""),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "usable_cores": usable_cores(), "torch": torch.__version__},
        "inputs": {"fixed": {"path": os.path.abspath(req.fixed), "geometry": inputs.fixed_geom.to_dict()},
                   "moving": {"path": os.path.abspath(req.moving), "geometry": inputs.moving_geom.to_dict()},
                   "fixed_seg": req.fixed_seg and os.path.abspath(req.fixed_seg),
                   "moving_seg": req.moving_seg and os.path.abspath(req.moving_seg),
                   "fixed_landmarks": req.fixed_landmarks and os.path.abspath(req.fixed_landmarks),
                   "moving_landmarks": req.moving_landmarks and os.path.abspath(req.moving_landmarks),
                   "follow_up": bool(req.follow_up)},
        "preprocessing": {"working_grid": geom.to_dict(), "requested_spacing_mm": spacing,
                          "normalisation": "clip to the 0.5–99.5 percentiles of each image's non-background voxels, "
                                           "scale to [0, 1]; Gaussian anti-aliasing before downsampling",
                          "fixed_mask": req.fixed_mask and os.path.abspath(req.fixed_mask),
                          "foreground_for_fold_statistics": "the fixed mask" if inputs.user_mask is not None else
                          "Otsu on the smoothed fixed image, largest component, filled, dilated 2 voxels"},
        "initial_alignment": {"mode": req.align, **alignment.info,
                              "matrix_lps": affine_matrix(alignment.transform).round(6).tolist(),
                              "overlap_fraction": round(alignment.overlap, 4)},
        "transform_chain": TRANSFORM_CHAIN,
        "transform_geometry": composed.chain,
        "folds": composed.folds,
        "files": {},
    }
    T = composed.data.transform
    report.update(evaluate_transforms({"before": sitk.Transform(), "initial_alignment": alignment.transform, "after": T},
                                      inputs.fixed, inputs.fixed_seg, inputs.moving_seg, inputs.fixed_pts,
                                      inputs.moving_pts,
                                      warped_segs={"after": composed.data.warped_seg}
                                      if composed.data.warped_seg is not None else None))
    return report


def _is_identity(t: sitk.Transform) -> bool:
    """Whether ``t`` maps every point to itself (an identity or a zero-parameter translation/affine)."""
    if t.GetName() == "IdentityTransform" or (t.GetName() == "Transform" and not t.GetParameters()):
        return True
    if t.GetName() in ("AffineTransform", "TranslationTransform", "Euler3DTransform"):
        return np.array_equal(affine_matrix(t), np.eye(4))
    return False


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
        labels = sorted(set(present_labels(f_lab)) & set(present_labels(sitk.GetArrayViewFromImage(moving_seg))) - {0})
        out["dice"] = {"labels": labels}
        images = []                                # kept alive while their array views are read
        for name, t in transforms.items():
            warped = warped_segs.get(name)
            if warped is None and _is_identity(t) and Geometry.of(moving_seg) == Geometry.of(fixed):
                warped = moving_seg                # nearest neighbour through the identity onto its own grid
            if warped is None:
                warped = sitk.Resample(moving_seg, fixed, t, sitk.sitkNearestNeighbor, 0)
            images.append(warped)
        per_label = dice_per_label_many(f_lab, [sitk.GetArrayViewFromImage(w) for w in images], labels)
        for name, d in zip(transforms, per_label):
            out["dice"][name] = dice_summary(d)
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
    warning = (report.get("contrast_check") or {}).get("warning")
    if warning:
        s["warning"] = warning
    return s
