"""Image geometry and the conversions between index, voxel-displacement and physical (LPS mm) frames.

Conventions (one place, used everywhere):
- ``size_ijk``/``spacing_ijk`` are in SimpleITK order (i, j, k); numpy arrays and torch tensors are (k, j, i).
- ``direction`` is the 3×3 matrix whose column c is the LPS unit vector of index axis c (i, j, k).
- A point's LPS position is ``origin + direction @ (spacing * ijk)``.
- A voxel displacement field ``disp_vox`` has shape (3, K, J, I) (or (B, 3, K, J, I)) with channel c the
  displacement along *array* axis c, i.e. channel 0 is along k, channel 2 is along i.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    origin_lps: tuple[float, float, float]
    spacing_ijk: tuple[float, float, float]
    direction_lps: tuple[float, ...]  # 9 numbers, row-major, as SimpleITK's GetDirection()
    size_ijk: tuple[int, int, int]

    @staticmethod
    def of(image: sitk.Image) -> "Geometry":
        return Geometry(tuple(image.GetOrigin()), tuple(image.GetSpacing()), tuple(image.GetDirection()),
                        tuple(int(s) for s in image.GetSize()))

    @property
    def direction(self) -> np.ndarray:
        return np.asarray(self.direction_lps, dtype=np.float64).reshape(3, 3)

    @property
    def shape_kji(self) -> tuple[int, int, int]:
        return tuple(reversed(self.size_ijk))

    def lps_from_ijk_matrix(self) -> np.ndarray:
        """4×4 homogeneous matrix mapping (i, j, k, 1) to (x, y, z, 1) in LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing_ijk)
        m[:3, 3] = self.origin_lps
        return m

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetOrigin(self.origin_lps)
        image.SetSpacing(self.spacing_ijk)
        image.SetDirection(self.direction_lps)
        return image

    def reference_image(self, pixel=sitk.sitkFloat32) -> sitk.Image:
        return self.apply_to(sitk.Image(list(self.size_ijk), pixel))

    def physical_extent_mm(self) -> np.ndarray:
        return np.asarray(self.spacing_ijk) * (np.asarray(self.size_ijk) - 1)

    def to_dict(self) -> dict:
        return {"origin_lps": list(self.origin_lps), "spacing": list(self.spacing_ijk),
                "direction": list(self.direction_lps), "size": list(self.size_ijk)}


def lps_from_vox_disp(disp_vox: np.ndarray, geom: Geometry) -> np.ndarray:
    """Voxel displacement (3, K, J, I), channel c along array axis c → LPS mm vectors (K, J, I, 3) in x,y,z order.

    u_lps = D · diag(spacing) · (d_i, d_j, d_k).
    """
    d_ijk = np.stack([disp_vox[2], disp_vox[1], disp_vox[0]], axis=-1).astype(np.float64)
    m = geom.direction @ np.diag(geom.spacing_ijk)
    return d_ijk @ m.T


def vox_from_lps_disp(disp_lps: np.ndarray, geom: Geometry) -> np.ndarray:
    """Inverse of :func:`lps_from_vox_disp`: (K, J, I, 3) LPS mm → (3, K, J, I) voxel units along array axes."""
    m_inv = np.linalg.inv(geom.direction @ np.diag(geom.spacing_ijk))
    d_ijk = disp_lps.astype(np.float64) @ m_inv.T
    return np.stack([d_ijk[..., 2], d_ijk[..., 1], d_ijk[..., 0]], axis=0)


def displacement_image(disp_lps: np.ndarray, geom: Geometry) -> sitk.Image:
    """(K, J, I, 3) LPS mm array → float64 vector image on ``geom`` (what DisplacementFieldTransform takes)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(disp_lps, dtype=np.float64), isVector=True)
    return geom.apply_to(img)
