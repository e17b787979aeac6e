"""One pair on a Dask worker: a ``python -m deepdiffreg register`` child process, watched until it ends.

The child is the same command a person would run, so a batch result is a single-pair result (same files, same
exit codes) and a crashing pair cannot take the worker down. The child
- dies with its worker: a tiny launcher sets PR_SET_PDEATHSIG (Linux) before exec'ing the engine, so a killed
  worker's pairs get SIGTERM, cancel cleanly (exit 4, no half-written folder) and Dask re-runs them elsewhere;
- is stopped when the batch is cancelled: the task polls the batch's Dask ``Event`` and SIGTERMs the child's
  process group (SIGKILL after a grace period);
- runs in its own session, so a Ctrl-C in the terminal reaches the batch, which decides, not every child.
"""
from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from ..progress import ExitCode, parse_line

# Runs in the child before the engine: die with the parent (the worker), then become the engine (same pid).
LAUNCHER = r"""
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(4)  # the worker died before prctl took effect
os.execv(sys.argv[2], sys.argv[2:])
"""

TERMINATE_GRACE_S = 20.0   # after SIGTERM, how long a child may take to clean up before SIGKILL
POLL_S = 0.5               # how often the child is checked
CANCEL_POLL_S = 2.0        # how often the scheduler is asked whether the batch was cancelled (one RPC per pair)


def _worker():
    try:
        from distributed import get_worker
        return get_worker()
    except (ImportError, ValueError):
        return None


class _CancelWatch:
    """Is the batch cancelled? (a Dask Event by name; an unreachable scheduler counts as cancelled)"""

    def __init__(self, name: str | None):
        self.event = None
        if name:
            from distributed import Event
            self.event = Event(name)

    def __call__(self) -> bool:
        if self.event is None:
            return False
        try:
            return bool(self.event.is_set())
        except Exception:  # noqa: BLE001 — no scheduler any more: nobody is waiting for this pair
            return True


def _log(worker, topic: str | None, msg: dict) -> None:
    """Send ``msg`` to the batch's topic (``worker``: taken in the task's thread; get_worker() fails elsewhere)."""
    if topic and worker is not None:
        try:
            worker.log_event(topic, msg)
        except Exception:  # noqa: BLE001 — progress is a courtesy; the result does not depend on it
            pass


def dask_worker_environ() -> dict[str, str]:
    """The variables a Dask nanny sets for its worker process (MALLOC_TRIM_THRESHOLD_, OMP_NUM_THREADS, ...)."""
    try:
        import dask
        out: dict[str, str] = {}
        for key in ("distributed.nanny.pre-spawn-environ", "distributed.nanny.environ"):
            out.update({k: str(v) for k, v in (dask.config.get(key, default=None) or {}).items()})
        return out
    except Exception:  # noqa: BLE001 — no Dask config: nothing to undo
        return {}


