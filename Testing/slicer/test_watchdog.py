"""The engine stops when the Slicer that started it dies (issue 14 item 6: parent watchdog)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil

from conftest import MODULE_DIR
from DeepDiffRegLib import process as ddprocess

# A stand-in for Slicer: starts the real engine with its own pid to watch, reports the engine's pid, and dies
# without cleaning up (as a crashed Slicer would).
LAUNCHER = r'''
import json, os, subprocess, sys
from DeepDiffRegLib import process as ddprocess
env = ddprocess.child_environment(sys.argv[1], dict(os.environ), device="cpu")
child = subprocess.Popen(json.loads(sys.argv[2]), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
import time
time.sleep(4)  # the engine is up (torch imported, watchdog running) and must still be running
print(child.pid, child.poll() is None, flush=True)
os._exit(0)
'''


def test_engine_exits_when_its_parent_dies(tmp_path):
    import synthetic
    inputs = synthetic.write_engine_inputs(str(tmp_path / "inputs"))
    out = str(tmp_path / "result")
    cmd = ddprocess.register_command(sys.executable, inputs["fixed"], inputs["moving"], out, method="nodeo",
                                     device="cpu", extra=["--nodeo-iterations", "100000"])
    env = dict(os.environ, PYTHONPATH=MODULE_DIR)
    r = subprocess.run([sys.executable, "-c", LAUNCHER, MODULE_DIR, json.dumps(cmd)], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    pid, alive_with_parent = int(r.stdout.split()[0]), r.stdout.split()[1] == "True"
    assert alive_with_parent
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    else:
        psutil.Process(pid).kill()
        raise AssertionError("the engine kept running after its parent died")
    assert not os.path.exists(out)  # it stopped as a cancel does: no partial result folder
