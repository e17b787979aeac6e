"""Learned-method tests (VoxelMorph-diff, training pipeline, models registry). CPU, seconds, no shared data.

Regenerate the stored-output fixture after publishing new bundled weights:
    .venv/bin/python Testing/engine/test_learned_vxm.py --regen
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deepdiffreg.errors import BadInput, MissingWeights
from deepdiffreg.field import jacobian_det, warp
from deepdiffreg.frames import Geometry
from deepdiffreg.io import weights as W
from deepdiffreg.losses import kl_laplacian
from deepdiffreg.losses.kl import degree_map
from deepdiffreg.methods.base import PairOnGrid
from deepdiffreg.methods.refine import refine
from deepdiffreg.nn.vxm_model import (DEFAULT_CONFIG, build_net, predict_disp, prior_stages, soft_dice_loss,
                                      stage_nets, training_step_loss, velocity_to_disp)
from deepdiffreg.train.datasets import MixedPairs
from deepdiffreg.train.loop import TrainSettings, publish, train
from deepdiffreg.train.synth_data import SynthPairs

FIXTURE = Path(__file__).with_name("test_learned_fixture.json")
TINY = dict(DEFAULT_CONFIG, enc=[4, 8], dec=[8, 8, 4])


def blob_labels(shape=(24, 24, 24), seed=0) -> np.ndarray:
    """A small label map: nested ellipsoids plus two 'structures' (labels 1..4), deterministic."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    lab = np.zeros(shape, np.int64)
    r = (z / 0.8) ** 2 + (y / 0.9) ** 2 + (x / 0.75) ** 2
    lab[r < 1] = 1
    lab[r < 0.5] = 2
    c = rng.uniform(-0.2, 0.2, 3)
    lab[((z - c[0]) ** 2 + (y - 0.3 - c[1]) ** 2 + (x - c[2]) ** 2) < 0.06] = 3
    lab[((z + 0.3) ** 2 + (y + 0.3) ** 2 + (x + 0.2) ** 2) < 0.04] = 4
    return lab


def fixture_input(shape=(32, 32, 32)):
    sp = SynthPairs([blob_labels(shape, 1), blob_labels(shape, 2)], seed=7, cross_prob=1.0)
    return sp.pair(0)


# --- losses ---------------------------------------------------------------------------------------------------

def test_kl_matches_dense_laplacian_closed_form():
    n, lam = 4, 7.0
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(1, 3, n, n, n, generator=g, dtype=torch.float64)
    logvar = torch.randn(1, 3, n, n, n, generator=g, dtype=torch.float64) * 0.3 - 2
    idx = np.arange(n ** 3).reshape(n, n, n)
    a = np.zeros((n ** 3, n ** 3))
    for ax in range(3):
        s0 = [slice(None)] * 3
        s1 = [slice(None)] * 3
        s0[ax], s1[ax] = slice(0, n - 1), slice(1, n)
        for i, j in zip(idx[tuple(s0)].ravel(), idx[tuple(s1)].ravel()):
            a[i, j] = a[j, i] = 1
    deg = a.sum(1)
    lap = np.diag(deg) - a
    m = mu[0].reshape(3, -1).numpy()
    lv = logvar[0].reshape(3, -1).numpy()
    sigma_term = np.mean(lam * deg[None] * np.exp(lv) - lv)
    n_diffs = n * n * (n - 1) * 3                                # elements of one forward-difference array
    prec = sum(m[c] @ lap @ m[c] for c in range(3)) / n_diffs * 0.5 / 3
    expected = 1.5 * (sigma_term + lam * prec)
    assert float(kl_laplacian(mu, logvar, lam)) == pytest.approx(expected, rel=1e-10)
    assert torch.equal(degree_map((n, n, n))[0, 0].flatten(), torch.tensor(deg, dtype=torch.float32))


def test_heads_start_at_identity_with_tiny_variance():
    net = build_net(DEFAULT_CONFIG)
    x = torch.rand(1, 1, 32, 32, 32)
    mu, logvar = net(x, x)
    assert mu.shape == (1, 3, 16, 16, 16) and logvar.shape == mu.shape
    assert mu.abs().max() < 1e-2 and (logvar + 10).abs().max() < 1e-3
    assert 250_000 < sum(p.numel() for p in net.parameters()) < 300_000   # legacy layout ≈ 266k
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.rand(1, 1, 24, 32, 32), torch.rand(1, 1, 24, 32, 32))


# --- data -----------------------------------------------------------------------------------------------------

