"""The result contract's transform keeps its affine everywhere (issue 10, item 5): transform.h5 is one flat ITK
composite [A, U] with T(x) = A(x + u(x)), inverse.h5 is [W, A⁻¹] with T⁻¹(y) = A⁻¹(y) + w(A⁻¹(y)); outside the
field's grid both are exactly the affine, in SimpleITK, ITK and ANTs. The Slicer side is in
Testing/slicer/test_affine_scene.py."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from affine_case import (A_METHOD, a_init_matrix, a_init_transform, a_total, apply, field_u, field_w, outside_points,
                         own_inverse_grid, register_case, use_known_alignment, use_test_methods, write_pair)
from itk_numbers import assert_itk_numbers
from deepdiffreg.compose import TAPER_MAX_MM, TAPER_SLOPE, outward_displacement_mm, taper_lengths_mm, tapered_field
from deepdiffreg.frames import Geometry, displacement_image, lps_from_vox_disp, vox_from_lps_disp
from deepdiffreg.io.result_writer import deformation_grid_lines
from deepdiffreg.metrics import jacobian_det_lps
from deepdiffreg.pipeline import displacement_on_grid
from deepdiffreg.preprocess import working_grid
from synth import points_lps


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """One pair, registered by the affine-only, affine + field and field-only test methods (known A_init)."""
    mp = pytest.MonkeyPatch()
    use_test_methods(mp)
    try:
        with mp.context() as align_mp:
            use_known_alignment(align_mp)
            d = tmp_path_factory.mktemp("affine")
            pair = write_pair(d)
            runs = {m: register_case(d, m) for m in ("_test_affine_only", "_test_affine_field", "_test_field_only")}
            # the same method with the full-resolution field (--field-grid fixed)
            runs["_test_affine_field/fixed"] = register_case(d, "_test_affine_field", field_grid="fixed")
        yield {**pair, "runs": runs, "dir": d}
    finally:
        mp.undo()


def _read(case, method, key="transform"):
    return sitk.ReadTransform(str(case["runs"][method]["out"] / f"{key}.h5"))


def _stored_field(case, run, key="transform") -> sitk.Image:
    t = sitk.CompositeTransform(_read(case, run, key))
    return sitk.DisplacementFieldTransform(t.GetNthTransform(1 if key == "transform" else 0)).GetDisplacementField()


def _map(t: sitk.Transform, pts: np.ndarray) -> np.ndarray:
    return np.array([t.TransformPoint(tuple(float(c) for c in p)) for p in pts])


def _as_method_gives_it(fn, geom: Geometry) -> np.ndarray:
    """The field ``fn`` on the working grid, in LPS mm, as the method hands it over (float32 voxel units)."""
    vox = vox_from_lps_disp(fn(points_lps(geom.reference_image())), geom).astype(np.float32)
    return lps_from_vox_disp(vox.astype(np.float64), geom)


def _fixed_points_on_working_field(fixed: sitk.Image, fn) -> np.ndarray:
    """What the method's field (sampled on the 2 mm working grid, linear in between) is at every fixed voxel."""
    geom = working_grid(fixed, 2.0)
    t = sitk.DisplacementFieldTransform(displacement_image(_as_method_gives_it(fn, geom), geom))
    return sitk.GetArrayFromImage(displacement_on_grid([t], fixed))


