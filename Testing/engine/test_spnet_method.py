"""SPnet as a method (methods/spnet.py): the loss is the reference code's, swapping fixed and moving swaps the
forward and inverse fields through ``estimate`` on an oblique grid, forward ∘ inverse is the identity within the
reported error, and ``deepdiffreg train --method spnet`` → publish → resume → ``deepdiffreg register --method
spnet`` writes the whole result contract. CPU, tiny grids, untrained or briefly trained networks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from deepdiffreg.field import warp
from deepdiffreg.frames import Geometry
from deepdiffreg.io.weights import save_weights
from deepdiffreg.methods.base import PairOnGrid, get_method
from deepdiffreg.methods.spnet import (LEVEL_WEIGHTS, NCC_WINDOWS, SPnet, grad_loss, inverse_consistency, ncc,
                                       spnet_loss)
from deepdiffreg.metrics import inverse_consistency_vox
from synth import rotation

NAME = SPnet.name


def _excited_weights(path: Path, seed: int = 0, std: float = 0.5) -> Path:
    """An untrained SPnet whose velocity heads move voxels (the N(0, 1e-5) init barely does), as a weights file."""
    torch.manual_seed(seed)
    config = SPnet.default_config()
    net = SPnet.build_network(config)
    for est in net.estimators:
        torch.nn.init.normal_(est.pred.weight, 0.0, std)
    save_weights(path, {**config, "method": NAME}, net.state_dict(), {"method": NAME})
    return path


def _smooth(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *[max(2, n // 4) for n in shape], generator=g)
    x = F.interpolate(x, size=tuple(shape), mode="trilinear", align_corners=True)
    return (x - x.min()) / (x.max() - x.min())


# -- the loss ---------------------------------------------------------------------------------------------------

def _reference_ncc(I, J, win):
    """The reference code's ncc: box sums by conv3d with a ones filter, zero padding win//2, stride 1."""
    filt = torch.ones(1, 1, win, win, win, dtype=I.dtype)
    pad = win // 2
    conv = lambda x: F.conv3d(x, filt, padding=pad)      # noqa: E731
    I_sum, J_sum, I2_sum, J2_sum, IJ_sum = conv(I), conv(J), conv(I * I), conv(J * J), conv(I * J)
    n = win ** 3
    u_I, u_J = I_sum / n, J_sum / n
    cross = IJ_sum - u_J * I_sum - u_I * J_sum + u_I * u_J * n
    I_var = I2_sum - 2 * u_I * I_sum + u_I * u_I * n
    J_var = J2_sum - 2 * u_J * J_sum + u_J * u_J * n
    return -torch.mean(cross * cross / (I_var * J_var + 1e-5))


def test_loss_is_the_reference_codes():
    torch.manual_seed(0)
    a, b = torch.rand(1, 1, 16, 16, 16, dtype=torch.float64), torch.rand(1, 1, 16, 16, 16, dtype=torch.float64)
    for win in NCC_WINDOWS:
        assert float(ncc(b, a, win)) == pytest.approx(float(_reference_ncc(b, a, win)), rel=1e-9, abs=1e-12)
    v = torch.randn(1, 3, 8, 10, 12, dtype=torch.float64)
    ref = sum(torch.mean((v.diff(dim=d)) ** 2) for d in (2, 3, 4)) / 3.0
    assert float(grad_loss(v)) == pytest.approx(float(ref), rel=1e-12)
    # the total: per level (ncc_fwd + ncc_bwd)/2 + λ·grad(v), weights 1, ½, ¼, ⅛, windows 9, 7, 5, 3
    net = SPnet.build_network(SPnet.default_config()).double()
    for est in net.estimators:
        torch.nn.init.normal_(est.pred.weight, 0.0, 0.02)
    with torch.no_grad():
        out = net(a, b)
        terms = spnet_loss(out, {"reg_weight": 1.0})
    expect = 0.0
    for i in range(4):
        pa, pb = out["pyramid_moving"][i], out["pyramid_fixed"][i]
        sim = 0.5 * (_reference_ncc(pb, warp(pa, out["forward"][i]), NCC_WINDOWS[i])
                     + _reference_ncc(pa, warp(pb, out["backward"][i]), NCC_WINDOWS[i]))
        expect = expect + LEVEL_WEIGHTS[i] * (sim + grad_loss(out["velocity"][i]))
    assert float(terms["loss"]) == pytest.approx(float(expect), rel=1e-9)
    assert LEVEL_WEIGHTS == (1.0, 0.5, 0.25, 0.125) and NCC_WINDOWS == (9, 7, 5, 3)


