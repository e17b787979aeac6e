"""Training mixtures and the fixed validation pairs, on the canonical training grid (see real_data.py), and a
generated phantom data set that needs no shared data (``synthetic_training_data``: smoke tests, CI)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..field import warp
from .real_data import VAL_LABELMAPS, load_cache, split_ixi
from .synth_data import SynthPairs, random_affine_disp, random_lut, render, same_subject_pair


class MixedPairs:
    """``sample(step)``: one training pair, of a kind drawn with these probabilities (the rest: ``synth``):

    - ``real`` (``real_prob``): two different real subjects (affine-aligned in the cache; the moving one gets a
      small random affine, as left by the pipeline's initial alignment), whole head with probability ``head_prob``;
    - ``same`` (``same_prob``): one subject twice (``synth_data.same_subject_pair``): a real scan (with probability
      ``same_real_share`` when both sources exist; else a label map rendered with a random table), each copy with
      its own small smooth deformation (std up to ``same_std_vox``), the moving one also with a small rigid motion
      (up to ``same_rigid_deg`` / ``same_rigid_vox``), independent bias and noise; the true map is small and known;
    - ``zero`` (``zero_prob``): the same, without any deformation (identical anatomy, independent noise);
    - ``contrast`` (``contrast_prob``): a label-map pair whose two images have independent random intensity
      tables, blur, bias and noise (SynthMorph-style; ``same_contrast: False``);
    - ``synth``: a label-map pair rendered with one table (both images share a contrast).

    Every pair has ``kind`` and ``same_contrast``; ``same``/``zero`` pairs also ``disp_true`` (fixed → moving,
    voxels). Kinds whose data is missing get probability 0 (no label maps: real pairs fill the rest; fewer than
    two real subjects: no real pairs). Deterministic in (seed, step); with the new probabilities at 0 the pairs
    are those of the mixture before they existed (same draws)."""

    def __init__(self, real: list[dict[str, np.ndarray]], label_maps: list[np.ndarray], seed: int = 0,
                 real_prob: float = 0.5, head_prob: float = 0.5, real_affine: float = 1.0, same_prob: float = 0.0,
                 zero_prob: float = 0.0, contrast_prob: float = 0.0, same_std_vox: float = 1.0,
                 same_rigid_deg: float = 1.0, same_rigid_vox: float = 0.5, same_real_share: float = 0.5):
        for name, p in (("real_prob", real_prob), ("same_prob", same_prob), ("zero_prob", zero_prob),
                        ("contrast_prob", contrast_prob), ("same_real_share", same_real_share)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"MixedPairs() {name} must lie in [0, 1], got {p}")
        self.real = [{k: torch.as_tensor(r[k])[None, None] for k in ("image", "labels", "head") if k in r}
                     for r in real]
        self.head_prob = head_prob if all("head" in r for r in self.real) else 0.0
        self.real_affine = real_affine
        self.synth = SynthPairs(label_maps, seed=seed, max_std_vox=2.0) if label_maps else None
        self.seed = seed
        self.same_std, self.same_rigid = same_std_vox, (same_rigid_deg, same_rigid_vox)
        self.same_real_share = same_real_share if self.real else 0.0
        if self.synth is None:
            self.same_real_share = 1.0
        if self.synth is None and len(self.real) < 2:
            raise ValueError("MixedPairs() needs two real subjects or one label map")
        if self.synth is None:
            contrast_prob = 0.0
            real_prob = max(0.0, 1.0 - same_prob - zero_prob)     # no label maps: real pairs fill the rest
        elif len(self.real) < 2:
            real_prob = 0.0
        if real_prob + same_prob + zero_prob + contrast_prob > 1.0 + 1e-9:
            raise ValueError(f"MixedPairs() real_prob + same_prob + zero_prob + contrast_prob = "
                             f"{real_prob + same_prob + zero_prob + contrast_prob:g} > 1")
        self.probs = {"real": real_prob, "same": same_prob, "zero": zero_prob, "contrast": contrast_prob}
        self.real_prob = real_prob

    def kind(self, u: float) -> str:
        """The kind of pair a uniform draw ``u`` in [0, 1) selects (cumulative: real, same, zero, contrast, synth)."""
        acc = 0.0
        for k, p in self.probs.items():
            acc += p
            if u < acc:
                return k
        return "synth"

    def sample(self, step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 7_919 + step)
        kind = self.kind(float(torch.rand((), generator=g)))
        if kind == "real":
            i, j = torch.randperm(len(self.real), generator=g)[:2].tolist()
            f, m = self.real[i], self.real[j]
            key = "head" if float(torch.rand((), generator=g)) < self.head_prob else "image"
            shape = tuple(f["image"].shape[2:])
            k = self.real_affine           # 1: ±3°, ±3 % scale, ±1 % shear, ±1.5 voxel
            aff = random_affine_disp(shape, g, rot_deg=3.0 * k, scale=0.03 * k, shear=0.01 * k, trans_vox=1.5 * k)
            return {"fixed": f[key], "fixed_labels": f["labels"], "kind": f"real-{key}", "same_contrast": True,
                    "moving": warp(m[key], aff), "moving_labels": warp(m["labels"], aff, mode="nearest")}
        if kind in ("same", "zero"):
            if float(torch.rand((), generator=g)) < self.same_real_share:
                r = self.real[int(torch.randint(len(self.real), (1,), generator=g))]
                src = "head" if float(torch.rand((), generator=g)) < self.head_prob else "image"
                image, labels = r[src], r["labels"]
            else:
                maps = self.synth.maps
                labels = maps[int(torch.randint(len(maps), (1,), generator=g))]
                image, src = render(labels, random_lut(self.synth.max_label, g), g), "labelmap"
            p = same_subject_pair(image, labels, g, self.same_std, *self.same_rigid, zero=kind == "zero")
            p["kind"] = f"{kind}-{src}"
            return p
        p = self.synth.pair(step, independent_contrast=kind == "contrast")
        p["kind"] = kind
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


def synthetic_training_data(size: int, seed: int = 0, n_val: int = 2, **mix: float
                            ) -> tuple[MixedPairs, list[dict], str]:
    """(training data, validation pairs, description) from the phantom label map deformed and rendered by
    ``SynthPairs`` (random contrasts); validation pairs from a fixed seed. ``mix``: MixedPairs' same_prob,
    zero_prob, contrast_prob, same_std_vox (same-subject pairs come from the rendered phantom)."""
    lab = phantom_label_map(int(size))
    data = MixedPairs([], [lab], seed=seed, real_prob=0.0, **mix)
    val_src = SynthPairs([lab], seed=12345, max_std_vox=2.0)
    val = []
    for k in range(n_val):
        p = val_src.pair(k)
        p["name"] = f"synth-phantom:{k}"
        val.append(p)
    return data, val, f"generated phantom label-map pairs on a {size}³ grid (train/datasets.py)"
