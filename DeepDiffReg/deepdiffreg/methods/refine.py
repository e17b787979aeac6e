"""Generic test-time refinement for learned methods: optimise a predicted parameter tensor (a velocity field,
a displacement, ...) on the pair for N Adam steps with the method's own loss, starting from the prediction.

Used by every learned method's ``--refine N`` (off by default) and, on a pair the user marks as one patient's
(``register --follow-up``, ``PairOnGrid.follow_up``), by the method's ``follow_up_refine`` steps: a network trained
on pairs of different subjects adds deformation a follow-up scan does not have, and a few steps on the pair's own
images take it back (VoxelMorph-diff v0.5.0: docs/benchmarks.md). ``refine_plan`` decides; what it did is returned
for report.json.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from .base import option


@dataclass
class RefineOptions:
    """The options of test-time refinement; a refinable method's ``Options`` inherits them (and may redeclare
    ``refine_lr`` with its own default: the step is in the units of what it refines)."""
    refine: int = option(0, min=0, max=100_000, aliases=("--refine",),
                         help="test-time refinement: Adam steps on the prediction with the method's own loss (0: off)")
    refine_lr: float = option(0.05, min=0.0, max=10.0, help="Adam step of the refinement")
    follow_up_refine: int = option(0, min=0, max=100_000,
                                   help="refinement steps when the pair is one patient's (register --follow-up) and "
                                        "no refinement was asked for (0: none)")
    follow_up_refine_lr: float = option(0.05, min=0.0, max=10.0, help="Adam step of the follow-up refinement")


ASKED_FOR = "asked for (--refine)"
FOLLOW_UP = "the pair is one patient's (--follow-up)"


class RefinePlan(NamedTuple):
    """What ``refine_plan`` chose: ``steps`` Adam steps (0: none) of ``lr``, and ``why`` (report.json's
    ``refine_reason``: ``ASKED_FOR``, ``FOLLOW_UP`` or None)."""
    steps: int
    lr: float
    why: str | None

    @property
    def for_follow_up(self) -> bool:
        """The steps are the method's follow-up refinement (not the user's --refine)."""
        return self.steps > 0 and self.why == FOLLOW_UP


def refine_plan(opts, follow_up: bool) -> RefinePlan:
    """The refinement of a method's run: the asked-for ``refine`` steps at ``refine_lr``; else, on a follow-up
    pair, the method's ``follow_up_refine`` steps at ``follow_up_refine_lr``; else none. ``opts``: the method's
    options (a ``RefineOptions`` dataclass or its dict)."""
    get = opts.get if isinstance(opts, dict) else lambda k: getattr(opts, k)
    if int(get("refine")) > 0:
        return RefinePlan(int(get("refine")), float(get("refine_lr")), ASKED_FOR)
    if follow_up and int(get("follow_up_refine")) > 0:
        return RefinePlan(int(get("follow_up_refine")), float(get("follow_up_refine_lr")), FOLLOW_UP)
    return RefinePlan(0, float(get("refine_lr")), None)


def svf_objective(image_term: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], prior_lambda: float) -> Callable:
    """``loss(svf, moving, fixed)`` of an SVF stage on the pair it sees: ``image_term(fixed, moving ∘ exp(v))`` +
    ½·3·λ·(Laplacian precision of v) — VoxelMorph-diff's KL prior term, v in voxels of its ½ grid; (B, 1, D, H, W)
    images. The one objective of vxm-diff's refinements and of a correction stage (``correction_loss``)."""
    from ..field import warp
    from ..losses.kl import laplacian_prec

    def loss(d, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        warped = warp(moving, d.disp(fixed.shape[2:]))
        return image_term(fixed, warped) + 0.5 * 3 * float(prior_lambda) * laplacian_prec(d.velocity)
    return loss


# The objective of a correction stage (``nn.wrappers.zero_svf_stage`` in a ``Refine``): VoxelMorph-diff's follow-up
# refinement objective (its --vxm-refine defaults: 30·(1 − local NCC²) in a 5³ window, blind to a smooth bias, plus
# the Laplacian prior of its KL with λ = 20 on a ½-grid velocity), for a method with no cheap parameter of its own.
CORRECTION_NCC_WEIGHT, CORRECTION_NCC_WINDOW, CORRECTION_PRIOR_LAMBDA = 30.0, 5, 20.0
CORRECTION_DESCRIPTION = (f"{CORRECTION_NCC_WEIGHT:g} x (1 - local NCC^2), window {CORRECTION_NCC_WINDOW} net voxels, "
                          f"+ 1.5 x {CORRECTION_PRIOR_LAMBDA:g} x Laplacian precision of the velocity")


def correction_loss(ncc_weight: float = CORRECTION_NCC_WEIGHT, ncc_window: int = CORRECTION_NCC_WINDOW,
                    prior_lambda: float = CORRECTION_PRIOR_LAMBDA) -> Callable:
    """``loss(svf, moving, fixed)`` of a correction stage: ``svf_objective`` with the image term
    ncc_weight·(1 − mean local NCC²) in a ncc_window³ window."""
    from ..losses.similarity import ncc_loss

    return svf_objective(lambda fixed, warped: float(ncc_weight) * ncc_loss(fixed, warped, win=int(ncc_window) | 1),
                         prior_lambda)


def plan_info(steps: int, why: str | None) -> dict:
    """report.json's facts of a ``refine_plan`` (merged into method_info)."""
    return {"refine_reason": why} if steps > 0 else {}


def refine(initial: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor], steps: int,
           lr: float = 0.05, progress: Callable[[float, str], None] | None = None, keep_best: bool = True
           ) -> tuple[torch.Tensor, dict]:
    """Adam on a copy of ``initial`` (any shape) minimising ``loss_fn(param)`` for ``steps`` steps.

    Returns (the refined tensor (detached, same shape/dtype/device), info) with
    info = {"refine_steps", "refine_lr", "refine_loss_start", "refine_loss_end", "refine_seconds"}.
    The best parameter seen (lowest loss) is returned, so refinement never makes the method's loss worse;
    ``keep_best=False`` returns where the steps went instead (for a measure of how far they move the result: from
    an already optimal start every step raises the loss, and the best seen would be the start itself); its
    ``refine_loss_end`` is None (the end point's loss is not computed).
    """
    info = {"refine_steps": int(steps), "refine_lr": float(lr)}
    if steps <= 0:
        return initial.detach(), info
    t0 = time.time()
    param = initial.detach().clone().requires_grad_(True)
    adam = _Adam(param, lr)
    best, best_loss, first = param.detach().clone() if keep_best else None, float("inf"), None
    with torch.enable_grad():
        for i in range(steps):
            param.grad = None
            loss = loss_fn(param)
            val = float(loss.detach())
            if first is None:
                first = val
            if keep_best and val < best_loss:
                best_loss, best = val, param.detach().clone()
            loss.backward()
            adam.step()
            if progress is not None:
                progress((i + 1) / steps, f"refine {i + 1}/{steps} loss {val:.4f}")
        if not keep_best:         # where the steps went: no loss of the end point needed (one forward pass less)
            info.update(refine_loss_start=first, refine_loss_end=None, refine_seconds=round(time.time() - t0, 3))
            return param.detach().clone(), info
        final = float(loss_fn(param).detach())
    if final < best_loss:
        best_loss, best = final, param.detach().clone()
    info.update(refine_loss_start=first, refine_loss_end=best_loss, refine_seconds=round(time.time() - t0, 3))
    return best, info


