"""SPnet (symmetric pyramid network; spec: shared docs/methods/seeds-spnet-avsm.md, Part A): a shared-weight feature
pyramid of both images and, per level, a velocity estimator run in both directions whose outputs are averaged
antisymmetrically, so that the forward φ = exp(v₁) and the inverse φ⁻¹ = exp(−v₁) of the finest level come out of
one network pass and swapping fixed and moving swaps them exactly (to floating point).

What this file adds to the network (nn/spnet.py) and the shared core (nn/wrappers.py, nn/grid.py, losses/, field/):
- inference: the pair on the network grid (``OnNetGrid``: LPS canonical axes, sizes the nearest multiples of 8),
  one pass; the result is the level-1 fields exactly as the network integrated them, the forward ``forward[0]``
  and the inverse ``backward[0]`` = exp(−v₁) (``WithInverse``: the network's own backward field, no numerical
  inversion). They are handed over as level-1 fields directly: the network upsamples between its levels with
  align_corners=False (as the reference code), ``field.resize_disp`` uses True, so no coarser level is resized
  here. The only resampling is net grid → working grid (same box, align_corners=True, as for every learned method).
- inverse consistency: report.json ``method_info.inverse_consistency_net_grid`` — the paper's ICE (the code's
  mean |u_AB + u_BA∘(id + u_AB)| over all voxels and components, level 1, network-grid voxels) and the mean and
  max ‖φ∘φ⁻¹ − id‖ both ways; the pipeline adds the same on the working grid (``inverse_consistency_working_grid``).
- ``--spnet-refine N``: N Adam steps on v₁ (network-grid voxels) with the level-1 term of the training loss, which
  is symmetric (the swapped pair's refinement is the negated one, up to rounding); the inverse stays exp(−v₁).
- the training protocol of ``deepdiffreg train --method spnet`` (methods/learned.py): the symmetric multi-scale
  loss as the reference code computes it (Eq. 9–10, spec A.4):
      loss = Σ_i w_i [ (ncc(B_i, A_i∘φ_AB,i; win_i) + ncc(A_i, B_i∘φ_BA,i; win_i)) / 2 + λ·grad(v_i) ]
  with w = 1, ½, ¼, ⅛ (level 1 = full resolution), windows 9, 7, 5, 3, λ = 1, ncc = −mean(cross²/(var·var + 1e-5))
  with zero-padded box sums (= −``losses.local_ncc``, checked in Testing/engine/test_spnet_method.py) and
  grad(v) = mean over the 3 axes of mean(forward difference²) (= ``losses.gradient_l2``/3, VoxelMorph's
  gradient_loss('l2')); A = moving, B = fixed, the images of each level are the network's own pyramids (nearest
  subsampling). Optional semi-supervised Dice term (``--dice-weight``; off in the paper), symmetric like the rest:
  soft Dice of the moving labels warped by φ_AB against the fixed ones and of the fixed labels warped by φ_BA
  against the moving ones, averaged.

Deliberate choices: images are warped with the engine's ``field.warp`` (border padding, align_corners=True), as the
network warps its features (nn/spnet.py); the reference code pads with zeros. SPnet has no affine stage (spec
A.7): the pipeline's initial alignment runs first, as for every method. The user's fixed mask is not used by the
network (as for VoxelMorph-diff); ``--spnet-refine`` does not use it either.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..field import compose, warp
from ..losses import gradient_l2, local_ncc
from ..nn.spnet import LEVELS, SPNet
from ..nn.vxm_model import soft_dice_loss
from ..nn.wrappers import SVF, Displacement, OnNetGrid, Refine, WithInverse
from .base import Capabilities, FieldEstimate, PairOnGrid, option, register_method
from .learned import LearnedMethod, LearnedOptions, Trainable, TrainStep
from .refine import RefineOptions, plan_info, refine_plan

NCC_WINDOWS = (9, 7, 5, 3)               # levels 1..4 (paper)
LEVEL_WEIGHTS = (1.0, 0.5, 0.25, 0.125)  # levels 1..4 (the code: loss_1 + 0.5 loss_2 + 0.25 loss_3 + 0.125 loss_4)
REFINE_LR = 0.05                         # Adam step of --spnet-refine, network-grid voxels

DEFAULT_CONFIG: dict[str, Any] = {
    "int_steps": 7, "spacing_mm": 2.0, "reg_weight": 1.0, "ncc_windows": list(NCC_WINDOWS),
    "level_weights": list(LEVEL_WEIGHTS), "dice_weight": 0.0, "dice_labels": 8,
}


# -- the loss (spec A.4, as the reference code computes it) ------------------------------------------------------

def ncc(fixed: torch.Tensor, moving: torch.Tensor, win: int) -> torch.Tensor:
    """The code's ncc(I, J, win) = −mean(cross² / (var_I·var_J + 1e-5)), box sums with zero padding."""
    return -local_ncc(fixed, moving, win=int(win), eps=1e-5, squared=True)


