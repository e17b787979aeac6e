"""Numbers computed from a finished run: the peers' Dice / TRE / folds from their transform (the engine's metrics
code, as for our methods), the displacement error against a known map, the uncertainty-vs-error correlation,
the means over pairs, every row's wall time as a ratio to the reference peer's, and the stage profile."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..metrics import rankdata as _rankdata, spearman  # noqa: F401  (re-exported by the package)

ERROR_SIGMA_MM = 2.0          # smoothing of the local error maps for the uncertainty correlation
MAX_CORR_VOXELS = 400_000     # voxels sampled (seeded) for the rank correlation
# Stages of report.json ``timings_s`` in run order (pipeline.py); "register" is the network / optimisation.
STAGES = ("load", "align", "preprocess", "register", "write")


def _get(row, *keys):
    for k in keys:
        if not isinstance(row, dict) or k not in row:
            return None
        row = row[k]
    return row


# ------------------------------------------------------------------------------------------------------------
# a transform T (fixed → moving points) evaluated the way the register command evaluates its own result

def displacement_of(transform, reference):
    """T(x) − x (float64 vectors, LPS mm) on ``reference``'s grid."""
    import SimpleITK as sitk
    f = sitk.TransformToDisplacementFieldFilter()
    f.SetReferenceImage(reference)
    f.SetOutputPixelType(sitk.sitkVectorFloat64)
    return f.Execute(transform)


def evaluate_transform(pair: dict[str, Any], transforms: dict[str, Any]) -> dict[str, Any]:
    """Dice (labels present in both segmentations, moving labels resampled nearest-neighbour onto the fixed grid)
    and landmark TRE for each named fixed → moving transform, and the fold statistics of ``transforms["after"]``
    on the fixed grid (det ∇T via ``metrics.jacobian_det_lps``; the foreground is the automatic one of the register
    command, ``preprocess.foreground_mask``, computed only when a voxel folds). Same definitions as report.json."""
    import SimpleITK as sitk
    import torch

    from ..frames import Geometry
    from ..io.images import read_image, read_landmarks, read_segmentation
    from ..metrics import fold_stats, jacobian_det_lps
    from ..pipeline import evaluate_transforms
    from ..preprocess import foreground_mask
    fixed = read_image(pair["fixed"], "fixed image")
    fs = ms = fp = mp = None
    if "fixed_seg" in pair and "moving_seg" in pair:
        fs = read_segmentation(pair["fixed_seg"], fixed, "fixed segmentation")
        ms = read_segmentation(pair["moving_seg"], read_image(pair["moving"], "moving image"), "moving segmentation")
    if "fixed_landmarks" in pair and "moving_landmarks" in pair:
        fp = read_landmarks(pair["fixed_landmarks"], "fixed landmarks")
        mp = read_landmarks(pair["moving_landmarks"], "moving landmarks")
    # report.json's own evaluation; the peer's rows keep only the per-transform entries (no label list, no
    # definition string), as before
    ev = evaluate_transforms(transforms, fixed, fs, ms, fp, mp)
    out: dict[str, Any] = {key: {name: v for name, v in ev[key].items() if name in transforms}
                           for key in ("dice", "tre_mm") if key in ev}
    disp = displacement_of(transforms["after"], fixed)
    det = jacobian_det_lps(sitk.GetArrayViewFromImage(disp), Geometry.of(fixed), dtype=torch.float32)
    fg = sitk.GetArrayFromImage(foreground_mask(fixed)) if (det <= 0).any() else None
    out["folds"] = fold_stats(det, fg)
    return out


def displacement_error_of(pair: dict[str, Any], transform) -> tuple[dict[str, Any], np.ndarray]:
    """|T_est(x) − T_true(x)| in mm over the fixed brain (fixed label > 0); returns (summary, error map).

    The summary also holds ``true_mean_mm``, the mean |T_true(x) − x| (the error of doing nothing, the identity),
    and ``ratio_to_identity`` = mean error / true_mean_mm: below 1 the method did better than doing nothing
    (the do-no-harm ratio of same-subject pairs)."""
    import SimpleITK as sitk
    fixed = sitk.ReadImage(pair["fixed"], sitk.sitkFloat32)
    field = lambda t: sitk.GetArrayFromImage(displacement_of(t, fixed))  # noqa: E731
    true = field(sitk.ReadTransform(str(pair["true_transform"])))
    err = np.linalg.norm(field(transform) - true, axis=-1)
    region = sitk.GetArrayFromImage(sitk.ReadImage(pair["fixed_seg"])) > 0
    e = err[region]
    true_mean = float(np.linalg.norm(true[region], axis=-1).mean())
    return ({"mean_mm": round(float(e.mean()), 4), "median_mm": round(float(np.median(e)), 4),
             "p95_mm": round(float(np.percentile(e, 95)), 4), "voxels": int(e.size),
             "true_mean_mm": round(true_mean, 4),
             "ratio_to_identity": round(float(e.mean()) / true_mean, 4) if true_mean > 0 else None}, err)


