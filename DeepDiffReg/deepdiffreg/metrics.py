"""Evaluation metrics: Dice per label, fold statistics, landmark TRE, inverse consistency.

Everything here is numpy on arrays already on a common grid (labels) or in LPS mm (points, fields).
"""
from __future__ import annotations

import numpy as np
import torch

from .field import jacobian_det, warp
from .frames import Geometry, vox_from_lps_disp


def dice_per_label(fixed_labels: np.ndarray, warped_labels: np.ndarray,
                   labels: list[int] | None = None) -> dict[int, float]:
    """Dice of each label (default: the non-zero labels present in the fixed segmentation)."""
    if fixed_labels.shape != warped_labels.shape:
        raise ValueError(f"dice_per_label(): shapes differ {fixed_labels.shape} vs {warped_labels.shape}")
    if labels is None:
        labels = [int(v) for v in np.unique(fixed_labels) if v != 0]
    out = {}
    for lab in labels:
        a, b = fixed_labels == lab, warped_labels == lab
        denom = a.sum() + b.sum()
        out[int(lab)] = float(2.0 * np.logical_and(a, b).sum() / denom) if denom else float("nan")
    return out


def dice_summary(per_label: dict[int, float]) -> dict:
    vals = [v for v in per_label.values() if np.isfinite(v)]
    return {"mean": float(np.mean(vals)) if vals else float("nan"), "num_labels": len(vals),
            "per_label": {str(k): round(v, 5) for k, v in per_label.items()}}


def jacobian_det_lps(disp_lps: np.ndarray, geom: Geometry) -> np.ndarray:
    """det(I + ∇u) of a physical displacement (K, J, I, 3) LPS mm on ``geom`` → (K, J, I) float64.

    Computed in the index frame (vectors rotated by Dᵀ and scaled by 1/spacing), so it is right on oblique,
    anisotropic grids; a pure translation gives 1 and an affine x ↦ Ax gives det A.
    """
    vox = torch.from_numpy(np.ascontiguousarray(vox_from_lps_disp(disp_lps, geom)))[None]
    return jacobian_det(vox, mode="central")[0].numpy()


def fold_stats(det: np.ndarray, foreground: np.ndarray | None = None) -> dict:
    """% of voxels with det ≤ 0 (overall and inside the foreground), min/max det, std of log det where det > 0."""
    folded = det <= 0
    pos = det[det > 0]
    out = {"num_voxels": int(det.size), "num_folded": int(folded.sum()),
           "percent_folded": float(100.0 * folded.mean()),
           "min_det": float(det.min()), "max_det": float(det.max()),
           "std_log_det": float(np.log(pos).std()) if pos.size else float("nan")}
    if foreground is not None and foreground.any():
        out["percent_folded_foreground"] = float(100.0 * folded[foreground > 0].mean())
    else:
        out["percent_folded_foreground"] = out["percent_folded"]
    return out


def tre_mm(points_a: np.ndarray, points_b: np.ndarray) -> dict:
    """Target registration error between corresponding (N, 3) point sets in mm."""
    d = np.linalg.norm(np.asarray(points_a, float) - np.asarray(points_b, float), axis=1)
    return {"mean": float(d.mean()), "median": float(np.median(d)), "max": float(d.max()),
            "per_point": [round(float(v), 4) for v in d]}


def inverse_consistency_vox(disp_vox: torch.Tensor, inverse_disp_vox: torch.Tensor) -> dict:
    """|(id+u)∘(id+w) − id| in voxels on the grid interior (a 10 % margin is dropped, where borders clamp)."""
    err = inverse_disp_vox + warp(disp_vox, inverse_disp_vox, padding="border")
    mag = err.norm(dim=1)[0]
    m = [max(1, int(0.1 * n)) for n in mag.shape]
    inner = mag[m[0]:-m[0], m[1]:-m[1], m[2]:-m[2]]
    return {"mean_vox": float(inner.mean()), "max_vox": float(inner.max())}
