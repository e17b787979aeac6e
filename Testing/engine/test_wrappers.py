"""The learned-method wrappers (nn/wrappers.py) and the network grid (nn/grid.py) on tiny tensors, without weights:
each wrapper does what its docstring says, exactly where exactness is the claim. CPU, well under a second each."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deepdiffreg.field import compose, integrate_ss, resize_disp, warp
from deepdiffreg.frames import Geometry
from deepdiffreg.methods.base import PairOnGrid
from deepdiffreg.nn.grid import NetGrid, canonical_axes, disp_from_canonical, from_canonical, to_canonical
from deepdiffreg.nn.wrappers import (SVF, Cascade, Composed, Displacement, OnNetGrid, Refine, Symmetric,
                                     WithInverse, Deeper, zero_svf_stage)

PSR = (0, 0, -1, 1, 0, 0, 0, 1, 0)          # IXI-like sagittal direction (column c: LPS vector of index axis c)


def smooth_velocity(shape=(8, 8, 8), amp=0.8, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(1, 3, 3, 3, 3, generator=g) * amp
    return torch.nn.functional.interpolate(v, size=shape, mode="trilinear", align_corners=True)


class ConvNet(torch.nn.Module):
    """A fixed random 'network' (moving, fixed) → velocity on the same grid, not symmetric in its inputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c = torch.nn.Conv3d(2, 3, 3, padding=1)

    def forward(self, m, f):
        return self.c(torch.cat([m, 2 * f], 1))


def images(shape=(8, 8, 8)):
    g = torch.Generator().manual_seed(1)
    return torch.rand(1, 1, *shape, generator=g), torch.rand(1, 1, *shape, generator=g)


def test_svf_inverse_is_exp_of_minus_v():
    v = smooth_velocity((16, 16, 16))
    d = SVF(v, 7)
    assert torch.equal(d.disp((16, 16, 16)), integrate_ss(v, 7))
    assert torch.equal(d.inverse().disp((24, 24, 24)), resize_disp(integrate_ss(-v, 7), (24, 24, 24)))
    err = compose(d.disp((16, 16, 16)), d.inverse().disp((16, 16, 16)))[:, :, 2:-2, 2:-2, 2:-2]
    assert float(err.abs().max()) < 0.05 * float(d.disp((16, 16, 16)).abs().max())


def test_cascade_composes_stages_and_inverts_in_reverse_order():
    m, f = images()
    net = ConvNet()
    s1 = lambda a, b: SVF(0.3 * net(a, b), 5)                             # noqa: E731
    s2 = lambda a, b: SVF(-0.2 * net(b, a), 5)                            # noqa: E731
    with torch.no_grad():
        phi = Cascade([s1, s2])(m, f)
        u1 = integrate_ss(0.3 * net(m, f), 5)
        u2 = integrate_ss(-0.2 * net(f, warp(m, u1)), 5)                  # stage 2 sees m warped by stage 1
        assert torch.equal(phi.stage_inputs[1], warp(m, u1))
        assert torch.equal(phi.disp((8, 8, 8)), compose(u1, u2))
        inv1 = integrate_ss(-0.3 * net(m, f), 5)
        inv2 = integrate_ss(0.2 * net(f, warp(m, u1)), 5)
        assert torch.equal(phi.inverse().disp((8, 8, 8)), compose(inv2, inv1))   # φ2⁻¹ ∘ φ1⁻¹
        one = Cascade([s1])(m, f)                                         # one stage: that stage, no detour
        assert torch.equal(one.disp((12, 12, 12)), SVF(0.3 * net(m, f), 5).disp((12, 12, 12)))


