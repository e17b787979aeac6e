"""Where the pairs run: an embedded Dask cluster sized to this machine, or an existing scheduler.

Local: one worker process per pair slot, one task at a time each. With GPUs, one worker per GPU, with
``CUDA_VISIBLE_DEVICES`` set to its GPU and the Dask resource ``GPU=1``, so two pairs never share a device.
Without: ``min(cores // threads_per_pair, free memory // memory_per_pair)`` workers (at least one).
Remote (``tcp://HOST:PORT``): the workers already there; when any advertises a ``GPU`` resource, every pair asks
for one (unless the register arguments say ``--device cpu``).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Any

from ..cores import usable_cores
from ..errors import BadInput

GPU = "GPU"


@dataclass
class Plan:
    workers: int
    threads_per_pair: int
    gpus: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.gpus:
            return f"{self.workers} worker(s), one per GPU ({', '.join(self.gpus)}), {self.threads_per_pair} CPU thread(s) each"
        return f"{self.workers} worker(s) × 1 pair, {self.threads_per_pair} thread(s) per pair"


def available_memory_gb() -> float | None:
    """Free CPU memory in GB (io.images.available_memory_bytes; None when it cannot be told)."""
    from ..io.images import available_memory_bytes
    avail = available_memory_bytes()
    return None if avail is None else avail / 2 ** 30


def detect_gpus(choice: str, device: str) -> list[str]:
    """GPU ids for local workers: ``choice`` is 'auto', 'none' or a comma list ('0,1')."""
    if choice == "none" or device == "cpu":
        return []
    if choice != "auto":
        ids = [g.strip() for g in choice.split(",") if g.strip()]
        if not ids:
            raise BadInput(f"--gpus: expected auto, none or a list like 0,1; got {choice!r}")
        return ids
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch
        return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    except Exception:  # noqa: BLE001 — no usable CUDA: CPU workers
        return []


def plan_local(workers: int | None, threads_per_pair: int | None, memory_per_pair_gb: float,
               gpus: list[str]) -> Plan:
    cores = usable_cores()
    if gpus:
        n = len(gpus) if workers is None else max(1, min(workers, len(gpus)))
        return Plan(n, threads_per_pair or max(1, cores // n), gpus[:n])
    if workers is None:
        n = max(1, cores // (threads_per_pair or 1))
        mem = available_memory_gb()
        if mem is not None and memory_per_pair_gb > 0:
            n = max(1, min(n, int(mem // memory_per_pair_gb)))
    else:
        n = workers
    return Plan(n, threads_per_pair or max(1, cores // n))


def dashboard_available() -> bool:
    return importlib.util.find_spec("bokeh") is not None


def start_local(plan: Plan):
    """A SpecCluster of Nanny workers on 127.0.0.1 (one task each). Terminal Ctrl-C is ignored in the workers:
    the batch handles it and stops the pairs itself."""
    from distributed import Nanny, Scheduler, SpecCluster
    options: dict[str, Any] = {"nthreads": 1, "memory_limit": 0, "host": "127.0.0.1", "silence_logs": logging.ERROR}
    workers = {}
    for i in range(plan.workers):
        opts = dict(options)
        if plan.gpus:
            opts.update(resources={GPU: 1}, env={"CUDA_VISIBLE_DEVICES": plan.gpus[i]})
        workers[f"gpu{plan.gpus[i]}" if plan.gpus else f"cpu{i}"] = {"cls": Nanny, "options": opts}
    # the HTTP server (dashboard with bokeh; health/metrics without) on a free port of this machine only
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "port": 0, "dashboard_address": "127.0.0.1:0",
                                               "dashboard": dashboard_available()}}
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the worker processes spawned now
    try:
        return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.ERROR)
    finally:
        signal.signal(signal.SIGINT, previous)


def pair_resources(client, device: str) -> dict[str, float] | None:
    """{"GPU": 1} when any worker of the cluster advertises GPUs and the run may use one; else None."""
    if device == "cpu":
        return None
    workers = client.scheduler_info().get("workers", {})
    if any(GPU in (w.get("resources") or {}) for w in workers.values()):
        return {GPU: 1}
    return None
