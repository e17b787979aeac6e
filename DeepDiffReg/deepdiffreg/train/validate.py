"""Evaluate a learned method's weights on the fixed validation pairs (canonical grid, affine-aligned by the cache)
through the Method itself (orientation handling, grid resampling, symmetric inference, refinement, maps): Dice
before (= affine) / after, % folded voxels in the fixed brain, runtime; for a method with an uncertainty map, how it
relates to the registration error (label disagreement after warping, |f − m∘φ|); optionally other methods on the
same pairs in the same run (``compare``); on pairs whose true map is known (``disp_true``, e.g. same-subject pairs) the
displacement error against it.

    python -m deepdiffreg.train.validate --method M [WEIGHTS] [--cache DIR] [--set NAME=VALUE ...]
                                         [--compare OTHER ...] [--json OUT]

WEIGHTS (a run's best.pt/last.pt) goes to the method as its ``weights`` option (methods/learned.py), read and
hash-recorded by the registry's loader like an installed model; without it the installed model is used.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import contrast
from ..field import jacobian_det, warp
from ..frames import Geometry
from ..methods.base import PairOnGrid, get_method
from ..metrics import dice_per_label, pearson, spearman
from ..progress import dumps
from .cli import DEFAULT_CACHE
from .real_data import CANON_SPACING


def lps_2mm(shape) -> Geometry:
    """The canonical training grid's geometry (LPS-aligned array axes, 2 mm) for a (D, H, W) shape."""
    return Geometry((0.0, 0.0, 0.0), (CANON_SPACING,) * 3, (1, 0, 0, 0, 1, 0, 0, 0, 1), tuple(shape[::-1]))


def _dice(fl: torch.Tensor, ml: torch.Tensor, labels: list[int]) -> dict[int, float]:
    return dice_per_label(fl.cpu().numpy(), ml.cpu().numpy(), labels)


def _score(disp_vox: torch.Tensor, fl, ml, labels: list[int], brain: np.ndarray):
    """Moving labels warped (nearest) by ``disp_vox`` (1, 3, D, H, W), their per-label Dice against ``fl``, the %
    of ``brain`` voxels with det ≤ 0 and the number of folded voxels on the whole grid."""
    wl = warp(ml, disp_vox, mode="nearest")
    det = jacobian_det(disp_vox)[0].numpy()
    return (wl, _dice(fl, wl, labels), 100.0 * float((det[brain] <= 0).sum()) / brain.sum(),
            int((det <= 0).sum()))


def displacement_error(disp_vox: torch.Tensor, true_vox: torch.Tensor, brain: np.ndarray) -> dict[str, float]:
    """Where the true fixed → moving map is known (same-subject pairs, ``disp_true``): the mean over the fixed
    brain of |u − u_true| in mm (canonical 2 mm grid), the mean |u_true| (the error of doing nothing) and their
    ratio (the do-no-harm target of issue 18: ≤ 0.6)."""
    err = ((disp_vox - true_vox).norm(dim=1)[0].numpy()[brain] * CANON_SPACING).mean()
    true = (true_vox.norm(dim=1)[0].numpy()[brain] * CANON_SPACING).mean()
    return {"disp_err_mm": float(err), "disp_true_mm": float(true), "disp_err_ratio": float(err / max(true, 1e-12))}


def _run(method, pair: PairOnGrid):
    t0 = time.time()
    est = method.estimate(pair, torch.device("cpu"), lambda f, m: None)
    return est, time.time() - t0