def test_deeper_runs_the_last_stage_again_on_what_the_cascade_warped_and_stops_at_a_refused_pass():
    m, f = images()
    net = ConvNet()
    s1 = lambda a, b: SVF(0.3 * net(a, b), 5)                             # noqa: E731
    s2 = lambda a, b: SVF(-0.2 * net(b, a), 5)                            # noqa: E731
    with pytest.raises(ValueError):
        Deeper([s1], -1)
    with pytest.raises(ValueError):
        Deeper([], 1)
    with torch.no_grad():
        phi = Deeper([s1, s2], 1)(m, f)
        u1 = integrate_ss(0.3 * net(m, f), 5)
        u2 = integrate_ss(-0.2 * net(f, warp(m, u1)), 5)
        u12 = compose(u1, u2)
        u3 = integrate_ss(-0.2 * net(f, warp(m, u12)), 5)                # pass 3: stage 2 on m warped by 1 and 2
        assert torch.equal(phi.stage_inputs[2], warp(m, u12))
        assert torch.equal(phi.disp((8, 8, 8)), compose(u12, u3))
        assert torch.equal(phi.disp((8, 8, 8)), Cascade([s1, s2, s2])(m, f).disp((8, 8, 8)))
        assert not torch.equal(u3, u2)                                   # a pass of its own, not a copy of pass 2
        assert phi.info["extra_passes"] == {"asked": 1, "kept": 1, "checks": [{"kept": True}]}
        # the check sees (fixed, before, after): refusing the second extra pass keeps the first one's result
        seen = []

        def accept(fx, mv, before, after):
            seen.append((fx, before, after, mv))
            return len(seen) < 2, {"n": len(seen)}
        two = Deeper([s1, s2], 3, accept)(m, f)
        assert len(seen) == 2 and torch.equal(seen[0][0], f) and torch.equal(seen[0][1], warp(m, u12))
        assert torch.equal(seen[0][3], m)
        assert torch.equal(seen[0][2], warp(m, compose(u12, u3)))
        assert torch.equal(two.disp((8, 8, 8)), phi.disp((8, 8, 8))) and len(two.parts) == 3
        assert two.info["extra_passes"] == {"asked": 3, "kept": 1,
                                            "checks": [{"n": 1, "kept": True}, {"n": 2, "kept": False}]}
        assert Deeper([s1, s2], 0)(m, f).info["extra_passes"]["asked"] == 0


def test_composed_parts_may_live_on_coarser_grids():
    """A pyramid: a coarse level's SVF and a fine one compose on the fine grid."""
    coarse, fine = SVF(smooth_velocity((4, 4, 4), 0.3), 4), SVF(smooth_velocity((8, 8, 8), 0.3, seed=2), 4)
    phi = Composed([coarse, fine], (8, 8, 8))
    assert torch.equal(phi.disp((8, 8, 8)), compose(coarse.disp((8, 8, 8)), fine.disp((8, 8, 8))))
    assert phi.disp((16, 16, 16)).shape == (1, 3, 16, 16, 16)


def test_symmetric_swaps_exactly():
    m, f = images()
    sym = Symmetric(lambda a, b: SVF(ConvNet()(a, b), 7, {"logvar": a}))
    with torch.no_grad():
        fwd, back = sym(m, f), sym(f, m)
    assert torch.equal(fwd.velocity, -back.velocity)
    assert torch.equal(fwd.extras["logvar"], m)                           # the forward pass's extras
    # a plain displacement is no velocity: −u(f, m) is not the inverse of u(m, f)'s map, so it is refused
    with pytest.raises(TypeError, match="velocity parameter, got Displacement"):
        Symmetric(lambda a, b: Displacement(a.repeat(1, 3, 1, 1, 1)))(m, f)


def test_refine_lowers_the_loss_of_the_stage_it_wraps():
    m, f = images()
    module = lambda a, b: SVF(torch.zeros(1, 3, 8, 8, 8), 4)               # noqa: E731
    loss = lambda d, a, b: ((b - warp(a, d.disp(b.shape[2:]))) ** 2).mean()  # noqa: E731
    with torch.no_grad():
        d = Refine(module, loss, steps=5, lr=0.1)(m, f)
        assert d.info["refine_steps"] == 5 and d.info["refine_loss_end"] < d.info["refine_loss_start"]
        assert float(d.velocity.abs().max()) > 0
        same = Refine(module, loss, steps=0, lr=0.1)(m, f)
        assert torch.equal(same.velocity, torch.zeros(1, 3, 8, 8, 8)) and "refine_steps" not in same.info
        # inside a cascade, only the wrapped stage moves; the earlier stage stays the network's
        phi = Cascade([lambda a, b: SVF(0.2 * ConvNet()(a, b), 4), Refine(module, loss, 3, 0.1)])(m, f)
        assert torch.equal(phi.parts[0].velocity, SVF(0.2 * ConvNet()(m, f), 4).velocity)
        assert float(phi.parts[1].velocity.abs().max()) > 0 and phi.info["refine_steps"] == 3


