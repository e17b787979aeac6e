"""The benchmark pairs, built in a work folder (never in the repository).

- ``ixi-1``, ``ixi-2``: two real IXI T1s each (held-out validation subjects of ``train.real_data.split_ixi``) with
  their DLMUSE parcellations; 2 mm, whole head, not pre-aligned;
- ``synth-A-B`` (``synth-15-16``): T1-like images synthesised from the SynthSeg label maps A (fixed) and B (moving),
  labels ≥ 100 dropped, skull-stripped (background 0), both cropped to one common 1 mm box;
- ``known-N`` (``known-15``): the synthesised image of label map N and the same image deformed by a known smooth
  diffeomorphism (the true map is stored, so the displacement error is known voxel by voxel);
- ``same-N`` (``same-1``): a follow-up-like pair of one real subject — a held-out IXI T1 (2 mm, whole head) and a
  copy of it deformed by a known small smooth diffeomorphism (mean ≈ 1 mm, peak ≈ 4 mm over the brain) with its own
  noise and a smooth intensity bias; registered without the initial alignment and marked as one patient's
  (``--no-align --follow-up``: the pair's ``register_args``, what a user who knows it is a follow-up gives).
  The do-no-harm check: a method's displacement error against the true map, as a ratio of the true mean
  displacement (the error of doing nothing);
- ``contrast-A-B`` (``contrast-15-16``): as ``synth-A-B`` but the moving image is T2-like — its own, independent
  per-label intensity table (CSF bright, white matter dark), blur and noise: a cross-contrast pair with labels;
- ``brats-002``: BraTSReg_002 T1, follow-up (fixed) → pre-operative (moving), 6 landmarks → TRE; registered
  with ``--follow-up``;
- ``ct-512``: a synthetic CT-sized pair, 512×512×300 voxels of 0.8×0.8×1.5 mm (``ct_pair.py``), generated; ``ct-N``
  (``ct-128``, ``ct-256``, N from 64 to 1024): the same phantom over the same field of view on an N×N×(300·N/512)
  grid, for the memory-growth table;
- ``quick-phantom`` (``--quick``): a tiny generated phantom pair (labels + landmarks), no ../shared needed (tests).

A pair is a dict: name, kind, description and the paths fixed, moving and, when it has them, fixed_seg,
moving_seg, fixed_landmarks, moving_landmarks, true_transform, and optionally ``register_args``: extra
``deepdiffreg register`` flags every method run on this pair gets (e.g. ``--no-align`` for a same-subject pair).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInput
from .ct_pair import CT_N_RANGE, build_ct_pair, is_ct_pair

ALL_PAIRS = ("ixi-1", "ixi-2", "synth-15-16", "brats-002", "known-15", "same-1", "contrast-15-16")
QUICK_PAIR = "quick-phantom"
KNOWN_MAX_MM = 8.0            # peak displacement of the known deformation of the known-N pairs
SAME_MEAN_MM = 1.0            # mean displacement over the brain of the same-N pairs' known deformation (a
                              # follow-up scan's residual change); its peak comes out at about 4 mm (the pair's JSON)
SAME_CONTROL_MM = 24.0        # spacing of the random velocity's control grid (smoothness of the same-N deformation)
SAME_NOISE = 0.01             # Gaussian noise σ of each same-N image, × the image's 99th percentile
SAME_BIAS = 0.08              # peak relative amplitude of the moving same-N image's smooth multiplicative bias
PAIR_FILES = ("fixed", "moving", "fixed_seg", "moving_seg", "fixed_landmarks", "moving_landmarks")
# data sub-folder each kind of pair needs
DATA_FOLDERS = {"ixi-": "ixi", "synth-": "labelmaps", "known-": "labelmaps", "brats-": "brats-reg", "same-": "ixi",
                "contrast-": "labelmaps"}


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


# T2-like mean intensities (CSF bright, white matter dark, grey matter between; others: a seeded value in [40, 150]),
# drawn independently of the T1 table: a pair with one image of each has no global intensity mapping between them.
_T2_MEANS = {2: 45, 41: 45, 7: 50, 46: 50, 16: 55, 28: 60, 60: 60, 85: 50, 77: 70,
             3: 85, 42: 85, 8: 90, 47: 90, 17: 95, 53: 95, 18: 92, 54: 92, 10: 70, 49: 70, 11: 88, 50: 88,
             12: 78, 51: 78, 13: 58, 52: 58, 26: 84, 58: 84, 30: 120, 62: 120,
             4: 150, 43: 150, 5: 150, 44: 150, 14: 150, 15: 150, 24: 160, 72: 150}
_TABLES = {"t1": (_T1_MEANS, (40.0, 110.0), 1516), "t2": (_T2_MEANS, (40.0, 150.0), 2616)}


def _table(contrast: str, labels: list[int]) -> np.ndarray:
    """Look-up table label → mean intensity of ``contrast`` ("t1" | "t2"), labels without an entry seeded."""
    means, (lo, hi), seed = _TABLES[contrast]
    rng = np.random.default_rng(seed)
    lut = np.zeros(max(labels) + 1, np.float32)
    for lab in labels:
        lut[lab] = float(means.get(lab, rng.uniform(lo, hi)))
    return lut


def _synth_pair(data: Path, work: Path, fixed_n: int = 15, moving_n: int = 16,
                moving_contrast: str = "t1") -> dict[str, Any]:
    """Images synthesised from two label maps, fixed T1-like, moving ``moving_contrast``-like ("t1": the same table
    as the fixed, a ``synth-A-B`` pair; "t2": an independent T2-like table, a ``contrast-A-B`` pair)."""
    import SimpleITK as sitk
    kind = "synth" if moving_contrast == "t1" else "contrast"
    name = f"{kind}-{fixed_n}-{moving_n}"
    d = work / "pairs" / name
    d.mkdir(parents=True, exist_ok=True)
    names = {"fixed": fixed_n, "moving": moving_n}
    out: dict[str, Any] = {"name": name, "kind": kind}
    files = {r: d / f"{r}.nii.gz" for r in ("fixed", "moving", "fixed_seg", "moving_seg")}
    if all(f.exists() for f in files.values()) and (d / "pair.json").exists():
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
    all_labels = sorted(set().union(*[np.unique(sitk.GetArrayFromImage(l)).tolist() for l in labs.values()]) - {0})
    luts = {"fixed": _table("t1", all_labels), "moving": _table(moving_contrast, all_labels)}
    for seed, (role, lab) in enumerate(labs.items()):
        boxed = sitk.Resample(lab, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
        arr = sitk.GetArrayFromImage(boxed)
        img = sitk.GetImageFromArray(luts[role][arr])
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
    contrast = ("T1-like images" if moving_contrast == "t1" else
                "a T1-like fixed and a T2-like moving image (independent per-label intensity tables: CSF bright, "
                "white matter dark in the moving one)")
    desc = (f"{contrast} synthesised from SynthSeg label maps {fixed_n} (fixed) and {moving_n} (moving): fixed "
            f"per-label intensities, Gaussian blur σ 0.7 mm, noise σ 3 (T1 WM 110), labels ≥ 100 dropped, background 0, "
            f"both resampled (nearest neighbour) into one common 1 mm box {size[0]}×{size[1]}×{size[2]} (L-R × A-P × S-I, "
            f"centred on the union of the two brains, top kept, lower brainstem cut); "
            f"{len(common)} common labels")
    means = {role: {int(l): float(lut[l]) for l in all_labels} for role, lut in luts.items()}
    (d / "pair.json").write_text(json.dumps({"description": desc, "means": means}, indent=1))
    out.update({k: str(v) for k, v in files.items()})
    out["description"] = desc
    return out


def _deform(fixed, seg, velocity_vox, files: dict[str, Path], moving_image=None) -> None:
    """Write the known-deformation pair of ``fixed`` (and its label map ``seg``): moving = fixed ∘ exp(v) (v:
    (1, 3, K, J, I) voxel units on fixed's grid), moving labels the same way (nearest neighbour), and the true
    fixed → moving map exp(−v) as an ITK displacement transform (LPS mm). ``moving_image(array) → array``: what
    is done to the moving intensities after the warp (noise, bias), None: nothing."""
    import SimpleITK as sitk
    import torch

    from ..field import integrate_ss, warp
    from ..frames import Geometry, displacement_image, lps_from_vox_disp
    from ..io.result_writer import write_displacement_transform
    geom = Geometry.of(fixed)
    fwd, inv = integrate_ss(velocity_vox), integrate_ss(-velocity_vox)
    img = torch.from_numpy(sitk.GetArrayFromImage(fixed))[None, None]
    lab = torch.from_numpy(sitk.GetArrayFromImage(seg).astype(np.int32))[None, None]
    m = warp(img, fwd, padding="zeros")[0, 0].numpy()
    if moving_image is not None:
        m = moving_image(m)
    moving = sitk.GetImageFromArray(m.astype(np.float32))
    moving_seg = sitk.GetImageFromArray(warp(lab, fwd, mode="nearest", padding="zeros")[0, 0].numpy().astype(np.int16))
    for im in (moving, moving_seg):
        im.CopyInformation(fixed)
    _write(fixed, files["fixed"])
    _write(seg, files["fixed_seg"])
    _write(moving, files["moving"])
    _write(moving_seg, files["moving_seg"])
    write_displacement_transform(displacement_image(lps_from_vox_disp(inv[0].double().numpy(), geom), geom),
                                 str(files["true_transform"]))


def _pair_files(d: Path) -> dict[str, Path]:
    files = {r: d / f"{r}.nii.gz" for r in ("fixed", "moving", "fixed_seg", "moving_seg")}
    files["true_transform"] = d / "true_transform.h5"
    return files


def _known_pair(data: Path, work: Path, n: int = 15, seed: int = 2026) -> dict[str, Any]:
    """The synthesised image of label map ``n`` (fixed) and the same image deformed by a known random smooth
    diffeomorphism (moving): the true fixed → moving map is stored, so every method's displacement error is known
    voxel by voxel (and an uncertainty map can be compared with the real error, not a proxy)."""
    import SimpleITK as sitk
    import torch

    from ..field import integrate_ss
    from ..frames import Geometry

    src = _synth_pair(data, work, n, 16 if n != 16 else 15)
    d = work / "pairs" / f"known-{n}"
    d.mkdir(parents=True, exist_ok=True)
    files = _pair_files(d)
    desc = (f"the synthesised image of label map {n} (fixed, as in synth-{n}-…) and the same image deformed by a "
            f"known random smooth diffeomorphism (moving): v = Gaussian noise on a 1/16 grid, upsampled, scaled to "
            f"a peak displacement of {KNOWN_MAX_MM:g} mm, moving = fixed ∘ exp(v); true fixed → moving map exp(−v); "
            f"seed {seed}")
    if not all(f.exists() for f in files.values()):
        fixed = sitk.ReadImage(src["fixed"], sitk.sitkFloat32)
        shape = Geometry.of(fixed).shape_kji
        g = torch.Generator().manual_seed(seed)
        coarse = torch.randn((1, 3) + tuple(max(2, s // 16) for s in shape), generator=g)
        v = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
        scale = KNOWN_MAX_MM / float(integrate_ss(v).norm(dim=1).max())      # 1 mm voxels: voxel units are mm
        _deform(fixed, sitk.ReadImage(src["fixed_seg"]), v * scale, files)
    return {"name": f"known-{n}", "kind": "known", "description": desc, **{k: str(v) for k, v in files.items()}}


def same_subject_deformation(t1, seg, files: dict[str, Path], seed: int) -> dict[str, float]:
    """Write a same-subject pair from one image ``t1`` (float32) and its label map ``seg`` (brain = label > 0):
    fixed = t1 with noise, moving = t1 deformed by a random smooth diffeomorphism exp(v) scaled to a mean
    displacement of ``SAME_MEAN_MM`` over the brain, times a smooth bias, with its own noise; the true map in
    ``files["true_transform"]``. Returns the true displacement's {"mean", "max"} (mm) over the brain."""
    import SimpleITK as sitk
    import torch

    from ..field import integrate_ss
    from ..frames import Geometry
    geom = Geometry.of(t1)
    shape = geom.shape_kji
    spacing = torch.tensor(geom.spacing_ijk[::-1], dtype=torch.float32).view(1, 3, 1, 1, 1)   # mm per voxel, k j i
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, 3) + tuple(max(2, round(s * float(sp) / SAME_CONTROL_MM) + 1)
                                        for s, sp in zip(shape, spacing.flatten())), generator=g, dtype=torch.float64)
    v = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True).float() / spacing
    brain = torch.from_numpy(sitk.GetArrayFromImage(seg) > 0)
    mm = lambda u: (u * spacing).norm(dim=1)[0]  # noqa: E731  (|u| in mm per voxel)
    v = v * (SAME_MEAN_MM / float(mm(integrate_ss(v))[brain].mean()))
    u = mm(integrate_ss(v))[brain]
    a = sitk.GetArrayFromImage(t1)
    top = float(np.percentile(a, 99))
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    phase = rng.uniform(0, 2 * np.pi, 3)
    bias = 1.0 + SAME_BIAS * np.sin(np.pi * i / 2 + phase[0]) * np.cos(np.pi * j / 2 + phase[1]) \
        * np.cos(np.pi * k / 2 + phase[2])
    noisy = lambda x: np.clip(x + rng.normal(0, SAME_NOISE * top, x.shape), 0, None)  # noqa: E731
    fixed = sitk.GetImageFromArray(noisy(a).astype(np.float32))
    fixed.CopyInformation(t1)
    _deform(fixed, seg, v, files, moving_image=lambda m: noisy(m * bias))
    return {"mean": float(u.mean()), "max": float(u.max())}


