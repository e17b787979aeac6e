"""SPnet (symmetric pyramid network): a shared-weight 4-level feature pyramid of both images, and per level a
velocity estimator run in both directions whose outputs are averaged antisymmetrically, v = ½(v̂_AB − v̂_BA), so
that φ_AB = exp(v) and φ_BA = exp(−v) are inverses by construction and swapping the inputs swaps the outputs.

Spec: shared docs/methods/seeds-spnet-avsm.md, Part A (the code's layers, A.3.2–A.3.7). Frames: (B, C, D, H, W);
fields in voxels of their level's grid, channel c along array axis c, pull direction: A∘φ_AB ≈ B, i.e. φ_AB is
defined on B's grid (B is the fixed image, A the moving one). Level 1 is full resolution, level 4 is ⅛.

Deliberate choices (spec A.10): sampling with align_corners=True and border-value padding through the shared
``field.warp`` (a clean reimplementation, not the released checkpoint's grid convention); each level's φ is the
exponential of that level's velocity only — the coarser field warps the features and is an input channel, it is
not composed in (A.3.5); upsampled displacements are doubled (A.3.6); the image pyramid is nearest subsampling,
as in the code (A.3.1). Grid sizes must be multiples of 8.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..field import integrate_ss, warp

LEVELS = 4
ENC_CH = (8, 16, 32, 32)     # C_1^i channels, levels 1..4
IMG_CH = 8                   # C_2^i on the subsampled image, levels 2..4
EST_H = (16, 16, 32, 32)     # estimator width H, levels 1..4
GLOBAL_CH = 8                # "global feature" passed up by ConvTranspose3d


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.LeakyReLU(0.1))


def image_pyramid(x: torch.Tensor, levels: int = LEVELS) -> list[torch.Tensor]:
    """[x, x↓2, x↓4, x↓8]: nearest subsampling (the code's ``F.interpolate(scale_factor=...)``)."""
    return [x] + [F.interpolate(x, scale_factor=0.5 ** i, mode="nearest") for i in range(1, levels)]


class PyramidEncoder(nn.Module):
    """F^1 = C_1^1(I^1); F^i = [C_1^i(F^{i−1}), C_2^i(I^i)] for i ≥ 2 (Eq. 5). Channels 8, 24, 40, 40."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.ModuleList()
        self.c2 = nn.ModuleList()
        prev = 1
        for i, ch in enumerate(ENC_CH):
            self.c1.append(nn.Sequential(_conv(prev, ch, stride=1 if i == 0 else 2), _conv(ch, ch)))
            if i > 0:
                self.c2.append(_conv(1, IMG_CH))
            prev = ch + (IMG_CH if i > 0 else 0)

    def channels(self) -> list[int]:
        return [ch + (IMG_CH if i > 0 else 0) for i, ch in enumerate(ENC_CH)]

    def forward(self, pyramid: list[torch.Tensor]) -> list[torch.Tensor]:
        feats, x = [], pyramid[0]
        for i in range(LEVELS):
            x = self.c1[i](x)
            if i > 0:
                x = torch.cat([x, self.c2[i - 1](pyramid[i])], dim=1)
            feats.append(x)
        return feats


class VelocityEstimator(nn.Module):
    """conv0 → residual conv1 (the body), ``pred`` → 3-channel temporary velocity (N(0, 1e-5) init, near zero),
    ``upfeat`` → the global feature for the next finer level (absent at level 1)."""

    def __init__(self, cin: int, width: int, upfeat: bool):
        super().__init__()
        self.conv0 = _conv(cin, width)
        self.conv1 = _conv(width, width)
        self.pred = nn.Conv3d(width, 3, 3, padding=1)
        nn.init.normal_(self.pred.weight, 0.0, 1e-5)
        nn.init.zeros_(self.pred.bias)
        self.upfeat = nn.ConvTranspose3d(width, GLOBAL_CH, 4, stride=2, padding=1) if upfeat else None

    def body(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv0(x)
        return x + self.conv1(x)


def upsample_disp(u: torch.Tensor) -> torch.Tensor:
    """×2 trilinear upsampling of a voxel displacement, values doubled (voxels of the finer grid)."""
    return 2.0 * F.interpolate(u, scale_factor=2, mode="trilinear", align_corners=False)


class SPNet(nn.Module):
    """``forward(moving=A, fixed=B)`` → dict of per-level lists, index 0 = level 1 (full resolution):
    ``velocity`` v_i, ``forward`` u_AB,i (displacement of exp(v_i), on B's grid), ``backward`` u_BA,i = disp of
    exp(−v_i), and ``pyramid_moving``/``pyramid_fixed`` (the subsampled images the loss compares)."""

    size_multiple = 2 ** (LEVELS - 1)

    def __init__(self, int_steps: int = 7):
        super().__init__()
        self.int_steps = int(int_steps)
        self.encoder = PyramidEncoder()
        ch = self.encoder.channels()
        self.estimators = nn.ModuleList()
        for i in range(LEVELS):            # level i+1; the bottom one sees only the two features
            cin = 2 * ch[i] + (0 if i == LEVELS - 1 else GLOBAL_CH + 3)
            self.estimators.append(VelocityEstimator(cin, EST_H[i], upfeat=i > 0))

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        m = self.size_multiple
        if any(s % m for s in fixed.shape[2:]):
            raise ValueError(f"SPNet.forward() grid must be divisible by {m}, got {tuple(fixed.shape[2:])}")
        pa, pb = image_pyramid(moving), image_pyramid(fixed)
        fa, fb = self.encoder(pa), self.encoder(pb)
        vel, fwd, bwd = [None] * LEVELS, [None] * LEVELS, [None] * LEVELS
        g_f = g_b = None
        for i in reversed(range(LEVELS)):
            est = self.estimators[i]
            if i == LEVELS - 1:
                hf = est.body(torch.cat([fa[i], fb[i]], 1))
                hb = est.body(torch.cat([fb[i], fa[i]], 1))
            else:
                up_f, up_b = upsample_disp(fwd[i + 1]), upsample_disp(bwd[i + 1])
                hf = est.body(torch.cat([warp(fa[i], up_f), fb[i], g_f, up_f], 1))
                hb = est.body(torch.cat([warp(fb[i], up_b), fa[i], g_b, up_b], 1))
            v = 0.5 * (est.pred(hf) - est.pred(hb))       # Eq. 8: v_BA = −v_AB exactly
            vel[i] = v
            fwd[i] = integrate_ss(v, self.int_steps)
            bwd[i] = integrate_ss(-v, self.int_steps)
            if est.upfeat is not None:
                g_f, g_b = est.upfeat(hf), est.upfeat(hb)
        return {"velocity": vel, "forward": fwd, "backward": bwd, "pyramid_moving": pa, "pyramid_fixed": pb}
