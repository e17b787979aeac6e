"""AVSM's network pieces (nn/avsm.py) against the spec (shared docs, seeds-spnet-avsm.md Part B)."""
from __future__ import annotations

import torch

from deepdiffreg.nn.avsm import (AffineNet, MomentumUNet, advect_map, affine_disp_vox, multi_gaussian_smooth,
                                 multi_step_affine, vsvf_step)


def test_parameter_counts_match_the_code():
    # spec B.3.1: affine net ≈ 0.148 M; B.3.2: momentum net ≈ 5.94 M
    assert sum(p.numel() for p in AffineNet().parameters()) == 147_920
    assert abs(sum(p.numel() for p in MomentumUNet().parameters()) - 5.94e6) < 0.01e6


class _Fixed(torch.nn.Module):
    """An 'affine network' that always answers the same increment (Ã, b̃)."""
    def __init__(self, A, b):
        super().__init__()
        self.A, self.b = A, b

    def forward(self, moving, fixed):
        return self.A[None], self.b[None]


def test_multi_step_composition_follows_eq_1():
    At = torch.tensor([[1.1, 0.05, 0.0], [0.0, 0.9, 0.1], [0.02, 0.0, 1.0]])
    bt = torch.tensor([0.1, -0.05, 0.02])
    x = torch.rand(1, 1, 8, 8, 8)
    A, b = multi_step_affine(_Fixed(At, bt), x, x, steps=3)
    A_ref, b_ref = torch.eye(3), torch.zeros(3)
    for _ in range(3):                      # A_t = Ã A_{t−1}, b_t = Ã b_{t−1} + b̃ (not A_{t−1} Ã)
        A_ref, b_ref = At @ A_ref, At @ b_ref + bt
    assert torch.allclose(A[0], A_ref, atol=1e-6) and torch.allclose(b[0], b_ref, atol=1e-6)
    assert not torch.allclose(A_ref, torch.linalg.matrix_power(At, 2) @ At.T, atol=1e-3)  # the order matters


def test_affine_displacement_is_in_voxels_of_its_grid():
    shape = (9, 17, 5)
    b = torch.tensor([[0.5, -0.25, 1.0]])
    u = affine_disp_vox(torch.eye(3)[None], b, shape)
    for c, n in enumerate(shape):           # a normalised shift s is s·(n − 1)/2 voxels
        assert torch.allclose(u[:, c], torch.full_like(u[:, c], float(b[0, c]) * (n - 1) / 2))
    A = torch.diag(torch.tensor([2.0, 1.0, 1.0]))[None]
    u = affine_disp_vox(A, torch.zeros(1, 3), shape)
    k = torch.arange(9.0) - 4.0             # scaling about the centre: u = x in voxels from the centre
    assert torch.allclose(u[0, 0, :, 0, 0], k, atol=1e-5)


def test_identity_input_gives_the_identity():
    x = torch.rand(1, 1, 32, 32, 32)
    A, b = multi_step_affine(AffineNet(), x, x, steps=7)
    assert torch.allclose(A, torch.eye(3)[None]) and torch.allclose(b, torch.zeros(1, 3))
    d, m0, v0 = vsvf_step(MomentumUNet(), x, x, torch.zeros(1, 3, 32, 32, 32))
    assert m0.shape == (1, 3, 16, 16, 16) and float(d.detach().abs().max()) == 0.0


def test_multi_gaussian_kernel_preserves_mass_and_constants():
    z = torch.zeros(1, 3, 16, 20, 12)
    z[0, 1, 8, 10, 6] = 1.0
    v = multi_gaussian_smooth(z)
    assert torch.isclose(v.sum(), torch.tensor(1.0), atol=1e-5) and float(v[0, 0].abs().max()) < 1e-6
    assert float(v[0, 1, 8, 10, 6]) == float(v[0, 1].max())          # centred where the impulse was
    c = torch.full((1, 3, 10, 10, 10), 2.5)
    assert torch.allclose(multi_gaussian_smooth(c), c, atol=1e-5)


def test_advecting_a_linear_map_by_a_constant_velocity_is_exact():
    # Φ⁻¹(1) = Φ⁻¹(0) ∘ ψ⁻¹ with ψ(x) = x + v: for Φ⁻¹(0)(x) = A x + b, Φ⁻¹(1)(x) = A(x − v) + b
    shape = (10, 12, 14)
    A = torch.tensor([[1.05, 0.02, 0.0], [0.0, 0.95, 0.03], [0.01, 0.0, 1.02]])[None]
    b = torch.tensor([[0.05, -0.02, 0.1]])
    d0 = affine_disp_vox(A, b, shape)
    v = torch.tensor([0.7, -0.4, 1.1]).view(1, 3, 1, 1, 1).expand(1, 3, *shape).contiguous()
    d1 = advect_map(d0, v, steps=10)
    S = torch.diag(torch.tensor([(n - 1) / 2 for n in shape]))
    A_vox = S @ A[0] @ torch.linalg.inv(S)      # the same map in voxel coordinates of the grid
    assert torch.allclose(d1, d0 - torch.einsum("rc,bcdhw->brdhw", A_vox, v), atol=1e-4)
