"""Compose a method's estimate and the initial alignment into the result contract's transforms and maps.

The written transform is T(x) = A(x + u(x)) for fixed-space LPS points x (the ITK resampling direction: fixed point
→ moving point), A = A_init ∘ A_method (the initial alignment after the method's own affine, if it has one) and u
the method's displacement in LPS mm. transform.h5 holds ONE flat ITK CompositeTransform of two transforms:

    [0] AffineTransform A                       ITK applies a composite's transforms last first,
    [1] DisplacementFieldTransform U: x + u(x)  so T(x) = A(U(x)) = A(x + u(x))

A stays its own transform, so the affine holds everywhere: outside the field's grid ITK, ANTs and Slicer all give
T(x) = A(x). u is stored on the method's own working grid (``field_grid="working"``, the default: the fixed image's
box at the working spacing, first to last voxel centre, so every fixed voxel lies inside it and nothing is
resampled) or, with ``field_grid="fixed"``, resampled onto the fixed image's own grid (full resolution, float64:
~190 MB for a 1 mm brain). Either grid is padded by a few voxels on each side over which u falls linearly to
exactly 0 at the padded grid's outer layer: there ITK's "zero outside the field" and Slicer's "edge value outside
the grid" are the same number, so the two agree everywhere. At every fixed voxel centre both files give the same T
(the full-resolution field is the working field sampled there); between voxel centres the fixed-grid file adds a
second linear interpolation (measured: docs/field-grid.md). The ramp along index axis a is L_a = e_a / TAPER_SLOPE
long, e_a the largest displacement component that points out of the grid's two faces across axis a (only that
component can fold the ramp: there det ∇(x + u) ≈ 1 − e_a / L_a ≥ 1 − TAPER_SLOPE), at least TAPER_MIN_VOXELS
voxels and at most TAPER_MAX_MM, so T = A from TAPER_MAX_MM outside the fixed image on (fold-free beside it while
e_a ≤ TAPER_MAX_MM).

inverse.h5 holds T⁻¹(y) = A⁻¹(y) + w(A⁻¹(y)) (moving point → fixed point), w the method's inverse field, which
lives in fixed space: [0] DisplacementFieldTransform W: y' + w(y'), [1] AffineTransform A⁻¹ (applied first). w is
stored on the same grid as u (padded working grid, or padded fixed grid with ``field_grid="fixed"``); a method that
states its own inverse grid (``FieldEstimate.inverse_geometry``) gets w written on that grid, padded the same way,
not resampled.

The Jacobian is det ∇T in physical space, det(A)·det(I + ∇u) on the fixed grid, from u as ITK interpolates the
stored field at the fixed voxels (``FieldOnGrid``, slab by slab, interpolated and differentiated in float32:
no full-resolution copy of u is made with the working grid); the deformation grid's vertices are moved by the whole
T; the warped images are sampled at T(x) from the same slabs of u (``SlabWarp``: the numbers Resample through the
composite gives, to float32 rounding, with T evaluated once per voxel for all images).
"""
from __future__ import annotations

import functools
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from .align import affine_matrix
from .frames import Geometry, displacement_image, lps_from_vox_disp
from .io.result_writer import MapImage, ResultData, deformation_grid_lines
from .methods.base import FieldEstimate
from .metrics import fold_stats, inverse_consistency_vox, jacobian_det_lps
from .preprocess import resample
from .sampling import ItkSampler

# The ramp outside the fixed grid (see the module docstring). Measured on a vxm-diff run of an IXI pair (2 mm grid,
# whole head): outward border components 15.5 / 3.9 / 8.8 mm along i / j / k, ramps 20 / 7.8 / 17.7 mm.
TAPER_SLOPE = 0.5
TAPER_MIN_VOXELS = 2
TAPER_MAX_MM = 20.0


@dataclass
class ComposedResult:
    """What ``compose_result`` makes: the files' content (``data``) and the facts report.json records."""
    data: ResultData
    folds: dict[str, Any]
    chain: dict[str, Any]                          # report.json "transform_geometry"
    method_info: dict[str, Any] = field(default_factory=dict)


