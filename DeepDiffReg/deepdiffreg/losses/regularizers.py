"""Regularisers on voxel displacement / velocity fields (B, 3, D, H, W)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..field.jacobian import jacobian_det


class _GradientL2(torch.autograd.Function):
    """Σ_a mean(d_a²), d_a = forward difference along axis a, with its gradient written out: ∂/∂u = Σ_a 2 d_a / N_a
    added at x + e_a and subtracted at x. Autograd through torch.diff builds a zero tensor and a copy per slice:
    ~15 ms per NODEO iteration on its 3 mm IXI grid against ~5 ms (one CPU thread, 2026-12-02). The backward fills
    one output in place (no zero tensor, no scaled copy per axis) and the forward takes dot products: NODEO's whole
    optimisation on ixi-1 (60 + 80 iterations) took 0.94x the CPU time of the earlier form (medians of 4 runs
    each, interleaved in one process, 2026-12-03, one thread of the 2-core Intel Xeon box)."""

    @staticmethod
    def forward(ctx, field: torch.Tensor) -> torch.Tensor:
        diffs = [torch.diff(field, dim=a) for a in (2, 3, 4)]
        ctx.save_for_backward(*diffs)
        return sum(torch.dot(d.reshape(-1), d.reshape(-1)) / d.numel() for d in diffs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        d0, d1, d2 = ctx.saved_tensors
        n = d0.shape[2]
        out = torch.empty(d0.shape[:2] + (n + 1,) + d0.shape[3:], dtype=d0.dtype, device=d0.device)
        out.narrow(2, 0, 1).zero_()
        out.narrow(2, 1, n).copy_(d0)
        out.narrow(2, 0, n).sub_(d0)                      # d0[i − 1] − d0[i], zero outside
        out.mul_(2.0 / d0.numel())
        for a, d in ((3, d1), (4, d2)):
            n, c = d.shape[a], 2.0 / d.numel()
            out.narrow(a, 1, n).add_(d, alpha=c)
            out.narrow(a, 0, n).sub_(d, alpha=c)
        return out.mul_(grad)


def gradient_l2(field: torch.Tensor) -> torch.Tensor:
    """Σ over the 3 axes of mean((u(x+e_a) − u(x))²) (diffusion regulariser; NODEO's L_smt)."""
    if min(field.shape[2:]) < 2:        # an axis without a difference: the plain form (mean of nothing)
        return sum(torch.diff(field, dim=a).pow(2).mean() for a in (2, 3, 4))
    return _GradientL2.apply(field)


def jacobian_penalty(disp_vox: torch.Tensor, threshold: float = 0.5, squared: bool = True) -> torch.Tensor:
    """Penalty on small / negative Jacobian determinants (forward differences).

    squared=True, threshold=0.5: NODEO's mean(ReLU(0.5 − det)²). squared=False, threshold=0: R2Net's mean(ReLU(−det)).

    On the CPU the determinant is computed once without a graph, and the gradient is formed only at the voxels under
    ``threshold`` (``_SparseJacobianHinge``): the hinge is zero elsewhere. A NODEO field on its 3 mm IXI grid has
    from a hundred to tens of thousands of such voxels out of ~370 000; with 28 355 (ixi-1 after 60 + 40
    iterations) this form took 12–17 ms forward + backward against 41 ms for autograd through the dense 3×3
    determinant plus ~7 ms for the check that preceded it (2026-12-03, one thread of the 2-core Intel Xeon box).
    A field with none gets its 0 without a graph. On a GPU the dense form is kept (finding the voxels would wait
    for the device).
    """
    if disp_vox.requires_grad and disp_vox.device.type == "cpu":
        with torch.no_grad():
            det = jacobian_det(disp_vox, mode="forward")
            if not bool((det < threshold).any()):
                return disp_vox.new_zeros(())
        return _SparseJacobianHinge.apply(disp_vox, det, float(threshold), bool(squared))
    hinge = F.relu(threshold - jacobian_det(disp_vox, mode="forward"))
    return (hinge * hinge).mean() if squared else hinge.mean()


class _SparseJacobianHinge(torch.autograd.Function):
    """mean(h²) (``squared``) or mean(h), h = ReLU(threshold − det(I + ∇u)) with forward differences, from the
    determinant ``det`` (B, D−1, H−1, W−1) already computed from u (no graph); the backward pass visits only the
    voxels with h > 0. There ∂det/∂(∂u_a/∂x_b) is the cofactor C_ab of A = I + ∇u, and ∂u_a/∂x_b at voxel p is
    u_a(p + e_b) − u_a(p), so C_ab·∂L/∂det is added to u_a at p + e_b and subtracted at p. The same value and,
    to float32 round-off, the same gradient as autograd through ``jacobian_det`` (Testing/engine/test_r2net_net.py)."""

    @staticmethod
    def forward(ctx, disp_vox: torch.Tensor, det: torch.Tensor, threshold: float, squared: bool) -> torch.Tensor:
        hinge = F.relu(threshold - det)
        n, k, j, i = torch.nonzero(hinge > 0, as_tuple=True)             # the active voxels (batch, k, j, i)
        _, _, d, h, w = disp_vox.shape
        # flat index of u_0 at each active voxel p; channel a is a·D·H·W further, p + e_(k, j, i) is H·W, W, 1
        ctx.p = ((n * 3 * d + k) * h + j) * w + i
        ctx.strides = (d * h * w, (h * w, w, 1))
        ctx.squared, ctx.count = squared, det.numel()
        ctx.save_for_backward(disp_vox, hinge[n, k, j, i])
        return (hinge * hinge).mean() if squared else hinge.mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        u, h = ctx.saved_tensors
        flat, p = u.reshape(-1), ctx.p
        channel, steps = ctx.strides
        # dL/d det at the active voxels (det < threshold there, so h > 0 and the hinge is differentiable)
        g_det = (-2.0 * h if ctx.squared else -torch.ones_like(h)) * (grad / ctx.count)
        # A_ab = δ_ab + ∂u_a/∂x_b = δ_ab + u_a(p + e_b) − u_a(p)
        base = [flat[p + a * channel] for a in range(3)]
        A = [[flat[p + a * channel + steps[b]] - base[a] + (1.0 if a == b else 0.0) for b in range(3)]
             for a in range(3)]
        out = torch.zeros(u.numel(), dtype=u.dtype, device=u.device)
        for a in range(3):
            for b in range(3):
                cof = (A[(a + 1) % 3][(b + 1) % 3] * A[(a + 2) % 3][(b + 2) % 3]
                       - A[(a + 1) % 3][(b + 2) % 3] * A[(a + 2) % 3][(b + 1) % 3])       # C_ab
                c = cof * g_det
                out.index_add_(0, p + a * channel + steps[b], c)
                out.index_add_(0, p + a * channel, -c)
        return out.view(u.shape), None, None, None
