"""The engine loads and measures memory on every platform, and its out-of-memory handling works on torch < 2.5
(issue 14 items 2 and 3)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import types

from conftest import MODULE_DIR

PIPELINE = os.path.join(MODULE_DIR, "deepdiffreg", "pipeline.py")
POSIX_ONLY = {"resource", "fcntl", "termios", "pwd", "grp", "posix"}


def test_no_posix_only_module_imported_at_module_level_in_the_engine():
    bad = []
    for root, _, files in os.walk(os.path.join(MODULE_DIR, "deepdiffreg")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                tree = ast.parse(open(path, encoding="utf-8").read())
                for n in tree.body:
                    names = [a.name for a in n.names] if isinstance(n, ast.Import) else (
                        [n.module or ""] if isinstance(n, ast.ImportFrom) else [])
                    bad += [(path, m) for m in names if m.split(".")[0] in POSIX_ONLY]
    assert not bad, bad


CHECK = r'''
import sys, types
sys.modules["resource"] = None          # as on Windows: `import resource` raises ImportError
import deepdiffreg.pipeline as pl
import torch
sys.platform = "win32"                  # and no /proc/self/status (after the imports, which read the platform)
mb = pl._peak_memory_mb(torch.device("cpu"))
assert mb["cpu"] is None or mb["cpu"] > 10, mb    # psutil's number here (or none), never an ImportError
print("windows-like", mb["cpu"])
'''


def test_pipeline_imports_and_reports_memory_without_the_resource_module():
    env = dict(os.environ, PYTHONPATH=MODULE_DIR)
    r = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "windows-like" in r.stdout


def test_macos_ru_maxrss_is_bytes(monkeypatch):
    from deepdiffreg import peak_memory as pm
    fake = types.SimpleNamespace(RUSAGE_SELF=0, getrusage=lambda who: types.SimpleNamespace(ru_maxrss=512 * 2 ** 20))
    monkeypatch.setitem(sys.modules, "resource", fake)
    monkeypatch.setattr(pm.sys, "platform", "darwin")
    assert pm.peak_cpu_memory_mb() == 512.0
    monkeypatch.setattr(pm.sys, "platform", "freebsd14")
    assert pm.peak_cpu_memory_mb() == 512.0 * 1024  # the BSDs: KiB


def test_linux_reads_its_own_high_water_mark(monkeypatch, tmp_path):
    """Linux: VmHWM of /proc/self/status, not ru_maxrss (kept across exec: a child of a big parent would report
    the parent's peak); ru_maxrss only when the file cannot be read."""
    from deepdiffreg import peak_memory as pm
    fake = types.SimpleNamespace(RUSAGE_SELF=0, getrusage=lambda who: types.SimpleNamespace(ru_maxrss=4096 * 1024))
    monkeypatch.setitem(sys.modules, "resource", fake)
    monkeypatch.setattr(pm.sys, "platform", "linux")
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t 9000000 kB\nVmHWM:\t  563200 kB\nVmRSS:\t 100000 kB\n")
    monkeypatch.setattr(pm, "STATUS", str(status))
    assert pm.peak_cpu_memory_mb() == 550.0
    monkeypatch.setattr(pm, "STATUS", str(tmp_path / "absent"))
    assert pm.peak_cpu_memory_mb() == 4096.0


def test_a_child_of_a_big_parent_reports_its_own_peak():
    big = bytearray(400 * 2 ** 20)  # this process's resident set grows by 400 MB before the child starts
    big[::4096] = b"x" * len(big[::4096])
    env = dict(os.environ, PYTHONPATH=MODULE_DIR)
    r = subprocess.run([sys.executable, "-c", "from deepdiffreg.peak_memory import peak_cpu_memory_mb as p; print(p())"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    del big
    if sys.platform.startswith("linux"):
        assert float(r.stdout) < 300, r.stdout   # a bare interpreter, not the parent's 400+ MB


OLD_TORCH = r'''
import torch
del torch.OutOfMemoryError                 # torch < 2.5 has only torch.cuda.OutOfMemoryError
from deepdiffreg import compat
assert compat.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
assert compat.is_out_of_memory(RuntimeError("CUDA out of memory"))
assert not compat.is_out_of_memory(ValueError("bad"))
try:
    raise torch.cuda.OutOfMemoryError("x")
except compat.OUT_OF_MEMORY_ERRORS:
    pass
# the CLI's last line of defence with such a torch: exit code 3 and a one-line message, not an AttributeError
import deepdiffreg.cli as cli
def boom(args):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory")
cli._cmd_methods = boom
print("exit", cli.main(["methods"]))
'''


def test_out_of_memory_handling_on_torch_without_OutOfMemoryError():
    env = dict(os.environ, PYTHONPATH=MODULE_DIR)
    r = subprocess.run([sys.executable, "-c", OLD_TORCH], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "exit 3" in r.stdout and "out of GPU memory" in r.stdout + r.stderr
