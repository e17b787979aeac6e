"""VoxelMorph-diff uncertainty maps (methods/vxm_uncertainty.py): exact values where the posterior is known in closed
form, and the property the map exists for — it rises where the pair disagrees."""
from __future__ import annotations

import math

import pytest

import torch

from deepdiffreg.methods.vxm_uncertainty import laplace_std_mm, sampled_std_mm

LAM, SIGMA = 20.0, 0.02
MM = torch.tensor([4.0, 4.0, 4.0])          # 2 mm net grid → 4 mm per ½-grid voxel


def _zero_velocity(shape=(32, 32, 32)):
    half = tuple(n // 2 for n in shape)
    return torch.zeros(1, 3, *half), torch.zeros(1, 3, *shape)


def _edges(shape=(32, 32, 32)):
    """A ball (value 0.8) in a 0.2 background, slightly blurred by a linear ramp of 2 voxels: strong edges."""
    z, y, x = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) - (n - 1) / 2 for n in shape], indexing="ij")
    r = torch.sqrt(z * z + y * y + x * x)
    return (0.2 + 0.6 * ((9.0 - r) / 2 + 0.5).clamp(0, 1))[None, None]


def test_flat_images_give_the_prior_std_exactly():
    mu, disp = _zero_velocity()
    img = torch.full((1, 1, 32, 32, 32), 0.5)
    std = laplace_std_mm(mu, img, img, disp, LAM, SIGMA, MM)
    # no image gradient: precision = λ·D, D = 6 inside → std = √(Σ_c mm²/(6λ)); border voxels have D < 6
    assert std.shape == (1, 1, 16, 16, 16)
    assert torch.allclose(std[0, 0, 1:-1, 1:-1, 1:-1], torch.tensor(math.sqrt(3 * 16.0 / (6 * LAM))), rtol=1e-5)
    assert float(std[0, 0, 0, 0, 0]) == pytest.approx(math.sqrt(3 * 16.0 / (3 * LAM)), rel=1e-5)


def test_edges_pin_the_velocity_and_a_local_mismatch_releases_it():
    mu, disp = _zero_velocity()
    f = _edges()
    agree = laplace_std_mm(mu, f, f, disp, LAM, SIGMA, MM)[0, 0]
    prior = math.sqrt(3 * 16.0 / (6 * LAM))
    # on the ball's surface (½-grid radius ≈ 4.5) the data term dominates; far inside it does not
    z, y, x = torch.meshgrid(*[torch.arange(16, dtype=torch.float32) - 7.5] * 3, indexing="ij")
    r = torch.sqrt(z * z + y * y + x * x)
    surface, centre = (r > 3.8) & (r < 5.2), r < 1.5
    assert float(agree[surface].mean()) < 0.75 * prior     # the component along the edge normal is pinned
    assert float(agree[centre].mean()) == pytest.approx(prior, rel=1e-3)
    # the moving image disagrees in one octant (its edge is shifted there): the std rises on that part of the
    # surface — towards the prior — and stays where it was on the opposite octant
    m = f.clone()
    m[..., 16:, 16:, 16:] = _edges((32, 32, 32)).roll(shifts=(2, 2, 2), dims=(2, 3, 4))[..., 16:, 16:, 16:]
    wrong = laplace_std_mm(mu, f, m, disp, LAM, SIGMA, MM)[0, 0]
    octant = surface.clone()
    octant[:9], octant[:, :9], octant[:, :, :9] = False, False, False
    opposite = surface.clone()
    opposite[7:], opposite[:, 7:], opposite[:, :, 7:] = False, False, False
    assert float(wrong[octant].mean()) > 1.5 * float(agree[octant].mean())
    assert torch.allclose(wrong[opposite], agree[opposite], rtol=1e-4)
    assert float(wrong.max()) <= prior * (1 + 1e-5) * math.sqrt(6 / 3)   # never above the border prior std


