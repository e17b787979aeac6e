"""Test methods with their own affine, a known initial alignment and a pair of images for the "affine survives
everywhere" tests (Testing/engine/test_affine_everywhere.py and Testing/slicer/test_affine_scene.py).

T(x) = A_init(A_method(x + u(x))) for fixed-space LPS points x; the methods return known A_method, u and w.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from deepdiffreg import pipeline
from deepdiffreg.frames import Geometry, vox_from_lps_disp
from deepdiffreg.methods import base
from deepdiffreg.methods.base import Capabilities, FieldEstimate, Method, get_method

from synth import blank, from_array, points_lps


def _rz(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def homogeneous(lin, off) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = lin, off
    return m


# initial alignment: rotation, anisotropic scale, translation, about a centre (as align.py's transforms have one)
A_INIT_LIN = _rz(8.0) @ np.diag([1.06, 0.95, 1.03])
A_INIT_CENTRE = np.array([2.0, -1.0, 3.0])
A_INIT_TRANSLATION = np.array([5.0, -3.0, 2.0])
# the method's own affine: shear and scale, det ≠ 1
A_METHOD = homogeneous([[1.05, 0.04, 0.0], [-0.03, 0.97, 0.02], [0.0, 0.05, 1.02]], [2.0, 1.0, -1.5])


def a_init_transform() -> sitk.AffineTransform:
    t = sitk.AffineTransform(3)
    t.SetMatrix(A_INIT_LIN.ravel().tolist())
    t.SetCenter(A_INIT_CENTRE.tolist())
    t.SetTranslation(A_INIT_TRANSLATION.tolist())
    return t


def a_init_matrix() -> np.ndarray:
    return homogeneous(A_INIT_LIN, A_INIT_TRANSLATION + A_INIT_CENTRE - A_INIT_LIN @ A_INIT_CENTRE)


def a_total() -> np.ndarray:
    return a_init_matrix() @ A_METHOD


def apply(m: np.ndarray, p: np.ndarray) -> np.ndarray:
    return np.asarray(p, float) @ m[:3, :3].T + m[:3, 3]


def field_u(p: np.ndarray) -> np.ndarray:
    """The method's forward displacement (LPS mm) at points p: smooth, up to ~2 mm, non-zero on the grid's border."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    return np.stack([1.6 * np.sin(y / 9.0) * np.cos(z / 11.0) + 0.4,
                     1.0 * np.cos(x / 10.0),
                     1.2 * np.sin((x + y) / 13.0)], -1)


def field_w(p: np.ndarray) -> np.ndarray:
    """The method's inverse displacement (any smooth field: the tests check how the file chains it)."""
    return -field_u(p) + 0.1 * np.stack([np.sin(p[..., 2] / 7.0), 0 * p[..., 0], np.cos(p[..., 0] / 8.0)], -1)


def _vox(u_lps: np.ndarray, geom: Geometry) -> torch.Tensor:
    return torch.from_numpy(vox_from_lps_disp(u_lps, geom).astype(np.float32))[None]


def _grid_points(geom: Geometry) -> np.ndarray:
    return points_lps(geom.reference_image())


class AffineOnly(Method):
    """A method that returns only its own affine (zero field, zero inverse field)."""
    name = "_test_affine_only"
    description = "test only: own affine, zero field"
    caps = Capabilities(own_affine=True, spacing_mm=(("cpu", 2.0),))

    def estimate(self, pair, device, progress):
        shape = (1, 3) + tuple(pair.fixed.shape[2:])
        return FieldEstimate(disp_vox=torch.zeros(shape), inverse_disp_vox=torch.zeros(shape), affine_lps=A_METHOD)


class AffineAndField(Method):
    """Own affine and the known fields u, w sampled on the working grid."""
    name = "_test_affine_field"
    description = "test only: own affine and a known field"
    caps = Capabilities(own_affine=True, spacing_mm=(("cpu", 2.0),))

    def estimate(self, pair, device, progress):
        p = _grid_points(pair.geometry)
        return FieldEstimate(disp_vox=_vox(field_u(p), pair.geometry), inverse_disp_vox=_vox(field_w(p), pair.geometry),
                             affine_lps=A_METHOD)


class FieldOnly(Method):
    """The known fields without an affine of its own (the writer must give today's numbers)."""
    name = "_test_field_only"
    description = "test only: a known field"
    caps = Capabilities(spacing_mm=(("cpu", 2.0),))

    def estimate(self, pair, device, progress):
        p = _grid_points(pair.geometry)
        return FieldEstimate(disp_vox=_vox(field_u(p), pair.geometry), inverse_disp_vox=_vox(field_w(p), pair.geometry))


def own_inverse_grid(work: Geometry) -> Geometry:
    """A grid of its own for the inverse field: the working box grown by 6 mm on every side, at 2.5 mm."""
    size = np.asarray(work.size_ijk)
    extent = (size - 1) * np.asarray(work.spacing_ijk) + 12.0
    origin = np.asarray(work.origin_lps) - work.direction @ np.full(3, 6.0)
    n = np.round(extent / 2.5).astype(int) + 1
    return Geometry(tuple(origin.tolist()), tuple((extent / (n - 1)).tolist()), work.direction_lps,
                    tuple(int(v) for v in n))