def displacement_error(pair: dict[str, Any], out_dir: Path, report: dict) -> tuple[dict[str, Any], np.ndarray]:
    """``displacement_error_of`` the transform file a result folder's report.json names."""
    import SimpleITK as sitk
    return displacement_error_of(pair, sitk.ReadTransform(str(Path(out_dir) / report["files"]["transform"])))


# ------------------------------------------------------------------------------------------------------------
# uncertainty vs error

UNCERTAINTY_DEFINITION = (
    "Spearman rank correlation, over the voxels of the fixed brain region (fixed label > 0 or warped moving label > 0; "
    "without labels: fixed intensity above 5 % of its 99th percentile; at most 400 000 voxels, seeded sample), "
    "between uncertainty.nii.gz (the method's uncertainty map, e.g. a posterior std of the displacement in mm; its "
    "unit is in report.json `maps`) and a local error map on the fixed grid: "
    "ρ_label — the label disagreement 1[fixed label ≠ warped moving label] (warped_seg.nii.gz) smoothed with a "
    f"Gaussian of σ {ERROR_SIGMA_MM:g} mm; ρ_intensity — |fixed − warped| after scaling each image to [0, 1] by its "
    f"0.5/99.5 percentiles in the region, smoothed the same way. u_ratio = mean uncertainty where the labels disagree "
    "/ where they agree. Positive values mean the map is higher where the registration error is higher.")
def uncertainty_vs_error(pair: dict[str, Any], out_dir: Path, report: dict,
                         displacement_err: np.ndarray | None = None) -> dict[str, Any]:
    import SimpleITK as sitk
    read = lambda p: sitk.ReadImage(str(p), sitk.sitkFloat32)  # noqa: E731
    fixed = read(pair["fixed"])
    arr = lambda im: sitk.GetArrayFromImage(im)  # noqa: E731
    unc = arr(read(out_dir / report["files"]["uncertainty"]))
    warped = arr(read(out_dir / report["files"]["warped"]))
    f = arr(fixed)
    smooth = lambda a: arr(sitk.SmoothingRecursiveGaussian(_like(a, fixed), ERROR_SIGMA_MM))  # noqa: E731
    out: dict[str, Any] = {"definition": UNCERTAINTY_DEFINITION}
    lab_err = None
    if "fixed_seg" in pair and report.get("files", {}).get("warped_seg"):
        fl = sitk.GetArrayFromImage(sitk.ReadImage(pair["fixed_seg"]))
        wl = sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / report["files"]["warped_seg"])))
        region = (fl > 0) | (wl > 0)
        disagree = (fl != wl) & region
        lab_err = smooth(disagree.astype(np.float32))
    else:
        region = f > 0.05 * np.percentile(f, 99)
        disagree = None

    def norm(a):
        lo, hi = np.percentile(a[region], [0.5, 99.5])
        return np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1)

    int_err = smooth(np.abs(norm(f) - norm(warped)).astype(np.float32))
    idx = np.flatnonzero(region.ravel())
    if idx.size > MAX_CORR_VOXELS:
        idx = np.sort(np.random.default_rng(0).choice(idx, MAX_CORR_VOXELS, replace=False))
    u = unc.ravel()[idx]
    out["voxels"] = int(idx.size)
    out["uncertainty_mean_mm"] = float(u.mean())
    out["rho_intensity"] = round(spearman(u, int_err.ravel()[idx]), 4)
    if displacement_err is not None:  # the real error, where the true map is known (known-N pairs)
        out["rho_displacement"] = round(spearman(u, displacement_err.ravel()[idx]), 4)
    if lab_err is not None:
        out["rho_label"] = round(spearman(u, lab_err.ravel()[idx]), 4)
        dis = disagree.ravel()[idx]
        if dis.any() and (~dis).any():
            out["u_ratio_disagree_agree"] = round(float(u[dis].mean() / max(u[~dis].mean(), 1e-12)), 4)
            out["label_disagreement_fraction"] = round(float(dis.mean()), 4)
    return out


def _like(a: np.ndarray, ref):
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(a.astype(np.float32))
    img.CopyInformation(ref)
    return img




# ------------------------------------------------------------------------------------------------------------
# means over pairs, ratios to the reference peer, stage profile

