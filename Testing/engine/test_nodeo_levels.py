"""NODEO's coarse-to-fine levels and stopping rule (methods/nodeo.py): the rule ends a level on a plateau and only
there; a coarse level shares the working grid's corners; coarse-to-fine registers a phantom as well as the working
grid alone."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from deepdiffreg.field import warp
from deepdiffreg.frames import Geometry
from deepdiffreg.methods.base import PairOnGrid
from deepdiffreg.methods.nodeo import NODEO, DivergenceGuard, StoppingRule, cosine_tail, pyramid
from deepdiffreg.metrics import dice_per_label, dice_summary
from deepdiffreg.preprocess import robust_normalise


def _run(rule: StoppingRule, losses) -> int | None:
    """Iteration (1-based) at which ``rule`` stops on ``losses``, None if it never does."""
    for n, loss in enumerate(losses, start=1):
        if rule.update(float(loss)):
            return n
    return None


def test_stopping_rule_ends_a_plateau_and_only_a_plateau():
    falling = 1.0 - 0.01 * np.arange(100)                          # 1 % of the loss per iteration: never stops
    assert _run(StoppingRule(1e-3, 10), falling) is None
    plateau = np.r_[1.0 - 0.01 * np.arange(30), np.full(60, 0.71)]  # falls for 30 iterations, then flat
    stopped = _run(StoppingRule(1e-3, 10), plateau)
    assert stopped is not None and 30 < stopped <= 45               # within about a window of the plateau's start
    assert _run(StoppingRule(0.0, 10), plateau) is None             # tolerance 0: every iteration runs
    # flat from the start (the initial network's first iterations): nothing before the minimum
    assert _run(StoppingRule(1e-3, 10, min_iterations=40), np.full(60, 0.8)) == 40
    # a transient rise (Adam overshooting) followed by new lows does not stop it
    bump = np.r_[1.0 - 0.01 * np.arange(20), np.full(8, 0.95), 0.80 - 0.01 * np.arange(30)]
    assert _run(StoppingRule(1e-3, 10), bump) is None


def test_divergence_guard_undoes_a_rise_and_halves_the_step():
    """Adam with far too large a step on a quadratic: the loss jumps above its best; the guard puts the network and
    Adam's state back where the best loss was measured, halves the learning rate, and the loss then ends below
    where the unguarded run ends. rise 0: never undoes."""
    def run(rise: float):
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 1, bias=False)
        opt = torch.optim.Adam(net.parameters(), lr=3.0)
        guard, losses, restored = DivergenceGuard(rise), [], []
        for _ in range(60):
            loss = ((net.weight - 1.0) ** 2).sum()
            if guard.undo(float(loss.detach()), net, opt, 3.0):
                restored.append((float(((net.weight.detach() - 1.0) ** 2).sum()), guard.best))
                continue
            losses.append(float(loss.detach()))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return guard, losses, restored, opt
    plain, plain_losses, none, _ = run(0.0)
    assert plain.undone == 0 and not none and max(plain_losses[1:]) > plain_losses[0]   # it does overshoot
    guard, losses, restored, opt = run(0.05)
    assert guard.undone >= 1 and guard.lr_scale == 0.5 ** guard.undone
    assert opt.param_groups[0]["lr"] == 3.0 * guard.lr_scale
    assert all(now == best for now, best in restored)            # back exactly at the state of the best loss
    assert losses[-1] < plain_losses[-1]


def _pair(paths, spacing_ijk=None):
    fixed = sitk.ReadImage(paths["fixed"], sitk.sitkFloat32)
    moving = sitk.ReadImage(paths["moving"], sitk.sitkFloat32)
    to_t = lambda img: torch.from_numpy(robust_normalise(sitk.GetArrayFromImage(img)))[None, None]  # noqa: E731
    return PairOnGrid(to_t(fixed), to_t(moving), Geometry.of(fixed))


def test_coarse_level_shares_the_corners_and_skips_tiny_grids(pair):
    p = _pair(pair)
    levels = pyramid(p, 1)
    (coarse, fine) = levels
    assert fine.factor == 1 and coarse.factor == 2 and fine.fixed is p.fixed
    assert coarse.shape == tuple((n - 1) // 2 + 1 if (n - 1) % 2 == 0 else round((n - 1) / 2) + 1 for n in fine.shape)
    # a linear ramp along the last axis keeps its end values: the coarse grid spans the same box
    ramp = torch.linspace(0, 1, fine.shape[2]).expand(1, 1, *fine.shape).contiguous()
    small = pyramid(PairOnGrid(ramp, ramp, p.geometry), 1)[0].fixed
    assert abs(float(small[..., 0].mean())) < 0.05 and abs(float(small[..., -1].mean()) - 1) < 0.05
    # a grid that would fall under 16 voxels per axis gets no coarse level
    tiny = PairOnGrid(p.fixed[..., :20, :20, :20], p.moving[..., :20, :20, :20], p.geometry)
    assert len(pyramid(tiny, 2)) == 1


def test_coarse_to_fine_registers_as_well_as_the_working_grid_alone(pair):
    p = _pair(pair)
    fixed_lab = sitk.GetArrayFromImage(sitk.ReadImage(pair["fixed_seg"]))
    moving_lab = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(pair["moving_seg"])).astype(np.float32))
    labels = sorted(set(np.unique(fixed_lab).tolist()) - {0})

    def dice(disp):
        warped = warp(moving_lab[None, None], disp, mode="nearest")[0, 0].numpy()
        return dice_summary(dice_per_label(fixed_lab, warped, labels))["mean"]

    before = dice(torch.zeros(1, 3, *p.fixed.shape[2:]))
    torch.set_num_threads(1)
    single = NODEO(coarse_levels=0, stop_working_grid=True).estimate(p, torch.device("cpu"), lambda f, m: None)
    multi = NODEO(coarse_levels=1, stop_working_grid=True).estimate(p, torch.device("cpu"), lambda f, m: None)
    assert [lv["grid"] for lv in multi.info["levels"]][-1] == list(p.fixed.shape[2:])
    assert len(multi.info["levels"]) == 2 and multi.info["levels"][0]["iterations"] >= 40
    d_single, d_multi = dice(single.disp_vox), dice(multi.disp_vox)
    assert d_single > before + 0.04, (before, d_single)
    assert d_multi >= d_single - 0.01, (d_single, d_multi)
    # the working grid's share of the iterations is what costs: coarse-to-fine needs fewer of them there
    assert multi.info["levels"][-1]["iterations"] <= single.info["levels"][-1]["iterations"]


def test_velocity_upsampling_and_smoothing_match_the_filters():
    """VelocityNet's per-axis matrices equal F.interpolate (trilinear, align_corners=False) then field.filters.box_mean,
    on the working grid and on a coarse level's grid, smoothed or not."""
    import torch.nn.functional as F
    from deepdiffreg.field.filters import box_mean
    from deepdiffreg.methods.nodeo import LevelGrid, VelocityNet
    torch.manual_seed(0)
    net = VelocityNet((27, 22, 17))
    x = torch.randn(1, 3, *net.quarter)
    for out, win in (((27, 22, 17), 5), ((14, 11, 9), 3), ((27, 22, 17), 1)):
        ref = box_mean(F.interpolate(x, size=out, mode="trilinear", align_corners=False), win)
        assert torch.allclose(net._upsample_smooth(out, win, x), ref, atol=1e-6), (out, win)
    v = net(LevelGrid((14, 11, 9), torch.device("cpu")).q0, (14, 11, 9), 3)
    assert v.shape == (1, 3, 14, 11, 9)


