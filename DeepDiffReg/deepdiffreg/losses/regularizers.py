"""Regularisers on voxel displacement / velocity fields (B, 3, D, H, W)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..field.jacobian import jacobian_det


def gradient_l2(field: torch.Tensor) -> torch.Tensor:
    """Σ over the 3 axes of mean((u(x+e_a) − u(x))²) (diffusion regulariser; NODEO's L_smt)."""
    return sum(torch.diff(field, dim=a).pow(2).mean() for a in (2, 3, 4))


def jacobian_penalty(disp_vox: torch.Tensor, threshold: float = 0.5, squared: bool = True) -> torch.Tensor:
    """Penalty on small / negative Jacobian determinants (forward differences).

    squared=True, threshold=0.5: NODEO's mean(ReLU(0.5 − det)²). squared=False, threshold=0: R2Net's mean(ReLU(−det)).
    """
    hinge = F.relu(threshold - jacobian_det(disp_vox, mode="forward"))
    return (hinge * hinge).mean() if squared else hinge.mean()
