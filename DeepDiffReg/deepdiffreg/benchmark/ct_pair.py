"""``ct-N`` pairs: synthetic CT-like pairs, built in the work folder (issue 19). ``ct-512`` is CT-sized, 512×512×300
voxels of 0.8×0.8×1.5 mm; ``ct-256``, ``ct-128`` (any N from 64 to 1024) are the same phantom over the **same field
of view** (409.6×409.6×450 mm) on a coarser grid: N×N×round(300·N/512) voxels of (409.6/N)² × 450/K mm (ct-128:
128×128×75 voxels of 3.2×3.2×6 mm), so a benchmark over them shows how memory grows with the image's voxels
while the working grid (2–3 mm) hardly changes.

An abdomen-like phantom in Hounsfield units — air, a body ellipse of soft tissue, two lungs, a
liver, two kidneys, a spine of bone and a lesion — with labels for Dice. The moving image is the same anatomy with
its organs moved and resized by a few millimetres and the whole body shifted and slightly rotated, so a
registration has a global and a local part to recover. Both are made k-plane by k-plane (a float32 image of
512×512×300 is 315 MB; no full-size temporaries). The phantom is a function of LPS mm about the volume's centre
(``labels_at``), so every size samples the same anatomy.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

CT_PAIR = "ct-512"
CT_SIZE_IJK = (512, 512, 300)
CT_SPACING_MM = (0.8, 0.8, 1.5)
CT_N_RANGE = (64, 1024)         # the N of ct-N

# label: (HU, centre (x, y, z) mm from the volume's centre, semi-axes mm); drawn in this order (later wins)
ORGANS = {
    1: (40.0, (0.0, 0.0, 0.0), (170.0, 120.0, 400.0)),      # body (soft tissue)
    2: (-850.0, (-75.0, -10.0, 120.0), (55.0, 65.0, 110.0)),  # right lung
    3: (-850.0, (75.0, -10.0, 120.0), (55.0, 65.0, 110.0)),   # left lung
    4: (60.0, (-60.0, -5.0, -20.0), (70.0, 55.0, 70.0)),      # liver
    5: (30.0, (-65.0, 45.0, -110.0), (25.0, 30.0, 50.0)),     # right kidney
    6: (30.0, (65.0, 45.0, -110.0), (25.0, 30.0, 50.0)),      # left kidney
    7: (700.0, (0.0, 70.0, 0.0), (18.0, 18.0, 400.0)),        # spine
    8: (90.0, (-45.0, -20.0, -30.0), (12.0, 12.0, 12.0)),     # lesion in the liver
}
# how the moving anatomy differs: per organ a shift (mm) and a scale of its semi-axes
_MOVING = {2: ((0.0, 0.0, -8.0), 1.04), 3: ((0.0, 0.0, -7.0), 1.03), 4: ((3.0, 4.0, -6.0), 0.97),
           5: ((-2.0, 0.0, 5.0), 1.0), 6: ((2.0, 3.0, 4.0), 1.05), 8: ((2.0, -2.0, 0.0), 1.3)}
_GLOBAL_SHIFT_MM = (6.0, -4.0, 10.0)
_GLOBAL_ROT_DEG = 3.0                                             # about the S-I axis


def ct_geometry(name: str) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """The grid of pair ``ct-N``: (size_ijk, spacing_mm) over ct-512's field of view. ValueError for another name."""
    head, _, tail = name.partition("-")
    if head != "ct" or not tail.isdigit() or not CT_N_RANGE[0] <= int(tail) <= CT_N_RANGE[1]:
        raise ValueError(f"not a ct-N pair name (N from {CT_N_RANGE[0]} to {CT_N_RANGE[1]}): {name!r}")
    n = int(tail)
    if n == CT_SIZE_IJK[0]:
        return CT_SIZE_IJK, CT_SPACING_MM
    nk = int(round(CT_SIZE_IJK[2] * n / CT_SIZE_IJK[0]))
    fov = [sz * sp for sz, sp in zip(CT_SIZE_IJK, CT_SPACING_MM)]
    size = (n, n, nk)
    return size, tuple(round(f / m, 6) for f, m in zip(fov, size))


def is_ct_pair(name: str) -> bool:
    try:
        ct_geometry(name)
    except ValueError:
        return False
    return True


