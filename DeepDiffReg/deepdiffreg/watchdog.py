"""Parent watchdog: a child started by the Slicer module ends when the Slicer that started it is gone.

The module puts its own pid in ``DEEPDIFFREG_WATCH_PID``. Under Slicer the engine's direct parent is the
``PythonSlicer`` launcher, which would keep waiting for it, so the watched pid is Slicer's, not ``os.getppid()``.
When that process disappears (or its pid is reused by a process started later), the watchdog sends this process
SIGTERM, which the CLI turns into a clean cancel (exit code 4, no partial result folder), and exits hard if that
has not happened after a grace period. Standard library only (psutil when present): imported before torch.
"""
from __future__ import annotations

import os
import signal
import threading
import time

ENV = "DEEPDIFFREG_WATCH_PID"
POLL_S = 1.0
GRACE_S = 20.0


def _alive_fn(pid: int):
    """A callable telling whether ``pid`` is still the process it was when the watchdog started."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            proc = psutil.Process(pid)
            created = proc.create_time()
        except psutil.Error:
            return lambda: False

        def alive() -> bool:
            try:
                return proc.is_running() and proc.create_time() == created and \
                    proc.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                return False
        return alive
    if os.name == "posix":
        def alive() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        return alive
    return None  # Windows without psutil: no portable check; the watchdog stays off


def _stop_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # POSIX: the CLI's cancel handler; Windows: TerminateProcess
    time.sleep(GRACE_S)
    os._exit(4)


def watch(pid: int, poll_s: float = POLL_S) -> threading.Thread | None:
    alive = _alive_fn(pid)
    if alive is None or not alive():
        return None if alive is None else _start(lambda: False, 0.0)
    return _start(alive, poll_s)


def _start(alive, poll_s: float) -> threading.Thread:
    def loop() -> None:
        while alive():
            time.sleep(poll_s)
        _stop_self()
    t = threading.Thread(target=loop, name="deepdiffreg-watchdog", daemon=True)
    t.start()
    return t


def start_from_environment() -> threading.Thread | None:
    """Start the watchdog when ``DEEPDIFFREG_WATCH_PID`` names a process (and is not this one)."""
    value = os.environ.get(ENV, "").strip()
    if not value.isdigit() or int(value) in (0, os.getpid()):
        return None
    return watch(int(value))
