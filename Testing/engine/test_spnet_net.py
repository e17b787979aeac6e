"""SPnet's network (nn/spnet.py) against the spec (shared docs, seeds-spnet-avsm.md Part A)."""
from __future__ import annotations

import torch

from deepdiffreg.field import compose
from deepdiffreg.nn.spnet import SPNet, image_pyramid


def _excited(seed: int = 0) -> SPNet:
    """An untrained net whose velocity heads are large enough to move voxels (the N(0, 1e-5) init barely does)."""
    torch.manual_seed(seed)
    net = SPNet().eval()
    for est in net.estimators:
        torch.nn.init.normal_(est.pred.weight, 0.0, 0.05)
    return net


def test_parameter_count_matches_the_code():
    net = SPNet()
    # spec A.3.8: encoder 123,752 + estimators 302,980 = 426,732
    assert sum(p.numel() for p in net.encoder.parameters()) == 123_752
    assert sum(p.numel() for p in net.estimators.parameters()) == 302_980


def test_swapping_the_inputs_swaps_every_output_exactly():
    net = _excited()
    a, b = torch.rand(1, 1, 16, 24, 32), torch.rand(1, 1, 16, 24, 32)
    with torch.no_grad():
        ab, ba = net(a, b), net(b, a)
    assert float(ab["forward"][0].abs().max()) > 0.01         # it does move
    for i in range(4):
        assert torch.equal(ab["velocity"][i], -ba["velocity"][i])
        assert torch.equal(ab["forward"][i], ba["backward"][i]) and torch.equal(ab["backward"][i], ba["forward"][i])


def test_forward_and_backward_are_inverses_up_to_discretisation():
    net = _excited(1)
    a, b = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        out = net(a, b)
    u, w = out["forward"][0], out["backward"][0]
    ice = compose(u, w)[:, :, 3:-3, 3:-3, 3:-3].norm(dim=1).mean()   # φ_AB∘φ_BA − id away from the border
    assert float(ice) < 0.05 * float(u.norm(dim=1).mean()) + 1e-4


def test_levels_have_the_pyramid_shapes_and_the_grid_must_divide_by_8():
    net = SPNet().eval()
    x = torch.rand(1, 1, 16, 24, 32)
    with torch.no_grad():
        out = net(x, x)
    for i, (v, p) in enumerate(zip(out["velocity"], image_pyramid(x))):
        assert v.shape[2:] == p.shape[2:] == tuple(n // 2 ** i for n in (16, 24, 32))
    try:
        net(torch.rand(1, 1, 12, 16, 16), torch.rand(1, 1, 12, 16, 16))
    except ValueError as e:
        assert "divisible by 8" in str(e)
    else:
        raise AssertionError("a 12-voxel axis must be refused")
