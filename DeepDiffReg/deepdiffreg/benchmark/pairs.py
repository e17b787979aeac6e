"""The benchmark pairs, built in a work folder (never in the repository).

- ``ixi-1``, ``ixi-2``: two real IXI T1s each (held-out validation subjects of ``train.real_data.split_ixi``) with
  their DLMUSE parcellations; 2 mm, whole head, not pre-aligned;
- ``synth-A-B`` (``synth-15-16``): T1-like images synthesised from the SynthSeg label maps A (fixed) and B (moving),
  labels ≥ 100 dropped, skull-stripped (background 0), both cropped to one common 1 mm box;
- ``known-N`` (``known-15``): the synthesised image of label map N and the same image deformed by a known smooth
  diffeomorphism (the true map is stored, so the displacement error is known voxel by voxel);
- ``brats-002``: BraTSReg_002 T1, follow-up (fixed) → pre-operative (moving), 6 landmarks → TRE;
- ``ct-512``: a synthetic CT-sized pair, 512×512×300 voxels of 0.8×0.8×1.5 mm (``ct_pair.py``), generated;
- ``quick-phantom`` (``--quick``): a tiny generated phantom pair (labels + landmarks), no ../shared needed (tests).

A pair is a dict: name, kind, description and the paths fixed, moving and, when it has them, fixed_seg,
moving_seg, fixed_landmarks, moving_landmarks, true_transform.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInput
from .ct_pair import CT_PAIR, build_ct_pair

ALL_PAIRS = ("ixi-1", "ixi-2", "synth-15-16", "brats-002", "known-15")
QUICK_PAIR = "quick-phantom"
KNOWN_MAX_MM = 8.0            # peak displacement of the known deformation of the known-N pairs
PAIR_FILES = ("fixed", "moving", "fixed_seg", "moving_seg", "fixed_landmarks", "moving_landmarks")
# data sub-folder each kind of pair needs
DATA_FOLDERS = {"ixi-": "ixi", "synth-": "labelmaps", "known-": "labelmaps", "brats-": "brats-reg"}


def _write(img, path: Path) -> str:
    import SimpleITK as sitk
    sitk.WriteImage(img, str(path), useCompression=True)
    return str(path)


def _quick_pair(work: Path) -> dict[str, Any]:
    """A tiny phantom (40×44×36 at 1.5 mm): a head-like label map, moving = fixed pushed by a known smooth field
    plus a 2 mm shift; T1-like intensities with noise; 5 corresponding landmarks."""
    import SimpleITK as sitk
    d = work / "pairs" / "quick-phantom"
    d.mkdir(parents=True, exist_ok=True)
    size, spacing, origin = (40, 44, 36), 1.5, np.array([-30.0, -33.0, -27.0])
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    pts = np.stack([i, j, k], -1) * spacing + origin

    def field(p):
        x, y, z = p[..., 0], p[..., 1], p[..., 2]
        return np.stack([3.0 * np.sin(y / 9.0) * np.cos(z / 11.0) + 2.0, 2.0 * np.cos(x / 10.0),
                         2.4 * np.sin((x + y) / 13.0)], -1)

    def labels(p):
        x, y, z = p[..., 0], p[..., 1], p[..., 2]
        lab = np.zeros(p.shape[:3], np.int16)
        lab[(x / 21) ** 2 + (y / 25) ** 2 + (z / 19) ** 2 < 1] = 1
        lab[(x / 16) ** 2 + (y / 20) ** 2 + (z / 14) ** 2 < 1] = 2
        lab[((x - 6) / 4) ** 2 + (y / 10) ** 2 + (z / 5) ** 2 < 1] = 3
        lab[((x + 6) / 4) ** 2 + (y / 10) ** 2 + (z / 5) ** 2 < 1] = 4
        lab[(x / 5) ** 2 + ((y - 13) / 5) ** 2 + ((z + 5) / 5) ** 2 < 1] = 5
        return lab

    lab_f = labels(pts)
    lab_m = labels(pts - field(pts))          # moving(y) holds fixed content at ≈ y − u(y)
    means = np.array([0.0, 70.0, 110.0, 25.0, 30.0, 90.0], np.float32)
    out: dict[str, Any] = {"name": "quick-phantom", "kind": "quick",
                           "description": "generated phantom, 40×44×36 at 1.5 mm, known smooth field + 2 mm shift"}
    for role, lab, seed in (("fixed", lab_f, 1), ("moving", lab_m, 2)):
        rng = np.random.default_rng(seed)
        img = means[lab] + rng.normal(0, 3.0, lab.shape).astype(np.float32)
        img[lab == 0] = 0.0
        for arr, key in ((img.astype(np.float32), role), (lab, f"{role}_seg")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing([spacing] * 3)
            im.SetOrigin(origin.tolist())
            out[key] = _write(im, d / f"{key}.nii.gz")
    p_f = np.array([[0.0, 0, 0], [6, 0, 0], [-6, 0, 0], [0, 13, -5], [8, -10, 4]])
    p_m = p_f + field(p_f[:, None, None, :])[:, 0, 0, :]
    for role, p in (("fixed_landmarks", p_f), ("moving_landmarks", p_m)):
        path = d / f"{role}.csv"
        path.write_text("Landmark,X,Y,Z\n" + "".join(f"{n + 1},{x:.4f},{y:.4f},{z:.4f}\n" for n, (x, y, z) in enumerate(p)))
        out[role] = str(path)
    return out


def _ixi_pairs(data: Path) -> dict[str, dict[str, Any]]:
    from ..train.real_data import split_ixi
    _, val = split_ixi(data / "ixi")
    if len(val) < 4:
        raise BadInput(f"{data / 'ixi'} has too few subjects for two held-out pairs ({len(val)} validation subjects)")
    out = {}
    for n, (a, b) in enumerate(((val[0], val[1]), (val[2], val[3])), start=1):
        t1 = lambda s: str(data / "ixi" / "t1" / f"{s}_T1.nii.gz")  # noqa: E731
        seg = lambda s: str(data / "ixi" / "seg" / f"{s}_T1_DLMUSE.nii.gz")  # noqa: E731
        out[f"ixi-{n}"] = {"name": f"ixi-{n}", "kind": "ixi",
                           "description": f"IXI {a} (fixed) ← {b} (moving), T1 2 mm whole head, DLMUSE labels; "
                                          f"held-out validation subjects, not pre-aligned",
                           "fixed": t1(a), "moving": t1(b), "fixed_seg": seg(a), "moving_seg": seg(b)}
    return out


# T1-like mean intensities of FreeSurfer/SynthSeg labels (others get a seeded value in [40, 110]).
_T1_MEANS = {2: 110, 41: 110, 7: 105, 46: 105, 16: 100, 28: 95, 60: 95, 85: 100, 77: 95,
             3: 70, 42: 70, 8: 72, 47: 72, 17: 68, 53: 68, 18: 70, 54: 70, 10: 88, 49: 88, 11: 80, 50: 80,
             12: 84, 51: 84, 13: 92, 52: 92, 26: 78, 58: 78, 30: 60, 62: 60,
             4: 22, 43: 22, 5: 22, 44: 22, 14: 22, 15: 22, 24: 18, 72: 22}


def _synth_pair(data: Path, work: Path, fixed_n: int = 15, moving_n: int = 16) -> dict[str, Any]:
    import SimpleITK as sitk
    d = work / "pairs" / f"synth-{fixed_n}-{moving_n}"
    d.mkdir(parents=True, exist_ok=True)
    names = {"fixed": fixed_n, "moving": moving_n}
    out: dict[str, Any] = {"name": f"synth-{fixed_n}-{moving_n}", "kind": "synth"}
    files = {r: d / f"{r}.nii.gz" for r in ("fixed", "moving", "fixed_seg", "moving_seg")}
    if all(f.exists() for f in files.values()):
        out.update({k: str(v) for k, v in files.items()})
        out["description"] = json.loads((d / "pair.json").read_text())["description"]
        return out
    labs = {}
    for role, n in names.items():
        p = data / "labelmaps" / f"training_seg_{n:02d}.nii.gz"
        if not p.exists():
            raise BadInput(f"label map not found: {p}")
        lab = sitk.DICOMOrient(sitk.Cast(sitk.ReadImage(str(p)), sitk.sitkInt16), "LPS")
        arr = sitk.GetArrayFromImage(lab)
        arr[arr >= 100] = 0
        lab2 = sitk.GetImageFromArray(arr)
        lab2.CopyInformation(lab)
        labs[role] = lab2
    # one common box around the union of both brains' bounding boxes (LPS mm), 160 × 224 × 192 (x, y, z)
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    for lab in labs.values():
        idx = np.argwhere(sitk.GetArrayFromImage(lab) > 0)[:, ::-1]   # (i, j, k)
        for corner in (idx.min(0), idx.max(0)):
            pt = np.asarray(lab.TransformContinuousIndexToPhysicalPoint(corner.astype(float).tolist()))
            lo, hi = np.minimum(lo, pt), np.maximum(hi, pt)
    size = np.array([160, 224, 192])     # L-R, A-P, S-I: about 160 × 192 × 224 voxels at 1 mm
    ref = sitk.Image(size.tolist(), sitk.sitkInt16)
    ref.SetSpacing([1.0, 1.0, 1.0])
    origin = (lo + hi) / 2 - (size - 1) / 2.0
    origin[2] = hi[2] + 2.0 - (size[2] - 1)          # S-I: keep the top of the brain, cut the lower brainstem
    lattice = np.asarray(labs["fixed"].GetOrigin())  # on the fixed label map's voxel lattice (exact for it)
    ref.SetOrigin((lattice + np.round(origin - lattice)).tolist())
    rng = np.random.default_rng(1516)
    all_labels = sorted(set().union(*[np.unique(sitk.GetArrayFromImage(l)).tolist() for l in labs.values()]) - {0})
    means = {lab: float(_T1_MEANS.get(lab, rng.uniform(40, 110))) for lab in all_labels}
    lut = np.zeros(max(all_labels) + 1, np.float32)
    for lab, m in means.items():
        lut[lab] = m
    for seed, (role, lab) in enumerate(labs.items()):
        boxed = sitk.Resample(lab, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
        arr = sitk.GetArrayFromImage(boxed)
        img = sitk.GetImageFromArray(lut[arr])
        img.CopyInformation(boxed)
        img = sitk.SmoothingRecursiveGaussian(img, 0.7)                       # light blur
        a = sitk.GetArrayFromImage(img)
        a = a + np.random.default_rng(100 + seed).normal(0, 3.0, a.shape).astype(np.float32)   # noise
        a[arr == 0] = 0.0                                                     # skull-stripped: background 0
        img = sitk.GetImageFromArray(np.clip(a, 0, None).astype(np.float32))
        img.CopyInformation(boxed)
        _write(img, files[role])
        _write(boxed, files[f"{role}_seg"])
    common = sorted(set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(files["fixed_seg"])))).tolist())
                    & set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(files["moving_seg"])))).tolist()) - {0})
    desc = (f"T1-like images synthesised from SynthSeg label maps {fixed_n} (fixed) and {moving_n} (moving): fixed "
            f"per-label intensities, Gaussian blur σ 0.7 mm, noise σ 3 (WM 110), labels ≥ 100 dropped, background 0, "
            f"both resampled (nearest neighbour) into one common 1 mm box {size[0]}×{size[1]}×{size[2]} (L-R × A-P × S-I, "
            f"centred on the union of the two brains, top kept, lower brainstem cut); "
            f"{len(common)} common labels")
    (d / "pair.json").write_text(json.dumps({"description": desc, "means": means}, indent=1))
    out.update({k: str(v) for k, v in files.items()})
    out["description"] = desc
    return out


def _known_pair(data: Path, work: Path, n: int = 15, seed: int = 2026) -> dict[str, Any]:
    """The synthesised image of label map ``n`` (fixed) and the same image deformed by a known random smooth
    diffeomorphism (moving): the true fixed → moving map is stored, so every method's displacement error is known
    voxel by voxel (and an uncertainty map can be compared with the real error, not a proxy)."""
    import SimpleITK as sitk
    import torch

    from ..field import integrate_ss, warp
    from ..frames import Geometry, displacement_image, lps_from_vox_disp
    from ..io.result_writer import write_displacement_transform

    src = _synth_pair(data, work, n, 16 if n != 16 else 15)
    d = work / "pairs" / f"known-{n}"
    d.mkdir(parents=True, exist_ok=True)
    files = {r: d / f"{r}.nii.gz" for r in ("fixed", "moving", "fixed_seg", "moving_seg")}
    files["true_transform"] = d / "true_transform.h5"
    desc = (f"the synthesised image of label map {n} (fixed, as in synth-{n}-…) and the same image deformed by a "
            f"known random smooth diffeomorphism (moving): v = Gaussian noise on a 1/16 grid, upsampled, scaled to "
            f"a peak displacement of {KNOWN_MAX_MM:g} mm, moving = fixed ∘ exp(v); true fixed → moving map exp(−v); "
            f"seed {seed}")
    if not all(f.exists() for f in files.values()):
        fixed = sitk.ReadImage(src["fixed"], sitk.sitkFloat32)
        seg = sitk.ReadImage(src["fixed_seg"])
        geom = Geometry.of(fixed)
        shape = geom.shape_kji
        g = torch.Generator().manual_seed(seed)
        coarse = torch.randn((1, 3) + tuple(max(2, s // 16) for s in shape), generator=g)
        v = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
        u = integrate_ss(v)
        scale = KNOWN_MAX_MM / float(u.norm(dim=1).max())      # 1 mm voxels: voxel units are mm
        v = v * scale
        fwd, inv = integrate_ss(v), integrate_ss(-v)
        img = torch.from_numpy(sitk.GetArrayFromImage(fixed))[None, None]
        lab = torch.from_numpy(sitk.GetArrayFromImage(seg).astype(np.int32))[None, None]
        moving = sitk.GetImageFromArray(warp(img, fwd, padding="zeros")[0, 0].numpy())
        moving_seg = sitk.GetImageFromArray(warp(lab, fwd, mode="nearest", padding="zeros")[0, 0].numpy().astype(np.int16))
        for im in (moving, moving_seg):
            im.CopyInformation(fixed)
        _write(fixed, files["fixed"])
        _write(seg, files["fixed_seg"])
        _write(moving, files["moving"])
        _write(moving_seg, files["moving_seg"])
        write_displacement_transform(displacement_image(lps_from_vox_disp(inv[0].double().numpy(), geom), geom),
                                     str(files["true_transform"]))
    return {"name": f"known-{n}", "kind": "known", "description": desc, **{k: str(v) for k, v in files.items()}}


def _brats_pair(data: Path) -> dict[str, Any]:
    d = data / "brats-reg" / "BraTSReg_002"
    f, m = "BraTSReg_002_01_0262", "BraTSReg_002_00_0000"
    return {"name": "brats-002", "kind": "brats",
            "description": "BraTSReg_002 T1: follow-up `_01_0262` (fixed) → pre-operative `_00_0000` (moving), "
                           "240×240×155 at 1 mm, 6 landmark pairs (TRE = |T(fixed landmark) − moving landmark|)",
            "fixed": str(d / f"{f}_t1.nii.gz"), "moving": str(d / f"{m}_t1.nii.gz"),
            "fixed_landmarks": str(d / f"{f}_landmarks.csv"), "moving_landmarks": str(d / f"{m}_landmarks.csv")}


_PAIR_NAME = re.compile(r"^(ixi-\d+|synth-\d+-\d+|known-\d+|brats-002)$")


def check_pair_names(names: list[str]) -> None:
    """Refuse a pair name no builder knows, before any data folder is looked at (one-line BadInput)."""
    for name in names:
        if name not in (QUICK_PAIR, CT_PAIR) and not _PAIR_NAME.match(name):
            raise BadInput(f"unknown pair {name!r}; available: {', '.join(ALL_PAIRS)}, {QUICK_PAIR}")


def build_pairs(names: list[str], data: Path | None, work: Path) -> dict[str, dict[str, Any]]:
    pairs: dict[str, dict[str, Any]] = {}
    for name in names:
        if name == QUICK_PAIR:
            pairs[name] = _quick_pair(work)
        elif name == CT_PAIR:                       # generated, needs no data folder (benchmark/ct_pair.py)
            pairs[name] = build_ct_pair(work)
        elif name.startswith("ixi-"):
            ixi = _ixi_pairs(data)
            if name not in ixi:
                raise BadInput(f"unknown pair {name!r}; ixi pairs: {', '.join(ixi)}")
            pairs[name] = ixi[name]
        elif name.startswith("synth-"):
            try:
                a, b = (int(v) for v in name.split("-")[1:3])
            except ValueError:
                raise BadInput(f"pair {name!r}: use synth-A-B with two label map numbers") from None
            pairs[name] = _synth_pair(data, work, a, b)
        elif name == "brats-002":
            pairs[name] = _brats_pair(data)
        elif name.startswith("known-"):
            try:
                n = int(name.split("-")[1])
            except ValueError:
                raise BadInput(f"pair {name!r}: use known-N with a label map number") from None
            pairs[name] = _known_pair(data, work, n)
        else:
            raise BadInput(f"unknown pair {name!r}; available: {', '.join(ALL_PAIRS)}, {QUICK_PAIR}")
        for key in PAIR_FILES:
            if key in pairs[name] and not Path(pairs[name][key]).exists():
                raise BadInput(f"pair {name}: {key.replace('_', ' ')} not found: {pairs[name][key]}")
    return pairs



def missing_data(names: list[str], data: Path) -> list[str]:
    """The sub-folders of ``data`` that the pairs ``names`` need and that are absent."""
    need = {folder for name in names for prefix, folder in DATA_FOLDERS.items() if name.startswith(prefix)}
    return sorted(f for f in need if not (data / f).is_dir())


def public_view(pair: dict[str, Any]) -> dict[str, Any]:
    """The pair as benchmarks.json stores it: description and file names (no absolute paths)."""
    return {k: (v if k in ("name", "kind", "description") else Path(v).name) for k, v in pair.items()}
