"""Run the engine CLI as a child process without blocking the caller.

A reader thread only moves stdout lines into a queue; the caller (a QTimer in the widget, or ``wait()`` in scripts
and tests) drains the queue on its own thread with ``poll()``. Progress comes from the engine's JSON lines
(``deepdiffreg.progress.parse_line``), never from free text. ``cancel()`` ends the whole process tree: under Slicer
the child is the ``PythonSlicer`` launcher, which starts the real Python, so killing only the direct child leaves an
orphan that keeps the CPU/GPU busy.
"""
from __future__ import annotations

import collections
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from deepdiffreg.progress import ExitCode, parse_line
from deepdiffreg.warm import IDLE_TIMEOUT_S

try:  # psutil is not bundled with Slicer; install.py adds it, and we fall back to process groups without it
    import psutil
except ImportError:  # pragma: no cover - exercised by test_process.py through a monkeypatch
    psutil = None

LOG_LINES_KEPT = 5000

# One line per exit code for the panel; the engine's own error message comes first when there is one.
EXIT_MESSAGES = {
    ExitCode.OK: "Registration finished.",
    ExitCode.ERROR: "The registration failed (unexpected error; see the log).",
    ExitCode.BAD_INPUT: "The inputs or options were rejected.",
    ExitCode.OUT_OF_MEMORY: "The registration ran out of memory.",
    ExitCode.CANCELLED: "The registration was cancelled.",
    ExitCode.DEVICE_UNAVAILABLE: "The requested device (GPU) is not available.",
    ExitCode.MISSING_WEIGHTS: "The model weights are missing or failed their checksum.",
}


def exit_code_from_returncode(returncode: int | None, cancelled: bool = False) -> ExitCode | None:
    """Map a process return code to an ``ExitCode``; None while the process runs.

    A negative code (killed by a signal on POSIX) counts as CANCELLED when we asked for it, else ERROR; so does an
    unknown positive code.
    """
    if returncode is None:
        return None
    if cancelled:
        return ExitCode.CANCELLED
    try:
        return ExitCode(returncode)
    except ValueError:
        return ExitCode.ERROR


@dataclass
class RunStatus:
    """Everything the panel shows about a run, updated by ``EngineProcess.poll()``."""

    stage: str = ""
    progress: float = 0.0
    message: str = ""
    elapsed_s: float = 0.0
    device: str | None = None
    result: dict[str, Any] | None = None      # the final {"event": "result", ...} line
    error: dict[str, Any] | None = None       # the {"event": "error", ...} line
    returncode: int | None = None
    exit_code: ExitCode | None = None
    cancelled: bool = False
    infos: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.returncode is not None

    @property
    def ok(self) -> bool:
        return self.exit_code is ExitCode.OK and self.result is not None

    @property
    def offer_cpu_retry(self) -> bool:
        """Out of memory on a GPU: the panel offers to run again on the CPU."""
        return self.exit_code is ExitCode.OUT_OF_MEMORY and (self.device or "").startswith("cuda")

    def error_text(self) -> str:
        """One-paragraph error for the user: the engine's own message, else a sentence per exit code."""
        if self.exit_code in (None, ExitCode.OK):
            return ""
        generic = EXIT_MESSAGES.get(self.exit_code, EXIT_MESSAGES[ExitCode.ERROR])
        engine_msg = (self.error or {}).get("message")
        text = f"{generic} {engine_msg}" if engine_msg and not self.cancelled else generic
        if self.offer_cpu_retry:
            text += " You can retry on the CPU (slower, but uses main memory)."
        return text


