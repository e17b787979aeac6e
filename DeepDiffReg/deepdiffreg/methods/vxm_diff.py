"""VoxelMorph-diff (Dalca et al., MedIA 2019): a U-Net predicts a Gaussian over a stationary velocity field on the
½-resolution grid; at test time the mean μ is integrated (scaling and squaring, 7 steps) and upsampled.

What this file adds to the shared core (see nn/vxm_model.py, losses/kl.py, field/):
- orientation: the network was trained on LPS-aligned arrays; the working grid keeps the fixed image's direction,
  so the pair is permuted/flipped to the nearest LPS axis order and the field is mapped back;
- the pair is resampled (same box) to the nearest grid whose sizes are multiples of 16; the field is resized back
  (values rescaled), cheaper than zero padding (81×97×113 → 80×96×112, not 96×112×128);
- symmetric inference (default; ``--vxm-no-symmetric`` for the paper's forward pass only): v = ½(μ(m, f) − μ(f, m)),
  the mean of the forward estimate and the inverse of the swapped pair's estimate — +0.01 validation Dice on all
  8 validation pairs for one more network pass (docs/training.md);
- a model may be a recursive cascade of such networks (config ``stages`` > 1, nn/vxm_model.py): the earlier stages
  warp the moving image, the last one registers what is left, φ = φ1 ∘ … ∘ φK; refinement and the uncertainty
  act on the last stage's velocity, given the earlier ones;
- inverse = exp(−v) on the same grid (a cascade: exp(−vK) ∘ … ∘ exp(−v1));
- uncertainty (methods/vxm_uncertainty.py): by default the diagonal Laplace posterior of the model's own objective
  for this pair at μ, with the image noise re-estimated from the local residual (``--vxm-uncertainty laplace``);
  ``sampled`` gives the network's variance head as in the paper (S velocity samples integrated);
- ``--refine N``: N Adam steps on μ with the method's loss (MSE/σ² + λ·Laplacian prior term of the KL).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..field import compose, integrate_ss, resize_disp, resize_image, warp
from ..io.weights import find_model, load_weights
from ..losses.kl import laplacian_prec, recon_mse
from ..nn.vxm_model import build_net, predict_mean, prior_stages, stage_nets, velocity_to_disp
from .base import Capabilities, FieldEstimate, Map, Method, PairOnGrid, option, register_method
from .refine import RefineOptions, refine
from .vxm_uncertainty import laplace_std_mm, sampled_std_mm


def canonical_axes(direction: np.ndarray) -> tuple[list[int], list[bool]]:
    """For a 3×3 direction (column c = LPS vector of index axis c = i, j, k), return (src, flip): canonical array
    axis a (0 = S, 1 = P, 2 = L, i.e. LPS component 2 − a) is working array axis src[a], flipped if flip[a]."""
    src, flip = [0, 0, 0], [False, False, False]
    used = set()
    for arr_axis in range(3):                     # working array axis arr_axis ↔ index axis 2 − arr_axis
        col = direction[:, 2 - arr_axis]
        order = np.argsort(-np.abs(col))
        comp = next(int(c) for c in order if int(c) not in used)
        used.add(comp)
        src[2 - comp] = arr_axis                  # LPS component comp ↔ canonical array axis 2 − comp
        flip[2 - comp] = bool(col[comp] < 0)
    return src, flip


def to_canonical(x: torch.Tensor, src: list[int], flip: list[bool]) -> torch.Tensor:
    """(B, C, D, H, W) image on the working grid → canonical array order (no channel change)."""
    y = x.permute(0, 1, 2 + src[0], 2 + src[1], 2 + src[2])
    dims = [2 + a for a in range(3) if flip[a]]
    return y.flip(dims) if dims else y


def disp_from_canonical(u: torch.Tensor, src: list[int], flip: list[bool]) -> torch.Tensor:
    """Inverse of ``to_canonical`` for a voxel displacement: undo flips (negating those components), then permute
    both the grid axes and the channels back to the working array order."""
    dims = [2 + a for a in range(3) if flip[a]]
    if dims:
        sign = torch.tensor([-1.0 if flip[a] else 1.0 for a in range(3)], dtype=u.dtype, device=u.device)
        u = u.flip(dims) * sign.view(1, 3, 1, 1, 1)
    inv = [src.index(w) for w in range(3)]        # working axis w is canonical axis inv[w]
    u = u.permute(0, 1, 2 + inv[0], 2 + inv[1], 2 + inv[2])
    return u[:, inv]                              # channel w = displacement along working axis w


def net_grid_shape(shape, m: int) -> tuple[int, int, int]:
    """The nearest sizes that are multiples of m (at least m): the pair is resampled onto that grid (same box)."""
    return tuple(max(m, int(round(n / m)) * m) for n in shape)


# Adam step of --refine, in ½-grid voxels. Measured on ixi-2 (IXI631 ← IXI633, whole head, v0.4.0, 50 steps):
# 0.05 → Dice 0.677, 0.082 % folded voxels; 0.025 → 0.673, 0.018 %; 0.0125 → 0.667, 0.001 %. Larger steps overshoot
# into folding fields that the best-loss rule keeps.
REFINE_LR = 0.025


@register_method
class VxmDiff(Method):
    name = "vxm-diff"
    title = "VoxelMorph-diff (learned, with uncertainty)"
    description = "VoxelMorph-diff: probabilistic diffeomorphic U-Net (SVF, scaling and squaring) with uncertainty"
    flag_prefix = "vxm"
    caps = Capabilities(learned=True, inverse="exact", uncertainty=True, contrasts="same",
                        spacing_mm=(("cpu", 2.0),))
    variants = {"refine": {"refine": 50}}
    benchmark_variants = ("refine",)   # the benchmark's vxm-diff+refine row

    @dataclass
    class Options(RefineOptions):
        model: str | None = option(None, help="model id from `deepdiffreg models list` (default: the newest model "
                                              "of this method)")
        symmetric: bool = option(True, help="mean of the forward velocity and the negated velocity predicted for the "
                                            "swapped pair (one more pass); off: the network's forward prediction "
                                            "only (the paper)")
        int_steps: int = option(7, min=0, max=20, help="scaling-and-squaring steps (the model was trained with 7)")
        uncertainty: str = option("laplace", choices=("laplace", "sampled"),
                                  help="uncertainty map: 'laplace' = posterior of the model's objective for this pair, "
                                       "'sampled' = the network's own variance head (see methods/vxm_uncertainty.py)")
        uncertainty_samples: int = option(8, min=0, max=1000, help="velocity samples for --vxm-uncertainty sampled "
                                                                   "(0: exp(logvar), no sampling)")
        refine_lr: float = option(REFINE_LR, min=0.0, max=10.0, help="Adam step for --vxm-refine (½-grid voxels)")
        seed: int = option(0, min=0, help="random seed of the uncertainty samples")

    def estimate(self, pair: PairOnGrid, device: torch.device, progress) -> FieldEstimate:
        t0 = time.time()
        o = dataclasses.asdict(self.opts)
        entry = find_model(o["model"], method=self.name)
        obj = load_weights(entry)
        cfg = dict(obj["config"])
        net = build_net(cfg)
        net.load_state_dict(obj["state_dict"])
        n_stages = len(stage_nets(net))
        net.to(device).eval()
        progress(0.1, f"loaded model {entry['id']}")

        src, flip = canonical_axes(pair.geometry.direction)
        f = to_canonical(pair.fixed.to(device, torch.float32), src, flip)
        m = to_canonical(pair.moving.to(device, torch.float32), src, flip)
        shape = list(f.shape[2:])
        pshape = net_grid_shape(shape, net.size_multiple)
        fp, mp = resize_image(f, pshape), resize_image(m, pshape)   # same box, sizes a multiple of 16
        steps = int(o["int_steps"])
        with torch.no_grad():
            # a cascade's earlier stages first (composed, with their inverse); then the last stage on the moving
            # image they warped — for a single network, prior is None and m_in is the moving image
            prior, prior_inv, m_in = prior_stages(net, mp, fp, steps, bool(o["symmetric"]), inverse=True)
            mu, logvar = predict_mean(stage_nets(net)[-1], m_in, fp, bool(o["symmetric"]))
        progress(0.4, "network done")
        info: dict[str, Any] = {"int_steps": steps, "velocity_grid": list(mu.shape[2:]), "net_grid": list(pshape),
                                "axes_to_canonical": {"src": src, "flip": flip}, "symmetric": bool(o["symmetric"]),
                                "stages": n_stages}
        if o["refine"] > 0:
            sig, lam = cfg["image_sigma"], cfg["prior_lambda"]

            def loss_fn(v):
                warped = warp(m_in, velocity_to_disp(v, pshape, steps))
                return recon_mse(fp, warped, sig) + 0.5 * 3 * lam * laplacian_prec(v)

            mu, rinfo = refine(mu, loss_fn, o["refine"], lr=float(o["refine_lr"]),
                               progress=lambda fr, msg: progress(0.4 + 0.3 * fr, msg))
            info.update(rinfo)
        with torch.no_grad():
            shape = tuple(shape)
            u_half = integrate_ss(mu, steps)                  # exp(v) on the ½ grid, resized where it is needed
            if prior is None:
                disp = resize_disp(u_half, shape)
                inv = velocity_to_disp(-mu, shape, steps)
            else:                                             # φ = φ_prior ∘ exp(v), φ⁻¹ = exp(−v) ∘ φ_prior⁻¹
                disp = resize_disp(compose(prior, resize_disp(u_half, tuple(pshape))), shape)
                inv = resize_disp(compose(velocity_to_disp(-mu, tuple(pshape), steps), prior_inv), shape)
            sp = torch.tensor(pair.geometry.spacing_ijk[::-1], dtype=mu.dtype, device=device)  # (k, j, i)
            half = mu.shape[2:]
            # mm per ½-grid voxel along each canonical axis: working spacing × (n_work − 1)/(n_half − 1)
            mm = torch.stack([sp[src[a]] * (shape[a] - 1) / max(half[a] - 1, 1) for a in range(3)])
            kind, ns = o["uncertainty"], int(o["uncertainty_samples"])
            if kind == "laplace":
                unc = laplace_std_mm(mu, fp, m_in, resize_disp(u_half, tuple(pshape)), cfg["prior_lambda"],
                                     cfg["image_sigma"], mm)
                info["uncertainty"] = ("laplace: sqrt(trace) of the diagonal Laplace posterior covariance of the "
                                       "velocity at mu for this pair (prior lambda*D + data 2*grad^2/sigma_loc^2, "
                                       "sigma_loc^2 = sigma^2 + local mean squared residual), mm")
            elif kind == "sampled":
                unc = sampled_std_mm(mu, logvar, ns, steps, o["seed"], mm)
                info["uncertainty"] = (f"sampled: sqrt(trace of the displacement covariance) in mm over {ns} "
                                       f"velocity samples z = mu + exp(logvar/2)*eps" if ns > 0 else
                                       "sampled: sqrt(trace of the velocity posterior covariance exp(logvar)) in mm")
            else:
                raise ValueError(f"vxm-diff: unknown uncertainty {kind!r} (laplace | sampled)")
            unc = to_canonical_inverse_scalar(resize_image(unc, shape), src, flip)
            info["velocity_std_mean_halfgrid_vox"] = float(torch.exp(0.5 * logvar).mean())
        disp = disp_from_canonical(disp, src, flip)
        inv = disp_from_canonical(inv, src, flip)
        info["seconds"] = round(time.time() - t0, 3)
        progress(1.0, "vxm-diff done")
        return FieldEstimate(disp_vox=disp.cpu(), inverse_disp_vox=inv.cpu(),
                             maps={"uncertainty": Map(unc.cpu(), "mm", info["uncertainty"])}, info=info,
                             model={"id": entry["id"], "version": entry.get("version"), "sha256": entry["sha256"]})


def to_canonical_inverse_scalar(x: torch.Tensor, src: list[int], flip: list[bool]) -> torch.Tensor:
    """Inverse of ``to_canonical`` for a scalar/multi-channel image (channels untouched)."""
    dims = [2 + a for a in range(3) if flip[a]]
    if dims:
        x = x.flip(dims)
    inv = [src.index(w) for w in range(3)]
    return x.permute(0, 1, 2 + inv[0], 2 + inv[1], 2 + inv[2])
