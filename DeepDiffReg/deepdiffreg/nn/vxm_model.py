"""VoxelMorph-diff model pieces shared by training (the training protocol in methods/vxm_diff.py) and inference.

Grids: the network sees (moving, fixed) on a grid whose sizes are multiples of 2**len(enc); it predicts the
velocity on the ½-resolution grid; exp(v) is integrated there by scaling and squaring and the displacement is
then resized to the full grid (values rescaled to the full grid's voxel units, ``field.resize_disp``).

Cascade (config ``"stages": K`` > 1, a recursive cascade of the same network, Zhao et al. ICCV 2019): stage k
registers the moving image already warped by stages 1..k−1 and the maps compose, φ = φ1 ∘ φ2 ∘ … ∘ φK (each
φk = exp(vk), so the result stays diffeomorphic and its inverse is exp(−vK) ∘ … ∘ exp(−v1)). Training updates
the last stage only by default (the earlier ones are frozen: they are the previous model); config
``train_stages: all`` fine-tunes every stage end to end. The cascade, symmetric inference and
the exp(−v) inverse are the generic wrappers of nn/wrappers.py; ``svf_stage`` makes one U-Net a registration module.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..field import compose, integrate_ss, resize_disp, warp
from ..losses.kl import kl_laplacian, recon_mse
from .blocks import StageCascade, stage_nets
from .unet import DEFAULT_DEC, DEFAULT_ENC, VxmDiffUNet
from .wrappers import SVF, Cascade, Symmetric

# "method": the method that builds this network (a weights file's config names it, as its meta does)
DEFAULT_CONFIG: dict[str, Any] = {
    "method": "vxm-diff", "enc": list(DEFAULT_ENC), "dec": list(DEFAULT_DEC), "int_steps": 7,
    "image_sigma": 0.02, "prior_lambda": 20.0, "spacing_mm": 2.0, "dice_weight": 0.0, "dice_grid": "full",
    "dice_labels": 8, "train_stages": "last",
}


class VxmCascade(StageCascade):
    """K VoxelMorph-diff U-Nets applied one after the other (see the module docstring; ``StageCascade``);
    ``stages[k]`` is one ``VxmDiffUNet``."""


def build_net(config: dict[str, Any]) -> VxmDiffUNet | VxmCascade:
    nets = [VxmDiffUNet(config.get("enc", DEFAULT_ENC), config.get("dec", DEFAULT_DEC))
            for _ in range(int(config.get("stages", 1)))]
    return nets[0] if len(nets) == 1 else VxmCascade(nets)


def svf_stage(unet: VxmDiffUNet, steps: int = 7, symmetric: bool = False):
    """One U-Net as a registration module (nn/wrappers.py): (moving, fixed) → SVF(μ) with the log-variance in
    ``extras``; ``symmetric``: μ = ½(μ(m, f) − μ(f, m)) (``Symmetric``)."""
    def stage(moving: torch.Tensor, fixed: torch.Tensor) -> SVF:
        mu, logvar = unet(moving, fixed)
        return SVF(mu, steps, {"logvar": logvar})
    return Symmetric(stage) if symmetric else stage


def predict_mean(unet: VxmDiffUNet, moving: torch.Tensor, fixed: torch.Tensor, symmetric: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, logvar) of one stage; ``symmetric``: μ = ½(μ(m, f) − μ(f, m)) — the forward estimate averaged with the
    negated estimate for the swapped pair (exp(v) maps fixed→moving, the swapped pair's exp(v') moving→fixed)."""
    d = svf_stage(unet, symmetric=symmetric)(moving, fixed)
    return d.velocity, d.extras["logvar"]


