"""The up-front memory estimate (pipeline.memory_budget_mb, what check_memory refuses on) against the peak memory a
real run reaches (the high-water mark of a child process that only registers), on two sizes (issue 19, item 3).

The child measures itself with the engine's own function (deepdiffreg.peak_memory: VmHWM on Linux, where ru_maxrss is
kept across exec and a child of a large pytest process would report the parent's resident size: measured 837 MB
for both sizes after the benchmark tests)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from deepdiffreg.errors import OutOfMemory
from deepdiffreg.methods.base import Capabilities, Method
from deepdiffreg.pipeline import check_memory, memory_budget_mb

# The estimate is an upper bound with a margin: the measured peak lies between LOW and HIGH times the estimate,
# and the growth from the small to the large size between GROWTH_LOW and GROWTH_HIGH times the estimated growth.
LOW, HIGH = 0.5, 1.1
GROWTH_LOW, GROWTH_HIGH = 0.4, 1.3

_CHILD = r"""
import json, sys
import torch
from deepdiffreg import pipeline
from deepdiffreg.peak_memory import peak_cpu_memory_mb
from deepdiffreg.methods.base import Capabilities, FieldEstimate, Method, register_method

@register_method
class _Smooth(Method):
    '''A method that holds next to nothing (bytes_per_working_voxel=64): a smooth field and its negative.'''
    name = "_test_memory_smooth"
    description = "test only"
    caps = Capabilities(spacing_mm=(("cpu", 2.0),), bytes_per_working_voxel=64)

    def estimate(self, pair, device, progress):
        k, j, i = torch.meshgrid(*[torch.linspace(0, 1, n) for n in pair.fixed.shape[2:]], indexing="ij")
        d = torch.stack([torch.sin(3 * j), torch.cos(2 * i), 0.5 * k], 0)[None]
        return FieldEstimate(disp_vox=d, inverse_disp_vox=-d)

d, field_grid = sys.argv[1], sys.argv[2]
rep = pipeline.register(pipeline.RegisterRequest(d + "/f.nii", d + "/m.nii", _Smooth.name, d + "/out", device="cpu",
                        fixed_seg=d + "/fs.nii", moving_seg=d + "/ms.nii", field_grid=field_grid))
# the run's own number (report.json) and the high-water mark after the last file, by the same function
print(json.dumps({"peak_mb": peak_cpu_memory_mb(), "report_mb": rep["peak_memory_mb"]["cpu"]}))
"""


class _Like(Method):
    """The child's method, for the estimate on this side."""
    name = "_test_memory_smooth_here"
    caps = Capabilities(spacing_mm=(("cpu", 2.0),), bytes_per_working_voxel=64)


def _pair(d, size, spacing) -> None:
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in size[::-1]], indexing="ij")
    for name, seed in (("f", 0.0), ("m", 0.4)):
        a = (100 * (k * k + j * j + i * i < 0.6) + 30 * np.sin(5 * i + seed) * np.cos(4 * j)).astype(np.float32)
        img = sitk.GetImageFromArray(a)
        img.SetSpacing(spacing)
        sitk.WriteImage(img, os.path.join(d, f"{name}.nii"))
        seg = sitk.Cast(img > 50, sitk.sitkUInt8)
        sitk.WriteImage(seg, os.path.join(d, f"{name[0]}s.nii"))


def _measure(tmp_path, size, spacing=(1.0, 1.0, 1.0), field_grid="working") -> tuple[float, float]:
    d = tmp_path / ("x".join(map(str, size)) + field_grid)
    d.mkdir()
    _pair(str(d), size, spacing)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _CHILD, str(d), field_grid], capture_output=True, text=True,
                         timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    peak = got["peak_mb"]
    assert 0.9 * peak <= got["report_mb"] <= peak, got   # report.json's peak is this process's own
    est = sum(memory_budget_mb(_Like, size, size, spacing, 2.0, field_grid).values())
    return peak, est


def test_estimate_follows_the_measured_peak_on_two_sizes(tmp_path):
    small, large = (64, 64, 56), (128, 144, 160)
    (p_s, e_s), (p_l, e_l) = _measure(tmp_path, small), _measure(tmp_path, large)
    print(f"\npeak / estimate: {small} {p_s:.0f} / {e_s:.0f} MB, {large} {p_l:.0f} / {e_l:.0f} MB")
    for peak, est in ((p_s, e_s), (p_l, e_l)):
        assert LOW * est <= peak <= HIGH * est, (peak, est)
    # the per-voxel part, not only the constant: the growth between the sizes
    assert GROWTH_LOW * (e_l - e_s) <= p_l - p_s <= GROWTH_HIGH * (e_l - e_s), (p_l - p_s, e_l - e_s)


