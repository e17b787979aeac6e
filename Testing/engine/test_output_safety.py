"""Output safety (issue 15): --overwrite never deletes inputs or unrelated files, a lock on <out>, stale partial
folders swept, strict JSON, `apply`/`evaluate` refuse bad results and never overwrite silently, `models
import/delete` never touch anything outside the cache, and a person in a terminal gets a progress bar."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from deepdiffreg.errors import BadInput
from deepdiffreg.io.result_writer import AtomicResultDir
from deepdiffreg.progress import ExitCode
from synth import run_cli

from test_bad_input_table import DEMONS, _snapshot, assert_clean_failure

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def strict_loads(text):
    def bad(c):
        raise ValueError(f"non-strict JSON constant {c}")
    return json.loads(text, parse_constant=bad)


def _register(pair, out, *extra, env=None):
    return run_cli("register", "--fixed", pair["fixed"], "--moving", pair["moving"], "--out", out, *DEMONS, *extra,
                   env=env)


@pytest.fixture(scope="module")
def result(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("res") / "result"
    res = _register(pair, str(out), "--fixed-seg", pair["fixed_seg"], "--moving-seg", pair["moving_seg"])
    assert res.returncode == 0, res.stderr
    return out


# -- register: --overwrite, lock, leftovers ---------------------------------------------------------------------
def test_overwrite_never_deletes_a_folder_holding_the_inputs(pair, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for k in ("fixed", "moving"):
        shutil.copy(pair[k], data / os.path.basename(pair[k]))
    (data / "notes.txt").write_text("mine")
    before = _snapshot(str(tmp_path))
    res = run_cli("register", "--fixed", data / "fixed.nii.gz", "--moving", data / "moving.nii.gz", "--out", data,
                  "--overwrite", *DEMONS)
    assert res.returncode == ExitCode.BAD_INPUT and "holds the input" in res.stderr
    assert _snapshot(str(tmp_path)) == before


def test_overwrite_only_replaces_a_previous_result(pair, tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_text("not a result")
    res = _register(pair, other, "--overwrite")
    assert res.returncode == ExitCode.BAD_INPUT and "not a previous DeepDiffReg result" in res.stderr
    assert (other / "holiday.jpg").read_text() == "not a result"
    out = tmp_path / "result"
    assert _register(pair, out).returncode == 0
    first = json.loads((out / "report.json").read_text())["timings_s"]["total"]
    assert _register(pair, out, "--overwrite").returncode == 0                        # a result is replaced
    assert (out / "report.json").exists() and not [n for n in os.listdir(tmp_path) if ".old-" in n or ".partial-" in n]
    (out / "my_notes.txt").write_text("added by the user")                             # ... unless it holds more
    res = _register(pair, out, "--overwrite")
    assert res.returncode == ExitCode.BAD_INPUT and "my_notes.txt" in res.stderr
    assert (out / "my_notes.txt").exists() and first is not None


def test_a_second_run_on_the_same_out_fails_clearly(pair, tmp_path):
    out = str(tmp_path / "busy")
    holder = AtomicResultDir(out)       # this process plays the first run: it holds the lock on <out>
    holder.check()
    try:
        t0 = time.time()
        res = _register(pair, out)
        err = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == ExitCode.BAD_INPUT and len(err) == 1 and "another deepdiffreg run" in err[0], err
        assert f"pid {os.getpid()}" in err[0] and time.time() - t0 < 30
        assert sorted(os.listdir(tmp_path)) == [".busy.deepdiffreg-lock"]            # only the holder's lock
    finally:
        holder.release()
    assert not os.listdir(tmp_path)                                                    # the lock file is gone too
    assert _register(pair, out).returncode == 0


def test_leftovers_of_a_killed_run_are_swept(pair, tmp_path):
    out = tmp_path / "result"
    for name in ("result.partial-x1y2z3", "result.old-a1b2c3"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "transform.h5").write_bytes(b"half")
    (tmp_path / "result-other.partial-keep").mkdir()                                   # another out's: untouched
    assert _register(pair, out).returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["result", "result-other.partial-keep"]


def test_sigkill_during_the_run_leaves_nothing_a_later_run_keeps(pair, tmp_path):
    out = tmp_path / "result"
    exe = os.path.join(os.path.dirname(sys.executable), "deepdiffreg")
    proc = subprocess.Popen([exe, "register", "--fixed", pair["fixed"], "--moving", pair["moving"], "--out", str(out),
                             *DEMONS], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if '"stage": "register"' in line:
            break
    proc.kill()
    proc.wait()
    assert _register(pair, out).returncode == 0
    assert os.listdir(tmp_path) == ["result"]


def test_disk_full_while_writing_is_said_plainly_and_leaves_nothing(tmp_path):
    out = str(tmp_path / "result")
    with pytest.raises(BadInput, match="no space left"):
        with AtomicResultDir(out) as tmp:
            open(os.path.join(tmp, "transform.h5"), "wb").write(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(ROOT, reason="root may write into read-only folders")
def test_read_only_out_is_refused_before_any_work(pair, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        t0 = time.time()
        res = _register(pair, ro / "result")
        assert res.returncode == ExitCode.BAD_INPUT and "not writable" in res.stderr and time.time() - t0 < 30
    finally:
        ro.chmod(0o755)


def test_result_event_and_report_are_strict_json(pair, tmp_path):
    """Dice over no common label is undefined: null in the JSON result event and in report.json, never NaN."""
    seg_f = sitk.ReadImage(pair["fixed_seg"])
    only2 = sitk.GetArrayFromImage(seg_f)
    only2 = np.where(only2 > 0, 7, 0).astype(np.int16)                   # label 7 is in neither moving label set
    img = sitk.GetImageFromArray(only2)
    img.CopyInformation(seg_f)
    path = str(tmp_path / "seg7.nii.gz")
    sitk.WriteImage(img, path)
    out = tmp_path / "result"
    res = _register(pair, out, "--fixed-seg", path, "--moving-seg", pair["moving_seg"])
    assert res.returncode == 0, res.stderr
    events = [strict_loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
    summary = [e for e in events if e["event"] == "result"][0]["summary"]
    assert "dice_after" in summary and summary["dice_after"] is None
    report = strict_loads((out / "report.json").read_text())
    assert report["dice"]["after"]["mean"] is None


def test_a_second_sigterm_still_cancels_with_exit_4(pair, tmp_path):
    out = tmp_path / "result"
    exe = os.path.join(os.path.dirname(sys.executable), "deepdiffreg")
    proc = subprocess.Popen([exe, "register", "--fixed", pair["fixed"], "--moving", pair["moving"], "--method", "nodeo",
                             "--iterations", "100000", "--no-align", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if '"stage": "register"' in line and "iteration" in line:
            break
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.CANCELLED, (proc.returncode, err)
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if ".partial-" in n]


# -- the terminal is for people ---------------------------------------------------------------------------------
def test_terminal_gets_a_progress_bar_and_no_json(pair, tmp_path):
    import pty
    master, slave = pty.openpty()
    os.system(f"stty cols 120 rows 40 < {os.ttyname(slave)}")
    exe = os.path.join(os.path.dirname(sys.executable), "deepdiffreg")
    env = {k: v for k, v in os.environ.items() if k != "DEEPDIFFREG_JSON"}
    proc = subprocess.Popen([exe, "register", "--fixed", pair["fixed"], "--moving", pair["moving"],
                             "--out", str(tmp_path / "result"), *DEMONS], stdout=slave, stderr=subprocess.PIPE,
                            env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    text = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0
    assert '{"event"' not in text
    assert "%|" in text and "register" in text                     # tqdm bar with the stage name
    assert "Result:" in text and "folded voxels" in text            # the plain summary


def test_slicer_child_asks_for_json_explicitly():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "DeepDiffReg"))
    from DeepDiffRegLib import process as ddprocess
    assert ddprocess.child_environment("/mod", {})["DEEPDIFFREG_JSON"] == "1"


# -- apply / evaluate -------------------------------------------------------------------------------------------
def test_apply_refuses_to_overwrite_and_writes_atomically(result, pair, tmp_path):
    target = tmp_path / "on_fixed.nii.gz"
    target.write_bytes(b"precious")
    res = run_cli("apply", "--result", result, "--image", pair["moving"], "--out", target)
    assert res.returncode == ExitCode.BAD_INPUT and "--overwrite" in res.stderr
    assert target.read_bytes() == b"precious"
    res = run_cli("apply", "--result", result, "--image", pair["moving"], "--out", target, "--overwrite")
    assert res.returncode == 0, res.stderr
    assert sitk.ReadImage(str(target)).GetSize() == sitk.ReadImage(pair["fixed"]).GetSize()
    ev = [strict_loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert ev and ev[-1]["event"] == "result" and ev[-1]["out_dir"] == str(target)
    assert sorted(os.listdir(tmp_path)) == ["on_fixed.nii.gz"]                  # no partial file left


@pytest.mark.parametrize("fault", ["out_is_folder", "corrupt_report", "corrupt_transform", "out_is_input",
                                   "float_labels"])
def test_apply_bad_input(fault, result, pair, tmp_path):
    res_dir = tmp_path / "res"
    shutil.copytree(result, res_dir)
    out = tmp_path / "out.nii.gz"
    args = ["apply", "--result", res_dir, "--image", pair["moving_seg"], "--labels", "--out", out]
    needle = {"out_is_folder": "is a folder", "corrupt_report": "not readable JSON",
              "corrupt_transform": "cannot read the result's transform", "out_is_input": "is an input",
              "float_labels": "non-integer"}[fault]
    if fault == "out_is_folder":
        out.mkdir()
        args[-1] = out
    elif fault == "corrupt_report":
        (res_dir / "report.json").write_text('{"files": {"transform": "transform.h5"')
    elif fault == "corrupt_transform":
        (res_dir / "transform.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    elif fault == "out_is_input":
        out = tmp_path / "seg.nii.gz"
        shutil.copy(pair["moving_seg"], out)
        args[4] = out
        args[-1] = out
        args.append("--overwrite")
    elif fault == "float_labels":
        seg = sitk.ReadImage(pair["moving_seg"])
        f = sitk.Cast(seg, sitk.sitkFloat32) * 0.3
        sitk.WriteImage(f, str(tmp_path / "f.nii.gz"))
        args[4] = tmp_path / "f.nii.gz"
    before = _snapshot(str(tmp_path))
    res = run_cli(*args)
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == ExitCode.BAD_INPUT and len(err) == 1 and needle in err[0], res.stderr
    assert _snapshot(str(tmp_path)) == before


def test_evaluate_refuses_a_2d_transform_and_an_unwritable_json(pair, tmp_path):
    t2 = str(tmp_path / "t2.tfm")
    sitk.WriteTransform(sitk.TranslationTransform(2, (1.0, 2.0)), t2)
    res = run_cli("evaluate", "--transform", t2, "--fixed", pair["fixed"], "--moving", pair["moving"])
    assert res.returncode == ExitCode.BAD_INPUT and "2D transform" in res.stderr and len(res.stderr.splitlines()) == 1
    t3 = str(tmp_path / "t3.tfm")
    sitk.WriteTransform(sitk.TranslationTransform(3, (1.0, 2.0, 0.5)), t3)
    res = run_cli("evaluate", "--transform", t3, "--fixed", pair["fixed"], "--moving", pair["moving"],
                  "--json", tmp_path)
    assert res.returncode == ExitCode.BAD_INPUT and "is a folder" in res.stderr
    res = run_cli("evaluate", "--transform", t3, "--fixed", pair["fixed"], "--moving", pair["moving"],
                  "--json", tmp_path / "ev.json")
    assert res.returncode == 0, res.stderr
    line = strict_loads(res.stdout.strip())                                # one protocol line: the result
    assert line["event"] == "result" and line["folds"]["percent_folded"] == 0
    assert strict_loads((tmp_path / "ev.json").read_text())["folds"]["percent_folded"] == 0


# -- models import / delete -------------------------------------------------------------------------------------
@pytest.fixture
def cache(tmp_path):
    from deepdiffreg.io.weights import save_weights
    cfg = {"method": "vxm-diff"}             # the content does not matter here, only that it is a weights file
    net = torch.nn.Linear(2, 2)
    env = {"DEEPDIFFREG_MODELS_DIR": str(tmp_path / "cache"), "DEEPDIFFREG_BUNDLED_MODELS": str(tmp_path / "none")}

    def weights(name, **meta):
        path = tmp_path / "files" / name
        save_weights(path, cfg, net.state_dict(), {"method": "vxm-diff", **meta})
        return path
    return tmp_path, env, weights


@pytest.mark.parametrize("how", ["dotdot_id", "absolute_id", "meta_id"])
def test_models_import_never_writes_outside_the_cache(cache, how):
    tmp_path, env, weights = cache
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    f = weights("w.pt", id="../../victim/x") if how == "meta_id" else weights("w.pt")
    extra = {"dotdot_id": ["--id", "../../victim/x"], "absolute_id": ["--id", str(victim_dir / "x")],
             "meta_id": []}[how]
    before = _snapshot(str(tmp_path))
    res = run_cli("models", "import", f, *extra, env=env)
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == ExitCode.BAD_INPUT and len(err) == 1 and "plain name" in err[0], res.stderr
    assert _snapshot(str(tmp_path)) == before and not os.listdir(victim_dir)


def test_models_delete_never_deletes_outside_the_cache(cache):
    tmp_path, env, weights = cache
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps(
        {"models": [{"id": "evil", "method": "vxm-diff", "file": "../victim.txt", "sha256": "0"}]}))
    res = run_cli("models", "delete", "evil", env=env)
    assert res.returncode == ExitCode.BAD_INPUT and "not inside" in res.stderr, res.stderr
    assert victim.read_text() == "keep me"


def test_models_import_same_file_twice_and_concurrent_imports(cache):
    tmp_path, env, weights = cache
    f = weights("a.pt")
    res = run_cli("models", "import", f, "--id", "a", env=env)
    assert res.returncode == 0
    ev = [strict_loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert ev[-1]["event"] == "result" and ev[-1]["model"]["id"] == "a"               # a JSON result line
    cached = tmp_path / "cache" / "a.pt"
    res = run_cli("models", "import", cached, "--id", "a", env=env)           # the file already in the cache
    assert res.returncode == 0, res.stderr
    g = weights("other.pt", version="2")
    res = run_cli("models", "import", g, "--id", "a", env=env)                # same id, another file: refused
    assert res.returncode == ExitCode.BAD_INPUT and "exists already" in res.stderr
    exe = os.path.join(os.path.dirname(sys.executable), "deepdiffreg")
    files = [weights(f"c{i}.pt", version=str(i)) for i in range(4)]
    procs = [subprocess.Popen([exe, "models", "import", str(p), "--id", f"c{i}"], env={**os.environ, **env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i, p in enumerate(files)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    ids = {e["id"] for e in json.loads((tmp_path / "cache" / "manifest.json").read_text())["models"]}
    assert ids == {"a", "c0", "c1", "c2", "c3"}


def test_tampered_weights_are_refused_before_any_work(pair, tmp_path):
    bundled = os.path.join(os.path.dirname(__file__), "..", "..", "models")
    mine = tmp_path / "models"
    shutil.copytree(bundled, mine)
    # the file of the model the run uses (the folder holds several methods' models)
    entries = json.loads((mine / "manifest.json").read_text())["models"]
    pt = mine / [e for e in entries if e["method"] == "vxm-diff"][-1]["file"]
    data = bytearray(pt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pt.write_bytes(bytes(data))
    out = str(tmp_path / "result")
    res = run_cli("register", "--fixed", pair["fixed"], "--moving", pair["moving"], "--out", out, "--method", "vxm-diff",
                  env={"DEEPDIFFREG_BUNDLED_MODELS": str(mine), "DEEPDIFFREG_MODELS_DIR": str(tmp_path / "user")})
    assert_clean_failure(res, ExitCode.MISSING_WEIGHTS, "sha256", out)
    assert '"stage": "load"' not in res.stdout                        # refused at the gate, before reading images


def test_a_signal_between_the_two_renames_cannot_leave_no_result(tmp_path, monkeypatch):
    """--overwrite moves the old result aside, then the new one in: SIGTERM between the two is held back."""
    import deepdiffreg.io.result_writer as rw
    out = str(tmp_path / "result")
    os.mkdir(out)
    open(os.path.join(out, "report.json"), "w").write('{"method": "demons", "files": {}}')
    seen = []
    old_handler = signal.signal(signal.SIGTERM, lambda *a: seen.append(os.path.isfile(os.path.join(out, "new.txt"))))
    real_replace = os.replace
    calls = []

    def replace(a, b):
        real_replace(a, b)
        calls.append(b)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)      # arrives after the old result moved aside
    monkeypatch.setattr(rw.os, "replace", replace)
    try:
        with AtomicResultDir(out, overwrite=True) as tmp:
            open(os.path.join(tmp, "new.txt"), "w").write("new")
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    assert seen == [True]                              # the handler ran only once <out> was complete again
    assert sorted(os.listdir(tmp_path)) == ["result"]


def _tmpfs(mnt, options):
    mnt.mkdir()
    if not ROOT or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)],
                                  capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")


@pytest.fixture
def full_disk(tmp_path):
    """A 256 kB tmpfs."""
    mnt = tmp_path / "small_disk"
    _tmpfs(mnt, "size=256k")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_read_only_file_system_is_refused_before_any_work(pair, tmp_path):
    """Also as root (where folder permissions do not hold): a read-only mount."""
    mnt = tmp_path / "ro_disk"
    _tmpfs(mnt, "size=64k,ro")
    try:
        out = str(mnt / "result")
        res = _register(pair, out)
        assert_clean_failure(res, ExitCode.BAD_INPUT, "not writable", out)
        assert '"stage": "load"' not in res.stdout
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_disk_full_through_the_cli(pair, result, full_disk):
    out = str(full_disk / "sub" / "result")
    res = _register(pair, out)
    assert_clean_failure(res, ExitCode.BAD_INPUT, "no space left", out)
    assert os.listdir(full_disk) == []                                   # not even the parent it created
    (full_disk / "filler").write_bytes(b"\0" * (230 * 1024))            # apply: room for part of the image only
    target = full_disk / "on_fixed.nii.gz"
    res = run_cli("apply", "--result", result, "--image", pair["moving"], "--out", target)
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == ExitCode.BAD_INPUT and len(err) == 1 and "no space left" in err[0], res.stderr
    assert os.listdir(full_disk) == ["filler"]
