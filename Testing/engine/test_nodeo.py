"""NODEO recovers a known smooth deformation of a small 3D volume (Dice up, no folds), through the CLI."""
import json

import numpy as np
import SimpleITK as sitk

from deepdiffreg.pipeline import displacement_on_grid
from synth import run_cli, points_lps, smooth_field_lps


def test_nodeo_recovers_known_deformation(pair, tmp_path):
    out = tmp_path / "nodeo"
    res = run_cli("register", "--fixed", pair["fixed"], "--moving", pair["moving"], "--method", "nodeo",
                  "--fixed-seg", pair["fixed_seg"], "--moving-seg", pair["moving_seg"],
                  "--fixed-landmarks", pair["fixed_landmarks"], "--moving-landmarks", pair["moving_landmarks"],
                  "--no-align", "--spacing", "2", "--nodeo-iterations", "150", "--out", out)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    dice = report["dice"]
    assert dice["after"]["mean"] > dice["before"]["mean"] + 0.04, dice
    assert report["folds"]["percent_folded"] < 0.5
    assert report["tre_mm"]["after"]["mean"] < 0.7 * report["tre_mm"]["before"]["mean"], report["tre_mm"]
    # The written transform approaches the true T(x) = x + u(x) inside the phantom.
    fixed = sitk.ReadImage(pair["fixed"])
    true_u = smooth_field_lps(points_lps(fixed), amplitude=3.0)
    t = sitk.ReadTransform(str(out / "transform.h5"))   # composite [A, U]; --no-align: A = I, T(x) − x = u(x)
    est_u = sitk.GetArrayFromImage(displacement_on_grid([t], fixed))
    inside = sitk.GetArrayFromImage(sitk.ReadImage(pair["fixed_seg"])) > 0
    err = np.linalg.norm(est_u - true_u, axis=-1)[inside].mean()
    base = np.linalg.norm(true_u, axis=-1)[inside].mean()
    assert err < 0.7 * base, (err, base)
    # Printed summary and the JSON result line for callers
    assert "Dice:" in res.stdout and '"event": "result"' in res.stdout
    for name in ("transform.h5", "inverse.h5", "jacobian.nii.gz", "grid.vtk", "warped.nii.gz", "warped_seg.nii.gz"):
        assert (out / name).exists(), name
    det = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "jacobian.nii.gz")))
    assert det.shape == inside.shape and abs(float(np.median(det)) - 1.0) < 0.1

    # inverse.h5 (moving grid) undoes transform.h5: T(T⁻¹(y)) ≈ y inside the phantom
    inv = sitk.ReadTransform(str(out / "inverse.h5"))
    rng = np.random.default_rng(0)
    ys = rng.uniform(-12, 12, size=(50, 3))
    err_ic = [np.linalg.norm(np.array(t.TransformPoint(inv.TransformPoint(tuple(y)))) - y) for y in ys]
    assert np.mean(err_ic) < 0.2 and np.max(err_ic) < 1.0, (np.mean(err_ic), np.max(err_ic))

    # `deepdiffreg evaluate` on the written transform reproduces the report's numbers (one metric implementation).
    ev = run_cli("evaluate", "--transform", out / "transform.h5", "--fixed", pair["fixed"], "--moving", pair["moving"],
                 "--fixed-seg", pair["fixed_seg"], "--moving-seg", pair["moving_seg"],
                 "--fixed-landmarks", pair["fixed_landmarks"], "--moving-landmarks", pair["moving_landmarks"])
    assert ev.returncode == 0, ev.stderr
    got = json.loads(ev.stdout)
    assert abs(got["dice"]["transform"]["mean"] - dice["after"]["mean"]) < 1e-9
    assert abs(got["tre_mm"]["transform"]["mean"] - report["tre_mm"]["after"]["mean"]) < 1e-9
    assert abs(got["folds"]["percent_folded"] - report["folds"]["percent_folded"]) < 1e-9

    # `deepdiffreg apply`: the moving segmentation resampled with the result equals warped_seg.nii.gz; moving
    # landmarks mapped with the inverse land near the fixed ones.
    seg_out = tmp_path / "seg_on_fixed.nii.gz"
    ap = run_cli("apply", "--result", out, "--image", pair["moving_seg"], "--labels", "--out", seg_out)
    assert ap.returncode == 0, ap.stderr
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(seg_out))),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped_seg.nii.gz"))))
    pts_out = tmp_path / "moving_points_in_fixed.csv"
    ap = run_cli("apply", "--result", out, "--points", pair["moving_landmarks"], "--out", pts_out)
    assert ap.returncode == 0, ap.stderr
    from deepdiffreg.io.images import read_landmarks
    mapped = read_landmarks(str(pts_out), "mapped")
    fixed_pts = read_landmarks(pair["fixed_landmarks"], "fixed")
    moving_pts = read_landmarks(pair["moving_landmarks"], "moving")
    assert np.linalg.norm(mapped - fixed_pts, axis=1).mean() < np.linalg.norm(moving_pts - fixed_pts, axis=1).mean()
