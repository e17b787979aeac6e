"""Remove the few folds a displacement field has, changing it only around them.

A learned integrator (R2Net's LC blocks) does not guarantee det ∇φ > 0 the way scaling and squaring of a smooth
velocity nearly does: on real pairs a trained R2Net leaves a few hundred isolated folded voxels (0.02–0.06 % of a
2 mm brain, docs/r2net.md). A clinician asked for a fold-free, invertible transform; this makes it one with the
smallest local change we know how to make: where det(I + ∇u) < ``min_det``, and in a ``radius``-voxel shell around
those voxels, u is replaced by its 3×3×3 local mean, and that is repeated until no voxel is below ``min_det`` (the
shell grows by one voxel every ``grow_every`` rounds, for folds that one shell cannot smooth out). Voxels far from
every fold keep their value bit for bit, and a field without folds is returned unchanged (the same tensor).

The rounds run on boxes around the folds, not on the whole field, so a CT-sized field (78 M voxels) with folds in a
few places costs what those places cost: the grid is cut into ``TILE``³ tiles, the tiles holding a voxel below
``min_det`` are grown by ``HALO_TILES`` tiles, and each connected group of grown tiles is one box. A box's faces
are then at least ``TILE·HALO_TILES`` voxels from its folds (more than the largest shell reaches), except where
they are the grid's own faces; voxels next to a face that is not the grid's are never counted as folded (their
differences there are one-sided), and every box ends when its own folds are gone. One full-field determinant
before and one after (by slabs, so a CT-sized field's nine derivative fields never exist at once) give the counts.

Frames: (B, 3, D, H, W) in voxel units of its grid, channel c along array axis c (the ``field`` convention); the
determinant is ``jacobian_det``'s central differences, the same as the pipeline's Jacobian map, and it does not
depend on the voxel size (docs in field/jacobian.py).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .jacobian import jacobian_det, jacobian_det_slabs

TILE = 8          # voxels per tile side when finding the boxes
HALO_TILES = 2    # tiles added around each folded tile: a box face is >= 16 voxels from its folds


def unfold(disp_vox: torch.Tensor, min_det: float = 0.05, max_rounds: int = 100, radius: int = 1,
           grow_every: int = 25) -> tuple[torch.Tensor, dict[str, Any]]:
    """(field, info): ``disp_vox`` with every voxel's det(I + ∇u) ≥ ``min_det`` where that was reached in
    ``max_rounds`` rounds of local averaging per box (see the module docstring), and info (JSON-able): folded voxels
    (det ≤ 0) before and after, voxels below ``min_det`` before and after, boxes, the most rounds a box took, voxels
    changed and the largest change (voxels). The input is not modified."""
    if disp_vox.dim() != 5 or disp_vox.shape[1] != 3:
        raise ValueError(f"unfold(): expected a (B, 3, D, H, W) displacement, got {tuple(disp_vox.shape)}")
    if radius + (max_rounds - 1) // grow_every + 1 >= TILE * HALO_TILES:
        raise ValueError("unfold(): the shell would reach a box face; lower max_rounds or raise grow_every")
    det = _det_by_slabs(disp_vox)
    info: dict[str, Any] = {"min_det": float(min_det), "folded_before": int((det <= 0).sum()),
                            "below_min_before": int((det < min_det).sum())}
    bad = det < min_det                                   # (B, D, H, W)
    if not bool(bad.any()):
        info.update(boxes=0, rounds=0, folded_after=info["folded_before"], below_min_after=0, voxels_changed=0,
                    max_change_vox=0.0)
        return disp_vox, info
    u = disp_vox.clone()
    boxes = [(b, box) for b in range(u.shape[0]) for box in _boxes(bad[b])]
    rounds = 0
    for b, box in boxes:
        sub = u[b:b + 1, :, box[0], box[1], box[2]]
        inner = _inner_mask(box, tuple(u.shape[2:]), sub.device)
        new, n = _unfold_box(sub, min_det, max_rounds, radius, grow_every, inner)
        u[b:b + 1, :, box[0], box[1], box[2]] = new
        rounds = max(rounds, n)
    # counted once every box is done: boxes may overlap, and a later box may change an earlier one's voxels
    changed = torch.zeros((u.shape[0],) + tuple(u.shape[2:]), dtype=torch.bool, device=u.device)
    max_change = 0.0
    for b, box in boxes:
        diff = (u[b, :, box[0], box[1], box[2]] - disp_vox[b, :, box[0], box[1], box[2]]).norm(dim=0)
        changed[b, box[0], box[1], box[2]] |= diff > 0
        max_change = max(max_change, float(diff.max()))
    det = _det_by_slabs(u)
    info.update(boxes=len(boxes), rounds=rounds, folded_after=int((det <= 0).sum()),
                below_min_after=int((det < min_det).sum()), voxels_changed=int(changed.sum()),
                max_change_vox=max_change)
    return u, info


def _det_by_slabs(u: torch.Tensor, slab: int = 32) -> torch.Tensor:
    """``jacobian_det(u)`` (B, D, H, W) by ``jacobian_det_slabs`` (the same numbers), so the nine derivative fields
    of a CT-sized grid never exist at once. A one-plane grid is refused by ``jacobian_det`` as before."""
    return jacobian_det_slabs(lambda lo, hi: u[:, :, lo:hi], u.shape[2], slab)


def _unfold_box(u: torch.Tensor, min_det: float, max_rounds: int, radius: int, grow_every: int,
                inner: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The rounds on one box (1, 3, d, h, w); ``inner`` (d, h, w) bool: where the box's determinant is the
    field's (not on a face that is not the grid's)."""
    rounds = 0
    det = jacobian_det(u)
    while rounds < max_rounds:
        bad = ((det < min_det) & inner)[:, None]
        if not bool(bad.any()):
            break
        r = radius + rounds // grow_every
        region = F.max_pool3d(bad.to(u.dtype), 2 * r + 1, stride=1, padding=r) > 0
        mean = F.avg_pool3d(u, 3, stride=1, padding=1, count_include_pad=False)
        u = torch.where(region, mean, u)
        det = jacobian_det(u)
        rounds += 1
    return u, rounds