def test_a_correction_stage_starts_at_the_identity_and_registers_what_the_cascade_left():
    """``zero_svf_stage`` in a ``Refine`` with ``methods.refine.correction_loss`` after a trained stage (a method's
    follow-up correction): zero steps change nothing (the cascade's own map); with steps, it undoes a shift the first
    stage left, and the correction is an SVF on the half grid, so it has its exact inverse exp(−v)."""
    from deepdiffreg.methods.refine import correction_loss
    g = torch.Generator().manual_seed(3)
    f = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 28, 28, 28, generator=g), 5, 1)    # smooth, 24³
    f = (f - f.min()) / (f.max() - f.min())
    shift = torch.zeros(1, 3, 24, 24, 24)
    shift[:, 2] = 1.0                                                  # moving = fixed shifted by 1 voxel along W
    m = warp(f, -shift)
    first = lambda a, b: SVF(torch.zeros(1, 3, 12, 12, 12), 4)                       # noqa: E731 — a stage that left it
    stage = zero_svf_stage()
    assert stage(m, f).velocity.shape == (1, 3, 12, 12, 12) and float(stage(m, f).velocity.abs().max()) == 0
    with torch.no_grad():
        none = Cascade([first, Refine(stage, correction_loss(), 0, 0.05)])(m, f)
        assert float(none.disp((24, 24, 24)).abs().max()) == 0
        phi = Cascade([first, Refine(stage, correction_loss(), 30, 0.05)])(m, f)
    part = phi.parts[1]
    assert part.info["refine_loss_end"] < part.info["refine_loss_start"]
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6), slice(6, -6))
    err0 = float((f - m)[inner].abs().mean())
    err = float((f - warp(m, phi.disp((24, 24, 24))))[inner].abs().mean())
    assert err < 0.6 * err0, (err, err0)
    back = compose(part.disp((24, 24, 24)), part.inverse().disp((24, 24, 24)))
    assert float(back[inner].abs().mean()) < 0.03 and float(back[inner].abs().max()) < 0.2   # S&S rounding


def test_with_inverse_uses_the_networks_backward_field():
    u, w = torch.full((1, 3, 4, 4, 4), 0.5), torch.full((1, 3, 4, 4, 4), -0.5)
    d = WithInverse(Displacement(u), Displacement(w))
    assert torch.equal(d.inverse().disp((4, 4, 4)), w) and torch.equal(d.inverse().inverse().disp((4, 4, 4)), u)
    assert Displacement(u).inverse() is None and Composed([Displacement(u), d], (4, 4, 4)).inverse() is None


def test_net_grid_round_trips_images_and_fields():
    direction = np.asarray(PSR, float).reshape(3, 3)
    src, flip = canonical_axes(direction)
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 1, 2, 3, 4)
    assert torch.equal(from_canonical(to_canonical(x, src, flip), src, flip), x)
    # a displacement along one canonical axis comes back along the working axis it came from, sign flipped with it
    u = torch.zeros(1, 3, *to_canonical(x, src, flip).shape[2:])
    u[:, 0] = 1.0                                                        # +1 voxel along canonical axis 0 (S)
    back = disp_from_canonical(u, src, flip)
    w = src[0]
    assert torch.all(back[:, w] == (-1.0 if flip[0] else 1.0)) and float(back[:, [a for a in range(3) if a != w]].abs().max()) == 0
    # sizes: 20×24×28 working (PSR) → canonical shape → multiples of 8; scalar maps come back to the working grid
    geom = Geometry((0.0, 0.0, 0.0), (2.0, 2.0, 2.0), PSR, (28, 24, 20))
    grid = NetGrid.for_working_grid(geom, (20, 24, 28), 8)
    assert all(n % 8 == 0 for n in grid.net_shape)
    img = torch.rand(1, 1, 20, 24, 28)
    assert grid.image_to_net(img).shape[2:] == grid.net_shape
    assert grid.scalar_to_work(grid.image_to_net(img)).shape == img.shape
    assert torch.allclose(grid.mm_per_voxel(grid.shape), torch.full((3,), 2.0))


def test_on_net_grid_runs_a_module_and_maps_back():
    """An identity-orientation pair whose sizes are already multiples: the field comes back unchanged; on the
    PSR-stored copy of the same pair the field is the same one in that array order."""
    f, m = images((16, 16, 16))
    module = lambda a, b: SVF(0.1 * ConvNet()(a, b), 4)                   # noqa: E731
    lps = Geometry((0.0, 0.0, 0.0), (2.0, 2.0, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (16, 16, 16))
    with torch.no_grad():
        r = OnNetGrid(module, 8)(PairOnGrid(f, m, lps), torch.device("cpu"))
        assert torch.equal(r.disp_vox(), SVF(0.1 * ConvNet()(m, f), 4).disp((16, 16, 16)))
        src, flip = canonical_axes(np.asarray(PSR, float).reshape(3, 3))
        f2, m2 = from_canonical(f, src, flip), from_canonical(m, src, flip)
        r2 = OnNetGrid(module, 8)(PairOnGrid(f2, m2, Geometry((0.0,) * 3, (2.0,) * 3, PSR, (16, 16, 16))),
                                  torch.device("cpu"))
        assert torch.allclose(r2.disp_vox(), disp_from_canonical(r.disp_vox(), src, flip), atol=1e-6)
        assert r2.inverse_disp_vox().shape == r2.disp_vox().shape
