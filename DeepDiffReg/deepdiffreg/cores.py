"""How many CPU cores this process may use: the one count behind ``--threads``' default, the write stage's
helper threads and the batch plan (standard library only: the CLI reads it before torch is imported)."""
from __future__ import annotations

import os


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask (a SLURM job's, a container's or ``taskset``'s share),
    not ``os.cpu_count()``, the whole machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):     # no affinity call (macOS, Windows)
        return os.cpu_count() or 1