def test_decay_runs_every_working_grid_iteration(pair):
    """The working grid runs all its iterations (the stopping rule ends only coarse levels) unless
    stop_working_grid; with decay_iterations the learning rate is constant, then falls by a cosine over the last
    decay_iterations."""
    assert [cosine_tail(i, 10, 4) for i in range(6)] == [1.0] * 6
    tail = [cosine_tail(i, 10, 4) for i in range(6, 10)]
    assert tail[0] == 1.0 and all(a > b > 0 for a, b in zip(tail, tail[1:]))
    assert cosine_tail(0, 10, 10) == 1.0 and cosine_tail(5, 10, 10) == 0.5
    p = _pair(pair)
    torch.set_num_threads(1)
    est = NODEO(decay_iterations=6, iterations=12, coarse_iterations=25, min_iterations=20, tolerance=0.5,
                window=2).estimate(p, torch.device("cpu"), lambda f, m: None)
    coarse, fine = est.info["levels"]
    assert coarse["stopped_early"] and coarse["iterations"] == 20      # tolerance 0.5 ends it at its minimum
    assert fine["iterations"] == 12 and not fine["stopped_early"]
    est = NODEO(stop_working_grid=True, iterations=30, coarse_iterations=25, min_iterations=20, warm_min_iterations=4,
                tolerance=0.5, window=2).estimate(p, torch.device("cpu"), lambda f, m: None)
    assert [lv["iterations"] for lv in est.info["levels"]] == [20, 4]


