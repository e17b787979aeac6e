"""Run one command and measure it: ``python _measure.py RESULT.json CMD [ARG ...]``.

Run by path (no package import, a few MB): it forks, the child execs CMD, and RESULT.json receives
{"exit_code", "wall_s", "peak_rss_mb"} of that child. The peak RSS must be measured by a small parent: Linux keeps
a process's maximum resident set across exec, so a register child spawned straight from the benchmark (which holds
the pairs and torch) would report the benchmark's own peak as a floor. SIGTERM/SIGINT are passed on to the child.
Exits with the child's exit code.

The child's own high-water mark (VmHWM) is gone once it has exited, so this parent takes ``wait4``'s ru_maxrss of
the child, which is the child's own peak because the child was forked from this small process; the unit conversion
is the engine's (``deepdiffreg.peak_memory``, stdlib only, loaded without the rest of the package).
"""
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from deepdiffreg.peak_memory import maxrss_mb  # noqa: E402 - after the path to this copy of the package


def main() -> int:
    out, cmd = sys.argv[1], sys.argv[2:]
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(cmd[0], cmd)
        except OSError as e:
            os.write(2, f"deepdiffreg: error: cannot run {cmd[0]}: {e}\n".encode())
        os._exit(127)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda n, _f: os.kill(pid, n))
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    with open(out, "w") as fh:
        json.dump({"exit_code": code, "wall_s": round(wall, 3), "peak_rss_mb": maxrss_mb(usage.ru_maxrss)}, fh)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
