"""Table-driven bad-input suite (issue 15): one row per fault, run through the real CLI.

Each row says how the broken input is made, the expected exit code and message fragment. Every row also checks
that the run left nothing behind (no <out>, no <out>.partial-*, no lock file, no parent folder it created) and
touched nothing outside its output (every other file under the test folder keeps its bytes and mtime).
"""
from __future__ import annotations

import gzip
import json
import locale
import os
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from deepdiffreg.progress import ExitCode
from synth import run_cli

DEMONS = ("--method", "demons", "--spacing", "4", "--no-align")


# -- making broken inputs ---------------------------------------------------------------------------------------
def _nifti(pair, tmp, name, patch, gz=False, which="moving"):
    """The pair's image as NIfTI-1 with header fields patched: ``patch(bytearray)`` edits the 348-byte header."""
    img = sitk.ReadImage(pair[which])
    plain = str(tmp / (name + ".nii"))
    sitk.WriteImage(img, plain, useCompression=False)
    raw = bytearray(open(plain, "rb").read())
    patch(raw)
    if gz:
        os.remove(plain)
        path = str(tmp / (name + ".nii.gz"))
        with gzip.open(path, "wb") as fh:
            fh.write(raw)
        return path
    open(plain, "wb").write(raw)
    return plain


def _set(fmt, off, *vals):
    return lambda raw: struct.pack_into("<" + fmt, raw, off, *vals)


def _sform_column_twice(raw):
    """qform off, the sform's first column doubled: an sform voxel size that pixdim contradicts."""
    struct.pack_into("<h", raw, 252, 0)
    for off in (280, 296, 312):
        struct.pack_into("<f", raw, off, 2 * struct.unpack_from("<f", raw, off)[0])


def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:int(len(data) * keep)])
    return path


def _nonorthonormal_mhd(pair, tmp):
    img = sitk.ReadImage(pair["moving"])
    path = str(tmp / "sheared.mhd")
    sitk.WriteImage(img, path)
    text = open(path).read().splitlines()
    text = [("TransformMatrix = 1 0 0 0.4 1 0 0 0 1" if ln.startswith("TransformMatrix") else ln) for ln in text]
    open(path, "w").write("\n".join(text) + "\n")
    return path


def _float_labels(pair, tmp):
    seg = sitk.ReadImage(pair["moving_seg"])
    arr = sitk.GetArrayFromImage(seg).astype(np.float32) * 0.3
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(seg)
    path = str(tmp / "float_seg.nii.gz")
    sitk.WriteImage(out, path)
    return path


def _csv(tmp, name, text):
    path = tmp / name
    path.write_text(text)
    return str(path)


