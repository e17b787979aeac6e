"""How many CPU cores this process may use: the one count behind ``--threads``' default, the helper threads of
a run and the batch plan (standard library only at import: the CLI reads it before torch is imported)."""
from __future__ import annotations

import os


ENV = "DEEPDIFFREG_CORES"    # a caller's share for this process (e.g. a batch pair's), when lower than the mask


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask (a SLURM job's, a container's or ``taskset``'s share),
    not ``os.cpu_count()``, the whole machine's — or fewer, when ``$DEEPDIFFREG_CORES`` says so: ``deepdiffreg
    batch`` runs several register children side by side on one mask and gives each its share, so that none of
    them takes a "spare" core that another one is using."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):     # no affinity call (macOS, Windows)
        cores = os.cpu_count() or 1
    share = os.environ.get(ENV, "").strip()
    if share.isdigit() and int(share) >= 1:
        cores = min(cores, int(share))
    return cores


def spare_core() -> bool:
    """Whether a core is left beyond torch's threads, for a helper thread beside them (the fold mask during the
    registration, a map computed beside the write stage)."""
    import torch
    return usable_cores() > torch.get_num_threads()
