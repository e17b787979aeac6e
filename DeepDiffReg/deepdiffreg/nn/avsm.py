"""AVSM (Shen et al., CVPR 2019): a recurrent multi-step affine network, a momentum U-Net, multi-Gaussian
momentum-to-velocity smoothing and a map-based vSVF integrator, self-iterable.

Spec: shared docs/methods/seeds-spnet-avsm.md, Part B (B.3.1–B.3.5, B.10). Frames: (B, C, D, H, W) tensors; an affine
(A, b) acts on *normalised* coordinates of the target (fixed) grid, x ∈ [−1, 1] per array axis with
align_corners=True (−1 and 1 are the centres of the first and last voxel; easyreg's new grid, B.10.8), component c
along array axis c; maps are pull maps on the target grid (the source is sampled at Φ⁻¹(x)); displacements are
voxels of their grid, channel c along array axis c.

Choices, each stated in the spec as open or as a recommendation:
- the affine net predicts A = I + ΔA (the last FC starts at zero, so the first estimate is the identity; B.3.1 [I]);
- its head pools the last feature map adaptively to the released code's 3×6×6 (432 features), so the parameter count
  stays the code's while any input size works (the code's FC is tied to 80×192×192, B.10.10);
- the multi-step update is Eq. 1 as written, A_t = Ã_t·A_{t−1}, b_t = Ã_t·b_{t−1} + b̃_t (B.10.1);
- the multi-Gaussian kernel is applied by FFT (periodic boundaries, as mermaid), σ in [0, 1]-per-axis units;
- the map is advected with RK4, 10 steps, central differences (mermaid ``AdvectMap``) on the ½-resolution grid.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..field import warp

SIGMAS = (0.05, 0.10, 0.15, 0.20, 0.25)           # multi-Gaussian σ, units where the image spans [0, 1] per axis
WEIGHTS = tuple(s / sum(SIGMAS) for s in SIGMAS)  # 0.067 … 0.333
MOMENTUM_CH = (16, 32, 64, 128, 256)


# ------------------------------------------------------------------------------------------------------------------
# affine stage

class AffineNet(nn.Module):
    """(warped source, target) → (Ã (B, 3, 3), b̃ (B, 3)), normalised coordinates. The released ``Affine_unet_im``."""

    def __init__(self):
        super().__init__()
        relu = nn.ReLU()
        self.siamese = nn.Sequential(nn.Conv3d(1, 16, 3, padding=1), relu)
        c = lambda i, o, s=1: [nn.Conv3d(i, o, 3, stride=s, padding=1), nn.ReLU()]   # noqa: E731
        self.body = nn.Sequential(nn.MaxPool3d(2), *c(32, 32), *c(32, 32, 2), *c(32, 32), nn.MaxPool3d(2),
                                  *c(32, 32), *c(32, 16, 2), *c(16, 16), *c(16, 4, 2))
        self.pool = nn.AdaptiveAvgPool3d((3, 6, 6))
        self.fc1 = nn.Linear(432, 32)
        self.fc2 = nn.Linear(32, 12)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.siamese(moving), self.siamese(fixed)], dim=1)
        x = self.pool(self.body(x)).flatten(1)
        p = self.fc2(F.relu(self.fc1(x))).view(-1, 4, 3)
        eye = torch.eye(3, dtype=p.dtype, device=p.device)
        return eye + p[:, :3, :], p[:, 3, :]


def normalised_grid(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """(1, 3, D, H, W) identity in normalised coordinates, component c along array axis c."""
    axes = [torch.linspace(-1, 1, n, dtype=like.dtype, device=like.device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), 0)[None]


def _to_vox(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([(n - 1) / 2.0 for n in shape], dtype=like.dtype, device=like.device).view(1, 3, 1, 1, 1)


def affine_disp_vox(A: torch.Tensor, b: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Voxel displacement (B, 3, D, H, W) of the pull map x ↦ A x + b on a grid of ``shape``."""
    x = normalised_grid(shape, A)
    y = torch.einsum("brc,bcdhw->brdhw", A, x.expand(A.shape[0], -1, -1, -1, -1)) + b.view(-1, 3, 1, 1, 1)
    return (y - x) * _to_vox(shape, A)


