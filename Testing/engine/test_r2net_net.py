"""R2Net's network pieces (nn/r2net.py) against the spec's numbers (shared docs, seeds-r2net-nodeo.md Part A)."""
from __future__ import annotations

import torch

from deepdiffreg.losses import jacobian_penalty
from deepdiffreg.nn.r2net import LCBlock, LCIntegrator, MSR2Net, R2Net, R2NetUNet, chunk_slices, merge_chunks


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_match_the_released_configuration():
    # spec A2.2: U-Net 231,427 + v0 head 243; one LC block 252; NSVF ≈ 233,434, SVF ≈ 231,922
    u = R2NetUNet()
    assert n_params(u) - u.v0.weight.numel() == 231_427 and u.v0.weight.numel() == 243
    assert n_params(LCBlock()) == 252
    assert n_params(R2Net(stationary=False)) == 233_434 and n_params(R2Net(stationary=True)) == 231_922


def test_lc_block_is_lipschitz_and_bounded():
    torch.manual_seed(0)
    blk = LCBlock().train()
    x = torch.randn(1, 3, 12, 12, 12)
    for _ in range(30):                        # power iterations converge during training passes
        blk(x)
    blk.eval()
    for conv in (blk.conv3, blk.conv1):
        w = conv.weight.detach().reshape(conv.weight.shape[0], -1)   # the matrix SN normalises
        assert torch.linalg.matrix_norm(w, ord=2) <= 1.0 + 1e-3
    with torch.no_grad():
        y = blk(10 * torch.randn(1, 3, 8, 8, 8))
    assert y.abs().max() < 0.5 + 1e-6          # tanh × 0.5: at most half a voxel per step
    # residual branch contracts: |F(a) − F(b)| ≤ 0.5·L·|a − b| with L ≤ 1 up to the reshaped-norm approximation
    a, b = torch.randn(1, 3, 8, 8, 8), torch.randn(1, 3, 8, 8, 8)
    with torch.no_grad():
        ratio = (blk(a) - blk(b)).norm() / (a - b).norm()
    assert ratio < 1.0


def test_svf_shares_one_block_and_nsvf_has_one_per_step():
    svf, nsvf = LCIntegrator(7, stationary=True), LCIntegrator(7, stationary=False)
    assert len(svf.blocks) == 1 and len(nsvf.blocks) == 7
    v0 = torch.zeros(1, 3, 6, 6, 6)
    with torch.no_grad():
        assert torch.allclose(svf.eval()(v0), torch.zeros_like(v0))   # no velocity, no motion


