"""R2Net (Joshi & Hong, MedIA 2023): a U-Net predicts an initial velocity v0 at full resolution, and a stack of
Lipschitz-continuous residual blocks (LC-ResNet) integrates it, x_k = x_{k−1} + F_k(x_{k−1}), φ = id + x_N.

Spec: shared docs/methods/seeds-r2net-nodeo.md, Part A (the code's configuration, A2.2–A2.3, A2.6). Frames: fields
are (B, 3, D, H, W) in voxel units of the grid they live on, channel c along array axis c, pull direction
(warped(x) = moving(x + u(x))).

- ``R2NetUNet``: the released code's "nonProb" U-Net (stride-2 encoder 16/32/32/32, decoder 32/32/32/32/16/16/3
  with ConvTranspose3d(8) upsampling and skips, v0 head Conv3d(3, no bias) / 2). Sizes must be multiples of 16.
  ``probabilistic=True`` adds the VoxelMorph-diff μ / log σ² heads for the paper's "Prob" ablation (sampled in
  training, μ at inference, KL with losses.kl_laplacian).
- ``LCBlock``: F(x) = scale · tanh(SN-Conv1×1(LeakyReLU_0.2(SN-Conv3×3(x)))), spectral normalisation with one power
  iteration per training forward pass (torch's parametrisation; it normalises the reshaped kernel matrix, as the
  reference code does, not the true operator norm). ``scale`` defaults to the code's 0.5, which keeps the residual
  branch's Lipschitz constant below 1 (i-ResNet invertibility of each block); the paper's text says 2.
- ``LCIntegrator``: SVF = one shared block applied N times (stationary velocity, the ResNet analogue of exp(v));
  NSVF = N independent blocks (time-varying velocity). N = 7 as in the paper. No warping inside: the network
  learns to integrate (the paper's Eq. 7 is the motivation, not a composition).
- ``backbone="vxm"``: the velocity U-Net is VoxelMorph-diff's (nn/unet.py: decoder up to ½ resolution, μ and
  log σ² heads), its μ resized to the full grid (vectors ×2) and integrated there by the LC blocks. A deviation from
  the paper (whose U-Net decodes to full resolution) that lets R2Net start from trained VoxelMorph-diff weights
  (the issue allows it when the model card says so); it also keeps the full-resolution part to 3-channel fields.
- ``R2NetCascade``: K R2Nets in a recursive cascade (stage k registers the moving image warped by stages 1..k−1,
  φ = φ1 ∘ … ∘ φK), the layout of a VoxelMorph-diff cascade, so such a model can seed one stage for stage.
- ``MSR2Net``: the two-phase multi-scale model for large volumes — 2×2×2 overlapping chunks at full resolution and
  the ×2-downsampled volume through two phase-1 networks (their *initial* velocities only), merged (overlaps
  averaged), the coarse one upsampled with its vectors ×2, fused by a 6→3 convolution and integrated by LC blocks
  at full resolution. Phase 2 has no U-Net, so the full-resolution memory is a few 3-channel fields.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ..field import resize_disp
from .blocks import ConvBlock, StageCascade
from .unet import VxmDiffUNet

ENC = (16, 32, 32, 32)
DEC = (32, 32, 32, 32, 16, 16, 3)
N_BLOCKS = 7
BLOCK_SCALE = 0.5
CHECKPOINT_MIN_VOXELS = 128 ** 3   # LC blocks recompute their branch in the backward pass from this field size up


class R2NetUNet(nn.Module):
    """cat(moving, fixed) (B, 2, D, H, W) → v0 (B, 3, D, H, W), voxel units (and (μ, logvar) if probabilistic)."""

    def __init__(self, enc: Sequence[int] = ENC, dec: Sequence[int] = DEC, up_channels: int = 8,
                 probabilistic: bool = False):
        super().__init__()
        n = len(enc)
        if len(dec) < n + 3:
            raise ValueError(f"R2NetUNet() 'dec' needs at least {n + 3} entries, got {len(dec)}")
        self.enc_cfg, self.dec_cfg, self.probabilistic = tuple(enc), tuple(dec), probabilistic
        self.encoder = nn.ModuleList()
        prev = 2
        for ch in enc:
            self.encoder.append(ConvBlock(prev, ch, stride=2))
            prev = ch
        self.bottom = ConvBlock(prev, dec[0])
        prev = dec[0]
        skips = [2, *enc[:-1]]                       # channels of the level each upsampling lands on
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        di = 1
        for level in range(n):
            self.up.append(nn.ConvTranspose3d(prev, up_channels, 3, stride=2, padding=1, output_padding=1))
            blocks, c = [], up_channels + skips[n - 1 - level]
            # the last two levels (½ and full resolution) carry two convolutions, as in the released code
            for _ in range(1 if level < n - 2 else 2):
                blocks.append(ConvBlock(c, dec[di]))
                c = dec[di]
                di += 1
            self.dec.append(nn.Sequential(*blocks))
            prev = c
        self.v0 = nn.Conv3d(prev, 3, 3, padding=1, bias=False)
        nn.init.kaiming_normal_(self.v0.weight)
        if probabilistic:
            self.logvar = nn.Conv3d(prev, 3, 3, padding=1)
            nn.init.normal_(self.v0.weight, 0.0, 1e-5)
            nn.init.normal_(self.logvar.weight, 0.0, 1e-10)
            nn.init.constant_(self.logvar.bias, -10.0)

    @property
    def size_multiple(self) -> int:
        return 2 ** len(self.enc_cfg)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor):
        m = self.size_multiple
        if any(s % m for s in fixed.shape[2:]):
            raise ValueError(f"R2NetUNet.forward() grid must be divisible by {m}, got {tuple(fixed.shape[2:])}")
        x0 = torch.cat([moving, fixed], dim=1)
        levels = [x0]
        x = x0
        for blk in self.encoder:
            x = blk(x)
            levels.append(x)
        x = self.bottom(x)
        for i, (up, dec) in enumerate(zip(self.up, self.dec)):
            x = dec(torch.cat([up(x), levels[len(self.encoder) - 1 - i]], dim=1))
        v0 = self.v0(x) / 2.0
        if self.probabilistic:
            return v0, self.logvar(x)
        return v0


class LCBlock(nn.Module):
    """One Lipschitz-continuous residual branch F(x) = scale·tanh(SN1×1(LeakyReLU(SN3×3(x)))) on a 3-channel field.

    ``checkpoint`` (default on; it only acts while autograd records, on fields of at least
    ``CHECKPOINT_MIN_VOXELS``): the branch keeps only its input for the backward pass and recomputes its three
    intermediate full-resolution fields there, instead of keeping them (≈ 48 of the ≈ 60 bytes per voxel each block
    holds; docs/r2net.md has the measured effect). Smaller fields (the 80×96×80 training crops) skip it: there the
    memory is small and the recomputation only costs time. The spectral-normalised weights are computed once,
    outside the recomputed part, so the power iteration still runs once per training forward pass and the result is
    bit-identical with checkpointing off."""

    def __init__(self, scale: float = BLOCK_SCALE, channels: int = 3):
        super().__init__()
        self.scale = float(scale)
        self.checkpoint, self.checkpoint_min_voxels = True, CHECKPOINT_MIN_VOXELS   # LCIntegrator.set_checkpoint
        self.conv3 = spectral_norm(nn.Conv3d(channels, channels, 3, padding=1, bias=False), n_power_iterations=1)
        self.conv1 = spectral_norm(nn.Conv3d(channels, channels, 1, bias=False), n_power_iterations=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w3, w1 = self.conv3.weight, self.conv1.weight          # one power iteration each (training mode)
        if self.checkpoint and torch.is_grad_enabled() and x[0, 0].numel() >= self.checkpoint_min_voxels:
            return torch.utils.checkpoint.checkpoint(_lc_branch, x, w3, w1, self.scale, use_reentrant=False)
        return _lc_branch(x, w3, w1, self.scale)


def _lc_branch(x: torch.Tensor, w3: torch.Tensor, w1: torch.Tensor, scale: float) -> torch.Tensor:
    """scale·tanh(conv1×1(LeakyReLU_0.2(conv3×3(x)))), no biases (the block's maths, weights given)."""
    return scale * torch.tanh(_conv3d_by_slabs(F.leaky_relu(_conv3d_by_slabs(x, w3, 1), 0.2), w1, 0))


# training fields from this size up are convolved slab by slab. Measured (R2Net training step, vxm U-Net, 1 thread,
# mmap malloc, docs/r2net.md): slabs of 64 planes lowered the peak at 224³ (3,901 -> 3,174 MB), left 192³ as it was
# (2,057 / 2,059) and raised it at 128³ and 160³ (675 -> 715, 1,228 -> 1,303: the per-slab copies outweigh the
# temporaries there)
SLAB_MIN_VOXELS = 200 ** 3
SLAB_PLANES = 64                          # output planes of axis 2 per slab


def _conv3d_by_slabs(x: torch.Tensor, w: torch.Tensor, pad: int) -> torch.Tensor:
    """``F.conv3d(x, w, padding=pad)`` (stride 1, no bias) of a large field, ``SLAB_PLANES`` output planes of axis 2
    at a time. Why: on the CPU a convolution of a 3-channel field goes through oneDNN, which reorders it into a
    blocked layout padded to 16 channels, so one whole-field 3×3×3 convolution held ~78 bytes per voxel around its
    12-byte output, forward and backward ~155 (measured at 160³); the LC blocks' seven of them made a training step
    of R2Net at 224³ hold more than scaling and squaring. Per slab those temporaries are a slab's (the numbers are
    conv3d's exactly, values and gradients). Only while autograd records and from ``SLAB_MIN_VOXELS`` up: inference
    (no saved tensors, the temporaries freed at once) and smaller fields (the training crops, a 2 mm brain's network
    grid) take the single call — the same numbers and speed as before."""
    if not torch.is_grad_enabled() or x[0, 0].numel() < SLAB_MIN_VOXELS:
        return F.conv3d(x, w, padding=pad)
    d = x.shape[2]
    out = x.new_empty((x.shape[0], w.shape[0]) + tuple(x.shape[2:]))  # written slab by slab (autograd: CopySlices)
    for k0 in range(0, d, SLAB_PLANES):
        k1 = min(k0 + SLAB_PLANES, d)
        lo, hi = k0 - pad, k1 + pad                                     # input planes the slab reads
        part = x[:, :, max(lo, 0):min(hi, d)]
        if lo < 0 or hi > d:                                            # the zero planes padding=pad adds on axis 2
            part = F.pad(part, (0, 0, 0, 0, max(-lo, 0), max(hi - d, 0)))
        out[:, :, k0:k1] = F.conv3d(part, w, padding=(0, pad, pad))
    return out


class LCIntegrator(nn.Module):
    """x_0 = v0, x_k = x_{k−1} + F_k(x_{k−1}), returns the displacement x_N (B, 3, D, H, W), voxel units.

    ``stationary=True`` (SVF-R2Net): one block applied ``steps`` times; False (NSVF-R2Net): ``steps`` blocks.
    Checkpointing (on by default): each block recomputes its branch in the backward pass (LCBlock); the sum
    x_{k−1} + F_k keeps nothing, so a training step holds one 3-channel field per block."""

    def __init__(self, steps: int = N_BLOCKS, stationary: bool = False, scale: float = BLOCK_SCALE):
        super().__init__()
        self.steps, self.stationary = int(steps), bool(stationary)
        self.blocks = nn.ModuleList([LCBlock(scale) for _ in range(1 if stationary else self.steps)])

    def set_checkpoint(self, on: bool, min_voxels: int | None = None) -> None:
        """Checkpoint the blocks (``on``) from fields of ``min_voxels`` up (None: keep the blocks' threshold)."""
        for b in self.blocks:
            b.checkpoint = bool(on)
            if min_voxels is not None:
                b.checkpoint_min_voxels = int(min_voxels)

    def forward(self, v0: torch.Tensor) -> torch.Tensor:
        x = v0
        for k in range(self.steps):
            x = x + self.blocks[0 if self.stationary else k](x)
        return x


BACKBONES = ("r2net", "vxm")


class R2Net(nn.Module):
    """U-Net + LC integrator. ``forward(moving, fixed)`` → (displacement, μ, logvar or None).

    ``backbone``: "r2net" (the released code's U-Net, v0 at full resolution) or "vxm" (VoxelMorph-diff's U-Net,
    μ on the ½ grid; ``enc``/``dec`` are then that network's, e.g. (32, 32, 32, 32, 16))."""

    def __init__(self, stationary: bool = False, steps: int = N_BLOCKS, scale: float = BLOCK_SCALE,
                 enc: Sequence[int] = ENC, dec: Sequence[int] = DEC, probabilistic: bool = False,
                 backbone: str = "r2net"):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"R2Net() backbone must be one of {BACKBONES}, got {backbone!r}")
        self.backbone, self.probabilistic = backbone, bool(probabilistic)
        if backbone == "vxm":
            self.unet = VxmDiffUNet(enc, dec)          # always has its log σ² head (used when probabilistic)
        else:
            self.unet = R2NetUNet(enc, dec, probabilistic=probabilistic)
        self.integrator = LCIntegrator(steps, stationary, scale)

    @property
    def size_multiple(self) -> int:
        return self.unet.size_multiple

    def posterior(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(μ, logvar) on the U-Net's velocity grid (the input grid, or its ½ grid for the "vxm" backbone), voxels
        of that grid; logvar None for the deterministic network."""
        out = self.unet(moving, fixed)
        if self.backbone == "vxm":
            mu, logvar = out
            return mu, (logvar if self.probabilistic else None)
        return (out[0], out[1]) if self.probabilistic else (out, None)

    def initial_velocity(self, moving: torch.Tensor, fixed: torch.Tensor, sample: bool = False,
                         generator: torch.Generator | None = None):
        """(v0, μ, logvar): v0 = μ + exp(logvar/2)·ε when probabilistic and ``sample``, else μ, on the input grid
        (resized from the velocity grid, in its voxels); μ and logvar on the velocity grid (``posterior``)."""
        mu, logvar = self.posterior(moving, fixed)
        v = mu
        if logvar is not None and sample:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            v = mu + torch.exp(0.5 * logvar) * eps
        if tuple(v.shape[2:]) != tuple(moving.shape[2:]):
            v = resize_disp(v, tuple(moving.shape[2:]))
        return v, mu, logvar

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, sample: bool = False):
        v0, mu, logvar = self.initial_velocity(moving, fixed, sample)
        return self.integrator(v0), mu, logvar


class R2NetCascade(StageCascade):
    """K ≥ 2 R2Nets one after the other (``StageCascade``; one stage is an R2Net itself). Run through
    methods/r2net.py (training) and nn/wrappers.Cascade (inference); ``stages[k]`` is one ``R2Net``."""

    min_stages = 2


# ------------------------------------------------------------------------------------------------------------------
# MS-R2Net

def chunk_slices(shape: Sequence[int], k: int = 2, overlap: int = 2) -> list[tuple[slice, slice, slice]]:
    """k³ sub-volumes of a (D, H, W) grid, neighbours overlapping by ``overlap`` voxels (each extends overlap/2 past
    the split plane, the spec's recommendation)."""
    per_axis = []
    for n in shape:
        edges = [round(i * n / k) for i in range(k + 1)]
        half = overlap // 2
        per_axis.append([slice(max(0, edges[i] - (half if i > 0 else 0)),
                               min(n, edges[i + 1] + (overlap - half if i < k - 1 else 0))) for i in range(k)])
    return [(a, b, c) for a in per_axis[0] for b in per_axis[1] for c in per_axis[2]]


def merge_chunks(chunks: Sequence[torch.Tensor], slices: Sequence[tuple[slice, slice, slice]],
                 shape: Sequence[int]) -> torch.Tensor:
    """Put (B, C, d, h, w) chunk fields back on the (D, H, W) grid, averaging where they overlap."""
    b, c = chunks[0].shape[:2]
    out = chunks[0].new_zeros((b, c, *shape))
    count = chunks[0].new_zeros((1, 1, *shape))
    for x, s in zip(chunks, slices):
        out[(slice(None), slice(None), *s)] += x
        count[(slice(None), slice(None), *s)] += 1
    return out / count


def _net_resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=True)


class MSR2Net(nn.Module):
    """Phase 2 of MS-R2Net over two phase-1 ``R2Net``s (``local_net`` on chunks, ``global_net`` on the ×2-down
    volume): fuse their initial velocities at full resolution and integrate with LC blocks.

    Each chunk and the downsampled volume are resampled to the nearest multiple of the U-Net's size (16) and their
    velocities resized back (vectors rescaled by the size ratio), so any grid works."""

    def __init__(self, local_net: R2Net, global_net: R2Net, stationary: bool = False, steps: int = N_BLOCKS,
                 scale: float = BLOCK_SCALE, k: int = 2, overlap: int = 2, down: int = 2):
        super().__init__()
        self.local_net, self.global_net = local_net, global_net
        self.k, self.overlap, self.down = int(k), int(overlap), int(down)
        self.fuse = nn.Conv3d(6, 3, 3, padding=1)
        nn.init.zeros_(self.fuse.weight)
        with torch.no_grad():                         # start as the mean of the two velocities
            for c in range(3):
                self.fuse.weight[c, c, 1, 1, 1] = 0.5
                self.fuse.weight[c, 3 + c, 1, 1, 1] = 0.5
        nn.init.zeros_(self.fuse.bias)
        self.integrator = LCIntegrator(steps, stationary, scale)

    def _v0_on(self, net: R2Net, moving: torch.Tensor, fixed: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Initial velocity of ``net`` for the pair, computed on a size-multiple grid, returned on ``size``."""
        m = net.size_multiple
        src = moving.shape[2:]
        grid = [max(m, int(round(n / m)) * m) for n in src]
        mv, fx = _net_resize(moving, grid), _net_resize(fixed, grid)
        v0 = net.initial_velocity(mv, fx)[0]          # μ on the resampled grid (no sampling)
        ratio = torch.tensor([(t - 1) / max(g - 1, 1) for t, g in zip(size, grid)], dtype=v0.dtype,
                             device=v0.device).view(1, 3, 1, 1, 1)
        return _net_resize(v0, size) * ratio

    def phase1_velocities(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = tuple(fixed.shape[2:])
        slices = chunk_slices(shape, self.k, self.overlap)
        chunks = [self._v0_on(self.local_net, moving[(slice(None), slice(None), *s)],
                              fixed[(slice(None), slice(None), *s)],
                              [t.stop - t.start for t in s]) for s in slices]
        v1 = merge_chunks(chunks, slices, shape)
        small = [max(1, n // self.down) for n in shape]
        v2 = self._v0_on(self.global_net, _net_resize(moving, small), _net_resize(fixed, small), shape)
        return v1, v2

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Displacement (B, 3, D, H, W) on the pair's own grid, voxel units."""
        with torch.no_grad():                         # phase-1 networks are frozen (precomputed in phase 2)
            v1, v2 = self.phase1_velocities(moving, fixed)
        return self.integrator(self.fuse(torch.cat([v1, v2], dim=1)))