def labels_at(x: np.ndarray, y: np.ndarray, z: np.ndarray, moving: bool = False) -> np.ndarray:
    """int16 labels of the phantom at LPS points (x, y, z mm about the volume's centre; arrays of one shape); the
    moving anatomy when ``moving``."""
    if moving:                                                     # the moving body: rotated and shifted
        c, s = np.cos(np.radians(_GLOBAL_ROT_DEG)), np.sin(np.radians(_GLOBAL_ROT_DEG))
        x, y = c * x + s * y - _GLOBAL_SHIFT_MM[0], -s * x + c * y - _GLOBAL_SHIFT_MM[1]
        z = z - _GLOBAL_SHIFT_MM[2]
    lab = np.zeros(np.shape(x), np.int16)
    for label, (_, centre, axes) in ORGANS.items():
        shift, scale = _MOVING.get(label, ((0.0, 0.0, 0.0), 1.0)) if moving else ((0.0, 0.0, 0.0), 1.0)
        cx, cy, cz = (c + d for c, d in zip(centre, shift))
        ax, ay, az = (a * scale for a in axes)
        inside = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 < 1.0
        lab[inside] = label
    return lab


def hu_of_labels(labels: np.ndarray) -> np.ndarray:
    """float32 HU of each label (air −1000 for 0), no noise."""
    hu = np.full(max(ORGANS) + 1, -1000.0, np.float32)
    for label, (value, _, _) in ORGANS.items():
        hu[label] = value
    return hu[labels]


def _labels_plane(k: int, moving: bool, size, spacing) -> np.ndarray:
    """(J, I) int16 labels of k-plane ``k`` of the grid (size, spacing) centred on the phantom."""
    ni, nj, nk = size
    hi, hj, hk = spacing
    xx, yy = np.meshgrid((np.arange(ni) - (ni - 1) / 2) * hi, (np.arange(nj) - (nj - 1) / 2) * hj)   # (J, I)
    return labels_at(xx, yy, np.full_like(xx, (k - (nk - 1) / 2) * hk), moving)


def build_ct_pair(work: Path, name: str = CT_PAIR) -> dict[str, Any]:
    """Write (once) and return the pair ``name`` (``ct-N``): fixed, moving (int16 HU), fixed_seg, moving_seg."""
    import SimpleITK as sitk
    size, spacing = ct_geometry(name)
    d = work / "pairs" / name
    d.mkdir(parents=True, exist_ok=True)
    files = {r: d / f"{r}.nii.gz" for r in ("fixed", "moving", "fixed_seg", "moving_seg")}
    what = "synthetic CT-sized pair" if name == CT_PAIR else "synthetic CT-like pair (ct-512's field of view)"
    desc = (f"{what}: {'×'.join(map(str, size))} voxels of "
            f"{'×'.join(f'{s:g}' for s in spacing)} mm, an abdomen-like phantom in HU (body, lungs, "
            f"liver, kidneys, spine, lesion; noise σ 15 HU); moving: organs moved by up to 8 mm and resized by up to "
            f"30 %, the body shifted by {_GLOBAL_SHIFT_MM} mm and rotated {_GLOBAL_ROT_DEG:g}° about S-I")
    if not all(f.exists() for f in files.values()):
        for role, moving in (("fixed", False), ("moving", True)):
            rng = np.random.default_rng(2026 + moving)
            nk = size[2]
            lab = np.empty(size[::-1], np.int16)
            img = np.empty(size[::-1], np.int16)
            for k in range(nk):
                lab[k] = _labels_plane(k, moving, size, spacing)
                plane = hu_of_labels(lab[k]) + rng.normal(0.0, 15.0, lab[k].shape).astype(np.float32)
                img[k] = np.clip(plane, -1024, 3071).astype(np.int16)
            for arr, key in ((img, role), (lab, f"{role}_seg")):
                out = sitk.GetImageFromArray(arr)
                out.SetSpacing(spacing)
                out.SetOrigin(tuple(-(n - 1) / 2 * s for n, s in zip(size, spacing)))
                sitk.WriteImage(out, str(files[key]), useCompression=True)
            del lab, img
        (d / "pair.json").write_text(json.dumps({"description": desc}, indent=1))
    return {"name": name, "kind": "ct", "description": desc, **{k: str(v) for k, v in files.items()}}
