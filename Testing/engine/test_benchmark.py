"""`deepdiffreg benchmark`: the --quick run through the CLI (real register child processes on a generated phantom),
the vxm-diff skip note, one-line errors, and the uncertainty-vs-error correlation on constructed maps."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk



def run_cli(*args, timeout=300, env=None):
    """The installed console script (as users run it; falls back to ``python -m deepdiffreg``)."""
    exe = os.path.join(os.path.dirname(sys.executable), "deepdiffreg")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "deepdiffreg"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    out = d / "bench.md"
    r = run_cli("benchmark", "--quick", "--methods", "nodeo", "demons", "--work", d / "work", "--out", out,
                timeout=240)
    return r, out


def test_quick_benchmark_writes_real_numbers(quick):
    r, out = quick
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out.with_suffix(".json").read_text())
    runs = {x["method"]: x for x in data["runs"]}
    assert set(runs) == {"nodeo", "demons"}
    for m, row in runs.items():
        assert row["status"] == "ok", row
        d = row["dice"]
        assert d["after"]["mean"] > d["before"]["mean"] + 0.2, (m, d)
        assert d["after"]["mean"] > d["initial_alignment"]["mean"], (m, d)
        t = row["tre_mm"]
        assert t["after"]["mean"] < t["before"]["mean"], (m, t)
        assert 0.0 <= row["folds"]["percent_folded"] < 1.0
        assert np.isfinite(row["folds"]["std_log_det"]) and row["folds"]["std_log_det"] > 0
        assert row["wall_s"] > 0 and row["engine_s"] > 0 and row["wall_s"] >= row["engine_s"]
        assert row["peak_memory_mb"]["cpu"] > 50
        assert row["device"] == "cpu" and row["threads"] >= 1
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["torch"]
    assert len(data["machine"]["load_average_start"]) == 3
    assert [s["method"] for s in data["summary"]] == ["nodeo", "demons"]

    md = out.read_text()
    assert "## Run of" in md and "**Machine:**" in md and "load average" in md
    for m, row in runs.items():
        line = next(l for l in md.splitlines() if l.startswith(f"| {m} | 0.") or l.startswith(f"| {m} | 1."))
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        # method, Dice before / init / after, TRE before / init / after, % folded, % fg, std log det, wall, engine, MB
        nums = [float(c) for c in cells[1:12]]
        assert nums[2] == pytest.approx(row["dice"]["after"]["mean"], abs=1e-3)
        assert nums[2] > nums[0] and nums[5] < nums[3]
        assert cells[12] == f"{row['peak_memory_mb']['cpu']:.0f}" and cells[13] == "cpu" and int(cells[14]) >= 1
    summary = md.split("### Mean over pairs", 1)[1].split("###", 1)[0]
    assert re.search(r"\| nodeo \| 1 \| 0\.\d{3} \| 0\.\d{3} \| \*\*0\.\d{3}\*\*", summary)


def test_render_only_keeps_numbers_and_the_edited_header(quick):
    r, out = quick
    assert r.returncode == 0
    md = out.read_text()
    head, body = md.split("<!-- everything below", 1)
    out.write_text("# Edited header\n\nhand-written text\n\n<!-- everything below" + body)
    r2 = run_cli("benchmark", "--render-only", "--out", out, timeout=60)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    again = out.read_text()
    assert again.startswith("# Edited header") and "hand-written text" in again
    assert again.split("<!-- everything below", 1)[1] == body


def test_vxm_rows_skipped_with_a_note_without_weights(tmp_path):
    empty = tmp_path / "no-models"
    empty.mkdir()
    out = tmp_path / "b.md"
    r = run_cli("benchmark", "--quick", "--methods", "vxm-diff", "vxm-diff+refine", "--work",
                tmp_path / "w", "--out", out, timeout=180,
                env={"DEEPDIFFREG_BUNDLED_MODELS": str(empty), "DEEPDIFFREG_MODELS_DIR": str(empty)})
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out.with_suffix(".json").read_text())
    status = {x["method"]: x["status"] for x in data["runs"]}
    assert status == {"vxm-diff": "skipped", "vxm-diff+refine": "skipped"}
    assert any("vxm-diff rows skipped" in n for n in data["notes"])
    assert "vxm-diff rows skipped" in out.read_text()


@pytest.mark.parametrize("args, words", [
    (("--data", "/nonexistent/shared/data", "--pairs", "ixi-1"), "data folder not found"),
    (("--quick", "--methods", "no-such-method"), "unknown benchmark method"),
    (("--quick", "--pairs", "no-such-pair"), "unknown pair"),
])
def test_bad_input_is_one_line(tmp_path, args, words):
    r = run_cli("benchmark", *args, "--work", tmp_path / "w", timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepdiffreg: error:") and words in err[0], r.stderr
    assert "Traceback" not in r.stderr


def test_spearman_matches_definition():
    from deepdiffreg.benchmark import _rankdata, spearman
    assert _rankdata(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    x = np.arange(50.0)
    assert spearman(x, x ** 3) == pytest.approx(1.0)
    assert spearman(x, -np.exp(x / 10)) == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    assert abs(spearman(rng.normal(size=5000), rng.normal(size=5000))) < 0.05


def test_uncertainty_correlation_on_constructed_maps(tmp_path):
    """An uncertainty map that is high exactly where the warped labels are wrong gives ρ_label > 0.5 and u_ratio > 1;
    one that is high elsewhere gives a negative ρ_label."""
    from deepdiffreg.benchmark import uncertainty_vs_error
    shape = (24, 28, 32)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    fixed_lab = ((i - 16) ** 2 / 100 + (j - 14) ** 2 / 64 + (k - 12) ** 2 / 49 < 1).astype(np.int16)
    fixed_lab[(i > 16) & (fixed_lab > 0)] = 2
    warped_lab = fixed_lab.copy()
    wrong = (j > 16) & (fixed_lab > 0)
    warped_lab[wrong] = np.where(fixed_lab[wrong] == 1, 2, 1)
    img = fixed_lab.astype(np.float32) * 50

    def write(a, path):
        im = sitk.GetImageFromArray(a)
        im.SetSpacing((1.5, 1.5, 1.5))
        sitk.WriteImage(im, str(path))
        return str(path)

    pair = {"fixed": write(img, tmp_path / "f.nii.gz"), "fixed_seg": write(fixed_lab, tmp_path / "fs.nii.gz")}
    res = tmp_path / "res"
    res.mkdir()
    write(img, res / "warped.nii.gz")
    write(warped_lab, res / "warped_seg.nii.gz")
    report = {"files": {"uncertainty": "u.nii.gz", "warped": "warped.nii.gz", "warped_seg": "warped_seg.nii.gz"}}
    write(sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(wrong.astype(np.float32)), 2.0))
          + 0.1, res / "u.nii.gz")
    good = uncertainty_vs_error(pair, res, report)
    assert good["rho_label"] > 0.5 and good["u_ratio_disagree_agree"] > 1.0, good
    write(((j < 8) & (fixed_lab > 0)).astype(np.float32) + 0.1, res / "u.nii.gz")
    bad = uncertainty_vs_error(pair, res, report)
    assert bad["rho_label"] < 0, bad


def test_displacement_error_against_a_known_map(tmp_path):
    """known-N pairs: the error of a result equal to the truth is 0; a shifted result is off by the shift."""
    import SimpleITK as sitk

    from deepdiffreg.benchmark import displacement_error
    from deepdiffreg.frames import Geometry, displacement_image
    from deepdiffreg.io.result_writer import write_displacement_transform

    fixed = sitk.Image([12, 10, 8], sitk.sitkFloat32)
    fixed.SetSpacing([1.5, 1.0, 2.0])
    seg = sitk.Image([12, 10, 8], sitk.sitkInt16) + 1
    seg.CopyInformation(fixed)
    sitk.WriteImage(fixed, str(tmp_path / "f.nii.gz"))
    sitk.WriteImage(seg, str(tmp_path / "s.nii.gz"))
    geom = Geometry.of(fixed)
    u = np.random.default_rng(0).normal(0, 1, geom.shape_kji + (3,))
    write_displacement_transform(displacement_image(u, geom), str(tmp_path / "true.h5"))
    write_displacement_transform(displacement_image(u + [0.0, 3.0, 4.0], geom), str(tmp_path / "est.h5"))
    pair = {"fixed": str(tmp_path / "f.nii.gz"), "fixed_seg": str(tmp_path / "s.nii.gz"),
            "true_transform": str(tmp_path / "true.h5")}
    same, _ = displacement_error(pair, tmp_path, {"files": {"transform": "true.h5"}})
    off, err = displacement_error(pair, tmp_path, {"files": {"transform": "est.h5"}})
    assert same["mean_mm"] < 1e-9 and abs(off["mean_mm"] - 5.0) < 1e-6 and err.shape == geom.shape_kji