def _same_pair(data: Path, work: Path, n: int = 1, seed: int = 2027) -> dict[str, Any]:
    """A follow-up-like pair of one subject: held-out IXI validation subject ``n`` (1-based; T1 2 mm whole head)
    through ``same_subject_deformation`` (see the module docstring)."""
    import SimpleITK as sitk

    from ..train.real_data import split_ixi
    _, val = split_ixi(data / "ixi")
    if not 1 <= n <= len(val):
        raise BadInput(f"pair same-{n}: there are {len(val)} held-out IXI validation subjects (same-1 … same-{len(val)})")
    sid = val[n - 1]
    d = work / "pairs" / f"same-{n}"
    d.mkdir(parents=True, exist_ok=True)
    files = _pair_files(d)
    if not (all(f.exists() for f in files.values()) and (d / "pair.json").exists()):
        t1 = sitk.DICOMOrient(sitk.ReadImage(str(data / "ixi" / "t1" / f"{sid}_T1.nii.gz"), sitk.sitkFloat32), "LPS")
        seg = sitk.DICOMOrient(sitk.ReadImage(str(data / "ixi" / "seg" / f"{sid}_T1_DLMUSE.nii.gz"), sitk.sitkInt16),
                               "LPS")
        seg.CopyInformation(t1)
        u = same_subject_deformation(t1, seg, files, seed)
        desc = (f"one subject, IXI {sid} (held-out validation subject {n}; T1 2 mm whole head, DLMUSE labels): fixed = "
                f"the image with Gaussian noise σ {SAME_NOISE:g}×p99, moving = the same image deformed by a known "
                f"smooth diffeomorphism exp(v) (v: Gaussian noise on a {SAME_CONTROL_MM:g} mm control grid, upsampled, "
                f"scaled to a mean displacement of {u['mean']:.2f} mm over the brain, peak {u['max']:.2f} mm), "
                f"a smooth multiplicative bias (±{SAME_BIAS:g}) and its own noise; true fixed → moving map exp(−v); "
                f"registered with `--no-align --follow-up` (a follow-up scan of one patient: no affine to find); "
                f"seed {seed}")
        (d / "pair.json").write_text(json.dumps({"description": desc, "subject": sid, "true_displacement_mm": u},
                                                indent=1))
    info = json.loads((d / "pair.json").read_text())
    return {"name": f"same-{n}", "kind": "same", "description": info["description"],
            "register_args": ["--no-align", "--follow-up"], **{k: str(v) for k, v in files.items()}}