def test_file_layout_is_one_flat_composite_affine_then_field(case):
    for method in ("_test_affine_only", "_test_affine_field", "_test_field_only"):
        for key, order in (("transform", ("AffineTransform", "DisplacementFieldTransform")),
                           ("inverse", ("DisplacementFieldTransform", "AffineTransform"))):
            t = sitk.CompositeTransform(_read(case, method, key))
            assert tuple(t.GetNthTransform(n).GetName() for n in range(t.GetNumberOfTransforms())) == order
    rep = case["runs"]["_test_affine_field"]["report"]
    chain = rep["transform_geometry"]
    np.testing.assert_allclose(chain["affine_lps"], a_total(), atol=1e-12)
    np.testing.assert_allclose(chain["method_affine_lps"], A_METHOD)
    assert "T(x) = A(x + u(x))" in rep["transform_chain"] and "A^-1(y) + w(A^-1(y))" in rep["transform_chain"]
    fixed = case["fixed_img"]
    work = Geometry(**{k: tuple(v) for k, v in zip(("origin_lps", "spacing_ijk", "direction_lps", "size_ijk"), (
        rep["preprocessing"]["working_grid"][n] for n in ("origin_lps", "spacing", "direction", "size")))})
    assert work.spacing_ijk[0] > 1.5 * fixed.GetSpacing()[0]          # the working grid is the coarser one here
    # default (--field-grid working): u on the method's working grid, padded; --field-grid fixed: on the fixed
    # grid, padded. Same direction either way, the grid's origin moved out by the pad.
    for run, grid in (("_test_affine_field", work), ("_test_affine_field/fixed", Geometry.of(fixed))):
        chain = case["runs"][run]["report"]["transform_geometry"]
        assert chain["field_grid_option"] == ("fixed" if run.endswith("/fixed") else "working")
        field = _stored_field(case, run)
        pad = np.asarray(chain["field_pad_voxels_ijk"])
        assert (pad >= 2).all() and tuple(np.asarray(grid.size_ijk) + 2 * pad) == field.GetSize()
        assert np.allclose(field.GetSpacing(), grid.spacing_ijk) and np.allclose(field.GetDirection(), fixed.GetDirection())
        np.testing.assert_allclose(field.TransformIndexToPhysicalPoint(pad.tolist()), fixed.GetOrigin(), atol=1e-9)
        assert chain["field_grid"]["size"] == list(field.GetSize())
        arr = sitk.GetArrayFromImage(field)
        # u is exactly 0 on the padded grid's outer layer (ITK's 0 outside = Slicer's edge value) ...
        for face in (arr[0], arr[-1], arr[:, 0], arr[:, -1], arr[:, :, 0], arr[:, :, -1]):
            assert np.abs(face).max() == 0.0
        # ... and falls to it along a ramp that does not fold: det ∇(x + u) ≥ 1 − TAPER_SLOPE beside the image
        det_pad = jacobian_det_lps(arr, Geometry.of(field))
        pk, pj, pi = pad[::-1]
        inside = det_pad[pk:-pk, pj:-pj, pi:-pi]
        assert det_pad.min() > min(0.45, inside.min() - 0.05), (det_pad.min(), inside.min())
        # the ramp's length follows the displacement pointing out of the image (capped); the pad holds it
        e = outward_displacement_mm(_interior_of(arr, pad), Geometry(fixed.GetOrigin(), tuple(field.GetSpacing()),
                                                                     fixed.GetDirection(), tuple(grid.size_ijk)))
        assert chain["taper_mm_ijk"] == pytest.approx([min(v / TAPER_SLOPE, TAPER_MAX_MM) for v in e], abs=0.5)
        assert (pad * np.asarray(field.GetSpacing()) >= np.asarray(chain["taper_mm_ijk"]) - 1e-6).all()


def _interior_of(arr: np.ndarray, pad) -> np.ndarray:
    pk, pj, pi = np.asarray(pad)[::-1]
    return arr[pk:-pk, pj:-pj, pi:-pi]


