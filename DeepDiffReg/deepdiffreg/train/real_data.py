"""Real training / validation data: IXI T1 + DLMUSE segmentations and the SynthSeg label maps, brought onto one
canonical training grid by a SimpleITK affine registration and cached as small .npz files.

Canonical grid (``CANON``): LPS-aligned (identity direction), 2 mm isotropic, array shape (D, H, W) = (80, 96, 80)
= (S→I axis k, A→P axis j, R→L axis i), i.e. 160 × 192 × 160 mm, centred on the brain of the reference subject.
The IXI images are whole-head and each in its own native space; they are skull-stripped with a dilated
``seg > 0`` mask, affinely registered (correlation, brain only) to the reference subject, resampled onto the
canonical grid and intensity-normalised exactly like the pipeline (0.5/99.5 percentiles of the non-zero voxels).
Label maps: labels 1..499 (brain) are kept, ≥ 500 (extra-cerebral) dropped; they are aligned by an affine
registration of their smoothed brain mask to the reference's smoothed brain mask.

Split (fixed, so numbers compare across runs): the last ``N_VAL_IXI`` subjects in sorted order and label maps
15, 16 are validation only.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..preprocess import robust_normalise  # the pipeline's rule, so training sees what inference sees

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data"   # /work/shared/data beside the checkout
CANON_SHAPE = (80, 96, 80)       # (D, H, W) array order = (k, j, i)
CANON_SPACING = 2.0
N_VAL_IXI = 10
CACHE_VERSION = 2                # 2: whole-head images and the affine parameters stored as well
VAL_LABELMAPS = (15, 16)


def _lps(img: sitk.Image) -> sitk.Image:
    return sitk.DICOMOrient(img, "LPS")   # identity direction: array axes (k, j, i) = (S, P, L) increasing


def _canon_reference(center_lps) -> sitk.Image:
    ref = sitk.Image([CANON_SHAPE[2], CANON_SHAPE[1], CANON_SHAPE[0]], sitk.sitkFloat32)
    ref.SetSpacing([CANON_SPACING] * 3)
    half = (np.array([CANON_SHAPE[2], CANON_SHAPE[1], CANON_SHAPE[0]]) - 1) * CANON_SPACING / 2
    ref.SetOrigin(tuple(float(c) for c in np.asarray(center_lps) - half))
    return ref


def ixi_subjects(ixi_dir: Path = SHARED / "ixi") -> list[str]:
    return sorted(p.name.replace("_T1.nii.gz", "") for p in (Path(ixi_dir) / "t1").glob("*_T1.nii.gz"))


def split_ixi(ixi_dir: Path = SHARED / "ixi") -> tuple[list[str], list[str]]:
    subs = ixi_subjects(ixi_dir)
    return subs[:-N_VAL_IXI], subs[-N_VAL_IXI:]


def _load_ixi(ixi_dir: Path, sid: str, with_head: bool = False):
    t1 = _lps(sitk.ReadImage(str(Path(ixi_dir) / "t1" / f"{sid}_T1.nii.gz"), sitk.sitkFloat32))
    seg = _lps(sitk.ReadImage(str(Path(ixi_dir) / "seg" / f"{sid}_T1_DLMUSE.nii.gz"), sitk.sitkUInt16))
    seg.CopyInformation(t1)
    mask = sitk.BinaryDilate(sitk.Cast(seg > 0, sitk.sitkUInt8), [2, 2, 2])
    brain = sitk.Mask(t1, mask)
    return (brain, seg, t1) if with_head else (brain, seg)


def _affine(fixed: sitk.Image, moving: sitk.Image, metric: str = "corr") -> sitk.Transform:
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    if metric == "corr":
        reg.SetMetricAsCorrelation()
    else:
        reg.SetMetricAsMeanSquares()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, seed=1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=100,
                                                 gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0])
    reg.SetInitialTransform(init, inPlace=False)
    return reg.Execute(fixed, moving)


def prepare_cache(cache_dir: Path, ixi_dir: Path = SHARED / "ixi", labelmap_dir: Path = SHARED / "labelmaps",
                  log=print, reverse: bool = False) -> Path:
    """Build the cache (idempotent: existing files are kept). Returns ``cache_dir``."""
    cache_dir = Path(cache_dir)
    (cache_dir / "ixi").mkdir(parents=True, exist_ok=True)
    (cache_dir / "labelmaps").mkdir(parents=True, exist_ok=True)
    subs = ixi_subjects(ixi_dir)
    ref_id = subs[0]
    ref_brain, ref_seg = _load_ixi(ixi_dir, ref_id)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(ref_seg > 0, sitk.sitkUInt8))
    canon = _canon_reference(stats.GetCentroid(1))
    ref_mask_s = sitk.SmoothingRecursiveGaussian(sitk.Cast(ref_seg > 0, sitk.sitkFloat32), 2.0)
    grid_file = cache_dir / "grid.json"
    if grid_file.exists() and json.loads(grid_file.read_text()).get("version") != CACHE_VERSION:
        from ..errors import BadInput
        raise BadInput(f"training cache {cache_dir} was built by an older version; delete it or pass another --cache")
    if not grid_file.exists() and any((cache_dir / "ixi").glob("*.npz")):
        from ..errors import BadInput
        raise BadInput(f"training cache {cache_dir} has no grid.json; delete it or pass another --cache")
    grid_file.write_text(json.dumps({"version": CACHE_VERSION, "reference": ref_id, "origin_lps": canon.GetOrigin(),
                                     "spacing": CANON_SPACING, "shape_dhw": CANON_SHAPE}))
    for n, sid in enumerate(subs[::-1] if reverse else subs):
        out = cache_dir / "ixi" / f"{sid}.npz"
        if out.exists():
            continue
        brain, seg, head = _load_ixi(ixi_dir, sid, with_head=True)
        tx = sitk.AffineTransform(3) if sid == ref_id else _affine(ref_brain, brain)
        img = sitk.GetArrayFromImage(sitk.Resample(brain, canon, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        lab = sitk.GetArrayFromImage(sitk.Resample(seg, canon, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16))
        img = robust_normalise(img) * (img > 0)
        # whole head, normalised over the native image as the pipeline does with an unstripped input
        head_n = sitk.GetImageFromArray(robust_normalise(sitk.GetArrayFromImage(head)))
        head_n.CopyInformation(head)
        hd = sitk.GetArrayFromImage(sitk.Resample(head_n, canon, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        tmp = out.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, image=img.astype(np.float16), head=hd.astype(np.float16),
                            labels=lab.astype(np.uint16),
                            affine=np.asarray(list(tx.GetParameters()) + list(tx.GetFixedParameters())))
        tmp.replace(out)
        log(f"ixi {n + 1}/{len(subs)} {sid}")
    for p in sorted(Path(labelmap_dir).glob("training_seg_*.nii.gz"), reverse=reverse):
        out = cache_dir / "labelmaps" / (p.name.replace(".nii.gz", ".npz"))
        if out.exists():
            continue
        lab = _lps(sitk.ReadImage(str(p), sitk.sitkUInt16))
        lab = sitk.Mask(lab, sitk.Cast(lab < 500, sitk.sitkUInt8))          # drop extra-cerebral labels
        mask_s = sitk.SmoothingRecursiveGaussian(sitk.Cast(lab > 0, sitk.sitkFloat32), 2.0)
        mask_s = sitk.Resample(mask_s, _grid_like(mask_s, 2.0))
        tx = _affine(ref_mask_s, mask_s, metric="ms")
        arr = sitk.GetArrayFromImage(sitk.Resample(lab, canon, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16))
        tmp = out.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, labels=arr.astype(np.uint16))
        tmp.replace(out)
        log(f"labelmap {p.name}")
    return cache_dir


def prepare_unlabeled(cache_dir: Path, folder: Path, reference: sitk.Image | None = None, log=print) -> list[Path]:
    """Cache every image of an unlabeled folder (e.g. ../shared/data/oasis-unlabeled; assumed skull-stripped) on
    the canonical grid of ``cache_dir`` (its grid.json): LPS-oriented, affinely registered (correlation) to
    ``reference`` (default: the cache's reference IXI brain) and normalised like the pipeline. Written to
    ``cache_dir/unlabeled/<name>.npz`` with key "image"; returns the written paths. Not yet in the training mix."""
    cache_dir = Path(cache_dir)
    grid = json.loads((cache_dir / "grid.json").read_text())
    canon = sitk.Image([grid["shape_dhw"][2], grid["shape_dhw"][1], grid["shape_dhw"][0]], sitk.sitkFloat32)
    canon.SetSpacing([grid["spacing"]] * 3)
    canon.SetOrigin(tuple(grid["origin_lps"]))
    if reference is None:
        ref_img = sitk.GetImageFromArray(load_cache(cache_dir, "ixi", [grid["reference"]])[grid["reference"]]["image"])
        reference = ref_img
        reference.CopyInformation(canon)
    out_dir = cache_dir / "unlabeled"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for p in sorted(Path(folder).iterdir()):
        if not p.name.endswith((".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")):
            continue
        name = p.name.split(".")[0]
        img = _lps(sitk.ReadImage(str(p), sitk.sitkFloat32))
        img_2mm = sitk.Resample(img, _grid_like(img, grid["spacing"]))
        tx = _affine(reference, img_2mm)
        arr = sitk.GetArrayFromImage(sitk.Resample(img, canon, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        arr = robust_normalise(arr) * (arr > 0)
        np.savez_compressed(out_dir / f"{name}.npz", image=arr.astype(np.float16))
        written.append(out_dir / f"{name}.npz")
        log(f"unlabeled {name}")
    return written


def _grid_like(img: sitk.Image, spacing: float) -> sitk.Image:
    size = [int(round(s * sp / spacing)) for s, sp in zip(img.GetSize(), img.GetSpacing())]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing([spacing] * 3)
    ref.SetOrigin(img.GetOrigin())
    ref.SetDirection(img.GetDirection())
    return ref


def load_cache(cache_dir: Path, kind: str, names: list[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """{name: {"image": float32 (D,H,W) or absent, "labels": int64 (D,H,W)}} for kind "ixi" or "labelmaps"."""
    out = {}
    for p in sorted((Path(cache_dir) / kind).glob("*.npz")):
        name = p.stem
        if name.endswith(".tmp"):
            continue
        if names is not None and name not in names:
            continue
        z = np.load(p)
        out[name] = {k: (z[k].astype(np.int64) if k == "labels" else z[k].astype(np.float32)) for k in z.files}
    return out


if __name__ == "__main__":  # python -m deepdiffreg.train.real_data CACHE_DIR
    import sys
    prepare_cache(Path(sys.argv[1] if len(sys.argv) > 1 else Path.home() / ".cache" / "deepdiffreg" / "train-v2"),
                  reverse="--reverse" in sys.argv)
