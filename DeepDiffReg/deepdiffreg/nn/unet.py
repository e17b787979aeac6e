"""The VoxelMorph-diff U-Net (legacy ``unet_core(full_size=False)`` + ``miccai2018_net`` heads).

Input: cat(moving, fixed) (B, 2, D, H, W) with D, H, W divisible by 2**len(enc). Output: the mean μ and the
log-variance of a Gaussian over a stationary velocity field on the ½-resolution grid, (B, 3, D/2, H/2, W/2)
each, voxel units of the ½-resolution grid, channel c along array axis c.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ConvBlock

DEFAULT_ENC = (16, 32, 32, 32)
DEFAULT_DEC = (32, 32, 32, 32, 16)


class VxmDiffUNet(nn.Module):
    """Encoder of stride-2 blocks, decoder upsampling back to ½ resolution only, then μ and log-variance heads.

    enc: channels of the stride-2 encoder blocks (len = number of downsamplings, the size multiple is 2**len).
    dec: channels of the decoder: dec[0] at the coarsest level, dec[1..len(enc)-1] after each upsample+skip,
    dec[len(enc):] extra blocks at ½ resolution.
    """

    def __init__(self, enc: Sequence[int] = DEFAULT_ENC, dec: Sequence[int] = DEFAULT_DEC, in_ch: int = 2):
        super().__init__()
        if len(dec) < len(enc):
            raise ValueError(f"VxmDiffUNet() 'dec' needs at least {len(enc)} entries, got {len(dec)}")
        self.enc_cfg, self.dec_cfg = tuple(enc), tuple(dec)
        self.encoder = nn.ModuleList()
        prev = in_ch
        for ch in enc:
            self.encoder.append(ConvBlock(prev, ch, stride=2))
            prev = ch
        n = len(enc)
        self.decoder = nn.ModuleList([ConvBlock(prev, dec[0])])
        prev = dec[0]
        for i in range(1, n):                      # upsample ×2 then concat encoder level n-1-i
            skip = enc[n - 1 - i]
            self.decoder.append(ConvBlock(prev + skip, dec[i]))
            prev = dec[i]
        self.extra = nn.ModuleList()
        for ch in dec[n:]:
            self.extra.append(ConvBlock(prev, ch))
            prev = ch
        self.mu = nn.Conv3d(prev, 3, 3, padding=1)
        self.logvar = nn.Conv3d(prev, 3, 3, padding=1)
        nn.init.normal_(self.mu.weight, 0.0, 1e-5)
        nn.init.zeros_(self.mu.bias)
        nn.init.normal_(self.logvar.weight, 0.0, 1e-10)
        nn.init.constant_(self.logvar.bias, -10.0)   # "initialize the velocity variance very low, to start stable"

    @property
    def size_multiple(self) -> int:
        return 2 ** len(self.enc_cfg)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """moving, fixed: (B, 1, D, H, W) float in [0, 1] → (mu, logvar), each (B, 3, D/2, H/2, W/2)."""
        m = self.size_multiple
        if any(s % m for s in fixed.shape[2:]):
            raise ValueError(f"VxmDiffUNet.forward() grid must be divisible by {m}, got {tuple(fixed.shape[2:])}")
        x = torch.cat([moving, fixed], dim=1)
        skips = []
        for blk in self.encoder:
            x = blk(x)
            skips.append(x)
        x = self.decoder[0](x)
        n = len(self.encoder)
        for i in range(1, n):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = self.decoder[i](torch.cat([x, skips[n - 1 - i]], dim=1))
        for blk in self.extra:
            x = blk(x)
        return self.mu(x), self.logvar(x)
