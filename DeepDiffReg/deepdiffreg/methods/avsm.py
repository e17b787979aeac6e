"""AVSM (Shen et al., CVPR 2019; spec: shared docs/methods/seeds-spnet-avsm.md, Part B): a learned multi-step affine
network followed by a learned, self-iterable vSVF stage, one composite transform. Networks: nn/avsm.py.

Inference (``estimate``), on the network grid (``OnNetGrid``: LPS canonical axes, sizes the nearest multiples of 16,
the same box as the working grid, align_corners=True):
- the affine (A, b) of ``multi_step_affine`` (Eq. 1, ``--avsm-affine-steps`` = 7 test steps) acts on normalised
  coordinates x ∈ [−1, 1] of the canonical grid. The net grid and the canonical working grid span the same box with
  align_corners, so their normalised coordinates are the same points; ``affine_lps_from_normalised`` turns (A, b)
  into the 4×4 LPS fixed→moving point map M·[A b]·M⁻¹, M: normalised canonical → LPS mm (canonical voxel →
  working array index (flips, permutation) → ijk → LPS). This is ``FieldEstimate.affine_lps``.
- the deformable part u: T(x) = A(x + u(x)). The spec's map is Φ⁻¹ = Φ_aff ∘ ψ₁⁻¹ ∘ ψ₂⁻¹ (B.3.4: advecting from the
  affine map, points go through the vSVF flows first, then through the affine). Here the vSVF maps are advected
  from ZERO (u₁ = ψ₁⁻¹ − id) and step τ advects the previous deformable map (ψ₁⁻¹∘…∘ψ_{τ−1}⁻¹), so
  u = ψ₁⁻¹∘ψ₂⁻¹ − id and Φ⁻¹ = Φ_aff ∘ (id + u): the same map as advecting from the affine map, because the advection
  ∂Φ/∂t = −DΦ·v is linear in Φ and commutes with an affine applied to its values (and trilinear resizing reproduces
  affine maps exactly) — checked in Testing/engine/test_avsm_method.py. The momentum net always sees the original
  source warped once by the full map Φ_aff ∘ (id + u) (B.10.4).
- inverse: none exact (B.6). The deformable part is inverted numerically (fixed point, ``invert_fixed_point``); the
  affine is inverted analytically by the pipeline (inverse.h5 = [W, A⁻¹]).
- ``--avsm-refine N``: N Adam steps on the last vSVF step's momentum with that step's loss (mk-LNCC + λ_vr⟨m, v⟩).
- the engine's initial alignment is off by default (caps.default_align = "none"); ``--align affine`` still chains
  it first: T(x) = A_init(A(x + u(x))).

Training (``deepdiffreg train --method avsm --stage affine|vsvf``), spec B.4–B.5:
- ``--stage affine``: the affine net alone, ``--affine-train-steps`` (5, cross-subject; 1 for the single-step
  network that initialises the multi-step one with ``--init``) steps of Eq. 1, the loss on the last step's composed
  parameters only: mk-LNCC both directions + λ_ar(n)(‖A − I‖² + ‖b‖²) both directions, λ_ar(n) = C·K/(K + e^{n/K})
  (Eq. 13, C = 10, K = 4, n = step // --epoch-steps, 400 as the paper's epochs) + λ_as(‖A_ts A − I‖² +
  ‖A_ts b + b_ts‖²) (λ_as = 10).
- ``--stage vsvf`` (``--init`` the affine run's weights): the affine net frozen (run with the 7 test steps, B.5), 2
  vSVF steps, Σ_τ [mk-LNCC both directions + λ_vr⟨m₀, v₀⟩ both directions + λ_vs·mean((Φ^{st}∘Φ^{ts} − id)²)],
  maps including the affine (B.4). Normalisations (B.4 [I], decided here): ⟨m, v⟩ = mean over voxels of
  clamp(Σ_a m_a v_a, 0) with m, v in units where the image spans [0, 1] per axis (the code's Riemann sum); the
  symmetry term is the mean over voxels and components in the same [0, 1] units (the code's form, λ_vs = 500 as
  its demo; the paper's 1e-4 belongs to a voxel-summed norm).
- mk-LNCC (``mk_lncc``): the code's form (B.4): Σ ω(1 − mean(cross²/(var_x var_y + 1e-5))), windows k = int(S·r)
  with S the smallest image dimension, dilation 2, stride int((k+1)/4), valid convolutions; (r, ω) = (¼, 0.3),
  (½, 0.7) for 64 ≤ S < 128, (1/16, 0.1), (⅛, 0.3), (¼, 0.6) for S ≥ 128, (½, 1) with dilation 1 below 64. The
  engine's ``losses.local_ncc`` is one window, stride 1, no dilation, zero-padded box sums: not this loss.

Deliberate choices: A = I + ΔA (nn/avsm.py); images are warped with the engine's ``field.warp`` (border padding);
the user's mask is not used. ``affine.h5`` (the affine stage alone) needs a pipeline slot that does not exist yet
(see ``FieldEstimate``); the affine is in report.json ``transform_geometry.method_affine_lps`` and method_info.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..field import compose, invert_fixed_point, warp
from ..frames import Geometry
from ..nn.avsm import (MOMENTUM_CH, AffineNet, MomentumUNet, advect_map, multi_gaussian_smooth, multi_step_affine,
                       normalised_grid, resize_disp_to)
from ..nn.grid import NetGrid
from ..nn.wrappers import Displacement, OnNetGrid, Refine
from .base import Capabilities, FieldEstimate, PairOnGrid, option, register_method
from .learned import LearnedMethod, LearnedOptions, Trainable, TrainStep
from .refine import RefineOptions, plan_info, refine_plan

DEFAULT_CONFIG: dict[str, Any] = {
    "stage": "affine", "affine_train_steps": 5, "affine_test_steps": 7, "vsvf_steps": 2, "time_steps": 10,
    "momentum_ch": list(MOMENTUM_CH), "spacing_mm": 2.0, "epoch_steps": 400, "c_ar": 10.0, "k_ar": 4.0,
    "lambda_as": 10.0, "lambda_vr": 10.0, "lambda_vs": 500.0,
}
REFINE_LR = 0.05


# -- the network: both stages in one module (one weights file) ------------------------------------------------

class AVSMNet(nn.Module):
    size_multiple = 16

    def __init__(self, momentum_ch: Sequence[int] = MOMENTUM_CH, stage: str = "affine"):
        super().__init__()
        self.affine = AffineNet()
        self.momentum = MomentumUNet(tuple(int(c) for c in momentum_ch))
        self.stage = stage


# -- coordinates -----------------------------------------------------------------------------------------------

def homogeneous(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = A, b
    return m


def lps_from_normalised(grid: NetGrid, geometry: Geometry) -> np.ndarray:
    """4×4: normalised coordinates of the canonical grid (component a along canonical array axis a, −1/+1 the first/
    last voxel centres) → LPS mm. Valid for the network grid too (same box, align_corners=True)."""
    n = np.asarray(grid.shape, float)
    S = homogeneous(np.diag((n - 1) / 2.0), (n - 1) / 2.0)        # normalised → canonical voxel
    P = np.zeros((4, 4))
    P[3, 3] = 1.0
    for a in range(3):                                             # canonical voxel → working array index
        w = grid.src[a]
        P[w, a] = -1.0 if grid.flip[a] else 1.0
        P[w, 3] = n[a] - 1 if grid.flip[a] else 0.0
    R = np.zeros((4, 4))
    R[3, 3] = 1.0
    for arr_axis in range(3):                                      # working array index (k, j, i) → ijk
        R[2 - arr_axis, arr_axis] = 1.0
    return geometry.lps_from_ijk_matrix() @ R @ P @ S


def affine_lps_from_normalised(A: np.ndarray, b: np.ndarray, grid: NetGrid, geometry: Geometry) -> np.ndarray:
    """The pull map x ↦ A x + b of normalised canonical coordinates as a 4×4 LPS fixed→moving point map."""
    M = lps_from_normalised(grid, geometry)
    return M @ homogeneous(np.asarray(A, float), np.asarray(b, float)) @ np.linalg.inv(M)


def _scale(shape, like: torch.Tensor) -> torch.Tensor:
    """voxels per normalised unit, (1, 3, 1, 1, 1)."""
    return torch.tensor([(n - 1) / 2.0 for n in shape], dtype=like.dtype, device=like.device).view(1, 3, 1, 1, 1)


def affine_after(A: torch.Tensor, b: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Voxel displacement of x ↦ Aff(x + u(x)) (the full map Φ_aff ∘ (id + u)) on u's grid."""
    shape = tuple(u.shape[2:])
    s = _scale(shape, u)
    x = normalised_grid(shape, u)
    y = x + u / s
    z = torch.einsum("brc,bcdhw->brdhw", A, y) + b.view(-1, 3, 1, 1, 1)
    return (z - x) * s


