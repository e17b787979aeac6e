"""The validation pairs of the learned methods: each learned method that is benchmarked with its default options
(and has weights) is also run on the fixed validation pairs of ``deepdiffreg train`` (held out from training),
beside a classical reference, in the same run — the training cache's own numbers, on its canonical grid.

``_evaluate`` is the one call into the training code's evaluator; everything else here reads its result in a
method-neutral form (``normalise``): {"method", "baseline", "weights", "pairs": [...], "summary": {...}} with the
per-pair keys dice_affine, dice, baseline_dice, fold_pct, baseline_fold_pct, seconds, baseline_seconds and, for
methods with an uncertainty map, corr_unc_label_mismatch, corr_unc_per_label_1_minus_dice.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..methods.base import Method


def _evaluate(cls: type[Method], cache: Path) -> dict[str, Any]:
    """Run the training evaluator for ``cls`` (installed weights, default options) and the classical reference
    methods (``caps.reference``) on the validation pairs of ``cache``."""
    from ..methods.base import all_methods
    from ..train.validate import evaluate_method
    refs = tuple(n for n, c in sorted(all_methods().items()) if c.caps.reference and not c.caps.learned)
    return normalise(evaluate_method(cls.name, None, cache, compare=refs), cls.name)


def compare(cls: type[Method], cache: str | None, threads: int | None) -> dict[str, Any]:
    """``cls`` and the classical reference on the validation pairs, in this process; or {"skipped": why}."""
    import torch

    from ..cli import default_threads
    from ..train.cli import DEFAULT_CACHE
    path = Path(cache) if cache else DEFAULT_CACHE
    if not (path / "grid.json").exists():
        return {"skipped": f"no training cache at {path} (it is built by `deepdiffreg train`)"}
    torch.set_num_threads(threads or default_threads())
    print(f"  validation pairs ({path}): {cls.name} and the classical reference", flush=True)
    t0 = time.perf_counter()
    res = _evaluate(cls, path)
    if "skipped" not in res:
        res["cache"], res["total_s"] = str(path), round(time.perf_counter() - t0, 1)
    return res


_OURS = {"dice_after": "dice", "fold_pct_brain": "fold_pct", "seconds": "seconds"}


def normalise(res: dict[str, Any], method: str) -> dict[str, Any]:
    """The evaluator's result (its baseline's numbers are keys ``<baseline>_dice``, ``<baseline>_fold_pct_brain``,
    ``<baseline>_seconds``) → the method-neutral form. A result already in that form is returned as it is."""
    if "baseline" in res:
        return res
    first = res["pairs"][0] if res.get("pairs") else res.get("summary", {})
    with_dice = {k[:-len("_dice")] for k in first if k.endswith("_dice")}
    with_time = {k[:-len("_seconds")] for k in first if k.endswith("_seconds")}
    baseline = next(iter(sorted(with_dice & with_time)), None)

    def conv(d: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            if k in _OURS:
                out[_OURS[k]] = v
            elif baseline and k.startswith(baseline + "_"):
                rest = k[len(baseline) + 1:]
                out["baseline_" + _OURS.get(rest, rest)] = v
            else:
                out[k] = v
        return out

    return {**{k: v for k, v in res.items() if k not in ("pairs", "summary")}, "method": method,
            "baseline": baseline, "pairs": [conv(p) for p in res.get("pairs", [])],
            "summary": conv(res.get("summary", {}))}


def as_list(v: Any, result: dict[str, Any]) -> list[dict[str, Any]]:
    """``result["validation"]`` as a list of normalised comparisons (a JSON of an earlier run holds one dict in
    the evaluator's own form; its method is the first learned method of that run)."""
    if not v:
        return []
    if isinstance(v, dict):
        v = [v]
    out = []
    for item in v:
        if "baseline" not in item:
            from ..methods.base import all_methods
            methods = all_methods()
            learned = [m for m in result["settings"].get("methods", []) if m in methods and methods[m].caps.learned]
            item = normalise(item, item.get("method") or (learned[0] if learned else "the learned method"))
        out.append(item)
    return out


def render(v: dict[str, Any]) -> list[str]:
    s, m, b = v["summary"], v["method"], v["baseline"]
    f = lambda x, fmt="{:.3f}": "—" if x is None else fmt.format(x)  # noqa: E731
    L = [f"### Validation pairs of the learned methods ({m} vs {b}, same run)", "",
         f"The fixed validation pairs of `deepdiffreg train` (`train/datasets.py: validation_pairs`): 6 pairs of "
         f"held-out IXI subjects affine-aligned by the training cache (alternately skull-stripped / whole head) and "
         f"2 synthetic pairs from the held-out label maps 15/16, on the 2 mm canonical grid; model {v['weights']}. "
         f"Dice: mean over the labels present in both label maps; folds: % of fixed-brain voxels with det ≤ 0; "
         f"uncertainty: Pearson r with the voxel-wise label mismatch, and per label with 1 − Dice.", "",
         f"| pair | Dice affine | {m} | {b} | {m} % folded | {b} % folded | {m} s | {b} s | "
         "r(unc, mismatch) | r(unc, 1−Dice per label) |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in v["pairs"]:
        L.append(f"| {r['pair']} | {f(r['dice_affine'])} | {f(r['dice'])} | {f(r.get('baseline_dice'))} | "
                 f"{f(r['fold_pct'], '{:.4f}')} | {f(r.get('baseline_fold_pct'), '{:.4f}')} | {f(r['seconds'], '{:.1f}')} | "
                 f"{f(r.get('baseline_seconds'), '{:.1f}')} | {f(r.get('corr_unc_label_mismatch'))} | "
                 f"{f(r.get('corr_unc_per_label_1_minus_dice'))} |")
    L.append(f"| **mean** | {f(s['dice_affine'])} | **{f(s['dice'])}** | **{f(s.get('baseline_dice'))}** | "
             f"{f(s['fold_pct'], '{:.4f}')} | {f(s.get('baseline_fold_pct'), '{:.4f}')} | {f(s['seconds'], '{:.1f}')} | "
             f"{f(s.get('baseline_seconds'), '{:.1f}')} | {f(s.get('corr_unc_label_mismatch'))} | "
             f"{f(s.get('corr_unc_per_label_1_minus_dice'))} |")
    L.append("")
    return L
