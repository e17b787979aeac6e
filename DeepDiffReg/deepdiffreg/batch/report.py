"""The batch's QA summary: ``summary.csv``, ``summary.json``, ``summary.md`` and ``qa_montage.png`` in OUT.

One row per pair: status, Dice, TRE, folds, min det J, time, peak memory, device, worker. Rows are sorted worst
first (failed, then most folded, then lowest Dice after), and flagged pairs are listed on their own in the
markdown, so a person finds the bad pairs at a glance. The montage shows, for the worst pairs, the middle slice of
the fixed image, of the warped moving image and of det J (needs matplotlib; skipped without it).
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import time
from typing import Any

from .. import __version__
from .request import read_json, strict_json

COLUMNS = ("id", "status", "flags", "resumed", "exit_code", "error", "attempts", "dice_before",
           "dice_initial_alignment", "dice_after", "tre_before_mm", "tre_after_mm", "percent_folded",
           "percent_folded_foreground", "min_det", "seconds", "peak_memory_cpu_mb", "peak_memory_gpu_mb", "device",
           "worker", "host", "out_dir")


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _rounded(x: Any, n: int) -> Any:
    return round(float(x), n) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def row_from_report(out: str, pair_id: str) -> dict[str, Any]:
    """The metrics of OUT/<id>/report.json (empty dict when there is none)."""
    r = read_json(os.path.join(out, pair_id, "report.json"))
    if r is None:
        return {}
    return {"dice_before": _rounded(_get(r, "dice", "before", "mean"), 4),
            "dice_initial_alignment": _rounded(_get(r, "dice", "initial_alignment", "mean"), 4),
            "dice_after": _rounded(_get(r, "dice", "after", "mean"), 4),
            "tre_before_mm": _rounded(_get(r, "tre_mm", "before", "mean"), 3),
            "tre_after_mm": _rounded(_get(r, "tre_mm", "after", "mean"), 3),
            "percent_folded": _rounded(_get(r, "folds", "percent_folded"), 5),
            "percent_folded_foreground": _rounded(_get(r, "folds", "percent_folded_foreground"), 5),
            "min_det": _rounded(_get(r, "folds", "min_det"), 4),
            "seconds": _rounded(_get(r, "timings_s", "total"), 2),
            "peak_memory_cpu_mb": _rounded(_get(r, "peak_memory_mb", "cpu"), 1),
            "peak_memory_gpu_mb": _rounded(_get(r, "peak_memory_mb", "gpu"), 1),
            "device": r.get("device")}


def add_flags(rows: list[dict[str, Any]], fold_threshold_pct: float) -> None:
    """Set each row's ``flags``: failed, cancelled, folded (> threshold % of voxels), dice_dropped (lower after
    than after the initial alignment), dice_outlier (below the cohort median by > 3 MAD), tre_increased."""
    dice = [r["dice_after"] for r in rows if r.get("status") == "ok" and r.get("dice_after") is not None]
    low = None
    if len(dice) >= 5:
        med = statistics.median(dice)
        mad = statistics.median(abs(d - med) for d in dice)
        low = med - 3 * 1.4826 * mad if mad > 0 else None
    for r in rows:
        flags = []
        if r.get("status") in ("failed", "cancelled", "not_run"):
            flags.append(r["status"])
        folded = r.get("percent_folded_foreground")
        folded = r.get("percent_folded") if folded is None else folded
        if folded is not None and folded > fold_threshold_pct:
            flags.append("folded")
        da, di = r.get("dice_after"), r.get("dice_initial_alignment")
        if da is not None and di is not None and da < di:
            flags.append("dice_dropped")
        if da is not None and low is not None and da < low:
            flags.append("dice_outlier")
        ta, tb = r.get("tre_after_mm"), r.get("tre_before_mm")
        if ta is not None and tb is not None and ta > tb:
            flags.append("tre_increased")
        r["flags"] = flags


def _badness(r: dict[str, Any]) -> tuple:
    status_rank = {"failed": 0, "cancelled": 1, "not_run": 2}.get(r.get("status"), 3)
    folded = r.get("percent_folded_foreground")
    folded = r.get("percent_folded") if folded is None else folded
    dice = r.get("dice_after")
    return (status_rank, -len(r.get("flags") or []), -(folded or 0.0), dice if dice is not None else 2.0, r["id"])


def write_summary(out: str, rows: list[dict[str, Any]], meta: dict[str, Any], fold_threshold_pct: float,
                  montage_max: int) -> dict[str, str]:
    """Write the four summary files; returns {kind: path}."""
    add_flags(rows, fold_threshold_pct)
    rows = sorted(rows, key=_badness)
    paths = {k: os.path.join(out, f) for k, f in (("csv", "summary.csv"), ("json", "summary.json"),
                                                   ("md", "summary.md"))}
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    counts["flagged"] = sum(1 for r in rows if r["flags"])
    montage = _montage(out, [r for r in rows if r["status"] == "ok"][:montage_max], montage_max)
    if montage:
        paths["montage"] = montage
    doc = {"engine_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           **meta, "fold_threshold_percent": fold_threshold_pct, "counts": counts,
           "files": {k: os.path.basename(v) for k, v in paths.items()}, "pairs": rows}
    _atomic_text(paths["json"], json.dumps(strict_json(doc), indent=2, allow_nan=False) + "\n")
    lines = []
    for r in rows:
        cells = {c: r.get(c) for c in COLUMNS}
        cells["flags"] = " ".join(r["flags"])
        lines.append({c: "" if v is None else v for c, v in cells.items()})
    tmp = paths["csv"] + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(lines)
    os.replace(tmp, paths["csv"])
    _atomic_text(paths["md"], _markdown(rows, doc, montage))
    return paths


def _atomic_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "–"
    return format(v, spec) if spec and isinstance(v, (int, float)) else str(v)


def _markdown(rows: list[dict[str, Any]], doc: dict[str, Any], montage: str | None) -> str:
    c = doc["counts"]
    out = ["# Batch registration summary", "",
           f"{len(rows)} pairs: " + ", ".join(f"{n} {k}" for k, n in c.items() if k != "flagged") +
           f"; {c['flagged']} flagged. Method `{doc.get('method')}`, register arguments "
           f"`{' '.join(doc.get('register_args') or []) or '(defaults)'}`, engine {doc['engine_version']}, "
           f"{doc['created']}.", ""]
    head = "| pair | status | flags | Dice init → after | TRE before → after (mm) | % folded (foreground) | min det J | s | worker |"
    sep = "|---|---|---|---|---|---|---|---|---|"

    def table(rs):
        t = [head, sep]
        for r in rs:
            folded = r.get("percent_folded_foreground")
            folded = r.get("percent_folded") if folded is None else folded
            status = r["status"] + (" (earlier run)" if r.get("resumed") else "")
            if r["status"] != "ok":
                status += f", exit {_fmt(r.get('exit_code'))}: {(r.get('error') or '').replace('|', '/')}"
            t.append(f"| {r['id']} | {status} | {' '.join(r['flags'])} | {_fmt(r.get('dice_initial_alignment'), '.3f')}"
                     f" → {_fmt(r.get('dice_after'), '.3f')} | {_fmt(r.get('tre_before_mm'), '.2f')} → "
                     f"{_fmt(r.get('tre_after_mm'), '.2f')} | {_fmt(folded, '.4f')} | {_fmt(r.get('min_det'), '.3f')}"
                     f" | {_fmt(r.get('seconds'), '.1f')} | {_fmt(r.get('worker'))} |")
        return t

    flagged = [r for r in rows if r["flags"]]
    out += ["## Flagged pairs", ""] + (table(flagged) if flagged else ["None."]) + [""]
    if montage:
        out += ["## QA montage (worst first: fixed | warped moving | det J)", "",
                f"![QA montage]({os.path.basename(montage)})", ""]
    out += ["## All pairs (worst first)", ""] + table(rows) + [""]
    return "\n".join(out)


def _montage(out: str, rows: list[dict[str, Any]], montage_max: int) -> str | None:
    """qa_montage.png: per pair the middle slice of fixed | warped moving | det J. None when not drawable."""
    path = os.path.join(out, "qa_montage.png")
    if not rows or montage_max <= 0:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        import SimpleITK as sitk
    except ImportError:
        return None
    fig, axes = plt.subplots(len(rows), 3, figsize=(6.6, 2.3 * len(rows)), squeeze=False)
    for ax_row, r in zip(axes, rows):
        folder = os.path.join(out, r["id"])
        report = read_json(os.path.join(folder, "report.json")) or {}
        fixed_path = _get(report, "inputs", "fixed", "path")
        images = []
        for p in (fixed_path, os.path.join(folder, "warped.nii.gz"), os.path.join(folder, "jacobian.nii.gz")):
            try:
                a = sitk.GetArrayFromImage(sitk.ReadImage(p))
                images.append(a[a.shape[0] // 2] if a.ndim == 3 else a)
            except Exception:  # noqa: BLE001 — an unreadable image shows as an empty tile
                images.append(None)
        for k, (ax, img) in enumerate(zip(ax_row, images)):
            ax.set_axis_off()
            if img is None:
                continue
            if k < 2:
                lo, hi = np.percentile(img, (1, 99)) if img.size else (0, 1)
                ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower")
            else:
                ax.imshow(img, cmap="RdBu_r", vmin=0.0, vmax=2.0, origin="lower")
        fg = r.get("percent_folded_foreground") is not None
        folded = r.get("percent_folded_foreground") if fg else r.get("percent_folded")
        dice = "" if r.get("dice_after") is None else f", Dice {r['dice_after']:.3f}"
        flags = f"  [{' '.join(r['flags'])}]" if r.get("flags") else ""
        ax_row[0].set_title(f"{r['id']}{dice}{flags}", fontsize=8, loc="left")
        ax_row[2].set_title(f"det J; folded {_fmt(folded, '.4f')} %{' (fg)' if fg else ''}", fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path