@torch.no_grad()
def prior_stages(net: VxmDiffUNet | VxmCascade, moving: torch.Tensor, fixed: torch.Tensor, steps: int,
                 symmetric: bool, inverse: bool = False
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Every stage but the last: their composed displacement on the grid of ``fixed`` (voxels), optionally its
    inverse, and the moving image warped by it — what the last stage sees. A single network: (None, None, moving).
    Stage k sees the moving image warped by stages 1..k−1."""
    earlier = stage_nets(net)[:-1]
    if not earlier:
        return None, None, moving
    phi = Cascade([svf_stage(u, steps, symmetric) for u in earlier])(moving, fixed)
    disp = phi.disp(phi.grid)
    inv = phi.inverse().disp(phi.grid) if inverse else None
    return disp, inv, warp(moving, disp)                               # one interpolation of the original


def velocity_to_disp(v_half: torch.Tensor, full_shape: tuple[int, int, int], steps: int = 7) -> torch.Tensor:
    """v_half: (B, 3, d, h, w) SVF in ½-grid voxels → (B, 3, *full_shape) displacement of exp(v) in full-grid voxels."""
    return resize_disp(integrate_ss(v_half, steps), tuple(full_shape))


def sample_velocity(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Reparameterised sample z = μ + exp(logvar/2)·ε (training)."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def soft_dice_loss(fixed_lab: torch.Tensor, moving_lab: torch.Tensor, disp: torch.Tensor,
                   labels: list[int]) -> torch.Tensor:
    """1 − mean soft Dice of the one-hot moving labels warped (trilinear) by ``disp`` vs the fixed labels.

    ``disp`` is on the label grid, or on a grid half its size in every axis (the ½-resolution grid of the velocity,
    voxel units of that grid): then both one-hot maps are first averaged over 2×2×2 blocks (label fractions), which
    makes the warp — the costly part of a training step — 8× cheaper."""
    mo = torch.cat([(moving_lab == l).float() for l in labels], dim=1)
    fo = torch.cat([(fixed_lab == l).float() for l in labels], dim=1)
    if tuple(disp.shape[2:]) != tuple(mo.shape[2:]):
        mo, fo = F.avg_pool3d(mo, 2), F.avg_pool3d(fo, 2)
        if tuple(disp.shape[2:]) != tuple(mo.shape[2:]):
            raise ValueError(f"soft_dice_loss() disp grid {tuple(disp.shape[2:])} is neither the label grid "
                             f"{tuple(fixed_lab.shape[2:])} nor half of it")
    wo = warp(mo, disp)
    inter = (wo * fo).sum(dim=(2, 3, 4))
    den = wo.sum(dim=(2, 3, 4)) + fo.sum(dim=(2, 3, 4))
    return 1.0 - (2 * inter / den.clamp_min(1e-6)).mean()


@torch.no_grad()
def predict_disp(net: VxmDiffUNet | VxmCascade, moving: torch.Tensor, fixed: torch.Tensor, steps: int,
                 symmetric: bool = False) -> torch.Tensor:
    """The mean transform's displacement (B, 3, *fixed grid) in voxels: earlier stages symmetric (as trained), the
    last one as asked (the training log's validation uses the forward pass, ``symmetric=False``)."""
    nets = stage_nets(net)
    stages = [svf_stage(u, steps, True) for u in nets[:-1]] + [svf_stage(nets[-1], steps, symmetric)]
    return Cascade(stages)(moving, fixed).disp(tuple(fixed.shape[2:]))


def load_stages(net: VxmDiffUNet | VxmCascade, obj: dict[str, Any]) -> None:
    """Load a weights object into ``net``. A model with fewer stages seeds a deeper cascade: its stages fill the
    first ones and its last stage is copied into each new one (the new stage starts as the old network, which
    already helps as a second pass, and is then fine-tuned on the residual pairs)."""
    have = int(obj["config"].get("stages", 1))
    nets = stage_nets(net)
    if have == len(nets):
        net.load_state_dict(obj["state_dict"])
        return
    if have > len(nets):
        raise ValueError(f"load_stages() weights have {have} stages, the model {len(nets)}")
    src = build_net(obj["config"])
    src.load_state_dict(obj["state_dict"])
    old = stage_nets(src)
    for k, unet in enumerate(nets):
        unet.load_state_dict(old[min(k, have - 1)].state_dict())


def _trained_prior_stages(nets: list[VxmDiffUNet], moving: torch.Tensor, fixed: torch.Tensor, config: dict[str, Any],
                          generator: torch.Generator | None
                          ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Every stage but the last, *with* gradients (config ``train_stages: all``), through ``wrappers.Cascade``:
    each samples its velocity z_k = μ_k + σ_k·ε as the last one does, on the moving image warped by the stages
    before it. Returns their composed displacement (fixed grid, voxels; None for one network), the moving image
    warped by it and the sum of their KL terms."""
    if len(nets) < 2:
        return None, moving, moving.new_zeros(())
    kls: list[torch.Tensor] = []

    def sampled(unet: VxmDiffUNet):
        def stage(m_in: torch.Tensor, fx: torch.Tensor) -> SVF:
            mu, logvar = unet(m_in, fx)
            z = sample_velocity(mu, logvar, generator)
            kls.append(kl_laplacian(mu, logvar, config["prior_lambda"]))
            return SVF(z, config["int_steps"])
        return stage

    phi = Cascade([sampled(u) for u in nets[:-1]])(moving, fixed)
    prior = phi.disp(phi.grid)
    return prior, warp(moving, prior), sum(kls[1:], kls[0])


def training_step_loss(net: VxmDiffUNet | VxmCascade, moving: torch.Tensor, fixed: torch.Tensor, config: dict[str, Any],
                       generator: torch.Generator | None = None, fixed_lab: torch.Tensor | None = None,
                       moving_lab: torch.Tensor | None = None, dice_labels: list[int] | None = None,
                       same_contrast: bool = True) -> dict[str, torch.Tensor]:
    """Negative ELBO for one pair (one sample, K = 1): recon_mse(f, m∘φ_z)/σ² + KL, plus an optional Dice term.
    For a cascade the terms are those of the last stage's velocity, φ = φ_prior ∘ exp(z); by default (config
    ``train_stages: last``) the earlier stages are frozen and run as at inference (symmetric), so the last one
    learns the residuals it will be shown; ``train_stages: all`` trains them too (sampled, with their KL terms
    added). ``same_contrast=False`` (a pair rendered with two intensity tables): the Gaussian likelihood of the
    intensities does not hold, so the MSE term is left out (and not reported) and only the KL and Dice terms act."""
    nets = stage_nets(net)
    if config.get("train_stages", "last") == "all":
        prior, m_in, kl_prior = _trained_prior_stages(nets, moving, fixed, config, generator)
    else:
        (prior, _, m_in), kl_prior = prior_stages(net, moving, fixed, config["int_steps"], symmetric=True), None
    mu, logvar = nets[-1](m_in, fixed)
    z = sample_velocity(mu, logvar, generator)
    u_half = integrate_ss(z, config["int_steps"])
    disp = resize_disp(u_half, tuple(fixed.shape[2:]))
    if prior is not None:
        u_half = compose(resize_disp(prior, tuple(u_half.shape[2:])), u_half)
        disp = compose(prior, disp)
    kl = kl_laplacian(mu, logvar, config["prior_lambda"])
    if kl_prior is not None:
        kl = kl + kl_prior
    loss, out = kl, {"kl": kl}
    if same_contrast:
        recon = recon_mse(fixed, warp(moving, disp), config["image_sigma"])
        loss, out["recon"] = loss + recon, recon
    if config.get("dice_weight", 0) > 0 and fixed_lab is not None and dice_labels:
        dl = soft_dice_loss(fixed_lab, moving_lab, u_half if config.get("dice_grid") == "half" else disp, dice_labels)
        loss = loss + config["dice_weight"] * dl
        out["dice_loss"] = dl
    out["loss"] = loss
    return out