def _brats_pair(data: Path) -> dict[str, Any]:
    d = data / "brats-reg" / "BraTSReg_002"
    f, m = "BraTSReg_002_01_0262", "BraTSReg_002_00_0000"
    return {"name": "brats-002", "kind": "brats",
            "description": "BraTSReg_002 T1: follow-up `_01_0262` (fixed) → pre-operative `_00_0000` (moving), "
                           "240×240×155 at 1 mm, 6 landmark pairs (TRE = |T(fixed landmark) − moving landmark|); "
                           "registered with `--follow-up` (one patient's scans)",
            "register_args": ["--follow-up"],
            "fixed": str(d / f"{f}_t1.nii.gz"), "moving": str(d / f"{m}_t1.nii.gz"),
            "fixed_landmarks": str(d / f"{f}_landmarks.csv"), "moving_landmarks": str(d / f"{m}_landmarks.csv")}


_PAIR_NAME = re.compile(r"^(ixi-\d+|(synth|contrast)-\d+-\d+|known-\d+|same-\d+|brats-002)$")


def check_pair_names(names: list[str]) -> None:
    """Refuse a pair name no builder knows, before any data folder is looked at (one-line BadInput)."""
    for name in names:
        if name != QUICK_PAIR and not is_ct_pair(name) and not _PAIR_NAME.match(name):
            raise BadInput(f"unknown pair {name!r}; available: {', '.join(ALL_PAIRS)}, {QUICK_PAIR}, "
                           f"ct-N ({CT_N_RANGE[0]} ≤ N ≤ {CT_N_RANGE[1]}: ct-128, ct-256, ct-512)")


