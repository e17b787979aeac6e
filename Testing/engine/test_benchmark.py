"""`deepdiffreg benchmark` (package deepdiffreg/benchmark/): the --quick run through the CLI (real register child
processes on a generated phantom), rows from the method registry (a plugin method in a test file becomes rows),
the skip note of learned methods without weights, one-line errors, the peers path (ANTs SyN, when antspyx is
installed), the peers' metrics against the register command's, the stage profile, the peak-memory measurement, and
the uncertainty-vs-error correlation on constructed maps."""
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
    pair_table = md.split("### quick-phantom", 1)[1].split("###", 1)[0]
    for m, row in runs.items():
        line = next(l for l in pair_table.splitlines() if l.startswith(f"| {m} | 0.") or l.startswith(f"| {m} | 1."))
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        # method, Dice before / init / after, TRE before / init / after, % folded, % fg, std log det, wall, engine, MB
        nums = [float(c) for c in cells[1:12]]
        assert nums[2] == pytest.approx(row["dice"]["after"]["mean"], abs=1e-3)
        assert nums[2] > nums[0] and nums[5] < nums[3]
        assert cells[12] == f"{row['peak_memory_mb']['cpu']:.0f}" and cells[13] == "cpu" and int(cells[14]) >= 1
    summary = md.split("### Mean over pairs", 1)[1].split("###", 1)[0]
    assert re.search(r"\| nodeo \| 1 \| 0\.\d{3} \| 0\.\d{3} \| \*\*0\.\d{3}\*\*", summary)
    assert "× ants-syn wall" not in md          # no peer ran: no ratio column
    # the stage profile: every engine stage of report.json, start-up/exit = wall − engine
    profile = md.split("### Stage profile (mean over pairs, s)", 1)[1].split("###", 1)[0]
    for s in data["summary"]:
        st = s["stages_s"]
        assert set(st) >= {"load", "align", "preprocess", "register", "write", "startup_exit"}, st
        assert st["register"] > 0 and st["startup_exit"] > 0
        assert sum(st[k] for k in ("load", "align", "preprocess", "register", "write")) == pytest.approx(
            s["engine_s"], abs=0.05)
        line = next(l for l in profile.splitlines() if l.startswith(f"| {s['method']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[4]) == pytest.approx(st["register"], abs=0.006)
        assert float(cells[-1]) == pytest.approx(s["wall_s"], abs=0.006)
    assert "### Stage profile per pair (s)" in md


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


def test_benchmark_json_is_strict_and_an_undefined_number_renders_as_a_dash(quick, tmp_path):
    """A run's JSON never holds NaN (an uncertainty map that is constant has no rank correlation: null), and
    --render-only turns a NaN of an older JSON into null and "—" rather than "nan"."""
    r, out = quick
    assert r.returncode == 0
    def no_nan(token):
        raise AssertionError(f"non-strict JSON constant {token}")
    data = json.loads(out.with_suffix(".json").read_text(), parse_constant=no_nan)
    row = data["summary"][0]
    row["dice_after"] = float("nan")                      # what an undefined mean looked like before
    copy = tmp_path / "old.md"
    copy.with_suffix(".json").write_text(json.dumps(data, indent=1))   # json.dumps writes a bare NaN
    r2 = run_cli("benchmark", "--render-only", "--out", copy, timeout=60)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    again = json.loads(copy.with_suffix(".json").read_text(), parse_constant=no_nan)
    assert again["summary"][0]["dice_after"] is None
    assert not re.search(r"\bnan\b", copy.read_text(), re.IGNORECASE)


def test_learned_rows_skipped_with_a_note_without_weights(tmp_path):
    """Every learned method of the registry (and its benchmark variants) is skipped, with a note, when no weights
    are installed; the run itself succeeds."""
    from deepdiffreg.benchmark.rows import all_rows
    learned = [r.label for r in all_rows() if r.cls.caps.learned]
    assert "vxm-diff" in learned and "vxm-diff+refine" in learned
    empty = tmp_path / "no-models"
    empty.mkdir()
    out = tmp_path / "b.md"
    r = run_cli("benchmark", "--quick", "--methods", *learned, "--work",
                tmp_path / "w", "--out", out, timeout=180,
                env={"DEEPDIFFREG_BUNDLED_MODELS": str(empty), "DEEPDIFFREG_MODELS_DIR": str(empty)})
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out.with_suffix(".json").read_text())
    status = {x["method"]: x["status"] for x in data["runs"]}
    assert status == {label: "skipped" for label in learned}
    assert any("vxm-diff rows skipped" in n for n in data["notes"])
    assert "vxm-diff rows skipped" in out.read_text()


@pytest.mark.parametrize("args, words", [
    (("--data", "/nonexistent/shared/data", "--pairs", "ixi-1"), "data folder not found"),
    (("--quick", "--methods", "no-such-method"), "unknown benchmark method"),
    (("--quick", "--methods", "nodeo+no-such-variant"), "has no variant"),
    (("--quick", "--peers", "no-such-peer"), "unknown peer"),
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


# --------------------------------------------------------------------------------------------------------------
# rows from the registry

PLUGIN = """
from dataclasses import dataclass

import torch

from deepdiffreg.methods.base import Capabilities, FieldEstimate, Method, option, register_method


@register_method
class ToyShift(Method):
    name = "toy-shift"
    description = "test method: a constant displacement along the first array axis"
    caps = Capabilities(learned=False, inverse="exact", spacing_mm=(("cpu", 3.0),))
    variants = {"big": {"shift": 0.5}, "fast": {"shift": 0.1}}
    benchmark_variants = ("big",)

    @dataclass
    class Options:
        shift: float = option(0.2, min=-5.0, max=5.0, help="voxels")
        lr: float = option(1e-3, min=0.0, help="a learning rate (unused)")

    def estimate(self, pair, device, progress):
        u = torch.zeros((1, 3) + tuple(pair.fixed.shape[2:]))
        u[:, 0] = self.opts.shift
        return FieldEstimate(u, -u, info={"lr": self.opts.lr})
"""


def test_a_plugin_method_becomes_benchmark_rows(tmp_path):
    """A method defined in one file (options including `lr`, a variant it marks for the benchmark) is listed by
    `benchmark --methods` without any edit elsewhere, and its rows run with its own prefixed flags."""
    plugin = tmp_path / "toy_shift_plugin.py"
    plugin.write_text(PLUGIN)
    env = {"DEEPDIFFREG_PLUGINS": str(plugin)}
    out = tmp_path / "b.md"
    r = run_cli("benchmark", "--quick", "--methods", "toy-shift", "toy-shift+big", "--work", tmp_path / "w",
                "--out", out, timeout=180, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out.with_suffix(".json").read_text())
    assert [x["method"] for x in data["runs"]] == ["toy-shift", "toy-shift+big"]
    assert all(x["status"] == "ok" for x in data["runs"]), data["runs"]
    args = data["settings"]["method_args"]
    assert args["toy-shift"] == ["--method", "toy-shift", "--toy-shift-shift", "0.1", "--spacing", "3"]  # its fast
    assert args["toy-shift+big"][:4] == ["--method", "toy-shift", "--toy-shift-shift", "0.5"]
    opts = {x["method"]: x["method_options"] for x in data["runs"]}
    assert opts["toy-shift"]["shift"] == 0.1 and opts["toy-shift+big"]["shift"] == 0.5
    assert "`toy-shift+big` = `--method toy-shift --toy-shift-shift 0.5 --spacing 3`" in out.read_text()
    # the default rows: the plugin and its benchmark variant, with the built-in methods
    code = ("from deepdiffreg.benchmark.rows import all_rows, default_rows; "
            "print([r.label for r in all_rows()]); print([r.label for r in default_rows(True)])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **env})
    assert p.returncode == 0, p.stderr
    every, quick = (eval(line) for line in p.stdout.strip().splitlines())
    assert every[0] == "nodeo" and "toy-shift" in every and every[every.index("toy-shift") + 1] == "toy-shift+big"
    assert every.index("vxm-diff") > every.index("toy-shift")          # learned methods after the others
    assert "toy-shift" in quick and "vxm-diff" not in quick and "toy-shift+big" not in quick


def test_no_method_name_in_the_benchmark_package():
    """The benchmark names no method: rows, quick settings and skip rules come from the registry."""
    from pathlib import Path

    import deepdiffreg.benchmark as bench
    from deepdiffreg.methods.base import all_methods
    names = list(all_methods())
    for f in Path(bench.__file__).parent.glob("*.py"):
        text = f.read_text()
        for n in names:
            assert not re.search(rf"[\"'`]{re.escape(n)}[\"'`+ ]", text), (f.name, n)


def test_declared_benchmark_variants_exist():
    from deepdiffreg.benchmark.rows import benchmark_variants
    from deepdiffreg.methods.base import all_methods
    for cls in all_methods().values():
        for v in benchmark_variants(cls):
            assert v in cls.variants


# --------------------------------------------------------------------------------------------------------------
# measurement and analysis

def test_peak_memory_of_a_child_is_its_own(tmp_path):
    """Linux keeps a process's peak RSS across exec: a child spawned by a large parent would report the parent's
    peak. runner.spawn measures through a small parent, so a trivial child reports its own few MB."""
    from deepdiffreg.benchmark.runner import spawn
    big = np.ones(400 * 2 ** 20 // 8)           # 400 MB touched in this (the benchmark's) process
    m = spawn([sys.executable, "-c", "pass"], tmp_path / "child.log")
    del big
    assert m["exit_code"] == 0 and 0 < m["wall_s"] < 30
    assert 1 < m["peak_rss_mb"] < 100, m
    m = spawn([sys.executable, "-c", "import numpy; a = numpy.ones(200 * 2**20 // 8); raise SystemExit(3)"],
              tmp_path / "child2.log")
    assert m["exit_code"] == 3 and 200 < m["peak_rss_mb"] < 350, m


def test_stage_profile_reads_parts_of_a_stage():
    from deepdiffreg.benchmark.analysis import stage_profile
    flat = {"timings_s": {"load": 0.1, "align": 1.0, "preprocess": 0.2, "register": 3.0, "write": 2.0,
                          "total": 6.3}, "engine_s": 6.3, "wall_s": 8.0}
    p = stage_profile(flat)
    assert p["register"] == 3.0 and p["startup_exit"] == pytest.approx(1.7) and "parts" not in p
    parts = {"jacobian.nii.gz": 0.4, "grid.vtk": 0.6, "transform.h5": 1.0}
    p = stage_profile({**flat, "timings_s": {**flat["timings_s"], "write_parts": parts}})
    assert p["write"] == 2.0 and p["parts"] == {"write": parts}
    nested = {**flat, "timings_s": {**flat["timings_s"], "write": {"total": 2.0, **parts}}}
    p = stage_profile(nested)
    assert p["write"] == 2.0 and p["parts"]["write"] == parts
    # a map made beside the write stage: its wait is the method's (register), not the write stage's
    beside = {"uncertainty": 2.5, "uncertainty (waited for)": 1.5}
    p = stage_profile({**flat, "timings_s": {**flat["timings_s"], "maps_beside_write_parts": beside}})
    assert p["write"] == pytest.approx(0.5) and p["register"] == pytest.approx(4.5)
    assert p["parts"]["maps_beside_write"] == beside and "maps_beside_write" not in p
    assert sum(p[k] for k in ("load", "align", "preprocess", "register", "write")) == pytest.approx(6.3)


def test_validation_result_is_read_method_neutrally():
    """The training evaluator's result (baseline keys prefixed with the baseline's name) → the neutral form the
    table is written from; an earlier run's JSON gives the same table."""
    from deepdiffreg.benchmark.validation import normalise, render
    row = {"pair": "p1", "dice_affine": 0.5, "dice_after": 0.6, "fold_pct_brain": 0.0, "seconds": 0.9,
           "demons_dice": 0.58, "demons_fold_pct_brain": 0.0, "demons_seconds": 4.8,
           "corr_unc_label_mismatch": 0.07, "corr_unc_per_label_1_minus_dice": 0.33}
    res = {"weights": "w v1", "pairs": [row], "summary": {k: v for k, v in row.items() if k != "pair"}}
    v = normalise(res, "vxm-diff")
    assert v["baseline"] == "demons" and v["pairs"][0]["baseline_dice"] == 0.58 and v["pairs"][0]["dice"] == 0.6
    md = "\n".join(render(v))
    assert "(vxm-diff vs demons, same run)" in md
    assert "| p1 | 0.500 | 0.600 | 0.580 | 0.0000 | 0.0000 | 0.9 | 4.8 | 0.070 | 0.330 |" in md


def test_peer_metrics_match_the_register_command(tmp_path):
    """analysis.evaluate_transform (what a peer's transform is scored with) gives the numbers the register command
    computes for the same transform: Dice, TRE; folds of an affine = none, std log det 0."""
    import SimpleITK as sitk

    from deepdiffreg.benchmark.analysis import evaluate_transform
    from deepdiffreg.benchmark.pairs import _quick_pair
    from deepdiffreg.io.images import read_image, read_landmarks, read_segmentation
    from deepdiffreg.pipeline import evaluate_transforms
    pair = _quick_pair(tmp_path)
    t = sitk.AffineTransform(3)
    t.SetMatrix([1.02, 0.01, 0, 0, 0.98, 0, 0, 0, 1.0])
    t.SetTranslation([2.0, -1.0, 0.5])
    ours = evaluate_transform(pair, {"before": sitk.Transform(), "after": t})
    fixed, moving = read_image(pair["fixed"]), read_image(pair["moving"])
    ref = evaluate_transforms({"before": sitk.Transform(), "after": t}, fixed,
                              read_segmentation(pair["fixed_seg"], fixed, "f"),
                              read_segmentation(pair["moving_seg"], moving, "m"),
                              read_landmarks(pair["fixed_landmarks"], "f"), read_landmarks(pair["moving_landmarks"], "m"))
    for k in ("before", "after"):
        assert ours["dice"][k]["mean"] == pytest.approx(ref["dice"][k]["mean"], abs=1e-12)
        assert ours["tre_mm"][k]["mean"] == pytest.approx(ref["tre_mm"][k]["mean"], abs=1e-9)
    assert ours["folds"]["percent_folded"] == 0.0
    assert ours["folds"]["min_det"] == pytest.approx(1.02 * 0.98, abs=1e-4) and ours["folds"]["std_log_det"] < 1e-4


# --------------------------------------------------------------------------------------------------------------
# peers

def _antspyx_or_skip():
    import importlib.util
    if importlib.util.find_spec("ants") is None:
        pytest.skip("antspyx is not installed (optional benchmark extra: pip install -e '.[bench]'); "
                    "the peers path is not tested here")


def test_ants_syn_peer_runs_beside_our_methods(tmp_path):
    """`--peers ants-syn` runs ANTs SyN on the same pair in the same run: its Dice/TRE/folds come from its
    transform through the engine's metrics, its own affine is its init. align, every row's wall time is also a
    ratio to SyN's, and its stages are in the profile."""
    _antspyx_or_skip()
    out = tmp_path / "b.md"
    r = run_cli("benchmark", "--quick", "--methods", "demons", "--peers", "ants-syn", "--work", tmp_path / "w",
                "--out", out, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out.with_suffix(".json").read_text())
    runs = {x["method"]: x for x in data["runs"]}
    assert set(runs) == {"demons", "ants-syn"} and data["settings"]["reference"] == "ants-syn"
    syn = runs["ants-syn"]
    assert syn["status"] == "ok" and syn["kind"] == "peer", syn
    d, t = syn["dice"], syn["tre_mm"]
    assert d["before"]["mean"] == pytest.approx(runs["demons"]["dice"]["before"]["mean"], abs=1e-9)  # same pair
    assert d["after"]["mean"] > d["before"]["mean"] + 0.2 and d["initial_alignment"]["mean"] > d["before"]["mean"]
    assert t["after"]["mean"] < t["before"]["mean"]
    assert 0.0 <= syn["folds"]["percent_folded"] < 1.0 and syn["folds"]["std_log_det"] > 0
    assert syn["wall_ratio_to_reference"] == 1.0 and syn["threads"] >= 1
    assert runs["demons"]["wall_ratio_to_reference"] == pytest.approx(runs["demons"]["wall_s"] / syn["wall_s"],
                                                                       rel=1e-3)
    assert syn["timings_s"]["register"] > 0 and syn["wall_s"] > syn["engine_s"] > 0
    assert 50 < syn["peak_memory_mb"]["cpu"] < 2000
    md = out.read_text()
    assert "× ants-syn wall" in md and "**Peer `ants-syn`:**" in md
    line = next(l for l in md.split("### quick-phantom", 1)[1].splitlines() if l.startswith("| demons |"))
    cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
    assert cells[12] == f"{runs['demons']['wall_ratio_to_reference']:.2f}×"
    assert any(l.startswith("| quick-phantom | ants-syn |") for l in md.splitlines())


def test_ct_pair_names_and_grids(tmp_path):
    """ct-N: the ct-512 phantom over the same field of view on an N×N×round(300·N/512) grid; other names refused."""
    from deepdiffreg.benchmark import pairs as P
    from deepdiffreg.benchmark.ct_pair import build_ct_pair, ct_geometry
    from deepdiffreg.errors import BadInput
    assert ct_geometry("ct-512") == ((512, 512, 300), (0.8, 0.8, 1.5))
    assert ct_geometry("ct-256") == ((256, 256, 150), (1.6, 1.6, 3.0))
    assert ct_geometry("ct-128") == ((128, 128, 75), (3.2, 3.2, 6.0))
    P.check_pair_names(["ct-128", "ct-256", "ct-512", "ct-100"])
    for bad in ("ct-", "ct-abc", "ct-16", "ct-2048", "ct-128-2", "ct128"):
        with pytest.raises(BadInput, match="unknown pair"):
            P.check_pair_names([bad])
    pair = P.build_pairs(["ct-64"], None, tmp_path)["ct-64"]      # generated: no data folder needed
    assert pair["kind"] == "ct" and pair == build_ct_pair(tmp_path, "ct-64")   # built once, then reused
    fixed, seg = sitk.ReadImage(pair["fixed"]), sitk.ReadImage(pair["moving_seg"])
    assert fixed.GetSize() == (64, 64, 38) and seg.GetSize() == (64, 64, 38)
    fov = np.asarray(fixed.GetSize()) * np.asarray(fixed.GetSpacing())
    assert np.allclose(fov, [409.6, 409.6, 450.0])                        # ct-512's field of view
    assert set(np.unique(sitk.GetArrayFromImage(seg))) >= {0, 1, 2, 3, 4, 7}


def test_memory_growth_table_of_the_ct_pairs():
    from deepdiffreg.benchmark.render import _memory_growth_table

    def run(pair, method, fixed, peak, mb):
        return {"pair": pair, "method": method, "kind": "method", "status": "ok", "wall_s": 10.0,
                "voxels": {"fixed": fixed, "working": 1_000_000}, "peak_memory_mb": {"cpu": peak}, "transform_mb": mb}
    result = {"pairs": {"ct-256": {"kind": "ct"}, "ct-128": {"kind": "ct"}, "synth-15-16": {"kind": "synth"}},
              "runs": [run("ct-256", "nodeo", 9_830_400, 1500.0, 30.0), run("ct-128", "nodeo", 1_228_800, 700.0, 29.0),
                       run("synth-15-16", "nodeo", 6_881_280, 900.0, 20.0)]}
    lines = _memory_growth_table(result)
    rows = [l for l in lines if l.startswith("| ct-")]
    assert [r.split(" | ")[0] for r in rows] == ["| ct-128", "| ct-256"]    # smallest first, ct pairs only
    assert "| 9.83 | nodeo | 1.00 | 10.0 | 1500 | 152.6 | 30.0 |" in rows[1]
    assert _memory_growth_table({"pairs": {"synth-15-16": {"kind": "synth"}}, "runs": result["runs"][2:]}) == []