def test_ramp_length_follows_the_outward_displacement_and_is_capped():
    """The ramp across axis a is e_a / TAPER_SLOPE long (e_a: the displacement pointing out through a face across
    a; tangential and inward parts cannot fold it), at least TAPER_MIN_VOXELS voxels and never past TAPER_MAX_MM."""
    geom = Geometry((0.0, 0.0, 0.0), (2.0, 2.0, 2.0), tuple(np.eye(3).ravel()), (10, 12, 14))
    u = np.zeros(geom.shape_kji + (3,))
    u[:, :, 0, 0] = -3.0        # out through the low i face: 3 mm
    u[:, :, -1, 1] = 25.0       # tangential (j) on the high i face: no effect on the i ramp
    u[:, 0, :, 1] = 1.0         # inward through the low j face
    u[-1, :, :, 2] = 40.0       # out through the high k face: 40 mm, capped
    e = outward_displacement_mm(u, geom)
    assert e == pytest.approx((3.0, 25.0, 40.0))   # j: the tangential 25 mm of the i face points out of the high j face
    padded, pgeom, n = tapered_field(u, geom, taper_lengths_mm(u, geom))
    assert n == (3, 10, 10)                         # 6 mm / 2 mm; 50 mm and 80 mm capped at 20 mm / 2 mm
    assert pgeom.size_ijk == (16, 32, 34)
    for face in (padded[0], padded[-1], padded[:, 0], padded[:, -1], padded[:, :, 0], padded[:, :, -1]):
        assert np.abs(face).max() == 0.0


def test_point_20mm_outside_maps_to_the_affine_simpleitk(case):
    fixed = case["fixed_img"]
    pts = outside_points(fixed, 20.0)
    for method in ("_test_affine_only", "_test_affine_field"):
        t, inv = _read(case, method), _read(case, method, "inverse")
        np.testing.assert_allclose(_map(t, pts), apply(a_total(), pts), atol=1e-9)
        y = apply(a_total(), pts)
        np.testing.assert_allclose(_map(inv, y), pts, atol=1e-9)   # T⁻¹ = A⁻¹ there
    # without an affine of its own the initial alignment still holds outside (it used to be the identity there)
    t = _read(case, "_test_field_only")
    np.testing.assert_allclose(_map(t, pts), apply(a_init_matrix(), pts), atol=1e-9)


def test_inside_T_is_A_of_x_plus_u_and_inverse_is_w_after_A_inverse(case):
    fixed = case["fixed_img"]
    p = points_lps(fixed)
    u_fixed = _fixed_points_on_working_field(fixed, field_u)
    w_fixed = _fixed_points_on_working_field(fixed, field_w)
    # affine only: T = A on the fixed grid too
    got = sitk.GetArrayFromImage(displacement_on_grid([_read(case, "_test_affine_only")], fixed)) + p
    np.testing.assert_allclose(got, apply(a_total(), p), atol=1e-9)
    # affine and field: T(x) = A_init(A_method(x + u(x)))
    got = sitk.GetArrayFromImage(displacement_on_grid([_read(case, "_test_affine_field")], fixed)) + p
    np.testing.assert_allclose(got, apply(a_total(), p + u_fixed), atol=1e-9)
    assert np.abs(u_fixed).max() > 1.0                               # the field is not small
    # inverse: T⁻¹(A(x')) = x' + w(x') at fixed voxels x'
    inv = _read(case, "_test_affine_field", "inverse")
    sub = p.reshape(-1, 3)[::37]
    np.testing.assert_allclose(_map(inv, apply(a_total(), sub)), sub + w_fixed.reshape(-1, 3)[::37], atol=1e-9)


