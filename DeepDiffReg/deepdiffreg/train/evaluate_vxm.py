"""Deprecated: use ``train/validate.py`` (``evaluate_method``, ``python -m deepdiffreg.train.validate --method M``).

Kept, as a thin alias with the old signature, only because benchmark.py (being split into a package in parallel)
still imports ``evaluate_file`` from here; delete this file once it calls ``validate.evaluate_method``. It is the one
place under train/ that refers to particular methods (by their classes).
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..methods.demons import Demons
from ..methods.vxm_diff import VxmDiff      # the learned method this old entry point evaluates (read by callers)
from .validate import evaluate_method


def evaluate_file(weights: Path | None, cache: Path, refine: int = 0, samples: int = 16,
                  uncertainty: str = "laplace", demons: bool = False, symmetric: bool = True) -> dict:
    """``validate.evaluate_method`` for VoxelMorph-diff, with demons on the same pairs when ``demons``."""
    return evaluate_method(VxmDiff.name, weights, cache,
                           options={"refine": refine, "uncertainty": uncertainty, "uncertainty_samples": samples,
                                    "symmetric": symmetric},
                           compare=(Demons.name,) if demons else ())


if __name__ == "__main__":
    from .validate import main
    raise SystemExit(main(["--method", VxmDiff.name, *sys.argv[1:]]))
