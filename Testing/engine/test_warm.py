"""`deepdiffreg warm --request FILE` (warm.py): the spare engine the Slicer panel starts ahead of a run. Its command,
given later in FILE, must do exactly what the same command does started cold; without a request it ends by itself
and writes nothing; a bad request is a one-line BAD_INPUT; SIGTERM while it waits is a cancel."""
import json
import os
import signal
import subprocess
import sys
import time

import SimpleITK as sitk
import numpy as np

from deepdiffreg.progress import ExitCode

from synth import run_cli


def _start(request, *extra):
    return subprocess.Popen([sys.executable, "-m", "deepdiffreg", "warm", "--request", str(request), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                            env={**os.environ, "DEEPDIFFREG_JSON": "1"})


def _ready(proc):
    line = proc.stdout.readline()                    # the first line: the imports are done
    event = json.loads(line)
    assert event["event"] == "info" and event["ready"] is True and event["pid"] == proc.pid, line
    return event


def _request(path, argv):
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"argv": argv}, f)
    os.replace(tmp, path)


def test_the_requested_command_does_what_it_does_started_cold(pair, tmp_path):
    argv = ["register", "--fixed", pair["fixed"], "--moving", pair["moving"], "--method", "demons",
            "--demons-iterations", "5", "--threads", "1"]
    cold = run_cli(*argv, "--out", str(tmp_path / "cold"), "--json")
    assert cold.returncode == 0, cold.stderr
    request = tmp_path / "request.json"
    proc = _start(request)
    _ready(proc)
    assert proc.poll() is None                      # waiting for its command
    _request(request, argv + ["--out", str(tmp_path / "warm"), "--json"])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    events = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    assert events[-1]["event"] == "result" and events[-1]["out_dir"] == str(tmp_path / "warm")
    assert sorted(os.listdir(tmp_path / "warm")) == sorted(os.listdir(tmp_path / "cold"))
    for name in ("jacobian.nii.gz", "warped.nii.gz"):
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / d / name))) for d in ("cold", "warm"))
        assert np.array_equal(a, b)
    assert request.exists()                         # the caller's file: read, never removed


def test_without_a_request_it_ends_by_itself_and_writes_nothing(tmp_path):
    request = tmp_path / "never.json"
    proc = _start(request, "--idle-timeout", "0.5")
    _ready(proc)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.strip() == "" and err.strip() == ""
    assert os.listdir(tmp_path) == []


def _assert_one_line_error(proc, code, needle):
    out, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == int(code), err
    assert len(lines) == 1 and lines[0].startswith("deepdiffreg: error:") and needle in lines[0], err
    assert "Traceback" not in out + err


def test_a_bad_request_is_one_line_of_bad_input(tmp_path):
    for content, needle in (("{not json", "cannot read the request"), (json.dumps({"args": ["methods"]}), "must be"),
                            (json.dumps({"argv": ["methods", 3]}), "must be"),
                            (json.dumps({"argv": ["warm", "--request", "x"]}), "another 'warm'"),
                            (json.dumps({"argv": ["register", "--fixed", "/nonexistent.nii.gz", "--moving",
                                                  "/nonexistent.nii.gz", "--out", str(tmp_path / "o")]}),
                             "not found")):
        request = tmp_path / "request.json"
        proc = _start(request)
        _ready(proc)
        request.write_text(content)
        _assert_one_line_error(proc, ExitCode.BAD_INPUT, needle)
        request.unlink()
    assert not (tmp_path / "o").exists()
    res = run_cli("warm")
    assert res.returncode == int(ExitCode.BAD_INPUT) and "--request" in res.stderr
    res = run_cli("--debug", "warm", "--request", str(tmp_path / "r.json"))
    assert res.returncode == int(ExitCode.BAD_INPUT) and "first argument" in res.stderr


def test_sigterm_while_it_waits_is_a_cancel(tmp_path):
    proc = _start(tmp_path / "request.json")
    _ready(proc)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _assert_one_line_error(proc, ExitCode.CANCELLED, "cancelled")
    assert os.listdir(tmp_path) == []