# -- pieces ---------------------------------------------------------------------------------------------------------
def outward_displacement_mm(disp_lps: np.ndarray, geom: Geometry) -> tuple[float, float, float]:
    """Per index axis (i, j, k): the largest component of u (mm) along that axis pointing out of the grid through
    one of the two faces across it (0 when none points out)."""
    comp = np.asarray(disp_lps) @ geom.direction          # components along the index axes' unit vectors
    out = []
    for a in range(3):                                    # index axis a is array axis 2 - a
        ax = 2 - a
        lo = -np.take(comp[..., a], 0, axis=ax)
        hi = np.take(comp[..., a], comp.shape[ax] - 1, axis=ax)
        out.append(float(max(0.0, lo.max(), hi.max())))
    return tuple(out)


def taper_lengths_mm(disp_lps: np.ndarray, geom: Geometry) -> tuple[float, float, float]:
    return tuple(min(e / TAPER_SLOPE, TAPER_MAX_MM) for e in outward_displacement_mm(disp_lps, geom))


def padded_geometry(geom: Geometry, pad_ijk) -> Geometry:
    """``geom`` grown by ``pad_ijk`` voxels on both sides of each index axis (same spacing and direction)."""
    pad = np.asarray(pad_ijk, dtype=float)
    origin = np.asarray(geom.origin_lps) - geom.direction @ (pad * np.asarray(geom.spacing_ijk))
    return Geometry(tuple(float(o) for o in origin), geom.spacing_ijk, geom.direction_lps,
                    tuple(int(s + 2 * p) for s, p in zip(geom.size_ijk, pad_ijk)))


def tapered_field(disp_lps: np.ndarray, geom: Geometry, lengths_mm) -> tuple[np.ndarray, Geometry, tuple]:
    """The field padded across index axis a by ``n_a`` voxels on both sides (``n_a·spacing_a ≥ lengths_mm[a]``, at
    least TAPER_MIN_VOXELS) with its edge value times a linear ramp that is 1 on the grid and exactly 0 on the padded
    grid's outer layer. Returns (padded (K', J', I', 3) float64 array, its geometry, n per index axis (i, j, k))."""
    def n_of(length: float, h: float) -> int:
        n = math.ceil(length / h - 1e-9)
        if n * h > TAPER_MAX_MM + 1e-9:                   # the ramp ends within TAPER_MAX_MM of the grid
            n = math.floor(TAPER_MAX_MM / h + 1e-9)
        return max(TAPER_MIN_VOXELS, n)
    n_ijk = tuple(n_of(L, h) for L, h in zip(lengths_mm, geom.spacing_ijk))
    n_kji = n_ijk[::-1]
    out = np.pad(np.asarray(disp_lps, dtype=np.float64), [(n, n) for n in n_kji] + [(0, 0)], mode="edge")
    for axis, n in enumerate(n_kji):
        w = 1.0 - np.arange(1, n + 1) / n                                   # distance 1..n voxels: ... → 0
        shape = [1] * 4
        shape[axis] = n
        lo = [slice(None)] * 4
        hi = [slice(None)] * 4
        lo[axis], hi[axis] = slice(0, n), slice(out.shape[axis] - n, out.shape[axis])
        out[tuple(lo)] *= w[::-1].reshape(shape)
        out[tuple(hi)] *= w.reshape(shape)
    return out, padded_geometry(geom, n_ijk), n_ijk


def sample_field(transform: sitk.Transform, geom: Geometry) -> sitk.Image:
    """transform(x) − x (float64 vectors, LPS mm) on ``geom``."""
    f = sitk.TransformToDisplacementFieldFilter()
    f.SetSize([int(s) for s in geom.size_ijk])
    f.SetOutputOrigin([float(o) for o in geom.origin_lps])
    f.SetOutputSpacing([float(s) for s in geom.spacing_ijk])
    f.SetOutputDirection([float(d) for d in geom.direction_lps])
    f.SetOutputPixelType(sitk.sitkVectorFloat64)
    return f.Execute(transform)


def affine_transform(m: np.ndarray) -> sitk.AffineTransform:
    """sitk AffineTransform of a 4×4 homogeneous LPS matrix (centre 0)."""
    m = np.asarray(m, dtype=np.float64)
    t = sitk.AffineTransform(3)
    t.SetMatrix(tuple(float(v) for v in m[:3, :3].ravel()))
    t.SetTranslation(tuple(float(v) for v in m[:3, 3]))
    return t