def vsvf_deformable_step(momentum: MomentumUNet, moving: torch.Tensor, fixed: torch.Tensor, A: torch.Tensor,
                         b: torch.Tensor, u: torch.Tensor, time_steps: int, m0: torch.Tensor | None = None):
    """One self-iteration on the deformable part: m₀ from [source ∘ Φ_aff ∘ (id + u), target] (or the given m₀),
    v₀ = K ⋆ m₀ on the ½ grid, id + u advected there by v₀ and upsampled: u_new = (id + u) ∘ ψ⁻¹ − id.
    Returns (u_new, m₀, v₀)."""
    shape = tuple(fixed.shape[2:])
    if m0 is None:
        m0 = momentum(warp(moving, affine_after(A, b, u)), fixed)
    v0 = multi_gaussian_smooth(m0)
    half = tuple(m0.shape[2:])
    return resize_disp_to(advect_map(resize_disp_to(u, half), v0, time_steps), shape), m0, v0


# -- losses (spec B.4) -------------------------------------------------------------------------------------------

def mk_lncc_settings(shape) -> list[tuple[int, float, int]]:
    """[(window, weight, dilation)] of the code's mk-LNCC for an image of ``shape`` (B.4)."""
    s = min(int(n) for n in shape)
    if s >= 128:
        table, dil = ((1 / 16, 0.1), (1 / 8, 0.3), (1 / 4, 0.6)), 2
    elif s >= 64:
        table, dil = ((1 / 4, 0.3), (1 / 2, 0.7)), 2
    else:
        table, dil = ((1 / 2, 1.0),), 1
    return [(max(2, int(s * r)), w, dil) for r, w in table]


