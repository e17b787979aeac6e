"""The child-process runner: progress parsing, tree cancel without orphans, failures surface."""
from __future__ import annotations

import os
import sys
import time

import psutil
import pytest

from deepdiffreg.progress import ExitCode
from DeepDiffRegLib import process as ddprocess
from DeepDiffRegLib.states import ProcessingState, stage_label

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child_fake_engine.py")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_progress_lines_parsed_free_text_kept_in_log():
    events = []
    p = ddprocess.EngineProcess([sys.executable, CHILD, "ok"], on_event=events.append).start()
    st = p.wait(timeout=30)
    assert st.ok and st.exit_code is ExitCode.OK and st.returncode == 0
    assert [e["stage"] for e in events if e["event"] == "progress"] == ["load", "align", "register", "write"]
    assert st.stage == "write" and st.progress == 1.0 and st.device == "cpu"
    assert st.result["report"] == "/nowhere/report.json"
    assert "free text that the runner must ignore" in p.log_tail()
    assert stage_label(st.stage) == "Writing results"


def test_failing_child_surfaces_message_and_exit_code():
    p = ddprocess.EngineProcess([sys.executable, CHILD, "fail"]).start()
    st = p.wait(timeout=30)
    assert not st.ok and st.returncode == 2 and st.exit_code is ExitCode.BAD_INPUT
    assert "fixed image is 2-D" in st.error_text() and "rejected" in st.error_text()
    assert "the last words before dying" in p.log_tail(5)
    assert not st.offer_cpu_retry


def test_gpu_out_of_memory_offers_cpu_retry():
    st = ddprocess.EngineProcess([sys.executable, CHILD, "oom"]).start().wait(timeout=30)
    assert st.exit_code is ExitCode.OUT_OF_MEMORY and st.device == "cuda:0"
    assert st.offer_cpu_retry and "retry on the CPU" in st.error_text()


@pytest.mark.parametrize("with_psutil", [True, False], ids=["psutil", "killpg-fallback"])
def test_cancel_kills_the_whole_tree(monkeypatch, with_psutil):
    if not with_psutil:
        monkeypatch.setattr(ddprocess, "psutil", None)
    events = []
    p = ddprocess.EngineProcess([sys.executable, CHILD, "tree"], on_event=events.append).start()
    deadline = time.monotonic() + 30
    while not any(e.get("message") == "grandchild" for e in events):
        assert time.monotonic() < deadline, p.log_tail()
        p.poll(); time.sleep(0.05)
    gc_pid = next(e["pid"] for e in events if e.get("message") == "grandchild")
    child_pid = p.pid
    assert psutil.Process(gc_pid).ppid() == child_pid  # a real grandchild
    t0 = time.monotonic()
    p.cancel(grace_s=1.0)
    st = p.wait(timeout=15)
    assert time.monotonic() - t0 < 10
    assert st.cancelled and st.exit_code is ExitCode.CANCELLED and not st.ok
    assert "cancelled" in st.error_text()
    deadline = time.monotonic() + 5
    while not (_gone(child_pid) and _gone(gc_pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child_pid), "child left running"
    assert _gone(gc_pid), "grandchild orphaned"


def test_exit_code_mapping_and_states():
    assert ddprocess.exit_code_from_returncode(None) is None
    assert ddprocess.exit_code_from_returncode(0) is ExitCode.OK
    assert ddprocess.exit_code_from_returncode(6) is ExitCode.MISSING_WEIGHTS
    assert ddprocess.exit_code_from_returncode(-9) is ExitCode.ERROR
    assert ddprocess.exit_code_from_returncode(-15, cancelled=True) is ExitCode.CANCELLED
    assert ddprocess.exit_code_from_returncode(77) is ExitCode.ERROR
    assert ProcessingState.RUNNING.busy and ProcessingState.RUNNING.button_text == "Cancel"
    assert ProcessingState.IDLE.button_text == "Register" and not ProcessingState.FAILED.busy


def test_register_command_and_environment(tmp_path):
    cmd = ddprocess.register_command("py", "f.nrrd", "m.nrrd", str(tmp_path), method="any-method", device="cpu",
                                     fixed_seg="fs.nrrd", moving_seg="ms.nrrd", spacing_mm=2.0, align=False,
                                     fixed_mask="mask.nrrd", method_args=["--any-method-steps", "30"])
    assert cmd[:4] == ["py", "-m", "deepdiffreg", "register"]
    for a, b in (("--fixed", "f.nrrd"), ("--moving", "m.nrrd"), ("--method", "any-method"), ("--device", "cpu"),
                 ("--any-method-steps", "30"), ("--spacing", "2"), ("--fixed-seg", "fs.nrrd"),
                 ("--fixed-mask", "mask.nrrd")):
        assert cmd[cmd.index(a) + 1] == b
    assert "--no-align" in cmd and "--fixed-landmarks" not in cmd and "--follow-up" not in cmd
    assert "--follow-up" in ddprocess.register_command("py", "f", "m", "o", method="any-method", follow_up=True)
    # nothing method-specific is added by the runner itself
    cmd = ddprocess.register_command("py", "f", "m", "o", method="any-method")
    assert [w for w in cmd if w.startswith("--")] == ["--fixed", "--moving", "--method", "--out", "--device",
                                                      "--overwrite"]
    env = ddprocess.child_environment("/mod", {"PYTHONPATH": "/a"}, device="cpu")
    assert env["PYTHONPATH"].split(os.pathsep) == ["/mod", "/a"] and env["CUDA_VISIBLE_DEVICES"] == "-1"
    assert env[ddprocess.WATCH_PID_ENV] == str(os.getpid())
    assert ddprocess.WATCH_PID_ENV not in ddprocess.child_environment("/mod", {}, watch_pid=0)