def stage_profile(row: dict[str, Any]) -> dict[str, Any]:
    """Seconds per stage of one run: the engine's stages (report.json ``timings_s``; a stage given as a dict of
    parts counts its "total", or the sum of its parts), ``startup_exit`` = wall − engine total (interpreter start,
    imports, exit), and ``parts`` = {stage: {part: s}} for stages recorded part by part (e.g. each output written:
    ``timings_s["write_parts"]`` or ``timings_s["write"] = {...}``). The wait for a map made beside the write stage
    (``timings_s["maps_beside_write_parts"]``, its "… (waited for)" parts) counts as "register", not "write"."""
    t = row.get("timings_s") or {}
    out: dict[str, Any] = {}
    parts: dict[str, dict[str, float]] = {}
    for key, v in t.items():
        if isinstance(v, dict):
            stage = key[:-len("_parts")] if key.endswith("_parts") else key
            parts[stage] = {k: float(x) for k, x in v.items() if k != "total" and isinstance(x, (int, float))}
            if key == stage:
                out[stage] = float(v.get("total", sum(parts[stage].values())))
        elif isinstance(v, (int, float)) and key != "total":
            out[key] = float(v)
    # a map the method made on a helper beside the write stage (vxm-diff's uncertainty): the wait for it is the
    # method's work, not the write stage's — it moves from "write" to "register" (the stages still add up)
    waited = sum(v for k, v in parts.get("maps_beside_write", {}).items() if k.endswith("(waited for)"))
    if waited and "write" in out and "register" in out:
        out["write"] = round(out["write"] - waited, 3)
        out["register"] = round(out["register"] + waited, 3)
    engine = row.get("engine_s")
    if engine is not None and row.get("wall_s") is not None:
        out["startup_exit"] = round(float(row["wall_s"]) - float(engine), 3)
    if parts:
        out["parts"] = parts
    return out


def add_ratios(rows: list[dict[str, Any]], reference: str) -> None:
    """Every ok row gets ``wall_ratio_to_reference`` = its wall time / the reference row's on the same pair."""
    ref = {r["pair"]: r["wall_s"] for r in rows if r["method"] == reference and r["status"] == "ok"}
    for r in rows:
        if r["status"] == "ok" and ref.get(r["pair"]):
            r["wall_ratio_to_reference"] = round(r["wall_s"] / ref[r["pair"]], 4)


def summarise(rows: list[dict[str, Any]], labels: list[str], reference: str | None = None) -> list[dict[str, Any]]:
    """Means over the pairs each row label ran on (Dice over pairs with labels, TRE over pairs with landmarks).
    ``wall_ratio_to_reference``: the label's mean wall time / the reference's mean wall time over the pairs both
    ran on. ``stages_s``: mean seconds per stage."""
    out = []
    ref = {r["pair"]: r["wall_s"] for r in rows if r["method"] == reference and r["status"] == "ok"}
    for m in labels:
        ok = [r for r in rows if r["method"] == m and r["status"] == "ok"]
        if not ok:
            continue
        mean = lambda vals: float(np.mean(vals)) if vals else None  # noqa: E731
        dice = [r for r in ok if "dice" in r]
        tre = [r for r in ok if "tre_mm" in r]
        rho = [_get(r, "uncertainty_vs_error", "rho_label") for r in ok]
        rho = [v for v in rho if v is not None]
        both = [r for r in ok if r["pair"] in ref]
        profiles = [stage_profile(r) for r in ok]
        stages = {}
        for k in (*STAGES, "startup_exit"):
            vals = [p[k] for p in profiles if k in p]
            if vals:
                stages[k] = mean(vals)
        out.append({"method": m, "kind": ok[0].get("kind", "method"), "pairs": len(ok),
                    "pairs_with_labels": len(dice), "pairs_with_landmarks": len(tre),
                    "dice_before": mean([r["dice"]["before"]["mean"] for r in dice]),
                    "dice_initial_alignment": mean([r["dice"]["initial_alignment"]["mean"] for r in dice
                                                    if "initial_alignment" in r["dice"]]),
                    "dice_after": mean([r["dice"]["after"]["mean"] for r in dice]),
                    "tre_before_mm": mean([r["tre_mm"]["before"]["mean"] for r in tre]),
                    "tre_after_mm": mean([r["tre_mm"]["after"]["mean"] for r in tre]),
                    "percent_folded": mean([r["folds"]["percent_folded"] for r in ok]),
                    "percent_folded_foreground": mean([r["folds"]["percent_folded_foreground"] for r in ok]),
                    "std_log_det": mean([r["folds"]["std_log_det"] for r in ok]),
                    "wall_s": mean([r["wall_s"] for r in ok]),
                    "engine_s": mean([r["engine_s"] for r in ok if r.get("engine_s") is not None]),
                    "wall_ratio_to_reference": (mean([r["wall_s"] for r in both]) / mean([ref[r["pair"]] for r in both])
                                                if both else None),
                    "stages_s": stages,
                    "peak_memory_mb_max": max(_get(r, "peak_memory_mb", "cpu") or 0 for r in ok),
                    "rho_label_mean": mean(rho)})
    return out