def grad_loss(v: torch.Tensor) -> torch.Tensor:
    """(mean(dx²) + mean(dy²) + mean(dz²)) / 3 with forward differences (VoxelMorph gradient_loss('l2'))."""
    return gradient_l2(v) / 3.0


def level_terms(v: torch.Tensor, u_ab: torch.Tensor, u_ba: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                win: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarity, grad) of one level: ((ncc(B, A∘φ_AB) + ncc(A, B∘φ_BA)) / 2, grad(v)); A moving, B fixed."""
    sim = 0.5 * (ncc(b, warp(a, u_ab), win) + ncc(a, warp(b, u_ba), win))
    return sim, grad_loss(v)


def spnet_loss(out: dict[str, list[torch.Tensor]], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The symmetric multi-scale loss of one ``SPNet`` output (module docstring): {"loss", "sim" (Σ w_i sim_i),
    "reg" (Σ w_i grad_i, before λ), "ncc1" (the level-1 similarity)}."""
    lam = float(config.get("reg_weight", 1.0))
    wins, ws = config.get("ncc_windows", NCC_WINDOWS), config.get("level_weights", LEVEL_WEIGHTS)
    sim_tot = reg_tot = 0.0
    ncc1 = None
    for i in range(LEVELS):
        sim, reg = level_terms(out["velocity"][i], out["forward"][i], out["backward"][i],
                               out["pyramid_moving"][i], out["pyramid_fixed"][i], wins[i])
        sim_tot, reg_tot = sim_tot + ws[i] * sim, reg_tot + ws[i] * reg
        if i == 0:
            ncc1 = sim
    return {"loss": sim_tot + lam * reg_tot, "sim": sim_tot, "reg": reg_tot, "ncc1": ncc1}


def inverse_consistency(u: torch.Tensor, w: torch.Tensor) -> dict[str, float]:
    """Inverse consistency of a forward/inverse pair on one grid (voxels of that grid): the paper's ICE (the code's
    mean |u + w∘(id + u)| over all voxels and components, i.e. φ⁻¹∘φ − id) and the mean/max Euclidean norm of
    φ⁻¹∘φ − id and φ∘φ⁻¹ − id over all voxels."""
    e1, e2 = compose(w, u), compose(u, w)
    n1, n2 = e1.norm(dim=1), e2.norm(dim=1)
    return {"ice_paper_vox": float(e1.abs().mean()),
            "mean_norm_inv_after_fwd_vox": float(n1.mean()), "max_norm_inv_after_fwd_vox": float(n1.max()),
            "mean_norm_fwd_after_inv_vox": float(n2.mean()), "max_norm_fwd_after_inv_vox": float(n2.max()),
            "mean_displacement_vox": float(u.norm(dim=1).mean())}


class _Level1(WithInverse):
    """The network's level-1 result: forward exp(v₁) and inverse exp(−v₁) exactly as the network integrated them,
    with v₁ as the free parameter ``Refine`` optimises (a refined field is an ``SVF``: exp(q), inverse exp(−q))."""

    def __init__(self, velocity: torch.Tensor, forward: torch.Tensor, backward: torch.Tensor, steps: int,
                 info: dict[str, Any] | None = None):
        super().__init__(Displacement(forward, info=info), Displacement(backward, info=info))
        self.velocity, self.steps = velocity, int(steps)

    @property
    def param(self) -> torch.Tensor:
        return self.velocity

    def with_param(self, velocity: torch.Tensor) -> SVF:
        return SVF(velocity, self.steps, info=self.info)