class EngineProcess:
    """One child process with a reader thread and a queue.

    ``on_event(obj)`` is called from ``poll()`` (the caller's thread) for every JSON line; free text goes to the log.
    """

    def __init__(self, command: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 on_text: Callable[[str], None] | None = None):
        self.command = [str(c) for c in command]
        self.env = env
        self.cwd = cwd
        self.on_event = on_event
        self.on_text = on_text
        self.status = RunStatus()
        self.log: collections.deque[str] = collections.deque(maxlen=LOG_LINES_KEPT)
        self.proc: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> "EngineProcess":
        kwargs: dict[str, Any] = {}
        if os.name == "posix":
            kwargs["start_new_session"] = True  # own process group: the killpg fallback reaches grandchildren
        else:  # pragma: no cover - Windows
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) | getattr(
                subprocess, "CREATE_NO_WINDOW", 0)
        self._t0 = time.monotonic()
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd, text=True,
                                     encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        self._thread = threading.Thread(target=self._read, name="DeepDiffReg-reader", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        """Reader thread: lines into the queue, then the return code. No callbacks, no Qt, from here."""
        assert self.proc is not None and self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, ""):
            self._queue.put(("line", line.rstrip("\r\n")))
        self.proc.stdout.close()
        self._queue.put(("exit", self.proc.wait()))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and not self.status.finished

    def elapsed(self) -> float:
        return time.monotonic() - self._t0 if self._t0 else 0.0

    # -- draining --------------------------------------------------------------------------------------------
    def poll(self) -> RunStatus:
        """Drain queued lines on the caller's thread and update ``status``. Cheap; call it from a timer."""
        while True:
            try:
                kind, value = self._queue.get_nowait()
            except queue.Empty:
                break
            if kind == "line":
                self._handle_line(value)
            else:
                self.status.returncode = value
                self.status.exit_code = exit_code_from_returncode(value, self.status.cancelled)
        if not self.status.finished:
            self.status.elapsed_s = self.elapsed()
        return self.status

    def _handle_line(self, line: str) -> None:
        self.log.append(line)
        obj = parse_line(line)
        if obj is None:
            if self.on_text:
                self.on_text(line)
            return
        ev = obj.get("event")
        st = self.status
        if ev == "progress":
            st.stage = str(obj.get("stage", st.stage))
            st.progress = max(st.progress, float(obj.get("progress", st.progress)))  # never backwards
            st.message = str(obj.get("message", ""))
            st.elapsed_s = float(obj.get("elapsed_s", st.elapsed_s))
        elif ev == "info":
            st.infos.append(obj)
            if obj.get("device"):
                st.device = str(obj["device"])
        elif ev == "result":
            st.result = obj
            dev = (obj.get("summary") or {}).get("device")
            if dev and not st.device:
                st.device = str(dev)
        elif ev == "error":
            st.error = obj
        if self.on_event:
            self.on_event(obj)

    def wait(self, timeout: float | None = None, poll_interval: float = 0.05) -> RunStatus:
        """Block until the child ends (scripts, tests). Raises TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.poll()
            if self.status.finished:
                if self._thread is not None:
                    self._thread.join(timeout=5)
                return self.poll()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"engine process {self.pid} still running after {timeout} s")
            time.sleep(poll_interval)

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(list(self.log)[-n:])

    # -- cancel ----------------------------------------------------------------------------------------------
    def cancel(self, grace_s: float = 3.0) -> None:
        """Ask the engine to stop (SIGTERM: it exits CANCELLED and leaves no output), then kill what remains of
        the whole tree after ``grace_s``. Sticky: the run ends as CANCELLED whatever the child returns."""
        self.status.cancelled = True
        if self.proc is None or self.proc.poll() is not None and not _has_live_children(self.proc.pid):
            return
        kill_process_tree(self.proc.pid, grace_s=grace_s)


class SpareEngine:
    """An engine child started before its command is known (``deepdiffreg warm``, engine ``warm.py``): it imports
    torch and the engine (~1.3-1.8 s of every run on a 2-core CPU, ~300 MB while it waits) while the user picks the
    volumes, then runs the one command it is handed. ``matches`` tells whether it can run a command for this
    Python and environment (the environment differs per device, e.g. no visible GPU for the CPU); ``hand_over``
    gives it the command and returns its ``EngineProcess``, now that run's; ``close`` ends an unused one.

    The request goes through a file in ``folder`` (written whole, then renamed into place), not stdin: under
    Slicer the child is the PythonSlicer launcher, and a file does not depend on whether and how it forwards
    stdin to the Python it starts (not checked in a real Slicer here)."""

    def __init__(self, python: str, env: dict[str, str] | None, folder: str,
                 idle_timeout_s: float = IDLE_TIMEOUT_S, margin_s: float = 60.0):
        self.python, self.env, self.folder = str(python), dict(env) if env is not None else None, folder
        self.request_file = os.path.join(folder, "request.json")
        self.idle_timeout_s, self.margin_s = float(idle_timeout_s), float(margin_s)
        self.process = EngineProcess([self.python, "-m", "deepdiffreg", "warm", "--request", self.request_file,
                                      "--idle-timeout", f"{self.idle_timeout_s:g}"], env=self.env)
        self._handed = False

    def start(self) -> "SpareEngine":
        os.makedirs(self.folder, exist_ok=True)
        self.process.start()
        return self

    @property
    def ready(self) -> bool:
        """Its imports are done (the ``ready`` line came); a spare that is not ready yet can still be handed a
        command, which then waits for the imports."""
        return any(i.get("ready") for i in self.process.poll().infos)

    def matches(self, python: str, env: dict[str, str] | None) -> bool:
        """Not handed over yet, still running, not about to end on its idle timeout, and started with this
        Python and environment."""
        if self._handed or self.process.proc is None or self.process.proc.poll() is not None:
            return False
        if self.process.elapsed() > self.idle_timeout_s - self.margin_s:
            return False
        return self.python == str(python) and self.env == (dict(env) if env is not None else None)

    def hand_over(self, command: Sequence[str], on_text: Callable[[str], None] | None = None,
                  on_event: Callable[[dict[str, Any]], None] | None = None) -> EngineProcess:
        """Run ``command`` (``[python, -m, deepdiffreg, *argv]``, as ``register_command`` builds it) in this spare;
        its process, status and clock are that run's from now on."""
        command = [str(c) for c in command]
        if command[:3] != [self.python, "-m", "deepdiffreg"] or self._handed:
            raise ValueError("SpareEngine.hand_over(): not a command for this spare engine")
        proc = self.process
        proc.poll()                                   # the ready line (and anything before it) stays the spare's
        tmp = self.request_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"argv": command[3:]}, f)
        os.replace(tmp, self.request_file)            # whole, never half-written
        self._handed = True
        proc.command, proc.on_text, proc.on_event = command, on_text, on_event
        proc.status, proc._t0 = RunStatus(), time.monotonic()
        return proc

    def close(self, grace_s: float = 1.0) -> None:
        """End the spare if it was never handed a command (a handed one belongs to its run: call this when that
        run is over), and remove its folder."""
        if not self._handed and self.process.proc is not None:
            self.process.cancel(grace_s=grace_s)
            try:
                self.process.wait(timeout=grace_s + 10)
            except TimeoutError:  # pragma: no cover - kill_process_tree already killed what was left
                pass
        shutil.rmtree(self.folder, ignore_errors=True)