def chained_affine(align_t: sitk.Transform, method_affine_lps: np.ndarray | None) -> sitk.AffineTransform:
    """A = A_init ∘ A_method as one affine (``align_t`` itself, centre kept, when the method has no affine)."""
    if method_affine_lps is None:
        return align_t if isinstance(align_t, sitk.AffineTransform) else affine_transform(affine_matrix(align_t))
    return affine_transform(affine_matrix(align_t) @ np.asarray(method_affine_lps, dtype=np.float64))


def composite(*transforms: sitk.Transform) -> sitk.CompositeTransform:
    """Flat composite of ``transforms`` in file order (ITK applies the last one first)."""
    c = sitk.CompositeTransform(3)
    for t in transforms:
        c.AddTransform(t)
    return c


def _field_on_fixed(disp_lps: np.ndarray, src_geom: Geometry, fixed_geom: Geometry | None
                    ) -> tuple[sitk.Image, Geometry, tuple, float]:
    """The tapered field as a float64 vector image: resampled onto the fixed grid padded enough to hold the whole
    ramp (``fixed_geom`` given), or on ``src_geom`` padded (``fixed_geom`` None). Returns (image, its geometry,
    pad per index axis, ramp length per index axis in mm)."""
    length = taper_lengths_mm(disp_lps, src_geom)
    padded, pgeom, n_ijk = tapered_field(disp_lps, src_geom, length)
    if fixed_geom is None:
        return displacement_image(padded, pgeom), pgeom, n_ijk, length
    src = sitk.DisplacementFieldTransform(displacement_image(padded, pgeom))  # takes the image's buffer
    del padded
    # one more voxel than the taper needs: the outer layer lies beyond the source's last (zero) node
    pad = tuple(math.ceil(n * hs / hf - 1e-9) + 1
                for n, hs, hf in zip(n_ijk, src_geom.spacing_ijk, fixed_geom.spacing_ijk))
    fgeom = padded_geometry(fixed_geom, pad)
    return sample_field(src, fgeom), fgeom, pad, length


def _interior(view: np.ndarray, pad_ijk) -> np.ndarray:
    pk, pj, pi = pad_ijk[::-1]
    return view[pk:view.shape[0] - pk, pj:view.shape[1] - pj, pi:view.shape[2] - pi]


