"""Outputs of a REAL ``deepdiffreg register`` run (NODEO, CPU, a few seconds), started through the module's own
process runner and loaded into a real vtkMRMLScene with the module's own scene code."""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import psutil
import pytest
import SimpleITK as sitk
import slicer

from conftest import MODULE_DIR, interior_mask, reslice_onto
from deepdiffreg.progress import ExitCode
from DeepDiffRegLib import process as ddprocess, scene as ddscene, snapshot

ITERATIONS = 60


def _command(inputs, out, iterations=ITERATIONS):
    # The phantom is 40 mm of smooth blobs: a 2 mm working grid and a 15 mm NCC window suit it better than the
    # brain defaults (3 mm grid on CPU, 9 mm window); threads: the engine's default (one core left free).
    return ddprocess.register_command(sys.executable, inputs["fixed"], inputs["moving"], out, method="nodeo",
                                      device="cpu", spacing_mm=2.0,
                                      extra=["--nodeo-iterations", str(iterations), "--nodeo-ncc-window-mm", "15"])


@pytest.fixture(scope="session")
def engine_run(tmp_path_factory):
    import synthetic
    base = tmp_path_factory.mktemp("engine")
    inputs = synthetic.write_engine_inputs(str(base / "inputs"))
    out = str(base / "result")
    events = []
    run = ddprocess.EngineProcess(_command(inputs, out), env=ddprocess.child_environment(MODULE_DIR),
                                  on_event=events.append).start()
    st = run.wait(timeout=300)
    assert st.ok, f"engine failed: {st.error_text()}\n{run.log_tail(30)}"
    return {**inputs, "out_dir": st.result["out_dir"], "status": st, "events": events, "log": run.log_tail(200)}


def test_real_run_reports_progress_device_and_result(engine_run):
    st, events = engine_run["status"], engine_run["events"]
    stages = [e["stage"] for e in events if e["event"] == "progress"]
    assert {"load", "register", "write"} <= set(stages)
    fractions = [e["progress"] for e in events if e["event"] == "progress"]
    assert all(0 <= f <= 1 for f in fractions) and fractions[-1] >= 0.9
    assert st.progress == max(fractions)  # the bar never goes backwards even if a stage restarts its count
    assert st.device == "cpu" and st.exit_code is ExitCode.OK
    assert os.path.samefile(st.result["out_dir"], engine_run["out_dir"])
    for f in ("transform.h5", "inverse.h5", "jacobian.nii.gz", "grid.vtk", "warped.nii.gz", "report.json"):
        assert os.path.exists(os.path.join(engine_run["out_dir"], f)), f


def test_real_run_moving_under_transform_matches_warped(mrml, engine_run):
    lg = ddscene.Logics(mrml.scene, mrml.app_logic)
    fixed, moving = lg.load_volume(engine_run["fixed"], "fixed"), lg.load_volume(engine_run["moving"], "moving")
    res = ddscene.load_result(mrml.scene, engine_run["out_dir"], fixed, moving, logics=lg)
    assert res.transform.IsA("vtkMRMLTransformNode") and moving.GetParentTransformNode() is res.transform
    assert [g.GetInterpolationMode() for g in ddscene.grid_parts(res.transform)] == [1]   # linear, as ITK
    out = engine_run["out_dir"]
    warped = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, "warped.nii.gz"))).astype(float)
    shown = reslice_onto(fixed, moving)
    f_img, m_img = sitk.ReadImage(engine_run["fixed"]), sitk.ReadImage(engine_run["moving"])
    mask = interior_mask(f_img, m_img, sitk.ReadTransform(os.path.join(out, "transform.h5")))
    diff = np.abs(shown - warped)[mask]
    rng = float(np.ptp(warped[mask]))
    print(f"\nreal run: moving under transform vs warped.nii.gz over {mask.sum()} voxels: max {diff.max():.2e} "
          f"mean {diff.mean():.2e} (intensity range {rng:.0f})")
    assert mask.sum() > 20000
    assert diff.max() < 1e-3 * rng and diff.mean() < 1e-4 * rng
    # and the registration did something: closer to the fixed image than the unregistered moving
    f = sitk.GetArrayFromImage(f_img).astype(float)
    moving.SetAndObserveTransformNodeID(None)
    before = reslice_onto(fixed, moving, background=0.0)
    cc_before = np.corrcoef(f[mask], before[mask])[0, 1]
    cc_after = np.corrcoef(f[mask], shown[mask])[0, 1]
    print(f"real run: correlation with fixed before {cc_before:.3f}, after {cc_after:.3f}")
    assert cc_after > cc_before + 0.05 and cc_after > 0.9