def _has_live_children(pid: int) -> bool:
    if psutil is None:
        return False
    try:
        return bool(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return False


def kill_process_tree(pid: int, grace_s: float = 3.0) -> list[int]:
    """Terminate ``pid`` and all its descendants, killing survivors after ``grace_s``. Returns the pids signalled.

    Children are collected *before* the parent is signalled (after its death they are re-parented and can no
    longer be found from it). Without psutil, the process group (the child was started in its own session) is
    signalled instead.
    """
    if psutil is not None:
        try:
            parent = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return []
        procs = parent.children(recursive=True) + [parent]
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=grace_s)
        return [p.pid for p in procs]
    return _kill_group_fallback(pid, grace_s)


def _kill_group_fallback(pid: int, grace_s: float) -> list[int]:
    if os.name != "posix":  # pragma: no cover - Windows without psutil: taskkill /T ends the tree
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True)
        return [pid]
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return []
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return [pid]
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return [pid]
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return [pid]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    # zombies still count here; the reader thread reaps our direct child (we must not steal its status)
    return True


# -- building the command line -------------------------------------------------------------------------------
def register_command(python: str, fixed: str, moving: str, out_dir: str, method: str, device: str = "auto",
                     fixed_seg: str | None = None, moving_seg: str | None = None,
                     fixed_landmarks: str | None = None, moving_landmarks: str | None = None,
                     fixed_mask: str | None = None, spacing_mm: float | None = None,
                     spacing_scale: float | None = None, align: bool = True, follow_up: bool = False,
                     method_args: Sequence[str] = (), overwrite: bool = True, threads: int | None = None,
                     field_grid: str | None = None, contrast_check: str | None = None,
                     extra: Sequence[str] = ()) -> list[str]:
    """``[python, -m, deepdiffreg, register, ...]`` (the engine CLI, see the README).

    Only the engine's generic options are spelled here; everything method-specific comes in ``method_args``,
    built by ``methods.option_args`` from the options the method declares in ``methods --json`` (so a flag the
    method does not declare is never passed). Temporary files (the exported inputs) belong to the caller.
    """
    cmd = [python, "-m", "deepdiffreg", "register", "--fixed", fixed, "--moving", moving, "--method", method,
           "--out", out_dir, "--device", device]
    if fixed_seg and moving_seg:
        cmd += ["--fixed-seg", fixed_seg, "--moving-seg", moving_seg]
    if fixed_landmarks and moving_landmarks:
        cmd += ["--fixed-landmarks", fixed_landmarks, "--moving-landmarks", moving_landmarks]
    if fixed_mask:
        cmd += ["--fixed-mask", fixed_mask]
    if spacing_mm is not None and spacing_mm > 0:
        cmd += ["--spacing", f"{float(spacing_mm):g}"]
    elif spacing_scale is not None and spacing_scale != 1:
        cmd += ["--spacing-scale", f"{float(spacing_scale):g}"]
    if not align:
        cmd.append("--no-align")
    if follow_up:            # the two images are one patient's: methods may refine (engine `register --follow-up`)
        cmd.append("--follow-up")
    if field_grid:           # "working" (the engine's default) or "fixed" (the full-resolution field)
        cmd += ["--field-grid", field_grid]
    if contrast_check and contrast_check != "error":   # the engine's default refuses a contrast mismatch
        cmd += ["--contrast-check", contrast_check]
    cmd += [str(a) for a in method_args]
    if overwrite:
        cmd.append("--overwrite")
    if threads:
        cmd += ["--threads", str(int(threads))]
    return cmd + list(extra)


