"""The batch coordinator: plan (skip what is up to date), submit one task per pair, retry, cancel, summarise.

Runs in the ``deepdiffreg batch`` process; the pairs run on Dask workers (task.run_pair). State lives in OUT:
``OUT/<id>/`` (written atomically by each child), ``OUT/.deepdiffreg-batch/pairs/<id>.json`` (the ledger: what
each pair was run with, or how it failed) and the summary files (report.py).
"""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import BadInput, Cancelled
from ..progress import ExitCode
from . import cluster as clusters
from .console import Console
from .pairs import STATE_DIR, Pair
from .report import row_from_report, write_summary
from .request import (RegisterRequest, expected_method_options, installed_models, ledger_path, pair_request,
                      read_json, request_sha256, up_to_date, write_json_atomic)
from .task import dask_worker_environ, run_pair

# Exit codes a retry cannot change (the same input, the same weights give the same answer).
NO_RETRY = {int(ExitCode.BAD_INPUT), int(ExitCode.MISSING_WEIGHTS)}


@dataclass
class BatchOptions:
    out: str
    scheduler: str = "local"             # "local" or a scheduler address (tcp://HOST:PORT)
    workers: int | None = None           # local workers (None: sized to the machine)
    threads_per_pair: int | None = None  # CPU threads of each register child (None: the worker's share of cores)
    memory_per_pair_gb: float = 4.0      # local sizing: at most free memory / this many pairs at once
    gpus: str = "auto"                   # local: auto | none | "0,1"
    retries: int = 2                     # extra attempts for a failed pair (not for bad input / missing weights)
    fold_threshold_pct: float = 0.01     # flag pairs with more folded voxels than this (% of the foreground)
    montage_max: int = 24                # pairs in qa_montage.png (worst first)
    dry_run: bool = False
    cancel_grace_s: float = 60.0         # after a cancel, how long running pairs get to stop


class _Lock:
    """One batch at a time per OUT (an flock on OUT/.deepdiffreg-batch/lock)."""

    def __init__(self, out: str):
        self.path = os.path.join(out, STATE_DIR, "lock")
        self.fh = None

    def __enter__(self):
        import fcntl
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            raise BadInput(f"another batch is running on {os.path.dirname(os.path.dirname(self.path))}") from None
        return self

    def __exit__(self, *exc):
        self.fh.close()
        return False


def remove_leftovers(out: str, ids: list[str]) -> list[str]:
    """Delete ``<id>.partial-*`` / ``<id>.old-*`` folders a killed child left in OUT; returns what was removed."""
    try:
        names = os.listdir(out)
    except OSError:
        return []
    removed = []
    for name in names:
        base, sep, _ = name.partition(".partial-")
        if not sep:
            base, sep, _ = name.partition(".old-")
        if sep and base in ids and os.path.isdir(os.path.join(out, name)):
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
            removed.append(name)
    return removed


class _Signals:
    """First SIGINT/SIGTERM: ask for a clean cancel. Second: stop at once (the finally blocks still close up)."""

    def __init__(self):
        self.requested: str | None = None
        self.previous: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.requested:
            raise Cancelled(f"cancelled by a second {signal.Signals(signum).name}")
        self.requested = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)
        return False


def plan(out: str, pairs: list[Pair], req: RegisterRequest,
         models: dict[str, str]) -> tuple[list[Pair], dict[str, str], dict[str, Any]]:
    """(pairs to run, {id: why it runs}, {id: its request}) — everything else is up to date."""
    options = expected_method_options(req)
    to_run, why, requests = [], {}, {}
    for p in pairs:
        requests[p.id] = pair_request(p, req)
        ok, reason = up_to_date(out, p, requests[p.id], options, models)
        if not ok:
            to_run.append(p)
            why[p.id] = reason
    return to_run, why, requests


