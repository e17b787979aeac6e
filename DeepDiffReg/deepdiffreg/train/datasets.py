"""Training mixtures and the fixed validation pairs, on the canonical training grid (see real_data.py), and a
generated phantom data set that needs no shared data (``synthetic_training_data``: smoke tests, CI)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..field import warp
from .real_data import VAL_LABELMAPS, load_cache, split_ixi
from .synth_data import SynthPairs, random_affine_disp


class MixedPairs:
    """``sample(step)``: with probability ``real_prob`` two different real subjects (affine-aligned in the cache;
    the moving one gets a small random affine, as left by the pipeline's initial alignment), else a synthetic
    pair from the label maps. Deterministic in (seed, step)."""

    def __init__(self, real: list[dict[str, np.ndarray]], label_maps: list[np.ndarray], seed: int = 0,
                 real_prob: float = 0.5, head_prob: float = 0.5, real_affine: float = 1.0):
        self.real = [{k: torch.as_tensor(r[k])[None, None] for k in ("image", "labels", "head") if k in r}
                     for r in real]
        self.head_prob = head_prob if all("head" in r for r in self.real) else 0.0
        self.real_affine = real_affine
        self.synth = SynthPairs(label_maps, seed=seed, max_std_vox=2.0) if label_maps else None
        self.seed, self.real_prob = seed, real_prob if label_maps else 1.0
        if len(self.real) < 2:
            self.real_prob = 0.0
        if self.synth is None and self.real_prob == 0.0:
            raise ValueError("MixedPairs() needs two real subjects or one label map")

    def sample(self, step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 7_919 + step)
        if float(torch.rand((), generator=g)) < self.real_prob:
            i, j = torch.randperm(len(self.real), generator=g)[:2].tolist()
            f, m = self.real[i], self.real[j]
            key = "head" if float(torch.rand((), generator=g)) < self.head_prob else "image"
            shape = tuple(f["image"].shape[2:])
            k = self.real_affine           # 1: ±3°, ±3 % scale, ±1 % shear, ±1.5 voxel
            aff = random_affine_disp(shape, g, rot_deg=3.0 * k, scale=0.03 * k, shear=0.01 * k, trans_vox=1.5 * k)
            return {"fixed": f[key], "fixed_labels": f["labels"], "kind": f"real-{key}",
                    "moving": warp(m[key], aff), "moving_labels": warp(m["labels"], aff, mode="nearest")}
        p = self.synth.pair(step)
        p["kind"] = "synth"
        return p


def validation_pairs(cache_dir: Path, n_ixi_pairs: int = 6, seed: int = 12345) -> list[dict]:
    """Fixed validation pairs: consecutive held-out IXI subjects (moving → fixed, affine-aligned via the cache;
    even pairs skull-stripped, odd pairs whole-head when the cache has heads) and two synthetic pairs from the
    held-out label maps 15, 16 (fixed seed)."""
    _, val_ids = split_ixi()
    ixi = load_cache(cache_dir, "ixi", val_ids)
    ids = [s for s in val_ids if s in ixi]
    pairs = []
    for a in range(min(n_ixi_pairs, max(len(ids) - 1, 0))):
        f, m = ixi[ids[a]], ixi[ids[a + 1]]
        key = "head" if (a % 2 and "head" in f and "head" in m) else "image"
        pairs.append({"name": f"ixi-{key}:{ids[a + 1]}->{ids[a]}", "fixed": torch.as_tensor(f[key])[None, None],
                      "moving": torch.as_tensor(m[key])[None, None],
                      "fixed_labels": torch.as_tensor(f["labels"])[None, None],
                      "moving_labels": torch.as_tensor(m["labels"])[None, None]})
    names = [f"training_seg_{k:02d}" for k in VAL_LABELMAPS]
    lm = load_cache(cache_dir, "labelmaps", names)
    if len(lm) == 2:
        sp = SynthPairs([lm[n]["labels"] for n in names], seed=seed, cross_prob=1.0, max_std_vox=2.0)
        for k in range(2):
            p = sp.pair(k)
            p["name"] = f"synth-labelmaps-15/16:{k}"
            pairs.append(p)
    return pairs


def training_sets(cache_dir: Path) -> tuple[list[dict], list[np.ndarray]]:
    train_ids, _ = split_ixi()
    real = list(load_cache(cache_dir, "ixi", train_ids).values())
    lms = load_cache(cache_dir, "labelmaps")
    maps = [v["labels"] for k, v in lms.items() if int(k.split("_")[-1]) not in VAL_LABELMAPS]
    return real, maps


def phantom_label_map(size: int, box_mm: float = 180.0) -> np.ndarray:
    """(size, size, size) int64 labels of the demo head phantom (sample_data.py) on the canonical array axes
    (0 = S, 1 = P, 2 = L), centred, ``box_mm`` wide."""
    from ..sample_data import phantom_at
    c = (np.arange(size) - (size - 1) / 2.0) * (box_mm / size)
    s, p, l = np.meshgrid(c, c, c, indexing="ij")
    _, lab = phantom_at(np.stack([l, p, s], -1), np.random.default_rng(0))
    return lab.astype(np.int64)


def synthetic_training_data(size: int, seed: int = 0, n_val: int = 2) -> tuple[MixedPairs, list[dict], str]:
    """(training data, validation pairs, description) from the phantom label map deformed and rendered by
    ``SynthPairs`` (random contrasts); validation pairs from a fixed seed."""
    lab = phantom_label_map(int(size))
    data = MixedPairs([], [lab], seed=seed, real_prob=0.0)
    val_src = SynthPairs([lab], seed=12345, max_std_vox=2.0)
    val = []
    for k in range(n_val):
        p = val_src.pair(k)
        p["name"] = f"synth-phantom:{k}"
        val.append(p)
    return data, val, f"generated phantom label-map pairs on a {size}³ grid (train/datasets.py)"