# -- the method on an oblique grid -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def oblique(tmp_path_factory):
    """Two estimates of one excited network on an oblique anisotropic working grid whose sizes are not multiples of
    8 (so the network grid is a resampling): (fixed, moving) and the swapped pair."""
    w = _excited_weights(tmp_path_factory.mktemp("spnet") / "excited.pt")
    shape = (20, 26, 22)                                          # (D, H, W) = (k, j, i)
    geom = Geometry((-10.0, 4.0, 7.0), (1.7, 1.2, 1.4), tuple(rotation(25.0, 15.0).ravel()), shape[::-1])
    f, m = _smooth(shape, 1), _smooth(shape, 2)
    method = get_method(NAME)(weights=str(w))
    ab = method.estimate(PairOnGrid(f, m, geom), torch.device("cpu"), lambda *a: None)
    ba = method.estimate(PairOnGrid(m, f, geom), torch.device("cpu"), lambda *a: None)
    return {"ab": ab, "ba": ba, "weights": w, "geom": geom, "f": f, "m": m}


def test_swapping_fixed_and_moving_swaps_forward_and_inverse(oblique):
    ab, ba = oblique["ab"], oblique["ba"]
    assert ab.disp_vox.shape == ab.inverse_disp_vox.shape == (1, 3, 20, 26, 22)
    mag = float(ab.disp_vox.norm(dim=1).mean())
    err_f = float((ab.disp_vox - ba.inverse_disp_vox).abs().max())
    err_i = float((ab.inverse_disp_vox - ba.disp_vox).abs().max())
    print(f"\nswap: mean |u| {mag:.3f} vox, max |u_AB - w_BA| {err_f:.2e}, max |w_AB - u_BA| {err_i:.2e} vox")
    assert mag > 0.3                                              # the network does move voxels
    assert err_f < 1e-5 and err_i < 1e-5                          # exact up to float32 rounding
    assert SPnet.caps.inverse == "exact" and SPnet.caps.learned


def test_forward_composed_with_inverse_is_the_identity_within_the_reported_error(oblique):
    ab = oblique["ab"]
    ice = ab.info["inverse_consistency_net_grid"]
    u, w = ab.disp_vox, ab.inverse_disp_vox
    work = inverse_consistency(u, w)                              # on the working grid, all voxels
    interior = inverse_consistency_vox(u, w)                      # the pipeline's number (10 % margin dropped)
    print(f"\nICE net grid: paper {ice['ice_paper_vox']:.4f} vox, mean norm {ice['mean_norm_inv_after_fwd_vox']:.4f}"
          f" / {ice['mean_norm_fwd_after_inv_vox']:.4f}, max {ice['max_norm_inv_after_fwd_vox']:.3f} vox for "
          f"{ice['mean_displacement_vox']:.3f} vox mean displacement; working grid mean "
          f"{work['mean_norm_fwd_after_inv_vox']:.4f}, interior {interior['mean_vox']:.4f} vox")
    # exp(v) ∘ exp(−v) = id up to the discretisation of scaling and squaring (spec A.10.2). The stated error, for
    # this untrained network's rough field (mean 0.4, max ~1.5 voxels): mean ‖φ∘φ⁻¹ − id‖ below 0.05 voxel (the
    # issue's target) and below 10 % of the mean displacement, on the network grid and on the working grid
    for d, mean_u in ((ice, ice["mean_displacement_vox"]), (work, work["mean_displacement_vox"])):
        for k in ("mean_norm_inv_after_fwd_vox", "mean_norm_fwd_after_inv_vox"):
            assert d[k] < 0.05 and d[k] < 0.1 * mean_u, (k, d)
    assert interior["mean_vox"] < 0.05 and ice["ice_paper_vox"] < 0.05
    # and it is not small because nothing moves: the inverse differs from the negated forward by more than that
    assert float((u + w).norm(dim=1).mean()) > 2 * work["mean_norm_fwd_after_inv_vox"]
    assert {"ice_paper_vox", "max_norm_fwd_after_inv_vox"} <= set(ice)


def test_refinement_lowers_the_loss_and_keeps_the_swap(oblique):
    o = oblique
    method = get_method(NAME)(weights=str(o["weights"]), refine=5, refine_lr=0.05)
    ab = method.estimate(PairOnGrid(o["f"], o["m"], o["geom"]), torch.device("cpu"), lambda *a: None)
    ba = method.estimate(PairOnGrid(o["m"], o["f"], o["geom"]), torch.device("cpu"), lambda *a: None)
    assert ab.info["refine_steps"] == 5 and ab.info["refine_loss_end"] < ab.info["refine_loss_start"]
    err = float((ab.disp_vox - ba.inverse_disp_vox).abs().max())
    moved = float((ab.disp_vox - o["ab"].disp_vox).abs().max())
    print(f"\nrefine 5: loss {ab.info['refine_loss_start']:.4f} -> {ab.info['refine_loss_end']:.4f}, field changed by "
          f"{moved:.3f} vox, swap error {err:.2e} vox")
    assert moved > 0.01 and err < 1e-3 * max(moved, 1.0) + 1e-4


