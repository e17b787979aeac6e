"""Progress protocol between the engine and its callers (the Slicer module, scripts).

The engine prints one JSON object per line on stdout, beside free text that callers ignore:

    {"event": "progress", "stage": "align", "progress": 0.12, "message": "...", "elapsed_s": 3.1}
    {"event": "result", "out_dir": "...", "report": "<out_dir>/report.json", "summary": {...}}
    {"event": "error", "code": "BAD_INPUT", "exit_code": 2, "message": "one line"}

Exit codes are the ``ExitCode`` values below. This file has no third-party import so that the
Slicer side can import it without torch.
"""
from __future__ import annotations

import enum
import json
import sys
import time
from typing import IO, Any

JSON_PREFIX = "{"  # progress lines are bare JSON objects; anything else is free text


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN/±Inf replaced by None (JSON null) and numpy scalars/arrays made plain Python, so that
    ``json.dumps(..., allow_nan=False)`` writes strict JSON (a bare ``NaN`` is rejected by strict parsers).
    numpy is handled by duck typing: this file has no third-party import."""
    if isinstance(obj, float):
        return obj if obj - obj == 0.0 else None      # NaN and ±Inf give NaN here (no math import: see above)
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, (str, int, float, bool)) and k is not None else k: json_safe(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):            # numpy arrays and scalars (np.float32(nan).tolist() is a float)
        return json_safe(obj.tolist())
    if hasattr(obj, "item"):
        return json_safe(obj.item())
    return str(obj)


def dumps(obj: Any, **kw: Any) -> str:
    """Strict JSON text of ``obj`` (see ``json_safe``): NaN/Inf become null."""
    return json.dumps(json_safe(obj), allow_nan=False, **kw)


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1              # unexpected failure (a bug): the message says what broke
    BAD_INPUT = 2          # unreadable / wrong-dimension / empty / mismatched input, unknown method, bad option
    OUT_OF_MEMORY = 3      # CPU or GPU memory exhausted; the caller may retry on CPU or at lower resolution
    CANCELLED = 4          # SIGTERM / SIGINT received; nothing was written
    DEVICE_UNAVAILABLE = 5 # --device cuda asked for but no usable CUDA device
    MISSING_WEIGHTS = 6    # model weights absent or failing their sha256 check


class Reporter:
    """Writes protocol lines. ``stream=None`` makes a silent reporter (library use, tests)."""

    def __init__(self, stream: IO[str] | None = sys.stdout, quiet_text: bool = False):
        self.stream = stream
        self.quiet_text = quiet_text
        self.t0 = time.perf_counter()
        self.stage_times: dict[str, float] = {}
        self._stage: str | None = None
        self._stage_t0 = self.t0
        self._last_fraction = 0.0

    def _emit(self, obj: dict[str, Any]) -> None:
        if self.stream is None:
            return
        self.stream.write(dumps(obj) + "\n")
        self.stream.flush()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def stage(self, name: str, message: str = "", progress: float | None = None) -> None:
        """Start a new stage (closes the timing of the previous one)."""
        now = time.perf_counter()
        if self._stage is not None:
            self.stage_times[self._stage] = self.stage_times.get(self._stage, 0.0) + now - self._stage_t0
        self._stage, self._stage_t0 = name, now
        self.progress(progress if progress is not None else 0.0, message or name)

    def end_stage(self) -> None:
        if self._stage is not None:
            now = time.perf_counter()
            self.stage_times[self._stage] = self.stage_times.get(self._stage, 0.0) + now - self._stage_t0
            self._stage = None

    def progress(self, fraction: float, message: str = "", **extra: Any) -> None:
        """Progress in [0, 1] of the whole run, tagged with the current stage; never goes backwards."""
        self._last_fraction = max(self._last_fraction, float(min(max(fraction, 0.0), 1.0)))
        obj = {"event": "progress", "stage": self._stage or "", "progress": round(self._last_fraction, 4),
               "message": message, "elapsed_s": round(self.elapsed(), 2)}
        obj.update(extra)
        self._emit(obj)

    def info(self, message: str, **extra: Any) -> None:
        self._emit({"event": "info", "stage": self._stage or "", "message": message, **extra})

    def text(self, message: str) -> None:
        """Free text for humans (ignored by the Slicer side)."""
        if self.stream is not None and not self.quiet_text:
            self.stream.write(message + "\n")
            self.stream.flush()

    def result(self, out_dir: str, report_path: str, summary: dict[str, Any]) -> None:
        self._emit({"event": "result", "out_dir": out_dir, "report": report_path, "summary": summary})

    def error(self, code: ExitCode, message: str) -> None:
        self._emit({"event": "error", "code": code.name, "exit_code": int(code), "message": message})


def parse_line(line: str) -> dict[str, Any] | None:
    """Parse one stdout line of the engine; None for free text."""
    line = line.strip()
    if not line.startswith(JSON_PREFIX):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and "event" in obj else None