def test_real_run_nodes_colours_attributes_references(mrml, engine_run):
    lg = ddscene.Logics(mrml.scene, mrml.app_logic)
    fixed, moving = lg.load_volume(engine_run["fixed"], "fixed"), lg.load_volume(engine_run["moving"], "moving")
    res = ddscene.load_result(mrml.scene, engine_run["out_dir"], fixed, moving, logics=lg)
    # Jacobian: scalar volume on the fixed grid, procedural diverging colours centred at 1
    jac = res.jacobian
    assert jac.IsA("vtkMRMLScalarVolumeNode")
    np.testing.assert_allclose(ddscene.ijk_to_ras(jac), ddscene.ijk_to_ras(fixed), atol=1e-4)
    dn = jac.GetDisplayNode()
    assert dn.GetColorNode().IsA("vtkMRMLProceduralColorNode")
    assert 0.5 * (dn.GetWindowLevelMin() + dn.GetWindowLevelMax()) == pytest.approx(1.0)
    assert min(dn.GetColorNode().GetColorTransferFunction().GetColor(1.0)) > 0.9
    j = ddscene.volume_array(jac)
    np.testing.assert_array_equal(j, sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(engine_run["out_dir"],
                                                                                         "jacobian.nii.gz"))))
    assert np.isfinite(j).all() and j.min() == pytest.approx(res.report["folds"]["min_det"], rel=1e-5)
    # grid: model, SPACE=LPS honoured -> inside the fixed volume's RAS bounds (vertices moved by T, a few mm)
    gb, fb = [0.0] * 6, ddscene.volume_ras_bounds(fixed)
    res.grid.GetRASBounds(gb)
    assert res.grid.GetPolyData().GetNumberOfLines() > 0
    for a in range(3):
        assert fb[2 * a] - 6 <= gb[2 * a] < gb[2 * a + 1] <= fb[2 * a + 1] + 6, (a, gb, fb)
    # inverse present and (roughly) inverse of T at the centre
    assert res.inverse is not None and res.inverse.IsA("vtkMRMLTransformNode") and ddscene.grid_parts(res.inverse)
    c = tuple((np.array(fb[0::2]) + np.array(fb[1::2])) / 2)
    back = res.inverse.GetTransformFromParent().TransformPoint(res.transform.GetTransformFromParent().TransformPoint(c))
    assert np.linalg.norm(np.array(back) - c) < 0.5
    # provenance
    for n in res.nodes():
        assert n.GetAttribute("DeepDiffReg.method") == "nodeo"
        assert n.GetAttribute("DeepDiffReg.device") == "cpu"
        assert float(n.GetAttribute("DeepDiffReg.totalTimeS")) > 0
        assert "register" in n.GetAttribute("DeepDiffReg.timings")
        for key in ("modelId", "modelVersion", "weightsSha256"):  # NODEO has no weights: present, empty
            assert n.GetAttribute("DeepDiffReg." + key) is not None
    assert res.transform.GetNodeReferenceID("spatialRegistrationMoving") == moving.GetID()
    assert res.transform.GetNodeReferenceID("spatialRegistrationFixed") == fixed.GetID()
    # a diffeomorphic run: no folds, so no fold segment; fold numbers agree with report.json
    assert res.fold_summary.num_folded == res.report["folds"]["num_folded"] == 0 and res.folds is None


def test_qa_snapshot_from_real_run(engine_run, tmp_path):
    png = str(tmp_path / "qa.png")
    info = snapshot.qa_snapshot_from_files(engine_run["out_dir"], engine_run["fixed"], engine_run["moving"], png,
                                           size=128)
    assert os.path.getsize(png) > 5000
    assert info["shape"][0] == 3 * (128 + snapshot.LABEL_H) and info["grid_pixels"] > 200
    from vtkmodules.vtkIOImage import vtkPNGReader
    from vtkmodules.util.numpy_support import vtk_to_numpy
    r = vtkPNGReader(); r.SetFileName(png); r.Update()
    d = r.GetOutput().GetDimensions()
    img = vtk_to_numpy(r.GetOutput().GetPointData().GetScalars()).reshape(d[1], d[0], -1)[::-1]
    rows = np.split(img[..., :3].astype(int), 3, axis=0)
    assert all(row.std() > 10 for row in rows)  # three non-blank rows


def test_cancel_real_engine_run_leaves_no_process_and_no_output(tmp_path, engine_run):
    out = str(tmp_path / "cancelled")
    events = []
    run = ddprocess.EngineProcess(_command(engine_run, out, iterations=100000),
                                  env=ddprocess.child_environment(MODULE_DIR), on_event=events.append).start()
    deadline = time.monotonic() + 120
    while not any(e.get("stage") == "register" for e in events):
        assert time.monotonic() < deadline and run.running, run.log_tail()
        run.poll(); time.sleep(0.05)
    pid = run.pid
    run.cancel(grace_s=5.0)
    st = run.wait(timeout=30)
    assert st.exit_code is ExitCode.CANCELLED and st.cancelled
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not os.path.exists(out)
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith("cancelled")]
    assert leftovers == [], leftovers