def multi_step_affine(net: AffineNet, moving: torch.Tensor, fixed: torch.Tensor, steps: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1: A_t = Ã_t A_{t−1}, b_t = Ã_t b_{t−1} + b̃_t from A_0 = I, b_0 = 0; at each step the ORIGINAL source is
    warped by the current map (interpolation error does not accumulate)."""
    n = fixed.shape[0]
    A = torch.eye(3, dtype=fixed.dtype, device=fixed.device).expand(n, 3, 3)
    b = fixed.new_zeros(n, 3)
    shape = tuple(fixed.shape[2:])
    for _ in range(int(steps)):
        warped = warp(moving, affine_disp_vox(A, b, shape))
        At, bt = net(warped, fixed)
        A, b = At @ A, (At @ b.unsqueeze(-1)).squeeze(-1) + bt
    return A, b


# ------------------------------------------------------------------------------------------------------------------
# momentum network

class _Level(nn.Module):
    """A stride-2 conv then ``n_res`` convs whose outputs are each added to the first conv's output (the code's
    residual links, ``+d2_1`` twice)."""

    def __init__(self, cin: int, cout: int, n_res: int, stride: int = 2):
        super().__init__()
        self.first = nn.Conv3d(cin, cout, 3, stride=stride, padding=1)
        self.res = nn.ModuleList([nn.Conv3d(cout, cout, 3, padding=1) for _ in range(n_res)])

    def forward(self, x):
        first = F.relu(self.first(x))
        x = first
        for conv in self.res:
            x = F.relu(conv(x)) + first
        return x


class MomentumUNet(nn.Module):
    """[warped source, target] (B, 2, D, H, W) → vector momentum m₀ (B, 3, D/2, H/2, W/2), the released
    ``MomentumGen_resid`` (V-Net-like, last decoder level removed, no activation on the last two convs).
    ``ch`` scales the widths (the code: 16, 32, 64, 128, 256 ≈ 5.9 M parameters)."""

    def __init__(self, ch: Sequence[int] = MOMENTUM_CH):
        super().__init__()
        c1, c2, c4, c8, c16 = ch
        self.enc1 = nn.Conv3d(2, c1, 3, padding=1)
        self.enc2, self.enc4, self.enc8 = _Level(c1, c2, 2), _Level(c2, c4, 2), _Level(c4, c8, 2)
        self.enc16 = _Level(c8, c16, 1)
        self.up8, self.dec8a, self.dec8b = nn.ConvTranspose3d(c16, c8, 2, 2), nn.Conv3d(2 * c8, c8, 3, padding=1), \
            nn.Conv3d(c8, c8, 3, padding=1)
        self.up4, self.dec4a, self.dec4b = nn.ConvTranspose3d(c8, c4, 2, 2), nn.Conv3d(2 * c4, c2, 3, padding=1), \
            nn.Conv3d(c2, c2, 3, padding=1)
        self.up2, self.dec2a, self.dec2b = nn.ConvTranspose3d(c2, c2, 2, 2), nn.Conv3d(2 * c2, c1, 3, padding=1), \
            nn.Conv3d(c1, 3, 3, padding=1)
        nn.init.zeros_(self.dec2b.weight)      # start from zero momentum: the identity deformation
        nn.init.zeros_(self.dec2b.bias)

    size_multiple = 16

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        lrelu = F.leaky_relu
        e1 = F.relu(self.enc1(torch.cat([moving, fixed], 1)))
        e2 = self.enc2(e1)
        e4 = self.enc4(e2)
        e8 = self.enc8(e4)
        x = self.enc16(e8)
        x = lrelu(self.up8(x))
        x = lrelu(self.dec8a(torch.cat([x, e8], 1)))
        x = lrelu(self.dec8b(x)) + x
        x = lrelu(self.up4(x))
        x = lrelu(self.dec4a(torch.cat([x, e4], 1)))
        x = lrelu(self.dec4b(x)) + x
        x = lrelu(self.up2(x))
        x = self.dec2a(torch.cat([x, e2], 1))
        return self.dec2b(x)


# ------------------------------------------------------------------------------------------------------------------
# vSVF: momentum → velocity → map

def multi_gaussian_smooth(m: torch.Tensor, sigmas: Sequence[float] = SIGMAS,
                          weights: Sequence[float] = WEIGHTS) -> torch.Tensor:
    """v₀ = K ⋆ m₀ with K = Σ w_i G_{σ_i}, each Gaussian normalised to sum 1 on the grid, σ in [0, 1]-per-axis
    units (σ_vox = σ·(n − 1) along an axis of n voxels), by FFT (periodic boundaries, as mermaid)."""
    shape = m.shape[2:]
    kernel = m.new_zeros(shape)
    coords = [torch.fft.fftfreq(n, d=1.0 / n, device=m.device).to(m.dtype) for n in shape]   # signed voxel offsets
    grids = torch.meshgrid(*coords, indexing="ij")
    for s, w in zip(sigmas, weights):
        g = torch.ones_like(kernel)
        for axis, x in enumerate(grids):
            sv = max(s * (shape[axis] - 1), 1e-6)
            g = g * torch.exp(-0.5 * (x / sv) ** 2)
        kernel = kernel + w * g / g.sum()
    k_hat = torch.fft.rfftn(kernel)
    return torch.fft.irfftn(torch.fft.rfftn(m, dim=(2, 3, 4)) * k_hat, s=tuple(shape), dim=(2, 3, 4))


def _central_gradient(u: torch.Tensor) -> list[torch.Tensor]:
    """∂u/∂x_a for a = 0, 1, 2 (voxel units), central inside, one-sided at the border; each (B, C, D, H, W)."""
    return list(torch.gradient(u, dim=(2, 3, 4)))


def advect_map(disp0: torch.Tensor, v: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """Solve ∂Φ⁻¹/∂t + DΦ⁻¹·v = 0 for t ∈ [0, 1] from Φ⁻¹(0) = id + disp0 (RK4, ``steps`` steps), on v's grid.
    With d = Φ⁻¹ − id: ∂d/∂t = −v − Dd·v. Returns d(1) (B, 3, D, H, W), voxels; Φ⁻¹(1) = Φ⁻¹(0) ∘ ψ⁻¹."""
    dt = 1.0 / int(steps)

    def rhs(d):
        g = _central_gradient(d)
        return -v - sum(g[a] * v[:, a:a + 1] for a in range(3))

    d = disp0
    for _ in range(int(steps)):
        k1 = rhs(d)
        k2 = rhs(d + 0.5 * dt * k1)
        k3 = rhs(d + 0.5 * dt * k2)
        k4 = rhs(d + dt * k3)
        d = d + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    return d


def resize_disp_to(u: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Trilinear (align_corners=True) resize of a voxel displacement, values rescaled to the new grid's voxels."""
    src = u.shape[2:]
    out = F.interpolate(u, size=tuple(shape), mode="trilinear", align_corners=True)
    scale = torch.tensor([(n - 1) / max(s - 1, 1) for n, s in zip(shape, src)], dtype=u.dtype, device=u.device)
    return out * scale.view(1, 3, 1, 1, 1)


def vsvf_step(momentum_net: MomentumUNet, moving: torch.Tensor, fixed: torch.Tensor, disp: torch.Tensor,
              time_steps: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One self-iteration: m₀ from [source warped by the current map, target], v₀ = K ⋆ m₀ on the ½ grid, the
    current map advected there and upsampled. Returns (new full-resolution displacement, m₀, v₀)."""
    shape = tuple(fixed.shape[2:])
    m0 = momentum_net(warp(moving, disp), fixed)
    v0 = multi_gaussian_smooth(m0)
    half = tuple(m0.shape[2:])
    d_half = advect_map(resize_disp_to(disp, half), v0, time_steps)
    return resize_disp_to(d_half, shape), m0, v0