def evaluate_method(method: str, weights: Path | str | None = None, cache: Path = DEFAULT_CACHE,
                    options: dict[str, Any] | None = None, compare: Sequence[str] = (),
                    pairs: list[dict] | None = None) -> dict[str, Any]:
    """Mean and per-pair numbers of ``method`` with ``weights`` (None: its installed model) and ``options``;
    ``compare``: other methods (default options) on the same pairs, their columns prefixed "<name>_" (dice,
    fold_pct_brain, seconds). ``pairs``: validation pairs (default: ``datasets.validation_pairs(cache)``)."""
    from .datasets import validation_pairs
    cls = get_method(method)
    opts = dict(options or {})
    if weights is not None:
        opts["weights"] = str(weights)
    m = cls(**opts)
    others = [get_method(c)() for c in compare]
    rows = []
    for p in (validation_pairs(cache) if pairs is None else pairs):
        geom = lps_2mm(tuple(p["fixed"].shape[2:]))
        pair = PairOnGrid(p["fixed"], p["moving"], geom)
        # the pipeline's contrast check, as `register` gives it to the method (PairOnGrid.contrast)
        pair.contrast = contrast.check(pair.fixed, pair.moving, None, m.contrasts(), geom.spacing_ijk)
        est, sec = _run(m, pair)
        fl, ml = p["fixed_labels"], p["moving_labels"]
        labels = sorted(set(torch.unique(fl).tolist()) & set(torch.unique(ml).tolist()) - {0})
        brain = (fl[0, 0] > 0).numpy()
        d0 = float(np.mean(list(_dice(fl, ml, labels).values())))
        wl, dl, fold_pct, n_folds = _score(est.disp_vox, fl, ml, labels, brain)
        row = {"pair": p["name"], "dice_affine": d0, "dice_after": float(np.mean(list(dl.values()))),
               "fold_pct_brain": fold_pct, "folds": n_folds, "seconds": round(sec, 2)}
        if p.get("disp_true") is not None:
            row.update(displacement_error(est.disp_vox, p["disp_true"], brain))
        for o in others:
            est_o, sec_o = _run(o, pair)
            _, dl_o, fold_o, _ = _score(est_o.disp_vox, fl, ml, labels, brain)
            row.update({f"{o.name}_dice": float(np.mean(list(dl_o.values()))), f"{o.name}_fold_pct_brain": fold_o,
                        f"{o.name}_seconds": round(sec_o, 2)})
            if p.get("disp_true") is not None:
                row.update({f"{o.name}_{k}": v for k, v in
                            displacement_error(est_o.disp_vox, p["disp_true"], brain).items() if k != "disp_true_mm"})
        if "uncertainty" in est.maps:
            row.update(_uncertainty_vs_error(est, p, wl, dl, labels, brain))
        if "refine_loss_start" in est.info:
            row["refine_loss"] = [est.info["refine_loss_start"], est.info["refine_loss_end"]]
        rows.append(row)
    keys = list(dict.fromkeys(k for r in rows for k in r if isinstance(r[k], float) and k != "unc_mm_where_mismatch"))
    summary = {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}   # over the pairs that have k
    ixi = [r for r in rows if r["pair"].startswith("ixi")]
    for k in ["dice_affine", "dice_after"] + [f"{o.name}_dice" for o in others]:
        summary[f"ixi_{k}"] = float(np.mean([r[k] for r in ixi])) if ixi else None
    model = est.model if rows else None
    return {"method": cls.name, "weights": str(weights) if weights is not None else
            (f"{model['id']} v{model.get('version')} (sha256 {model['sha256'][:12]})" if model else None),
            "options": m.options, "summary": summary, "pairs": rows}


def _uncertainty_vs_error(est, p: dict, wl, dl: dict[int, float], labels: list[int], brain: np.ndarray) -> dict:
    """Pearson r of the uncertainty map with the label mismatch (inside the brain) and, per label, of its mean with
    1 − Dice; Spearman ρ with |f − m∘φ|; the mean map where labels disagree / agree."""
    fl = p["fixed_labels"]
    unc_full = est.maps["uncertainty"].value()[0, 0].numpy()
    unc = unc_full[brain]
    mismatch = (wl != fl)[0, 0].numpy()[brain].astype(np.float64)
    interr = (warp(p["moving"], est.disp_vox) - p["fixed"]).abs()[0, 0].numpy()[brain]
    fl_np = fl[0, 0].numpy()
    per = [(1.0 - dl[l], float(unc_full[fl_np == l].mean())) for l in labels if l in dl]
    return {"corr_unc_per_label_1_minus_dice": pearson([a for a, _ in per], [b for _, b in per]) if len(per) > 2
            else float("nan"),
            "unc_mean_mm": float(unc.mean()),
            "corr_unc_label_mismatch": pearson(unc, mismatch),
            "spearman_unc_abs_intensity_error": spearman(unc, interr),
            "unc_mm_where_mismatch": float(unc[mismatch > 0].mean()) if mismatch.any() else None,
            "unc_mm_where_match": float(unc[mismatch == 0].mean())}


def _parse_set(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep:
            raise SystemExit(f"--set needs NAME=VALUE, got {it!r}")
        out[k.strip().replace("-", "_")] = v
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deepdiffreg.train.validate")
    ap.add_argument("weights", nargs="?", default=None, help="a weights file (default: the installed model)")
    ap.add_argument("--method", required=True, help="a learned method (`deepdiffreg methods`)")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE))
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a method option (its Options name, e.g. refine=50), checked by the method")
    ap.add_argument("--compare", nargs="*", default=[], metavar="METHOD",
                    help="other methods run on the same pairs in the same run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = evaluate_method(a.method, Path(a.weights) if a.weights else None, Path(a.cache), _parse_set(a.set),
                          a.compare)
    if a.json:
        Path(a.json).write_text(dumps(res, indent=1) + "\n")
    print(dumps(res["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
