"""Small building blocks for the registration U-Nets."""
from __future__ import annotations

import torch
from torch import nn


class ConvBlock(nn.Module):
    """Conv3d(k=3, 'same' padding, stride s) + LeakyReLU(0.2): VoxelMorph's ``conv_block``.

    x: (B, in_ch, D, H, W) → (B, out_ch, ceil(D/s), ceil(H/s), ceil(W/s)).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1)
        self.act = nn.LeakyReLU(0.2)
        nn.init.kaiming_normal_(self.conv.weight, a=0.2)   # he_normal as in the reference code
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))