def child_environ(keep: dict[str, str] | None = None) -> dict[str, str]:
    """The register child's environment: the worker's, without the tuning a Dask nanny gave its worker process.

    Those settings suit a worker's own Python tasks, not an engine run: MALLOC_TRIM_THRESHOLD_=65536 made the default
    method's run on a 2 mm IXI pair 2.7x slower (sys time 0.8 -> 11.4 s, glibc handing torch's buffers back to the kernel
    after every step), and OMP_NUM_THREADS=1 would cap the child's threads. ``keep``: values the user gave for
    those variables where the batch was started (local clusters), which stay.
    """
    env = dict(os.environ)
    for k, v in dask_worker_environ().items():
        if env.get(k) == v:
            env.pop(k)
    env.update(keep or {})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def kill_group(proc: subprocess.Popen, grace_s: float = TERMINATE_GRACE_S) -> None:
    """SIGTERM the child's process group, then SIGKILL it if it has not ended after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_pair(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one pair. ``spec``: id, argv (register arguments incl. --out), cwd, threads (None: this worker's share
    of the cores), keep_env (see child_environ), cancel_event and topic (names, optional). Returns what happened;
    never raises for a failed pair.
    """
    worker = _worker()
    where = {"worker": getattr(worker, "address", None), "host": socket.gethostname()}
    cancelled = _CancelWatch(spec.get("cancel_event"))
    base = {"id": spec["id"], **where}
    if cancelled():
        return {**base, "status": "cancelled", "exit_code": int(ExitCode.CANCELLED), "error": "batch cancelled",
                "seconds": 0.0}
    argv = list(spec["argv"])
    threads = spec.get("threads")
    if threads is None and not spec.get("user_threads"):
        per_worker = getattr(getattr(worker, "state", None), "nthreads", None) or getattr(worker, "nthreads", 1) or 1
        from ..cores import usable_cores
        threads = max(1, usable_cores() // int(per_worker))
    if threads is not None:
        argv += ["--threads", str(int(threads))]
    cmd = [sys.executable, "-c", LAUNCHER, str(os.getpid()), sys.executable, "-m", "deepdiffreg", "register", *argv]
    cwd = spec.get("cwd")
    env = child_environ(spec.get("keep_env"))
    if threads is not None:       # the pair's share of the cores: its helper threads take no other pair's core
        from ..cores import ENV as CORES_ENV
        env[CORES_ENV] = str(int(threads))
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, encoding="utf-8", errors="replace", start_new_session=True, env=env,
                            cwd=cwd if cwd and os.path.isdir(cwd) else None)
    topic = spec.get("topic")
    _log(worker, topic, {"id": spec["id"], "event": "started", "pid": proc.pid, **where})
    state: dict[str, Any] = {"result": None, "error": None}
    err_tail: collections.deque[str] = collections.deque(maxlen=20)

    def read_stdout():
        last = 0.0
        for line in proc.stdout:
            obj = parse_line(line)
            if not obj:
                continue
            if obj.get("event") == "result":
                state["result"] = obj
            elif obj.get("event") == "error":
                state["error"] = obj
            elif obj.get("event") == "progress" and time.time() - last > 1.0:
                last = time.time()
                _log(worker, topic, {"id": spec["id"], "event": "progress", "stage": obj.get("stage"),
                             "progress": obj.get("progress")})

    def read_stderr():
        for line in proc.stderr:
            if line.strip():
                err_tail.append(line.rstrip())

    readers = [threading.Thread(target=f, daemon=True) for f in (read_stdout, read_stderr)]
    for r in readers:
        r.start()
    was_cancelled = False
    next_check = time.time() + CANCEL_POLL_S
    try:
        while True:
            try:
                proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            if time.time() < next_check:
                continue
            next_check = time.time() + CANCEL_POLL_S
            if cancelled():
                was_cancelled = True
                kill_group(proc)
                break
    finally:  # the task is being torn down (worker closing): take the child with it
        if proc.poll() is None:
            kill_group(proc)
    for r in readers:
        r.join(timeout=5)
    rc = proc.returncode
    out = {**base, "exit_code": rc, "seconds": round(time.time() - t0, 3), "error": None, "error_code": None}
    if state["error"]:
        out["error"], out["error_code"] = state["error"].get("message"), state["error"].get("code")
    elif rc != 0:
        last = err_tail[-1] if err_tail else ""
        if rc < 0:  # no engine error line: a signal it could not handle (SIGKILL: often the out-of-memory killer)
            out["error"] = f"killed by {signal.Signals(-rc).name}" + (f" ({last})" if last else "")
        else:
            out["error"] = last or f"exit code {rc}"
    if rc == 0 and state["result"] is None:
        out["error"], rc = "register ended with exit code 0 but printed no result", int(ExitCode.ERROR)
        out["exit_code"] = rc
    if was_cancelled:
        out["status"] = "cancelled"
        out["error"] = out["error"] or "batch cancelled"
    else:
        out["status"] = "ok" if rc == 0 else "failed"
    if out["status"] != "ok" and err_tail:
        out["stderr_tail"] = list(err_tail)[-5:]
    if state["result"]:
        out["summary"] = state["result"].get("summary")
    _log(worker, topic, {"id": spec["id"], "event": "ended", "status": out["status"]})
    return out