def run_batch(pairs: list[Pair], req: RegisterRequest, opts: BatchOptions, console: Console,
              task: Callable[[dict], dict] = run_pair) -> int:
    """Register every pair that is not up to date; write the summary. Returns the exit code: 0 all pairs ok,
    1 some failed (see the summary), 4 cancelled."""
    out = os.path.abspath(opts.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise BadInput(f"--out exists and is not a folder: {out}")
    os.makedirs(out, exist_ok=True)
    ids = [p.id for p in pairs]
    with _Lock(out), _Signals() as sig:
        remove_leftovers(out, ids)  # nothing of this OUT runs now: whatever is half-written is stale
        models = installed_models(req.method)
        to_run, why, requests = plan(out, pairs, req, models)
        if opts.dry_run:
            for p in pairs:
                console.plan(p.id, "run" if p.id in why else "skip", why.get(p.id, "up to date"))
            return 0
        results: dict[str, dict[str, Any]] = {}
        t0 = time.time()
        meta: dict[str, Any] = {"method": req.method, "register_args": req.argv, "scheduler": opts.scheduler}
        cancelled = False
        try:
            if to_run:
                cancelled = _execute(out, to_run, req, opts, console, task, sig, results, requests, models, meta)
        finally:
            remove_leftovers(out, ids)
            meta["wall_s"] = round(time.time() - t0, 2)
            ran = sum(1 for r in results.values() if r.get("status") == "ok")
            meta["pairs_per_hour"] = round(3600.0 * ran / meta["wall_s"], 1) if ran and meta["wall_s"] > 0 else None
            rows = _rows(out, pairs, why, results, cancelled)
            paths = write_summary(out, rows, meta, opts.fold_threshold_pct, opts.montage_max)
        console.finish(rows, paths, meta)
        if cancelled:
            return int(ExitCode.CANCELLED)
        return 0 if all(r["status"] == "ok" for r in rows) else int(ExitCode.ERROR)


def _rows(out: str, pairs: list[Pair], why: dict[str, str], results: dict[str, dict[str, Any]],
          cancelled: bool) -> list[dict[str, Any]]:
    """One summary row per pair: this run's outcome, or the earlier run's for pairs that were up to date; the
    metrics from report.json for pairs whose result is there."""
    rows = []
    for p in pairs:
        row: dict[str, Any] = {"id": p.id, "resumed": p.id not in why, "out_dir": os.path.join(out, p.id)}
        r = results.get(p.id)
        if r is None and p.id not in why:  # up to date: as the ledger recorded it
            r = {**(read_json(ledger_path(out, p.id)) or {}), "status": "ok"}
        if r is None:
            r = {"status": "cancelled" if cancelled else "not_run"}
        row.update({k: r.get(k) for k in ("status", "exit_code", "error", "attempts", "worker", "host")})
        if row["status"] == "ok":
            row.update(row_from_report(out, p.id))
        else:
            row["out_dir"] = None
        rows.append(row)
    return rows


def _connect(opts: BatchOptions, req: RegisterRequest, console: Console, sig: "_Signals"):
    from distributed import Client
    if opts.scheduler == "local":
        gpus = clusters.detect_gpus(opts.gpus, req.device)
        p = clusters.plan_local(opts.workers, opts.threads_per_pair, opts.memory_per_pair_gb, gpus)
        cluster = clusters.start_local(p)
        try:
            client = Client(cluster)
        except BaseException:
            cluster.close()
            raise
        return client, cluster, p.threads_per_pair, p.describe()
    if not opts.scheduler.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
        raise BadInput(f"--scheduler: expected 'local' or an address like tcp://HOST:8786, got {opts.scheduler!r}")
    try:
        client = Client(opts.scheduler, timeout=30)
    except (OSError, TimeoutError) as e:
        raise BadInput(f"cannot reach the Dask scheduler at {opts.scheduler}: {e}") from None
    n = len(client.scheduler_info(n_workers=-1).get("workers", {}))
    if not n:  # e.g. SLURM jobs still queued: wait, so that the pairs' GPU requests see the workers' resources
        console.info(f"waiting for the first worker to join {opts.scheduler}")
        while not n and not sig.requested:
            time.sleep(1.0)
            n = len(client.scheduler_info(n_workers=-1).get("workers", {}))
    return client, None, opts.threads_per_pair, f"{n} worker(s) at {opts.scheduler}"


def _execute(out, to_run, req, opts, console, task, sig, results, requests, models, meta) -> bool:
    """Submit, watch, retry. Returns True when the batch was cancelled."""
    from distributed import Event
    token = uuid.uuid4().hex[:10]
    # Local workers inherit this process's environment, then their nanny overrides a few variables (and leaves
    # them in this process's os.environ too): the children get back what the user had set, read before the
    # cluster starts. Remote workers: their own environment decides.
    keep_env = ({k: os.environ[k] for k in dask_worker_environ() if k in os.environ}
                if opts.scheduler == "local" else {})
    client, local_cluster, threads, described = _connect(opts, req, console, sig)
    try:
        cancel_event = Event(f"deepdiffreg-batch-cancel-{token}", client=client)
        topic = f"deepdiffreg-batch-{token}"
        resources = clusters.pair_resources(client, req.device)
        meta["workers"] = described
        console.start(total=len(to_run), to_run=len(to_run), out=out, where=described,
                      dashboard=getattr(client, "dashboard_link", None) if clusters.dashboard_available() else None)
        try:
            client.subscribe_topic(topic, console.worker_event)
        except Exception:  # noqa: BLE001 — live per-pair progress is optional
            pass
        futures: dict[Any, tuple[Pair, int]] = {}
        if sig.requested:  # cancelled while the cluster was starting or while waiting for workers
            console.cancelling(sig.requested, 0)
            return True

        def submit(pair: Pair, attempt: int) -> None:
            spec = {"id": pair.id, "argv": [*pair.register_argv(), "--out", os.path.join(out, pair.id), "--overwrite",
                                            *req.argv],
                    "cwd": os.getcwd(), "threads": None if req.gives_threads else threads,
                    "user_threads": req.gives_threads, "cancel_event": cancel_event.name, "topic": topic,
                    "keep_env": keep_env}
            f = client.submit(task, spec, key=f"deepdiffreg-{pair.id}-{token}-{attempt}", pure=False,
                              resources=resources)
            futures[f] = (pair, attempt)

        for p in to_run:
            submit(p, 1)
        while futures and not sig.requested:
            done = [f for f in futures if f.done()]
            for f in done:
                pair, attempt = futures.pop(f)
                r = _outcome(f, pair)
                r["attempts"] = attempt
                retry = (r["status"] != "ok" and attempt <= opts.retries and not sig.requested
                         and r.get("exit_code") not in NO_RETRY)
                if r["status"] == "ok" and not os.path.isfile(os.path.join(out, pair.id, "report.json")):
                    r.update(status="failed", exit_code=int(ExitCode.ERROR),
                             error=f"the worker reports success but {os.path.join(out, pair.id)} is not visible here "
                                   f"(is OUT on a filesystem the workers share?)")
                console.pair_done(r, retry)
                if retry:
                    remove_leftovers(out, [pair.id])
                    submit(pair, attempt + 1)
                    continue
                results[pair.id] = r
                _record(out, r, requests[pair.id], models)
            console.tick(running=len(futures))
            if futures and not done:
                time.sleep(0.2)
        if not sig.requested:
            return False
        # -- cancel: running children are stopped by their tasks; queued tasks return at once --------------------
        console.cancelling(sig.requested, len(futures))
        cancel_event.set()
        deadline = time.time() + opts.cancel_grace_s
        while futures and time.time() < deadline:
            for f in [f for f in futures if f.done()]:
                pair, attempt = futures.pop(f)
                r = _outcome(f, pair)
                r["attempts"] = attempt
                if r["status"] == "ok":  # it finished before it saw the cancel: keep it
                    results[pair.id] = r
                    _record(out, r, requests[pair.id], models)
                else:
                    results[pair.id] = {**r, "status": "cancelled"}
            time.sleep(0.1)
        for f, (pair, attempt) in futures.items():
            results[pair.id] = {"id": pair.id, "status": "cancelled", "exit_code": int(ExitCode.CANCELLED),
                                "error": "still stopping on its worker when the batch ended", "attempts": attempt}
        if futures:
            client.cancel(list(futures))
        return True
    finally:
        try:
            client.close()
        finally:
            if local_cluster is not None:
                local_cluster.close()  # workers end; any child still there gets SIGTERM (PR_SET_PDEATHSIG)


def _record(out: str, r: dict[str, Any], request: dict[str, Any], models: dict[str, str]) -> None:
    """The pair's ledger entry: how it ended (status, exit code, error, worker) and what it was run with."""
    entry = {k: v for k, v in r.items() if k != "summary"}
    entry.update(request=request, request_sha256=request_sha256(request), models=models,
                 finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_json_atomic(ledger_path(out, r["id"]), entry)


def _outcome(future, pair: Pair) -> dict[str, Any]:
    """The task's result, or a failed record when the task itself did not return (worker lost, task error)."""
    try:
        r = future.result()
        return dict(r)
    except Exception as e:  # noqa: BLE001 — KilledWorker, a worker without deepdiffreg, ...
        name = type(e).__name__
        msg = ("its worker died while running it, more often than Dask allows" if name == "KilledWorker"
               else f"{name}: {str(e).splitlines()[0] if str(e) else ''}")
        return {"id": pair.id, "status": "failed", "exit_code": None, "error": msg}
