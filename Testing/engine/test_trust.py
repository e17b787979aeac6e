"""Issue 18 (a method a clinician can trust): the benchmark's same-subject and cross-contrast pairs, the pairs' own
register flags, the do-no-harm ratio, the uncertainty correlation computed by the benchmark's code, and the
contrasts every method declares (`deepdiffreg methods`, text and --json)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from deepdiffreg.benchmark import pairs as P

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"   # ../shared/data of a checkout, when present
needs_data = pytest.mark.skipif(not (DATA / "ixi").is_dir() or not (DATA / "labelmaps").is_dir(),
                                reason="needs ../shared/data (IXI and label maps)")


def _head(shape=(48, 56, 44), spacing=2.0):
    """A head-like T1 phantom (2 mm, PSR-like oblique storage as IXI) and its brain label map."""
    img = sitk.Image(list(shape), sitk.sitkFloat32)
    img.SetSpacing([spacing] * 3)
    img.SetDirection((0, 0, -1, 1, 0, 0, 0, 1, 0))
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape[::-1]], indexing="ij")
    r = np.sqrt(i ** 2 + j ** 2 + k ** 2)
    brain = r < 0.7
    a = np.where(r < 0.9, 40.0, 0.0) + np.where(brain, 60.0 + 30.0 * np.sin(6 * i) * np.cos(5 * j) * np.sin(4 * k), 0)
    t1 = sitk.GetImageFromArray(a.astype(np.float32))
    t1.CopyInformation(img)
    seg = sitk.GetImageFromArray(brain.astype(np.int16))
    seg.CopyInformation(img)
    return t1, seg


def _true_displacement_mm(files, reference):
    from deepdiffreg.benchmark.analysis import displacement_of
    u = sitk.GetArrayFromImage(displacement_of(sitk.ReadTransform(str(files["true_transform"])), reference))
    return np.linalg.norm(u, axis=-1)


def test_same_subject_pair_has_a_small_known_deformation_in_the_right_direction(tmp_path):
    """The true map in the file (read back through ITK) has the stated mean displacement over the brain (1 mm) and
    a peak of a few mm, and it is the fixed → moving map: resampling the moving labels through it gives back the
    fixed labels far better than the moving labels themselves (labels: the images also differ by noise and bias)."""
    t1, seg = _head()
    files = P._pair_files(tmp_path)
    stated = P.same_subject_deformation(t1, seg, files, seed=3)
    fixed = sitk.ReadImage(str(files["fixed"]), sitk.sitkFloat32)
    brain = sitk.GetArrayFromImage(seg) > 0
    mag = _true_displacement_mm(files, fixed)[brain]
    assert mag.mean() == pytest.approx(P.SAME_MEAN_MM, rel=0.02) == pytest.approx(stated["mean"], rel=0.02)
    assert 1.5 * P.SAME_MEAN_MM < mag.max() < 6 * P.SAME_MEAN_MM and mag.max() == pytest.approx(stated["max"], rel=0.05)
    moving_seg = sitk.ReadImage(str(files["moving_seg"]))
    back = sitk.Resample(moving_seg, seg, sitk.ReadTransform(str(files["true_transform"])), sitk.sitkNearestNeighbor, 0)
    mismatch = lambda im: int(((sitk.GetArrayFromImage(im) > 0) != brain).sum())  # noqa: E731
    assert mismatch(back) < 0.3 * mismatch(moving_seg)
    f, m = sitk.GetArrayFromImage(fixed), sitk.GetArrayFromImage(sitk.ReadImage(str(files["moving"])))
    assert 0 < float(np.abs(f - m)[brain].mean()) < 0.2 * float(f[brain].mean())   # noise, bias: not a copy


@needs_data
def test_same_pair_from_real_data_builds_with_its_register_flags(tmp_path):
    pair = P.build_pairs(["same-1"], DATA, tmp_path)["same-1"]
    info = json.loads((tmp_path / "pairs" / "same-1" / "pair.json").read_text())
    from deepdiffreg.train.real_data import split_ixi
    assert info["subject"] == split_ixi(DATA / "ixi")[1][0]          # a held-out validation subject
    u = info["true_displacement_mm"]
    assert 0.8 < u["mean"] < 1.25 and 2.0 < u["max"] < 5.0
    flags = ["--no-align", "--follow-up"]          # aligned already, and one patient's scans (a follow-up)
    assert pair["register_args"] == flags and P.public_view(pair)["register_args"] == flags
    fixed = sitk.ReadImage(pair["fixed"], sitk.sitkFloat32)
    brain = sitk.GetArrayFromImage(sitk.ReadImage(pair["fixed_seg"])) > 0
    assert _true_displacement_mm(pair, fixed)[brain].mean() == pytest.approx(u["mean"], rel=0.02)


def test_contrast_tables_are_independent_and_reversed():
    """The moving image of a contrast pair is T2-like: CSF brighter than grey matter brighter than white matter,
    the T1 table the other way round (FreeSurfer labels: 2 white matter, 3 cortex, 4 ventricle)."""
    labels = [2, 3, 4, 999]
    t1, t2 = P._table("t1", labels), P._table("t2", labels)
    assert t1[2] > t1[3] > t1[4] and t2[4] > t2[3] > t2[2]
    assert t1[999] != t2[999]                                            # unlisted labels: drawn independently


@needs_data
def test_contrast_pair_builds(tmp_path):
    pair = P.build_pairs(["contrast-15-16"], DATA, tmp_path)["contrast-15-16"]
    assert pair["kind"] == "contrast" and "T2-like" in pair["description"]
    m = sitk.GetArrayFromImage(sitk.ReadImage(pair["moving"]))
    ms = sitk.GetArrayFromImage(sitk.ReadImage(pair["moving_seg"]))
    f = sitk.GetArrayFromImage(sitk.ReadImage(pair["fixed"]))
    fs = sitk.GetArrayFromImage(sitk.ReadImage(pair["fixed_seg"]))
    assert m[ms == 4].mean() > m[ms == 2].mean() and f[fs == 4].mean() < f[fs == 2].mean()


def test_a_pairs_register_flags_reach_every_method_command():
    from deepdiffreg.benchmark.runner import _pair_args
    args = _pair_args({"fixed_seg": "fs.nii.gz", "moving_seg": "ms.nii.gz", "register_args": ["--no-align"]})
    assert args == ["--fixed-seg", "fs.nii.gz", "--moving-seg", "ms.nii.gz", "--no-align"]
    assert _pair_args({"fixed_landmarks": "f.csv"}) == ["--fixed-landmarks", "f.csv"]   # no register_args: none
    P.check_pair_names(["same-1", "contrast-15-16", "same-12"])
    with pytest.raises(Exception, match="unknown pair"):
        P.check_pair_names(["same-x"])


def test_do_no_harm_ratio_and_rho_against_the_true_error(tmp_path):
    """ratio_to_identity: 0 for the true map, 1 for doing nothing; the benchmark's ρ_displacement is 1 for an
    uncertainty map that ranks voxels exactly as the true error does, and about 0 for an unrelated one."""
    from deepdiffreg.benchmark import analysis
    from deepdiffreg.io.result_writer import write_displacement_transform
    t1, seg = _head((24, 28, 22))
    files = P._pair_files(tmp_path)
    P.same_subject_deformation(t1, seg, files, seed=5)
    pair = {k: str(v) for k, v in files.items()}
    truth, _ = analysis.displacement_error_of(pair, sitk.ReadTransform(pair["true_transform"]))
    nothing, err = analysis.displacement_error_of(pair, sitk.Transform(3, sitk.sitkIdentity))
    assert truth["ratio_to_identity"] < 1e-6 and nothing["ratio_to_identity"] == pytest.approx(1.0, abs=1e-3)
    assert nothing["true_mean_mm"] == pytest.approx(P.SAME_MEAN_MM, rel=0.02)
    res = tmp_path / "res"
    res.mkdir()
    fixed = sitk.ReadImage(pair["fixed"])
    for name, arr in (("warped", sitk.GetArrayFromImage(fixed)), ("warped_seg", sitk.GetArrayFromImage(seg)),
                      ("good", np.sqrt(err) + 0.1), ("noise", np.random.default_rng(0).random(err.shape))):
        im = sitk.GetImageFromArray(arr.astype(np.int16 if name == "warped_seg" else np.float32))
        im.CopyInformation(fixed)
        sitk.WriteImage(im, str(res / f"{name}.nii.gz"))
    write_displacement_transform(analysis.displacement_of(sitk.Transform(3, sitk.sitkIdentity), fixed),
                                 str(res / "t.h5"))
    rho = {}
    for u in ("good", "noise"):
        report = {"files": {"uncertainty": f"{u}.nii.gz", "warped": "warped.nii.gz", "warped_seg": "warped_seg.nii.gz",
                            "transform": "t.h5"}}
        de, e = analysis.displacement_error(pair, res, report)
        rho[u] = analysis.uncertainty_vs_error(pair, res, report, e)["rho_displacement"]
    assert rho["good"] > 0.99 and abs(rho["noise"]) < 0.1


def test_trust_table_renders_ratio_tre_and_cross_contrast_dice():
    from deepdiffreg.benchmark.render import _trust_table
    run = lambda pair, method, **kw: {"pair": pair, "method": method, "status": "ok", **kw}  # noqa: E731
    result = {"pairs": {"s": {"kind": "same"}, "c": {"kind": "contrast"}, "b": {"kind": "brats"}},
              "summary": [{"method": "m1"}, {"method": "m2"}],
              "runs": [run("s", "m1", displacement_error={"mean_mm": 0.5, "ratio_to_identity": 0.5},
                           uncertainty_vs_error={"rho_displacement": 0.31}),
                       run("s", "m2", displacement_error={"mean_mm": 1.5, "ratio_to_identity": 1.5}),
                       run("c", "m1", dice={"initial_alignment": {"mean": 0.4}, "after": {"mean": 0.6}}),
                       run("b", "m1", tre_mm={"initial_alignment": {"mean": 2.0}, "after": {"mean": 3.0}}),
                       run("b", "m2", tre_mm={"initial_alignment": {"mean": 2.0}, "after": {"mean": 1.5}})]}
    text = "\n".join(_trust_table(result))
    m1 = next(line for line in text.splitlines() if line.startswith("| m1 |"))
    m2 = next(line for line in text.splitlines() if line.startswith("| m2 |"))
    assert "0.50 mm (0.50×)" in m1 and "0.400 → 0.600" in m1 and "2.00 → 3.00 (worse)" in m1 and "0.31" in m1
    assert "1.50 mm (1.50×)" in m2 and "2.00 → 1.50 |" in m2
    assert _trust_table({"pairs": {"x": {"kind": "ixi"}}, "summary": [], "runs": []}) == []


def test_methods_state_their_contrasts_text_and_json(tmp_path):
    """Every method declares which contrasts it handles; `methods --json` carries it per method and per installed
    model (a model entry's own statement wins for a learned method), and the text lists it for every method."""
    from deepdiffreg.methods.base import CONTRASTS, all_methods
    methods = all_methods()
    learned = sorted(n for n, c in methods.items() if c.caps.learned)[0]
    flip = {"same": "different", "different": "same"}[methods[learned].caps.contrasts]
    models = tmp_path / "models"
    models.mkdir()
    (models / "m.pt").write_bytes(b"not read by `methods`")
    (models / "manifest.json").write_text(json.dumps({"models": [
        {"id": "stated", "method": learned, "version": "0", "file": "m.pt", "sha256": "0" * 64, "contrasts": flip}]}))
    env = {**os.environ, "DEEPDIFFREG_MODELS_DIR": str(models),
           "DEEPDIFFREG_BUNDLED_MODELS": str(tmp_path / "none")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "deepdiffreg", "methods", *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=120, env=env)
    r = run("--json")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert set(rows) == set(methods)
    for name, row in rows.items():
        assert row["contrasts"] in CONTRASTS and row["caps"]["contrasts"] == methods[name].caps.contrasts
    assert rows[learned]["contrasts"] == flip and rows[learned]["models"][0]["contrasts_from"] == "model"
    assert {row["contrasts"] for n, row in rows.items() if n != learned} >= {"same", "different"}
    text = run().stdout
    assert text.count("contrasts:") >= len(methods)
    for name, c in methods.items():
        if c.caps.uncertainty:
            assert ("not validated as QA" in text) == (not c.caps.uncertainty_qa)
    # what --follow-up does, per method that has the refinement options: its declared default steps
    for name, row in rows.items():
        fu = next((o for o in row["options"] if o["name"] == "follow_up_refine"), None)
        if fu is not None:
            line = (f"follow-up scans (--follow-up): {fu['default']} refinement steps ({fu['flag']})" if fu["default"]
                    else f"follow-up scans (--follow-up): nothing by default ({fu['flag']} N to refine)")
            assert line in text, (name, line)
    assert rows["vxm-diff"]["options"] and any(o["name"] == "follow_up_refine" and o["default"] == 20
                                               for o in rows["vxm-diff"]["options"])


def test_follow_up_flag_reaches_the_method_and_the_report(tmp_path):
    """``register --follow-up`` (one patient's scans): report.json's inputs say so, vxm-diff refines with its
    follow-up steps and says why; without the flag it does not."""
    from synth import run_cli
    t1, seg = _head()
    sitk.WriteImage(t1, str(tmp_path / "f.nii.gz"))
    moved = sitk.Resample(t1, t1, sitk.TranslationTransform(3, (1.5, -1.0, 0.5)), sitk.sitkLinear, 0.0)
    sitk.WriteImage(moved, str(tmp_path / "m.nii.gz"))
    common = ["--fixed", str(tmp_path / "f.nii.gz"), "--moving", str(tmp_path / "m.nii.gz"), "--method", "vxm-diff",
              "--no-align", "--vxm-follow-up-refine", "2", "--threads", "1"]
    for flag, out in ((["--follow-up"], "fu"), ([], "plain")):
        res = run_cli("register", *common, "--out", str(tmp_path / out), *flag)
        assert res.returncode == 0, res.stderr
    fu, plain = (json.loads((tmp_path / o / "report.json").read_text()) for o in ("fu", "plain"))
    assert fu["inputs"]["follow_up"] is True and plain["inputs"]["follow_up"] is False
    assert fu["method_info"]["refine_steps"] == 2 and "--follow-up" in fu["method_info"]["refine_reason"]
    assert "refine_steps" not in plain["method_info"]
    assert fu["method_options"]["follow_up_refine"] == 2