def test_jacobian_grid_and_warped_follow_the_whole_T(case):
    fixed, moving = case["fixed_img"], case["moving_img"]
    out = case["runs"]["_test_affine_field"]["out"]
    t = _read(case, "_test_affine_field")
    geom = Geometry.of(fixed)
    # Jacobian = det ∇T in physical space = det(A)·det(I + ∇u): the float64 det of the whole baked field
    baked = sitk.GetArrayFromImage(displacement_on_grid([t], fixed))
    det_ref = jacobian_det_lps(baked, geom)
    det = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "jacobian.nii.gz")))
    np.testing.assert_allclose(det, det_ref, rtol=2e-6, atol=2e-6)
    assert abs(np.median(det) - np.linalg.det(a_total()[:3, :3])) < 0.05
    det_a = sitk.GetArrayFromImage(sitk.ReadImage(str(case["runs"]["_test_affine_only"]["out"] / "jacobian.nii.gz")))
    np.testing.assert_allclose(det_a, np.linalg.det(a_total()[:3, :3]), rtol=1e-6)
    # grid.vtk: every vertex moved by T
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkIOLegacy import vtkPolyDataReader
    r = vtkPolyDataReader()
    r.SetFileName(str(out / "grid.vtk"))
    r.Update()
    got = vtk_to_numpy(r.GetOutput().GetPoints().GetData())
    base = deformation_grid_lines(np.zeros(tuple(geom.shape_kji) + (3,)), geom, det, lines_per_axis=16).points
    # (the vertices' u is interpolated by compose.FieldOnGrid in its own float64 arithmetic: ~2e-8 mm from ITK's)
    np.testing.assert_allclose(got, _map(t, base), atol=1e-7)
    # warped images: through the composite
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    assert_itk_numbers(warped, sitk.GetArrayFromImage(sitk.Resample(moving, fixed, t, sitk.sitkLinear, 0.0,
                                                                    sitk.sitkFloat32)), t, fixed, moving, sitk.sitkLinear)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped_seg.nii.gz")))
    ms = sitk.ReadImage(case["moving_seg"])
    assert_itk_numbers(seg, sitk.GetArrayFromImage(sitk.Resample(ms, fixed, t, sitk.sitkNearestNeighbor, 0)), t,
                       fixed, ms, sitk.sitkNearestNeighbor)
    # folds: none in this smooth map; the report's minimum is the file's
    rep = case["runs"]["_test_affine_field"]["report"]
    assert rep["folds"]["num_folded"] == 0 and rep["folds"]["min_det"] == pytest.approx(float(det.min()), rel=1e-6)


def test_an_inverse_on_its_own_grid_is_written_there(case):
    """FieldEstimate.inverse_geometry: w is written on that grid (padded), not resampled; T⁻¹ = A⁻¹ then w."""
    d = case["dir"]
    r = register_case(d, "_test_own_inverse_grid", align="none")
    inv = sitk.CompositeTransform(sitk.ReadTransform(str(r["out"] / "inverse.h5")))
    w_field = sitk.DisplacementFieldTransform(inv.GetNthTransform(0)).GetDisplacementField()
    own = own_inverse_grid(working_grid(case["fixed_img"], 2.0))
    chain = r["report"]["transform_geometry"]
    pad = np.asarray(chain["inverse_field_pad_voxels_ijk"])
    assert w_field.GetSize() == tuple(np.asarray(own.size_ijk) + 2 * pad)
    np.testing.assert_allclose(w_field.GetSpacing(), own.spacing_ijk, atol=1e-6)
    np.testing.assert_allclose(w_field.TransformIndexToPhysicalPoint(pad.tolist()), own.origin_lps, atol=1e-6)
    assert "inverse_consistency_working_grid" not in r["report"]["method_info"]   # not on one grid
    # T⁻¹(A(x')) = x' + w(x') at the own grid's nodes, beyond the fixed image's box too
    vox = vox_from_lps_disp(field_w(points_lps(own.reference_image())), own).astype(np.float32)
    w_nodes = lps_from_vox_disp(vox.astype(np.float64), own).reshape(-1, 3)
    x = points_lps(own.reference_image()).reshape(-1, 3)
    sel = np.arange(0, len(x), 7)
    np.testing.assert_allclose(_map(inv, apply(A_METHOD, x[sel])), x[sel] + w_nodes[sel], atol=1e-6)
    # and A⁻¹ alone 20 mm beyond its grid
    far = outside_points(own.reference_image(), 20.0)
    np.testing.assert_allclose(_map(inv, apply(A_METHOD, far)), far, atol=1e-9)