class _Adam:
    """torch.optim.Adam's update for one tensor with its defaults (betas 0.9 / 0.999, eps 1e-8, no weight decay,
    no amsgrad): the operations of its single-tensor path, in its order, so the steps are the same numbers.

    Written out because the first ``torch.optim`` optimizer of a process imports ``torch._dynamo`` (its methods
    are wrapped in ``torch._disable_dynamo``, which imports it on the first call): ~1.4 CPU-s, on the critical
    path of every vxm-diff run (its default ``refine`` uncertainty takes 10 steps), as long as the network itself.
    """
    BETA1, BETA2, EPS = 0.9, 0.999, 1e-8

    def __init__(self, param: torch.Tensor, lr: float):
        self.param, self.lr, self.t = param, float(lr), 0
        self.exp_avg = torch.zeros_like(param, memory_format=torch.preserve_format)
        self.exp_avg_sq = torch.zeros_like(param, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self) -> None:
        grad = self.param.grad
        if grad is None:
            return
        self.t += 1
        b1, b2 = self.BETA1, self.BETA2
        self.exp_avg.lerp_(grad, 1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        step = float(self.t)                       # torch keeps the count as a float32 tensor and reads .item()
        step_size = self.lr / (1 - b1 ** step)
        denom = (self.exp_avg_sq.sqrt() / (1 - b2 ** step) ** 0.5).add_(self.EPS)
        self.param.addcdiv_(self.exp_avg, denom, value=-step_size)
