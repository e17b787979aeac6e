"""Reading images, segmentations and landmarks with the checks that turn bad input into one-line errors."""
from __future__ import annotations

import csv
import os

import numpy as np
import SimpleITK as sitk

from ..errors import BadInput


def read_image(path: str, what: str = "image", pixel=sitk.sitkFloat32) -> sitk.Image:
    """Read a 3D scalar image: any file SimpleITK reads, or a DICOM series folder."""
    if not path or not os.path.exists(path):
        raise BadInput(f"{what} not found: {path}")
    try:
        if os.path.isdir(path):
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(path)
            if not series:
                raise BadInput(f"{what}: folder {path} holds no DICOM series")
            # The largest series in the folder is the one a user means.
            files = max((reader.GetGDCMSeriesFileNames(path, s) for s in series), key=len)
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(path)
    except BadInput:
        raise
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        reason = next((ln for ln in first if "ERROR" in ln or "Could not" in ln or "Unable" in ln), first[-1] if first else "")
        raise BadInput(f"{what}: cannot read {path}: {reason.strip()[:200]}") from None
    dim = image.GetDimension()
    if dim != 3:
        raise BadInput(f"{what} {os.path.basename(path)} is {dim}D; a 3D volume is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise BadInput(f"{what} {os.path.basename(path)} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                       "a scalar volume is needed")
    if min(image.GetSize()) < 4:
        raise BadInput(f"{what} {os.path.basename(path)} has size {image.GetSize()}: at least 4 voxels per axis are needed")
    return sitk.Cast(image, pixel)


def read_header(path: str) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
    """(size, spacing) from the file header without reading voxels; None for folders or unknown formats."""
    if not path or not os.path.isfile(path):
        return None
    try:
        r = sitk.ImageFileReader()
        r.SetFileName(path)
        r.ReadImageInformation()
        return tuple(r.GetSize()), tuple(r.GetSpacing())
    except RuntimeError:
        return None


def check_intensities(image: sitk.Image, what: str) -> None:
    arr = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(arr).all():
        raise BadInput(f"{what} contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        raise BadInput(f"{what} is empty or constant (all voxels = {lo:g})")


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-3) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=tol, atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol * max(a.GetSpacing()) * 10)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def read_segmentation(path: str, image: sitk.Image, what: str) -> sitk.Image:
    seg = read_image(path, what, pixel=sitk.sitkInt32)
    if not same_grid(seg, image):
        raise BadInput(f"{what} grid (size {seg.GetSize()}, spacing {tuple(round(s, 4) for s in seg.GetSpacing())}) "
                       f"does not match its image (size {image.GetSize()}, spacing "
                       f"{tuple(round(s, 4) for s in image.GetSpacing())})")
    seg.CopyInformation(image)
    return seg


def read_landmarks(path: str, what: str) -> np.ndarray:
    """CSV of points in LPS mm: columns X,Y,Z (a header and a leading label column are allowed) → (N, 3)."""
    if not path or not os.path.exists(path):
        raise BadInput(f"{what} not found: {path}")
    rows = []
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = None
        for row in reader:
            if not row or row[0].startswith("#"):
                continue
            if header is None and any(c.strip().upper() in ("X", "Y", "Z") for c in row):
                header = [c.strip().upper() for c in row]
                continue
            try:
                if header:
                    rows.append([float(row[header.index(c)]) for c in ("X", "Y", "Z")])
                else:
                    vals = [float(v) for v in row]
                    rows.append(vals[-3:])
            except (ValueError, IndexError):
                raise BadInput(f"{what}: cannot parse line {row!r} in {path}") from None
    if not rows:
        raise BadInput(f"{what}: no points in {path}")
    return np.asarray(rows, dtype=np.float64)
