"""Reading images, segmentations and landmarks with the checks that turn bad input into one-line errors."""
from __future__ import annotations

import csv
import gzip
import math
import os
import struct
import zlib

import numpy as np
import SimpleITK as sitk

from ..errors import BadInput, OutOfMemory, RegistrationError


def _dicom_files(path: str, what: str) -> list[str]:
    """The files of the largest DICOM series in folder ``path`` (the one a user means)."""
    reader = sitk.ImageSeriesReader()
    try:
        series = reader.GetGDCMSeriesIDs(path)
    except RuntimeError:
        series = ()
    if not series:
        raise BadInput(f"{what}: folder {path} holds no DICOM series")
    return list(max((reader.GetGDCMSeriesFileNames(path, s) for s in series), key=len))


def _file_info(path: str) -> sitk.ImageFileReader:
    r = sitk.ImageFileReader()
    r.SetFileName(path)
    r.ReadImageInformation()
    return r


def _itk_reason(e: RuntimeError) -> str:
    first = str(e).strip().splitlines()
    reason = next((ln for ln in first if "ERROR" in ln or "Could not" in ln or "Unable" in ln), first[-1] if first else "")
    return reason.strip()[:200]


def available_memory_bytes() -> float | None:
    """Free CPU memory (MemAvailable) in bytes; None when it cannot be told."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    try:
        import psutil
        return float(psutil.virtual_memory().available)
    except ImportError:
        return None


def _check_fits(what: str, path: str, size: tuple[int, ...], bytes_per_voxel: float) -> None:
    """Refuse (OutOfMemory, before a voxel is read) an image whose voxels, read and cast to 4-byte pixels, would
    not fit in the free memory (a 4000³ header would otherwise reach a 256 GB allocation)."""
    need = float(np.prod([float(n) for n in size])) * (bytes_per_voxel + 4.0)
    avail = available_memory_bytes()
    if avail is not None and need > avail:
        raise OutOfMemory(f"{what} {os.path.basename(os.path.normpath(path))} ({'x'.join(map(str, size))} voxels) needs "
                          f"about {need / 2 ** 30:.1f} GB of memory to read but only {avail / 2 ** 30:.1f} GB is free")


def _check_geometry(what: str, path: str, spacing, direction) -> None:
    """Positive finite spacing and an orthonormal direction: ITK coerces a non-orthonormal one when it writes
    NIfTI, so outputs would sit on another grid than the transform."""
    name = os.path.basename(os.path.normpath(path))
    sp = np.asarray(spacing, float)
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise BadInput(f"{what} {name} has voxel spacing {tuple(float(v) for v in sp)}: every spacing must be > 0")
    d = np.asarray(direction, float).reshape(3, 3)
    if not np.all(np.isfinite(d)) or np.abs(d.T @ d - np.eye(3)).max() > 1e-4:
        raise BadInput(f"{what} {name} has a non-orthonormal direction matrix {np.round(d, 4).tolist()} "
                       f"(sheared or scaled axes); resample it onto an orthonormal grid first")


def check_header(path: str, what: str = "image") -> list[str] | None:
    """Every check that needs only the header, before a voxel is read: exists and readable, 3D scalar, fits in
    memory, spacing > 0 and orthonormal direction, and for NIfTI pixdim, qform/sform agreement and the file size.
    Returns the slice files of a DICOM folder (None for a file). Raises BadInput / OutOfMemory (one line)."""
    if not path or not os.path.exists(path):
        raise BadInput(f"{what} not found: {path}")
    try:
        if os.path.isdir(path):
            files = _dicom_files(path, what)
            sizes: dict[tuple[int, ...], list[str]] = {}
            for f in files:
                sizes.setdefault(tuple(_file_info(f).GetSize()[:2]), []).append(f)
            if len(sizes) > 1:
                detail = ", ".join(f"{len(v)} of {a}x{b}" for (a, b), v in sorted(sizes.items(), key=lambda kv: -len(kv[1])))
                raise BadInput(f"{what}: the DICOM series in {path} mixes slice sizes ({detail}); "
                               f"give a folder with one series of equal slices")
            info = _file_info(files[0])
            size = tuple(info.GetSize()[:2]) + (len(files),)
            _check_fits(what, path, size, info.GetNumberOfComponents() * _bytes_of(info.GetPixelID()))
            return files
        if not os.access(path, os.R_OK):
            raise BadInput(f"{what}: cannot read {path}: permission denied")
        info = _file_info(path)
        _check_shape(what, path, info.GetDimension(), info.GetNumberOfComponents(), info.GetSize())
        _check_fits(what, path, tuple(info.GetSize()), _bytes_of(info.GetPixelID()))
        check_nifti_header(path, what)
        _check_geometry(what, path, info.GetSpacing(), info.GetDirection())
        return None
    except RegistrationError:
        raise
    except RuntimeError as e:
        raise BadInput(f"{what}: cannot read {path}: {_itk_reason(e)}") from None
    except OSError as e:
        raise BadInput(f"{what}: cannot read {path}: {e.strerror or e}") from None


def _check_shape(what: str, path: str, dim: int, components: int, size) -> None:
    """A 3D scalar volume of at least 4 voxels per axis (from a header, or from the image a DICOM series gave)."""
    name = os.path.basename(os.path.normpath(path))
    if dim != 3:
        raise BadInput(f"{what} {name} is {dim}D; a 3D volume is needed")
    if components != 1:
        raise BadInput(f"{what} {name} has {components} components per voxel; a scalar volume is needed")
    if min(size) < 4:
        raise BadInput(f"{what} {name} has size {tuple(size)}: at least 4 voxels per axis are needed")


def read_image(path: str, what: str = "image", pixel=sitk.sitkFloat32) -> sitk.Image:
    """Read a 3D scalar image: any file SimpleITK reads, or a DICOM series folder (its largest series).

    ``check_header`` runs first (nothing is read that the header already rules out); ``pixel=None`` keeps the
    stored pixel type."""
    files = check_header(path, what)
    try:
        if files is not None:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(path)
    except RuntimeError as e:
        raise BadInput(f"{what}: cannot read {path}: {_itk_reason(e)}") from None
    _check_shape(what, path, image.GetDimension(), image.GetNumberOfComponentsPerPixel(), image.GetSize())
    _check_geometry(what, path, image.GetSpacing(), image.GetDirection())
    return image if pixel is None else sitk.Cast(image, pixel)


def _bytes_of(pixel_id: int) -> int:
    try:
        return int(np.dtype(sitk.GetArrayFromImage(sitk.Image([1, 1], pixel_id)).dtype).itemsize)
    except (RuntimeError, TypeError):
        return 8


# NIfTI-1 header fields (offset, struct format) that the checks below read.
_NII = {"sizeof_hdr": (0, "i"), "dim": (40, "8h"), "datatype": (70, "h"), "bitpix": (72, "h"), "pixdim": (76, "8f"),
        "vox_offset": (108, "f"), "qform_code": (252, "h"), "sform_code": (254, "h"), "quatern": (256, "3f"),
        "qoffset": (268, "3f"), "srow": (280, "12f"), "magic": (344, "4s")}


def _nifti_header(path: str) -> tuple[dict, bool] | None:
    """The NIfTI-1 header fields of ``path`` (plain or gzipped) and whether it is gzipped; None for other files."""
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read(348)
    except (OSError, EOFError, zlib.error):
        return None
    if len(raw) < 348:
        return None
    for endian in "<>":
        if struct.unpack(endian + "i", raw[:4])[0] == 348:
            break
    else:
        return None
    hdr = {}
    for key, (off, fmt) in _NII.items():
        vals = struct.unpack_from(endian + fmt, raw, off)
        hdr[key] = vals if len(vals) > 1 else vals[0]
    if hdr["magic"] not in (b"n+1\x00", b"ni1\x00"):
        return None
    return hdr, gz


def _qform_affine(h: dict) -> np.ndarray:
    b, c, d = h["quatern"]
    a = float(np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d))))
    r = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                  [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                  [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
    qfac = -1.0 if h["pixdim"][0] < 0 else 1.0
    m = np.eye(4)
    m[:3, :3] = r @ np.diag([h["pixdim"][1], h["pixdim"][2], qfac * h["pixdim"][3]])
    m[:3, 3] = h["qoffset"]
    return m


def _gzip_trailer_length(path: str) -> int | None:
    """ISIZE, the last 4 bytes of a gzip file: its (last member's) uncompressed length mod 2^32 (None: too short).

    Reading it instead of decompressing the file (``_stream_length``) saves ~0.07 CPU-s per 1 mm image before any
    voxel is read: 0.28 CPU-s for the four inputs of a registration with segmentations (synth-15-16), more
    than the ~0.2 s that reading their voxels takes."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() < 18:                         # 10-byte header + 8-byte trailer
            return None
        fh.seek(-4, os.SEEK_END)
        return struct.unpack("<I", fh.read(4))[0]


def _stream_length(path: str, enough: int) -> int:
    """Bytes a gzip file decompresses to, counted up to ``enough`` (a cut file counts what it holds)."""
    n = 0
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    with open(path, "rb") as fh:
        while n < enough:
            chunk = fh.read(1 << 20)
            if not chunk:
                break
            try:
                n += len(d.decompress(chunk))
            except zlib.error:
                break
            if d.eof:   # a further gzip member may follow
                rest = d.unused_data
                d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                if rest:
                    n += len(d.decompress(rest))
    return n


_NIFTI_OK: set[tuple] = set()   # (path, size, mtime) of files that passed: a .nii.gz is not decompressed twice


def check_nifti_header(path: str, what: str) -> None:
    """NIfTI-1 checks ITK does not make (it reads on and gives a wrong image): pixdim ≤ 0 (read as 1 mm, or a
    mirrored image), a qform and an sform that describe different grids, a file shorter than its header says."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key in _NIFTI_OK:
        return
    _check_nifti(path, what)
    _NIFTI_OK.add(key)


def _check_nifti(path: str, what: str) -> None:
    got = _nifti_header(path)
    if got is None:
        return
    h, gz = got
    name = os.path.basename(path)
    ndim = int(h["dim"][0])
    if not 1 <= ndim <= 7:
        raise BadInput(f"{what} {name}: NIfTI header has dim[0] = {ndim}")
    pix = [float(v) for v in h["pixdim"][1:4]]
    if not all(np.isfinite(pix)) or min(pix[:min(ndim, 3)]) <= 0:
        raise BadInput(f"{what} {name}: the NIfTI header's voxel size (pixdim) is {tuple(pix[:min(ndim, 3)])}; "
                       "every voxel size must be > 0 (fix the header, e.g. with nibabel or fslorient)")
    if h["sform_code"] > 0 and ndim >= 3:
        srow = np.asarray(h["srow"], float).reshape(3, 4)
        norms = np.linalg.norm(srow[:, :3], axis=0)
        if not np.all(np.isfinite(srow)) or np.abs(norms - np.asarray(pix)).max() > 1e-3 * max(pix):
            raise BadInput(f"{what} {name}: the NIfTI sform gives voxel sizes {tuple(np.round(norms, 4).tolist())} but "
                           f"pixdim says {tuple(round(v, 4) for v in pix)}; which one is right is ambiguous — fix the "
                           "header")
    if h["qform_code"] > 0 and h["sform_code"] > 0 and ndim >= 3:
        q = _qform_affine(h)
        s4 = np.vstack([np.asarray(h["srow"], float).reshape(3, 4), [0, 0, 0, 1]])
        if not np.all(np.isfinite(s4)):
            raise BadInput(f"{what} {name}: the NIfTI sform holds NaN or infinite values")
        tol_lin = 1e-3 * max(pix)
        tol_off = max(1e-3, 0.01 * min(pix))
        if np.abs(q[:3, :3] - s4[:3, :3]).max() > tol_lin or np.abs(q[:3, 3] - s4[:3, 3]).max() > tol_off:
            raise BadInput(f"{what} {name}: the NIfTI qform and sform describe different grids (origin "
                           f"{np.round(q[:3, 3], 2).tolist()} vs {np.round(s4[:3, 3], 2).tolist()} mm, largest axis "
                           f"difference {np.abs(q[:3, :3] - s4[:3, :3]).max():.3g} mm); which one is right is ambiguous "
                           "— make them agree (or set one code to 0)")
    if h["magic"] == b"n+1\x00":
        n_vox = int(np.prod([max(1, int(v)) for v in h["dim"][1:ndim + 1]], dtype=np.int64))
        need = int(h["vox_offset"]) + n_vox * max(1, int(h["bitpix"])) // 8
        if not gz:
            have = os.path.getsize(path)
        elif _gzip_trailer_length(path) == need % (1 << 32):
            have = need         # a whole file ends with its length; a cut one with deflate data (2^-32 chance)
        else:                   # longer than the header says, several gzip members, or cut: count the bytes
            have = _stream_length(path, need)
        if have < need:
            raise BadInput(f"{what} {name} is truncated: its header needs {need} bytes of data but the file holds "
                           f"{have} (an incomplete download or copy?)")


def read_header(path: str) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
    """(size, spacing) from the header without reading voxels (a DICOM folder: its first slice's header and the
    number of slices); None for unknown formats."""
    if not path or not os.path.exists(path):
        return None
    try:
        if os.path.isdir(path):
            files = _dicom_files(path, "image")
            r = _file_info(files[0])
            return tuple(r.GetSize()[:2]) + (len(files),), tuple(r.GetSpacing())
        r = _file_info(path)
        return tuple(r.GetSize()), tuple(r.GetSpacing())
    except (RuntimeError, BadInput, OSError):
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


def read_labels(path: str, what: str) -> sitk.Image:
    """A label map (segmentation, mask) as int32. Stored floats must be integers: casting 0.3/0.6 to int would
    silently give an empty segmentation (Dice NaN)."""
    img = read_image(path, what, pixel=None)
    if img.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        arr = sitk.GetArrayViewFromImage(img)
        if not np.isfinite(arr).all():
            raise BadInput(f"{what} {os.path.basename(path)} contains NaN or infinite values; a label map holds "
                           "integer labels")
        frac = arr != np.round(arr)
        if frac.any():
            v = float(arr[frac].flat[0])
            raise BadInput(f"{what} {os.path.basename(path)} holds non-integer values (e.g. {v:g}); a label map must "
                           "hold integer labels (round or threshold it first)")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -2 ** 31 or hi >= 2 ** 31:
            raise BadInput(f"{what} {os.path.basename(path)} holds labels outside the 32-bit integer range")
    return sitk.Cast(img, sitk.sitkInt32)


def read_segmentation(path: str, image: sitk.Image, what: str) -> sitk.Image:
    seg = read_labels(path, what)
    if not same_grid(seg, image):
        raise BadInput(f"{what} grid (size {seg.GetSize()}, spacing {tuple(round(s, 4) for s in seg.GetSpacing())}) "
                       f"does not match its image (size {image.GetSize()}, spacing "
                       f"{tuple(round(s, 4) for s in image.GetSpacing())})")
    seg.CopyInformation(image)
    return seg


def read_landmarks(path: str, what: str) -> np.ndarray:
    """CSV of points in LPS mm: columns X,Y,Z (a header and a leading label column are allowed) → (N, 3).

    Every point needs three finite coordinates; a binary file, a folder or a row of two numbers is refused."""
    if not path or not os.path.exists(path):
        raise BadInput(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise BadInput(f"{what}: {path} is a folder; a CSV file of X,Y,Z points is needed")
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            text = fh.read(50_000_000)
    except UnicodeDecodeError:
        raise BadInput(f"{what}: {path} is not a text CSV file (X,Y,Z points)") from None
    except OSError as e:
        raise BadInput(f"{what}: cannot read {path}: {e.strerror or e}") from None
    if "\x00" in text:
        raise BadInput(f"{what}: {path} is not a text CSV file (X,Y,Z points)")
    try:
        header = None
        for lineno, row in enumerate(csv.reader(text.splitlines()), 1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if header is None and any(c.strip().upper() in ("X", "Y", "Z") for c in row):
                header = [c.strip().upper() for c in row]
                missing = [c for c in ("X", "Y", "Z") if c not in header]
                if missing:
                    raise BadInput(f"{what}: the header of {path} has no {'/'.join(missing)} column")
                continue
            try:
                if header:
                    vals = [float(row[header.index(c)]) for c in ("X", "Y", "Z")]
                else:
                    nums = [float(v) for v in row]
                    if len(nums) < 3:
                        raise BadInput(f"{what}: line {lineno} of {path} has {len(nums)} value(s); X,Y,Z are needed")
                    vals = nums[-3:]
            except (ValueError, IndexError):
                raise BadInput(f"{what}: cannot parse line {lineno} {row!r} in {path}") from None
            if not all(math.isfinite(v) for v in vals):
                raise BadInput(f"{what}: line {lineno} of {path} has a NaN or infinite coordinate {row!r}")
            rows.append(vals)
    except csv.Error as e:
        raise BadInput(f"{what}: {path} is not a readable CSV file ({e})") from None
    if not rows:
        raise BadInput(f"{what}: no points in {path}")
    return np.asarray(rows, dtype=np.float64)