def mk_lncc(fixed: torch.Tensor, moving: torch.Tensor, settings=None, eps: float = 1e-5) -> torch.Tensor:
    """Σ ω (1 − mean(cross² / (var_f var_m + eps))) over dilated k³ windows, stride int((k+1)/4), valid."""
    settings = settings or mk_lncc_settings(fixed.shape[2:])
    total = fixed.new_zeros(())
    for k, w, dil in settings:
        span = dil * (k - 1) + 1
        if span > min(fixed.shape[2:]):                  # a window larger than the image: shrink the dilation/size
            dil = 1
            k = min(k, min(fixed.shape[2:]))
        stride = max(1, int((k + 1) * 0.25))
        ker = fixed.new_ones(1, 1, k, k, k)
        n = float(k ** 3)
        box = lambda x: F.conv3d(x, ker, stride=stride, dilation=dil)   # noqa: E731
        s_f, s_m = box(fixed), box(moving)
        cross = box(fixed * moving) - s_f * s_m / n
        var_f = (box(fixed * fixed) - s_f * s_f / n).clamp_min(0)
        var_m = (box(moving * moving) - s_m * s_m / n).clamp_min(0)
        total = total + w * (1.0 - (cross * cross / (var_f * var_m + eps)).mean())
    return total


def lambda_ar(step: int, config: dict[str, Any]) -> float:
    """Eq. 13: C·K / (K + e^{n/K}), n the epoch (``epoch_steps`` training steps)."""
    n = step // max(1, int(config.get("epoch_steps", 400)))
    c, k = float(config.get("c_ar", 10.0)), float(config.get("k_ar", 4.0))
    return c * k / (k + math.exp(min(n / k, 700.0)))