def test_generator_yields_valid_reproducible_pairs_with_matching_labels():
    lab = blob_labels()
    sp = SynthPairs([lab, blob_labels(seed=3)], seed=5)
    p, q = sp.pair(3), sp.pair(3)
    assert all(torch.equal(p[k], q[k]) if torch.is_tensor(p[k]) else p[k] == q[k] for k in p)
    assert not torch.equal(sp.pair(4)["fixed"], p["fixed"])
    for role in ("fixed", "moving"):
        img, l = p[role], p[f"{role}_labels"]
        assert img.shape == l.shape == (1, 1, 24, 24, 24) and img.dtype == torch.float32
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0 and float(img.std()) > 0.05
        assert set(torch.unique(l).tolist()) <= {0, 1, 2, 3, 4}
        assert float(img[l == 0].mean()) < float(img[l > 0].mean())      # skull-stripped look: background dark
        assert jacobian_det(p[f"disp_{role}"]).min() > 0                   # random deformations are diffeomorphic
    # the labels are the label map warped by the returned deformation
    src = [lab, blob_labels(seed=3)]
    ok = [torch.equal(warp(torch.as_tensor(s)[None, None], p["disp_fixed"], mode="nearest"), p["fixed_labels"])
          for s in src]
    assert any(ok)


def test_mixed_pairs_real_and_synthetic():
    real = [{"image": np.random.default_rng(i).random((16, 16, 16)).astype(np.float32),
             "labels": blob_labels((16, 16, 16), i)} for i in range(3)]
    data = MixedPairs(real, [blob_labels((16, 16, 16))], seed=1, real_prob=0.5)
    kinds = {data.sample(s)["kind"] for s in range(12)}
    assert kinds == {"real-image", "synth"}
    s = data.sample(0)
    assert s["fixed"].shape == s["moving_labels"].shape == (1, 1, 16, 16, 16)


# --- training -------------------------------------------------------------------------------------------------

class One:
    """Training data that always gives the same small synthetic pair (blob labels, 16³, no affine)."""

    def __init__(self):
        self.pair = SynthPairs([blob_labels((16, 16, 16))], seed=0, max_std_vox=1.5, affine=False).pair(0)

    def sample(self, step):
        return self.pair


def test_tiny_model_trains_and_loss_goes_down(tmp_path):
    pair = One().pair
    cfg = dict(TINY, image_sigma=0.1, prior_lambda=1.0)
    val = [dict(pair, name="p0")]
    res = train(TrainSettings(out_dir=str(tmp_path / "run"), steps=40, lr=3e-3, val_every=20, model=cfg),
                One(), val)
    rows = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    assert len(rows) == 3 and res["step"] == 40
    first, last = [float(r.split(",")[2]) for r in rows[1:]]
    assert last < first                                                 # mean loss over steps 21-40 < 1-20
    assert (tmp_path / "run" / "train_log.png").exists() and (tmp_path / "run" / "best.pt").exists()
    # resume: continue to 50 steps from the checkpoint
    res2 = train(TrainSettings(out_dir=str(tmp_path / "run"), steps=50, lr=3e-3, val_every=20, model=cfg),
                 One(), val)
    assert res2["step"] == 50
    assert len((tmp_path / "run" / "train_log.csv").read_text().splitlines()) == 4
    # publish into a models folder, then load through the registry with the hash check
    entry = publish(tmp_path / "run", tmp_path / "models", "tiny-test", "0.0.1", {"data": "blobs"})
    obj = W.load_weights({**entry, "path": str(tmp_path / "models" / entry["file"])})
    assert obj["config"]["enc"] == [4, 8]
    assert (tmp_path / "models" / "tiny-test.md").exists()


def test_weight_average_is_what_gets_validated_and_saved(tmp_path):
    """--ema: best/last.pt hold the averaged weights (not the live ones), the checkpoint carries the average so
    that a resumed run continues it, and the live weights keep training."""
    pair = One().pair

    cfg = dict(TINY, image_sigma=0.1, prior_lambda=1.0)
    settings = lambda steps: TrainSettings(out_dir=str(tmp_path / "run"), steps=steps, lr=3e-3, val_every=10,  # noqa: E731
                                           model=cfg, ema=0.9)
    train(settings(10), One(), [dict(pair, name="p0")])
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    last = W._load_file(tmp_path / "run" / "last.pt")["state_dict"]
    key = "mu.weight"
    assert torch.equal(last[key], ck["ema"][key])                     # saved weights = the average
    assert not torch.equal(ck["state_dict"][key], ck["ema"][key])      # ≠ the live weights
    train(settings(20), One(), [dict(pair, name="p0")])               # resume continues the same average
    ck2 = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck2["step"] == 20 and not torch.equal(ck2["ema"][key], ck["ema"][key])
    assert torch.equal(W._load_file(tmp_path / "run" / "last.pt")["state_dict"][key], ck2["ema"][key])


def test_training_loss_decreases_on_fixed_pair_direct():
    torch.manual_seed(0)
    lab = blob_labels((16, 16, 16))
    pair = SynthPairs([lab], seed=2, max_std_vox=1.5, affine=False).pair(0)
    cfg = dict(TINY, image_sigma=0.1, prior_lambda=1.0)
    net = build_net(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        out = training_step_loss(net, pair["moving"], pair["fixed"], cfg, g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["recon"].detach()))
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])


