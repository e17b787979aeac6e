"""``ct-512``: a synthetic CT-sized pair, 512×512×300 voxels of 0.8×0.8×1.5 mm (issue 19), built in the work folder.

An abdomen-like phantom in Hounsfield units — air, a body ellipse of soft tissue, two lungs, a
liver, two kidneys, a spine of bone and a lesion — with labels for Dice. The moving image is the same anatomy with
its organs moved and resized by a few millimetres and the whole body shifted and slightly rotated, so a
registration has a global and a local part to recover. Both are made k-plane by k-plane (a float32 image of this
size is 315 MB; no full-size temporaries).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

CT_PAIR = "ct-512"
CT_SIZE_IJK = (512, 512, 300)
CT_SPACING_MM = (0.8, 0.8, 1.5)

# label: (HU, centre (x, y, z) mm from the volume's centre, semi-axes mm); drawn in this order (later wins)
_ORGANS = {
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


def _labels_plane(k: int, moving: bool) -> np.ndarray:
    """(J, I) int16 labels of k-plane ``k`` (LPS mm about the volume's centre)."""
    ni, nj, nk = CT_SIZE_IJK
    hi, hj, hk = CT_SPACING_MM
    x = (np.arange(ni) - (ni - 1) / 2) * hi
    y = (np.arange(nj) - (nj - 1) / 2) * hj
    z = (k - (nk - 1) / 2) * hk
    xx, yy = np.meshgrid(x, y)                                     # (J, I)
    if moving:                                                     # the moving body: rotated and shifted
        c, s = np.cos(np.radians(_GLOBAL_ROT_DEG)), np.sin(np.radians(_GLOBAL_ROT_DEG))
        xx, yy = c * xx + s * yy - _GLOBAL_SHIFT_MM[0], -s * xx + c * yy - _GLOBAL_SHIFT_MM[1]
        z = z - _GLOBAL_SHIFT_MM[2]
    lab = np.zeros(xx.shape, np.int16)
    for label, (_, centre, axes) in _ORGANS.items():
        shift, scale = _MOVING.get(label, ((0.0, 0.0, 0.0), 1.0)) if moving else ((0.0, 0.0, 0.0), 1.0)
        cx, cy, cz = (c + d for c, d in zip(centre, shift))
        ax, ay, az = (a * scale for a in axes)
        inside = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 + ((z - cz) / az) ** 2 < 1.0
        lab[inside] = label
    return lab


def build_ct_pair(work: Path) -> dict[str, Any]:
    """Write (once) and return the ``ct-512`` pair: fixed, moving (int16 HU), fixed_seg, moving_seg."""
    import SimpleITK as sitk
    d = work / "pairs" / CT_PAIR
    d.mkdir(parents=True, exist_ok=True)
    files = {r: d / f"{r}.nii.gz" for r in ("fixed", "moving", "fixed_seg", "moving_seg")}
    desc = (f"synthetic CT-sized pair: {'×'.join(map(str, CT_SIZE_IJK))} voxels of "
            f"{'×'.join(f'{s:g}' for s in CT_SPACING_MM)} mm, an abdomen-like phantom in HU (body, lungs, "
            f"liver, kidneys, spine, lesion; noise σ 15 HU); moving: organs moved by up to 8 mm and resized by up to "
            f"30 %, the body shifted by {_GLOBAL_SHIFT_MM} mm and rotated {_GLOBAL_ROT_DEG:g}° about S-I")
    if not all(f.exists() for f in files.values()):
        hu = np.full(max(_ORGANS) + 1, -1000.0, np.float32)
        for label, (value, _, _) in _ORGANS.items():
            hu[label] = value
        for role, moving in (("fixed", False), ("moving", True)):
            rng = np.random.default_rng(2026 + moving)
            nk = CT_SIZE_IJK[2]
            lab = np.empty(CT_SIZE_IJK[::-1], np.int16)
            img = np.empty(CT_SIZE_IJK[::-1], np.int16)
            for k in range(nk):
                lab[k] = _labels_plane(k, moving)
                plane = hu[lab[k]] + rng.normal(0.0, 15.0, lab[k].shape).astype(np.float32)
                img[k] = np.clip(plane, -1024, 3071).astype(np.int16)
            for arr, key in ((img, role), (lab, f"{role}_seg")):
                out = sitk.GetImageFromArray(arr)
                out.SetSpacing(CT_SPACING_MM)
                out.SetOrigin(tuple(-(n - 1) / 2 * s for n, s in zip(CT_SIZE_IJK, CT_SPACING_MM)))
                sitk.WriteImage(out, str(files[key]), useCompression=True)
            del lab, img
        (d / "pair.json").write_text(json.dumps({"description": desc}, indent=1))
    return {"name": CT_PAIR, "kind": "ct", "description": desc, **{k: str(v) for k, v in files.items()}}