def test_checkpointed_blocks_give_the_same_field_gradients_and_power_iteration():
    # checkpointing (the default) only changes what the backward pass keeps, not a single number
    import copy
    torch.manual_seed(0)
    on = LCIntegrator(7).train()
    on.set_checkpoint(True, min_voxels=0)          # this small field too (the default starts at 128³)
    off = copy.deepcopy(on)
    off.set_checkpoint(False)
    assert all(b.checkpoint for b in on.blocks) and not any(b.checkpoint for b in off.blocks)
    v_on = torch.randn(1, 3, 10, 12, 9, requires_grad=True)
    v_off = v_on.detach().clone().requires_grad_(True)
    for _ in range(2):                             # two training steps: buffers and weights move identically
        y_on, y_off = on(v_on), off(v_off)
        assert torch.equal(y_on, y_off)
        (y_on ** 2).sum().backward()
        (y_off ** 2).sum().backward()
        assert torch.equal(v_on.grad, v_off.grad)
        for p, q in zip(on.parameters(), off.parameters()):
            assert p.grad is not None and torch.equal(p.grad, q.grad)
    saved = []                                     # what autograd keeps: only each block's input when checkpointed
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        on(v_on)
    n_on = sum(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        off(v_off)
    assert n_on < 0.5 * sum(saved)
    for a, b in zip(on.buffers(), off.buffers()):  # the spectral norm's power-iteration vectors: one step each
        assert torch.equal(a, b)
    with torch.no_grad():                          # inference records nothing, checkpointed or not
        assert torch.equal(on.eval()(v_on), off.eval()(v_off))


def test_slab_convolutions_give_conv3d_numbers_and_gradients(monkeypatch):
    # large training fields are convolved slab by slab (nn/r2net._conv3d_by_slabs: oneDNN's temporaries); the
    # numbers are conv3d's: 3×3×3 with the zero planes at both ends of axis 2, 1×1×1, a partial last slab
    import torch.nn.functional as F

    import deepdiffreg.nn.r2net as r2
    monkeypatch.setattr(r2, "SLAB_MIN_VOXELS", 1000)
    monkeypatch.setattr(r2, "SLAB_PLANES", 8)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 21, 10, 11, requires_grad=True)
    for w, pad in ((torch.randn(3, 3, 3, 3, 3, requires_grad=True), 1), (torch.randn(3, 3, 1, 1, 1,
                                                                                   requires_grad=True), 0)):
        a, b = r2._conv3d_by_slabs(x, w, pad), F.conv3d(x, w, padding=pad)
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)   # float32 sums in another order
        ga = torch.autograd.grad((a ** 2).sum(), (x, w))
        gb = torch.autograd.grad((b ** 2).sum(), (x, w))
        assert all(float((p - q).abs().max()) <= 1e-5 * float(q.abs().max()) for p, q in zip(ga, gb))
    with torch.no_grad():                          # inference: the single call
        assert torch.equal(r2._conv3d_by_slabs(x, w, 0), F.conv3d(x, w))


def test_chunks_cover_the_grid_with_the_stated_overlap_and_merge_back_exactly():
    shape = (21, 16, 33)
    slices = chunk_slices(shape, k=2, overlap=2)
    assert len(slices) == 8
    for axis in range(3):
        spans = sorted({(s[axis].start, s[axis].stop) for s in slices})
        assert spans[0][0] == 0 and spans[-1][1] == shape[axis]
        assert spans[0][1] - spans[1][0] == 2            # neighbours overlap by 2 voxels
    field = torch.randn(1, 3, *shape)
    parts = [field[(slice(None), slice(None), *s)] for s in slices]
    assert torch.allclose(merge_chunks(parts, slices, shape), field)


def test_ms_r2net_runs_on_any_grid_and_starts_as_the_mean_of_both_branches():
    torch.manual_seed(0)
    ms = MSR2Net(R2Net(), R2Net()).eval()
    mov, fix = torch.rand(1, 1, 20, 18, 26), torch.rand(1, 1, 20, 18, 26)
    with torch.no_grad():
        v1, v2 = ms.phase1_velocities(mov, fix)
        fused = ms.fuse(torch.cat([v1, v2], 1))
        disp = ms(mov, fix)
    assert v1.shape == v2.shape == disp.shape == (1, 3, 20, 18, 26)
    assert torch.allclose(fused, 0.5 * (v1 + v2), atol=1e-6)


def test_folding_loss_uses_the_true_determinant():
    # spec A3: the reference code evaluates det(2I + ∇u) and has a cofactor typo; ours is det(I + ∇u)
    k = torch.arange(10.0).view(1, 1, 10, 1, 1).expand(1, 1, 10, 10, 10)
    fold = torch.cat([-2.0 * k, torch.zeros_like(k), torch.zeros_like(k)], 1)   # ∂u_0/∂x_0 = −2: det = −1
    assert torch.isclose(jacobian_penalty(fold, threshold=0.0, squared=False), torch.tensor(1.0))
    assert jacobian_penalty(torch.zeros(1, 3, 6, 6, 6), threshold=0.0, squared=False) == 0


