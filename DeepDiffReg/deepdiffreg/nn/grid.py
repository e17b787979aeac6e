"""The network grid of a learned method: the pair in the array orientation the network was trained in (LPS-aligned
array axes), resampled to sizes its architecture accepts, and the way back for fields and scalar maps.

Learned methods are trained on LPS-aligned arrays (train/real_data.py: canonical array axis 0 = S, 1 = P, 2 = L);
the pipeline's working grid keeps the fixed image's direction. ``NetGrid`` permutes/flips the working arrays to the
nearest LPS order and resamples them (same box, align_corners) to the nearest sizes that are multiples of the
network's size multiple (81×97×113 → 80×96×112: cheaper than zero padding and no padded border the network never
saw). A displacement sampled on the canonical working shape is mapped back by ``disp_to_work`` (components
permuted and negated with the axes); a scalar map by ``scalar_to_work``.

This module only moves arrays between frames; what runs on the network grid is nn/wrappers.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..field import resize_image
from ..frames import Geometry


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


def from_canonical(x: torch.Tensor, src: list[int], flip: list[bool]) -> torch.Tensor:
    """Inverse of ``to_canonical`` for a scalar/multi-channel image (channels untouched)."""
    dims = [2 + a for a in range(3) if flip[a]]
    if dims:
        x = x.flip(dims)
    inv = [src.index(w) for w in range(3)]
    return x.permute(0, 1, 2 + inv[0], 2 + inv[1], 2 + inv[2])


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


@dataclass(frozen=True)
class NetGrid:
    """How one working grid maps to a network grid. ``shape``: the working shape in canonical array order;
    ``net_shape``: the network grid (same box, sizes multiples of the network's); ``spacing``: (3,) working
    spacing in mm along each canonical array axis."""
    src: list[int]
    flip: list[bool]
    shape: tuple[int, int, int]
    net_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @classmethod
    def for_working_grid(cls, geometry: Geometry, shape_dhw, multiple: int) -> "NetGrid":
        src, flip = canonical_axes(np.asarray(geometry.direction, float))
        sp = geometry.spacing_ijk[::-1]                                   # per working array axis (k, j, i)
        shape = tuple(int(shape_dhw[src[a]]) for a in range(3))
        return cls(src, flip, shape, net_grid_shape(shape, multiple), tuple(float(sp[src[a]]) for a in range(3)))

    def image_to_net(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *working shape) → (B, C, *net_shape), canonical axes, resampled (trilinear, same box)."""
        return resize_image(to_canonical(x, self.src, self.flip), self.net_shape)

    def disp_to_work(self, u: torch.Tensor) -> torch.Tensor:
        """(B, 3, *shape) canonical displacement (working-grid voxels) → working array order and components."""
        return disp_from_canonical(u, self.src, self.flip)

    def scalar_to_work(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *any grid of the same box) canonical scalar map → resized (trilinear) to the working grid."""
        return from_canonical(resize_image(x, self.shape), self.src, self.flip)

    def mm_per_voxel(self, grid_shape, dtype=torch.float32, device=None) -> torch.Tensor:
        """(3,) mm per voxel of a grid of ``grid_shape`` spanning the same box, along each canonical axis:
        working spacing × (n_work − 1)/(n_grid − 1)."""
        sp = torch.tensor(self.spacing, dtype=dtype, device=device)
        return torch.stack([sp[a] * (self.shape[a] - 1) / max(grid_shape[a] - 1, 1) for a in range(3)])
