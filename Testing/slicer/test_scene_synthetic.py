"""scene.load_result against hand-written result directories (exact geometry, a folded field)."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import slicer

from conftest import F, interior_mask, reslice_onto
from DeepDiffRegLib import qa, scene as ddscene


def _load_inputs(mrml, case):
    lg = ddscene.Logics(mrml.scene, mrml.app_logic)
    return lg, lg.load_volume(case["fixed"], "fixed"), lg.load_volume(case["moving"], "moving")


def test_oblique_moving_under_transform_matches_warped(mrml, synthetic_result):
    case = synthetic_result
    lg, fixed, moving = _load_inputs(mrml, case)
    res = ddscene.load_result(mrml.scene, case["out_dir"], fixed, moving, logics=lg)
    # one node for the composite [A, U] (a general transform), its grid part interpolated linearly like ITK
    assert res.transform.IsA("vtkMRMLTransformNode") and not res.transform.IsLinear()
    parts = ddscene.grid_parts(res.transform)
    assert len(parts) == 1 and all(g.GetInterpolationMode() == 1 for g in parts)   # VTK_LINEAR_INTERPOLATION
    assert moving.GetParentTransformNode() is res.transform
    shown = reslice_onto(fixed, moving)
    warped = sitk.GetArrayFromImage(sitk.ReadImage(case["out_dir"] + "/warped.nii.gz")).astype(float)
    f_img, m_img = sitk.ReadImage(case["fixed"]), sitk.ReadImage(case["moving"])
    mask = interior_mask(f_img, m_img, sitk.ReadTransform(case["out_dir"] + "/transform.h5"))
    diff = np.abs(shown - warped)[mask]
    ident = reslice_onto(fixed, ddscene.Logics(mrml.scene).load_volume(case["moving"], "m2"))
    assert mask.sum() > 3000
    assert diff.max() < 2e-3 and diff.mean() < 2e-4, (diff.max(), diff.mean())
    # control: without the transform the same comparison is far off (the direction is not ambiguous)
    assert np.abs(ident - warped)[mask].mean() > 1.0


def test_jacobian_grid_inverse_attributes_references(mrml, synthetic_result):
    case = synthetic_result
    lg, fixed, moving = _load_inputs(mrml, case)
    res = ddscene.load_result(mrml.scene, case["out_dir"], fixed, moving, logics=lg)
    # Jacobian: scalar volume on the fixed grid with the procedural diverging colour node centred at 1
    jac = res.jacobian
    assert jac.IsA("vtkMRMLScalarVolumeNode") and not jac.IsA("vtkMRMLLabelMapVolumeNode")
    np.testing.assert_allclose(ddscene.ijk_to_ras(jac), ddscene.ijk_to_ras(fixed), atol=1e-4)
    np.testing.assert_allclose(ddscene.volume_array(jac), case["jac"], atol=1e-6)
    dn = jac.GetDisplayNode()
    cn = dn.GetColorNode()
    assert cn.IsA("vtkMRMLProceduralColorNode") and cn.GetName() == ddscene.JACOBIAN_COLOR_NODE_NAME
    assert (dn.GetWindowLevelMin(), dn.GetWindowLevelMax()) == ddscene.JACOBIAN_RANGE
    assert 0.5 * (dn.GetWindowLevelMin() + dn.GetWindowLevelMax()) == 1.0
    ctf = cn.GetColorTransferFunction()
    white, low, high = ctf.GetColor(1.0), ctf.GetColor(0.2), ctf.GetColor(1.8)
    assert min(white) > 0.9                      # det 1 -> white
    assert low[2] > low[0] and high[0] > high[2]  # < 1 blue, > 1 red
    # grid: a model in fixed space; SPACE=LPS honoured so its bounds lie inside the fixed volume's RAS bounds
    g = res.grid
    assert g.IsA("vtkMRMLModelNode") and g.GetPolyData().GetNumberOfLines() == case["grid_lines"]
    gb, fb = [0.0] * 6, ddscene.volume_ras_bounds(fixed)
    g.GetRASBounds(gb)
    tol = 5.5  # vertices are moved by T (|u| < 4 mm, the affine part by < 1.5 mm more)
    for a in range(3):
        assert fb[2 * a] - tol <= gb[2 * a] < gb[2 * a + 1] <= fb[2 * a + 1] + tol, (a, gb, fb)
    # loaded the other way round (RAS asked), the header still wins: same bounds
    g2 = mrml.io.models.AddModel(case["out_dir"] + "/grid.vtk", slicer.vtkMRMLStorageNode.CoordinateSystemRAS)
    gb2 = [0.0] * 6; g2.GetRASBounds(gb2)
    np.testing.assert_allclose(gb2, gb, atol=1e-6)
    assert g.GetDisplayNode().GetActiveScalarName() == "jacobian"
    # inverse: present, and T^-1(T(p)) ~ p at interior points
    inv = res.inverse
    assert inv is not None and inv.IsA("vtkMRMLTransformNode") and len(ddscene.grid_parts(inv)) == 1
    T, Ti = res.transform.GetTransformFromParent(), inv.GetTransformFromParent()
    c = np.array([fb[0] + fb[1], fb[2] + fb[3], fb[4] + fb[5]]) / 2
    errs = [np.linalg.norm(np.array(Ti.TransformPoint(T.TransformPoint(tuple(c + d)))) - (c + d))
            for d in ([0, 0, 0], [3, -2, 1], [-4, 3, -2])]
    assert max(errs) < 0.1, errs
    # provenance attributes on every output node
    for n in res.nodes():
        assert n.GetAttribute("DeepDiffReg.method") == "synthetic"
        assert n.GetAttribute("DeepDiffReg.modelId") == "synthetic-test"
        assert n.GetAttribute("DeepDiffReg.weightsSha256") == "ab" * 32
        assert n.GetAttribute("DeepDiffReg.device") == "cpu"
        assert float(n.GetAttribute("DeepDiffReg.totalTimeS")) == 1.3
    # registration roles, like General Registration / Elastix
    assert res.transform.GetNodeReferenceID("spatialRegistrationMoving") == moving.GetID()
    assert res.transform.GetNodeReferenceID("spatialRegistrationFixed") == fixed.GetID()
    assert inv.GetNodeReferenceID("spatialRegistrationMoving") == fixed.GetID()
    # the Transforms module's grid view is ready (off until the user switches it on), over the fixed volume
    tdn = res.transform.GetDisplayNode()
    assert tdn.GetVisualizationMode() == slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID
    assert tdn.GetRegionNode() is fixed and not tdn.GetVisibility()
    # all outputs sit in one subject-hierarchy folder
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml.scene)
    assert res.folder_item and all(sh.GetItemParent(sh.GetItemByDataNode(n)) == res.folder_item for n in res.nodes())
    # no folds in a smooth field: no fold segment
    assert res.folds is None and not res.fold_summary.has_folds


def test_fold_segment_and_worst_fold(mrml, folded_result):
    case = folded_result
    assert case["n_fold"] > 0
    lg, fixed, moving = _load_inputs(mrml, case)
    res = ddscene.load_result(mrml.scene, case["out_dir"], fixed, moving, logics=lg)
    s = res.fold_summary
    assert s.num_folded == case["n_fold"] and s.min_det < 0
    seg = res.folds
    assert seg is not None and seg.IsA("vtkMRMLSegmentationNode")
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    sid = segmentation.GetNthSegmentID(0)
    assert segmentation.GetSegment(sid).GetName() == ddscene.FOLD_SEGMENT_NAME
    rep = segmentation.GetSegment(sid).GetRepresentation(
        slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName())
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkCommonMath import vtkMatrix4x4
    assert int((vtk_to_numpy(rep.GetPointData().GetScalars()) > 0).sum()) == case["n_fold"]
    m = vtkMatrix4x4(); rep.GetImageToWorldMatrix(m)
    np.testing.assert_allclose(ddscene.matrix_to_numpy(m), ddscene.ijk_to_ras(fixed), atol=1e-4)
    # worst fold: the voxel with the smallest det J, in RAS; slice views centre on it
    k, j, i = np.unravel_index(np.argmin(case["jac"]), case["jac"].shape)
    assert s.worst_ijk == (i, j, k)
    expect = ddscene.ijk_to_ras(fixed) @ np.array([i, j, k, 1.0])
    np.testing.assert_allclose(s.worst_ras, expect[:3], atol=1e-4)
    sl = slicer.vtkMRMLSliceLogic(); sl.SetMRMLScene(mrml.scene); sl.SetMRMLApplicationLogic(mrml.app_logic)
    sn = sl.AddSliceNode("Red"); sn.SetOrientationToAxial()
    ddscene.centre_on_worst_fold(res, [sn])
    centre = np.array([sn.GetSliceToRAS().GetElement(r, 3) for r in range(3)])
    np.testing.assert_allclose(centre, expect[:3], atol=1e-3)


def test_outputs_into_selected_nodes_save_and_harden(mrml, synthetic_result, tmp_path):
    case = synthetic_result
    lg, fixed, moving = _load_inputs(mrml, case)
    t_out = mrml.scene.AddNewNodeByClass("vtkMRMLTransformNode", "my transform")
    j_out = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my jacobian")
    n_before = mrml.scene.GetNumberOfNodesByClass("vtkMRMLTransformNode")
    res = ddscene.load_result(mrml.scene, case["out_dir"], fixed, moving, logics=lg,
                              outputs={"transform": t_out, "jacobian": j_out})
    assert res.transform is t_out and res.jacobian is j_out and t_out.GetName() == "my transform"
    assert mrml.scene.GetNumberOfNodesByClass("vtkMRMLTransformNode") == n_before + 1  # only the inverse is new
    assert all(g.GetInterpolationMode() == 1 for g in ddscene.grid_parts(t_out))      # linear, also when adopted
    # save the transform as .h5: sitk reads back the same map (LPS)
    p = str(tmp_path / "saved.h5")
    assert ddscene.save_transform(t_out, p)
    a, b = sitk.ReadTransform(case["out_dir"] + "/transform.h5"), sitk.ReadTransform(p)
    fb = ddscene.volume_ras_bounds(fixed)
    c = F @ (np.array([fb[0] + fb[1], fb[2] + fb[3], fb[4] + fb[5]]) / 2)
    for d in ([0, 0, 0], [2.5, -1, 3]):
        np.testing.assert_allclose(b.TransformPoint(tuple(c + d)), a.TransformPoint(tuple(c + d)), atol=1e-6)
    # harden on another node: the volume is resampled, and no longer has a parent
    m2 = lg.load_volume(case["moving"], "moving copy")
    assert ddscene.harden(mrml.scene, t_out, [m2]) == [m2] and m2.GetParentTransformNode() is None


def test_metrics_table_from_report(synthetic_result):
    rows = qa.metrics_table(qa.read_report(synthetic_result["out_dir"]))
    assert rows[0] == ("Dice (mean)", "0.500", "0.800", "")
    assert ("TRE (mean)", "4.00", "1.00", "mm") in rows and len(rows) == 5
    assert qa.metrics_table({"method": "x"}) == []


def test_older_single_field_result_still_loads_linear(mrml, tmp_path):
    """A result written before the composite (one DisplacementFieldTransform) loads as a grid transform node, is
    set as the moving volume's parent and is interpolated linearly, as before."""
    import synthetic
    case = synthetic.write_result_dir(str(tmp_path / "old"), composite=False)
    lg, fixed, moving = _load_inputs(mrml, case)
    res = ddscene.load_result(mrml.scene, case["out_dir"], fixed, moving, logics=lg)
    assert res.transform.IsA("vtkMRMLGridTransformNode") and moving.GetParentTransformNode() is res.transform
    assert [g.GetInterpolationMode() for g in ddscene.grid_parts(res.transform)] == [1]
    shown = reslice_onto(fixed, moving)
    warped = sitk.GetArrayFromImage(sitk.ReadImage(case["out_dir"] + "/warped.nii.gz")).astype(float)
    mask = interior_mask(sitk.ReadImage(case["fixed"]), sitk.ReadImage(case["moving"]),
                         sitk.ReadTransform(case["out_dir"] + "/transform.h5"))
    assert mask.sum() > 3000 and np.abs(shown - warped)[mask].max() < 2e-3