def test_half_grid_dice_term_agrees_with_the_full_grid_one():
    """The ½-grid Dice (2×2×2-averaged one-hot labels, on the velocity's own grid) is a cheap stand-in for the full
    one. Label fractions never overlap perfectly (soft Dice of a fraction map with itself is < 1), so it has an
    offset: what must hold is that it is lowest at the right displacement, rises with misalignment about as much
    as the full-grid term does, and its gradient points back towards the fixed labels."""
    lab = torch.as_tensor(blob_labels((32, 32, 32)))[None, None]
    labels = [1, 2, 3, 4]
    zero_full, zero_half = torch.zeros(1, 3, 32, 32, 32), torch.zeros(1, 3, 16, 16, 16)
    aligned_full = float(soft_dice_loss(lab, lab, zero_full, labels))
    aligned_half = float(soft_dice_loss(lab, lab, zero_half, labels))
    assert aligned_full < 1e-6 and aligned_half < 0.25
    moved = warp(lab, torch.full((1, 3, 32, 32, 32), 2.0), mode="nearest")        # moving = fixed shifted 2 vox
    full = float(soft_dice_loss(lab, moved, zero_full, labels)) - aligned_full
    half = float(soft_dice_loss(lab, moved, zero_half, labels)) - aligned_half
    assert full > 0.1 and abs(half - full) < 0.35 * full
    # moved(x) = fixed(x + 2): the aligning displacement is −2 voxels (−1 on the ½ grid), so both gradients are
    # positive on average (the loss falls towards negative displacements)
    u_half = torch.zeros(1, 3, 16, 16, 16, requires_grad=True)
    u_full = torch.zeros(1, 3, 32, 32, 32, requires_grad=True)
    soft_dice_loss(lab, moved, u_half, labels).backward()
    soft_dice_loss(lab, moved, u_full, labels).backward()
    assert float(u_half.grad.mean()) > 0 and float(u_full.grad.mean()) > 0
    back = float(soft_dice_loss(lab, moved, torch.full((1, 3, 16, 16, 16), -1.0), labels)) - aligned_half
    assert back < 0.1 * half
    with pytest.raises(ValueError, match="neither the label grid"):
        soft_dice_loss(lab, moved, torch.zeros(1, 3, 8, 8, 8), labels)


def test_refine_lowers_the_loss():
    target = torch.linspace(0, 1, 10)
    p, info = refine(torch.zeros(10), lambda v: ((v - target) ** 2).sum(), steps=50, lr=0.05)
    assert info["refine_loss_end"] < info["refine_loss_start"] and info["refine_steps"] == 50
    same, info0 = refine(torch.ones(3), lambda v: v.sum(), steps=0)
    assert torch.equal(same, torch.ones(3)) and info0["refine_steps"] == 0


def test_refine_keeps_the_best_unless_asked_where_the_steps_went():
    """From (near) a minimum Adam's first steps overshoot and raise the loss: the refinement returns its start (the
    best seen), while ``keep_best=False`` (the refine uncertainty's "how far do more steps move it") returns the
    moved parameter — else a --vxm-refine result's uncertainty map was exactly zero."""
    loss = lambda v: (v - 0.001).abs().sum()          # noqa: E731  minimum at 0.001, start at 0, step 0.1
    start = torch.zeros(4)
    best, _ = refine(start, loss, steps=3, lr=0.1)
    moved, info = refine(start, loss, steps=3, lr=0.1, keep_best=False)
    assert torch.equal(best, start)
    assert float(moved.abs().min()) > 0.05 and float(loss(moved)) > float(loss(start))
    assert info["refine_loss_end"] is None and info["refine_loss_start"] == float(loss(start))


def test_refine_takes_torch_adams_steps():
    """refine() writes Adam's update out (no torch.optim: its first use imports torch._dynamo, ~1.4 s); every
    step must be the number torch.optim.Adam gives, on a float32 field with a non-quadratic loss."""
    g = torch.Generator().manual_seed(0)
    init = torch.randn(1, 3, 6, 7, 5, generator=g)
    target = torch.randn(1, 3, 6, 7, 5, generator=g)

    def loss_fn(v):
        return ((v - target) ** 2).mean() + 0.1 * torch.log1p(v ** 2).sum() + (v[..., 1:] - v[..., :-1]).abs().mean()

    for steps, lr in ((1, 0.05), (7, 0.3), (25, 0.01)):
        param = init.clone().requires_grad_(True)
        opt = torch.optim.Adam([param], lr=lr)
        best, best_loss = param.detach().clone(), float("inf")
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_fn(param)
            val = float(loss.detach())
            if val < best_loss:
                best_loss, best = val, param.detach().clone()
            loss.backward()
            opt.step()
        final = float(loss_fn(param).detach())
        if final < best_loss:
            best_loss, best = final, param.detach().clone()
        got, info = refine(init, loss_fn, steps, lr=lr)
        assert torch.equal(got, best) and info["refine_loss_end"] == best_loss


# --- registry -------------------------------------------------------------------------------------------------

def _bundled_vxm():
    try:
        return W.find_model(method="vxm-diff")
    except MissingWeights:
        pytest.skip("no bundled vxm-diff weights yet")


