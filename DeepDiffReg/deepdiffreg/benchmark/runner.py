"""Running the rows: each of our methods as a ``deepdiffreg register`` child process (the command users run), each
peer as its own child process (peers.py), one after another on the same pair, every child timed as a whole (start
to exit) and its peak memory measured by a small parent (``_measure.py``)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from . import analysis
from .peers import Peer
from .rows import MethodRow

MEASURE = Path(__file__).with_name("_measure.py")


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram_gb = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    ram_gb = round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    import torch
    return {"cpu_model": cpu, "cpu_count": os.cpu_count(), "ram_gb": ram_gb, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_start": [round(v, 2) for v in os.getloadavg()]}


def register_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("deepdiffreg")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "deepdiffreg"]


def spawn(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run ``cmd`` (stdout and stderr to ``log``) under ``_measure.py``: {"exit_code", "wall_s", "peak_rss_mb"}."""
    measured = log.with_suffix(".time.json")
    measured.unlink(missing_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(MEASURE), str(measured), *cmd], stdout=fh,
                                stderr=subprocess.STDOUT)
        try:
            proc.wait()
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
    if measured.exists():
        return json.loads(measured.read_text())
    return {"exit_code": proc.returncode, "wall_s": None, "peak_rss_mb": None}


def _voxels(rep: dict[str, Any]) -> dict[str, int | None]:
    """Voxels of the fixed image and of the working grid the method ran on (report.json), for the memory table."""
    def count(size):
        return int(np.prod(size)) if size else None
    return {"fixed": count(((rep.get("inputs") or {}).get("fixed") or {}).get("geometry", {}).get("size")),
            "working": count(((rep.get("preprocessing") or {}).get("working_grid") or {}).get("size"))}


def _file_mb(out_dir: Path, rep: dict[str, Any], key: str) -> float | None:
    """Size in MB of the result file ``key`` of report.json's ``files`` (None when absent)."""
    name = (rep.get("files") or {}).get(key)
    path = out_dir / name if name else None
    return round(path.stat().st_size / 2 ** 20, 1) if path is not None and path.exists() else None


def _error_of(log: Path, code: int) -> str:
    err = ""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("deepdiffreg: error:"):
            err = line[len("deepdiffreg: error:"):].strip()
    return err or f"exit code {code}; see {log}"


def _pair_args(pair: dict[str, Any]) -> list[str]:
    """The pair's files as register flags, then the flags the pair asks every method to run with
    (``register_args``, e.g. ``--no-align`` for a same-subject pair)."""
    out = []
    for key in ("fixed_seg", "moving_seg", "fixed_landmarks", "moving_landmarks"):
        if key in pair:
            out += [f"--{key.replace('_', '-')}", pair[key]]
    return out + list(pair.get("register_args", ()))


