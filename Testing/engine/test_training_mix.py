"""The training mix of train/datasets.py (issue 18): same-subject, zero-deformation and contrast-agnostic pairs next
to the real and shared-contrast synthetic ones, and how VoxelMorph-diff's loss and cascade training use them.
CPU, seconds, no shared data (small generated label maps)."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from deepdiffreg.field import warp
from deepdiffreg.io import weights as W
from deepdiffreg.nn.vxm_model import DEFAULT_CONFIG, build_net, stage_nets, training_step_loss
from deepdiffreg.train.datasets import MixedPairs
from deepdiffreg.train.loop import TrainSettings, train
from deepdiffreg.train.synth_data import SynthPairs, same_subject_pair

SHAPE = (24, 28, 24)
TINY = dict(DEFAULT_CONFIG, enc=[4, 8], dec=[8, 8, 4])


def labels(seed: int, shape=SHAPE) -> np.ndarray:
    """Nested ellipsoids (labels 1, 2) plus two small structures (3, 4) at seeded places."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    lab = np.zeros(shape, np.int64)
    r = (z / 0.8) ** 2 + (y / 0.9) ** 2 + (x / 0.75) ** 2
    lab[r < 1], lab[r < 0.5] = 1, 2
    c = rng.uniform(-0.2, 0.2, 3)
    lab[((z - c[0]) ** 2 + (y - 0.3 - c[1]) ** 2 + (x - c[2]) ** 2) < 0.06] = 3
    lab[((z + 0.3) ** 2 + (y + 0.3) ** 2 + (x + 0.2) ** 2) < 0.04] = 4
    return lab


def real_subjects(n: int = 3) -> list[dict[str, np.ndarray]]:
    """'Real' subjects: a smooth image per label map, zero background (as the cache's skull-stripped brains)."""
    out = []
    for k in range(n):
        lab = labels(10 + k)
        img = np.array([0.0, 0.4, 0.8, 0.6, 0.2], np.float32)[lab] + 0.05 * np.random.default_rng(k).random(SHAPE)
        img = (img * (lab > 0)).astype(np.float32)
        out.append({"image": img, "head": img, "labels": lab})
    return out


def mix(**probs) -> MixedPairs:
    return MixedPairs(real_subjects(), [labels(1), labels(2)], seed=3, **probs)


def label_means(img: torch.Tensor, lab: torch.Tensor, ids=(1, 2, 3, 4)) -> np.ndarray:
    return np.array([float(img[lab == i].mean()) for i in ids])


def test_each_kind_is_drawn_with_its_probability():
    data = mix(real_prob=0.2, same_prob=0.2, zero_prob=0.2, contrast_prob=0.2)
    n = 250
    kinds = Counter(data.sample(s)["kind"].split("-")[0] for s in range(n))
    assert set(kinds) == {"real", "same", "zero", "contrast", "synth"}
    for k, c in kinds.items():                         # 0.2 each; binomial std ≈ 0.025
        assert abs(c / n - 0.2) < 0.1, kinds


def test_zero_pairs_have_identical_anatomy_and_independent_noise():
    data = mix(real_prob=0.0, zero_prob=1.0)
    seen = set()
    for s in range(6):
        p = data.sample(s)
        seen.add(p["kind"])
        assert torch.equal(p["fixed_labels"], p["moving_labels"])
        assert float(p["disp_true"].abs().max()) == 0.0
        assert p["same_contrast"] is True
        assert not torch.equal(p["fixed"], p["moving"])                 # own noise and bias
        if not p["kind"].endswith("labelmap"):                          # a real scan: the same image twice
            brain = p["fixed_labels"] > 0
            assert np.corrcoef(p["fixed"][brain].numpy(), p["moving"][brain].numpy())[0, 1] > 0.8
    assert {k.split("-")[1] for k in seen} <= {"image", "head", "labelmap"} and len(seen) >= 2


def test_same_subject_pairs_are_small():
    data = mix(real_prob=0.0, same_prob=1.0, same_std_vox=1.0)
    kinds = set()
    for s in range(6):
        p = data.sample(s)
        kinds.add(p["kind"])
        assert p["kind"].startswith("same-") and p["same_contrast"] is True
        mag = p["disp_true"].norm(dim=1)
        assert 0.0 < float(mag.mean()) < 2.0 and float(mag.max()) < 6.0        # voxels: a small map
    assert len(kinds) >= 2                                  # real scans and rendered label maps


def test_same_subject_true_map_puts_the_moving_anatomy_on_the_fixed():
    # a finer grid than SHAPE: two nearest-neighbour label warps in a row cost ~0.5 voxel of agreement each
    shape = (48, 56, 48)
    lab = torch.as_tensor(labels(10, shape))[None, None]
    img = torch.as_tensor(np.array([0.0, 0.4, 0.8, 0.6, 0.2], np.float32))[lab]
    for s in range(3):
        p = same_subject_pair(img, lab, torch.Generator().manual_seed(s), max_std_vox=2.0, rigid_deg=1.0,
                              rigid_vox=0.5)
        fl, ml, true = p["fixed_labels"], p["moving_labels"], p["disp_true"]
        brain = fl > 0
        agree = {name: float((warp(ml, u, mode="nearest") == fl)[brain].float().mean())
                 for name, u in (("none", torch.zeros_like(true)), ("true", true), ("negated", -true))}
        assert agree["true"] > 0.92 and agree["true"] > agree["none"] > agree["negated"], agree


