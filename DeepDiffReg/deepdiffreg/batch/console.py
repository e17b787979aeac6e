"""What a batch tells its caller: a progress bar and a plain summary for a person, JSON lines with ``--json``.

JSON lines (stdout, strict JSON: no NaN), one object each, ``event`` first:
    {"event": "batch_start", "pairs_to_run": 6, "out": "...", "workers": "...", "dashboard": null}
    {"event": "pair_started", "id": "s01", "worker": "tcp://..."}
    {"event": "pair_progress", "id": "s01", "stage": "register", "progress": 0.42}   (at most ~1/s per pair)
    {"event": "pair", "id": "s01", "status": "ok"|"failed"|"cancelled", "exit_code": 0, "error": null,
     "attempt": 1, "retry": false, "seconds": 12.3, "worker": "tcp://..."}
    {"event": "progress", "progress": 0.5, "done": 3, "failed": 0, "running": 2, "total": 6, "elapsed_s": 40.1}
    {"event": "plan", "id": "s01", "action": "run"|"skip", "reason": "..."}         (--dry-run)
    {"event": "batch_result", "counts": {...}, "files": {...}, "wall_s": ..., "pairs_per_hour": ...}
A failure of the batch itself ends with the engine's usual {"event": "error", ...} line and exit code.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from typing import IO, Any

from .request import strict_json


class Console:
    def __init__(self, as_json: bool = False, stream: IO[str] | None = None, err: IO[str] | None = None):
        self.as_json = as_json
        self.out = stream or sys.stdout
        self.err = err or sys.stderr
        self.bar = not as_json and hasattr(self.err, "isatty") and self.err.isatty()
        self.total = 0
        self.done = self.failed = 0
        self.t0 = time.time()
        self._last_tick = 0.0
        self._last_state: tuple = ()
        self.live: dict[str, str] = {}
        self._lock = threading.Lock()

    # -- low level ---------------------------------------------------------------------------------------------
    def _json(self, obj: dict[str, Any]) -> None:
        with self._lock:
            self.out.write(json.dumps(strict_json(obj), allow_nan=False) + "\n")
            self.out.flush()

    def _line(self, text: str) -> None:
        with self._lock:
            if self.bar:
                self.err.write("\r\033[K")
                self.err.flush()
            self.out.write(text + "\n")
            self.out.flush()

    # -- events ------------------------------------------------------------------------------------------------
    def plan(self, pair_id: str, action: str, reason: str) -> None:
        if self.as_json:
            self._json({"event": "plan", "id": pair_id, "action": action, "reason": reason})
        else:
            self._line(f"{action:4s} {pair_id}: {reason}")

    def start(self, total: int, to_run: int, out: str, where: str, dashboard: str | None) -> None:
        self.total, self.t0 = total, time.time()
        if self.as_json:
            self._json({"event": "batch_start", "pairs_to_run": to_run, "out": out, "workers": where,
                        "dashboard": dashboard})
        else:
            self._line(f"Registering {to_run} pair(s) into {out} on {where}" +
                       (f"; Dask dashboard: {dashboard}" if dashboard else ""))

    def worker_event(self, event) -> None:
        """Handler of the batch's Dask topic (called on the client's thread): started / progress of a pair."""
        msg = event[1] if isinstance(event, (tuple, list)) and len(event) == 2 else event
        if not isinstance(msg, dict) or "id" not in msg:
            return
        kind = msg.get("event")
        if kind == "started":
            self.live[msg["id"]] = "starting"
            if self.as_json:
                self._json({"event": "pair_started", "id": msg["id"], "worker": msg.get("worker"),
                            "host": msg.get("host")})
        elif kind == "progress" and msg["id"] in self.live:
            p = msg.get("progress")
            self.live[msg["id"]] = f"{msg.get('stage') or ''} {100 * p:.0f}%" if isinstance(p, (int, float)) else ""
            if self.as_json:
                self._json({"event": "pair_progress", "id": msg["id"], "stage": msg.get("stage"), "progress": p})
        elif kind == "ended":
            self.live.pop(msg["id"], None)

    def pair_done(self, r: dict[str, Any], retry: bool) -> None:
        self.live.pop(r["id"], None)
        if not retry:
            self.done += 1
            self.failed += r["status"] != "ok"
        if self.as_json:
            self._json({"event": "pair", "id": r["id"], "status": r["status"], "exit_code": r.get("exit_code"),
                        "error": r.get("error"), "attempt": r.get("attempts"), "retry": retry,
                        "seconds": r.get("seconds"), "worker": r.get("worker")})
            return
        if r["status"] == "ok":
            s = r.get("summary") or {}
            extra = f", Dice {s['dice_after']:.3f}" if isinstance(s.get("dice_after"), (int, float)) else ""
            folds = s.get("percent_folded")
            extra += f", {folds:.4f} % folded" if isinstance(folds, (int, float)) else ""
            self._line(f"[{self.done}/{self.total}] {r['id']}: ok in {r.get('seconds') or 0:.1f} s{extra}")
        else:
            what = "failed, retrying" if retry else r["status"]
            self._line(f"[{self.done}/{self.total}] {r['id']}: {what} (exit {r.get('exit_code')}): {r.get('error')}")

    def tick(self, running: int) -> None:
        now = time.time()
        state = (self.done, self.failed, running)
        if self.as_json:
            if state != self._last_state:
                self._last_state = state
                self._json({"event": "progress", "progress": round(self.done / max(self.total, 1), 4),
                            "done": self.done, "failed": self.failed, "running": running, "total": self.total,
                            "elapsed_s": round(now - self.t0, 1)})
            return
        if not self.bar or now - self._last_tick < 0.5:
            return
        self._last_tick = now
        width = 28
        filled = int(width * self.done / max(self.total, 1))
        elapsed = now - self.t0
        eta = ""
        if 0 < self.done < self.total:
            eta = f", ~{_hms(elapsed / self.done * (self.total - self.done))} left"
        live = ", ".join(f"{k} {v}" for k, v in list(self.live.items())[:3])
        busy = min(len(self.live), running)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} done, {self.failed} failed, "
                f"{busy} running, {running - busy} queued, {_hms(elapsed)}{eta}" + (f" | {live}" if live else ""))
        with self._lock:
            self.err.write("\r\033[K" + line[:200])
            self.err.flush()

    def info(self, message: str) -> None:
        if self.as_json:
            self._json({"event": "info", "message": message})
        else:
            self._line(message)

    def cancelling(self, signame: str, in_flight: int) -> None:
        if self.as_json:
            self._json({"event": "info", "message": f"{signame}: cancelling {in_flight} pair(s)"})
        else:
            self._line(f"{signame}: stopping {in_flight} pair(s) (results already complete are kept)...")

    def finish(self, rows: list[dict[str, Any]], paths: dict[str, str], meta: dict[str, Any]) -> None:
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        earlier = sum(1 for r in rows if r["status"] == "ok" and r.get("resumed"))
        flagged = [r for r in rows if r.get("flags")]
        if self.as_json:
            self._json({"event": "batch_result", "counts": counts, "up_to_date": earlier, "flagged": len(flagged),
                        "files": paths, "wall_s": meta.get("wall_s"), "pairs_per_hour": meta.get("pairs_per_hour")})
            return
        parts = [f"{n} {k}" for k, n in counts.items()]
        lines = [f"{len(rows)} pair(s): {', '.join(parts)}" + (f" ({earlier} up to date from an earlier run)"
                                                               if earlier else "") +
                 f"; {meta.get('wall_s', 0):.1f} s" +
                 (f", {meta['pairs_per_hour']:.0f} pairs/hour" if meta.get("pairs_per_hour") else "")]
        for r in flagged[:20]:
            why = f" (exit {r.get('exit_code')}: {r.get('error')})" if r["status"] != "ok" else ""
            lines.append(f"  flagged {r['id']}: {', '.join(r['flags'])}{why}")
        if len(flagged) > 20:
            lines.append(f"  ... and {len(flagged) - 20} more flagged pairs")
        lines.append(f"Summary: {paths.get('md')} (also summary.csv, summary.json"
                     f"{', qa_montage.png' if 'montage' in paths else ''})")
        self._line("\n".join(lines))


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