def test_jacobian_penalty_shortcut_keeps_value_and_gradient():
    """With no determinant under the threshold the penalty is 0 without a graph; with some, value and gradient are
    the hinge's (checked against the determinant computed here)."""
    from deepdiffreg.field import jacobian_det
    g = torch.Generator().manual_seed(1)
    smooth = (0.05 * torch.randn(1, 3, 7, 7, 7, generator=g, dtype=torch.float64)).requires_grad_(True)
    assert float(jacobian_penalty(smooth, threshold=0.5)) == 0.0
    rough = (0.8 * torch.randn(1, 3, 7, 7, 7, generator=g, dtype=torch.float64)).requires_grad_(True)
    for thr, sq in ((0.5, True), (0.0, False)):
        rough.grad = None
        got = jacobian_penalty(rough, threshold=thr, squared=sq)
        got.backward()
        ref_in = rough.detach().clone().requires_grad_(True)
        h = torch.relu(thr - jacobian_det(ref_in, mode="forward"))
        ref = (h * h).mean() if sq else h.mean()
        ref.backward()
        assert float(ref.detach()) > 0 and torch.isclose(got, ref) and torch.allclose(rough.grad, ref_in.grad)


def test_gradient_l2_value_and_gradient():
    """losses.gradient_l2's written-out gradient against torch.autograd.gradcheck, and its value against torch.diff."""
    from deepdiffreg.losses import gradient_l2
    u = torch.randn(2, 3, 5, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    assert torch.autograd.gradcheck(gradient_l2, (u,))
    ref = sum(torch.diff(u, dim=a).pow(2).mean() for a in (2, 3, 4))
    assert torch.isclose(gradient_l2(u), ref)


def test_jacobian_penalty_sparse_gradient_on_a_batch_and_a_permuted_view():
    """The CPU penalty's gradient is formed only at the voxels under the threshold; against autograd through the
    dense determinant on a batch of two and on a field given as a permuted (non-contiguous) view."""
    from deepdiffreg.field import jacobian_det
    g = torch.Generator().manual_seed(7)
    base = 0.6 * torch.randn(2, 3, 6, 8, 7, generator=g, dtype=torch.float64)
    for u in (base.clone(), base.permute(0, 1, 2, 4, 3).contiguous().permute(0, 1, 2, 4, 3)):
        u = u.requires_grad_(True) if u.is_leaf else u.detach().requires_grad_(True)
        for thr, sq in ((0.5, True), (0.0, False)):
            got = jacobian_penalty(u, threshold=thr, squared=sq)
            (g_got,) = torch.autograd.grad(3.0 * got, u)
            h = torch.relu(thr - jacobian_det(u, mode="forward"))
            ref = (h * h).mean() if sq else h.mean()
            (g_ref,) = torch.autograd.grad(3.0 * ref, u)
            assert int((h > 0).sum()) > 0 and torch.isclose(got, ref)
            assert torch.allclose(g_got, g_ref, atol=1e-14)


def test_sample_normalised_is_warp_in_the_normalised_frame():
    """field.warp.sample_normalised at x + u(x) written in the normalised frame (channel c ↔ axis c, ±1 at the
    corner voxel centres; NODEO's state) gives warp's image and the same gradient with respect to u."""
    from deepdiffreg.field import warp
    from deepdiffreg.field.grid import identity_vox
    from deepdiffreg.field.warp import sample_normalised
    g = torch.Generator().manual_seed(4)
    shape = (9, 7, 11)
    image = torch.rand(1, 1, *shape, generator=g, dtype=torch.float64)
    u = (1.5 * torch.randn(1, 3, *shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    scale = torch.tensor([2.0 / (n - 1) for n in shape], dtype=torch.float64).view(1, 3, 1, 1, 1)
    q = (identity_vox(shape, dtype=torch.float64) + u) * scale - 1.0
    a, b = warp(image, u, padding="zeros"), sample_normalised(image, q, padding="zeros")
    assert torch.allclose(a, b, atol=1e-12)
    (ga,) = torch.autograd.grad(a.sum(), u)
    (gb,) = torch.autograd.grad(b.sum(), u)
    assert torch.allclose(ga, gb, atol=1e-10)