class FieldOnGrid:
    """A displacement stored on one grid (``src_geom``), read at the voxels of another grid with the same
    direction (``target``) as ITK's DisplacementFieldTransform reads it: trilinear in the source's continuous
    index (done as linear interpolation along each index axis in turn, which is the same thing), zero outside the
    source grid's nodes. (ITK reads the edge value up to half a voxel beyond the last node, then zero: the same
    numbers for the fields written here, whose outer layer is zero — the taper's.) Only the k-planes asked for are
    made, so a full-resolution copy of the field never exists.

    ``disp_lps``: (K', J', I', 3) LPS mm on ``src_geom`` (or (K', J', I', C): any C values per voxel, e.g. one for a
    scalar map). ``shape``: the target's (K, J, I, C).
    ``planes(k0, k1)`` → (k1 − k0, J, I, C) float32 array (what ``metrics.jacobian_det_lps`` reads slab by slab);
    ``planes(k0, k1)`` is also what ``SlabWarp`` makes T(x) from (float32: ~1e-5 voxel from the float64 numbers);
    ``planes(k0, k1, torch.float64)`` the same computed in float64 (tests compare it with ITK's reading);
    ``at(kji)`` → (n, C) float64 at integer target indices (the deformation grid's vertices), computed in float64.
    """

    def __init__(self, disp_lps: np.ndarray, src_geom: Geometry, target: Geometry):
        if not np.allclose(src_geom.direction, target.direction, atol=1e-9):
            raise ValueError("FieldOnGrid: the field's grid and the target grid need the same direction")
        self.src64 = np.asarray(disp_lps, dtype=np.float64)                        # (K', J', I', 3), for at()
        self.src = torch.from_numpy(np.ascontiguousarray(disp_lps, dtype=np.float32))   # the same, for planes()
        self.shape = tuple(target.shape_kji) + (self.src.shape[-1],)
        # continuous source index of each target voxel along each index axis (same direction: axis by axis)
        offset_ijk = target.direction.T @ (np.asarray(target.origin_lps) - np.asarray(src_geom.origin_lps))
        self._axes = []                                   # per array axis (k, j, i): (i0, frac, inside), torch
        self._axes64 = []                                 # the same in numpy, frac in float64 (for at())
        for a in range(3):                                # index axis a = array axis 2 - a
            n_src, n_tgt = src_geom.size_ijk[a], target.size_ijk[a]
            c = (offset_ijk[a] + np.arange(n_tgt) * target.spacing_ijk[a]) / src_geom.spacing_ijk[a]
            c = np.where(np.abs(c - np.round(c)) < 1e-6, np.round(c), c)   # nodes that coincide, exactly
            inside = (c >= 0) & (c <= n_src - 1)
            i0 = np.clip(np.floor(c), 0, max(n_src - 2, 0)).astype(np.int64)
            frac = np.where(inside, c - i0, 0.0)
            self._axes.insert(0, (torch.from_numpy(i0), torch.from_numpy(frac.astype(np.float32)),
                                  torch.from_numpy(inside)))
            self._axes64.insert(0, (i0, frac, inside))
        self.covers_target = all(bool(ins.all()) for _, _, ins in self._axes64)   # every target voxel inside
        # float64 twins for planes(..., torch.float64); the source may be a read-only view: it is only read
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self._src_f64 = torch.from_numpy(self.src64)
        self._axes_f64 = [(i0, torch.from_numpy(f), ins) for (i0, _, ins), (_, f, _) in zip(self._axes, self._axes64)]

    @staticmethod
    def _lerp(x: torch.Tensor, axis: int, i0: torch.Tensor, frac: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[axis] = -1
        lo = x.index_select(axis, i0)
        hi = x.index_select(axis, torch.clamp(i0 + 1, max=x.shape[axis] - 1))
        out = torch.lerp(lo, hi, frac.view(shape))
        if not bool(inside.all()):
            out *= inside.view(shape).to(out.dtype)        # outside the field's grid: zero displacement (ITK)
        return out

    def planes(self, k0: int, k1: int, dtype: torch.dtype = torch.float32) -> np.ndarray:
        # the smallest arrays take the gathers: along i on the source planes the slab needs, then along j; the
        # k step, whose result is the whole slab, is one lerp of two whole source planes per target plane (no
        # gathered copies). k first (the older order) was 1.5-2x slower: its gathers along i ran on the slab.
        axes, src = (self._axes, self.src) if dtype == torch.float32 else (self._axes_f64, self._src_f64)
        i0, frac, inside = (t[k0:k1] for t in axes[0])
        lo = int(i0.min())
        x = src[lo:min(int(i0.max()) + 2, src.shape[0])]
        x = self._lerp(x, 2, *axes[2])
        x = self._lerp(x, 1, *axes[1])
        out = torch.empty((k1 - k0,) + tuple(x.shape[1:]), dtype=x.dtype)
        top = x.shape[0] - 1
        for p, (a, f, ins) in enumerate(zip((i0 - lo).tolist(), frac.tolist(), inside.tolist())):
            if not ins:
                out[p].zero_()                            # outside the field's grid: zero displacement (ITK)
            else:
                torch.lerp(x[a], x[min(a + 1, top)], f, out=out[p])
        return out.numpy()

    def at(self, kji) -> np.ndarray:
        out = np.zeros((len(kji[0]), self.shape[-1]))
        parts = []
        for axis, idx in enumerate(kji):
            parts.append(tuple(t[np.asarray(idx)] for t in self._axes64[axis]))
        src = self.src64
        for corner in range(8):
            bits = [(corner >> (2 - a)) & 1 for a in range(3)]
            w = np.ones(len(out))
            index = []
            for a, (i0, frac, inside) in enumerate(parts):
                w = w * np.where(bits[a], frac, 1.0 - frac) * inside
                index.append(np.minimum(i0 + bits[a], src.shape[a] - 1))
            out += w[:, None] * src[tuple(index)]
        return out


WARP_SLAB = 16   # k-planes per pass of warp_images: a 1 mm brain's slab of positions is 8 MB (the whole field 80 MB)


class SlabWarp:
    """Images (each with its interpolator) resampled onto the fixed grid through T(x) = A(x + u(x)), k-slab by
    k-slab as u at the fixed voxels comes (``add``, in order, each k-plane once; or ``take`` in order and
    ``sample`` in any order, on any thread), then ``result()``: the numbers
    ``sitk.Resample(image, fixed, T, interpolator, 0)`` gives (float32 for linear, the image's own type for
    nearest neighbour) to float32 rounding, with T evaluated once per fixed voxel for all the images.

    ITK's Resample through the composite [A, U] interpolates the stored u anew for every voxel of every image
    (~0.45 s each on a 1 mm brain, one thread), and its WarpImageFilter from T − x still took 0.7 s for an image and
    its segmentation; here the continuous index of T(x) in each image is made once per slab in float32 from u —
    p = P·idx + p0 + C·u, P and p0 the affine part (exact in float64, rounded once) — and sampled with ITK's rules
    by ``sampling.ItkSampler`` (linear: clamped trilinear, nearest: round half up, 0 outside the buffer's
    half-voxel margin). ``affine_lps``: A as a 4×4 LPS matrix.
    """

    def __init__(self, images, fixed_geom: Geometry, affine_lps: np.ndarray):
        self.geom = fixed_geom
        m = fixed_geom.lps_from_ijk_matrix()
        a = np.asarray(affine_lps, np.float64)
        n_k, n_j, n_i = fixed_geom.shape_kji
        j, i = np.meshgrid(np.arange(n_j, dtype=np.float64), np.arange(n_i, dtype=np.float64), indexing="ij")
        self.sources = []        # per distinct image grid: (C^T (3, 3) float32, p on plane 0 (J, I, 3) float32,
        self.samplers = []       # p's step per k-plane (3,) float64, [sampler index, ...])
        grids: dict[bytes, int] = {}
        for image, interp in images:
            sampler = ItkSampler(image, interp)
            key = sampler.ijk_from_lps.tobytes()
            if key not in grids:
                q = sampler.ijk_from_lps @ a                  # moving index from fixed-space point x + u
                pm = q @ m                                     # moving index from fixed index (u = 0)
                plane0 = pm[:3, 3] + i[..., None] * pm[:3, 0] + j[..., None] * pm[:3, 1]
                grids[key] = len(self.sources)
                self.sources.append((torch.from_numpy(np.ascontiguousarray(q[:3, :3].T, np.float32)),
                                     torch.from_numpy(plane0.astype(np.float32)), pm[:3, 2].copy(), []))
            self.sources[grids[key]][3].append(len(self.samplers))
            self.samplers.append(sampler)
        self.slabs: list[dict[int, np.ndarray]] = [{} for _ in self.samplers]   # per image: k0 → slab
        self.next_k = 0

    def add(self, k0: int, u: np.ndarray) -> None:
        """u (LPS mm, (n, J, I, 3), float32 or float64) at the k-planes k0 … k0 + n − 1; the planes before
        ``next_k`` (given already) are skipped. ``take`` then ``sample``."""
        part = self.take(k0, u)
        if part is not None:
            self.sample(*part)

    def take(self, k0: int, u: np.ndarray):
        """The in-order half of ``add``: the planes of u not given yet, as ``(k0, u)`` for ``sample`` (None when
        there are none). Slabs must be taken in order; they may then be sampled in any order, on any thread."""
        skip = self.next_k - k0
        if skip >= len(u):
            return None
        if skip < 0:
            raise ValueError(f"SlabWarp.take(): planes {self.next_k}..{k0 - 1} were never given")
        k0, u = self.next_k, u[skip:]
        self.next_k = k0 + len(u)
        return k0, u

    def sample(self, k0: int, u: np.ndarray) -> None:
        """Every image at the k-planes k0 … k0 + len(u) − 1 (a slab from ``take``; any order, any thread)."""
        k1 = k0 + len(u)
        u32 = torch.from_numpy(np.ascontiguousarray(u, dtype=np.float32)).reshape(-1, 3)
        for c_t, plane0, step, members in self.sources:
            # C·u as one (N, 3) @ (3, 3) product, then the affine part: plane 0's index (made in float64, rounded
            # once) and the step per plane (rounded per plane): float32, ~1e-5 voxel from the float64 numbers
            p = torch.mm(u32, c_t).view((k1 - k0,) + tuple(plane0.shape))     # (k1 − k0, J, I, 3), (i, j, k)
            p += plane0
            for n, k in enumerate(range(k0, k1)):
                p[n] += torch.from_numpy((k * step).astype(np.float32))
            inside = self.samplers[members[0]].inside(p)         # the same grid: the same buffer test
            for s in members:
                self.slabs[s][k0] = self.samplers[s].sample(p, inside)   # one dict item: atomic under the GIL

    def result(self) -> list[sitk.Image]:
        n_k = self.geom.shape_kji[0]
        done = sum(len(part) for part in self.slabs[0].values()) if self.slabs else n_k
        if self.next_k != n_k or done != n_k:
            raise ValueError(f"SlabWarp.result(): {done} of {n_k} k-planes sampled ({self.next_k} given)")
        return [self.geom.apply_to(sitk.GetImageFromArray(np.concatenate([parts[k] for k in sorted(parts)])))
                for parts in self.slabs]


def _planes32(disp_lps):
    """``planes(k0, k1)`` → float32 u at those k-planes, of a ``FieldOnGrid`` or a (K, J, I, 3) array."""
    if isinstance(disp_lps, FieldOnGrid):
        return disp_lps.planes
    return lambda k0, k1: np.asarray(disp_lps[k0:k1], np.float32)


def warp_images(images, fixed_geom: Geometry, disp_lps, affine_lps: np.ndarray) -> list[sitk.Image]:
    """``SlabWarp`` of ``images`` over the whole fixed grid, ``WARP_SLAB`` planes at a time. ``disp_lps``: u at the
    fixed voxels, a (K, J, I, 3) LPS mm array or a ``FieldOnGrid``."""
    warp, planes = SlabWarp(images, fixed_geom, affine_lps), _planes32(disp_lps)
    n_k = fixed_geom.shape_kji[0]
    for k0 in range(0, n_k, WARP_SLAB):
        warp.add(k0, planes(k0, min(k0 + WARP_SLAB, n_k)))
    return warp.result()


class _ReadOnce:
    """u at the fixed voxels for ``metrics.jacobian_det_lps`` (``shape``, ``planes(k0, k1)`` → float32), handed to
    a ``SlabWarp`` as it is read: FieldOnGrid's interpolation (~0.15 s a pass on a 1 mm brain) runs once for the
    Jacobian and the warped images.

    The warp of each slab runs on one helper thread while this one goes on with the Jacobian (grid_sample and
    the gathers release the GIL: the warped image and its segmentation take ~0.3 s of a 1 mm brain, the Jacobian
    and the interpolation ~0.2 s); the slabs are taken in order and queued. ``warped()``: the warp's images once
    every slab is done — this thread samples the slabs the helper has not started, from the last one back, so
    the two finish together (a helper's error is raised there)."""

    def __init__(self, disp_lps, warp: SlabWarp, helper: bool = True):
        self.shape, self._planes, self._warp = tuple(disp_lps.shape), _planes32(disp_lps), warp
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepdiffreg-warp") if helper else None
        self._jobs = []                                 # (future, slab) in the order taken

    def planes(self, k0: int, k1: int) -> np.ndarray:
        u = self._planes(k0, k1)                        # a new array per call: the helper reads it, nobody writes
        part = self._warp.take(k0, u)
        if part is not None:
            if self._pool is None:                      # no helper: sampled here, slab by slab
                self._warp.sample(*part)
            else:
                self._jobs.append((self._pool.submit(self._warp.sample, *part), part))
        return u

    def warped(self) -> list[sitk.Image]:
        for job, part in reversed(self._jobs):
            if job.cancel():                            # not started by the helper: sampled here
                self._warp.sample(*part)
        for job, _ in self._jobs:
            if not job.cancelled():
                job.result()                            # waits for the helper's slabs; its error is raised here
        return self._warp.result()

    def close(self) -> None:
        """Drop the slabs not started and wait for the helper (every way out of the composition, an error
        included)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def map_on_fixed(map_kji: np.ndarray, work_geom: Geometry, fixed_geom: Geometry) -> sitk.Image:
    """A scalar map of the working grid (K', J', I') on the fixed grid, linearly interpolated: what
    ``preprocess.resample`` (sitk.Resample, linear) gives, as float32. When the working grid has the fixed
    image's direction and spans its voxel centres (``pipeline`` makes it so) the map is read axis by axis as
    ``FieldOnGrid`` reads a field — the same trilinear weights, computed in float32 (~1e-7 relative); ITK's
    Resample took 0.23 s of one core for a 1 mm brain, this ~0.05 s. Otherwise it is sitk.Resample's."""
    arr = np.asarray(map_kji, dtype=np.float32)
    if np.allclose(work_geom.direction, fixed_geom.direction, atol=1e-9):
        read = FieldOnGrid(arr[..., None], work_geom, fixed_geom)
        if read.covers_target:
            n_k = fixed_geom.shape_kji[0]
            out = np.empty(fixed_geom.shape_kji, np.float32)
            for k0 in range(0, n_k, WARP_SLAB):
                out[k0:k0 + WARP_SLAB] = read.planes(k0, min(k0 + WARP_SLAB, n_k))[..., 0]
            return fixed_geom.apply_to(sitk.GetImageFromArray(out))
    return resample(work_geom.apply_to(sitk.GetImageFromArray(arr)), fixed_geom)


def _map_image(m, work_geom: Geometry, fixed_geom: Geometry) -> sitk.Image:
    """A method's ``Map`` on the fixed grid (its data may still be being made beside the write stage: waited for)."""
    return map_on_fixed(m.value().detach().float().cpu()[0, 0].numpy(), work_geom, fixed_geom)


# -- the composition -----------------------------------------------------------------------------------------------
FIELD_GRIDS = ("working", "fixed")   # where u and w are stored: the method's own grid (default) or the fixed grid


def compose_result(est: FieldEstimate, work_geom: Geometry, align_t: sitk.Transform, fixed: sitk.Image,
                   moving: sitk.Image, moving_seg: sitk.Image | None = None, fold_region=None,
                   grid_lines: int = 16, field_grid: str = "working", helpers: bool = True) -> ComposedResult:
    """The method's field (working grid, voxel units) and affine, chained with the initial alignment, as the result
    contract's transforms, Jacobian, fold statistics, deformation grid, warped images and maps on the fixed grid.

    ``field_grid``: "working" stores u (and w) on the method's own grid, padded by the taper — the working grid
    spans the fixed image's box, so no value is resampled and T at every fixed voxel is what it is with "fixed";
    "fixed" resamples them onto the padded fixed grid (a full-resolution float64 field, as before). The Jacobian,
    fold statistics and deformation grid are on the fixed grid either way, computed from the stored field as ITK
    interpolates it (``FieldOnGrid``), slab by slab, in float32.
    ``fold_region(det) -> sitk.Image | None``: where percent_folded_foreground is counted (None: overall).
    ``helpers``: warp the images on a helper thread beside the Jacobian (off: on this thread, the same numbers)."""
    if field_grid not in FIELD_GRIDS:
        raise ValueError(f"compose_result(): field_grid must be one of {FIELD_GRIDS}, got {field_grid!r}")
    fixed_geom = Geometry.of(fixed)
    on_fixed = field_grid == "fixed"
    A = chained_affine(align_t, est.affine_lps)
    m_a = affine_matrix(A)
    det_a = float(np.linalg.det(m_a[:3, :3]))

    # forward: u on the padded working (or fixed) grid; U takes the image's buffer and hands it back without a copy
    # the method's fields in memory order: a network's output often comes as a permuted view (its canonical axes),
    # which made every pass over it here 2-3x slower (inverse consistency on ixi-1: 0.64 -> 0.28 CPU-s)
    u_vox = est.disp_vox.detach().float().cpu().contiguous()
    w_vox = None if est.inverse_disp_vox is None else est.inverse_disp_vox.detach().float().cpu().contiguous()
    u_w = lps_from_vox_disp(u_vox[0].numpy(), work_geom)  # float64 out
    u_img, u_geom, u_pad, u_taper = _field_on_fixed(u_w, work_geom, fixed_geom if on_fixed else None)
    del u_w
    U = sitk.DisplacementFieldTransform(u_img)
    u_field = U.GetDisplacementField()
    stored = sitk.GetArrayViewFromImage(u_field)                   # (K', J', I', 3), read-only view
    # u at the fixed voxels: the interior of the fixed-grid field, or the stored field read as ITK reads it
    u = _interior(stored, u_pad) if on_fixed else FieldOnGrid(stored, u_geom, fixed_geom)
    # the warped images through T, T evaluated once per voxel (what Resample through [A, U] gives), slab by slab
    # as the Jacobian reads u
    to_warp = [(moving, sitk.sitkLinear)] + ([(moving_seg, sitk.sitkNearestNeighbor)] if moving_seg is not None
                                             else [])
    warp = SlabWarp(to_warp, fixed_geom, m_a)
    read = _ReadOnce(u, warp, helper=helpers)
    try:
        det = jacobian_det_lps(read, fixed_geom, dtype=torch.float32)  # float32: rounding ~1e-6 on O(1)
        warped, *rest = read.warped()
    finally:
        read.close()
    warped_seg = rest[0] if rest else None
    if det_a != 1.0:
        det *= np.float32(det_a)                                   # det ∇T = det(A)·det(I + ∇u)
    region = fold_region(det) if fold_region is not None else None
    folds = fold_stats(det, None if region is None else sitk.GetArrayViewFromImage(region))
    lines = deformation_grid_lines(u, fixed_geom, det, lines_per_axis=grid_lines,
                                   affine_lps=None if np.array_equal(m_a, np.eye(4)) else m_a)
    del u, stored, u_field
    T = composite(A, U)                                            # copies U's field; U is dropped below
    del U

    inv_T = None
    inv_info: dict[str, Any] = {}
    method_info: dict[str, Any] = {}
    if w_vox is not None:
        inv_geom_src = est.inverse_geometry or work_geom
        w_src = lps_from_vox_disp(w_vox[0].numpy(), inv_geom_src)
        w_on_fixed = on_fixed and est.inverse_geometry is None
        w_img, w_geom, w_pad, w_taper = _field_on_fixed(w_src, inv_geom_src, fixed_geom if w_on_fixed else None)
        del w_src
        inv_T = composite(sitk.DisplacementFieldTransform(w_img), A.GetInverse())
        del w_img
        inv_info = {"inverse_field_grid": w_geom.to_dict(), "inverse_field_pad_voxels_ijk": list(w_pad),
                    "inverse_taper_mm_ijk": [round(v, 3) for v in w_taper],
                    "inverse_field_grid_is": "the fixed grid, padded" if w_on_fixed else
                    "the working grid, padded" if est.inverse_geometry is None else
                    "the method's inverse grid (FieldEstimate.inverse_geometry), padded"}
        if est.inverse_geometry is None or est.inverse_geometry == work_geom:
            method_info["inverse_consistency_working_grid"] = inverse_consistency_vox(  # float32, as the method made them
                u_vox, w_vox)

    # resampled onto the fixed grid when written (the writer thread: io.result_writer.write_result)
    maps = {name: MapImage(functools.partial(_map_image, m, work_geom, fixed_geom), m.unit, m.description)
            for name, m in est.maps.items()}

    chain = {"affine_lps": m_a.tolist(), "det_affine": det_a,
             "method_affine_lps": None if est.affine_lps is None else np.asarray(est.affine_lps, float).tolist(),
             "field_grid": u_geom.to_dict(), "field_pad_voxels_ijk": list(u_pad),
             "field_grid_is": "the fixed grid, padded" if on_fixed else "the working grid, padded",
             "field_grid_option": field_grid,
             "taper_mm_ijk": [round(v, 3) for v in u_taper],
             **inv_info}
    data = ResultData(transform=T, inverse=inv_T, jacobian=det, fixed_geometry=fixed_geom, grid=lines,
                      warped=warped, warped_seg=warped_seg, maps=maps, affine=sitk.AffineTransform(A))
    return ComposedResult(data=data, folds=folds, chain=chain, method_info=method_info)


TRANSFORM_CHAIN = (
    "affine.h5: A alone (an AffineTransform, fixed -> moving), the linear part of T for modules that want no "
    "deformation. "
    "transform.h5: one flat ITK CompositeTransform of [0] AffineTransform A and [1] DisplacementFieldTransform "
    "U(x) = x + u(x); ITK applies the last transform first, so T(x) = A(x + u(x)) maps a fixed-space LPS point to "
    "a moving-space LPS point. A = A_init after A_method (initial_alignment.matrix_lps times the method's own "
    "affine; transform_geometry.affine_lps). u (LPS mm) lives on transform_geometry.field_grid: the working grid "
    "(the fixed image's box at the working spacing; with --field-grid fixed the fixed grid) padded by "
    "field_pad_voxels_ijk voxels per side, over which u falls linearly to exactly 0; outside that grid "
    "u = 0, so T(x) = A(x) there. inverse.h5: one flat CompositeTransform of [0] DisplacementFieldTransform "
    "W(y') = y' + w(y') (w on transform_geometry.inverse_field_grid, in fixed space) and [1] AffineTransform A^-1, "
    "so T^-1(y) = A^-1(y) + w(A^-1(y)) maps a moving-space point to a fixed-space point. Slicer loads each file "
    "as one transform node whose TransformFromParent is that map (the grid and the linear part in one general "
    "transform).")
