"""Small synthetic volumes for engine tests: oblique anisotropic grids, blob label maps, known smooth fields."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import SimpleITK as sitk


def rotation(deg_z: float = 20.0, deg_x: float = 10.0) -> np.ndarray:
    cz, sz = np.cos(np.radians(deg_z)), np.sin(np.radians(deg_z))
    cx, sx = np.cos(np.radians(deg_x)), np.sin(np.radians(deg_x))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1.0]])
    rx = np.array([[1.0, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ rx


def blank(size=(30, 28, 24), spacing=(1.2, 1.0, 1.5), origin=(-20.0, -15.0, -10.0), direction=None,
          pixel=sitk.sitkFloat32) -> sitk.Image:
    img = sitk.Image([int(s) for s in size], pixel)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection((rotation() if direction is None else np.asarray(direction)).ravel().tolist())
    return img


def points_lps(img: sitk.Image) -> np.ndarray:
    """(K, J, I, 3) LPS coordinates of every voxel centre."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in img.GetSize()[::-1]], indexing="ij")
    ijk = np.stack([i, j, k], -1).astype(float)
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    return ijk * np.asarray(img.GetSpacing()) @ d.T + np.asarray(img.GetOrigin())


def from_array(arr: np.ndarray, like: sitk.Image, vector: bool = False) -> sitk.Image:
    out = sitk.GetImageFromArray(arr, isVector=vector)
    out.CopyInformation(like)
    return out


def phantom_labels(p: np.ndarray, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A head-like label map in LPS mm: ellipsoid 'brain' (1) holding two 'ventricles' (2, 3) and a blob (4)."""
    x, y, z = (p[..., a] - centre[a] for a in range(3))
    lab = np.zeros(p.shape[:3], np.int32)
    lab[(x / 20) ** 2 + (y / 24) ** 2 + (z / 18) ** 2 < 1] = 1
    lab[((x - 6) / 5) ** 2 + (y / 10) ** 2 + (z / 6) ** 2 < 1] = 2
    lab[((x + 6) / 5) ** 2 + (y / 10) ** 2 + (z / 6) ** 2 < 1] = 3
    lab[((x) / 6) ** 2 + ((y - 14) / 5) ** 2 + ((z + 6) / 5) ** 2 < 1] = 4
    return lab


def image_from_labels(lab: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = {0: 5.0, 1: 80.0, 2: 20.0, 3: 30.0, 4: 140.0}
    img = np.vectorize(means.get)(lab).astype(np.float32)
    return img + rng.normal(0, 2.0, img.shape).astype(np.float32)


def phantom(p: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image, labels) of the phantom at source coordinates ``p``: label intensities plus a smooth texture that
    moves with the anatomy (so every region carries a registration signal), plus noise."""
    lab = phantom_labels(p)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    texture = 12.0 * np.sin(x / 3.0) * np.sin(y / 3.5) * np.cos(z / 4.0) * (lab > 0)
    return image_from_labels(lab, seed) + texture.astype(np.float32), lab


def smooth_field_lps(p: np.ndarray, amplitude: float = 3.0) -> np.ndarray:
    """A smooth, asymmetric displacement (K, J, I, 3) in LPS mm; every component differs, so permutations show."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    u = np.stack([amplitude * np.sin(y / 9.0) * np.cos(z / 11.0),
                  0.6 * amplitude * np.cos(x / 10.0),
                  0.8 * amplitude * np.sin((x + y) / 13.0)], -1)
    return u


def run_cli(*args, timeout=300, env=None):
    """Run the installed console script (falls back to ``python -m deepdiffreg``)."""
    exe = os.path.join(os.path.dirname(sys.executable), "deepdiffreg")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "deepdiffreg"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, encoding="utf-8", timeout=timeout,
                          env={**os.environ, **(env or {})})
