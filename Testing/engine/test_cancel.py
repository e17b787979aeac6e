"""SIGTERM / SIGINT end a run cleanly: exit code CANCELLED, no result directory, no partial directory."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from deepdiffreg.progress import ExitCode


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_cancels_cleanly(pair, tmp_path, sig):
    out = tmp_path / "result"
    exe = os.path.join(os.path.dirname(sys.executable), "deepdiffreg")
    proc = subprocess.Popen([exe, "register", "--fixed", pair["fixed"], "--moving", pair["moving"], "--method", "nodeo",
                             "--nodeo-iterations", "100000", "--no-align", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
    deadline = time.time() + 120
    for line in proc.stdout:  # wait until the optimisation loop runs
        if '"stage": "register"' in line and "iteration" in line or time.time() > deadline:
            break
    proc.send_signal(sig)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.CANCELLED, err
    assert err.strip().startswith("deepdiffreg: error: cancelled") and len(err.strip().splitlines()) == 1
    assert json.loads(rest.strip().splitlines()[-1])["code"] == "CANCELLED"
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if ".partial-" in n]
