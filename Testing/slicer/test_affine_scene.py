"""The written transform keeps its affine everywhere, in a real slicer-core scene (issue 10, item 5).

A real pipeline run (in-process) with a test method that returns its own affine and a field, after a known initial
alignment: T(x) = A(x + u(x)). Loaded with the module's own scene code, the transform node maps points like ITK
inside the fixed grid (linear grid interpolation, 1e-3 mm) and like A outside it, and the hardened moving volume
(whose grid is larger than the fixed image) matches sitk.Resample of the moving image through T on that grid.
Control: the older file, A baked into one field on the fixed grid, fails the same comparisons outside the grid.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from conftest import F, REPO, reslice_onto

sys.path.insert(0, os.path.join(REPO, "Testing", "engine"))
import affine_case  # noqa: E402  (Testing/engine: the test methods and the pair)
from deepdiffreg.pipeline import displacement_on_grid  # noqa: E402
from DeepDiffRegLib import scene as ddscene  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    affine_case.use_test_methods(mp)
    affine_case.use_known_alignment(mp)
    try:
        d = tmp_path_factory.mktemp("affine_scene")
        pair = affine_case.write_pair(d)
        r = affine_case.register_case(d, "_test_affine_field")
    finally:
        mp.undo()
    out = r["out"]
    # the control: what was written before the composite, T baked into one field on the fixed grid
    t = sitk.ReadTransform(str(out / "transform.h5"))
    baked = sitk.DisplacementFieldTransform(displacement_on_grid([t], pair["fixed_img"]))
    old = str(d / "baked.h5")
    sitk.WriteTransform(baked, old)
    return {**pair, "out": str(out), "T": t, "baked": baked, "baked_path": old}


def _slicer_map(node, pts_lps: np.ndarray) -> np.ndarray:
    t = node.GetTransformFromParent()
    return np.array([F @ np.array(t.TransformPoint(tuple(F @ p))) for p in pts_lps])


def _itk_map(t: sitk.Transform, pts: np.ndarray) -> np.ndarray:
    return np.array([t.TransformPoint(tuple(float(c) for c in p)) for p in pts])


def _inside_points(fixed: sitk.Image, n: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.uniform(0, 1, (n, 3)) * (np.asarray(fixed.GetSize()) - 1)
    return np.array([fixed.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in idx])


def _load(mrml, run):
    lg = ddscene.Logics(mrml.scene, mrml.app_logic)
    fixed, moving = lg.load_volume(run["fixed"], "fixed"), lg.load_volume(run["moving"], "moving")
    res = ddscene.load_result(mrml.scene, run["out"], fixed, moving, logics=lg)
    return lg, fixed, moving, res


def test_transform_node_maps_points_like_itk_inside_and_like_A_outside(mrml, run):
    lg, fixed, moving, res = _load(mrml, run)
    node = res.transform
    # a general transform node (affine + grid), the moving volume's parent, its grid part linear
    assert node.IsA("vtkMRMLTransformNode") and not node.IsLinear()
    assert moving.GetParentTransformNode() is node
    assert [g.GetInterpolationMode() for g in ddscene.grid_parts(node)] == [1]
    f_img, T = run["fixed_img"], run["T"]
    inside = _inside_points(f_img)
    err_in = np.linalg.norm(_slicer_map(node, inside) - _itk_map(T, inside), axis=1)
    # Slicer's default cubic grid interpolation, for the record
    cubic = lg.load_transform(os.path.join(run["out"], "transform.h5"))
    err_cubic = np.linalg.norm(_slicer_map(cubic, inside) - _itk_map(T, inside), axis=1)
    outside = affine_case.outside_points(f_img, 20.0)
    A = affine_case.a_total()
    err_out = np.linalg.norm(_slicer_map(node, outside) - affine_case.apply(A, outside), axis=1)
    # across a face of the fixed grid, from 5 mm inside to 25 mm outside: Slicer and ITK agree all the way
    centre = np.asarray(f_img.TransformContinuousIndexToPhysicalPoint(((np.asarray(f_img.GetSize()) - 1) / 2).tolist()))
    d = np.asarray(f_img.GetDirection()).reshape(3, 3)
    half = (np.asarray(f_img.GetSize()) - 1) * np.asarray(f_img.GetSpacing()) / 2
    line = np.array([centre + d[:, 0] * (half[0] + s) for s in np.linspace(-5, 25, 121)])
    err_line = np.linalg.norm(_slicer_map(node, line) - _itk_map(T, line), axis=1)
    # control: the baked file is the edge value (Slicer) and the identity (ITK) out there
    old = lg.load_transform(run["baked_path"])
    ddscene.set_linear_interpolation(old)
    err_old_slicer = np.linalg.norm(_slicer_map(old, outside) - affine_case.apply(A, outside), axis=1)
    err_old_itk = np.linalg.norm(_itk_map(run["baked"], outside) - affine_case.apply(A, outside), axis=1)
    print(f"\nSlicer vs ITK inside the fixed grid: linear max {err_in.max():.2e} mm, cubic max {err_cubic.max():.2e} "
          f"mm; 20 mm outside vs A: {err_out.max():.2e} mm; across the face: {err_line.max():.2e} mm; "
          f"baked file 20 mm outside: Slicer {err_old_slicer.max():.1f} mm, ITK {err_old_itk.max():.1f} mm off A")
    assert err_in.max() < 1e-3
    assert err_out.max() < 1e-6
    assert err_line.max() < 1e-3
    assert err_old_slicer.max() > 2.0 and err_old_itk.min() > 1.0
    # the inverse node: T^-1(T(x)) = x for the ITK pair, and Slicer's inverse node maps like ITK's inverse file
    inv_itk = sitk.ReadTransform(os.path.join(run["out"], "inverse.h5"))
    y = _itk_map(T, np.concatenate([inside[:50], outside]))
    np.testing.assert_allclose(_slicer_map(res.inverse, y), _itk_map(inv_itk, y), atol=1e-3)


def _lps_reference(volume_node) -> sitk.Image:
    """An empty sitk image on the volume node's voxel grid (LPS)."""
    m = vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    ijk_to_lps = F @ ddscene.matrix_to_numpy(m)[:3, :4]
    spacing = np.linalg.norm(ijk_to_lps[:, :3], axis=0)
    ref = sitk.Image(list(volume_node.GetImageData().GetDimensions()), sitk.sitkFloat32)
    ref.SetSpacing(spacing.tolist())
    ref.SetDirection((ijk_to_lps[:, :3] / spacing).ravel().tolist())
    ref.SetOrigin(ijk_to_lps[:, 3].tolist())
    return ref


