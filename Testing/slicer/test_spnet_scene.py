"""SPnet's inverse in a real MRML scene (slicer-core): a segmentation drawn on the fixed image, put under the
result's inverse transform (``inverse.h5``, the network's exp(−v₁)) and hardened as a Slicer user would, lands on
the moving image's anatomy (Dice against the moving image's own segmentation).

The pair has a known smooth deformation (up to ~3 mm) on an oblique fixed grid and a rotated, anisotropic moving
grid. So that the result does not depend on whether bundled SPnet weights are trained, the registration is a short
fit through the method's own path: an untrained SPnet (velocity heads at their N(0, 1e-5) init, so v₁ ≈ 0) given as
``--spnet-weights``, then ``--spnet-refine 150`` Adam steps on v₁ with SPnet's symmetric level-1 loss; forward and
inverse are exp(±v₁) as for a trained network. A real ``deepdiffreg register`` subprocess, CPU."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import MODULE_DIR
from DeepDiffRegLib import inputs as ddinputs, scene as ddscene
from synthetic import make_image, physical_points, rot

SEGMENTS = ("core", "blob", "bar")


def _labels(p: np.ndarray, c: np.ndarray) -> np.ndarray:
    x, y, z = p[..., 0] - c[0], p[..., 1] - c[1], p[..., 2] - c[2]
    lab = np.zeros(p.shape[:3], np.int16)
    lab[x ** 2 / 150 + y ** 2 / 100 + z ** 2 / 120 < 1] = 1
    lab[(np.abs(x) < 10) & (np.abs(y) < 6) & (np.abs(z) < 9)] = 3
    lab[(x - 6) ** 2 + (y + 4) ** 2 + (z - 3) ** 2 < 20] = 2
    return lab


def _image(lab: np.ndarray) -> np.ndarray:
    return np.choose(lab, [10.0, 100.0, 160.0, 60.0]).astype(np.float32)


def _write_pair(folder: str) -> dict[str, str]:
    os.makedirs(folder, exist_ok=True)
    fx = make_image((40, 40, 36), (1.0, 1.0, 1.0), (-20.0, -18.0, -16.0), rot("z", 20) @ rot("x", 10))
    pts = physical_points(fx)
    c = pts.reshape(-1, 3).mean(0)
    r = pts - c
    u = np.stack([3.0 * np.sin(r[..., 1] / 8.0), -2.5 * np.cos(r[..., 0] / 9.0),
                  2.0 * np.sin((r[..., 0] + r[..., 1]) / 10.0)], -1)          # moving(x + u(x)) = fixed(x)
    mv = make_image((42, 40, 38), (1.0, 1.1, 1.0), (-21.0, -22.0, -19.0), rot("z", -10))
    lab_f, lab_m = _labels(pts + u, c), _labels(physical_points(mv), c)
    out = {}
    for name, arr, like, dt in (("fixed", _image(lab_f), fx, None), ("moving", _image(lab_m), mv, None),
                                ("fixed_seg", lab_f, fx, 1), ("moving_seg", lab_m, mv, 1)):
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(like)
        out[name] = os.path.join(folder, f"{name}.nii.gz")
        sitk.WriteImage(img, out[name])
    return out


@pytest.fixture(scope="module")
def spnet_result(tmp_path_factory):
    import torch
    from deepdiffreg.io.weights import save_weights
    from deepdiffreg.methods.spnet import SPnet
    base = tmp_path_factory.mktemp("spnet")
    pair = _write_pair(str(base / "inputs"))
    torch.manual_seed(0)
    config = {**SPnet.default_config(), "method": SPnet.name}
    weights = str(base / "untrained.pt")
    save_weights(weights, config, SPnet.build_network(config).state_dict(), {"method": SPnet.name})
    out = str(base / "result")
    env = {**os.environ, "PYTHONPATH": MODULE_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-m", "deepdiffreg", "register", "--method", SPnet.name,
                        "--fixed", pair["fixed"], "--moving", pair["moving"], "--out", out, "--device", "cpu",
                        "--fixed-seg", pair["fixed_seg"], "--moving-seg", pair["moving_seg"], "--spacing", "1",
                        "--spnet-weights", weights, "--spnet-refine", "150", "--spnet-refine-lr", "0.1"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return {**pair, "out_dir": out}


def _segmentation_drawn_on(mrml, volume, lab: np.ndarray):
    """A segmentation node with one segment per label of ``lab`` (on ``volume``'s grid), named SEGMENTS."""
    seg = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn on fixed")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for k, name in enumerate(SEGMENTS, start=1):
        tmp = ddscene.create_fold_segmentation(mrml.scene, volume, (lab == k).astype(np.uint8), "tmp")
        s = tmp.GetSegmentation().GetNthSegment(0)
        s.SetName(name)
        seg.GetSegmentation().AddSegment(s)
        mrml.scene.RemoveNode(tmp)
    return seg


def _dice(a: np.ndarray, b: np.ndarray) -> list[float]:
    return [2.0 * np.sum((a == k) & (b == k)) / max(np.sum(a == k) + np.sum(b == k), 1)
            for k in range(1, len(SEGMENTS) + 1)]


def test_fixed_segmentation_under_the_inverse_lands_on_the_moving_anatomy(mrml, spnet_result, tmp_path):
    case = spnet_result
    lg = ddscene.Logics(mrml.scene, mrml.app_logic)
    fixed, moving = lg.load_volume(case["fixed"], "fixed"), lg.load_volume(case["moving"], "moving")
    # the moving volume stays where it is (moving space), so objects under the inverse are shown on it
    res = ddscene.load_result(mrml.scene, case["out_dir"], fixed, moving, logics=lg, apply_to_moving=False,
                              linear_interpolation=True)
    assert res.inverse is not None and res.inverse.IsA("vtkMRMLTransformNode")
    info = res.report["method_info"]
    assert "exp(-v1)" in info["inverse"] and info["refine_steps"] == 150
    lab_f = sitk.GetArrayFromImage(sitk.ReadImage(case["fixed_seg"]))
    lab_m = sitk.GetArrayFromImage(sitk.ReadImage(case["moving_seg"]))

    def carried(node_or_none, name):
        seg = _segmentation_drawn_on(mrml, fixed, lab_f)
        if node_or_none is not None:
            assert ddscene.harden(mrml.scene, node_or_none, [seg]) == [seg]
        path = ddinputs.write_segmentation(seg, list(SEGMENTS), moving, str(tmp_path / f"{name}.nii.gz"))
        mrml.scene.RemoveNode(seg)
        return sitk.GetArrayFromImage(sitk.ReadImage(path))

    before = _dice(carried(None, "untransformed"), lab_m)
    after = _dice(carried(res.inverse, "inverse"), lab_m)
    wrong = _dice(carried(res.transform, "forward"), lab_m)
    # the same through ITK: the fixed segmentation resampled onto the moving grid (nearest) with inverse.h5 (T⁻¹
    # maps a moving-space point to its fixed-space point), and without a transform
    f_seg, m_img = sitk.ReadImage(case["fixed_seg"]), sitk.ReadImage(case["moving"])
    itk = {name: _dice(sitk.GetArrayFromImage(sitk.Resample(f_seg, m_img, t, sitk.sitkNearestNeighbor, 0)), lab_m)
           for name, t in (("before", sitk.Transform()),
                           ("after", sitk.ReadTransform(os.path.join(case["out_dir"], "inverse.h5"))))}
    ice = info["inverse_consistency_net_grid"]
    print(f"\nDice with the moving segmentation per segment {SEGMENTS}: untransformed "
          f"{np.round(before, 3).tolist()} (mean {np.mean(before):.3f}), under the inverse "
          f"{np.round(after, 3).tolist()} (mean {np.mean(after):.3f}), under the forward (wrong node) "
          f"{np.round(wrong, 3).tolist()} (mean {np.mean(wrong):.3f}); ITK resampling without a transform "
          f"{np.round(itk['before'], 3).tolist()}, through inverse.h5 {np.round(itk['after'], 3).tolist()} (mean "
          f"{np.mean(itk['after']):.3f}); engine Dice after "
          f"{res.report['dice']['after']['mean']:.3f}; ICE {ice['ice_paper_vox']:.4f} vox (paper's), mean norm "
          f"{ice['mean_norm_fwd_after_inv_vox']:.4f} vox")
    assert np.mean(after) > np.mean(before) + 0.2 and min(after) > 0.7
    # Slicer's export agrees with ITK's resampling; hardening resamples the labelmap once more (nearest, on its own
    # grid) before the export, which costs a little Dice on these small segments
    assert abs(np.mean(before) - np.mean(itk["before"])) < 0.03
    assert np.mean(itk["after"]) - 0.1 < np.mean(after) <= np.mean(itk["after"]) + 0.02
    assert np.mean(after) > np.mean(wrong) + 0.05