def _old_writer(fixed: sitk.Image, moving: sitk.Image, moving_seg: sitk.Image, align_t, u_w: np.ndarray, geom,
                lines: int = 16):
    """What pipeline.register wrote before the composite (commit 7a6f687), for a method without an affine: the
    working field padded by one edge voxel, T = A ∘ W baked into one field on the fixed grid."""
    padded = np.pad(u_w, ((1, 1), (1, 1), (1, 1), (0, 0)), mode="edge")
    origin = np.asarray(geom.origin_lps) - geom.direction @ np.asarray(geom.spacing_ijk)
    g = Geometry(tuple(origin), geom.spacing_ijk, geom.direction_lps, tuple(s + 2 for s in geom.size_ijk))
    w = sitk.DisplacementFieldTransform(sitk.Cast(displacement_image(padded, g), sitk.sitkVectorFloat64))
    T = sitk.DisplacementFieldTransform(displacement_on_grid([align_t, w], fixed))
    total = sitk.GetArrayFromImage(T.GetDisplacementField())
    det = jacobian_det_lps(total, Geometry.of(fixed), dtype=torch.float32)
    grid = deformation_grid_lines(total, Geometry.of(fixed), det, lines_per_axis=lines)
    warped = sitk.Resample(moving, fixed, T, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    seg = sitk.Resample(moving_seg, fixed, T, sitk.sitkNearestNeighbor, 0)
    return {"T": T, "det": det, "grid": grid, "warped": warped, "seg": seg}


def test_without_a_method_affine_the_outputs_are_todays(case):
    """jacobian.nii.gz, grid.vtk, warped*.nii.gz of a method without an affine: today's writer's numbers (float32
    precision) inside the fixed grid; the transform files differ only outside it."""
    fixed, moving = case["fixed_img"], case["moving_img"]
    out = case["runs"]["_test_field_only"]["out"]
    geom = working_grid(fixed, 2.0)
    old = _old_writer(fixed, moving, sitk.ReadImage(case["moving_seg"]), a_init_transform(),
                      _as_method_gives_it(field_u, geom), geom)
    det = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "jacobian.nii.gz")))
    np.testing.assert_allclose(det, old["det"], rtol=3e-6, atol=3e-6)
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkIOLegacy import vtkPolyDataReader
    r = vtkPolyDataReader()
    r.SetFileName(str(out / "grid.vtk"))
    r.Update()
    np.testing.assert_allclose(vtk_to_numpy(r.GetOutput().GetPoints().GetData()), old["grid"].points, atol=1e-7)
    np.testing.assert_allclose(vtk_to_numpy(r.GetOutput().GetPointData().GetArray("jacobian")), old["grid"].values,
                               rtol=3e-6, atol=3e-6)
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    assert_itk_numbers(warped, sitk.GetArrayFromImage(old["warped"]), old["T"], fixed, moving, sitk.sitkLinear)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped_seg.nii.gz")))
    assert_itk_numbers(seg, sitk.GetArrayFromImage(old["seg"]), old["T"], fixed, sitk.ReadImage(case["moving_seg"]),
                       sitk.sitkNearestNeighbor)
    # the transform: same map at every fixed voxel ...
    new_t = _read(case, "_test_field_only")
    new_field = sitk.GetArrayFromImage(displacement_on_grid([new_t], fixed))
    np.testing.assert_allclose(new_field, sitk.GetArrayFromImage(old["T"].GetDisplacementField()), atol=1e-9)
    # ... and outside it the affine instead of the identity (the old file's jump at the grid's face)
    pts = outside_points(fixed, 20.0)
    old_err = np.linalg.norm(_map(old["T"], pts) - apply(a_init_matrix(), pts), axis=1)
    new_err = np.linalg.norm(_map(new_t, pts) - apply(a_init_matrix(), pts), axis=1)
    print(f"\n20 mm outside the fixed grid, |T(x) - A(x)|: old file max {old_err.max():.2f} mm mean "
          f"{old_err.mean():.2f} mm, new file max {new_err.max():.2e} mm")
    assert old_err.min() > 1.0 and new_err.max() < 1e-9


