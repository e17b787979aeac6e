"""Evaluate VoxelMorph-diff weights on the fixed validation pairs (canonical grid, affine-aligned by the cache):
Dice before (= affine) / after, % folded voxels in the fixed brain, runtime, with and without refinement, and how
the uncertainty map relates to the registration error (label disagreement after warping, and |f − m∘φ|).

    python -m deepdiffreg.train.evaluate_vxm [WEIGHTS] [--cache DIR] [--refine N] [--demons] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..field import jacobian_det, warp
from ..frames import Geometry
from ..io.weights import _load_file
from ..methods.base import PairOnGrid
from ..methods.vxm_diff import VxmDiff
from .cli import DEFAULT_CACHE
from .datasets import validation_pairs
from .loop import dice_per_label

LPS_2MM = lambda shape: Geometry((0.0, 0.0, 0.0), (2.0, 2.0, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), tuple(shape[::-1]))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum() + 1e-12))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return _corr(np.argsort(np.argsort(a)).astype(np.float64), np.argsort(np.argsort(b)).astype(np.float64))


def evaluate_file(weights: Path | None, cache: Path, refine: int = 0, samples: int = 16,
                  uncertainty: str = "laplace", demons: bool = False, symmetric: bool = True) -> dict:
    """Mean and per-pair numbers of the weights file ``weights`` (None: the installed model the method uses by
    default, hash-checked by the registry); ``demons``: also run the demons method on the same pairs (Dice, folds,
    time), so that the two can be compared in one run."""
    import deepdiffreg.methods.vxm_diff as vm
    orig_find, orig_load = vm.find_model, vm.load_weights
    if weights is not None:          # a run's best.pt/last.pt, not in the registry: hand it to the method directly
        obj = _load_file(Path(weights))
        entry = {"id": Path(weights).stem, "sha256": "n/a", "version": "eval"}
        vm.find_model, vm.load_weights = (lambda *a, **k: entry), (lambda e: obj)
    else:
        entry = vm.find_model(None, method="vxm-diff")
        weights = f"{entry['id']} v{entry.get('version')} (sha256 {entry['sha256'][:12]})"
    rows = []
    try:
        for p in validation_pairs(cache):
            pair = PairOnGrid(p["fixed"], p["moving"], LPS_2MM(tuple(p["fixed"].shape[2:])))
            t0 = time.time()
            est = VxmDiff(refine=refine, uncertainty=uncertainty, uncertainty_samples=samples,
                          symmetric=symmetric).estimate(pair, torch.device("cpu"),
                                                                                lambda f, m: None)
            sec = time.time() - t0
            fl, ml = p["fixed_labels"], p["moving_labels"]
            labels = sorted(set(torch.unique(fl).tolist()) & set(torch.unique(ml).tolist()) - {0})
            brain = (fl[0, 0] > 0).numpy()
            d0 = float(np.mean(list(dice_per_label(fl, ml, labels).values())))
            wl, dl, fold_pct, n_folds = _score(est.disp_vox, fl, ml, labels, brain)
            d1 = float(np.mean(list(dl.values())))
            unc = est.maps["uncertainty"].data[0, 0].numpy()[brain]
            mismatch = (wl != fl)[0, 0].numpy()[brain].astype(np.float64)
            interr = (warp(p["moving"], est.disp_vox) - p["fixed"]).abs()[0, 0].numpy()[brain]
            unc_full = est.maps["uncertainty"].data[0, 0].numpy()
            fl_np = fl[0, 0].numpy()
            per = [(1.0 - dl[l], float(unc_full[fl_np == l].mean())) for l in labels if l in dl]
            per_label_corr = _corr(np.array([a for a, _ in per]), np.array([b for _, b in per])) if len(per) > 2 \
                else float("nan")
            rows.append({"pair": p["name"], "dice_affine": d0, "dice_after": d1,
                         "corr_unc_per_label_1_minus_dice": per_label_corr,
                         "fold_pct_brain": fold_pct, "folds": n_folds, "seconds": round(sec, 2),
                         **(_demons_row(pair, fl, ml, labels, brain) if demons else {}),
                         "unc_mean_mm": float(unc.mean()),
                         "corr_unc_label_mismatch": _corr(unc, mismatch),
                         "spearman_unc_abs_intensity_error": _spearman(unc, interr),
                         "unc_mm_where_mismatch": float(unc[mismatch > 0].mean()) if mismatch.any() else None,
                         "unc_mm_where_match": float(unc[mismatch == 0].mean()),
                         **({"refine_loss": [est.info["refine_loss_start"], est.info["refine_loss_end"]]}
                            if refine else {})})
    finally:
        vm.find_model, vm.load_weights = orig_find, orig_load
    keys = ["dice_affine", "dice_after", "fold_pct_brain", "seconds", "corr_unc_label_mismatch",
            "corr_unc_per_label_1_minus_dice",
            "spearman_unc_abs_intensity_error"]
    if demons:
        keys += ["demons_dice", "demons_fold_pct_brain", "demons_seconds"]
    summary = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    ixi = [r for r in rows if r["pair"].startswith("ixi")]
    summary["ixi_dice_affine"] = float(np.mean([r["dice_affine"] for r in ixi])) if ixi else None
    summary["ixi_dice_after"] = float(np.mean([r["dice_after"] for r in ixi])) if ixi else None
    if demons:
        summary["ixi_demons_dice"] = float(np.mean([r["demons_dice"] for r in ixi])) if ixi else None
    return {"weights": str(weights), "refine": refine, "uncertainty": uncertainty, "summary": summary, "pairs": rows}


def _demons_row(pair: PairOnGrid, fl, ml, labels, brain) -> dict:
    """The demons method (default settings) on the same pair and grid: Dice over the same labels, folds, time."""
    from ..methods.demons import Demons
    t0 = time.time()
    est = Demons().estimate(pair, torch.device("cpu"), lambda f, m: None)
    sec = time.time() - t0
    _, dl, fold_pct, _ = _score(est.disp_vox, fl, ml, labels, brain)
    return {"demons_dice": float(np.mean(list(dl.values()))), "demons_fold_pct_brain": fold_pct,
            "demons_seconds": round(sec, 2)}


def _score(disp_vox: torch.Tensor, fl: torch.Tensor, ml: torch.Tensor, labels: list[int], brain: np.ndarray):
    """Moving labels warped (nearest) by ``disp_vox`` (1, 3, D, H, W), their per-label Dice against ``fl``, the %
    of ``brain`` voxels with det ≤ 0 and the number of folded voxels on the whole grid."""
    wl = warp(ml, disp_vox, mode="nearest")
    det = jacobian_det(disp_vox)[0].numpy()
    return (wl, dice_per_label(fl, wl, labels), 100.0 * float((det[brain] <= 0).sum()) / brain.sum(),
            int((det <= 0).sum()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("weights", nargs="?", default=None, help="a weights file (default: the installed model)")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE))
    ap.add_argument("--refine", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--uncertainty", default="laplace", choices=("laplace", "sampled"))
    ap.add_argument("--demons", action="store_true", help="also run demons on the same pairs (same run)")
    ap.add_argument("--no-symmetric", action="store_true", help="forward network pass only (the paper)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = evaluate_file(Path(a.weights) if a.weights else None, Path(a.cache), a.refine, uncertainty=a.uncertainty, demons=a.demons,
                        symmetric=not a.no_symmetric)
    txt = json.dumps(res, indent=1)
    if a.json:
        Path(a.json).write_text(txt + "\n")
    print(json.dumps(res["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
