"""deepdiffreg batch: pairs on Dask workers, each its own register child; resume, retries, failures, cancel.

Real Dask (a scheduler and workers as separate processes, or an in-process cluster), real register children on
tiny generated pairs (28×28×24 at 2 mm, demons / NODEO at a 4 mm working grid), so the whole file stays small.
"""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

import distributed  # noqa: E402,F401  (in the test extra: missing Dask fails these tests, it does not skip them)
import psutil  # noqa: E402

from synth import blank, from_array, phantom, points_lps, run_cli, smooth_field_lps  # noqa: E402

from deepdiffreg.batch.console import Console  # noqa: E402
from deepdiffreg.batch.pairs import atlas_pairs, read_pairs_csv  # noqa: E402
from deepdiffreg.batch.request import (expected_method_options, pair_request, parse_register_args,  # noqa: E402
                                       request_sha256, strict_json)
from deepdiffreg.errors import BadInput  # noqa: E402
from deepdiffreg.progress import ExitCode  # noqa: E402

FAST = ["--method", "demons", "--demons-iterations", "20", "10", "--spacing", "4"]
ENV = {"PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(
    sys.modules["deepdiffreg"].__file__))), os.environ.get("PYTHONPATH", "")])}


def _engine_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "deepdiffreg", *[str(a) for a in args]]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Six small pairs (each its own deformation and noise) with label maps, and a pairs CSV (relative paths)."""
    d = tmp_path_factory.mktemp("cohort")
    grid = blank(size=(28, 28, 24), spacing=(2.0, 2.0, 2.0), origin=(-28.0, -28.0, -24.0), direction=np.eye(3))
    p = points_lps(grid)
    img_f, lab_f = phantom(p, seed=0)
    sitk.WriteImage(from_array(img_f, grid), str(d / "atlas.nii.gz"))
    sitk.WriteImage(from_array(lab_f.astype(np.int16), grid), str(d / "atlas_seg.nii.gz"))
    rows = []
    for i in range(6):
        img_m, lab_m = phantom(p - smooth_field_lps(p, 1.0 + 0.4 * i), seed=i + 1)
        sitk.WriteImage(from_array(img_m, grid), str(d / f"sub{i}.nii.gz"))
        sitk.WriteImage(from_array(lab_m.astype(np.int16), grid), str(d / f"sub{i}_seg.nii.gz"))
        rows.append({"id": f"s{i}", "fixed": "atlas.nii.gz", "moving": f"sub{i}.nii.gz",
                     "fixed_seg": "atlas_seg.nii.gz", "moving_seg": f"sub{i}_seg.nii.gz"})
    _write_csv(d / "pairs.csv", rows)
    return d


def _write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _no_nan(s):
    raise ValueError(f"non-strict JSON constant {s}")


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line, parse_constant=_no_nan) for line in text.splitlines() if line.startswith("{")]


def _displacement(path) -> np.ndarray:
    """The displacement field of a result's transform (a composite [affine, field] since the affine is kept)."""
    t = sitk.ReadTransform(str(path))
    if t.GetName() == "CompositeTransform":
        t = sitk.CompositeTransform(t)
        t = next(t.GetNthTransform(i) for i in range(t.GetNumberOfTransforms())
                 if t.GetNthTransform(i).GetName() == "DisplacementFieldTransform")
    return sitk.GetArrayFromImage(sitk.DisplacementFieldTransform(t).GetDisplacementField())


