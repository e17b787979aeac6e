"""An image sampled at continuous voxel indices with ITK's resampling rules, in torch on the CPU.

What ``sitk.Resample`` / ``sitk.Warp`` give for a point whose continuous index in the image is p = (i, j, k):

- outside the buffer — any axis with p < −0.5 or p ≥ n − 0.5 (ITK's ``IsInsideBuffer``: half a voxel beyond the
  first and the last voxel centre) — the default value, 0;
- linear: trilinear interpolation of the voxel values with the index clamped to [0, n − 1] (in the half-voxel
  margin the edge value is read, as ITK's ``LinearInterpolateImageFunction`` does), computed in float32 (ITK
  interpolates in double: the numbers differ by float32 rounding, ~1e-6 relative);
- nearest neighbour: the voxel at floor(p + 0.5) (ITK's ``RoundHalfIntegerUp``), the image's own values and type.

``compose.SlabWarp`` uses it for the warped images: ITK's WarpImageFilter took 0.7 s of one core for a 1 mm brain
and its segmentation, plus the displacement images it reads; this takes ~0.3 s from the float32 positions
(docs/speed-1mm.md). Positions in float32 move a sample by ~1e-5 voxel at most: linear values change by that times
the local gradient, and a nearest-neighbour label can differ only where p lies within ~1e-5 of a half-integer
(a tie between two voxels).
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .frames import Geometry

LINEAR, NEAREST = sitk.sitkLinear, sitk.sitkNearestNeighbor


class ItkSampler:
    """One image (``sitk.Image``, scalar) and its interpolator, sampled at continuous indices of its own grid.

    ``sample(p)``: p a (..., 3) float32 tensor of continuous indices (i, j, k) → (...) numpy array: float32 for
    linear, the image's pixel type for nearest neighbour. ``ijk_from_lps`` (4×4, float64): the image's LPS → index
    map, for the caller that makes p from physical points."""

    def __init__(self, image: sitk.Image, interpolator: int):
        if interpolator not in (LINEAR, NEAREST):
            raise ValueError("ItkSampler: linear or nearest-neighbour interpolation only")
        if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
            raise ValueError("ItkSampler: a scalar 3-D image")
        self.interpolator = interpolator
        geom = Geometry.of(image)
        self.ijk_from_lps = np.linalg.inv(geom.lps_from_ijk_matrix())
        self.size_ijk = geom.size_ijk
        arr = sitk.GetArrayViewFromImage(image)                    # (K, J, I)
        if interpolator == LINEAR:
            # float32 for every type: ITK casts its double result to the float32 output anyway
            self.values = torch.from_numpy(np.array(arr, dtype=np.float32))[None, None]   # own copy
            # align_corners=True: normalised −1 … 1 spans the first to the last voxel centre (a 1-voxel axis: 0)
            self._scale = torch.tensor([2.0 / (n - 1) if n > 1 else 0.0 for n in self.size_ijk], dtype=torch.float32)
        else:
            # any pixel type, gathered as it is; one 0 appended, which every outside sample reads
            self.values = np.concatenate([np.ravel(arr), np.zeros(1, arr.dtype)])
            self._last = torch.tensor([n - 1 for n in self.size_ijk], dtype=torch.float32)
        self._hi = torch.tensor([n - 0.5 for n in self.size_ijk], dtype=torch.float32)

    def inside(self, p: torch.Tensor) -> torch.Tensor:
        """(...) bool: ITK's IsInsideBuffer, −0.5 ≤ p < n − 0.5 on every axis (axis by axis: 3x faster than
        comparing the (..., 3) array and reducing it)."""
        out = p[..., 0] >= -0.5
        for a in range(3):
            if a:
                out &= p[..., a] >= -0.5
            out &= p[..., a] < float(self._hi[a])
        return out

    def sample(self, p: torch.Tensor, inside: torch.Tensor | None = None) -> np.ndarray:
        """``inside``: ``self.inside(p)`` when the caller has it (images on one grid share it)."""
        shape = p.shape[:-1]
        inside = self.inside(p) if inside is None else inside
        if self.interpolator == LINEAR:
            grid = (p * self._scale - 1.0).reshape(1, 1, 1, -1, 3)          # (x, y, z) = (i, j, k), normalised
            out = F.grid_sample(self.values, grid, mode="bilinear", padding_mode="border",
                                align_corners=True).reshape(shape)
            out.masked_fill_(~inside, 0.0)
            return out.numpy()
        n_i, n_j, _ = self.size_ijk
        # round half up, clamped in float32 (exact for indices < 2^24), then the flat index in int64
        nearest = torch.minimum(torch.floor(p + 0.5).clamp_(min=0.0), self._last).to(torch.int64)
        flat = (nearest[..., 2] * n_j + nearest[..., 1]) * n_i + nearest[..., 0]
        flat.masked_fill_(~inside, len(self.values) - 1)                 # outside: the appended 0
        return np.take(self.values, flat.numpy().reshape(-1)).reshape(tuple(shape))
