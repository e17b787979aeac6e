"""The peak resident memory of a process in MB, on every platform (stdlib only, so that the benchmark's small
measuring parent, benchmark/_measure.py, can load it without torch).

Linux: VmHWM from /proc/self/status, the high-water mark of this process's own address space. ``ru_maxrss`` is no
good there for a child: Linux keeps it across exec, so a register process started by a large parent (pytest, the
benchmark) reports the parent's peak as a floor (measured: 837 MB for a run that peaks at ~550 MB on its own).
Elsewhere: ``getrusage`` ru_maxrss (macOS gives bytes, the BSDs KiB), and on Windows (no ``resource`` module)
psutil's ``peak_wset`` when psutil is installed.
"""
from __future__ import annotations

import sys

STATUS = "/proc/self/status"


def maxrss_mb(ru_maxrss: int) -> float:
    """``ru_maxrss`` (of ``getrusage`` or ``wait4``) in MB: bytes on macOS, KiB on Linux and the BSDs."""
    return round(ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 1024.0), 1)


def _vmhwm_mb() -> float | None:
    """VmHWM of /proc/self/status (KiB there) in MB; None when the file or the line is absent."""
    try:
        with open(STATUS) as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_cpu_memory_mb() -> float | None:
    """Peak resident memory of this process in MB (None when it cannot be told)."""
    if sys.platform.startswith("linux"):
        mb = _vmhwm_mb()
        if mb is not None:
            return mb
    try:
        import resource  # POSIX only: imported here so that the engine loads on Windows
    except ImportError:
        resource = None
    if resource is not None:
        return maxrss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    try:
        import psutil
        info = psutil.Process().memory_info()
        peak = getattr(info, "peak_wset", None) or info.rss
        return round(peak / 2 ** 20, 1)
    except Exception:  # noqa: BLE001 - psutil absent or the call unsupported: no number rather than a failure
        return None
