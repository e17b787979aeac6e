"""R2Net (Joshi & Hong, MedIA 2023): a U-Net predicts an initial velocity v0 at the network grid's full resolution
and a stack of Lipschitz-continuous residual blocks integrates it (nn/r2net.py); MS-R2Net fuses the initial
velocities of a chunk network and a ×2-downsampled network and integrates them at full resolution, for volumes too
large for one U-Net pass.

Spec: shared docs/methods/seeds-r2net-nodeo.md, Part A. What this file adds to the network (nn/r2net.py):

- the model is chosen by what it was trained as: ``--r2net-variant nsvf|svf``, ``--r2net-probabilistic``,
  ``--r2net-multiscale`` pick the newest installed model trained that way (default: the newest model of this
  method, whatever it is); a model that does not match what was asked is refused (one line, exit 2).
  ``--r2net-multiscale`` with a single-scale model builds MS-R2Net from it: both phase-1 networks are that model,
  the fusion starts as the mean of the two velocities and phase 2 integrates with the model's own LC blocks — an
  untrained phase 2 (stated in report.json), useful for volumes one U-Net pass cannot hold;
- single scale runs on the network grid (LPS canonical axes, sizes a multiple of 16, ``OnNetGrid``); MS-R2Net runs
  on the working grid itself (its branches resample their own inputs), so its full-resolution memory is a few
  3-channel fields;
- ``--r2net-int-steps``: LC steps; an SVF model (one shared block) takes any number, an NSVF model only its own;
- inverse: **R2Net has no exact inverse** (the paper produces none); the inverse is the numerical fixed-point
  inverse of the field (``field.invert_fixed_point``, ``--r2net-inverse-iterations``); no uncertainty map;
- ``--refine N``: N Adam steps on the initial velocity v0 (the LC blocks stay the learned integrator) with the
  training loss (MSE/σ² + λ·mean(ReLU(−det ∇φ))); the best loss is kept;
- ``register --follow-up`` (one patient's scans) without ``--refine``: ``--r2net-follow-up-refine`` (20) steps of a
  correction stage after the cascade (``nn.wrappers.zero_svf_stage`` refined from zero with
  ``methods.refine.correction_loss``, vxm-diff's follow-up objective); no extra pass then;
- the training protocol of ``deepdiffreg train --method r2net`` (methods/learned.py): the paper's loss (MSE +
  λ·mean(ReLU(−det)) with the true determinant det(I + ∇u), ``losses.jacobian_penalty(threshold=0,
  squared=False)``), the KL of the probabilistic ("Prob") variant, an optional semi-supervised Dice term (as
  VoxelMorph-diff's training), MS-R2Net phase 1 (``--train-on local|global``: a single-scale R2Net trained on the
  2×2×2 chunks or on the ×2-downsampled pair) and phase 2 (``--multiscale`` with ``--init`` the phase-1 local
  weights and ``--global-init`` the global ones; the phase-1 networks are frozen, the fusion convolution and the
  LC blocks are trained).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BadInput
from ..field import integrate_ss, invert_fixed_point, resize_disp, unfold, warp
from ..io.weights import list_models
from ..losses import jacobian_penalty, kl_laplacian
from ..nn import vxm_model
from ..nn.blocks import stage_nets
from ..nn.r2net import BACKBONES, BLOCK_SCALE, DEC, ENC, N_BLOCKS, MSR2Net, R2Net, R2NetCascade, chunk_slices
from ..nn.vxm_model import soft_dice_loss
from ..nn.wrappers import (Cascade, Deeper, Deformation, Displacement, OnNetGrid, Refine, Symmetric,
                           zero_svf_stage)
from .base import Capabilities, FieldEstimate, PairOnGrid, option, register_method
from .learned import (CascadeOptions, LearnedMethod, LearnedOptions, Trainable, TrainStep, further_pass_helps,
                      pair_rank_correlation)
from .refine import CORRECTION_DESCRIPTION, RefineOptions, correction_loss, plan_info, refine_plan

NAME = "r2net"
MS_K, MS_OVERLAP, MS_DOWN = 2, 2, 2        # spec A2.6: 2×2×2 chunks overlapping by 2 voxels, ×2 downsampled branch
PROB_SIGMA = 0.02                          # the probabilistic variant's default σ (VoxelMorph-diff's)


class Integrated(Deformation):
    """φ = id + LC(v0): the learned integrator applied to an initial velocity. ``param`` is v0 (what ``Refine``
    optimises, and ``Symmetric`` averages with the swapped pair's negated one); the displacement is integrated once
    and cached."""
    velocity_param = True

    def __init__(self, v0: torch.Tensor, integrator, info: dict[str, Any] | None = None):
        self.v0, self.integrator, self.info = v0, integrator, dict(info or {})
        self._u: torch.Tensor | None = None

    @property
    def param(self) -> torch.Tensor:
        return self.v0

    def with_param(self, v0: torch.Tensor) -> "Integrated":
        return Integrated(v0, self.integrator, self.info)

    def field(self) -> torch.Tensor:
        if self._u is None:
            self._u = self.integrator(self.v0)
        return self._u

    def disp(self, shape) -> torch.Tensor:
        return resize_disp(self.field(), tuple(shape))


def _stage_module(stage: R2Net):
    """One R2Net as a registration module (nn/wrappers.py): (moving, fixed) → φ = id + LC(μ-based v0)."""
    return lambda m, f: Integrated(stage.initial_velocity(m, f)[0], stage.integrator)   # noqa: E731


def _resize(x: torch.Tensor, size, mode: str = "trilinear") -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x.float(), size=tuple(size), mode="nearest").to(x.dtype)
    return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=True)


def ms_from_single(net: R2Net) -> MSR2Net:
    """MS-R2Net whose phase-1 networks are both ``net``, fusion = mean of the two velocities (MSR2Net's start) and
    phase-2 integrator = ``net``'s LC blocks (shared, not copied)."""
    ms = MSR2Net(net, net, stationary=net.integrator.stationary, steps=net.integrator.steps, k=MS_K,
                 overlap=MS_OVERLAP, down=MS_DOWN)
    ms.integrator = net.integrator
    return ms.to(next(net.parameters()).device).eval()


def ms_v0(ms: MSR2Net, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Phase 2's fused initial velocity on the pair's own grid (phase-1 networks frozen)."""
    with torch.no_grad():
        v1, v2 = ms.phase1_velocities(moving, fixed)
    return ms.fuse(torch.cat([v1, v2], dim=1))


@register_method
class R2NetMethod(Trainable, LearnedMethod):
    name = NAME
    title = "R2Net (learned, Lipschitz residual integration)"
    description = ("R2Net: U-Net initial velocity integrated by Lipschitz-continuous residual blocks (NSVF/SVF); "
                   "MS-R2Net for large volumes; numerical inverse")
    caps = Capabilities(learned=True, inverse="numerical", uncertainty=False, contrasts="same",
                        spacing_mm=(("cpu", 2.0),),
                        # measured (docs/r2net.md): peak RSS increase of estimate() per working voxel, NSVF
                        # single scale incl. the numerical inverse, 2-core CPU, 128³ and 160³ net grids
                        bytes_per_working_voxel=320)
    variants = {"svf": {"variant": "svf"}, "multiscale": {"multiscale": True}, "refine": {"refine": 50}}
    benchmark_variants = ()

    @dataclass
    class Options(LearnedOptions, RefineOptions, CascadeOptions):
        variant: str | None = option(None, choices=("nsvf", "svf"),
                                     help="use a model of this variant: nsvf = independent LC blocks (time-varying "
                                          "velocity), svf = one shared block (stationary); default: the model's")
        probabilistic: bool | None = option(None, help="use a model of the probabilistic ('Prob') variant (on) or "
                                                       "the deterministic 'nonProb' one (off); default: the model's")
        multiscale: bool | None = option(None, help="MS-R2Net: chunks + ×2-downsampled branch fused and integrated "
                                                    "at full resolution (large volumes); with a single-scale model "
                                                    "the phase-2 fusion is untrained (mean); default: the model's")
        int_steps: int | None = option(None, min=1, max=50,
                                       help="LC integration steps (SVF models only; NSVF models have one block per "
                                            "step); default: the model's")
        symmetric: bool = option(True, help="average each stage's initial velocity with the negated one of the "
                                            "swapped pair, v0 = ½(v0(m, f) − v0(f, m)), before integrating (two "
                                            "network passes per stage; off: the forward pass only, the paper)")
        inverse_iterations: int = option(30, min=1, max=500,
                                         help="fixed-point iterations of the numerical inverse (R2Net has no exact "
                                              "inverse)")
        refine_lr: float = option(0.05, min=0.0, max=10.0,
                                  help="Adam step of --refine on the initial velocity (network-grid voxels)")
        # register --follow-up: a correction stage after the cascade (see estimate). Measured 2026-12-07 (v0.1.1,
        # one thread, the benchmark's follow-up pairs): same-1 error 0.81x -> 0.58x the true displacement, BraTS-Reg
        # TRE 3.11 -> 2.25 mm (the affine 2.51), ~8 s more on a 2 mm whole head
        follow_up_refine: int = option(20, min=0, max=100_000,
                                       help="steps of a correction stage (an SVF on the half grid, from zero, "
                                            "vxm-diff's follow-up objective) after the cascade on a pair marked "
                                            "--follow-up, when --r2net-refine is 0 (0: none)")
        follow_up_refine_lr: float = option(0.05, min=0.0, max=10.0,
                                            help="Adam step of the follow-up correction (half-grid voxels)")
        extra_passes: int | None = option(None, min=0, max=8,
                                          help="run the last cascade stage up to this many more times at "
                                               "inference, each pass on the image the earlier ones warped and kept "
                                               "only if the images look like one contrast and its local NCC² rises "
                                               "(0: the cascade as trained); default: 1 for single scale, 0 for "
                                               "MS-R2Net (a pass costs minutes on a CT-sized volume) and with "
                                               "--r2net-refine")
        unfold: bool = option(True, help="remove the few folds the learned integrator leaves (det ∇φ < 0.05): the "
                                         "field is locally averaged around them only (field.unfold), before the "
                                         "inverse; report.json says how many voxels and how far (off: the "
                                         "network's field as it is)")

    # -- inference -----------------------------------------------------------------------------------------------
    def _asked(self) -> dict[str, Any]:
        o = self.opts
        return {k: v for k, v in (("variant", o.variant), ("probabilistic", o.probabilistic),
                                  ("multiscale", o.multiscale)) if v is not None}

    def model_entry(self) -> dict[str, Any]:
        """As ``LearnedMethod.model_entry``; without --r2net-model/--r2net-weights, the newest installed model
        trained as asked (variant, probabilistic, multi-scale; an asked multi-scale run falls back to a
        single-scale model, from which ``estimate`` builds MS-R2Net), an NSVF one unless SVF is asked. Loading,
        the input gate and the contrast statement all read this, so they agree on the model."""
        asked, o = self._asked(), self.opts
        if not o.model and not o.weights:
            models = [e for e in list_models() if e.get("method") == self.name]
            # NSVF is the default: among the models that match, the newest NSVF one, else the newest (stable sort)
            models.sort(key=lambda e: _model_fact(e.get("training") or {}, "variant") == "nsvf")
            for want in (asked, {k: v for k, v in asked.items() if k != "multiscale" or not v}):
                hits = [e for e in models if all(_model_fact(e.get("training") or {}, k) == v
                                                 for k, v in want.items())]
                if hits:
                    self.opts = dataclasses.replace(o, model=hits[-1]["id"])
                    try:
                        return super().model_entry()
                    finally:
                        self.opts = o
        return super().model_entry()

    def estimate(self, pair: PairOnGrid, device: torch.device, progress) -> FieldEstimate:
        t0 = time.time()
        o = self.opts
        net, cfg, model = self.load_network(device)
        for k, v in self._asked().items():
            have = _model_fact(cfg, k)
            if k == "multiscale" and v and not have:
                continue                                  # MS built from the single-scale model (below)
            if have != v:
                raise BadInput(f"{self.flag(k)}: model {model['id']} is {k} = {have}, not {v}; choose a model "
                               f"trained so ({self.flag('model')}, `deepdiffreg models list`) or train one "
                               f"(docs/training.md)")
        progress(0.1, f"loaded model {model['id']}")
        stationary = cfg.get("variant") == "svf"
        stages = stage_nets(net) if not isinstance(net, MSR2Net) else []
        if isinstance(net, MSR2Net):
            ms, untrained = net, False
        elif o.multiscale:
            ms, untrained = ms_from_single(stages[0]), True
        else:
            ms, untrained = None, False
        integrators = [ms.integrator] if ms is not None else [st.integrator for st in stages]
        trained_steps = integrators[0].steps
        steps = int(o.int_steps or trained_steps)
        if steps != trained_steps and not stationary:
            raise BadInput(f"{self.flag('int_steps')}: an NSVF model has one block per step; this one has "
                           f"{trained_steps} (got {steps})")
        info: dict[str, Any] = {"variant": cfg.get("variant", "nsvf"), "probabilistic": bool(cfg.get("probabilistic")),
                                "backbone": cfg.get("backbone", "r2net"), "multiscale": ms is not None,
                                "int_steps": steps}
        if untrained:
            info["multiscale_phase2"] = ("built from the single-scale model" +
                                         (" (its first cascade stage)" if len(stages) > 1 else "") +
                                         ": both phase-1 networks are it, fusion = mean of the two initial "
                                         "velocities, its own LC blocks (untrained phase 2)")
        for integ in integrators:
            integ.steps = steps
        try:
            if ms is not None:
                modules = [lambda m, f: Integrated(ms_v0(ms, m, f), ms.integrator)]          # noqa: E731
                multiple = 1          # any grid: the branches resample their own inputs
            else:
                modules = [_stage_module(st) for st in stages]
                if o.symmetric:
                    modules = [Symmetric(mod) for mod in modules]
                multiple = net.size_multiple
                info.update(stages=len(stages), symmetric=bool(o.symmetric))
            # one more pass of the last stage by default, kept only where it helps: +0.008 validation Dice (0.586 ->
            # 0.595, every pair up) and +0.01 on the benchmark's inter-subject pairs with v0.1.1 for ~1 s; unchecked
            # it cost the same-subject pair and the two-contrast one (docs/r2net.md)
            plan = refine_plan(o, pair.follow_up)
            n_refine, refine_lr, why = plan
            info.update(plan_info(n_refine, why))
            if o.extra_passes and n_refine > 0:
                raise BadInput(f"give {self.flag('extra_passes')} or {self.flag('refine')}, not both (the refinement "
                               f"optimises the last pass itself)")
            extra = o.extra_passes if o.extra_passes is not None else (0 if ms is not None or n_refine > 0 else 1)
            if plan.for_follow_up:
                # a follow-up pair (one patient's): a correction stage after the cascade, optimised from the identity
                # with vxm-diff's follow-up objective (NCC², blind to a bias; methods/refine.py). Refining v0 itself
                # (--r2net-refine, the MSE objective) cost ~2.5 s a step through the LC blocks and made same-1 worse
                # (0.81x -> 0.94-1.12x the true displacement, 20 steps, 2026-12-07)
                modules.append(Refine(zero_svf_stage(), correction_loss(), n_refine, refine_lr,
                                      progress=lambda fr, msg: progress(0.2 + 0.5 * fr, msg)))
                info["follow_up_correction"] = (f"{n_refine} Adam steps (step {refine_lr:g} half-grid voxels) of an "
                                                f"SVF on the half grid after the cascade, from zero: "
                                                f"{CORRECTION_DESCRIPTION}")
            elif n_refine > 0:
                sigma, lam = _sigma(cfg), float(cfg.get("jac_weight", 1.0))

                def loss_fn(d, m, f):
                    u = d.field()
                    return F.mse_loss(warp(m, u), f) / sigma ** 2 + lam * jacobian_penalty(u, 0.0, squared=False)

                modules[-1] = Refine(modules[-1], loss_fn, n_refine, refine_lr,
                                     progress=lambda fr, msg: progress(0.2 + 0.5 * fr, msg))
            with torch.no_grad():
                accept = functools.partial(further_pass_helps, rho=pair_rank_correlation(pair))
                res = OnNetGrid(Deeper(modules, extra, accept), multiple=multiple)(pair, device)
                u = res.deformation.disp(res.grid.shape)                  # canonical axes, working-grid voxels
                if o.unfold:
                    # the LC blocks do not keep det ∇φ > 0 by construction (S&S nearly does): a trained model leaves
                    # a few hundred isolated folded voxels on a 2 mm brain; smoothed away here, before the inverse
                    u, info["unfold"] = unfold(u)
                progress(0.75, "network done; inverting the field")
                inv = invert_fixed_point(u, int(o.inverse_iterations))
                disp, inv = res.grid.disp_to_work(u), res.grid.disp_to_work(inv)
        finally:
            for integ in integrators:
                integ.steps = trained_steps
        info.update(res.info)
        info.update(res.deformation.info)                     # extra_passes: Deeper's, also for 0 asked
        info["inverse"] = (f"numerical: fixed-point inverse of the field ({o.inverse_iterations} iterations, "
                           f"field.invert_fixed_point); R2Net has no exact inverse")
        info["seconds"] = round(time.time() - t0, 3)
        progress(1.0, "r2net done")
        return FieldEstimate(disp_vox=disp.cpu(), inverse_disp_vox=inv.cpu(), info=info, model=model)

    # -- training protocol (methods/learned.py; `deepdiffreg train --method r2net`) --------------------------------
    @dataclass
    class TrainOptions:
        variant: str = option("nsvf", choices=("nsvf", "svf"), help="nsvf: one LC block per step; svf: one shared "
                                                                    "block")
        probabilistic: bool = option(False, help="the 'Prob' variant: μ/log σ² heads, a sampled v0 and the KL term "
                                                 "(default: the paper's chosen 'nonProb')")
        blocks: int = option(N_BLOCKS, min=1, max=50, help="LC integration steps (the paper: 7)")
        block_scale: float = option(BLOCK_SCALE, min=0.01, max=4.0,
                                    help="tanh scaling of each LC block (the code's 0.5; the paper's text says 2)")
        jac_weight: float = option(1.0, min=0.0, max=1e6, help="λ of the folding loss mean(ReLU(−det ∇φ)) (paper: 1)")
        image_sigma: float | None = option(None, min=1e-6, max=10.0,
                                           help="σ of the MSE term (MSE/σ²); default 1 (the paper's plain MSE) for "
                                                "nonProb, 0.02 (VoxelMorph-diff's) for Prob so the KL does not "
                                                "swamp it")
        prior_lambda: float = option(20.0, min=0.0, max=1e6, help="λ of the KL's Laplacian prior (Prob only)")
        dice_weight: float = option(0.0, min=0.0, max=1e6, help="optional semi-supervised Dice term weight")
        dice_labels: int = option(8, min=1, max=1000, help="labels drawn per step for the Dice term")
        train_on: str = option("full", choices=("full", "local", "global"),
                               help="what a single-scale net sees: the whole pair, one of the 2×2×2 overlapping "
                                    "chunks (MS-R2Net phase-1 'local') or the ×2-downsampled pair (phase-1 "
                                    "'global'); chunks and the downsampled pair are resampled to multiples of 16")
        multiscale: bool = option(False, help="train MS-R2Net phase 2 (fusion + LC blocks) over frozen phase-1 nets: "
                                              "--init = the local phase-1 weights, --global-init = the global ones "
                                              "(default: the --init net for both)")
        global_init: str | None = option(None, help="phase-1 'global' weights for --multiscale")
        enc: tuple[int, ...] = option(ENC, min=1, max=1024, help="U-Net encoder channels (stride-2 blocks)")
        dec: tuple[int, ...] = option(DEC, min=1, max=1024, help="U-Net decoder channels")
        backbone: str = option("r2net", choices=BACKBONES,
                               help="velocity U-Net: r2net = the released code's (v0 at full resolution); vxm = "
                                    "VoxelMorph-diff's (½-resolution μ resized to the full grid), which an --init "
                                    "VoxelMorph-diff weights file fills (a deviation from the paper: say so in the "
                                    "model card)")
        stages: int = option(1, min=1, max=8, help="R2Nets in a recursive cascade (φ1∘φ2∘…); an --init file with "
                                                   "fewer stages seeds the extra ones with its last")
        train_stages: str = option("all", choices=("last", "all"),
                                   help="cascade stages trained: all end to end, or the last on what the frozen "
                                        "earlier ones leave")
        fit_integrator: bool = option(False, help="train only the LC blocks, to reproduce scaling and squaring of "
                                                  "the frozen U-Net's v0 (loss: mean squared distance of the two "
                                                  "displacements, voxels²): the first phase of a warm start from "
                                                  "another model's U-Net, and the paper's integration-error "
                                                  "measurement")

    network_keys = ("variant", "probabilistic", "blocks", "block_scale", "enc", "dec", "backbone", "stages")
    loss_terms = ("loss", "sim", "jac", "kl", "dice_loss", "int_err")

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        d = {f.name: f.default for f in dataclasses.fields(cls.TrainOptions)}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return {**d, "spacing_mm": 2.0}

    @classmethod
    def build_network(cls, config: dict[str, Any]):
        def one():
            return R2Net(stationary=config.get("variant") == "svf", steps=int(config.get("blocks", N_BLOCKS)),
                         scale=float(config.get("block_scale", BLOCK_SCALE)), enc=config.get("enc", ENC),
                         dec=config.get("dec", DEC), probabilistic=bool(config.get("probabilistic")),
                         backbone=config.get("backbone", "r2net"))
        n_stages = int(config.get("stages", 1))
        if config.get("multiscale"):
            if n_stages > 1:
                raise BadInput("--multiscale: MS-R2Net phase 2 is trained over single-stage phase-1 networks "
                               "(--stages 1)")
            net = MSR2Net(one(), one(), stationary=config.get("variant") == "svf",
                          steps=int(config.get("blocks", N_BLOCKS)), scale=float(config.get("block_scale",
                                                                                              BLOCK_SCALE)),
                          k=MS_K, overlap=MS_OVERLAP, down=MS_DOWN)
        elif n_stages > 1:
            if config.get("train_on", "full") != "full":
                raise BadInput("--train-on local|global trains one MS-R2Net phase-1 network (--stages 1)")
            net = R2NetCascade([one() for _ in range(n_stages)])
        else:
            net = one()
        net.r2net_config = dict(config)          # init_network reads --global-init from it
        return net

    @classmethod
    def init_config(cls, weights: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
        """A VoxelMorph-diff weights file (the project's other U-Net) gives the "vxm" backbone its channels and
        cascade depth; the rest of the network (variant, blocks, probabilistic) is this run's own."""
        file_config = weights["config"]
        if not _is_vxm_weights(weights):
            if file_config.get("backbone") == "vxm" and "probabilistic" in given:
                # the vxm U-Net always has its log σ² head: Prob or nonProb is the loss, not a layer, so the run's
                # flag decides (a warm start may fit the integrator nonProb and fine-tune Prob)
                return {**file_config, "probabilistic": bool(given["probabilistic"])}
            return dict(file_config)
        return {**{k: given[k] for k in ("variant", "probabilistic", "blocks", "block_scale") if k in given},
                "backbone": "vxm", "enc": list(file_config["enc"]), "dec": list(file_config["dec"]),
                "stages": max(int(given.get("stages", 1)), int(file_config.get("stages", 1)))}

    @classmethod
    def init_network(cls, net, weights: dict[str, Any]) -> None:
        """From a VoxelMorph-diff file: each stage's U-Net is that model's stage (its last for extra stages), the
        LC blocks stay new. From a single-stage R2Net file: MS phase 2 (below), or every cascade stage a copy.
        Phase 2 from phase-1 weights: a single-scale --init file fills both phase-1 networks and the phase-2 LC
        blocks start as its integrator; --global-init (when given) replaces the global network."""
        src_cfg = weights["config"]
        if _is_vxm_weights(weights):
            src = vxm_model.build_net(src_cfg)
            src.load_state_dict(weights["state_dict"])
            old = vxm_model.stage_nets(src)
            for k, st in enumerate(stage_nets(net)):
                st.unet.load_state_dict(old[min(k, len(old) - 1)].state_dict())
            return
        if isinstance(net, R2NetCascade):
            have = int(src_cfg.get("stages", 1))
            if have == len(net.stages):
                net.load_state_dict(weights["state_dict"])
                return
            src = cls.build_network({**src_cfg, "multiscale": False})
            src.load_state_dict(weights["state_dict"])
            old = stage_nets(src)
            for k, st in enumerate(net.stages):
                st.load_state_dict(old[min(k, len(old) - 1)].state_dict())
            return
        if not isinstance(net, MSR2Net) or src_cfg.get("multiscale"):
            net.load_state_dict(weights["state_dict"])
            return
        net.local_net.load_state_dict(weights["state_dict"])
        net.global_net.load_state_dict(weights["state_dict"])
        net.integrator.load_state_dict(net.local_net.integrator.state_dict())
        g = getattr(net, "r2net_config", {}).get("global_init")
        if g:
            if not Path(g).is_file():
                raise BadInput(f"--global-init: no such weights file: {g}")
            obj = torch.load(g, map_location="cpu", weights_only=True)
            if obj["config"].get("multiscale"):
                raise BadInput(f"--global-init {g}: a single-scale R2Net weights file is needed (phase 1)")
            net.global_net.load_state_dict(obj["state_dict"])

    @classmethod
    def prepare_for_training(cls, net, config: dict[str, Any] | None = None) -> None:
        config = config or {}
        if isinstance(net, MSR2Net):                  # phase 2 trains the fusion and the LC blocks only
            net.local_net.requires_grad_(False)
            net.global_net.requires_grad_(False)
            return
        stages = stage_nets(net)
        if config.get("fit_integrator"):
            for st in stages:
                st.unet.requires_grad_(False)
        if config.get("train_stages", "all") == "last":
            for st in stages[:-1]:
                st.requires_grad_(False)

    @classmethod
    def training_loss(cls, net, batch: dict[str, Any], config: dict[str, Any], step: TrainStep
                      ) -> dict[str, torch.Tensor]:
        m, f = batch["moving"], batch["fixed"]
        ml, fl = batch.get("moving_labels"), batch.get("fixed_labels")
        out: dict[str, torch.Tensor] = {}
        if isinstance(net, MSR2Net):
            u = net.integrator(ms_v0(net, m, f))
        else:
            m, f, ml, fl = _phase1_view(m, f, ml, fl, config.get("train_on", "full"), step.index,
                                        net.size_multiple)
            if config.get("fit_integrator"):
                err = _integration_error(net, m, f)
                return {"loss": err, "int_err": err.detach()}
            u, kl = _cascade_forward(net, m, f, config, step.generator)
            if kl is not None:
                out["kl"] = kl
        jac = jacobian_penalty(u, threshold=0.0, squared=False)
        loss, out["jac"] = float(config.get("jac_weight", 1.0)) * jac, jac
        if bool(batch.get("same_contrast", True)):     # two intensity tables: MSE means nothing, leave it out
            sim = F.mse_loss(warp(m, u), f) / _sigma(config) ** 2
            loss, out["sim"] = loss + sim, sim
        loss = loss + out.get("kl", 0.0)
        if config.get("dice_weight", 0) > 0 and fl is not None:
            present = [l for l in torch.unique(fl).tolist() if l != 0]
            if present:
                rng = np.random.default_rng(step.seed * 31 + step.index)
                labels = [int(x) for x in rng.choice(present, min(int(config.get("dice_labels", 8)), len(present)),
                                                     replace=False)]
                dl = soft_dice_loss(fl, ml, u, labels)
                loss = loss + float(config["dice_weight"]) * dl
                out["dice_loss"] = dl
        out["loss"] = loss
        return out

    @classmethod
    @torch.no_grad()
    def validation_disp(cls, net, moving: torch.Tensor, fixed: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
        if isinstance(net, MSR2Net):
            return net(moving, fixed)
        shape = tuple(fixed.shape[2:])
        grid = tuple(max(net.size_multiple, int(round(n / net.size_multiple)) * net.size_multiple) for n in shape)
        phi = Cascade([_stage_module(st) for st in stage_nets(net)])(_resize(moving, grid), _resize(fixed, grid))
        return resize_disp(phi.disp(grid), shape)

    @classmethod
    def model_card(cls, config: dict[str, Any]) -> dict[str, Any]:
        kind = ("MS-R2Net" if config.get("multiscale") else "R2Net") + \
               f" ({str(config.get('variant', 'nsvf')).upper()}, {'Prob' if config.get('probabilistic') else 'nonProb'}"
        if int(config.get("stages", 1)) > 1:
            kind += f", {int(config['stages'])}-stage cascade"
        if config.get("backbone") == "vxm":
            kind += ", VoxelMorph-diff velocity U-Net"
        card = {"title": kind + ")",
                "input_grid": {"spacing_mm": config.get("spacing_mm", 2.0),
                               "size_multiple": 1 if config.get("multiscale") else 2 ** len(config.get("enc", ENC)),
                               "orientation": "LPS-aligned array axes (the method reorients internally)"},
                "modality": "T1-weighted brain MRI, skull-stripped or whole head (mono-contrast pairs; also trained "
                            "on synthetic random-contrast label-map pairs)"}
        if config.get("backbone") == "vxm":
            card["deviation"] = ("the velocity U-Net is VoxelMorph-diff's (decoder to ½ resolution, μ resized to the "
                                 "full grid and integrated there by the paper's LC blocks), warm-started from "
                                 "VoxelMorph-diff weights; the paper's U-Net decodes to full resolution")
        return card


def _model_fact(config: dict[str, Any], key: str) -> Any:
    """What a model was trained as (its config or manifest ``training`` entry), with the training defaults."""
    defaults = {"variant": "nsvf", "probabilistic": False, "multiscale": False}
    v = config.get(key, defaults[key])
    return bool(v) if key != "variant" else v


def _sigma(config: dict[str, Any]) -> float:
    s = config.get("image_sigma")
    return float(s) if s else (PROB_SIGMA if config.get("probabilistic") else 1.0)


def _phase1_view(m, f, ml, fl, train_on: str, index: int, multiple: int):
    """The pair a single-scale net trains on: whole, one chunk of the MS layout (cycled by step), or ×2-down;
    resampled to sizes that are multiples of the U-Net's (what MSR2Net does with them at inference)."""
    if train_on == "local":
        slices = chunk_slices(tuple(f.shape[2:]), MS_K, MS_OVERLAP)
        s = (slice(None), slice(None), *slices[index % len(slices)])
        m, f = m[s], f[s]
        ml, fl = (None, None) if fl is None else (ml[s], fl[s])
    elif train_on == "global":
        small = [max(1, n // MS_DOWN) for n in f.shape[2:]]
        m, f = _resize(m, small), _resize(f, small)
        ml, fl = (None, None) if fl is None else (_resize(ml, small, "nearest"), _resize(fl, small, "nearest"))
    grid = tuple(max(multiple, int(round(n / multiple)) * multiple) for n in f.shape[2:])
    m, f = _resize(m, grid), _resize(f, grid)
    if fl is not None:
        ml, fl = _resize(ml, grid, "nearest"), _resize(fl, grid, "nearest")
    return m, f, ml, fl


def _is_vxm_weights(weights: dict[str, Any]) -> bool:
    """Whether a weights object holds a VoxelMorph-diff model (the method nn/vxm_model.py builds for), by the method
    its meta or config names."""
    made_for = (weights.get("meta") or {}).get("method") or weights["config"].get("method")
    return made_for == vxm_model.DEFAULT_CONFIG["method"]


def _cascade_forward(net, m: torch.Tensor, f: torch.Tensor, config: dict[str, Any],
                     generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training forward pass through ``nn/wrappers.Cascade``: the composed displacement φ1 ∘ … ∘ φK of the stages
    (each on the moving image warped by the stages before it, one interpolation of the original) and the summed KL
    of the trained stages (Prob; None otherwise). Frozen stages (``train_stages: last``) run without gradients and
    without sampling."""
    stages = stage_nets(net)
    prob = bool(config.get("probabilistic"))
    kls: list[torch.Tensor] = []

    def stage_module(st: R2Net, frozen: bool):
        def run(m_in: torch.Tensor, fx: torch.Tensor) -> Displacement:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                v0, mu, logvar = st.initial_velocity(m_in, fx, sample=prob and not frozen, generator=generator)
                u = st.integrator(v0)
            if prob and not frozen:
                kls.append(kl_laplacian(mu, logvar, float(config.get("prior_lambda", 20.0))))
            return Displacement(u)
        return run

    last_only = config.get("train_stages", "all") == "last"
    phi = Cascade([stage_module(st, last_only and k < len(stages) - 1) for k, st in enumerate(stages)])(m, f)
    return phi.disp(tuple(f.shape[2:])), (sum(kls[1:], kls[0]) if kls else None)


def _integration_error(net, m: torch.Tensor, f: torch.Tensor, ss_steps: int = 7) -> torch.Tensor:
    """Mean over voxels and stages of |LC(v0) − exp(v0)|² (voxels²), exp by scaling and squaring (``ss_steps``)
    at the LC blocks' resolution; v0 = each frozen U-Net's μ, stage k (``nn/wrappers.Cascade``) on the moving image
    warped by the scaling-and-squaring maps of the stages before it (what the U-Nets were trained to see)."""
    stages = stage_nets(net)
    errs: list[torch.Tensor] = []

    def stage_module(st: R2Net):
        def run(m_in: torch.Tensor, fx: torch.Tensor) -> Displacement:
            with torch.no_grad():
                v0 = st.initial_velocity(m_in, fx)[0]
                target = integrate_ss(v0, ss_steps)
            errs.append(((st.integrator(v0) - target) ** 2).sum(dim=1).mean())
            return Displacement(target)
        return run

    Cascade([stage_module(st) for st in stages])(m, f)
    return sum(errs[1:], errs[0]) / len(stages)
