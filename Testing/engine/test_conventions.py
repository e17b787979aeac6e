"""The result contract (README "Result contract"): direction, frame, grid and file format of the written transform."""
import json
import os

import numpy as np
import SimpleITK as sitk
import torch

from deepdiffreg.frames import Geometry, displacement_image, vox_from_lps_disp
from deepdiffreg.io.result_writer import write_displacement_transform
from deepdiffreg.methods.base import Capabilities, FieldEstimate, Method, register_method
from deepdiffreg.metrics import jacobian_det_lps
from deepdiffreg.pipeline import RegisterRequest, register

from synth import blank, from_array, image_from_labels, phantom_labels, points_lps, smooth_field_lps

F = np.diag([-1.0, -1.0, 1.0])


def _write_field(tmp_path, u_lps, img, name="t.h5"):
    path = str(tmp_path / name)
    write_displacement_transform(displacement_image(u_lps, Geometry.of(img)), path)
    return path


def test_plus_5mm_shift_maps_fixed_point_to_moving_point(tmp_path):
    img = blank()
    u = np.zeros(img.GetSize()[::-1] + (3,))
    u[..., 0] = 5.0  # +5 mm along L
    path = _write_field(tmp_path, u, img)
    t = sitk.ReadTransform(path)
    p = points_lps(img)[10, 12, 14]
    assert np.allclose(t.TransformPoint(tuple(p)), p + [5, 0, 0], atol=1e-9)
    # Slicer reads the same file as a grid transform whose FromParent is T (RAS in, RAS out).
    import slicer
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerTransformLogic()
    logic.SetMRMLScene(scene)
    node = logic.AddTransform(path, scene)
    assert node.GetClassName() == "vtkMRMLGridTransformNode"
    from_parent = node.GetTransformFromParent()
    q = np.array(from_parent.TransformPoint(tuple(F @ p)))
    assert np.allclose(F @ q, p + [5, 0, 0], atol=1e-6)


def test_h5_round_trip_is_exact(tmp_path):
    img = blank()
    u = smooth_field_lps(points_lps(img))
    path = _write_field(tmp_path, u, img)
    back = sitk.DisplacementFieldTransform(sitk.ReadTransform(path)).GetDisplacementField()
    assert np.array_equal(sitk.GetArrayFromImage(back), u)
    assert np.allclose(back.GetDirection(), img.GetDirection()) and np.allclose(back.GetOrigin(), img.GetOrigin())


def test_pure_translation_has_det_one_on_oblique_anisotropic_grid():
    img = blank(spacing=(0.7, 1.3, 2.9))
    u = np.broadcast_to(np.array([3.0, -7.5, 1.25]), img.GetSize()[::-1] + (3,)).copy()
    det = jacobian_det_lps(u, Geometry.of(img))
    assert np.abs(det - 1).max() < 1e-12


def test_known_affine_gives_its_determinant():
    img = blank(spacing=(0.7, 1.3, 2.9))
    a = np.array([[1.1, 0.2, 0.0], [-0.1, 0.9, 0.15], [0.05, 0.0, 1.2]])
    p = points_lps(img)
    u = p @ (a - np.eye(3)).T + [1.0, 2.0, 3.0]
    det = jacobian_det_lps(u, Geometry.of(img))
    assert np.allclose(det, np.linalg.det(a), atol=1e-9)


class _KnownField(Method):
    """Test method: returns a fixed asymmetric voxel field (channel 0 ≠ 1 ≠ 2), so axis permutations show."""
    name = "_test_known_field"
    description = "test only"
    caps = Capabilities(spacing_mm=(("cpu", 0.0),))  # work on the fixed grid itself

    def estimate(self, pair, device, progress):
        shape = pair.fixed.shape[2:]
        k, j, i = torch.meshgrid(*[torch.linspace(0, 1, n) for n in shape], indexing="ij")
        disp = torch.stack([1.5 * torch.sin(3 * j), 0.8 * torch.ones_like(k), -0.5 * k], 0)[None]
        return FieldEstimate(disp_vox=disp, inverse_disp_vox=None)


def test_pipeline_writes_fixed_to_moving_lps_on_fixed_grid(tmp_path, monkeypatch):
    # in the registry only for this test: other tests compare the registry with `methods --json`
    from deepdiffreg.methods import base
    monkeypatch.setitem(base.REGISTRY, _KnownField.name, _KnownField)   # removed again after the test
    register_method(_KnownField)                                         # the registry's declaration checks
    fixed = blank()
    p = points_lps(fixed)
    fixed = from_array(image_from_labels(phantom_labels(p)), fixed)
    moving = blank(size=(34, 30, 26), spacing=(1.0, 1.1, 1.4), origin=(-22, -18, -12), direction=np.eye(3))
    moving = from_array(image_from_labels(phantom_labels(points_lps(moving)), seed=1), moving)
    sitk.WriteImage(fixed, str(tmp_path / "f.nii.gz"))
    sitk.WriteImage(moving, str(tmp_path / "m.nii.gz"))
    out = tmp_path / "out"
    report = register(RegisterRequest(str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), "_test_known_field",
                                      str(out), align="none", device="cpu"))
    # one flat composite [A, U]: T(x) = A(x + u(x)), A the (here identity) initial alignment
    t = sitk.CompositeTransform(sitk.ReadTransform(str(out / "transform.h5")))
    assert [t.GetNthTransform(n).GetName() for n in range(t.GetNumberOfTransforms())] == [
        "AffineTransform", "DisplacementFieldTransform"]
    assert np.allclose(sitk.AffineTransform(t.GetNthTransform(0)).GetMatrix(), np.eye(3).ravel())
    field = sitk.DisplacementFieldTransform(t.GetNthTransform(1)).GetDisplacementField()
    # on the fixed image's own grid (padded by a few voxels over which u falls to 0)
    pad = np.asarray(report["transform_geometry"]["field_pad_voxels_ijk"])
    assert field.GetSize() == tuple(np.asarray(fixed.GetSize()) + 2 * pad)
    assert np.allclose(field.GetDirection(), fixed.GetDirection()) and np.allclose(field.GetSpacing(), fixed.GetSpacing())
    assert np.allclose(field.TransformIndexToPhysicalPoint(pad.tolist()), fixed.GetOrigin(), atol=1e-6)
    # the voxel field, converted by u_lps = D·S·(d_i, d_j, d_k), is what the file holds
    geom = Geometry.of(fixed)
    pk, pj, pi = pad[::-1]
    inner = sitk.GetArrayFromImage(field)[pk:-pk, pj:-pj, pi:-pi]
    vox = vox_from_lps_disp(inner, geom)
    k, j, i = np.meshgrid(*[np.linspace(0, 1, n) for n in geom.shape_kji], indexing="ij")
    assert np.allclose(vox[0], 1.5 * np.sin(3 * j), atol=1e-4)
    assert np.allclose(vox[1], 0.8, atol=1e-4) and np.allclose(vox[2], -0.5 * k, atol=1e-4)
    # warped.nii.gz is sitk.Resample(moving, fixed, T): the ITK resampling direction
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    ref = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, t, sitk.sitkLinear, 0.0))
    assert np.abs(warped - ref).max() < 1e-3
    assert report["files"]["transform"] == "transform.h5"
    assert json.load(open(out / "report.json"))["method"] == "_test_known_field"
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]
