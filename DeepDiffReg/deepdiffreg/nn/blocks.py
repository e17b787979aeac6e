"""Small building blocks for the registration networks."""
from __future__ import annotations

from typing import Sequence

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


class StageCascade(nn.Module):
    """The weights of a recursive cascade (Zhao et al., ICCV 2019): K stage networks, ``stages[k]``, run one after
    the other by ``nn/wrappers.Cascade`` (stage k sees the moving image warped by stages 1..k−1). It holds the
    networks only (state_dict keys ``stages.k.…``); how they are run is the method's (forward, symmetric, refined).
    Each model family subclasses it (``VxmCascade``, ``R2NetCascade``): the type says which family a model is."""

    min_stages = 1

    def __init__(self, nets: Sequence[nn.Module]):
        super().__init__()
        if len(nets) < self.min_stages:
            raise ValueError(f"{type(self).__name__}() needs at least {self.min_stages} stages, got {len(nets)}")
        self.stages = nn.ModuleList(nets)

    @property
    def size_multiple(self) -> int:
        return self.stages[0].size_multiple


def stage_nets(net: nn.Module) -> list[nn.Module]:
    """The stage networks of a model: a cascade's stages in order, or the model itself."""
    return list(net.stages) if isinstance(net, StageCascade) else [net]