def test_uncertainty_map_labelled_unreliable_unless_the_report_declares_it_qa(mrml, tmp_path):
    """An uncertainty map loads under its own name only when report.json declares it fit for QA
    (``method_info.uncertainty_qa.reliable``); otherwise — declared unreliable, or not said at all — its node
    says "unreliable, not QA", carries the attribute, and the load reports why."""
    import json
    import shutil

    import synthetic
    names = {}
    for case_name, qa_entry in (("unreliable", {"reliable": False, "note": "rho 0.31 below 0.5"}),
                                ("silent", None), ("qa", {"reliable": True})):
        case = synthetic.write_result_dir(str(tmp_path / case_name))
        out = case["out_dir"]
        shutil.copy(out + "/jacobian.nii.gz", out + "/uncertainty.nii.gz")   # any scalar map on the fixed grid
        rep = json.loads(open(out + "/report.json").read())
        rep.setdefault("files", {})["uncertainty"] = "uncertainty.nii.gz"
        if qa_entry is not None:
            rep.setdefault("method_info", {})["uncertainty_qa"] = qa_entry
        open(out + "/report.json", "w").write(json.dumps(rep))
        lg, fixed, moving = _load_inputs(mrml, case)
        res = ddscene.load_result(mrml.scene, out, fixed, moving, logics=lg, name_prefix=case_name)
        names[case_name] = (res.uncertainty.GetName(), res.uncertainty.GetAttribute("DeepDiffReg.uncertaintyReliable"),
                            [w for w in res.warnings if "uncertainty" in w])
    assert names["qa"] == ("qa uncertainty", "true", [])
    for case_name in ("unreliable", "silent"):
        name, attr, warnings = names[case_name]
        assert name.endswith("(unreliable, not QA)") and attr == "false" and len(warnings) == 1
    assert "rho 0.31 below 0.5" in names["unreliable"][2][0]


def test_contrast_warning_of_the_report_reaches_the_panel(mrml, tmp_path):
    """A run made with --contrast-check warn on images that looked like two contrasts: load_result returns the
    report's warning (the panel shows res.warnings); a report without one adds none."""
    import json

    import synthetic
    got = {}
    warned = {"looks": "different", "mismatch": True,
              "warning": "the images look like different contrasts (rank correlation -0.34 ...)"}
    for case_name, check in (("warned", warned), ("clean", {"looks": "same", "mismatch": False})):
        case = synthetic.write_result_dir(str(tmp_path / case_name))
        out = case["out_dir"]
        rep = json.loads(open(out + "/report.json").read())
        rep["contrast_check"] = check
        open(out + "/report.json", "w").write(json.dumps(rep))
        lg, fixed, moving = _load_inputs(mrml, case)
        res = ddscene.load_result(mrml.scene, out, fixed, moving, logics=lg, name_prefix=case_name)
        got[case_name] = [w for w in res.warnings if "contrast" in w]
    assert got["clean"] == [] and got["warned"] == [warned["warning"]]