def _first_stage(obj: dict) -> dict:
    """The bundled model's first network as a 1-stage weights object (the bundled model may be a cascade)."""
    net = build_net(obj["config"])
    net.load_state_dict(obj["state_dict"])
    return {"config": dict(obj["config"], stages=1), "state_dict": stage_nets(net)[0].state_dict()}


def _install(tmp_path, monkeypatch, entry: dict, models: dict[str, dict]) -> None:
    """Serve ``models`` ({id: weights object}) as the bundled models (manifest entries copied from ``entry``)."""
    folder = tmp_path / "bundled"
    folder.mkdir(exist_ok=True)
    rows = []
    for mid, obj in models.items():
        sha = W.save_weights(folder / f"{mid}.pt", obj["config"], obj["state_dict"], {"method": "vxm-diff"})
        rows.append({**{k: v for k, v in entry.items() if k not in ("source", "path")},
                     "id": mid, "file": f"{mid}.pt", "sha256": sha})
    W.write_manifest(folder, rows)
    monkeypatch.setenv("DEEPDIFFREG_BUNDLED_MODELS", str(folder))
    monkeypatch.setenv("DEEPDIFFREG_MODELS_DIR", str(tmp_path / "user"))


def test_tampered_or_missing_weights_are_rejected(tmp_path, monkeypatch):
    entry = _bundled_vxm()
    folder = tmp_path / "bundled"
    folder.mkdir()
    shutil.copy(entry["path"], folder / entry["file"])
    W.write_manifest(folder, [{k: v for k, v in entry.items() if k not in ("source", "path")}])
    monkeypatch.setenv("DEEPDIFFREG_BUNDLED_MODELS", str(folder))
    monkeypatch.setenv("DEEPDIFFREG_MODELS_DIR", str(tmp_path / "user"))
    W.load_weights(W.find_model(entry["id"]))                     # intact: loads
    data = bytearray((folder / entry["file"]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / entry["file"]).write_bytes(bytes(data))
    with pytest.raises(MissingWeights, match="sha256") as e:
        W.load_weights(W.find_model(entry["id"]))
    assert "\n" not in str(e.value)
    (folder / entry["file"]).unlink()
    with pytest.raises(MissingWeights, match="missing"):
        W.load_weights(W.find_model(entry["id"]))
    with pytest.raises(MissingWeights, match="no model"):
        W.find_model("does-not-exist")


def test_models_import_list_delete(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPDIFFREG_MODELS_DIR", str(tmp_path / "user"))
    monkeypatch.setenv("DEEPDIFFREG_BUNDLED_MODELS", str(tmp_path / "none"))
    f = tmp_path / "mine.pt"
    W.save_weights(f, TINY, build_net(TINY).state_dict(), {"method": "vxm-diff", "id": "mine"})
    from deepdiffreg.train.cli import main
    assert main(["models", "import", str(f)]) == 0
    assert (tmp_path / "user" / "mine.pt").exists()
    assert [m["id"] for m in W.list_models()] == ["mine"]
    W.load_weights(W.find_model(method="vxm-diff"))
    assert main(["models", "list"]) == 0
    assert main(["models", "delete", "mine"]) == 0
    assert W.list_models() == [] and not (tmp_path / "user" / "mine.pt").exists()
    assert main(["models", "delete", "mine"]) != 0                     # one-line error, nonzero exit
    bad = tmp_path / "bad.pt"
    torch.save({"x": object.__new__(Path)} if False else [1, 2], bad)
    with pytest.raises(MissingWeights):
        W.import_weights(bad)
    with pytest.raises(BadInput):
        W.import_weights(tmp_path / "nope.pt")


# --- the method ------------------------------------------------------------------------------------------------

def _stored_output(entry) -> dict:
    obj = W.load_weights(entry)
    net = build_net(obj["config"])
    net.load_state_dict(obj["state_dict"])
    net.eval()
    p = fixture_input()
    m, f = p["moving"], p["fixed"]
    with torch.no_grad():            # the last stage's forward heads (a single network: prior is None)
        _, _, m_in = prior_stages(net, m, f, 7, symmetric=True)
        mu, logvar = stage_nets(net)[-1](m_in, f)
    disp = predict_disp(net, m, f, 7)
    return {"sha256": entry["sha256"], "mu_abs_mean": float(mu.abs().mean()), "mu_sum": float(mu.sum()),
            "logvar_mean": float(logvar.mean()), "disp_abs_mean": float(disp.abs().mean()),
            "mu_samples": [float(v) for v in mu.flatten()[::997][:12]]}


def test_loaded_model_reproduces_stored_output():
    entry = _bundled_vxm()
    if not FIXTURE.exists():
        pytest.skip("no stored fixture; run this file with --regen")
    want = json.loads(FIXTURE.read_text())
    assert want["sha256"] == entry["sha256"], "bundled weights changed: regenerate the fixture (--regen)"
    got = _stored_output(entry)
    for k in ("mu_abs_mean", "mu_sum", "logvar_mean", "disp_abs_mean"):
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5), k
    np.testing.assert_allclose(got["mu_samples"], want["mu_samples"], rtol=1e-4, atol=1e-5)


def test_vxm_uncertainty_made_beside_the_write_stage_is_the_one_made_inline(monkeypatch):
    """With a core to spare, vxm-diff's refine-shift map is made on a helper (base.Deferred) while the pipeline
    writes the rest; its numbers are the ones made inline, and the estimate's field does not wait for it."""
    _bundled_vxm()
    from deepdiffreg.methods import vxm_diff
    from deepdiffreg.methods.base import Deferred
    p = fixture_input((20, 24, 28))
    pair = PairOnGrid(p["fixed"], p["moving"], Geometry((0.0, 0.0, 0.0), (2.0, 2.0, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                                                        (28, 24, 20)))
    got = {}
    for spare in (False, True):
        monkeypatch.setattr(vxm_diff, "spare_core", lambda s=spare: s)
        est = vxm_diff.VxmDiff().estimate(pair, torch.device("cpu"), lambda f, m: None)
        m = est.maps["uncertainty"]
        assert isinstance(m.data, Deferred) == spare
        got[spare] = (est.disp_vox, m.value())
        m.close()
        assert not spare or (m.data.seconds > 0 and m.data.waited >= 0)
    assert torch.equal(got[False][0], got[True][0]) and torch.equal(got[False][1], got[True][1])


def test_vxm_method_on_oblique_grid_with_refine_and_uncertainty():
    _bundled_vxm()
    from deepdiffreg.methods.vxm_diff import VxmDiff
    p = fixture_input((20, 24, 28))                                    # not a multiple of 16: padded inside
    psr = (0, 0, -1, 1, 0, 0, 0, 1, 0)                                  # IXI-like sagittal direction
    geom = Geometry((0.0, 0.0, 0.0), (2.0, 2.0, 2.0), psr, (28, 24, 20))
    pair = PairOnGrid(p["fixed"], p["moving"], geom)
    calls = []
    est = VxmDiff(refine=3, uncertainty_samples=4).estimate(pair, torch.device("cpu"),
                                                            lambda f, m: calls.append(f))
    assert est.disp_vox.shape == est.inverse_disp_vox.shape == (1, 3, 20, 24, 28)
    unc = est.maps["uncertainty"].value()
    assert unc.shape == (1, 1, 20, 24, 28) and float(unc.min()) >= 0
    assert torch.isfinite(est.disp_vox).all() and torch.isfinite(unc).all()
    assert est.info["refine_steps"] == 3 and est.info["refine_loss_end"] <= est.info["refine_loss_start"]
    assert est.model["sha256"] == W.find_model(method="vxm-diff")["sha256"]
    assert calls[-1] == 1.0
    qa = est.info["uncertainty_qa"]              # report.json says whether the map may be read as QA, and why:
    assert qa["reliable"] is False and qa["measured_rho_displacement"] is None and qa["note"]   # refined: not
    # forward ∘ inverse ≈ identity (exp(v)∘exp(−v), per stage of a cascade); the border-clamped compositions of a
    # cascade err most in the few voxels next to the margin, hence a percentile rather than the maximum
    comp = est.inverse_disp_vox + warp(est.disp_vox, est.inverse_disp_vox)
    inner = comp[:, :, 3:-3, 3:-3, 3:-3].abs()
    assert float(inner.mean()) < 0.1 and float(torch.quantile(inner.flatten(), 0.99)) < 0.5


def test_a_follow_up_pair_is_refined_with_the_methods_follow_up_steps_and_an_asked_refinement_wins():
    """``register --follow-up`` (PairOnGrid.follow_up): vxm-diff refines its prediction with its declared
    follow-up steps (the network's inter-subject prior adds deformation one patient's scans do not have); an
    explicit --vxm-refine wins; without --follow-up nothing is refined; report.json says why it refined, and the
    refined result's uncertainty map is not declared QA."""
    _bundled_vxm()
    from deepdiffreg.methods.refine import refine_plan
    from deepdiffreg.methods.vxm_diff import FOLLOW_UP_REFINE, FOLLOW_UP_REFINE_LR, VxmDiff
    o = VxmDiff().opts
    assert refine_plan(o, False) == (0, o.refine_lr, None) and not refine_plan(o, False).for_follow_up
    assert refine_plan(o, True).for_follow_up and not refine_plan(VxmDiff(refine=7).opts, True).for_follow_up
    assert refine_plan(o, True)[:2] == (FOLLOW_UP_REFINE, FOLLOW_UP_REFINE_LR) == (20, 0.05)
    assert refine_plan(VxmDiff(refine=7).opts, True)[:2] == (7, o.refine_lr)            # asked for: that
    assert refine_plan(VxmDiff(follow_up_refine=0).opts, True)[0] == 0                   # declared off: none
    p = fixture_input((20, 24, 28))
    geom = Geometry((0.0, 0.0, 0.0), (2.0, 2.0, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (28, 24, 20))
    one_patient = VxmDiff(follow_up_refine=2).estimate(PairOnGrid(p["fixed"], p["moving"], geom, follow_up=True),
                                                       torch.device("cpu"), lambda f, m: None)
    assert one_patient.info["refine_steps"] == 2 and "--follow-up" in one_patient.info["refine_reason"]
    assert one_patient.info["uncertainty_qa"]["reliable"] is False
    plain = VxmDiff(follow_up_refine=2).estimate(PairOnGrid(p["fixed"], p["moving"], geom), torch.device("cpu"),
                                                 lambda f, m: None)
    assert "refine_steps" not in plain.info and "refine_reason" not in plain.info
    assert not torch.equal(plain.disp_vox, one_patient.disp_vox)


def test_uncertainty_map_is_qa_only_as_measured():
    """The map is declared QA (report.json ``uncertainty_qa.reliable``) only when it is the map whose ρ against the
    true error was measured at or above the threshold: the default settings, the bundled weights, no --vxm-refine.
    Any other setting, other weights, or a refined result: not measured, not QA."""
    from deepdiffreg.methods.base import UNCERTAINTY_QA_RHO
    from deepdiffreg.methods.vxm_diff import UNCERTAINTY_MEASURED as M, VxmDiff, _uncertainty_qa
    keys = ("kind", "steps", "lr", "similarity", "ncc_weight", "ncc_window")
    o = VxmDiff.Options()
    default = {"kind": o.uncertainty, "steps": o.uncertainty_steps, "lr": o.uncertainty_lr,
               "similarity": o.uncertainty_similarity, "ncc_weight": o.uncertainty_ncc_weight,
               "ncc_window": o.uncertainty_ncc_window | 1}
    assert default == {k: M[k] for k in keys}                # the defaults are the measured map
    assert VxmDiff.caps.uncertainty_qa and min(M["rho_displacement"].values()) >= UNCERTAINTY_QA_RHO
    bundled = {"sha256": M["weights_sha256"]}
    qa = _uncertainty_qa(default, bundled, refined=False)
    assert qa["reliable"] is True and qa["measured_rho_displacement"] == M["rho_displacement"] and qa["measured_in"]
    for other in ({**default, "steps": 5}, {**default, "similarity": "mse"}, {**default, "kind": "laplace"}):
        qa = _uncertainty_qa(other, bundled, refined=False)
        assert qa["reliable"] is False and qa["measured_rho_displacement"] is None and "not measured" in qa["note"]
    assert _uncertainty_qa(default, {"sha256": "0" * 64}, refined=False)["reliable"] is False
    assert _uncertainty_qa(default, bundled, refined=True)["reliable"] is False


def test_refine_image_term_ncc_is_blind_to_a_bias_field_and_mse_is_not():
    """--vxm-refine's default image term (30·(1 − local NCC²)) must not see a smooth multiplicative bias as
    misregistration — what made the MSE refinement add deformation to a follow-up scan (same-1) — and must see a
    shift; 'mse' is the model's MSE/σ², which sees both."""
    from deepdiffreg.methods.vxm_diff import REFINE_NCC_WEIGHT, refine_image_term
    f = fixture_input((24, 24, 24))["fixed"]
    z = torch.linspace(-1, 1, 24).view(1, 1, 24, 1, 1)
    biased = f * (1.0 + 0.15 * z)                                   # ±15 % smooth bias, same anatomy
    shifted = torch.roll(f, 2, dims=3)                              # misregistered by 2 voxels
    term = lambda kind, w: float(refine_image_term(kind, f, w, 0.02, REFINE_NCC_WEIGHT, 5))  # noqa: E731
    # (1 − NCC²) is not 0 for identical images where they are flat (no variance, cc = 0): compare increases
    rise = lambda kind, w: term(kind, w) - term(kind, f)  # noqa: E731
    assert rise("ncc", shifted) > 0.05 * REFINE_NCC_WEIGHT
    assert abs(rise("ncc", biased)) < 0.05 * rise("ncc", shifted)
    assert term("mse", f) == 0 and rise("mse", biased) > 0.005 * rise("mse", shifted)
    with pytest.raises(ValueError):
        refine_image_term("lncc", f, f, 0.02, 1.0, 5)


def test_vxm_refine_with_the_model_s_mse_still_runs():
    _bundled_vxm()
    from deepdiffreg.methods.vxm_diff import VxmDiff
    p = fixture_input((16, 16, 16))
    pair = PairOnGrid(p["fixed"], p["moving"], Geometry((0.0, 0.0, 0.0), (2.0, 2.0, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                                                          (16, 16, 16)))
    for kind in ("mse", "ncc"):
        est = VxmDiff(refine=2, refine_similarity=kind).estimate(pair, torch.device("cpu"), lambda f, m: None)
        assert est.info["refine_steps"] == 2 and est.info["refine_loss_end"] <= est.info["refine_loss_start"]
        assert ("NCC" in est.info["refine_image_term"]) == (kind == "ncc")


def test_vxm_diff_end_to_end_cli(tmp_path):
    _bundled_vxm()
    import SimpleITK as sitk
    p = fixture_input((32, 32, 32))
    for role in ("fixed", "moving"):
        img = sitk.GetImageFromArray(p[role][0, 0].numpy())
        img.SetSpacing((2.0, 2.0, 2.0))
        sitk.WriteImage(img, str(tmp_path / f"{role}.nii.gz"))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "deepdiffreg.cli", "register", "--method", "vxm-diff",
                        "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "moving.nii.gz"),
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "unrecognized arguments" in r.stderr:
        pytest.skip(f"CLI interface differs: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "uncertainty.nii.gz").exists()
    assert (out / "transform.h5").exists() and (out / "inverse.h5").exists()


if __name__ == "__main__" and "--regen" in sys.argv:
    FIXTURE.write_text(json.dumps(_stored_output(W.find_model(method="vxm-diff")), indent=1) + "\n")
    print(f"wrote {FIXTURE}")


def test_vxm_result_does_not_depend_on_the_array_orientation():
    """The same physical pair stored in LPS order and in a sagittal (PSR-like) order gives the same field."""
    _bundled_vxm()
    from deepdiffreg.methods.vxm_diff import VxmDiff
    from deepdiffreg.nn.grid import canonical_axes, disp_from_canonical, to_canonical
    p = fixture_input((32, 32, 32))
    lps = Geometry((0.0, 0.0, 0.0), (2.0, 2.0, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (32, 32, 32))
    psr = (0, 0, -1, 1, 0, 0, 0, 1, 0)
    src, flip = canonical_axes(np.asarray(psr, float).reshape(3, 3))
    # arrays in the PSR order are the canonical arrays pushed through the inverse of to_canonical
    from deepdiffreg.nn.grid import from_canonical as to_canonical_inverse_scalar
    f2 = to_canonical_inverse_scalar(p["fixed"], src, flip)
    m2 = to_canonical_inverse_scalar(p["moving"], src, flip)
    assert torch.equal(to_canonical(f2, src, flip), p["fixed"])
    run = lambda f, m, g: VxmDiff(uncertainty_samples=0).estimate(PairOnGrid(f, m, g), torch.device("cpu"),
                                                                  lambda a, b: None)
    e1 = run(p["fixed"], p["moving"], lps)
    e2 = run(f2, m2, Geometry((0.0, 0.0, 0.0), (2.0, 2.0, 2.0), psr, (32, 32, 32)))
    back = disp_from_canonical(e1.disp_vox, src, flip)          # e1 is already canonical: map it to PSR order
    assert torch.allclose(e2.disp_vox, back, atol=1e-4)
    assert torch.allclose(e2.maps["uncertainty"].value(),
                          to_canonical_inverse_scalar(e1.maps["uncertainty"].value(), src, flip), atol=1e-5)


def test_unlabeled_folder_loader(tmp_path):
    import SimpleITK as sitk
    from deepdiffreg.train.real_data import load_cache, prepare_unlabeled
    shape = (24, 28, 24)
    lab = blob_labels(shape, 0)
    ref = (lab * 40.0).astype(np.float32)
    grid = {"version": 2, "reference": "ref", "origin_lps": [0.0, 0.0, 0.0], "spacing": 2.0, "shape_dhw": list(shape)}
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "grid.json").write_text(json.dumps(grid))
    ref_img = sitk.GetImageFromArray(ref)
    ref_img.SetSpacing((2.0, 2.0, 2.0))
    (tmp_path / "in").mkdir()
    mov = sitk.GetImageFromArray(np.roll(ref, 2, axis=2))
    mov.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(mov, str(tmp_path / "in" / "subj_a.nii.gz"))
    written = prepare_unlabeled(tmp_path / "cache", tmp_path / "in", reference=ref_img, log=lambda s: None)
    assert [p.name for p in written] == ["subj_a.npz"]
    img = load_cache(tmp_path / "cache", "unlabeled")["subj_a"]["image"]
    assert img.shape == shape and 0 <= img.min() and img.max() <= 1.0
    assert np.corrcoef(img.ravel(), ref.ravel())[0, 1] > 0.8             # realigned onto the reference


def test_symmetric_inference_swaps_exactly(tmp_path, monkeypatch):
    """Default (symmetric) inference of one network: registering (moving, fixed) gives exactly the inverse velocity
    of (fixed, moving), so the swapped pair's transform is this pair's inverse field. A cascade keeps it only
    approximately (its second stage sees a pair warped by the first)."""
    entry = _bundled_vxm()
    from deepdiffreg.methods.vxm_diff import VxmDiff
    obj = W.load_weights(entry)
    _install(tmp_path, monkeypatch, entry, {"one": _first_stage(obj), "bundled": obj})
    p = fixture_input((32, 32, 32))
    geom = Geometry((0.0, 0.0, 0.0), (2.0, 2.0, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (32, 32, 32))
    run = lambda f, m, **o: VxmDiff(**o).estimate(PairOnGrid(f, m, geom), torch.device("cpu"), lambda a, b: None)
    fwd, back = run(p["fixed"], p["moving"], model="one"), run(p["moving"], p["fixed"], model="one")
    assert fwd.info["symmetric"] is True and fwd.info["stages"] == 1
    assert torch.allclose(fwd.disp_vox, back.inverse_disp_vox, atol=1e-5)
    assert torch.allclose(fwd.inverse_disp_vox, back.disp_vox, atol=1e-5)
    plain = run(p["fixed"], p["moving"], model="one", symmetric=False)
    assert plain.info["symmetric"] is False and not torch.allclose(plain.disp_vox, fwd.disp_vox, atol=1e-4)
    if int(obj["config"].get("stages", 1)) > 1:
        fwd, back = run(p["fixed"], p["moving"], model="bundled"), run(p["moving"], p["fixed"], model="bundled")
        # measured with v0.5.0: 0.15 voxels mean disagreement for 0.71 voxels mean displacement
        err = (fwd.disp_vox - back.inverse_disp_vox)[:, :, 3:-3, 3:-3, 3:-3].abs()
        assert float(err.mean()) < 0.3 * float(fwd.disp_vox.abs().mean())


def test_cascade_composes_its_stages_and_inverts(tmp_path, monkeypatch):
    """A 2-stage cascade (``stages`` in the config): stage 2 registers the moving image warped by stage 1, the
    result is φ1 ∘ φ2 and the inverse φ2⁻¹ ∘ φ1⁻¹; seeded from a 1-stage model, both stages are that model."""
    entry = _bundled_vxm()
    from deepdiffreg.field import compose
    from deepdiffreg.methods.vxm_diff import VxmDiff
    from deepdiffreg.nn.vxm_model import load_stages, predict_mean
    obj = _first_stage(W.load_weights(entry))
    cfg2 = dict(obj["config"], stages=2)
    net2 = build_net(cfg2)
    load_stages(net2, obj)
    for unet in stage_nets(net2):
        assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), obj["state_dict"].values()))
    _install(tmp_path, monkeypatch, entry, {"casc": {"config": cfg2, "state_dict": net2.state_dict()}})

    p = fixture_input((32, 32, 32))
    f, m = p["fixed"], p["moving"]
    geom = Geometry((0.0, 0.0, 0.0), (2.0, 2.0, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (32, 32, 32))
    est = VxmDiff(model="casc").estimate(PairOnGrid(f, m, geom), torch.device("cpu"), lambda a, b: None)
    assert est.info["stages"] == 2
    # the same thing by hand: stage 1 on (m, f), stage 2 on (m∘φ1, f), composed
    unet = stage_nets(net2)[0].eval()
    with torch.no_grad():
        u1 = velocity_to_disp(predict_mean(unet, m, f, True)[0], (32, 32, 32))
        mu2 = predict_mean(unet, warp(m, u1), f, True)[0]
        u2 = velocity_to_disp(mu2, (32, 32, 32))
    assert torch.allclose(est.disp_vox, compose(u1, u2), atol=1e-4)
    assert not torch.allclose(est.disp_vox, u1, atol=1e-3)                 # the second stage did something
    comp = est.inverse_disp_vox + warp(est.disp_vox, est.inverse_disp_vox)   # φ ∘ φ⁻¹ ≈ identity
    inner = comp[:, :, 3:-3, 3:-3, 3:-3].abs()       # (two border-clamped compositions: the margin errs more)
    assert float(inner.mean()) < 0.1 and float(torch.quantile(inner.flatten(), 0.99)) < 0.5
    assert float(jacobian_det(est.disp_vox).min()) > 0


def test_cascade_training_updates_the_last_stage_only(tmp_path):
    pair = One().pair

    cfg = dict(TINY, image_sigma=0.1, prior_lambda=1.0)
    train(TrainSettings(out_dir=str(tmp_path / "one"), steps=10, lr=3e-3, val_every=10, model=cfg), One(), [])
    seed = tmp_path / "one" / "last.pt"
    train(TrainSettings(out_dir=str(tmp_path / "two"), steps=10, lr=3e-3, val_every=10, init=str(seed),
                        model=dict(cfg, stages=2)), One(), [dict(pair, name="p0")])
    before = W._load_file(seed)["state_dict"]
    after = W._load_file(tmp_path / "two" / "last.pt")
    assert after["config"]["stages"] == 2
    s = after["state_dict"]
    assert all(torch.equal(s[f"stages.0.{k}"], v) for k, v in before.items())          # frozen
    assert not torch.equal(s["stages.1.mu.weight"], before["mu.weight"])             # trained
    assert (tmp_path / "two" / "train_log.csv").read_text().count("\n") == 2
    # resuming builds the run's own model from its checkpoint, even without --stages on the command line
    res = train(TrainSettings(out_dir=str(tmp_path / "two"), steps=12, lr=3e-3, val_every=10, model=cfg), One(), [])
    assert res["step"] == 12
    s2 = W._load_file(tmp_path / "two" / "last.pt")["state_dict"]
    assert all(torch.equal(s2[f"stages.0.{k}"], v) for k, v in before.items())