def _compare_on(ref: sitk.Image, shown: np.ndarray, moving: sitk.Image, T: sitk.Transform, fixed: sitk.Image):
    """|shown - sitk.Resample(moving, ref, T)| where T(x) lies inside the moving image with 1.5 voxels to spare
    (so only the moving image's own edge is left out); also which of those voxels lie outside the fixed grid."""
    expect = sitk.GetArrayFromImage(sitk.Resample(moving, ref, T, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    k, j, i = np.meshgrid(*[np.arange(n) for n in ref.GetSize()[::-1]], indexing="ij")
    ijk = np.stack([i, j, k], -1).astype(float)
    x = ijk * np.asarray(ref.GetSpacing()) @ np.asarray(ref.GetDirection()).reshape(3, 3).T + np.asarray(ref.GetOrigin())
    y = sitk.GetArrayFromImage(displacement_on_grid([T], ref)) + x
    dm = np.asarray(moving.GetDirection()).reshape(3, 3)
    cm = ((y - np.asarray(moving.GetOrigin())) @ dm) / np.asarray(moving.GetSpacing())
    ok = np.all((cm >= 1.5) & (cm <= np.asarray(moving.GetSize()) - 2.5), -1)
    df = np.asarray(fixed.GetDirection()).reshape(3, 3)
    cf = ((x - np.asarray(fixed.GetOrigin())) @ df) / np.asarray(fixed.GetSpacing())
    outside_fixed = ~np.all((cf >= -0.5) & (cf <= np.asarray(fixed.GetSize()) - 0.5), -1)
    return np.abs(shown - expect), ok, outside_fixed, expect


def test_hardened_moving_matches_sitk_on_a_grid_larger_than_the_fixed_image(mrml, run):
    lg, fixed, moving, res = _load(mrml, run)
    m_img, f_img = run["moving_img"], run["fixed_img"]
    rng = float(np.ptp(sitk.GetArrayViewFromImage(m_img)))
    hard = lg.load_volume(run["moving"], "hardened")
    assert ddscene.harden(mrml.scene, res.transform, [hard]) == [hard]
    ref = _lps_reference(hard)
    diff, ok, out_f, _ = _compare_on(ref, ddscene.volume_array(hard).astype(float), m_img, run["T"], f_img)
    # the hardened grid is larger than the fixed image, and much of what is compared lies outside it
    assert np.prod(ref.GetSize()) > 3 * np.prod(f_img.GetSize())
    assert ok.sum() > 20000 and (ok & out_f).sum() > 0.5 * ok.sum()
    d_in, d_out = diff[ok & ~out_f], diff[ok & out_f]
    # control: the same with the baked field, the moving volume hardened under it
    old = lg.load_transform(run["baked_path"])
    ddscene.set_linear_interpolation(old)
    hard_old = lg.load_volume(run["moving"], "hardened old")
    ddscene.harden(mrml.scene, old, [hard_old])
    ref_old = _lps_reference(hard_old)
    diff_old, ok_old, out_old, _ = _compare_on(ref_old, ddscene.volume_array(hard_old).astype(float), m_img,
                                               run["T"], f_img)
    print(f"\nhardened {ref.GetSize()} (fixed {f_img.GetSize()}): vs sitk.Resample through T, inside the fixed grid "
          f"max {d_in.max():.2e} mean {d_in.mean():.2e}, outside max {d_out.max():.2e} mean {d_out.mean():.2e} "
          f"(range {rng:.0f}, {(ok & out_f).sum()} of {ok.sum()} voxels outside); baked file: outside max "
          f"{diff_old[ok_old & out_old].max():.1f} mean {diff_old[ok_old & out_old].mean():.2f}")
    assert d_in.max() < 1e-3 * rng and d_out.max() < 1e-3 * rng
    assert diff_old[ok_old & out_old].mean() > 100 * max(d_out.mean(), 1e-6)


def test_slice_view_on_a_larger_reference_matches_sitk(mrml, run):
    """What a slice view shows of the moving volume under the transform node (the reslice chain), on a reference
    grid 20 mm larger than the fixed image on every side."""
    lg, fixed, moving, res = _load(mrml, run)
    f_img = run["fixed_img"]
    pad = [int(np.ceil(20.0 / s)) for s in f_img.GetSpacing()]
    big = sitk.ConstantPad(f_img, pad, pad, 0.0)
    path = os.path.join(os.path.dirname(run["out"]), "big_reference.nii.gz")
    sitk.WriteImage(big, path)
    big = sitk.ReadImage(path)
    big_node = lg.load_volume(path, "big reference")
    shown = reslice_onto(big_node, moving)
    diff, ok, out_f, expect = _compare_on(big, shown, run["moving_img"], run["T"], f_img)
    rng = float(np.ptp(expect[ok]))
    print(f"\nslice-view chain on a {big.GetSize()} reference: inside max {diff[ok & ~out_f].max():.2e}, outside the "
          f"fixed grid max {diff[ok & out_f].max():.2e} over {(ok & out_f).sum()} voxels (range {rng:.0f})")
    assert (ok & out_f).sum() > 10000
    assert diff[ok].max() < 1e-3 * rng