# -- through the CLI: train, publish, resume, register ----------------------------------------------------------

def _cli(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepdiffreg", *map(str, args)], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=300, env={**os.environ, **env})


def _write_pair(folder: Path) -> dict[str, str]:
    from deepdiffreg.train.datasets import synthetic_training_data
    _, val, _ = synthetic_training_data(24, n_val=1)
    paths = {}
    for role in ("fixed", "moving"):
        for kind, key in (("", role), ("_seg", f"{role}_labels")):
            arr = val[0][key][0, 0].numpy()
            img = sitk.GetImageFromArray(arr.astype(np.float32) if not kind else arr.astype(np.int16))
            img.SetSpacing((2.0, 1.8, 2.2))
            img.SetDirection(tuple(rotation(15.0, 10.0).ravel()))
            paths[role + kind] = str(folder / f"{role}{kind}.nii.gz")
            sitk.WriteImage(img, paths[role + kind])
    return paths


def test_train_publish_resume_and_register_through_the_cli(tmp_path):
    models = tmp_path / "models"
    env = {"DEEPDIFFREG_MODELS_DIR": str(models), "DEEPDIFFREG_BUNDLED_MODELS": str(tmp_path / "no-bundled-models"),
           "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    common = ["train", "--method", NAME, "--synthetic", 16, "--out", run, "--val-every", 2, "--lr", 1e-3,
              "--threads", 1, "--dice-weight", 1.0, "--dice-labels", 2]
    r = _cli(env, *common, "--steps", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli(env, *common, "--steps", 4, "--publish", "spnet-test", "--models-dir", models, "--version", "0.0.1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "at step 2" in r.stdout
    rows = (run / "train_log.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:7] == ["step", "seconds", "loss", "sim", "reg", "ncc1", "dice_loss"] and "val_dice" in header
    assert [int(x.split(",")[0]) for x in rows[1:]] == [2, 4]
    entry = next(e for e in json.loads((models / "manifest.json").read_text())["models"] if e["id"] == "spnet-test")
    assert entry["method"] == NAME and entry["training"]["dice_weight"] == 1.0
    assert entry["training"]["ncc_windows"] == [9, 7, 5, 3] and entry["input_grid"]["size_multiple"] == 8
    obj = torch.load(models / entry["file"], weights_only=True)
    assert obj["meta"]["method"] == NAME and obj["config"]["level_weights"] == [1.0, 0.5, 0.25, 0.125]

    pair = _write_pair(tmp_path)
    out = tmp_path / "out"
    r = _cli(env, "register", "--method", NAME, "--fixed", pair["fixed"], "--moving", pair["moving"], "--out", out,
             "--fixed-seg", pair["fixed_seg"], "--moving-seg", pair["moving_seg"], "--no-align",
             "--spnet-refine", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("transform.h5", "inverse.h5", "jacobian.nii.gz", "grid.vtk", "warped.nii.gz", "warped_seg.nii.gz",
              "report.json"):
        assert (out / f).exists(), f
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == NAME and report["model"]["sha256"] == entry["sha256"]
    assert report["files"]["inverse"] == "inverse.h5" and report["method_options"]["refine"] == 2
    info = report["method_info"]
    assert info["refine_steps"] == 2 and info["net_grid"] == [24, 24, 24]
    assert "exp(-v1)" in info["inverse"]
    for k in ("ice_paper_vox", "mean_norm_inv_after_fwd_vox", "mean_norm_fwd_after_inv_vox"):
        assert np.isfinite(info["inverse_consistency_net_grid"][k]), k
    assert np.isfinite(info["inverse_consistency_working_grid"]["mean_vox"])
    assert "dice" in report and report["folds"]["percent_folded"] >= 0
    # ITK reads both transforms and resamples with them; T⁻¹(T(x)) ≈ x at the centre of the fixed image
    fixed, moving = sitk.ReadImage(pair["fixed"]), sitk.ReadImage(pair["moving"])
    T, Ti = sitk.ReadTransform(str(out / "transform.h5")), sitk.ReadTransform(str(out / "inverse.h5"))
    assert sitk.GetArrayFromImage(sitk.Resample(moving, fixed, T)).std() > 0
    assert sitk.GetArrayFromImage(sitk.Resample(fixed, moving, Ti)).std() > 0
    c = fixed.TransformContinuousIndexToPhysicalPoint([s / 2 for s in fixed.GetSize()])
    assert np.linalg.norm(np.array(Ti.TransformPoint(T.TransformPoint(c))) - np.array(c)) < 0.1
