"""Every bad input ends with one line on stderr, a distinct non-zero exit code and no output directory."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from deepdiffreg.progress import ExitCode

from synth import run_cli


def _write(path, arr, like=None, spacing=None):
    img = sitk.GetImageFromArray(arr)
    if like is not None:
        img.CopyInformation(like)
    if spacing is not None:
        img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return str(path)


def _assert_clean_failure(res, code, needle, out_dir):
    err_lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.returncode == int(code), (res.returncode, res.stderr[-2000:])
    assert len(err_lines) == 1 and err_lines[0].startswith("deepdiffreg: error:"), res.stderr[-2000:]
    assert needle.lower() in err_lines[0].lower(), err_lines[0]
    assert "Traceback" not in res.stderr + res.stdout
    errors = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{") and '"error"' in ln]
    assert errors and errors[-1]["exit_code"] == int(code)
    parent = os.path.dirname(out_dir)
    assert not os.path.exists(out_dir)
    assert not [n for n in os.listdir(parent) if ".partial-" in n]


def _register(pair, out, *extra, fixed=None, moving=None):
    return run_cli("register", "--fixed", fixed or pair["fixed"], "--moving", moving or pair["moving"],
                   "--out", out, "--method", "nodeo", "--nodeo-iterations", "2", *extra)


@pytest.fixture
def out(tmp_path):
    return str(tmp_path / "result")


def test_missing_file(pair, out):
    _assert_clean_failure(_register(pair, out, moving="/nonexistent/moving.nii.gz"), ExitCode.BAD_INPUT, "not found", out)


def test_unreadable_file(pair, out, tmp_path):
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(b"this is not an image" * 10)
    _assert_clean_failure(_register(pair, out, moving=str(bad)), ExitCode.BAD_INPUT, "cannot read", out)


def test_2d_image(pair, out, tmp_path):
    path = _write(tmp_path / "slice.nii.gz", np.random.rand(32, 32).astype(np.float32))
    _assert_clean_failure(_register(pair, out, moving=path), ExitCode.BAD_INPUT, "is 2D", out)


def test_4d_image(pair, out, tmp_path):
    vols = [sitk.GetImageFromArray(np.random.rand(16, 16, 16).astype(np.float32)) for _ in range(3)]
    path = str(tmp_path / "series.nii.gz")
    sitk.WriteImage(sitk.JoinSeries(vols), path)
    _assert_clean_failure(_register(pair, out, moving=path), ExitCode.BAD_INPUT, "is 4D", out)


def test_constant_image(pair, out, tmp_path):
    path = _write(tmp_path / "flat.nii.gz", np.full((20, 20, 20), 7, np.float32))
    _assert_clean_failure(_register(pair, out, moving=path), ExitCode.BAD_INPUT, "constant", out)


def test_nan_image(pair, out, tmp_path):
    arr = np.random.rand(20, 20, 20).astype(np.float32)
    arr[5, 5, 5] = np.nan
    path = _write(tmp_path / "nan.mha", arr)  # NIfTI writing drops NaN; MetaImage keeps it
    _assert_clean_failure(_register(pair, out, fixed=path), ExitCode.BAD_INPUT, "NaN", out)


def test_pair_that_does_not_overlap(pair, out, tmp_path):
    img = sitk.ReadImage(pair["moving"])
    img.SetOrigin([o + 1000.0 for o in img.GetOrigin()])
    far = str(tmp_path / "far.nii.gz")
    sitk.WriteImage(img, far)
    _assert_clean_failure(_register(pair, out, "--no-align", moving=far), ExitCode.BAD_INPUT, "do not overlap", out)


def test_segmentation_on_another_grid(pair, out, tmp_path):
    seg = _write(tmp_path / "seg.nii.gz", np.zeros((10, 12, 14), np.int16))
    _assert_clean_failure(_register(pair, out, "--fixed-seg", seg, "--moving-seg", pair["moving_seg"]),
                          ExitCode.BAD_INPUT, "does not match its image", out)


def test_landmark_files_of_different_lengths(pair, out, tmp_path):
    short = tmp_path / "short.csv"
    short.write_text("Landmark,X,Y,Z\n0,1,2,3\n")
    _assert_clean_failure(_register(pair, out, "--fixed-landmarks", pair["fixed_landmarks"], "--moving-landmarks",
                                    str(short)), ExitCode.BAD_INPUT, "different lengths", out)


def test_unknown_method(pair, out):
    res = run_cli("register", "--fixed", pair["fixed"], "--moving", pair["moving"], "--out", out, "--method", "magic")
    _assert_clean_failure(res, ExitCode.BAD_INPUT, "unknown method", out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_but_absent(pair, out):
    _assert_clean_failure(_register(pair, out, "--device", "cuda"), ExitCode.DEVICE_UNAVAILABLE, "CUDA", out)


def test_out_of_memory_is_refused_up_front(pair, out, tmp_path):
    # 1000³ voxels (headers only matter: the check runs before the voxels are read); compressed it is small.
    big = sitk.Image([1000, 1000, 1000], sitk.sitkUInt8)
    path = str(tmp_path / "huge.nrrd")
    sitk.WriteImage(big, path, useCompression=True)
    _assert_clean_failure(_register(pair, out, fixed=path, moving=path), ExitCode.OUT_OF_MEMORY, "memory", out)


def test_existing_output_is_not_overwritten(pair, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    res = _register(pair, str(out))
    assert res.returncode == ExitCode.BAD_INPUT and "--overwrite" in res.stderr
    assert (out / "keep.txt").read_text() == "user data"


def test_usage_error_is_one_line(pair, out):
    res = run_cli("register", "--fixed", pair["fixed"], "--out", out)
    _assert_clean_failure(res, ExitCode.BAD_INPUT, "--moving", out)