def _boxes(bad: torch.Tensor) -> list[tuple[slice, slice, slice]]:
    """Boxes (voxel slices) around the connected groups of folded tiles grown by HALO_TILES (26-connected)."""
    shape = tuple(bad.shape)
    n_t = [-(-s // TILE) for s in shape]
    pad = [nt * TILE - s for nt, s in zip(n_t, shape)]
    padded = F.pad(bad.to(torch.float32)[None, None], (0, pad[2], 0, pad[1], 0, pad[0]))
    tiles = F.max_pool3d(padded, TILE) > 0                              # (1, 1, tD, tH, tW)
    grown = (F.max_pool3d(tiles.float(), 2 * HALO_TILES + 1, stride=1, padding=HALO_TILES) > 0)[0, 0]
    todo = {tuple(t) for t in grown.nonzero().tolist()}
    boxes = []
    while todo:                                                         # flood fill over the (few) grown tiles
        stack = [todo.pop()]
        lo, hi = list(stack[0]), list(stack[0])
        while stack:
            t = stack.pop()
            for a in range(3):
                lo[a], hi[a] = min(lo[a], t[a]), max(hi[a], t[a])
            for dz in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        nb = (t[0] + dz, t[1] + dy, t[2] + dx)
                        if nb in todo:
                            todo.remove(nb)
                            stack.append(nb)
        boxes.append(tuple(slice(lo[a] * TILE, min((hi[a] + 1) * TILE, shape[a])) for a in range(3)))
    return sorted(boxes, key=lambda s: (s[0].start, s[1].start, s[2].start))


def _inner_mask(box, shape, device) -> torch.Tensor:
    """(d, h, w) bool: False on each box face that is not a face of the grid."""
    m = torch.ones(tuple(s.stop - s.start for s in box), dtype=torch.bool, device=device)
    for a, s in enumerate(box):
        idx = [slice(None)] * 3
        if s.start > 0:
            idx[a] = slice(0, 1)
            m[tuple(idx)] = False
        if s.stop < shape[a]:
            idx[a] = slice(-1, None)
            m[tuple(idx)] = False
    return m
