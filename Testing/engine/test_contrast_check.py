"""Issue 18: a method that handles one contrast is not run, unasked, on images that look like two contrasts
(contrast.py): the check's statistic on phantoms, the CLI's refusal (one line, exit 2, nothing written), the
warning with --contrast-check warn (report.json, the summary) and a method that handles two contrasts passing."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import blank, from_array, phantom, points_lps, run_cli, smooth_field_lps
from deepdiffreg import contrast
from synth import phantom_labels

# the phantom's T2-like table: the order of the tissues reversed (brain dark, ventricles bright, blob darkest)
T2_MEANS = {0: 5.0, 1: 40.0, 2: 140.0, 3: 120.0, 4: 15.0}


def _t2_like(p: np.ndarray, seed: int) -> np.ndarray:
    lab = phantom_labels(p)
    rng = np.random.default_rng(seed)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    texture = -8.0 * np.sin(x / 3.0) * np.sin(y / 3.5) * np.cos(z / 4.0) * (lab > 0)
    img = np.vectorize(T2_MEANS.get)(lab).astype(np.float32) + texture.astype(np.float32)
    return img + rng.normal(0, 2.0, img.shape).astype(np.float32)


def _norm(a: np.ndarray) -> torch.Tensor:
    lo, hi = np.percentile(a, [0.5, 99.5])
    return torch.from_numpy(((np.clip(a, lo, hi) - lo) / (hi - lo)).astype(np.float32))[None, None]


def test_rank_correlation_tells_one_contrast_from_two():
    """Same table, another deformation: ρ well above the threshold; the reversed table: well below; too little
    joint foreground: None (no verdict)."""
    grid = blank(size=(40, 44, 36), spacing=(1.5, 1.4, 1.6), origin=(-30.0, -31.0, -28.0))
    p = points_lps(grid)
    t1, _ = phantom(p, seed=0)
    t1_moved, _ = phantom(p - smooth_field_lps(p, 3.0), seed=1)
    t2_moved = _t2_like(p - smooth_field_lps(p, 3.0), seed=2)
    same = contrast.rank_correlation(_norm(t1), _norm(t1_moved))
    other = contrast.rank_correlation(_norm(t1), _norm(t2_moved))
    # measured: 0.49 (3 mm apart, unregistered) and −0.46
    assert same > contrast.SAME_CONTRAST_MIN_RHO + 0.2 and other < contrast.SAME_CONTRAST_MIN_RHO - 0.5, (same, other)
    r = contrast.check(_norm(t1), _norm(t2_moved), None, handles="same")
    assert r["looks"] == "different" and r["mismatch"] and r["rank_correlation"] == pytest.approx(other, abs=1e-4)
    assert not contrast.check(_norm(t1), _norm(t2_moved), None, handles="different")["mismatch"]
    assert not contrast.check(_norm(t1), _norm(t1_moved), None, handles="same")["mismatch"]
    # the pipeline's form: smoothed by 2 mm, the joint foreground eroded by 4 mm (measured 0.82 and −0.86); smoothed
    # without the erosion the blurred border made the T2-like pair −0.05 (contrast.rank_correlation)
    sp = grid.GetSpacing()
    same_s = contrast.rank_correlation(_norm(t1), _norm(t1_moved), spacing_ijk=sp)
    other_s = contrast.rank_correlation(_norm(t1), _norm(t2_moved), spacing_ijk=sp)
    assert same_s > same + 0.2 and other_s < -0.6, (same_s, other_s)
    assert contrast.check(_norm(t1), _norm(t2_moved), None, "same", sp)["rank_correlation"] == pytest.approx(
        other_s, abs=1e-4)
    tiny = torch.zeros_like(_norm(t1))
    tiny[..., :5, :5, :5] = 1.0
    assert contrast.rank_correlation(tiny, tiny) is None
    r = contrast.check(tiny, tiny, None, handles="same")
    assert r["looks"] is None and not r["mismatch"]
    json.dumps(r, allow_nan=False)                    # strict JSON: null, never NaN


@pytest.fixture(scope="module")
def t2_pair(tmp_path_factory, pair):
    """The session's fixed phantom and a T2-like moving image of the same deformed anatomy."""
    d = tmp_path_factory.mktemp("t2pair")
    moving = blank(size=(40, 44, 36), spacing=(1.5, 1.4, 1.6), origin=(-30.0, -31.0, -28.0))
    p_m = points_lps(moving)
    path = str(d / "moving_t2.nii.gz")
    sitk.WriteImage(from_array(_t2_like(p_m - smooth_field_lps(p_m, 3.0), seed=1), moving), path)
    return {"fixed": pair["fixed"], "moving": path, "dir": d}


def test_one_contrast_method_refuses_two_contrasts_in_one_line(t2_pair):
    out = t2_pair["dir"] / "refused"
    r = run_cli("register", "--fixed", t2_pair["fixed"], "--moving", t2_pair["moving"], "--out", out,
                "--method", "demons", "--threads", "1")
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "different contrasts" in lines[0] and "demons handles one contrast" in lines[0]
    assert "nodeo" in lines[0] and "--contrast-check warn" in lines[0]   # what to do instead, from the registry
    assert not out.exists()                                               # nothing half-written


def test_warn_runs_it_and_says_so(t2_pair):
    out = t2_pair["dir"] / "warned"
    r = run_cli("register", "--fixed", t2_pair["fixed"], "--moving", t2_pair["moving"], "--out", out,
                "--method", "demons", "--threads", "1", "--contrast-check", "warn", "--demons-iterations", "5", "5", "5")
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    cc = rep["contrast_check"]
    assert cc["looks"] == "different" and cc["mismatch"] and cc["method_handles"] == "same"
    assert cc["rank_correlation"] < contrast.SAME_CONTRAST_MIN_RHO and "different contrasts" in cc["warning"]
    assert "warning: the images look like different contrasts" in r.stdout


def test_same_contrast_and_two_contrast_methods_pass(pair, t2_pair, tmp_path):
    """The session's one-contrast pair runs with the check recorded; --contrast-check off records nothing."""
    out = tmp_path / "same"
    r = run_cli("register", "--fixed", pair["fixed"], "--moving", pair["moving"], "--out", out, "--method", "demons",
                "--threads", "1", "--demons-iterations", "5", "5", "5")
    assert r.returncode == 0, r.stderr
    cc = json.loads((out / "report.json").read_text())["contrast_check"]
    assert cc["looks"] == "same" and not cc["mismatch"] and "warning" not in cc
    assert cc["rank_correlation"] > contrast.SAME_CONTRAST_MIN_RHO
    r = run_cli("register", "--fixed", t2_pair["fixed"], "--moving", t2_pair["moving"], "--out", tmp_path / "off",
                "--method", "demons", "--threads", "1", "--contrast-check", "off", "--demons-iterations", "5", "5", "5")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "off" / "report.json").read_text())["contrast_check"] is None
    from deepdiffreg.methods.base import get_method
    assert get_method("nodeo")().contrasts() == "different"   # the check passes it (mismatch needs "same")


def test_bad_contrast_check_value_is_one_line(pair, tmp_path):
    r = run_cli("register", "--fixed", pair["fixed"], "--moving", pair["moving"], "--out", tmp_path / "x",
                "--method", "demons", "--contrast-check", "maybe")
    assert r.returncode == 2 and "--contrast-check" in r.stderr and not os.path.exists(tmp_path / "x")