def test_full_resolution_field_is_budgeted(tmp_path):
    size = (128, 144, 160)
    peak, est = _measure(tmp_path, size, field_grid="fixed")
    print(f"\n--field-grid fixed {size}: peak {peak:.0f} MB, estimate {est:.0f} MB")
    assert LOW * est <= peak <= HIGH * est, (peak, est)


def test_refusal_names_what_would_make_it_fit(monkeypatch):
    from deepdiffreg import pipeline
    parts = memory_budget_mb(_Like, (512, 512, 300), (512, 512, 300), (0.8, 0.8, 1.5), 2.0, "fixed")
    need = sum(parts.values())
    monkeypatch.setattr(pipeline, "available_memory_mb", lambda device: need - 1.0)
    with pytest.raises(OutOfMemory) as e:
        check_memory(_Like, (512, 512, 300), (512, 512, 300), (0.8, 0.8, 1.5), 2.0, torch.device("cpu"), "fixed")
    msg = str(e.value)
    assert f"{need / 1024:.1f} GB" in msg and "--field-grid working" in msg and "crop" in msg
    # the working field grid needs less by the full-resolution field's part, and fits here
    assert check_memory(_Like, (512, 512, 300), (512, 512, 300), (0.8, 0.8, 1.5), 2.0, torch.device("cpu"),
                        "working")["cpu"] == pytest.approx(need - parts["full_field"], abs=0.2)


def _ready_methods() -> list[str]:
    """Every registered method that can run here (learned ones only with their weights present)."""
    from deepdiffreg.methods.base import all_methods
    ready = []
    for name, cls in sorted(all_methods().items()):
        if name.startswith("_"):
            continue
        try:
            cls().check_ready()
        except Exception:  # noqa: BLE001 - weights absent: nothing to measure
            continue
        ready.append(name)
    return ready


# each method's estimate on a small pair: at least its measured peak (an over-estimate: a run that starts does not
# run out of memory for lack of budget), at most METHOD_FACTOR times it (a machine is not refused for much less)
METHOD_FACTOR = 2.0
METHOD_PAIR = (112, 128, 144)   # 1 mm voxels: 2 mm working grid 56×64×72, 3 mm 38×43×48


@pytest.fixture(scope="module")
def method_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("method_pair")
    _pair(str(d), METHOD_PAIR, (1.0, 1.0, 1.0))
    return d


@pytest.mark.parametrize("name", _ready_methods())
def test_each_method_estimate_is_above_its_measured_peak(method_pair, name):
    from deepdiffreg.methods.base import get_method
    d = method_pair
    out = d / f"out-{name}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "deepdiffreg", "register", "--fixed", str(d / "f.nii"),
                          "--moving", str(d / "m.nii"), "--fixed-seg", str(d / "fs.nii"), "--moving-seg",
                          str(d / "ms.nii"), "--method", name, "--out", str(out), "--device", "cpu", "--threads", "1"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    peak = json.loads((out / "report.json").read_text())["peak_memory_mb"]["cpu"]   # the process's own VmHWM
    cls = get_method(name)
    spacing = cls.default_spacing(torch.device("cpu"), METHOD_PAIR, (1.0, 1.0, 1.0))   # the run's own rule
    est = sum(memory_budget_mb(cls, METHOD_PAIR, METHOD_PAIR, (1.0, 1.0, 1.0), spacing).values())
    print(f"\n{name}: peak {peak:.0f} MB, estimate {est:.0f} MB ({est / peak:.2f}x)")
    assert peak <= est <= METHOD_FACTOR * peak, (peak, est)


@pytest.mark.parametrize("size, spacing, mm", [((512, 512, 300), (0.8, 0.8, 1.5), 3.0),
                                               ((256, 256, 40), (1.0, 1.0, 6.0), 2.0),     # thick slices
                                               ((128, 128, 75), (3.2, 3.2, 6.0), 3.0),     # coarser than 3 mm
                                               ((64, 64, 56), (1.0, 1.0, 1.0), None)])
def test_estimate_counts_the_working_grid_the_run_makes(size, spacing, mm):
    """The estimate's working voxels are those of preprocess.working_grid (thick slices are resampled finer: a
    1×1×6 mm image at 2 mm has 3× its slices on the working grid)."""
    from deepdiffreg.preprocess import working_grid
    img = sitk.Image(list(size), sitk.sitkUInt8)
    img.SetSpacing(spacing)
    n_work = int(np.prod(working_grid(img, mm).size_ijk))
    part = memory_budget_mb(_Like, size, size, spacing, mm)["method"]
    assert part == pytest.approx(n_work * _Like.caps.bytes_per_working_voxel / 2 ** 20)