@register_method
class SPnet(Trainable, LearnedMethod):
    name = "spnet"
    title = "SPnet (learned, symmetric, exact inverse)"
    description = ("SPnet: symmetric pyramid SVF network; forward exp(v) and inverse exp(-v) from one pass, "
                   "swapping fixed and moving swaps them")
    # memory: one pass at 80×96×80 (CPU, 1 thread) peaked 707 bytes per working voxel above the inputs; --refine
    # keeps an autograd graph of two level-1 integrations per step on top
    caps = Capabilities(learned=True, inverse="exact", contrasts="different", spacing_mm=(("cpu", 2.0),),
                        bytes_per_working_voxel=1000)
    variants = {"refine": {"refine": 50}}

    @dataclass
    class Options(LearnedOptions, RefineOptions):
        int_steps: int | None = option(None, min=0, max=20, help="scaling-and-squaring steps (default: the model's, "
                                                                 "7 as in the paper)")
        refine_lr: float = option(REFINE_LR, min=0.0, max=10.0,
                                  help="Adam step of --spnet-refine (network-grid voxels of the level-1 velocity)")

    def estimate(self, pair: PairOnGrid, device: torch.device, progress) -> FieldEstimate:
        t0 = time.time()
        o = self.opts
        net, cfg, model = self.load_network(device)
        steps = int(cfg.get("int_steps", 7) if o.int_steps is None else o.int_steps)
        net.int_steps = steps
        progress(0.1, f"loaded model {model['id']}")
        ice: dict[str, Any] = {}

        def module(m: torch.Tensor, f: torch.Tensor) -> _Level1:
            out = net(m, f)
            v, u, w = out["velocity"][0], out["forward"][0], out["backward"][0]
            ice.update(inverse_consistency(u, w))
            return _Level1(v, u, w, steps)

        run = module
        n_refine, refine_lr, why = refine_plan(o, pair.follow_up)
        if n_refine > 0:
            win, lam = int(cfg.get("ncc_windows", NCC_WINDOWS)[0]), float(cfg.get("reg_weight", 1.0))

            def loss_fn(d, m, f):                         # level-1 term of the training loss, symmetric
                u, w = d.disp(f.shape[2:]), d.inverse().disp(f.shape[2:])
                sim, reg = level_terms(d.velocity, u, w, m, f, win)
                return sim + lam * reg

            run = Refine(module, loss_fn, n_refine, refine_lr,
                         progress=lambda fr, msg: progress(0.3 + 0.6 * fr, msg))
        with torch.no_grad():
            res = OnNetGrid(run, multiple=net.size_multiple)(pair, device)
            phi = res.deformation
            info: dict[str, Any] = {"int_steps": steps, "levels": LEVELS, **res.info, **phi.info,
                                    "inverse": "the network's backward field exp(-v1) (level 1), integrated with the "
                                               "same scaling and squaring as the forward exp(v1)"}
            info.update(plan_info(n_refine, why))
            if n_refine > 0:                              # the refined pair on the network grid
                ice.update(inverse_consistency(phi.disp(res.grid.net_shape), phi.inverse().disp(res.grid.net_shape)))
                info["inverse"] = "exp(-v1) of the refined level-1 velocity v1 (scaling and squaring)"
            info["inverse_consistency_net_grid"] = ice
            disp, inv = res.disp_vox(), res.inverse_disp_vox()
        info["seconds"] = round(time.time() - t0, 3)
        progress(1.0, "spnet done")
        return FieldEstimate(disp_vox=disp.cpu(), inverse_disp_vox=inv.cpu(), info=info, model=model)

    # -- training protocol (methods/learned.py; driven by `deepdiffreg train --method spnet`) --------------------
    @dataclass
    class TrainOptions:
        reg_weight: float = option(1.0, min=0.0, max=1e6, help="λ of the velocity gradient penalty (paper: 1)")
        ncc_windows: tuple[int, ...] = option(NCC_WINDOWS, min=1, max=99,
                                              help="local NCC windows of levels 1..4 (odd; paper: 9 7 5 3)")
        dice_weight: float = option(0.0, min=0.0, max=1e6, help="optional semi-supervised Dice term weight")
        dice_labels: int = option(8, min=1, max=1000, help="labels drawn per step for the Dice term")

    network_keys = ()                      # the architecture is fixed (spec A.3)
    loss_terms = ("loss", "sim", "reg", "ncc1", "dice_loss")

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, list) else v for k, v in DEFAULT_CONFIG.items()}

    @classmethod
    def build_network(cls, config: dict[str, Any]) -> SPNet:
        wins = list(config.get("ncc_windows", NCC_WINDOWS))
        if len(wins) != LEVELS or any(int(w) % 2 == 0 for w in wins):
            from ..errors import BadInput
            raise BadInput(f"--ncc-windows: {LEVELS} odd windows, one per level (got {wins})")
        return SPNet(int_steps=int(config.get("int_steps", 7)))

    @classmethod
    def training_loss(cls, net, batch: dict[str, Any], config: dict[str, Any], step: TrainStep
                      ) -> dict[str, torch.Tensor]:
        a, b = batch["moving"], batch["fixed"]
        out = net(a, b)
        terms = spnet_loss(out, config)
        fl, ml = batch.get("fixed_labels"), batch.get("moving_labels")
        terms["dice_loss"] = torch.zeros((), device=a.device)
        if config.get("dice_weight", 0) > 0 and fl is not None and ml is not None:
            present = sorted(set(torch.unique(fl).tolist()) & set(torch.unique(ml).tolist()) - {0})
            if present:
                rng = np.random.default_rng(step.seed * 31 + step.index)
                n = min(int(config.get("dice_labels", 8)), len(present))
                labels = [int(x) for x in rng.choice(present, n, replace=False)]
                dl = 0.5 * (soft_dice_loss(fl, ml, out["forward"][0], labels)
                            + soft_dice_loss(ml, fl, out["backward"][0], labels))
                terms["dice_loss"] = dl
                terms["loss"] = terms["loss"] + float(config["dice_weight"]) * dl
        return terms

    @classmethod
    def validation_disp(cls, net, moving: torch.Tensor, fixed: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
        return net(moving, fixed)["forward"][0]

    @classmethod
    def model_card(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {"title": "SPnet",
                "input_grid": {"spacing_mm": config.get("spacing_mm", 2.0), "size_multiple": SPNet.size_multiple,
                               "orientation": "LPS-aligned array axes (the method reorients internally)"},
                "modality": "T1-weighted brain MRI, skull-stripped or whole head (mono-contrast pairs; also trained "
                            "on synthetic random-contrast label-map pairs)"}
