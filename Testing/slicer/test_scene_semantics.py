"""Which transform node moves which object (issue 14 item 4), the user's own parent transforms (item 5), and the
Jacobian overlay / grid display defaults (item 8), in a real MRML scene."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from conftest import F
from DeepDiffRegLib import inputs as ddinputs, scene as ddscene


def _load(mrml, case, **kw):
    lg = ddscene.Logics(mrml.scene, mrml.app_logic)
    fixed, moving = lg.load_volume(case["fixed"], "fixed"), lg.load_volume(case["moving"], "moving")
    return lg, fixed, moving


def _world(markup):
    p = [0.0, 0.0, 0.0]
    markup.GetNthControlPointPositionWorld(0, p)
    return np.array(p)


def test_moving_markup_under_forward_and_fixed_markup_under_inverse(mrml, synthetic_result):
    case = synthetic_result
    lg, fixed, moving = _load(mrml, case)
    res = ddscene.load_result(mrml.scene, case["out_dir"], fixed, moving, logics=lg, linear_interpolation=True)
    T = sitk.ReadTransform(case["out_dir"] + "/transform.h5")
    f_img = sitk.ReadImage(case["fixed"])
    x_lps = np.array(f_img.TransformContinuousIndexToPhysicalPoint([s / 2 for s in f_img.GetSize()]))
    y_lps = np.array(T.TransformPoint(tuple(x_lps)))            # the moving-space point that x corresponds to
    assert np.linalg.norm(y_lps - x_lps) > 0.5                  # the field moves this point
    x_ras, y_ras = F @ x_lps, F @ y_lps
    # drawn on the moving image (at y) -> under the FORWARD transform it is shown at its fixed-space position x
    on_moving = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "on moving")
    on_moving.AddControlPoint(*y_ras)
    on_moving.SetAndObserveTransformNodeID(res.transform.GetID())
    err_forward = np.linalg.norm(_world(on_moving) - x_ras)
    # drawn on the fixed image (at x) -> under the INVERSE it is shown at its moving-space position y
    on_fixed = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "on fixed")
    on_fixed.AddControlPoint(*x_ras)
    on_fixed.SetAndObserveTransformNodeID(res.inverse.GetID())
    err_inverse = np.linalg.norm(_world(on_fixed) - y_ras)
    # the other way round is wrong by about the displacement
    on_moving.SetAndObserveTransformNodeID(res.inverse.GetID())
    err_swapped = np.linalg.norm(_world(on_moving) - x_ras)
    print(f"\nforward {err_forward:.4f} mm, inverse {err_inverse:.4f} mm, swapped {err_swapped:.2f} mm")
    assert err_forward < 0.01 and err_inverse < 0.05 and err_swapped > 0.5
    assert "drawn on the moving image go under the forward" in " ".join(ddscene.__doc__.split())


def _translation(scene, name, ras_shift):
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    m = vtkMatrix4x4()
    for a in range(3):
        m.SetElement(a, 3, ras_shift[a])
    t.SetMatrixTransformToParent(m)
    return t


def test_user_parent_transforms_are_kept_and_exported(mrml, synthetic_result, tmp_path):
    case = synthetic_result
    lg, fixed, moving = _load(mrml, case)
    P = _translation(mrml.scene, "user pre-alignment", (5.0, 0.0, 0.0))
    moving.SetAndObserveTransformNodeID(P.GetID())
    assert ddinputs.transform_warnings(fixed, moving) and "kept" in ddinputs.transform_warnings(fixed, moving)[0]
    files = ddinputs.export_inputs(str(tmp_path / "a"), fixed, moving)
    exported = sitk.ReadImage(files["moving"])
    original = sitk.ReadImage(case["moving"])
    np.testing.assert_allclose(np.array(exported.GetOrigin()) - np.array(original.GetOrigin()), [-5.0, 0.0, 0.0],
                               atol=1e-4)  # the registration sees the moving volume where the user sees it (LPS)
    res = ddscene.load_result(mrml.scene, case["out_dir"], fixed, moving, logics=lg)
    assert moving.GetParentTransformNode() is P and P.GetParentTransformNode() is res.transform
    assert res.warnings and "kept" in res.warnings[0]
    # a second run: the first result above P is not exported, and is replaced
    files2 = ddinputs.export_inputs(str(tmp_path / "b"), fixed, moving)
    assert sitk.ReadImage(files2["moving"]).GetOrigin() == exported.GetOrigin()
    assert P.GetParentTransformNode() is res.transform  # restored after the export
    res2 = ddscene.load_result(mrml.scene, case["out_dir"], fixed, moving, logics=lg)
    assert moving.GetParentTransformNode() is P and P.GetParentTransformNode() is res2.transform


def test_transformed_fixed_volume_warns_and_results_follow_it(mrml, synthetic_result):
    case = synthetic_result
    lg, fixed, moving = _load(mrml, case)
    Fx = _translation(mrml.scene, "fixed placement", (0.0, 3.0, 0.0))
    fixed.SetAndObserveTransformNodeID(Fx.GetID())
    w = ddinputs.transform_warnings(fixed, moving)
    assert len(w) == 1 and "fixed volume is under the transform 'fixed placement'" in w[0]
    res = ddscene.load_result(mrml.scene, case["out_dir"], fixed, moving, logics=lg)
    assert res.transform.GetParentTransformNode() is Fx and moving.GetParentTransformNode() is res.transform
    for n in (res.jacobian, res.grid, res.warped):
        assert n.GetParentTransformNode() is Fx, n.GetName()


def test_jacobian_overlay_toggle_and_grid_not_in_3d(mrml, synthetic_result):
    case = synthetic_result
    lg, fixed, moving = _load(mrml, case)
    views = [mrml.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    res = ddscene.load_result(mrml.scene, case["out_dir"], fixed, moving, logics=lg)
    gd = res.grid.GetDisplayNode()
    assert gd.GetVisibility2D() and not gd.GetVisibility3D()
    assert ddscene.set_jacobian_overlay(mrml.scene, res.jacobian, True, opacity=0.3) == 3
    assert all(v.GetForegroundVolumeID() == res.jacobian.GetID() and abs(v.GetForegroundOpacity() - 0.3) < 1e-9
               for v in views)
    ddscene.set_jacobian_overlay(mrml.scene, res.jacobian, False)
    assert all(v.GetForegroundVolumeID() is None for v in views)
    ddscene.set_grid_visible(res.grid, False)
    assert not gd.GetVisibility() and not gd.GetVisibility2D()
    ddscene.set_grid_visible(res.grid, True)
    assert gd.GetVisibility() and gd.GetVisibility2D() and not gd.GetVisibility3D()


def test_snapshot_keeps_the_users_transform_chain(mrml, synthetic_result):
    from DeepDiffRegLib import snapshot
    case = synthetic_result
    lg, fixed, moving = _load(mrml, case)
    P = _translation(mrml.scene, "user pre-alignment", (2.0, 0.0, 0.0))
    moving.SetAndObserveTransformNodeID(P.GetID())
    res = ddscene.load_result(mrml.scene, case["out_dir"], fixed, moving, logics=lg)
    img = snapshot.qa_snapshot(mrml.scene, mrml.app_logic, fixed, moving, res, size=48)
    assert img.shape[0] == 3 * (48 + snapshot.LABEL_H)
    assert moving.GetParentTransformNode() is P and P.GetParentTransformNode() is res.transform