def test_sampled_without_samples_is_the_network_variance():
    mu = torch.zeros(1, 3, 8, 8, 8)
    logvar = torch.full_like(mu, math.log(0.01))
    std = sampled_std_mm(mu, logvar, samples=0, steps=7, seed=0, mm_per_half_vox=MM)
    assert torch.allclose(std, torch.tensor(math.sqrt(3 * 0.01 * 16.0)))
    # with samples: a constant velocity variance gives a positive, finite map of the same order
    s8 = sampled_std_mm(mu, logvar, samples=8, steps=7, seed=0, mm_per_half_vox=MM)
    assert torch.isfinite(s8).all() and 0.1 < float(s8.mean()) < 2.0


# ---------------------------------------------------------------------------------------------------------------
# the other candidate maps (docs/benchmarks.md, "Uncertainty candidates"): each is zero when there is nothing to
# measure and the right size when there is

def _pattern(shape=(24, 28, 26)):
    z, y, x = torch.meshgrid(*[torch.linspace(0, 1, n) for n in shape], indexing="ij")
    return (0.5 + 0.2 * torch.sin(9 * x) * torch.cos(7 * y) + 0.2 * torch.sin(8 * z))[None, None]


def test_residual_shift_recovers_a_known_shift_and_is_zero_when_aligned():
    from deepdiffreg.field import warp
    from deepdiffreg.methods.vxm_uncertainty import residual_disp_mm
    f = _pattern()
    mm = torch.tensor([2.0, 2.0, 2.0])
    assert float(residual_disp_mm(f, f, mm).max()) < 1e-6
    shift = torch.zeros(1, 3, *f.shape[2:])
    shift[:, 1] = 0.5                                       # half a voxel along the second array axis
    w = warp(f, shift)                                      # w(x) = f(x + s): f is w shifted back by s
    exact = residual_disp_mm(f, w, mm, ridge=0.0)[0, 0, 4:-4, 4:-4, 4:-4]
    assert float(exact.median()) == pytest.approx(1.0, rel=0.15)        # 0.5 voxel = 1 mm
    # the ridge shrinks the estimate where gradients are weak (flat regions: small, not noise / 0)
    est = residual_disp_mm(f, w, mm)[0, 0, 4:-4, 4:-4, 4:-4]
    assert 0.3 < float(est.median()) < float(exact.median()) and float(est.max()) < 1.2


def test_inconsistency_and_flip_maps_are_zero_for_consistent_estimates():
    from deepdiffreg.methods.vxm_uncertainty import flip_std_mm, inconsistency_mm
    mm = torch.tensor([1.0, 2.0, 3.0])
    u = torch.zeros(1, 3, 10, 12, 14)
    u[:, 0], u[:, 2] = 0.5, -0.25                           # a translation: its inverse is −u
    assert float(inconsistency_mm(u, -u, mm).abs().max()) < 1e-6
    expect = 2 * math.sqrt((0.5 * 1.0) ** 2 + (0.25 * 3.0) ** 2)
    assert torch.allclose(inconsistency_mm(u, u, mm), torch.tensor(expect))   # not inverses: twice the size
    assert float(flip_std_mm(u, u, mm).max()) == 0.0
    assert torch.allclose(flip_std_mm(u, -u, mm), torch.tensor(expect / 2))


def test_refine_shift_is_zero_at_the_objective_minimum_and_grows_away_from_it():
    from deepdiffreg.methods.vxm_uncertainty import refine_shift_mm
    mm = torch.tensor([4.0, 4.0, 4.0])
    mu = torch.zeros(1, 3, 8, 8, 8)
    at_min = refine_shift_mm(mu, lambda v: ((v - mu) ** 2).sum(), 5, 0.1, 7, mm)
    assert float(at_min.max()) < 1e-6
    target = torch.zeros_like(mu)
    target[..., 4:, :, :] = 1.0                             # the objective wants a shift in one half only
    moved = refine_shift_mm(mu, lambda v: ((v - target) ** 2).sum(), 5, 0.1, 7, mm)[0, 0]
    assert float(moved[6:].mean()) > 3 * float(moved[:2].mean()) and float(moved[6:].mean()) > 0.5
