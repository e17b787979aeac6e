"""field.unfold: folds removed by local averaging, nothing else touched."""
from __future__ import annotations

import math

import torch

from deepdiffreg.field import jacobian_det, unfold


def _smooth_field(shape=(24, 28, 20), amp=1.5, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z, y, x = torch.meshgrid(*[torch.linspace(0, 1, n) for n in shape], indexing="ij")
    chans = []
    for c in range(3):
        ph = torch.rand(3, generator=g) * 2 * math.pi
        chans.append(amp * torch.sin(2 * math.pi * z + ph[0]) * torch.cos(2 * math.pi * y + ph[1])
                     * torch.sin(2 * math.pi * x + ph[2]))
    return torch.stack(chans)[None]


def test_a_field_without_folds_comes_back_unchanged():
    u = _smooth_field(amp=0.5)
    assert float(jacobian_det(u).min()) > 0.05
    out, info = unfold(u)
    assert out is u and info["rounds"] == 0 and info["folded_before"] == info["folded_after"] == 0
    assert info["voxels_changed"] == 0 and info["max_change_vox"] == 0.0


def test_local_folds_are_removed_and_the_rest_of_the_field_is_kept_bit_for_bit():
    u = _smooth_field(amp=0.5)
    # two folds: inside two small boxes the displacement along an axis jumps back by 2.5 voxels across one voxel
    # of that axis (∂u_c/∂x_c ≈ −1.25 there, det < 0)
    u[0, 0, 8:11, 8:12, 6:10] += torch.tensor([0.0, 2.5, 2.5]).view(3, 1, 1)
    u[0, 2, 16:18, 18:21, 13:16] -= 2.5
    before = u.clone()
    det = jacobian_det(u)
    assert int((det <= 0).sum()) > 10
    out, info = unfold(u)
    assert torch.equal(u, before)                              # the input is not modified
    det_out = jacobian_det(out)
    assert float(det_out.min()) >= 0.05 and info["folded_after"] == 0 and info["below_min_after"] == 0
    assert info["folded_before"] == int((det <= 0).sum())
    changed = (out != before).any(dim=1)[0]
    assert 0 < int(changed.sum()) <= info["voxels_changed"]   # counted: voxels averaged (a mean may equal it)
    # only around the folds: every changed voxel lies within a few voxels of a voxel that was below min_det
    bad = (det[0] < 0.05).float()[None, None]
    near = torch.nn.functional.max_pool3d(bad, 2 * (1 + info["rounds"]) + 1, stride=1,
                                          padding=1 + info["rounds"])[0, 0] > 0
    assert not bool((changed & ~near).any())
    assert int(changed.sum()) < 0.15 * changed.numel()
    assert math.isclose(info["max_change_vox"], float((out - before).norm(dim=1).max()), rel_tol=1e-6)


def test_wrong_shape_is_refused():
    import pytest
    with pytest.raises(ValueError, match="B, 3, D, H, W"):
        unfold(torch.zeros(1, 2, 4, 4, 4))


def test_far_apart_folds_are_repaired_in_their_own_boxes_also_at_the_grid_face():
    u = _smooth_field(shape=(64, 60, 48), amp=0.5, seed=1)
    u[0, 0, 0:3, 4:8, 4:8] += torch.tensor([0.0, 2.5, 2.5]).view(3, 1, 1)     # touches the grid's first face
    u[0, 2, 50:53, 48:52, 40:44] -= 2.5                                        # the opposite corner
    det = jacobian_det(u)
    far = torch.zeros_like(det, dtype=torch.bool)
    far[0, 24:40, 20:40, 16:32] = True                                         # the middle: > 16 voxels from both
    out, info = unfold(u)
    assert info["boxes"] == 2 and info["folded_before"] > 0
    assert info["folded_after"] == 0 and info["below_min_after"] == 0
    assert float(jacobian_det(out).min()) >= 0.05
    assert torch.equal(out[:, :, far[0]], u[:, :, far[0]])                     # untouched between the boxes


def test_the_determinant_by_slabs_is_the_whole_field_one():
    """field.jacobian_det_slabs (unfold's and metrics.jacobian_det_lps's one slab loop) gives jacobian_det's
    numbers bit for bit: partial last slabs, one-plane slabs, a two-plane grid (its one-sided faces)."""
    from deepdiffreg.field import jacobian_det_slabs
    u = torch.randn(2, 3, 70, 9, 11)
    for n, slab in ((70, 32), (33, 8), (33, 1), (2, 1), (5, 100)):
        assert torch.equal(jacobian_det_slabs(lambda lo, hi: u[:, :, lo:hi], n, slab), jacobian_det(u[:, :, :n]))