def _points_json(case):
    fixed = case["fixed_img"]
    pts = np.concatenate([outside_points(fixed, 20.0), points_lps(fixed).reshape(-1, 3)[::211]])
    files = {}
    for method in ("_test_affine_only", "_test_affine_field"):
        for key in ("transform", "inverse"):
            path = str(case["runs"][method]["out"] / f"{key}.h5")
            q = pts if key == "transform" else apply(a_total(), pts)
            files[path] = {"points": q.tolist(), "expect": _map(sitk.ReadTransform(path), q).tolist()}
    return pts, files


_ITK_SCRIPT = r"""
import json, sys
import itk
cases = json.load(open(sys.argv[1]))
out = {}
for path, c in cases.items():
    ts = itk.transformread(path)
    assert len(ts) == 1, len(ts)
    t = ts[0]
    names = [t.GetNthTransform(n).GetNameOfClass() for n in range(t.GetNumberOfTransforms())]
    out[path] = {"names": names, "mapped": [list(t.TransformPoint([float(v) for v in p])) for p in c["points"]]}
json.dump(out, open(sys.argv[2], "w"))
"""


@pytest.mark.skipif(importlib.util.find_spec("itk") is None,
                    reason="ITK Python is not installed (pip install -e '.[interop]'); the SimpleITK checks above "
                           "read the same files with the same ITK 5.4 code")
def test_itk_reads_the_same_maps(case, tmp_path):
    """ITK Python (a separate process: its libraries and slicer-core's ITK stay apart) maps the points as
    SimpleITK does, inside the grid and 20 mm outside it."""
    pts, files = _points_json(case)
    src, dst = tmp_path / "cases.json", tmp_path / "itk.json"
    src.write_text(json.dumps(files))
    res = subprocess.run([sys.executable, "-c", _ITK_SCRIPT, str(src), str(dst)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(dst.read_text())
    for path, c in files.items():
        order = ["AffineTransform", "DisplacementFieldTransform"]
        assert got[path]["names"] == (order if path.endswith("transform.h5") else order[::-1])
        np.testing.assert_allclose(got[path]["mapped"], c["expect"], atol=1e-9)
    n_out = len(outside_points(case["fixed_img"], 20.0))
    t = [p for p in files if p.endswith("transform.h5")]
    np.testing.assert_allclose(np.asarray(got[t[0]]["mapped"])[:n_out], apply(a_total(), pts[:n_out]), atol=1e-9)


@pytest.mark.skipif(importlib.util.find_spec("ants") is None,
                    reason="ANTsPy is not installed (pip install -e '.[bench]'); the SimpleITK checks above read "
                           "the same files")
def test_ants_reads_the_same_maps(case):
    """ANTs (antsApplyTransformsToPoints: the transforms used to warp images, applied to fixed-space points) maps
    the points as SimpleITK does (ANTs computes in float32: 1e-4 mm)."""
    import ants
    import pandas as pd
    pts, files = _points_json(case)
    for path, c in files.items():
        q = np.asarray(c["points"])
        df = ants.apply_transforms_to_points(3, pd.DataFrame({"x": q[:, 0], "y": q[:, 1], "z": q[:, 2]}), [path])
        np.testing.assert_allclose(df[["x", "y", "z"]].to_numpy(), c["expect"], atol=1e-4)
    # ANTs warps the moving image through the file as SimpleITK does
    path = str(case["runs"]["_test_affine_field"]["out"] / "transform.h5")
    fixed, moving = case["fixed_img"], case["moving_img"]
    w = ants.apply_transforms(ants.image_read(case["fixed"]), ants.image_read(case["moving"]), [path],
                              interpolator="linear")
    ref = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, sitk.ReadTransform(path), sitk.sitkLinear, 0.0))
    got = w.numpy().transpose(2, 1, 0)
    inner = (slice(2, -2),) * 3
    assert np.abs(got - ref)[inner].max() < 1e-2 * np.ptp(ref)