def _dicom_mixed(tmp, mixed=True):
    """Eight DICOM slices (two of another size when ``mixed``). GDCM's writer switches the process locale to "C",
    which would make later subprocess output decode as ASCII in this test process: the locale is restored."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        return _write_dicom(tmp, mixed)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom(tmp, mixed):
    folder = tmp / ("dicom_mixed" if mixed else "dicom")
    folder.mkdir()
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1.654321"
    for k in range(8):
        n = 40 if k < 6 or not mixed else 32
        sl = sitk.Cast(sitk.GetImageFromArray((np.random.default_rng(k).random((1, n, n)) * 1000).astype(np.int16)),
                       sitk.sitkInt16)[:, :, 0]
        for tag, value in (("0008|0060", "MR"), ("0020|000e", uid), ("0020|000d", uid + ".1"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0032", f"0\\0\\{2.0 * k}"),
                           ("0020|0013", str(k + 1)), ("0018|0050", "2"), ("0028|0030", "1\\1")):
            sl.SetMetaData(tag, value)
        w.SetFileName(str(folder / f"s{k:02d}.dcm"))
        w.Execute(sl)
    return str(folder)


# Rows: id → (function (pair, tmp) → extra register arguments, exit code, message fragment)
def _moving(path_fn):
    return lambda pair, tmp: ["--moving", path_fn(pair, tmp)]


ROWS = {
    "nifti_pixdim_zero": (_moving(lambda p, t: _nifti(p, t, "pix0", _set("f", 80, 0.0))), ExitCode.BAD_INPUT, "pixdim"),
    "nifti_pixdim_negative": (_moving(lambda p, t: _nifti(p, t, "pixneg", _set("f", 80, -2.0), gz=True)),
                              ExitCode.BAD_INPUT, "pixdim"),
    "nifti_qform_sform_disagree": (_moving(lambda p, t: _nifti(p, t, "qs", _set("f", 292, 55.0))),
                                   ExitCode.BAD_INPUT, "qform and sform"),
    "nifti_sform_scale_differs_from_pixdim": (
        _moving(lambda p, t: _nifti(p, t, "sscale", _sform_column_twice)), ExitCode.BAD_INPUT, "sform gives voxel sizes"),
    "nonorthonormal_direction": (_moving(_nonorthonormal_mhd), ExitCode.BAD_INPUT, "non-orthonormal"),
    "truncated_nii": (_moving(lambda p, t: _truncate(_nifti(p, t, "cut", lambda r: None))),
                      ExitCode.BAD_INPUT, "truncated"),
    "truncated_nii_gz": (_moving(lambda p, t: _truncate(_nifti(p, t, "cutgz", lambda r: None, gz=True))),
                         ExitCode.BAD_INPUT, "truncated"),
    "float_labels": (lambda p, t: ["--fixed-seg", p["fixed_seg"], "--moving-seg", _float_labels(p, t)],
                     ExitCode.BAD_INPUT, "non-integer"),
    "nan_landmark": (lambda p, t: ["--fixed-landmarks", p["fixed_landmarks"], "--moving-landmarks",
                                   _csv(t, "nan.csv", "X,Y,Z\n1,2,3\nnan,1,1\n1,2,3\n1,2,3\n1,2,3\n")],
                     ExitCode.BAD_INPUT, "NaN or infinite"),
    "inf_landmark": (lambda p, t: ["--fixed-landmarks", _csv(t, "inf.csv", "1,2,3\n1,inf,3\n1,2,3\n1,2,3\n1,2,3\n"),
                                   "--moving-landmarks", p["moving_landmarks"]], ExitCode.BAD_INPUT, "NaN or infinite"),
    "two_column_landmarks": (lambda p, t: ["--fixed-landmarks", _csv(t, "two.csv", "1,2\n3,4\n5,6\n7,8\n9,10\n"),
                                           "--moving-landmarks", p["moving_landmarks"]], ExitCode.BAD_INPUT, "X,Y,Z"),
    "binary_landmarks": (lambda p, t: ["--fixed-landmarks", p["fixed"], "--moving-landmarks", p["moving_landmarks"]],
                         ExitCode.BAD_INPUT, "not a text CSV"),
    "directory_landmarks": (lambda p, t: ["--fixed-landmarks", str(t), "--moving-landmarks", p["moving_landmarks"]],
                            ExitCode.BAD_INPUT, "is a folder"),
    "dicom_mixed_slice_sizes": (lambda p, t: ["--moving", _dicom_mixed(t)], ExitCode.BAD_INPUT, "mixes slice sizes"),
    "huge_header_next_to_a_dicom_folder": (lambda p, t: ["--fixed", _dicom_mixed(t, mixed=False),
                                                         "--moving", _huge(t)], ExitCode.OUT_OF_MEMORY, "memory"),
    "spacing_zero": (lambda p, t: ["--spacing", "0"], ExitCode.BAD_INPUT, "--spacing"),
    "spacing_negative": (lambda p, t: ["--spacing", "-3"], ExitCode.BAD_INPUT, "--spacing"),
    "spacing_nan": (lambda p, t: ["--spacing", "nan"], ExitCode.BAD_INPUT, "--spacing"),
    "align_erode_negative": (lambda p, t: ["--align-erode-mm", "-5"], ExitCode.BAD_INPUT, "--align-erode-mm"),
    "threads_negative": (lambda p, t: ["--threads", "-2"], ExitCode.BAD_INPUT, "--threads"),
    "huge_segmentation_header": (lambda p, t: ["--fixed-seg", _huge(t), "--moving-seg", p["moving_seg"]],
                                 ExitCode.OUT_OF_MEMORY, "memory"),
}


def _huge(tmp):
    """A NRRD whose header claims 4000³ voxels (the data is never read: the gate refuses it from the header)."""
    path = str(tmp / "huge_seg.nhdr")
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkUInt8), path)
    text = open(path).read().replace("sizes: 8 8 8", "sizes: 4000 4000 4000")
    open(path, "w").write(text)
    return path


def _snapshot(*folders):
    out = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in files + dirs:
                path = os.path.join(root, name)
                st = os.lstat(path)
                out[path] = (st.st_size, st.st_mtime_ns) if not os.path.isdir(path) else None
    return out


def assert_clean_failure(res, code, needle, out_dir, before=None, folders=()):
    err_lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.returncode == int(code), (res.returncode, res.stderr[-2000:])
    assert len(err_lines) == 1 and err_lines[0].startswith("deepdiffreg: error:"), res.stderr[-2000:]
    assert needle.lower() in err_lines[0].lower(), err_lines[0]
    assert "Traceback" not in res.stderr + res.stdout
    events = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert events and events[-1]["event"] == "error" and events[-1]["exit_code"] == int(code)
    parent = os.path.dirname(out_dir)
    assert not os.path.exists(out_dir)
    if os.path.isdir(parent):
        left = [n for n in os.listdir(parent) if ".partial-" in n or "deepdiffreg-lock" in n or ".old-" in n]
        assert not left, left
    if before is not None:
        assert _snapshot(*folders) == before


@pytest.mark.parametrize("row", sorted(ROWS))
def test_bad_input_row(row, pair, tmp_path):
    make, code, needle = ROWS[row]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    extra = make(pair, inputs)
    args = {"--fixed": pair["fixed"], "--moving": pair["moving"]}
    rest = []
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in args:
            args[flag] = value
        else:
            rest += [flag, value]
    out = str(tmp_path / "new" / "deeper" / "result")     # parents that do not exist: they must not stay behind
    before = _snapshot(str(tmp_path), pair["dir"])
    res = run_cli("register", "--fixed", args["--fixed"], "--moving", args["--moving"], "--out", out, *DEMONS, *rest,
                  env={"DEEPDIFFREG_JSON": "1"})
    assert_clean_failure(res, code, needle, out)
    assert not (tmp_path / "new").exists()
    assert _snapshot(str(tmp_path), pair["dir"]) == before