def _pair_numbers(name: str, count: int, usage: str) -> tuple[int, ...]:
    """The ``count`` integers after a pair name's prefix (``known-15`` -> (15,)); BadInput naming ``usage``."""
    try:
        numbers = tuple(int(v) for v in name.split("-")[1:1 + count])
    except ValueError:
        numbers = ()
    if len(numbers) != count:
        raise BadInput(f"pair {name!r}: use {usage}")
    return numbers


def build_pairs(names: list[str], data: Path | None, work: Path) -> dict[str, dict[str, Any]]:
    pairs: dict[str, dict[str, Any]] = {}
    for name in names:
        if name == QUICK_PAIR:
            pairs[name] = _quick_pair(work)
        elif is_ct_pair(name):                      # generated, needs no data folder (benchmark/ct_pair.py)
            pairs[name] = build_ct_pair(work, name)
        elif name.startswith("ixi-"):
            ixi = _ixi_pairs(data)
            if name not in ixi:
                raise BadInput(f"unknown pair {name!r}; ixi pairs: {', '.join(ixi)}")
            pairs[name] = ixi[name]
        elif name.startswith(("synth-", "contrast-")):
            kind = name.split("-")[0]
            a, b = _pair_numbers(name, 2, f"{kind}-A-B with two label map numbers")
            pairs[name] = _synth_pair(data, work, a, b, "t1" if kind == "synth" else "t2")
        elif name.startswith("same-"):
            (n,) = _pair_numbers(name, 1, "same-N with a validation subject number")
            pairs[name] = _same_pair(data, work, n)
        elif name == "brats-002":
            pairs[name] = _brats_pair(data)
        elif name.startswith("known-"):
            (n,) = _pair_numbers(name, 1, "known-N with a label map number")
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
    return {k: (v if k in ("name", "kind", "description", "register_args") else Path(v).name)
            for k, v in pair.items()}