def affine_reg(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(3, dtype=A.dtype, device=A.device)
    return ((A - eye) ** 2).sum((1, 2)).mean() + (b ** 2).sum(1).mean()


def affine_sym(A: torch.Tensor, b: torch.Tensor, A_ts: torch.Tensor, b_ts: torch.Tensor) -> torch.Tensor:
    """‖A_ts A − I‖² + ‖A_ts b + b_ts‖² (Eq. 5)."""
    eye = torch.eye(3, dtype=A.dtype, device=A.device)
    return (((A_ts @ A - eye) ** 2).sum((1, 2))
            + (((A_ts @ b.unsqueeze(-1)).squeeze(-1) + b_ts) ** 2).sum(1)).mean()


def momentum_reg(m0: torch.Tensor, v0: torch.Tensor) -> torch.Tensor:
    """⟨m₀, v₀⟩: mean over voxels of clamp(Σ_a m_a v_a, 0), both in units where the image spans [0, 1] per axis."""
    scale = torch.tensor([1.0 / max(n - 1, 1) for n in m0.shape[2:]], dtype=m0.dtype, device=m0.device)
    return (m0 * v0 * scale.view(1, 3, 1, 1, 1) ** 2).sum(1).clamp_min(0).mean()


def map_sym(full_st: torch.Tensor, full_ts: torch.Tensor) -> torch.Tensor:
    """mean((Φ^{st}∘Φ^{ts} − id)²), [0, 1] units per axis."""
    shape = full_st.shape[2:]
    err = compose(full_st, full_ts)
    return (err / (2.0 * _scale(shape, err))).pow(2).mean()


# -- the method --------------------------------------------------------------------------------------------------

class _Deformable(Displacement):
    """The deformable part with the last vSVF step's momentum as the free parameter (``Refine``)."""

    def __init__(self, u, inverse_u, ctx: dict[str, Any], m0: torch.Tensor, info=None):
        super().__init__(u, inverse_u, info)
        self.ctx, self.m0 = ctx, m0

    @property
    def param(self) -> torch.Tensor:
        return self.m0

    def with_param(self, m0: torch.Tensor) -> "_Deformable":
        c = self.ctx
        u, _, _ = vsvf_deformable_step(c["net"].momentum, c["moving"], c["fixed"], c["A"], c["b"], c["u_prev"],
                                       c["time_steps"], m0=m0)
        return _Deformable(u, None, c, m0, self.info)


@register_method
class AVSM(Trainable, LearnedMethod):
    name = "avsm"
    title = "AVSM (learned affine + vSVF)"
    description = ("AVSM: learned multi-step affine network and self-iterable vSVF momentum network; its own "
                   "affine (no separate initial alignment by default), one composite transform")
    # memory: one pass of the paper-width networks (7 affine steps, 2 vSVF steps) at 80×96×80 on the CPU peaked
    # 521 bytes per working voxel above the inputs (3.6 s, 1 thread); the numerical inverse and --avsm-refine's
    # autograd graph come on top
    caps = Capabilities(learned=True, inverse="numerical", own_affine=True, default_align="none",
                        contrasts="same", spacing_mm=(("cpu", 2.0),), bytes_per_working_voxel=1000)
    variants = {"affine-only": {"vsvf_steps": 0}, "3-step": {"vsvf_steps": 3}}

    @dataclass
    class Options(LearnedOptions, RefineOptions):
        affine_steps: int = option(7, min=0, max=50, help="multi-step affine steps at test time (paper: 7)")
        vsvf_steps: int = option(2, min=0, max=10, help="self-iterations of the vSVF stage (paper: 2; 3 more Dice "
                                                        "and more folds; 0: the affine stage alone)")
        time_steps: int | None = option(None, min=1, max=100,
                                        help="RK4 steps of the advection (default: the model's, 10)")
        refine_lr: float = option(REFINE_LR, min=0.0, max=10.0,
                                  help="Adam step of --avsm-refine on the last step's momentum")

    def estimate(self, pair: PairOnGrid, device: torch.device, progress) -> FieldEstimate:
        t0 = time.time()
        o = self.opts
        net, cfg, model = self.load_network(device)
        tsteps = int(cfg.get("time_steps", 10) if o.time_steps is None else o.time_steps)
        progress(0.1, f"loaded model {model['id']}")
        found: dict[str, Any] = {}

        def module(m: torch.Tensor, f: torch.Tensor) -> Displacement:
            return self.run_network(net, m, f, int(o.affine_steps), int(o.vsvf_steps), tsteps, found)

        run = module
        n_refine, refine_lr, why = refine_plan(o, pair.follow_up)
        if n_refine > 0 and o.vsvf_steps > 0:
            lam = float(cfg.get("lambda_vr", 10.0))

            def loss_fn(d, m, f):
                c = d.ctx
                u = d.disp(f.shape[2:])
                v0 = multi_gaussian_smooth(d.m0)
                return mk_lncc(f, warp(m, affine_after(c["A"], c["b"], u))) + lam * momentum_reg(d.m0, v0)

            run = Refine(module, loss_fn, n_refine, refine_lr,
                         progress=lambda fr, msg: progress(0.3 + 0.6 * fr, msg))
        with torch.no_grad():
            res = OnNetGrid(run, multiple=net.size_multiple)(pair, device)
            u_net = res.deformation.disp(res.grid.net_shape)
            inv_net = invert_fixed_point(u_net)
            deformable = Displacement(u_net, inv_net)
            disp = res.grid.disp_to_work(deformable.disp(res.grid.shape))
            inv = res.grid.disp_to_work(deformable.inverse().disp(res.grid.shape))
        A, b = found["A"][0].double().cpu().numpy(), found["b"][0].double().cpu().numpy()
        a_lps = affine_lps_from_normalised(A, b, res.grid, pair.geometry)
        info: dict[str, Any] = {**res.info, **res.deformation.info, "affine_steps": int(o.affine_steps),
                                "vsvf_steps": int(o.vsvf_steps), "time_steps": tsteps,
                                "affine_normalised": {"A": A.round(8).tolist(), "b": b.round(8).tolist()},
                                "affine_lps": a_lps.round(8).tolist(),
                                "inverse": "deformable part inverted numerically (fixed point on the network grid); "
                                           "the affine analytically (the pipeline's A^-1)",
                                "seconds": round(time.time() - t0, 3),
                                **plan_info(n_refine if o.vsvf_steps > 0 else 0, why)}
        progress(1.0, "avsm done")
        return FieldEstimate(disp_vox=disp.float().cpu(), inverse_disp_vox=inv.float().cpu(), affine_lps=a_lps,
                             info=info, model=model)

    @staticmethod
    def run_network(net: AVSMNet, m: torch.Tensor, f: torch.Tensor, affine_steps: int, vsvf_steps: int,
                    time_steps: int, found: dict[str, Any]) -> Displacement:
        """Affine (A, b) on the net grid (into ``found``) and the deformable part u (module docstring)."""
        with torch.no_grad():
            A, b = multi_step_affine(net.affine, m, f, affine_steps)
        found.update(A=A, b=b)
        u = f.new_zeros((f.shape[0], 3) + tuple(f.shape[2:]))
        if vsvf_steps <= 0:
            return Displacement(u)
        u_prev, m0 = u, None
        for _ in range(vsvf_steps):
            u_prev = u
            with torch.no_grad():
                u, m0, _ = vsvf_deformable_step(net.momentum, m, f, A, b, u_prev, time_steps)
        ctx = {"net": net, "moving": m, "fixed": f, "A": A, "b": b, "u_prev": u_prev, "time_steps": time_steps}
        return _Deformable(u, None, ctx, m0)

    # -- training protocol -------------------------------------------------------------------------------------
    @dataclass
    class TrainOptions:
        stage: str = option("affine", choices=("affine", "vsvf"),
                            help="what to train: the affine net, or the vSVF stage with the affine net frozen "
                                 "(start it with --init from an affine run)")
        affine_train_steps: int = option(5, min=1, max=20, help="Eq. 1 steps while training the affine net (paper: "
                                                                "5 cross-subject, 3 longitudinal; 1 first)")
        affine_test_steps: int = option(7, min=1, max=50, help="affine steps of the frozen net in the vSVF stage")
        vsvf_steps: int = option(2, min=1, max=5, help="vSVF self-iterations while training (paper: 2)")
        time_steps: int = option(10, min=1, max=100, help="RK4 steps of the advection (paper: 10)")
        momentum_ch: tuple[int, ...] = option(MOMENTUM_CH, min=1, max=1024,
                                              help="momentum U-Net widths, 5 values (paper: 16 32 64 128 256)")
        epoch_steps: int = option(400, min=1, max=1_000_000, help="steps per epoch of the λ_ar schedule (paper: 400)")
        c_ar: float = option(10.0, min=0.0, max=1e6, help="C_ar of the λ_ar schedule (paper: 10; the code divides it "
                                                         "by 100 when the multi-step run starts from the 1-step one)")
        k_ar: float = option(4.0, min=0.1, max=1e3, help="K_ar of the λ_ar schedule (paper: 4)")
        lambda_as: float = option(10.0, min=0.0, max=1e6, help="affine symmetry weight (paper: 10)")
        lambda_vr: float = option(10.0, min=0.0, max=1e6, help="⟨m, v⟩ weight (paper: 10)")
        lambda_vs: float = option(500.0, min=0.0, max=1e6, help="vSVF symmetry weight on the mean form (code: 500)")

    network_keys = ("momentum_ch",)
    loss_terms = ("loss", "sim", "reg", "sym", "lambda_ar")

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, list) else v for k, v in DEFAULT_CONFIG.items()}

    @classmethod
    def build_network(cls, config: dict[str, Any]) -> AVSMNet:
        ch = list(config.get("momentum_ch", MOMENTUM_CH))
        if len(ch) != 5:
            from ..errors import BadInput
            raise BadInput(f"--momentum-ch: 5 widths (got {ch})")
        return AVSMNet(ch, str(config.get("stage", "affine")))

    @classmethod
    def init_network(cls, net: AVSMNet, weights: dict[str, Any]) -> None:
        net.load_state_dict(weights["state_dict"])          # both stages live in one state_dict

    @classmethod
    def prepare_for_training(cls, net: AVSMNet) -> None:
        frozen = net.momentum if net.stage == "affine" else net.affine
        for p in frozen.parameters():
            p.requires_grad_(False)

    @classmethod
    def training_loss(cls, net: AVSMNet, batch: dict[str, Any], config: dict[str, Any], step: TrainStep
                      ) -> dict[str, torch.Tensor]:
        m, f = batch["moving"], batch["fixed"]
        if any(int(n) % AVSMNet.size_multiple for n in f.shape[2:]):
            from ..errors import BadInput
            raise BadInput(f"AVSM trains on grids whose sizes are multiples of {AVSMNet.size_multiple} (got "
                           f"{list(f.shape[2:])}; --synthetic N: N a multiple of {AVSMNet.size_multiple})")
        if config.get("stage", "affine") == "affine":
            return cls._affine_loss(net, m, f, config, step.index)
        return cls._vsvf_loss(net, m, f, config)

    @classmethod
    def _affine_loss(cls, net, m, f, config, step_index):
        k = int(config.get("affine_train_steps", 5))
        shape = tuple(f.shape[2:])
        A, b = multi_step_affine(net.affine, m, f, k)
        A_ts, b_ts = multi_step_affine(net.affine, f, m, k)
        zero = f.new_zeros((f.shape[0], 3) + shape)
        sim = mk_lncc(f, warp(m, affine_after(A, b, zero))) + mk_lncc(m, warp(f, affine_after(A_ts, b_ts, zero)))
        reg = affine_reg(A, b) + affine_reg(A_ts, b_ts)
        sym = affine_sym(A, b, A_ts, b_ts)
        lam = lambda_ar(step_index, config)
        loss = sim + lam * reg + float(config.get("lambda_as", 10.0)) * sym
        return {"loss": loss, "sim": sim, "reg": reg, "sym": sym, "lambda_ar": torch.tensor(lam)}

    @classmethod
    def _vsvf_loss(cls, net, m, f, config):
        ts, n_aff = int(config.get("time_steps", 10)), int(config.get("affine_test_steps", 7))
        with torch.no_grad():
            A, b = multi_step_affine(net.affine, m, f, n_aff)
            A_ts, b_ts = multi_step_affine(net.affine, f, m, n_aff)
        lvr, lvs = float(config.get("lambda_vr", 10.0)), float(config.get("lambda_vs", 500.0))
        u = f.new_zeros((f.shape[0], 3) + tuple(f.shape[2:]))
        u_ts = u
        sim = reg = sym = f.new_zeros(())
        for _ in range(int(config.get("vsvf_steps", 2))):
            u, m0, v0 = vsvf_deformable_step(net.momentum, m, f, A, b, u, ts)
            u_ts, m0_ts, v0_ts = vsvf_deformable_step(net.momentum, f, m, A_ts, b_ts, u_ts, ts)
            full, full_ts = affine_after(A, b, u), affine_after(A_ts, b_ts, u_ts)
            sim = sim + mk_lncc(f, warp(m, full)) + mk_lncc(m, warp(f, full_ts))
            reg = reg + momentum_reg(m0, v0) + momentum_reg(m0_ts, v0_ts)
            sym = sym + map_sym(full, full_ts)
        return {"loss": sim + lvr * reg + lvs * sym, "sim": sim, "reg": reg, "sym": sym,
                "lambda_ar": torch.zeros(())}

    @classmethod
    def validation_disp(cls, net: AVSMNet, moving: torch.Tensor, fixed: torch.Tensor, config: dict[str, Any]
                        ) -> torch.Tensor:
        """The full map Φ_aff ∘ (id + u) (voxels): the affine stage alone while training it."""
        stage = config.get("stage", "affine")
        found: dict[str, Any] = {}
        d = cls.run_network(net, moving, fixed, int(config.get("affine_test_steps", 7)),
                            0 if stage == "affine" else int(config.get("vsvf_steps", 2)),
                            int(config.get("time_steps", 10)), found)
        return affine_after(found["A"], found["b"], d.disp(fixed.shape[2:]))

    @classmethod
    def model_card(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {"title": "AVSM",
                "input_grid": {"spacing_mm": config.get("spacing_mm", 2.0), "size_multiple": AVSMNet.size_multiple,
                               "orientation": "LPS-aligned array axes (the method reorients internally)",
                               "pre_alignment": "none (the method learns its own affine)"},
                "modality": "mono-contrast pairs (mk-LNCC), not pre-aligned"}