def test_contrast_pairs_have_independent_intensity_tables():
    data = mix(real_prob=0.0, contrast_prob=1.0)
    shared = SynthPairs([labels(1)], seed=4, max_std_vox=0.0, affine=False)
    indep_r, shared_r = [], []
    for s in range(6):
        p = data.sample(s)
        assert p["kind"] == "contrast" and p["same_contrast"] is False
        indep_r.append(np.corrcoef(label_means(p["fixed"], p["fixed_labels"]),
                                   label_means(p["moving"], p["moving_labels"]))[0, 1])
        q = shared.pair(s)
        assert q["same_contrast"] is True
        shared_r.append(np.corrcoef(label_means(q["fixed"], q["fixed_labels"]),
                                    label_means(q["moving"], q["moving_labels"]))[0, 1])
    assert min(shared_r) > 0.95                  # one table: per-label means agree up to bias and normalisation
    assert min(indep_r) < 0.5 and np.mean(indep_r) < 0.7        # two tables: no common intensity mapping


def test_without_the_new_kinds_the_mixture_is_unchanged():
    old, new = mix(real_prob=0.5), mix(real_prob=0.5, same_prob=0.0, zero_prob=0.0, contrast_prob=0.0)
    for s in range(4):
        a, b = old.sample(s), new.sample(s)
        assert a["kind"] == b["kind"] and torch.equal(a["moving"], b["moving"])


def test_bad_mix_is_refused():
    with pytest.raises(ValueError, match="> 1"):
        mix(real_prob=0.6, same_prob=0.3, contrast_prob=0.3)
    with pytest.raises(ValueError, match="zero_prob"):
        mix(zero_prob=1.5)


def test_contrast_pairs_drop_the_intensity_term():
    p = mix(real_prob=0.0, contrast_prob=1.0).sample(0)
    torch.manual_seed(0)
    net = build_net(TINY)
    cfg = dict(TINY, dice_weight=1.0)
    args = (net, p["moving"], p["fixed"], cfg, torch.Generator().manual_seed(1), p["fixed_labels"],
            p["moving_labels"], [1, 2])
    same = training_step_loss(*args)
    cross = training_step_loss(*args, same_contrast=False)
    assert "recon" in same and "recon" not in cross
    assert torch.allclose(cross["loss"], cross["kl"] + cross["dice_loss"])
    assert torch.allclose(same["loss"], same["kl"] + same["recon"] + same["dice_loss"])


class Fixed:
    def __init__(self, pair):
        self.pair = pair

    def sample(self, step):
        return self.pair


def test_train_stages_all_updates_every_stage(tmp_path):
    pair = mix(real_prob=0.0, same_prob=1.0).sample(1)
    cfg = dict(TINY, image_sigma=0.1, prior_lambda=1.0)
    train(TrainSettings(out_dir=str(tmp_path / "one"), steps=4, lr=3e-3, val_every=4, model=cfg), Fixed(pair), [])
    seed = tmp_path / "one" / "last.pt"
    train(TrainSettings(out_dir=str(tmp_path / "all"), steps=4, lr=3e-3, val_every=4, init=str(seed),
                        model=dict(cfg, stages=2, train_stages="all")), Fixed(pair), [])
    before = W._load_file(seed)["state_dict"]
    after = W._load_file(tmp_path / "all" / "last.pt")
    assert after["config"]["train_stages"] == "all"
    s = after["state_dict"]
    for k in (0, 1):
        assert not torch.equal(s[f"stages.{k}.mu.weight"], before["mu.weight"])
    net = build_net(after["config"])
    net.load_state_dict(s)
    assert len(stage_nets(net)) == 2


def test_train_cli_refuses_a_mix_over_one(tmp_path):
    r = subprocess.run([sys.executable, "-m", "deepdiffreg", "train", "--method", "vxm-diff", "--synthetic", "16",
                        "--out", str(tmp_path / "run"), "--steps", "1", "--same-prob", "0.7", "--contrast-prob", "0.5"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "--same-prob" in r.stderr and "> 1" in r.stderr
    assert not (tmp_path / "run").exists()


def test_displacement_error_is_zero_for_the_true_map_and_one_for_doing_nothing():
    from deepdiffreg.train.validate import displacement_error
    p = mix(real_prob=0.0, same_prob=1.0).sample(2)
    true, brain = p["disp_true"], (p["fixed_labels"][0, 0] > 0).numpy()
    exact, nothing = displacement_error(true, true, brain), displacement_error(torch.zeros_like(true), true, brain)
    assert exact["disp_err_mm"] == 0.0 and exact["disp_true_mm"] > 0
    assert nothing["disp_err_ratio"] == pytest.approx(1.0)
    assert nothing["disp_err_mm"] == pytest.approx(nothing["disp_true_mm"])
