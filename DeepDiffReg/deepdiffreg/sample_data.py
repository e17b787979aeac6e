"""A synthetic head phantom pair for the demo and smoke tests (no downloads, no ../shared).

The phantom is built in LPS mm from analytic shapes: scalp, skull, CSF, a folded cortical ribbon (gyri as a
radial modulation of the brain surface), white matter, two lateral ventricles and four deep nuclei, with
T1-like intensities, a smooth texture and noise. The moving subject is the same anatomy seen through a rotation,
a scaling, a shift and a smooth non-linear deformation, so both linear and deformable stages have work to do.
"""
from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk

LABELS = {1: "cortex", 2: "white matter", 3: "left ventricle", 4: "right ventricle", 5: "left caudate",
          6: "right caudate", 7: "left thalamus", 8: "right thalamus", 9: "CSF", 10: "skull", 11: "scalp"}
_T1 = {0: 0.0, 1: 75.0, 2: 110.0, 3: 25.0, 4: 25.0, 5: 85.0, 6: 85.0, 7: 95.0, 8: 95.0, 9: 30.0, 10: 15.0, 11: 95.0}


def _ellipsoid(x, y, z, c, r):
    return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2


def phantom_at(p: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Image and labels of the phantom at LPS points p (..., 3)."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    radial = np.sqrt(_ellipsoid(x, y, z, (0, 0, 0), (62, 78, 58)))
    theta, phi = np.arctan2(y, x), np.arctan2(z, np.hypot(x, y))
    gyri = 0.035 * np.sin(9 * theta) * np.cos(7 * phi) + 0.02 * np.sin(13 * phi + 2 * theta)
    lab = np.zeros(p.shape[:-1], np.int16)
    lab[radial < 1.22] = 11
    lab[radial < 1.14] = 10
    lab[radial < 1.07] = 9
    lab[radial < 1.0 + gyri] = 1
    lab[radial < 0.86 + 0.6 * gyri] = 2
    for label, c, r in ((3, (-9, -8, 8), (5, 22, 9)), (4, (9, -8, 8), (5, 22, 9)),
                        (5, (-14, 8, 6), (5, 8, 7)), (6, (14, 8, 6), (5, 8, 7)),
                        (7, (-10, -16, -2), (8, 9, 7)), (8, (10, -16, -2), (8, 9, 7))):
        lab[_ellipsoid(x, y, z, c, r) < 1] = label
    img = np.vectorize(_T1.get, otypes=[np.float32])(lab)
    texture = 6.0 * np.sin(x / 4.0) * np.sin(y / 5.0) * np.cos(z / 4.5) * ((lab > 0) & (lab < 9))
    img = img + texture + rng.normal(0, 2.0, img.shape).astype(np.float32)
    return img.astype(np.float32), lab


def _grid(size, spacing, origin, direction=np.eye(3)) -> tuple[sitk.Image, np.ndarray]:
    ref = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    ref.SetSpacing(spacing)
    ref.SetOrigin(origin)
    ref.SetDirection(np.asarray(direction, float).ravel().tolist())
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    pts = np.stack([i, j, k], -1) * np.asarray(spacing) @ np.asarray(direction, float).T + np.asarray(origin)
    return ref, pts


def make_pair(out_dir: str, spacing_mm: float = 1.5, seed: int = 0) -> dict[str, str]:
    """Write fixed.nii.gz, moving.nii.gz and their label maps (fixed_seg / moving_seg) into ``out_dir``."""
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    extent = np.array([180.0, 210.0, 170.0])
    size = tuple(int(round(e / spacing_mm)) for e in extent)
    fixed_ref, p_f = _grid(size, (spacing_mm,) * 3, tuple(-extent / 2))
    img_f, lab_f = phantom_at(p_f, rng)
    # The moving scan: its own grid (slightly tilted, other origin); its anatomy at point y is the phantom at
    # S·R·(y − t) + w(y): a similarity transform and a smooth deformation of ~4 mm.
    a = np.radians(6.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    tilt = np.array([[1, 0, 0], [0, np.cos(0.05), -np.sin(0.05)], [0, np.sin(0.05), np.cos(0.05)]])
    moving_ref, p_m = _grid(size, (spacing_mm,) * 3, tuple(-extent / 2 + [4.0, -6.0, 3.0]), tilt)
    q = (p_m - [5.0, -4.0, 2.0]) @ (0.94 * rot).T
    x, y, z = q[..., 0], q[..., 1], q[..., 2]
    w = np.stack([4.0 * np.sin(y / 17.0) * np.cos(z / 23.0), 3.5 * np.cos(x / 19.0) * np.sin(z / 29.0),
                  3.0 * np.sin((x + y) / 25.0)], -1)
    img_m, lab_m = phantom_at(q + w, rng)
    paths = {}
    for name, arr, ref in (("fixed", img_f, fixed_ref), ("moving", img_m, moving_ref),
                           ("fixed_seg", lab_f, fixed_ref), ("moving_seg", lab_m, moving_ref)):
        im = sitk.GetImageFromArray(arr)
        im.CopyInformation(ref)
        paths[name] = os.path.join(out_dir, f"{name}.nii.gz")
        sitk.WriteImage(im, paths[name], useCompression=True)
    return paths