def _engine_processes(marker: str) -> list:
    """Live processes whose command line mentions ``marker`` (an OUT folder)."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and any(marker in a for a in (p.info["cmdline"] or [])):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


# -- inputs and request, no cluster -----------------------------------------------------------------------------

def test_pairs_csv_atlas_and_ids(cohort, tmp_path):
    pairs = read_pairs_csv(str(cohort / "pairs.csv"))
    assert [p.id for p in pairs] == [f"s{i}" for i in range(6)]
    assert pairs[2].inputs["moving"] == str(cohort / "sub2.nii.gz")  # relative to the CSV's folder
    assert pairs[2].register_argv()[:4] == ["--fixed", str(cohort / "atlas.nii.gz"), "--moving",
                                            str(cohort / "sub2.nii.gz")]
    # atlas + glob: the atlas itself is not registered to itself; ids from the file names
    ap = atlas_pairs(str(cohort / "atlas.nii.gz"), [str(cohort / "sub?.nii.gz"), str(cohort / "atlas.nii.gz")])
    assert [p.id for p in ap] == [f"sub{i}" for i in range(6)]
    # a recursive glob does not pick up earlier results in OUT
    (tmp_path / "OUT" / "sub0").mkdir(parents=True)
    sitk.WriteImage(sitk.ReadImage(str(cohort / "sub0.nii.gz")), str(tmp_path / "OUT" / "sub0" / "warped.nii.gz"))
    ap = atlas_pairs(str(cohort / "atlas.nii.gz"), [str(tmp_path / "**" / "*.nii.gz"), str(cohort / "sub1.nii.gz")],
                     exclude_under=str(tmp_path / "OUT"))
    assert [p.id for p in ap] == ["sub1"]
    assert all(p.inputs["fixed"] == str(cohort / "atlas.nii.gz") for p in ap)
    assert str(cohort / "atlas.nii.gz") not in [p.inputs["moving"] for p in ap]
    # without ids: repeated moving names get the fixed name too; real duplicates and unsafe ids are refused
    _write_csv(tmp_path / "a.csv", [{"fixed": str(cohort / "atlas.nii.gz"), "moving": str(cohort / "sub0.nii.gz")},
                                    {"fixed": str(cohort / "sub1.nii.gz"), "moving": str(cohort / "sub0.nii.gz")}])
    assert [p.id for p in read_pairs_csv(str(tmp_path / "a.csv"))] == ["atlas_to_sub0", "sub1_to_sub0"]
    for bad in ("../x", "summary.csv", ".hidden"):
        _write_csv(tmp_path / "b.csv", [{"id": bad, "fixed": "f.nii", "moving": "m.nii"}])
        with pytest.raises(BadInput, match="cannot be a folder name"):
            read_pairs_csv(str(tmp_path / "b.csv"))
    _write_csv(tmp_path / "c.csv", [{"id": "x", "fixed": "f", "moving": "m"}, {"id": "x", "fixed": "f", "moving": "n"}])
    with pytest.raises(BadInput, match="same id"):
        read_pairs_csv(str(tmp_path / "c.csv"))
    _write_csv(tmp_path / "d.csv", [{"fixed": "f", "mooving": "m"}])
    with pytest.raises(BadInput, match="moving"):
        read_pairs_csv(str(tmp_path / "d.csv"))


def test_register_args_are_checked_once_and_normalised(cohort):
    pair = read_pairs_csv(str(cohort / "pairs.csv"))[0]
    a = parse_register_args(["--spacing", "4", "--no-align"])
    b = parse_register_args(["--no-align", "--spacing", "4.0"])  # order and spelling of a value do not matter
    c = parse_register_args(["--spacing", "3"])
    assert request_sha256(pair_request(pair, a)) == request_sha256(pair_request(pair, b))
    assert request_sha256(pair_request(pair, a)) != request_sha256(pair_request(pair, c))
    assert a.method == parse_register_args([]).method  # the engine's default method, not one the batch names
    assert expected_method_options(parse_register_args(FAST)) == {"iterations": [20, 10], "sigma": 1.5}
    for argv, msg in ((["--out", "x"], "--out"), (["--fixed-seg", "s.nii"], "pairs CSV"),
                      (["--no-such-flag"], "unrecognized"), (["--overwrite"], "overwrite")):
        with pytest.raises(BadInput, match=msg):
            parse_register_args(argv)
    # through the CLI: one line on stderr, exit 2, nothing started
    r = run_cli("batch", "--pairs", cohort / "pairs.csv", "--out", cohort / "never", "--", "--moving", "x",
                env=ENV, timeout=60)
    assert r.returncode == ExitCode.BAD_INPUT and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "must not give --fixed, --moving or --out" in r.stderr and not (cohort / "never").exists()


def test_up_to_date_needs_same_request_inputs_options_version_and_weights(cohort, tmp_path):
    from deepdiffreg import __version__
    from deepdiffreg.batch.request import ledger_path, up_to_date, write_json_atomic
    import shutil
    for name in ("atlas.nii.gz", "sub0.nii.gz"):
        shutil.copy(cohort / name, tmp_path / name)
    pair = atlas_pairs(str(tmp_path / "atlas.nii.gz"), [str(tmp_path / "sub0.nii.gz")])[0]
    req = parse_register_args(FAST)
    out = tmp_path / "OUT"
    (out / pair.id).mkdir(parents=True)
    options = expected_method_options(req)

    def state(version=__version__, report_options=options, model=None, run_models=None, now_models=None):
        write_json_atomic(str(out / pair.id / "report.json"), {
            "deepdiffreg_version": version, "method": req.method, "method_options": report_options, "model": model,
            "files": {"report": "report.json"}})
        request = pair_request(pair, req)
        write_json_atomic(ledger_path(str(out), pair.id), {"status": "ok", "request_sha256": request_sha256(request),
                                                           "models": run_models or {}})
        return up_to_date(str(out), pair, pair_request(pair, req), options, now_models or {})

    assert state() == (True, "")
    assert state(version="0.0.9")[1].startswith("engine version")
    assert state(report_options={**options, "sigma": 2.0}) == (False, "method options changed")
    m = {"id": "m1", "sha256": "a" * 64}
    assert state(model=m, run_models={"m1": "a" * 64}, now_models={"m1": "a" * 64}) == (True, "")
    assert "weights of model m1" in state(model=m, run_models={"m1": "a" * 64}, now_models={"m1": "b" * 64})[1]
    assert state(run_models={}, now_models={"m2": "c" * 64}) == (False, "installed models for the method changed")
    state()
    os.utime(tmp_path / "sub0.nii.gz", ns=(1, 1))  # an input file changed since the run
    assert up_to_date(str(out), pair, pair_request(pair, req), options, {}) == (False, "request or input files changed")
    os.remove(out / pair.id / "report.json")
    assert not up_to_date(str(out), pair, pair_request(pair, req), options, {})[0]
    # one batch at a time per OUT; leftovers of killed children are removed, complete folders are not
    from deepdiffreg.batch.runner import _Lock, remove_leftovers
    with _Lock(str(out)):
        with pytest.raises(BadInput, match="another batch is running"):
            with _Lock(str(out)):
                pass
    for name in (f"{pair.id}.partial-abc", f"{pair.id}.old-def", "other.partial-x"):
        (out / name).mkdir()
    assert sorted(remove_leftovers(str(out), [pair.id])) == [f"{pair.id}.old-def", f"{pair.id}.partial-abc"]
    assert (out / pair.id).is_dir() and (out / "other.partial-x").is_dir()


def test_strict_json():
    assert strict_json({"a": float("nan"), "b": [1.0, float("inf")], "c": (1, 2)}) == {"a": None, "b": [1.0, None],
                                                                                          "c": [1, 2]}


# -- a real scheduler and two workers as processes; one worker killed mid-run ------------------------------------

def _start_tcp_cluster(tmp_path, n_workers):
    sched_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen(_engine_dask("scheduler", "--scheduler-file", sched_file, "--host", "127.0.0.1",
                                           "--port", "0", "--no-dashboard"),
                              env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    deadline = time.time() + 60
    while not sched_file.exists() and time.time() < deadline:
        time.sleep(0.1)
    address = json.loads(sched_file.read_text())["address"]
    workers = [_start_worker(sched_file) for _ in range(n_workers)]
    _wait_workers(address, n_workers)
    return address, sched_file, procs[0], workers


def _engine_dask(*args):
    return [sys.executable, "-m", "distributed.cli.dask_" + args[0], *[str(a) for a in args[1:]]]


def _start_worker(sched_file):
    return subprocess.Popen(_engine_dask("worker", "--scheduler-file", sched_file, "--nthreads", "1", "--no-nanny",
                                         "--no-dashboard", "--host", "127.0.0.1", "--memory-limit", "0"),
                            env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_workers(address, n):
    from distributed import Client
    with Client(address, timeout=30) as c:
        c.wait_for_workers(n, timeout=60)


def test_tcp_cluster_survives_a_killed_worker_then_resumes_and_reruns(cohort, tmp_path):
    out = tmp_path / "OUT"
    address, sched_file, scheduler, workers = _start_tcp_cluster(tmp_path, 2)
    procs = [scheduler, *workers]
    try:
        batch = subprocess.Popen(_engine_cmd("batch", "--pairs", cohort / "pairs.csv", "--out", out, "--scheduler",
                                             address, "--json", "--threads-per-pair", "1", "--", *FAST),
                                 env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        victim = workers[0]
        killed_child = None
        deadline = time.time() + 60
        while killed_child is None and time.time() < deadline and batch.poll() is None:
            kids = [k for k in psutil.Process(victim.pid).children(recursive=True)
                    if any("register" == a for a in k.cmdline())]
            if kids:
                time.sleep(0.3)  # let it get going (torch import, reading)
                killed_child = kids[0]
                cmd = killed_child.cmdline()
                killed_id = os.path.basename(cmd[cmd.index("--out") + 1])
                victim.kill()  # SIGKILL: no clean shutdown of the worker
            time.sleep(0.05)
        assert killed_child is not None, "no pair ever ran on the first worker"
        stdout, stderr = batch.communicate(timeout=120)
        assert batch.returncode == 0, stderr
        events = _json_lines(stdout)
        done = {e["id"]: e for e in events if e["event"] == "pair"}
        assert sorted(done) == [f"s{i}" for i in range(6)] and all(e["status"] == "ok" for e in done.values())
        # the killed worker's pair was started again on the surviving worker, and its child did not outlive it
        started = [e for e in events if e["event"] == "pair_started" and e["id"] == killed_id]
        assert len(started) >= 2 and done[killed_id]["worker"] != started[0]["worker"]
        psutil.wait_procs([killed_child], timeout=10)
        assert not killed_child.is_running() or killed_child.status() == psutil.STATUS_ZOMBIE
        # results: complete, valid and the same as single register runs
        refs = [subprocess.Popen(_engine_cmd("register", "--fixed", cohort / "atlas.nii.gz", "--moving",
                                             cohort / f"sub{i}.nii.gz", "--fixed-seg", cohort / "atlas_seg.nii.gz",
                                             "--moving-seg", cohort / f"sub{i}_seg.nii.gz", "--threads", "1",
                                             "--out", tmp_path / f"ref{i}", *FAST),
                                 env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                for i in range(6)]
        for r in refs:
            assert r.wait(timeout=120) == 0, r.stderr.read()
        for i in range(6):
            res, ref = out / f"s{i}", tmp_path / f"ref{i}"
            rep = json.loads((res / "report.json").read_text())
            ref_rep = json.loads((ref / "report.json").read_text())
            assert sorted(os.listdir(res)) == sorted(os.listdir(ref))
            assert all((res / f).is_file() for f in rep["files"].values())
            np.testing.assert_array_equal(_displacement(res / "transform.h5"), _displacement(ref / "transform.h5"))
            for f in ("jacobian.nii.gz", "warped.nii.gz", "warped_seg.nii.gz"):
                np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(res / f))),
                                              sitk.GetArrayFromImage(sitk.ReadImage(str(ref / f))))
            for key in ("method", "method_options", "folds", "dice", "initial_alignment"):
                assert rep[key] == ref_rep[key], key
        assert not [n for n in os.listdir(out) if ".partial-" in n or ".old-" in n]
        summary = json.loads((out / "summary.json").read_text(), parse_constant=_no_nan)
        assert summary["counts"]["ok"] == 6 and len(summary["pairs"]) == 6
        row = next(r for r in summary["pairs"] if r["id"] == "s3")
        assert row["dice_after"] == round(json.loads((out / "s3" / "report.json").read_text())["dice"]["after"]["mean"], 4)
        assert (out / "summary.csv").read_text().count("\n") == 7 and (out / "qa_montage.png").stat().st_size > 1000
        assert "## Flagged pairs" in (out / "summary.md").read_text()

        # the same batch again: nothing runs (it does not even need the cluster)
        mtimes = {i: os.stat(out / f"s{i}" / "report.json").st_mtime_ns for i in range(6)}
        again = subprocess.run(_engine_cmd("batch", "--pairs", cohort / "pairs.csv", "--out", out, "--scheduler",
                                           "tcp://127.0.0.1:1", "--json", "--", *FAST),
                               env={**os.environ, **ENV}, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr
        ev = _json_lines(again.stdout)
        assert not [e for e in ev if e["event"] in ("pair", "pair_started")]
        assert ev[-1]["event"] == "batch_result" and ev[-1]["up_to_date"] == 6
        assert mtimes == {i: os.stat(out / f"s{i}" / "report.json").st_mtime_ns for i in range(6)}

        # a changed method option: every pair runs again (on a fresh second worker)
        procs.append(_start_worker(sched_file))
        _wait_workers(address, 2)
        changed = [*FAST, "--demons-sigma", "1.0"]
        third = subprocess.run(_engine_cmd("batch", "--pairs", cohort / "pairs.csv", "--out", out, "--scheduler",
                                           address, "--json", "--", *changed),
                               env={**os.environ, **ENV}, capture_output=True, text=True, timeout=120)
        assert third.returncode == 0, third.stderr
        ran = [e for e in _json_lines(third.stdout) if e["event"] == "pair"]
        assert sorted(e["id"] for e in ran) == [f"s{i}" for i in range(6)] and all(e["status"] == "ok" for e in ran)
        assert all(json.loads((out / f"s{i}" / "report.json").read_text())["method_options"]["sigma"] == 1.0
                   for i in range(6))
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    assert not _engine_processes(str(out))


# -- retries and failures (an in-process Dask cluster: tasks run in this process's threads) ----------------------

_ATTEMPTS: dict[str, int] = {}


def _flaky(spec):
    """run_pair, except: 'flaky' fails its first attempt with an internal error; 'broken' always does."""
    from deepdiffreg.batch.task import run_pair
    _ATTEMPTS[spec["id"]] = _ATTEMPTS.get(spec["id"], 0) + 1
    if spec["id"] == "broken" or (spec["id"] == "flaky" and _ATTEMPTS["flaky"] == 1):
        return {"id": spec["id"], "status": "failed", "exit_code": int(ExitCode.ERROR), "error": "simulated crash"}
    return run_pair(spec)


def test_failing_pairs_are_recorded_and_retried_without_stopping_others(cohort, tmp_path):
    from distributed import LocalCluster
    from deepdiffreg.batch.runner import BatchOptions, run_batch
    (tmp_path / "corrupt.nii.gz").write_bytes(b"not an image")
    base = {"fixed": str(cohort / "atlas.nii.gz"), "fixed_seg": str(cohort / "atlas_seg.nii.gz")}
    rows = [{"id": "good", **base, "moving": str(cohort / "sub1.nii.gz"), "moving_seg": str(cohort / "sub1_seg.nii.gz")},
            {"id": "flaky", **base, "moving": str(cohort / "sub2.nii.gz"), "moving_seg": str(cohort / "sub2_seg.nii.gz")},
            {"id": "corrupt", **base, "fixed_seg": "", "moving": str(tmp_path / "corrupt.nii.gz"), "moving_seg": ""},
            {"id": "broken", **base, "moving": str(cohort / "sub3.nii.gz"), "moving_seg": ""}]
    _write_csv(tmp_path / "pairs.csv", rows)
    out = tmp_path / "OUT"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as cluster:
        opts = BatchOptions(out=str(out), scheduler=cluster.scheduler_address, retries=1, threads_per_pair=1)
        lines = io.StringIO()
        code = run_batch(read_pairs_csv(str(tmp_path / "pairs.csv")), parse_register_args(FAST), opts,
                         Console(as_json=True, stream=lines), task=_flaky)
    assert code == ExitCode.ERROR  # some pairs failed
    events = _json_lines(lines.getvalue())
    assert {e["id"] for e in events if e["event"] == "pair_progress"} >= {"good", "flaky"}  # the children's progress
    retried = [e for e in events if e["event"] == "pair" and e["retry"]]
    assert sorted(e["id"] for e in retried) == ["broken", "flaky"]
    summary = {r["id"]: r for r in json.loads((out / "summary.json").read_text(), parse_constant=_no_nan)["pairs"]}
    assert summary["good"]["status"] == "ok" and summary["flaky"]["status"] == "ok"
    # each child counted its own share of the cores (DEEPDIFFREG_CORES): no helper thread on another pair's core
    assert json.loads((out / "good" / "report.json").read_text())["machine"]["usable_cores"] == 1
    assert summary["flaky"]["attempts"] == 2 and _ATTEMPTS["flaky"] == 2
    assert summary["corrupt"]["status"] == "failed" and summary["corrupt"]["exit_code"] == ExitCode.BAD_INPUT
    assert summary["corrupt"]["attempts"] == 1 and "moving image" in summary["corrupt"]["error"]  # bad input: no retry
    assert summary["broken"]["status"] == "failed" and summary["broken"]["attempts"] == 2  # 1 + retries
    assert summary["broken"]["exit_code"] == ExitCode.ERROR and summary["broken"]["error"] == "simulated crash"
    assert "failed" in summary["corrupt"]["flags"]
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == [
        "flaky", "good", "qa_montage.png", "summary.csv", "summary.json", "summary.md"]
    ledger = json.loads((out / ".deepdiffreg-batch" / "pairs" / "corrupt.json").read_text())
    assert ledger["status"] == "failed" and ledger["exit_code"] == ExitCode.BAD_INPUT
    md = (out / "summary.md").read_text()
    assert "corrupt | failed, exit 2" in md and "broken | failed, exit 1: simulated crash" in md


# -- cancel: Ctrl-C in the terminal (SIGINT to the whole process group) ------------------------------------------

def test_ctrl_c_stops_every_pair_and_leaves_only_complete_results(cohort, tmp_path):
    out = tmp_path / "OUT"
    # the default method with an iteration count that takes a minute or more here: the cancel comes first
    batch = subprocess.Popen(_engine_cmd("batch", "--pairs", cohort / "pairs.csv", "--out", out, "--workers", "2",
                                         "--json", "--", "--nodeo-iterations", "10000", "--spacing", "4", "--no-align"),
                             env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len([p for p in _engine_processes(str(out))
                                              if "register" in p.cmdline()]) < 2:
            time.sleep(0.2)
        children = [p for p in _engine_processes(str(out)) if "register" in p.cmdline()]
        assert len(children) == 2, "two pairs should be running"
        # not with the tuning the Dask nanny gave its worker (MALLOC_TRIM_THRESHOLD_: 2.7x slower runs)
        assert all("MALLOC_TRIM_THRESHOLD_" not in p.environ() for p in children)
        everything = psutil.Process(batch.pid).children(recursive=True) + children
        time.sleep(1.0)
        t0 = time.time()
        os.killpg(batch.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        stdout, stderr = batch.communicate(timeout=90)
    finally:
        if batch.poll() is None:
            os.killpg(batch.pid, signal.SIGKILL)
    assert batch.returncode == ExitCode.CANCELLED, stderr
    assert time.time() - t0 < 45
    psutil.wait_procs(everything, timeout=10)
    assert not [p for p in everything if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not _engine_processes(str(out))
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == ["summary.csv", "summary.json", "summary.md"]
    events = _json_lines(stdout)
    assert events[-1]["event"] == "batch_result" and events[-1]["counts"] == {"cancelled": 6}


# -- local cluster layout: one worker per GPU, its own CUDA_VISIBLE_DEVICES, the GPU resource -------------------

def _worker_env():
    return os.environ.get("CUDA_VISIBLE_DEVICES"), signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_local_gpu_workers_own_one_device_each():
    from distributed import Client
    from deepdiffreg.batch import cluster as clusters
    plan = clusters.plan_local(None, None, 4.0, ["3", "5"])
    assert (plan.workers, plan.gpus) == (2, ["3", "5"]) and plan.threads_per_pair == max(1, clusters.usable_cores() // 2)
    assert clusters.plan_local(1, None, 4.0, ["3", "5"]).gpus == ["3"]
    assert clusters.detect_gpus("auto", "cpu") == [] and clusters.detect_gpus("0,2", "auto") == ["0", "2"]
    cpu = clusters.plan_local(None, 1, 1e9, [])  # memory-bound: one pair at a time
    assert cpu.workers == 1 and not cpu.gpus
    with clusters.start_local(clusters.Plan(1, 1, ["7"])) as cl, Client(cl) as client:
        (env,) = client.run(_worker_env).values()
        assert env == ("7", True)  # its GPU only; terminal Ctrl-C is the batch's to handle, not the worker's
        (info,) = client.scheduler_info(n_workers=-1)["workers"].values()
        assert info["resources"] == {"GPU": 1} and info["nthreads"] == 1
        assert clusters.pair_resources(client, "auto") == {"GPU": 1}
        assert clusters.pair_resources(client, "cpu") is None


def test_engine_works_without_dask():
    code = ("import sys; sys.modules['distributed'] = sys.modules['dask'] = None\n"
            "from deepdiffreg.cli import main\n"
            "assert main(['methods']) == 0\n"
            "sys.exit(main(['batch', '--atlas', sys.argv[1], '--moving', sys.argv[2], '--out', sys.argv[3]]))\n")
    d = os.path.dirname(sys.modules["deepdiffreg"].__file__)
    r = subprocess.run([sys.executable, "-c", code, os.path.join(d, "__init__.py"), os.path.join(d, "__main__.py"),
                        os.devnull + "-out"],
                       env={**os.environ, **ENV}, capture_output=True, text=True, timeout=60)
    assert r.returncode == ExitCode.ERROR and "pip install 'deepdiffreg[batch]'" in r.stderr, r.stderr


def _child_env_seen_by_worker():
    from deepdiffreg.batch.task import child_environ
    return os.environ.get("MALLOC_TRIM_THRESHOLD_"), child_environ().get("MALLOC_TRIM_THRESHOLD_"), \
        child_environ({"OMP_NUM_THREADS": "3"}).get("OMP_NUM_THREADS")


def test_children_do_not_inherit_the_nannys_worker_tuning():
    """A Dask nanny sets MALLOC_TRIM_THRESHOLD_=65536 (and OMP_NUM_THREADS=1) for its worker: 2.7x slower runs."""
    from distributed import Client
    from deepdiffreg.batch import cluster as clusters
    with clusters.start_local(clusters.Plan(1, 1)) as cl, Client(cl) as client:
        (seen,) = client.run(_child_env_seen_by_worker).values()
    assert seen == ("65536", None, "3")