class OwnInverseGrid(Method):
    """Own affine, u on the working grid, w on a grid of its own (FieldEstimate.inverse_geometry)."""
    name = "_test_own_inverse_grid"
    description = "test only: the inverse field on its own grid"
    caps = Capabilities(own_affine=True, spacing_mm=(("cpu", 2.0),))

    def estimate(self, pair, device, progress):
        g = own_inverse_grid(pair.geometry)
        return FieldEstimate(disp_vox=_vox(field_u(_grid_points(pair.geometry)), pair.geometry),
                             inverse_disp_vox=_vox(field_w(_grid_points(g)), g), inverse_geometry=g,
                             affine_lps=A_METHOD)


TEST_METHODS = (AffineOnly, AffineAndField, FieldOnly, OwnInverseGrid)


def use_test_methods(monkeypatch) -> None:
    """The test methods are in the registry only while ``monkeypatch`` is in effect (other tests list the
    registry: a method without options must not be in it for the whole session)."""
    for cls in TEST_METHODS:
        cls.option_specs()
        monkeypatch.setitem(base.REGISTRY, cls.name, cls)


def use_known_alignment(monkeypatch) -> None:
    """The initial alignment becomes A_INIT (no registration: exact and fast)."""
    monkeypatch.setattr(pipeline, "alignment_mask", lambda fixed, user_mask, erode_mm: (None, "test: known"))
    monkeypatch.setattr(pipeline, "initial_alignment", lambda *a, **k: a_init_transform())


def pattern(p: np.ndarray) -> np.ndarray:
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    v = 60 + 0.8 * x - 0.5 * y + 0.3 * z + 40 * np.exp(-((x - 5) ** 2 + (y + 3) ** 2 + (z - 2) ** 2) / 60.0)
    return (v + 25 * np.sin(x / 4.0) * np.cos(y / 5.0) + 10 * np.sin(z / 3.0)).astype(np.float32)


def write_pair(d) -> dict:
    """Fixed (oblique, anisotropic) and a larger moving image that holds A(fixed box) with 25 mm to spare, plus
    label maps. Returns paths and the images."""
    fixed = blank()
    fixed = from_array(pattern(points_lps(fixed)), fixed)
    corners = np.array([fixed.TransformIndexToPhysicalPoint([int(i * (n - 1)) for i, n in zip(c, fixed.GetSize())])
                        for c in np.ndindex(2, 2, 2)])
    mapped = apply(a_total(), corners)
    lo, hi = mapped.min(0) - 25.0, mapped.max(0) + 25.0
    spacing = 1.3
    moving = sitk.Image([int(np.ceil((h - l) / spacing)) + 1 for l, h in zip(lo, hi)], sitk.sitkFloat32)
    moving.SetSpacing([spacing] * 3)
    moving.SetOrigin(lo.tolist())
    moving = from_array(pattern(points_lps(moving)), moving)
    lab = lambda img: from_array((sitk.GetArrayFromImage(img) > 75).astype(np.int16)  # noqa: E731
                                 + (sitk.GetArrayFromImage(img) > 95).astype(np.int16), img)
    paths = {"fixed": str(d / "fixed.nii.gz"), "moving": str(d / "moving.nii.gz"),
             "fixed_seg": str(d / "fixed_seg.nii.gz"), "moving_seg": str(d / "moving_seg.nii.gz")}
    for key, img in (("fixed", fixed), ("moving", moving), ("fixed_seg", lab(fixed)), ("moving_seg", lab(moving))):
        sitk.WriteImage(img, paths[key])
    # read back: NIfTI keeps the geometry in float32, and the pipeline sees the files
    return {**paths, "fixed_img": sitk.ReadImage(paths["fixed"]), "moving_img": sitk.ReadImage(paths["moving"])}


def register_case(d, method: str, align: str = "affine", **kw) -> dict:
    """Run the pipeline on the pair (``use_known_alignment`` must be in effect for align="affine")."""
    get_method(method)
    out = d / ("_".join([f"out_{method}_{align}"] + [f"{k}-{v}" for k, v in sorted(kw.items())]))
    req = pipeline.RegisterRequest(str(d / "fixed.nii.gz"), str(d / "moving.nii.gz"), method, str(out), align=align,
                                   device="cpu", fixed_seg=str(d / "fixed_seg.nii.gz"),
                                   moving_seg=str(d / "moving_seg.nii.gz"), **kw)
    return {"out": out, "report": pipeline.register(req)}


def outside_points(fixed: sitk.Image, mm: float = 20.0) -> np.ndarray:
    """Points ``mm`` beyond each of the fixed grid's six faces (from the face centres, along the index axes) and
    beyond two opposite corners."""
    size = np.asarray(fixed.GetSize())
    d = np.asarray(fixed.GetDirection()).reshape(3, 3)
    centre_idx = (size - 1) / 2.0
    pts = []
    for a in range(3):
        for s in (-1, 1):
            idx = centre_idx.copy()
            idx[a] = 0 if s < 0 else size[a] - 1
            p = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint(idx.tolist()))
            pts.append(p + s * mm * d[:, a])
    for s in (-1, 1):
        idx = np.zeros(3) if s < 0 else size - 1.0
        p = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint(idx.tolist()))
        pts.append(p + s * mm * d.sum(1) / np.sqrt(3))
    return np.array(pts)
