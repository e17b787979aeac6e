"""The terminal is for people, stdout lines for programs.

* ``json_mode()``: JSON-lines protocol (progress.py) when ``--json`` is given, when ``DEEPDIFFREG_JSON=1`` (the Slicer
  child sets it), or automatically when stdout is not a terminal (scripts, pipes); ``DEEPDIFFREG_JSON=0`` forces
  the human view.
* ``make_reporter()``: a ``progress.Reporter`` in JSON mode, else a ``HumanReporter`` that draws a tqdm progress bar
  with the stage name and prints only the plain text (the summary) — no JSON lines.
* ``LibraryOutput``: ITK, GDCM and HDF5 print warnings straight to file descriptor 2, and Python libraries through
  ``warnings``; both are captured for the duration of a command, so that a bad input gives exactly one line on
  stderr, and summarised in one line afterwards (human mode) or one ``info`` event (JSON mode).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import warnings
import weakref
from typing import IO, Any

from .progress import Reporter

_ENV = "DEEPDIFFREG_JSON"


def json_mode(flag: bool | None = None, stream: IO[str] | None = None) -> bool:
    if flag:
        return True
    env = os.environ.get(_ENV, "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    stream = sys.stdout if stream is None else stream
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):
        return True


_ACTIVE: "weakref.WeakSet[HumanReporter]" = weakref.WeakSet()


def close_bars() -> None:
    """Clear every progress bar still drawn (before an error line goes to the terminal)."""
    for r in list(_ACTIVE):
        r.close()


class HumanReporter(Reporter):
    """Progress bar (tqdm) with the stage name and its message; free text (the summary) printed plainly."""

    def __init__(self, stream: IO[str] = sys.stdout):
        super().__init__(stream)
        _ACTIVE.add(self)
        self._bar = None
        self._plain_last = ""
        self._drawn = 0.0
        try:
            from tqdm import tqdm
        except ImportError:      # e.g. inside Slicer's Python without tqdm: one plain line per stage
            tqdm = None
        self._tqdm = tqdm

    def _emit(self, obj: dict[str, Any]) -> None:
        ev = obj.get("event")
        if ev == "progress":
            self._show(obj.get("stage") or "", float(obj.get("progress") or 0.0), str(obj.get("message") or ""))
        elif ev in ("result", "error"):
            self.close()

    def _show(self, stage: str, fraction: float, message: str) -> None:
        if self._tqdm is None:
            line = f"[{100 * fraction:3.0f}%] {stage}: {message}"
            if stage != self._plain_last:
                self.stream.write(line + "\n")
                self.stream.flush()
                self._plain_last = stage
            return
        if self._bar is None:
            # a terminal that reports no size (a bare pty, some CI consoles) would make tqdm draw nothing
            cols = shutil.get_terminal_size((0, 0)).columns
            size = {"dynamic_ncols": True} if cols > 0 else {"ncols": 100, "nrows": 24}
            self._bar = self._tqdm(total=1000, file=self.stream, leave=False, mininterval=0.2, **size,
                                   bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")
        new_stage = stage != self._plain_last
        self._plain_last = stage
        now = time.monotonic()
        if new_stage or now - self._drawn >= 0.2:      # at most five redraws a second, every stage change at once
            self._bar.set_description_str(f"{stage:<10} {message[:48]:<48}", refresh=False)
            self._bar.n = max(self._bar.n, int(round(1000 * fraction)))
            self._bar.refresh()
            self._drawn = now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def text(self, message: str) -> None:
        self.close()
        super().text(message)


def make_reporter(json_flag: bool | None = None, stream: IO[str] | None = None) -> Reporter:
    stream = sys.stdout if stream is None else stream
    return Reporter(stream) if json_mode(json_flag, stream) else HumanReporter(stream)


class LibraryOutput:
    """``with LibraryOutput() as lib:`` — fd 2 goes to a temporary file (Python's ``sys.stderr`` keeps writing to
    the real stderr), Python warnings are recorded; ``lib.lines`` / ``lib.summary()`` afterwards."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.lines: list[str] = []
        self.warnings: list[str] = []

    def __enter__(self) -> "LibraryOutput":
        self._catch = warnings.catch_warnings(record=True)
        self._recorded = self._catch.__enter__()
        warnings.simplefilter("default")
        self._saved_fd = None
        if not self.enabled:
            return self
        try:
            sys.stderr.flush()
            self._saved_fd = os.dup(2)
            self._file = tempfile.TemporaryFile()
            os.dup2(self._file.fileno(), 2)
            self._old_stderr = sys.stderr
            encoding = getattr(sys.stderr, "encoding", None) or "utf-8"   # as before: a C-locale console stays ASCII
            sys.stderr = open(os.dup(self._saved_fd), "w", buffering=1, encoding=encoding, errors="backslashreplace",
                              closefd=True)
        except (OSError, ValueError, AttributeError):
            self._saved_fd = None
        return self

    def __exit__(self, *exc) -> bool:
        self._catch.__exit__(*exc)
        self.warnings = [f"{w.category.__name__}: {str(w.message).splitlines()[0] if str(w.message) else ''}"
                         for w in self._recorded]
        if self._saved_fd is not None:
            try:
                sys.stderr.flush()
                sys.stderr.close()
            except (OSError, ValueError):
                pass
            sys.stderr = self._old_stderr
            os.dup2(self._saved_fd, 2)
            os.close(self._saved_fd)
            self._file.seek(0)
            raw = self._file.read(1 << 20).decode("utf-8", "backslashreplace")
            self._file.close()
            self.lines = [ln.strip() for ln in raw.splitlines() if ln.strip()]
        return False

    def summary(self) -> str | None:
        """One line: how many library lines were printed and the first telling one; None when there were none."""
        msgs = []
        for ln in self.lines:  # ITK: "WARNING: In <file>, line N" then "<Class> (0x..): message"
            if ln.startswith(("WARNING: In", "ERROR: In")) or ln.startswith("HDF5-DIAG") or ln.startswith("#"):
                continue
            msgs.append(ln.split("): ", 1)[-1])
        msgs = list(dict.fromkeys(msgs + self.warnings))
        if not msgs:
            return None
        first = msgs[0][:160]
        more = f" (+{len(msgs) - 1} more)" if len(msgs) > 1 else ""
        return f"library warnings: {first}{more}"
