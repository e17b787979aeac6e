"""Fold QA and the Dice/TRE table, from arrays and report.json (numpy only, no MRML, no Qt).

Conventions: arrays are in SimpleITK/numpy order (k, j, i); ``ijk_to_ras`` is the 4x4 IJK->RAS matrix of the grid
(``vtkMRMLVolumeNode.GetIJKToRASMatrix``), so positions returned here are RAS millimetres, ready for the views.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

FOLD_THRESHOLD = 0.0  # a voxel folds where det(J) <= this


@dataclass
class FoldSummary:
    num_folded: int
    num_voxels: int
    percent_folded: float
    min_det: float
    max_det: float
    worst_ijk: tuple[int, int, int] | None     # (i, j, k) of the smallest det(J)
    worst_ras: tuple[float, float, float] | None

    @property
    def has_folds(self) -> bool:
        return self.num_folded > 0

    def text(self) -> str:
        if self.num_voxels == 0:
            return "No Jacobian."
        if not self.has_folds:
            return f"No folds (min det J = {self.min_det:.3g})."
        return (f"{self.num_folded} folded voxels ({self.percent_folded:.3g} %), min det J = {self.min_det:.3g}")


def fold_mask(jac_kji: np.ndarray, threshold: float = FOLD_THRESHOLD) -> np.ndarray:
    """uint8 (k, j, i) mask, 1 where det(J) <= threshold (NaN counts as folded: the map is not invertible there)."""
    jac = np.asarray(jac_kji)
    if jac.ndim != 3:
        raise ValueError(f"fold_mask() 'jac_kji' must be 3-D (k, j, i), got shape {jac.shape}")
    return ((jac <= threshold) | ~np.isfinite(jac)).astype(np.uint8)


def ijk_to_ras_point(ijk_to_ras: np.ndarray, ijk) -> tuple[float, float, float]:
    p = np.asarray(ijk_to_ras, float) @ np.array([*map(float, ijk), 1.0])
    return (float(p[0]), float(p[1]), float(p[2]))


def summarize_folds(jac_kji: np.ndarray, ijk_to_ras: np.ndarray, threshold: float = FOLD_THRESHOLD) -> FoldSummary:
    """Fold count/percentage and the location of the worst fold (smallest det J) in RAS."""
    jac = np.asarray(jac_kji, dtype=np.float64)
    mask = fold_mask(jac, threshold)
    n = int(mask.sum())
    finite = np.where(np.isfinite(jac), jac, -np.inf)
    if jac.size == 0:
        return FoldSummary(0, 0, 0.0, float("nan"), float("nan"), None, None)
    k, j, i = np.unravel_index(int(np.argmin(finite)), jac.shape)
    worst_ijk = (int(i), int(j), int(k))
    return FoldSummary(
        num_folded=n, num_voxels=int(jac.size), percent_folded=100.0 * n / jac.size,
        min_det=float(np.nanmin(jac)) if np.isfinite(jac).any() else float("nan"),
        max_det=float(np.nanmax(jac)) if np.isfinite(jac).any() else float("nan"),
        worst_ijk=worst_ijk if n else worst_ijk, worst_ras=ijk_to_ras_point(ijk_to_ras, worst_ijk))


def read_report(result_dir: str) -> dict[str, Any]:
    path = os.path.join(result_dir, "report.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def metrics_table(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows (quantity, before, after, unit) for the panel's Dice/TRE table; empty when neither was computed.

    Dice: the mean, then one row per label; TRE: mean and max over the landmarks.
    """
    rows: list[tuple[str, str, str, str]] = []

    def fmt(v, digits=3):
        return "" if v is None else f"{float(v):.{digits}f}"

    dice = report.get("dice") or {}
    if dice:
        before, after = dice.get("before") or {}, dice.get("after") or {}
        rows.append(("Dice (mean)", fmt(before.get("mean")), fmt(after.get("mean")), ""))
        labels = sorted(set((before.get("per_label") or {})) | set((after.get("per_label") or {})),
                        key=lambda s: (len(str(s)), str(s)))
        for lab in labels:
            rows.append((f"Dice label {lab}", fmt((before.get("per_label") or {}).get(lab)),
                         fmt((after.get("per_label") or {}).get(lab)), ""))
    tre = report.get("tre_mm") or {}
    if tre:
        before, after = tre.get("before") or {}, tre.get("after") or {}
        rows.append(("TRE (mean)", fmt(before.get("mean"), 2), fmt(after.get("mean"), 2), "mm"))
        rows.append(("TRE (max)", fmt(before.get("max"), 2), fmt(after.get("max"), 2), "mm"))
    return rows


def report_summary_lines(report: dict[str, Any]) -> list[str]:
    """Short human-readable lines: method/model, device, total time, fold statistics."""
    lines = []
    model = report.get("model") or {}
    m = report.get("method", "?")
    if model:
        m += f" (model {model.get('id', '?')} v{model.get('version', '?')})"
    lines.append(f"Method: {m}")
    lines.append(f"Device: {report.get('device', '?')}")
    total = (report.get("timings_s") or {}).get("total")
    if total is not None:
        lines.append(f"Time: {float(total):.1f} s")
    folds = report.get("folds") or {}
    if folds:
        lines.append(f"Folds: {folds.get('num_folded', '?')} voxels ({float(folds.get('percent_folded', 0.0)):.3g} %),"
                     f" min det J = {float(folds.get('min_det', float('nan'))):.3g}")
    return lines