def test_evaluate_and_apply_read_the_composite(case, tmp_path):
    """``deepdiffreg evaluate`` (det of the baked T on the fixed grid) gives the report's fold numbers; ``apply
    --points`` maps with the composite."""
    from synth import run_cli
    out = case["runs"]["_test_affine_field"]["out"]
    rep = json.loads((out / "report.json").read_text())
    ev = run_cli("evaluate", "--transform", out / "transform.h5", "--fixed", case["fixed"], "--moving", case["moving"])
    assert ev.returncode == 0, ev.stderr
    got = json.loads(ev.stdout)
    assert got["folds"]["min_det"] == pytest.approx(rep["folds"]["min_det"], rel=1e-5)
    pts = outside_points(case["fixed_img"], 20.0)
    csv = tmp_path / "p.csv"
    csv.write_text("X,Y,Z\n" + "\n".join(",".join(f"{v:.9f}" for v in p) for p in apply(a_total(), pts)))
    ap = run_cli("apply", "--result", out, "--points", csv, "--out", tmp_path / "o.csv")
    assert ap.returncode == 0, ap.stderr
    back = np.loadtxt(tmp_path / "o.csv", delimiter=",", skiprows=1)[:, 1:]
    np.testing.assert_allclose(back, pts, atol=1e-5)


def test_affine_h5_is_the_linear_part_of_the_transform(tmp_path):
    """affine.h5 holds A alone: a linear transform other modules can use, equal to the composite's affine."""
    import SimpleITK as sitk
    from deepdiffreg.methods.base import Capabilities, FieldEstimate, Method
    from deepdiffreg.pipeline import RegisterRequest, register
    import torch
    fixed = sitk.Image(20, 18, 16, sitk.sitkFloat32)
    fixed.SetSpacing((1.5, 1.2, 2.0))
    arr = np.random.default_rng(0).random((16, 18, 20)).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(fixed)
    sitk.WriteImage(img, str(tmp_path / "f.nii.gz"))
    sitk.WriteImage(img, str(tmp_path / "m.nii.gz"))
    a = np.eye(4)
    a[:3, :3] = [[1.02, 0.03, 0.0], [-0.01, 0.98, 0.02], [0.0, 0.01, 1.01]]
    a[:3, 3] = [1.5, -2.0, 0.5]

    class _Aff(Method):
        name = "_test_affine_h5"
        caps = Capabilities(spacing_mm=(("cpu", 0.0),), own_affine=True, default_align="none")

        def estimate(self, pair, device, progress):
            return FieldEstimate(disp_vox=torch.zeros(1, 3, *pair.fixed.shape[2:]), affine_lps=a)

    from deepdiffreg.methods import base
    base.REGISTRY[_Aff.name] = _Aff
    try:
        out = tmp_path / "out"
        rep = register(RegisterRequest(str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), _Aff.name, str(out),
                                       device="cpu"))
    finally:
        base.REGISTRY.pop(_Aff.name, None)
    assert rep["files"]["affine"] == "affine.h5"
    lin = sitk.ReadTransform(str(out / "affine.h5"))
    assert lin.GetName() == "AffineTransform"
    full = sitk.ReadTransform(str(out / "transform.h5"))
    for p in [(0.0, 0.0, 0.0), (40.0, -25.0, 60.0), (-300.0, 200.0, 10.0)]:
        expect = a[:3, :3] @ np.array(p) + a[:3, 3]
        assert np.allclose(lin.TransformPoint(p), expect, atol=1e-6)
        if abs(p[0]) > 100:                          # far outside the field: T = A exactly
            assert np.allclose(full.TransformPoint(p), expect, atol=1e-6)
