"""Peak memory per working-grid voxel of a method (not a test; what ``Capabilities.bytes_per_working_voxel`` of
nodeo, demons and vxm-diff declare, issue 19).

    python Testing/engine/measure_method_memory.py PAIR_DIR OUT_DIR METHOD [METHOD ...] [--spacings 2 3]

PAIR_DIR holds fixed/moving(.nii.gz) and fixed_seg/moving_seg; every method registers the pair once per working
spacing (default settings otherwise, each run its own ``deepdiffreg register`` process). The fixed image is the same
in every run, so what changes with the spacing is only what grows with the working grid: the slope of the measured
peak (report.json ``peak_memory_mb.cpu``, the register process's own VmHWM) against the number of working voxels is
the run's peak per working voxel. Prints one JSON line per run, then one per method with the slope in bytes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def run(pair: Path, out: Path, method: str, spacing: float) -> dict:
    res = out / f"{method}-{spacing:g}"
    cmd = [sys.executable, "-m", "deepdiffreg", "register", "--fixed", str(pair / "fixed.nii.gz"),
           "--moving", str(pair / "moving.nii.gz"), "--fixed-seg", str(pair / "fixed_seg.nii.gz"),
           "--moving-seg", str(pair / "moving_seg.nii.gz"), "--method", method, "--spacing", f"{spacing:g}",
           "--out", str(res), "--overwrite"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{method} at {spacing:g} mm failed: {p.stderr[-2000:]}")
    rep = json.loads((res / "report.json").read_text())
    n_work = int(np.prod(rep["preprocessing"]["working_grid"]["size"]))
    return {"method": method, "spacing_mm": spacing, "working_voxels": n_work,
            "peak_mb": rep["peak_memory_mb"]["cpu"], "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("pair", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("methods", nargs="+")
    ap.add_argument("--spacings", type=float, nargs="+", default=[2.0, 3.0])
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    for m in a.methods:
        rows = [run(a.pair, a.out, m, s) for s in a.spacings]
        for r in rows:
            print(json.dumps(r), flush=True)
        rows.sort(key=lambda r: r["working_voxels"])
        for a, b in zip(rows, rows[1:]):   # the slope between neighbouring sizes (it grows where the method's
            slope = (b["peak_mb"] - a["peak_mb"]) * 2 ** 20 / (b["working_voxels"] - a["working_voxels"])  # peak rules)
            print(json.dumps({"method": m, "between_mm": [b["spacing_mm"], a["spacing_mm"]],
                              "bytes_per_working_voxel": round(slope)}), flush=True)

if __name__ == "__main__":
    main()
