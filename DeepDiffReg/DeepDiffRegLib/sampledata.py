"""The module's sample data: the engine's synthetic head phantom pair (``deepdiffreg/sample_data.py``), generated
on first use into a cache folder by a child process — nothing is downloaded. Registered with Slicer's SampleData
module by ``DeepDiffReg.py``."""
from __future__ import annotations

import os
import subprocess

SAMPLE_NAME = "DeepDiffReg phantom pair"
FILES = {"fixed": "fixed.nii.gz", "moving": "moving.nii.gz", "fixed_seg": "fixed_seg.nii.gz",
         "moving_seg": "moving_seg.nii.gz"}
NODE_NAMES = {"fixed": "DeepDiffRegPhantomFixed", "moving": "DeepDiffRegPhantomMoving"}
SPACING_MM = 2.0


def sample_paths(folder: str) -> dict[str, str]:
    return {k: os.path.join(folder, v) for k, v in FILES.items()}


def ensure_sample_pair(folder: str, python: str, env: dict[str, str] | None = None,
                       timeout_s: float = 300.0) -> dict[str, str]:
    """The phantom pair's files in ``folder`` (made by the engine in a child process when absent)."""
    paths = sample_paths(folder)
    if all(os.path.isfile(p) for p in paths.values()):
        return paths
    os.makedirs(folder, exist_ok=True)
    code = (f"from deepdiffreg.sample_data import make_pair; make_pair({folder!r}, spacing_mm={SPACING_MM!r})")
    r = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=timeout_s)
    if r.returncode != 0 or not all(os.path.isfile(p) for p in paths.values()):
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit code {r.returncode}"]
        raise RuntimeError(f"could not make the sample pair: {tail[0]}")
    return paths