WATCH_PID_ENV = "DEEPDIFFREG_WATCH_PID"  # read by deepdiffreg/watchdog.py: the child ends when this pid is gone


def child_environment(module_dir: str, base: dict[str, str] | None = None, device: str = "auto",
                      watch_pid: int | None = None) -> dict[str, str]:
    """Environment for the child: the module folder (which holds the ``deepdiffreg`` package) first on
    PYTHONPATH, unbuffered output, the JSON-lines protocol asked for explicitly (``DEEPDIFFREG_JSON=1``; the engine
    shows a progress bar instead when its stdout is a terminal), no visible GPU when the CPU was chosen, and the pid
    of this process for the engine's parent watchdog (a child whose Slicer died stops instead of running on;
    ``watch_pid=0`` turns it off)."""
    env = dict(os.environ if base is None else base)
    pid = os.getpid() if watch_pid is None else watch_pid
    if pid:
        env[WATCH_PID_ENV] = str(pid)
    else:
        env.pop(WATCH_PID_ENV, None)
    paths = [module_dir] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != module_dir]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env["DEEPDIFFREG_JSON"] = "1"
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    return env


def default_python() -> str:
    """PythonSlicer inside Slicer (found on PATH next to the app), else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


class BackgroundCommand:
    """A short command (list methods, import/delete a model, make the sample pair) run off the GUI thread:
    ``poll()`` returns None while it runs, then ``(returncode, stdout, stderr)``. A start failure (no such
    program) is reported the same way, with returncode -1. Never raises from ``poll``."""

    def __init__(self, command: Sequence[str], env: dict[str, str] | None = None, timeout_s: float = 300.0):
        self.command = [str(c) for c in command]
        self.env = env
        self.timeout_s = timeout_s
        self._result: tuple[int, str, str] | None = None
        self._proc: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._work, name="DeepDiffReg-command", daemon=True)

    def start(self) -> "BackgroundCommand":
        self._thread.start()
        return self

    def _work(self) -> None:
        try:
            self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          stdin=subprocess.DEVNULL, env=self.env, text=True, encoding="utf-8",
                                          errors="replace")
            out, err = self._proc.communicate(timeout=self.timeout_s)
            self._result = (self._proc.returncode, out, err)
        except subprocess.TimeoutExpired:
            kill_process_tree(self._proc.pid, grace_s=1.0)
            self._result = (-1, "", f"{self.command[2:4]} did not finish within {self.timeout_s:.0f} s")
        except Exception as e:  # noqa: BLE001 - reported through poll()
            self._result = (-1, "", f"{type(e).__name__}: {e}")

    def poll(self) -> tuple[int, str, str] | None:
        return self._result

    def wait(self, timeout: float | None = None) -> tuple[int, str, str]:
        self._thread.join(timeout)
        if self._result is None:
            raise TimeoutError(" ".join(self.command))
        return self._result

    def cancel(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            kill_process_tree(self._proc.pid, grace_s=1.0)