def test_fine_images_get_the_fine_working_grid_on_cpu():
    """NODEO's default working spacing on the CPU: 1.5 mm for fine images (≤ 1.2 mm voxels) whose 1.5 mm grid has
    ≤ 3 M voxels, else 2 mm when that grid has, else 3 mm, as for 2 mm heads and thick-slice images; what the run
    and its memory estimate use."""
    import torch
    from deepdiffreg.methods.base import get_method
    nodeo, cpu = get_method("nodeo"), torch.device("cpu")
    assert nodeo.default_spacing(cpu, (160, 224, 192), (1.0, 1.0, 1.0)) == 1.5        # a 1 mm brain
    assert nodeo.default_spacing(cpu, (240, 240, 155), (1.0, 1.0, 1.0)) == 1.5        # BraTS
    assert nodeo.default_spacing(cpu, (256, 256, 176), (1.0, 1.0, 1.0)) == 2.0        # a 1 mm head: 3.4 M at 1.5 mm
    assert nodeo.default_spacing(cpu, (128, 128, 90), (1.9, 1.9, 2.0)) == 3.0         # a 2 mm IXI head
    assert nodeo.default_spacing(cpu, (512, 512, 300), (0.8, 0.8, 1.5)) == 3.0        # CT: thick slices
    assert nodeo.default_spacing(cpu, (400, 400, 400), (0.8, 0.8, 0.8)) == 3.0        # 0.8 mm iso, 4.2 M voxels at 2 mm
    assert nodeo.default_spacing(cpu) == 3.0                                           # no image: the device's
    assert nodeo.default_spacing(torch.device("cuda"), (160, 224, 192), (1.0, 1.0, 1.0)) == 2.0


def test_spacing_scale_scales_the_spacing_the_engine_chooses_for_the_image():
    """``--spacing-scale`` (the Slicer panel's Fast / Accurate presets) multiplies the image's own default: for a
    1 mm brain NODEO's 1.5 mm, so "Accurate" is finer than "Balanced" (0.75 × the 3 mm CPU default was 2.25 mm);
    ``--spacing`` wins, both at once is refused before any file is read."""
    import pytest
    from deepdiffreg.errors import BadInput
    from deepdiffreg.methods.base import get_method
    from deepdiffreg.pipeline import RegisterRequest, check_request, working_spacing_mm
    nodeo, cpu = get_method("nodeo"), torch.device("cpu")
    req = lambda **k: RegisterRequest(fixed="f.nii.gz", moving="m.nii.gz", method="nodeo", out_dir="o", **k)  # noqa: E731
    brain, head = ((160, 224, 192), (1.0, 1.0, 1.0)), ((128, 128, 90), (1.9, 1.9, 2.0))
    assert working_spacing_mm(req(), nodeo, cpu, *brain) == 1.5
    assert working_spacing_mm(req(spacing_scale=0.75), nodeo, cpu, *brain) == 1.0      # 1.125, in quarter mm
    assert working_spacing_mm(req(spacing_scale=1.5), nodeo, cpu, *brain) == 2.25
    assert working_spacing_mm(req(spacing_scale=0.75), nodeo, cpu, *head) == 2.25
    assert working_spacing_mm(req(spacing_mm=2.5), nodeo, cpu, *brain) == 2.5
    for bad in (dict(spacing_scale=0.0), dict(spacing_scale=float("nan")), dict(spacing_mm=2.0, spacing_scale=1.5)):
        with pytest.raises(BadInput):
            check_request(req(**bad))
