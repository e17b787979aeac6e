"""VoxelMorph-diff (Dalca et al., MedIA 2019): a U-Net predicts a Gaussian over a stationary velocity field on the
½-resolution grid; at test time the mean μ is integrated (scaling and squaring, 7 steps) and upsampled.

What this file adds to the shared core (nn/vxm_model.py, nn/wrappers.py, losses/kl.py, field/):
- the network grid (nn/grid.py, ``OnNetGrid``): the network was trained on LPS-aligned arrays, so the pair is
  permuted/flipped to the nearest LPS axis order and resampled (same box) to the nearest sizes that are multiples
  of 16; the field is resized back (values rescaled) and mapped back to the working axes;
- symmetric inference (default; ``--vxm-no-symmetric`` for the paper's forward pass only): v = ½(μ(m, f) − μ(f, m)),
  the mean of the forward estimate and the inverse of the swapped pair's estimate — +0.01 validation Dice on all
  8 validation pairs for one more network pass (docs/training.md);
- a model may be a recursive cascade of such networks (config ``stages`` > 1, nn/vxm_model.py): the earlier stages
  warp the moving image, the last one registers what is left, φ = φ1 ∘ … ∘ φK; refinement and the uncertainty
  act on the last stage's velocity, given the earlier ones;
- inverse = exp(−v) on the same grid (a cascade: exp(−vK) ∘ … ∘ exp(−v1));
- uncertainty (methods/vxm_uncertainty.py): by default ``refine`` — how far a few more steps of the model's own
  objective move the result (the candidate that followed the true error best, docs/benchmarks.md); ``laplace`` (the
  diagonal Laplace posterior of that objective), ``sampled`` (the network's variance head, as in the paper) and
  the other measured candidates on request. The map is declared not QA (``caps.uncertainty_qa``: its measured ρ
  against the true error is below 0.5) and report.json ``method_info.uncertainty_qa`` says so;
- ``--refine N``: N Adam steps on μ of the image term + λ·Laplacian prior term of the KL; the image term is
  30·(1 − local NCC²) by default (``--vxm-refine-similarity``; the model's own MSE/σ² on request), which follows a
  follow-up scan's true map better than the MSE (measured beside ``REFINE_SIMILARITIES``); on a pair marked
  ``register --follow-up`` (one patient's scans) without ``--refine``, ``--vxm-follow-up-refine`` steps (20) of it
  at ``--vxm-follow-up-refine-lr`` (0.05; measured beside ``FOLLOW_UP_REFINE``);
- the training protocol of ``deepdiffreg train --method vxm-diff`` (methods/learned.py): its training options
  (loss weights, Dice term, cascade stages, channels), the negative ELBO (+ Dice) of a batch, validation fields,
  seeding a deeper cascade from a shallower model and freezing its earlier stages.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..field import warp
from ..losses.kl import recon_mse
from ..losses.similarity import ncc_loss
from ..nn.unet import DEFAULT_DEC, DEFAULT_ENC
from ..nn.vxm_model import (DEFAULT_CONFIG, build_net, load_stages, predict_disp, stage_nets, svf_stage,
                            training_step_loss)
from ..nn.wrappers import Cascade, OnNetGrid, Refine
from ..cores import spare_core
from .base import UNCERTAINTY_QA_RHO, Capabilities, Deferred, FieldEstimate, Map, PairOnGrid, option, register_method
from .learned import LearnedMethod, LearnedOptions, Trainable, TrainStep
from .refine import RefineOptions, plan_info, refine_plan, svf_objective
from .vxm_uncertainty import (flip_std_mm, inconsistency_mm, laplace_std_mm, refine_shift_mm, residual_disp_mm,
                              sampled_std_mm, stage_std_mm)

UNCERTAINTY_KINDS = ("refine", "laplace", "sampled", "stages", "consistency", "flip", "residual")
# Steps and step of the ``refine`` uncertainty map. Each step is a forward and backward pass of the objective on the
# network grid: 10 steps were 2.7 s of a 1 mm brain's register stage (5.3 s vs 2.6 s without steps, one thread,
# Intel Xeon 2-core, 2026-12-02; report total 10.1 s) (issue 17). Measured
# ρ against the true displacement error (same-1 / known-15, weights v0.5.0, 2026-12-02): 10 steps of 0.025: 0.533 /
# 0.309; 5 of 0.025: 0.535 / 0.219; 5 of 0.05: 0.531 / 0.267; 5 of 0.05 with a 5³ average: 0.509 / 0.073; 10 steps
# with the images on the ½ grid (8x cheaper per step): 0.409 / −0.011; the image term read at every 2nd net voxel
# per axis (full-resolution images, 8x fewer warped voxels): 10 of 0.025 0.467 / 0.246, 5 of 0.05 0.463 / 0.207 —
# the map needs the objective at full resolution. Adam's steps are about ``lr`` each where the
# gradient keeps its sign, so half the steps at twice the step reach about as far.
# The image term of the ``refine`` map (2026-12-07): the MSE of the model's likelihood explains a bias field or a
# noise pattern by displacement, so its steps also move where the field is right. The squared local NCC of
# --vxm-refine (blind to a smooth bias), with a smaller window and a weaker weight than --vxm-refine's (3³ net voxels,
# weight 10: more of the prior, which carries the image's evidence into the flat regions) and longer steps, follows
# the error much better. ρ against the true displacement error, weights v0.5.0, 2-core AMD EPYC, one
# `deepdiffreg register` per cell (same-1 with --no-align), pairs built by `deepdiffreg benchmark`:
#   image term, weight, window, steps x lr     same-1   known-15 | held out: same-2   same-3   known-16
#   mse, 5 x 0.05 (the default before)         0.531    0.267    |           0.47     0.52     0.25
#   ncc 30, 5³, 5 x 0.05                       0.578    0.320
#   ncc 30, 5³, 10 x 0.05                      0.610    0.391
#   ncc 30, 5³, 20 x 0.05                      0.664    0.465
#   ncc 30, 5³, 30 x 0.1                       0.658    0.498
#   ncc 30, 5³, 10 x 0.2                       0.671    0.471
#   ncc 30, 5³, 10 x 0.4                       0.621    0.492
#   ncc 100, 5³, 10 x 0.2                      0.597    0.434
#   ncc 10, 5³, 10 x 0.2                       0.701    0.455    |           0.664    0.696    0.484
#   ncc 30, 7³, 10 x 0.2                       0.656    0.439
#   ncc 30, 3³, 10 x 0.2                       0.639    0.531    |           0.644    0.637    0.526
#   ncc 30, 3³, 5 x 0.4                        0.486    0.392
#   ncc 10, 3³, 10 x 0.2 (the default)         0.684    0.526    |           0.665    0.682    0.526
# The settings were chosen on same-1 and known-15 (the benchmark's pairs) and checked on same-2, same-3 and known-16,
# which played no part in the choice. Cost: 10 steps instead of 5, each ~0.1 s dearer than an MSE step (known-15,
# 1 mm brain: register stage 3.1 s → 5.1 s; same-1, 2 mm whole head: 6.7 s → 9.5 s).
UNCERTAINTY_STEPS, UNCERTAINTY_LR = 10, 0.2
UNCERTAINTY_SIMILARITY, UNCERTAINTY_NCC_WEIGHT, UNCERTAINTY_NCC_WINDOW = "ncc", 10.0, 3
# How well the default map (``refine`` with the settings above) followed the true displacement error (Spearman ρ
# over the fixed brain) on the benchmark's known-deformation pairs, for the weights it was measured with
# (docs/benchmarks.md). At or above UNCERTAINTY_QA_RHO on each, so ``caps.uncertainty_qa`` is True and report.json
# says the map may be read as QA — for these weights and these settings only: anything else is not measured (null)
# and not QA.
UNCERTAINTY_MEASURED = {"kind": "refine", "steps": UNCERTAINTY_STEPS, "lr": UNCERTAINTY_LR,
                        "similarity": UNCERTAINTY_SIMILARITY, "ncc_weight": UNCERTAINTY_NCC_WEIGHT,
                        "ncc_window": UNCERTAINTY_NCC_WINDOW,
                        "weights_sha256": "980fe910dcde96257faf5af79d3d64cf794c385276688bbb9a0138587ea2a7e0",
                        "rho_displacement": {"same-1": 0.684, "known-15": 0.526, "same-2": 0.665, "same-3": 0.682,
                                             "known-16": 0.526},
                        "source": "methods/vxm_diff.py, the table above UNCERTAINTY_STEPS (2026-12-07, weights "
                                  "v0.5.0); docs/benchmarks.md"}


# Adam step of --refine, in ½-grid voxels. Measured on ixi-2 (IXI631 ← IXI633, whole head, v0.4.0, 50 steps):
# 0.05 → Dice 0.677, 0.082 % folded voxels; 0.025 → 0.673, 0.018 %; 0.0125 → 0.667, 0.001 %. Larger steps overshoot
# into folding fields that the best-loss rule keeps.
REFINE_LR = 0.025

# The image term of --refine. The model's own MSE/σ² (the paper's objective, the only one before 2026-12-03) pulls
# the field towards explaining intensity differences that are not displacement: a bias field, a tumour's change, a
# second contrast. 50 steps with it left same-1 (a follow-up scan, ±8 % bias) at 1.01x the true mean displacement
# and BraTS-Reg's TRE at 3.22 mm, worse than the affine's 2.51. Squared local NCC (NODEO's term) is blind to a smooth
# bias (and, inside each window, to a linear intensity change). Measured 2026-12-03 (benchmark pairs, 50 steps,
# lr 0.025, weights v0.5.0, one run each on the loaded 2-core AMD EPYC box; MSE row: the 09:15 run, Intel Xeon):
#   image term            same-1 error    BraTS TRE   ixi-1 Dice   ixi-2 Dice   contrast-15-16 Dice
#   mse (model's)         1.01x           3.22 mm     0.674        0.670        0.094
#   ncc, weight 300       0.73x           2.07        —            —            0.096
#   ncc, weight 100       0.64x           2.04        0.690        0.689        —
#   ncc, weight 30        0.56x           2.13        0.687        0.688        —
# Weight 30 is the default: the only one under the 0.6x on same-1, TRE below the affine's, Dice above the
# MSE refinement's, no folded voxel on ixi-1 or ixi-2 (weight 100: 0.0027 / 0.0011 %; MSE 0.0048 % on ixi-1).
# A bad network field (contrast-15-16) is not repaired by either: refinement starts from it.
REFINE_SIMILARITIES = ("ncc", "mse")
REFINE_NCC_WEIGHT = 30.0
REFINE_NCC_WINDOW = 5          # network-grid voxels: 10 mm at the model's 2 mm (NODEO: 9 mm)


# ``register --follow-up`` (the pair is one patient's): 20 steps of --vxm-refine's objective at 0.05 ½-grid voxels.
# Measured 2026-12-07 on the benchmark's follow-up pairs, v0.5.0, one thread (the network alone: same-1 error 0.93x
# the true displacement, BraTS-Reg TRE 3.37 mm against 2.51 after the affine): 20 x 0.05 -> 0.56x, 2.24 mm;
# 10 x 0.1 -> 0.58x, 2.28 mm; 20 x 0.025 -> 0.60x, 2.59 mm (worse than the affine); 50 x 0.025 (the
# vxm-diff+refine row) 0.56x, 2.13 mm for ~2.5x the steps. ~0.3-0.6 s a step on a 2 mm whole head.
FOLLOW_UP_REFINE, FOLLOW_UP_REFINE_LR = 20, 0.05


def refine_image_term(kind: str, fixed: torch.Tensor, warped: torch.Tensor, sigma: float, ncc_weight: float,
                      ncc_window: int) -> torch.Tensor:
    """The image term of --vxm-refine for (B, 1, D, H, W) images on the network grid: ``mse`` =
    mean((f − m∘φ)²)/σ² (the model's likelihood), ``ncc`` = ncc_weight·(1 − mean local NCC²) in a ncc_window³
    window (an even window means the next odd one)."""
    if kind == "mse":
        return recon_mse(fixed, warped, sigma)
    if kind == "ncc":
        return ncc_weight * ncc_loss(fixed, warped, win=int(ncc_window) | 1)
    raise ValueError(f"vxm-diff: unknown refine similarity {kind!r} ({' | '.join(REFINE_SIMILARITIES)})")


def _uncertainty_qa(settings: dict[str, Any], model: dict[str, Any], refined: bool) -> dict[str, Any]:
    """What report.json says about the map: QA (reliable) only when it is the measured map — the same kind and
    settings (``settings``: kind, steps, lr, similarity, ncc_weight, ncc_window), the same weights, no
    --vxm-refine — with the ρ measured for it (``UNCERTAINTY_MEASURED``); anything else: not measured, not QA."""
    m = UNCERTAINTY_MEASURED
    # after --vxm-refine the map is another one (its rho against the true error, known-15 / same-1: 0.02 / 0.04
    # with the 10 MSE steps of 0.025, -0.07 / -0.42 with 5 of 0.05; benchmark runs of 2026-12-02)
    same = (all(settings.get(k) == m[k] for k in ("kind", "steps", "lr", "similarity", "ncc_weight", "ncc_window"))
            and model.get("sha256") == m["weights_sha256"] and not refined)
    passed = same and min(m["rho_displacement"].values()) >= UNCERTAINTY_QA_RHO
    return {"reliable": bool(VxmDiff.caps.uncertainty_qa and passed), "threshold_rho": UNCERTAINTY_QA_RHO,
            "measured_rho_displacement": dict(m["rho_displacement"]) if same else None,
            "measured_in": m["source"] if same else None,
            "note": (f"Spearman rho against the true registration error at least {UNCERTAINTY_QA_RHO:g} on every "
                     "known-deformation pair it was measured on") if passed else
                    ("the map does not follow the registration error closely enough to be used as QA "
                     f"(Spearman rho against the true error below {UNCERTAINTY_QA_RHO:g} on a known-deformation "
                     "pair)") if same else
                    "not measured for these weights or these settings; not validated as QA"}


@register_method
class VxmDiff(Trainable, LearnedMethod):
    name = "vxm-diff"
    title = "VoxelMorph-diff (learned, with uncertainty)"
    description = "VoxelMorph-diff: probabilistic diffeomorphic U-Net (SVF, scaling and squaring) with uncertainty"
    flag_prefix = "vxm"
    # Peak memory (Testing/engine/measure_method_memory.py, 2026-12-02, 2-core AMD EPYC, 24 GB, load 2-6):
    # synth-15-16 (1 mm, 160x224x192), default settings, --spacing 1.5 / 2 / 3 mm (2.05M / 0.89M / 0.26M working
    # voxels): 1152 / 889 / 850 MB, the register process's VmHWM; test_memory_estimate's method that holds next to
    # nothing: 838 / 762 / 689 MB. Own part: the peak's slope between 1.5 and 2 mm (236 B per working voxel) minus
    # that method's (68 B): 168 B, declared 170; plus 160 MB whatever the grid (the two-stage network: its 3 mm peak
    # lies 161 MB above the other's).
    caps = Capabilities(learned=True, inverse="exact", uncertainty=True, uncertainty_qa=True, contrasts="same",
                        spacing_mm=(("cpu", 2.0),), bytes_per_working_voxel=170, extra_memory_mb=160)
    variants = {"refine": {"refine": 50}}
    benchmark_variants = ("refine",)   # the benchmark's vxm-diff+refine row

    @dataclass
    class Options(LearnedOptions, RefineOptions):
        symmetric: bool = option(True, help="mean of the forward velocity and the negated velocity predicted for the "
                                            "swapped pair (one more pass); off: the network's forward prediction "
                                            "only (the paper)")
        int_steps: int = option(7, min=0, max=20, help="scaling-and-squaring steps (the model was trained with 7)")
        uncertainty: str = option("refine", choices=UNCERTAINTY_KINDS,
                                  help="uncertainty map: 'refine' = how far --vxm-uncertainty-steps more steps of "
                                       "squared local NCC + the model's prior move the result (default: it followed "
                                       "the true error best; QA for the bundled weights); 'laplace' = posterior std "
                                       "of the model's objective; 'sampled' = the "
                                       "network's variance head; 'stages', 'consistency', 'flip', 'residual': "
                                       "other measured candidates (methods/vxm_uncertainty.py, docs/benchmarks.md)")
        uncertainty_samples: int = option(8, min=0, max=1000, help="velocity samples for --vxm-uncertainty sampled "
                                                                   "(0: exp(logvar), no sampling)")
        uncertainty_steps: int = option(UNCERTAINTY_STEPS, min=1, max=10_000,
                                        help="Adam steps of --vxm-uncertainty refine")
        uncertainty_lr: float = option(UNCERTAINTY_LR, min=0.0, max=10.0,
                                       help="Adam step of --vxm-uncertainty refine (½-grid voxels)")
        uncertainty_similarity: str = option(UNCERTAINTY_SIMILARITY, choices=REFINE_SIMILARITIES,
                                             help="image term of --vxm-uncertainty refine's objective: 'ncc' = "
                                                  "--vxm-uncertainty-ncc-weight x (1 - squared local NCC) "
                                                  "(default), 'mse' = the model's MSE/sigma^2 (the default before)")
        uncertainty_ncc_weight: float = option(UNCERTAINTY_NCC_WEIGHT, min=0.0, max=1e6,
                                               help="weight of (1 - NCC^2) in the uncertainty map's objective")
        uncertainty_ncc_window: int = option(UNCERTAINTY_NCC_WINDOW, min=3, max=31,
                                             help="local NCC window of the uncertainty map's objective, "
                                                  "network-grid voxels (odd)")
        refine_lr: float = option(REFINE_LR, min=0.0, max=10.0, help="Adam step for --vxm-refine (½-grid voxels)")
        follow_up_refine: int = option(FOLLOW_UP_REFINE, min=0, max=100_000,
                                       help="--vxm-refine steps on a pair marked --follow-up (one patient) when "
                                            "--vxm-refine is 0 (0: none)")
        follow_up_refine_lr: float = option(FOLLOW_UP_REFINE_LR, min=0.0, max=10.0,
                                            help="Adam step of the follow-up refinement (½-grid voxels)")
        refine_similarity: str = option("ncc", choices=REFINE_SIMILARITIES,
                                        help="image term of --vxm-refine: 'ncc' = --vxm-refine-ncc-weight x (1 - "
                                             "squared local NCC), blind to a smooth bias field and, inside each "
                                             "window, to a linear intensity change (default: closer to the true "
                                             "map on follow-up pairs); "
                                             "'mse' = the model's own MSE/sigma^2 (the paper's objective)")
        refine_ncc_weight: float = option(REFINE_NCC_WEIGHT, min=0.0, max=1e6,
                                          help="weight of (1 - NCC^2) in --vxm-refine-similarity ncc, against the "
                                               "model's Laplacian prior")
        refine_ncc_window: int = option(REFINE_NCC_WINDOW, min=3, max=31,
                                        help="local NCC window of --vxm-refine-similarity ncc, network-grid voxels "
                                             "(odd; an even value means the next odd one)")
        seed: int = option(0, min=0, help="random seed of the uncertainty samples")

    def estimate(self, pair: PairOnGrid, device: torch.device, progress) -> FieldEstimate:
        t0 = time.time()
        o = dataclasses.asdict(self.opts)
        net, cfg, model = self.load_network(device)
        progress(0.1, f"loaded model {model['id']}")
        steps, symmetric = int(o["int_steps"]), bool(o["symmetric"])
        # a cascade's earlier stages warp the moving image, the last one registers what they leave; refinement
        # optimises the last stage's velocity given the earlier ones (for one network: the network's velocity)
        stages = [svf_stage(u, steps, symmetric) for u in stage_nets(net)]
        sig, lam = cfg["image_sigma"], cfg["prior_lambda"]

        def objective(kind: str, ncc_weight: float = 0.0, ncc_window: int = 3):   # image term ``kind`` + the
            return svf_objective(     # model's prior, for the last stage's SVF on the pair it sees (net grid)
                lambda fp, warped: refine_image_term(kind, fp, warped, sig, float(ncc_weight), int(ncc_window)), lam)

        n_refine, refine_lr, why = refine_plan(o, pair.follow_up)
        if n_refine > 0:
            stages[-1] = Refine(stages[-1], objective(o["refine_similarity"], o["refine_ncc_weight"],
                                                      o["refine_ncc_window"]), n_refine, refine_lr,
                                progress=lambda fr, msg: progress(0.4 + 0.3 * fr, msg))
        with torch.no_grad():
            res = OnNetGrid(Cascade(stages), multiple=net.size_multiple)(pair, device)
        phi = res.deformation
        last, m_in, fp = phi.parts[-1], phi.stage_inputs[-1], res.fixed
        mu, logvar = last.velocity, last.extras["logvar"]
        progress(0.4 if n_refine <= 0 else 0.7, "network done")
        info: dict[str, Any] = {"int_steps": steps, "velocity_grid": list(mu.shape[2:]), **res.info,
                                "symmetric": symmetric, "stages": len(phi.parts), **phi.info}
        info.update(plan_info(n_refine, why))
        if n_refine > 0:
            ncc = o["refine_similarity"] == "ncc"
            info["refine_image_term"] = (f"{float(o['refine_ncc_weight']):g} x (1 - local NCC^2), window "
                                         f"{int(o['refine_ncc_window']) | 1} net voxels" if ncc
                                         else "MSE/sigma^2 (the model's likelihood)")
        with torch.no_grad():
            disp, inv = res.disp_vox(), res.inverse_disp_vox()
            mm = res.grid.mm_per_voxel(mu.shape[2:], mu.dtype, mu.device)   # mm per ½-grid voxel, canonical axes
            kind, ns = o["uncertainty"], int(o["uncertainty_samples"])
            net_mm = res.grid.mm_per_voxel(fp.shape[2:], mu.dtype, mu.device)    # mm per net-grid voxel
            plain = [svf_stage(u, steps, symmetric) for u in stage_nets(net)]  # the stages without refinement
            if kind == "laplace":
                unc = laplace_std_mm(mu, fp, m_in, last.disp(fp.shape[2:]), cfg["prior_lambda"],
                                     cfg["image_sigma"], mm)
                info["uncertainty"] = ("laplace: sqrt(trace) of the diagonal Laplace posterior covariance of the "
                                       "velocity at mu for this pair (prior lambda*D + data 2*grad^2/sigma_loc^2, "
                                       "sigma_loc^2 = sigma^2 + local mean squared residual), mm")
            elif kind == "sampled":
                unc = sampled_std_mm(mu, logvar, ns, steps, o["seed"], mm)
                info["uncertainty"] = (f"sampled: sqrt(trace of the displacement covariance) in mm over {ns} "
                                       f"velocity samples z = mu + exp(logvar/2)*eps" if ns > 0 else
                                       "sampled: sqrt(trace of the velocity posterior covariance exp(logvar)) in mm")
            elif kind == "stages":
                unc = stage_std_mm(last.exp(), mm)
                info["uncertainty"] = "stages: |exp(v_K)|, the last cascade stage's correction, mm"
            elif kind == "consistency":
                one_way = Cascade([svf_stage(u, steps, False) for u in stage_nets(net)])
                grid = tuple(fp.shape[2:])
                unc = inconsistency_mm(one_way(res.moving, fp).disp(grid), one_way(fp, res.moving).disp(grid), net_mm)
                info["uncertainty"] = ("consistency: |u + w o (id + u)| of the forward-only predictions u (moving, "
                                       "fixed) and w (swapped pair), mm")
            elif kind == "flip":
                grid = tuple(fp.shape[2:])
                mirrored = Cascade(plain)(res.moving.flip(4), fp.flip(4)).disp(grid).flip(4)
                mirrored = mirrored * torch.tensor([1.0, 1.0, -1.0], dtype=mirrored.dtype,
                                                   device=mirrored.device).view(1, 3, 1, 1, 1)
                unc = flip_std_mm(Cascade(plain)(res.moving, fp).disp(grid), mirrored, net_mm)
                info["uncertainty"] = ("flip: |u - mirror(u of the left-right mirrored pair)| / 2 (test-time "
                                       "augmentation, unrefined network), mm")
            elif kind == "residual":
                unc = residual_disp_mm(fp, warp(res.moving, phi.disp(fp.shape[2:])), net_mm)
                info["uncertainty"] = ("residual: local least-squares shift (Lucas-Kanade, 7^3 net voxels) between "
                                       "the fixed and the warped moving image after registration, mm")
            elif kind == "refine":
                ns, sim = int(o["uncertainty_steps"]), o["uncertainty_similarity"]
                unc_fn = objective(sim, o["uncertainty_ncc_weight"], o["uncertainty_ncc_window"])

                def shift(stop=None):     # |exp(v') - exp(v)| on the working grid, mm
                    with torch.no_grad():
                        return res.scalar_to_work(refine_shift_mm(
                            mu, lambda v: unc_fn(last.with_param(v), m_in, fp), ns, float(o["uncertainty_lr"]),
                            steps, mm, stop=stop)).cpu()
                # the steps are most of a run's time after the network (~2 s of one core): with a core to spare
                # they run beside the write stage, which needs the map only for its file (same numbers)
                unc = Deferred(shift, "uncertainty") if spare_core() else shift()
                term = (f"{float(o['uncertainty_ncc_weight']):g} x (1 - local NCC^2), window "
                        f"{int(o['uncertainty_ncc_window']) | 1} net voxels" if sim == "ncc" else "MSE/sigma^2")
                info["uncertainty"] = (f"refine: |exp(v') - exp(v)| after {ns} more Adam steps (step "
                                       f"{float(o['uncertainty_lr']):g} half-grid voxels) of the objective "
                                       f"{term} + the model's Laplacian prior from the result's last-stage "
                                       f"velocity v, averaged over 3^3 half-grid voxels, mm")
            else:
                raise ValueError(f"vxm-diff: unknown uncertainty {kind!r} ({' | '.join(UNCERTAINTY_KINDS)})")
            if not isinstance(unc, Deferred):
                unc = res.scalar_to_work(unc).cpu()
            info["uncertainty_qa"] = _uncertainty_qa(
                {"kind": kind, "steps": int(o["uncertainty_steps"]), "lr": float(o["uncertainty_lr"]),
                 "similarity": o["uncertainty_similarity"], "ncc_weight": float(o["uncertainty_ncc_weight"]),
                 "ncc_window": int(o["uncertainty_ncc_window"]) | 1}, model, refined=n_refine > 0)
            info["velocity_std_mean_halfgrid_vox"] = float(torch.exp(0.5 * logvar).mean())
        info["seconds"] = round(time.time() - t0, 3)
        progress(1.0, "vxm-diff done")
        return FieldEstimate(disp_vox=disp.cpu(), inverse_disp_vox=inv.cpu(),
                             maps={"uncertainty": Map(unc, "mm", info["uncertainty"])}, info=info,
                             model=model)

    # -- training protocol (methods/learned.py; driven by `deepdiffreg train --method vxm-diff`) ------------------
    @dataclass
    class TrainOptions:
        image_sigma: float = option(0.02, min=1e-6, max=10.0, help="σ of the Gaussian image likelihood (MSE/σ²)")
        prior_lambda: float = option(20.0, min=0.0, max=1e6, help="λ of the Laplacian prior on the velocity")
        dice_weight: float = option(0.0, min=0.0, max=1e6, help="optional semi-supervised Dice term weight")
        dice_labels: int = option(8, min=1, max=1000, help="labels drawn per step for the Dice term")
        dice_grid: str = option("full", choices=("full", "half"),
                                help="grid of the Dice term: the image grid, or the velocity's ½ grid with 2×2×2-"
                                     "averaged one-hot labels (the Dice warp is then 8× cheaper: ~0.9 → ~0.55 s per "
                                     "CPU step)")
        stages: int = option(1, min=1, max=8,
                             help="networks in a recursive cascade (φ1∘φ2∘…); with --init from a model with fewer "
                                  "stages, the earlier stages are that model (frozen) and the last one is fine-tuned "
                                  "on what they leave")
        train_stages: str = option("last", choices=("last", "all"),
                                   help="which cascade stages are trained: the last one on what the frozen earlier "
                                        "ones leave, or all of them end to end (each stage's KL term added; needed "
                                        "when the earlier stages must learn something new, e.g. other contrasts)")
        enc: tuple[int, ...] = option(DEFAULT_ENC, min=1, max=1024, help="encoder channels (stride-2 blocks)")
        dec: tuple[int, ...] = option(DEFAULT_DEC, min=1, max=1024, help="decoder channels")

    network_keys = ("enc", "dec")             # an --init file keeps its layers; stages may grow (load_stages)
    loss_terms = ("loss", "recon", "kl", "dice_loss")

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return dict(DEFAULT_CONFIG)

    @classmethod
    def build_network(cls, config: dict[str, Any]):
        return build_net(config)

    @classmethod
    def init_network(cls, net, weights: dict[str, Any]) -> None:
        load_stages(net, weights)

    @classmethod
    def prepare_for_training(cls, net, config: dict[str, Any] | None = None) -> None:
        if (config or {}).get("train_stages", "last") == "all":
            return
        for unet in stage_nets(net)[:-1]:            # by default a cascade trains its last stage only
            unet.requires_grad_(False)

    @classmethod
    def training_loss(cls, net, batch: dict[str, Any], config: dict[str, Any], step: TrainStep
                      ) -> dict[str, torch.Tensor]:
        fl, ml = batch.get("fixed_labels"), batch.get("moving_labels")
        labels = None
        if config.get("dice_weight", 0) > 0 and fl is not None:
            present = [l for l in torch.unique(fl).tolist() if l != 0]
            rng = np.random.default_rng(step.seed * 31 + step.index)
            n = min(int(config.get("dice_labels", 8)), len(present))
            labels = [int(x) for x in rng.choice(present, n, replace=False)] if present else None
        return training_step_loss(net, batch["moving"], batch["fixed"], config, step.generator, fl, ml, labels,
                                  same_contrast=bool(batch.get("same_contrast", True)))

    @classmethod
    def validation_disp(cls, net, moving: torch.Tensor, fixed: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
        return predict_disp(net, moving, fixed, config["int_steps"])

    @classmethod
    def model_card(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {"title": "VoxelMorph-diff",
                "input_grid": {"spacing_mm": config.get("spacing_mm", 2.0), "size_multiple": 2 ** len(config["enc"]),
                               "orientation": "LPS-aligned array axes (the method reorients internally)"},
                "modality": "T1-weighted brain MRI, skull-stripped or whole head (mono-contrast pairs; also trained "
                            "on synthetic random-contrast label-map pairs)",
                # what the weights handle: the training config may state it (contrast-agnostic training), else the
                # method's declaration (mono-contrast: the image term is MSE)
                "contrasts": config.get("contrasts", cls.caps.contrasts)}