def run_method(pair: dict[str, Any], row: MethodRow, out_dir: Path, threads: int | None,
               quick: bool) -> dict[str, Any]:
    cmd = register_cmd() + ["register", "--fixed", pair["fixed"], "--moving", pair["moving"], "--out", str(out_dir),
                            "--overwrite"] + row.register_args(quick) + _pair_args(pair)
    # every method is measured on every pair, the contrast pair too: a one-contrast method's refusal (the engine's
    # default) would leave its row empty; its report.json records the check and the warning
    cmd += ["--contrast-check", "warn"]
    if threads:
        cmd += ["--threads", str(threads)]
    log = out_dir.with_suffix(".log")
    m = spawn(cmd, log)
    res: dict[str, Any] = {"pair": pair["name"], "method": row.label, "kind": "method", "method_name": row.method,
                           "variant": row.variant, "command": " ".join(cmd[len(register_cmd()):]),
                           "exit_code": m["exit_code"], "wall_s": m["wall_s"], "child_peak_rss_mb": m["peak_rss_mb"]}
    report_path = out_dir / "report.json"
    if m["exit_code"] != 0 or not report_path.exists():
        res.update(status="failed", error=_error_of(log, m["exit_code"]))
        return res
    rep = json.loads(report_path.read_text())
    res.update(status="ok", out_dir=str(out_dir), device=rep.get("device"),
               threads=rep.get("machine", {}).get("torch_threads"), model=rep.get("model"),
               timings_s=rep.get("timings_s"), engine_s=rep.get("timings_s", {}).get("total"),
               peak_memory_mb=rep.get("peak_memory_mb"), method_options=rep.get("method_options"),
               voxels=_voxels(rep), transform_mb=_file_mb(out_dir, rep, "transform"),
               folds={k: rep["folds"].get(k) for k in ("percent_folded", "percent_folded_foreground", "min_det",
                                                       "max_det", "std_log_det")},
               contrast_check=rep.get("contrast_check"))
    if "dice" in rep:
        res["dice"] = {k: {"mean": rep["dice"][k]["mean"], "num_labels": rep["dice"][k]["num_labels"]}
                       for k in ("before", "initial_alignment", "after")}
    if "tre_mm" in rep:
        res["tre_mm"] = {k: {kk: rep["tre_mm"][k][kk] for kk in ("mean", "median", "max", "per_point")}
                         for k in ("before", "initial_alignment", "after")}
    err_map = None
    if "true_transform" in pair:
        res["displacement_error"], err_map = analysis.displacement_error(pair, out_dir, rep)
    if rep.get("files", {}).get("uncertainty"):
        try:
            res["uncertainty_vs_error"] = analysis.uncertainty_vs_error(pair, out_dir, rep, err_map)
        except Exception as e:  # noqa: BLE001 — a metric failure must not lose the run's numbers
            res["uncertainty_vs_error"] = {"error": f"{type(e).__name__}: {e}"}
    return res


def run_peer(pair: dict[str, Any], peer: Peer, out_dir: Path, threads: int) -> dict[str, Any]:
    """One peer on one pair: its child process writes its transform (fixed → moving, an ITK file) and peer.json;
    Dice, TRE, folds and the displacement error are then computed here from that transform with the engine's
    metrics code (``analysis.evaluate_transform``), outside the timed process."""
    import shutil

    import SimpleITK as sitk
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    cmd = peer.command(pair, out_dir, threads)
    log = out_dir.with_suffix(".log")
    m = spawn(cmd, log)
    res: dict[str, Any] = {"pair": pair["name"], "method": peer.name, "kind": "peer", "call": peer.call,
                           "exit_code": m["exit_code"], "wall_s": m["wall_s"], "child_peak_rss_mb": m["peak_rss_mb"]}
    info_path = out_dir / "peer.json"
    if m["exit_code"] != 0 or not info_path.exists():
        res.update(status="failed", error=_error_of(log, m["exit_code"]))
        return res
    info = json.loads(info_path.read_text())
    t = info["timings_s"]
    try:
        transform = sitk.ReadTransform(str(out_dir / info["files"]["transform"]))
        ev = analysis.evaluate_transform(pair, {"before": sitk.Transform(), **peer.initial_part(transform),
                                                "after": transform})
    except Exception as e:  # noqa: BLE001 — one peer's unreadable result must not stop the run
        res.update(status="failed", error=f"scoring its transform failed: {type(e).__name__}: {e}")
        return res
    res.update(status="ok", out_dir=str(out_dir), device="cpu", threads=info.get("threads"),
               version=info.get("version"), timings_s=t, engine_s=t.get("total"),
               peak_memory_mb={"cpu": m["peak_rss_mb"]},
               folds={k: ev["folds"].get(k) for k in ("percent_folded", "percent_folded_foreground", "min_det",
                                                      "max_det", "std_log_det")})
    if "dice" in ev:
        res["dice"] = {k: {"mean": v["mean"], "num_labels": v["num_labels"]} for k, v in ev["dice"].items()}
    if "tre_mm" in ev:
        res["tre_mm"] = {k: {kk: v[kk] for kk in ("mean", "median", "max", "per_point")}
                         for k, v in ev["tre_mm"].items()}
    if "true_transform" in pair:
        res["displacement_error"], _ = analysis.displacement_error_of(pair, transform)
    return res
