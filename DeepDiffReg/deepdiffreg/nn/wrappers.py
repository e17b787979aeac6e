"""Registration wrappers any learned method composes instead of copying code (after ICON's network_wrappers).

A *registration module* is any callable ``module(moving, fixed) -> Deformation`` on one grid (the network grid):
moving, fixed (B, 1, D, H, W); the deformation φ maps fixed-grid points to moving-grid points, moving(φ(x)) ≈
fixed(x) (pull direction, as everywhere in the engine). A ``Deformation`` is lazy: ``disp(shape)`` samples its
displacement on any grid of ``shape`` spanning the same box (voxel units of that grid, channel c along axis c),
``inverse()`` is its inverse deformation when it has one for free (None otherwise).

Deformations:
- ``SVF(v, steps)``: φ = exp(v), v a stationary velocity on its own (e.g. ½-resolution) grid, integrated by scaling
  and squaring there and resized where it is sampled; the free inverse is exp(−v) (``SVF.inverse``).
- ``Displacement(u, inverse_u)``: a displacement the network returns directly (e.g. a learned integrator); the
  inverse only when the network gives one. ``WithInverse(forward, backward)``: any deformation with the inverse the
  network computed for it (a forward + backward net; an NSVF integrated both ways).
- ``Composed(parts, grid)``: φ = parts[0] ∘ parts[1] ∘ … (the last part is applied first to a point), composed on
  ``grid`` and then resized; inverse = parts[-1]⁻¹ ∘ … ∘ parts[0]⁻¹.

Wrappers (each takes a module and returns one; they nest):
- ``Cascade([m1, …, mK])``: stage k registers the moving image warped by stages 1..k−1 (one interpolation of the
  original), φ = φ1 ∘ … ∘ φK. Multi-scale / pyramid nets are a cascade whose stages run on coarser grids (the
  parts' own grids; they are resized onto the cascade's grid when composed).
- ``Deeper(stages, n, accept)``: a trained cascade run deeper at inference — its last stage up to n more times, each
  pass kept only if ``accept`` says the images agree better with it (a "do no harm" check).
- ``Symmetric(m)``: for SVF modules, v = ½(v(m, f) − v(f, m)): the forward estimate averaged with the inverse of the
  swapped pair's; registering the swapped pair then gives exactly the inverse.
- ``Refine(m, loss, steps, lr)``: test-time optimisation of the prediction's free parameter (an SVF's velocity, a
  displacement) with ``loss(deformation, moving, fixed)``, starting from the network's output (methods/refine.py).
  Inside a cascade it refines the stage it wraps given the earlier ones.
- ``zero_svf_stage(factor)``: a stage that predicts the identity, exp(0) on a 1/factor grid; in a ``Refine`` at the
  end of a cascade it is a test-time correction on top of the trained stages, optimised from zero (a method whose
  own parameter is expensive to refine through, e.g. a learned integrator, still gets a cheap refinement).
- ``OnNetGrid(m, multiple)``: runs a module on the network grid of a ``PairOnGrid`` (nn/grid.py: LPS canonical
  axes, sizes a multiple of ``multiple``) and maps fields and scalar maps back to the working grid.

The wrappers are plain callables, not ``nn.Module``s: the networks own the weights (and their ``state_dict`` layout);
the wrappers only say how they are run, so the same weights can run forward-only, symmetric or refined. Nothing is
left on ``self`` by a call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..field import compose, integrate_ss, resize_disp, warp
from .grid import NetGrid

Module = Callable[[torch.Tensor, torch.Tensor], "Deformation"]


class Deformation:
    """See the module docstring. ``info``: facts for report.json (e.g. what refinement did)."""
    info: dict[str, Any]

    def disp(self, shape) -> torch.Tensor:
        raise NotImplementedError

    def inverse(self) -> "Deformation | None":
        return None


class SVF(Deformation):
    """φ = exp(v). ``velocity``: (B, 3, *grid) in voxels of its own grid; ``extras``: what the network returned
    besides (e.g. {"logvar": ...}); exp(v) is integrated once and cached."""

    velocity_param = True          # ``Symmetric`` may average the parameter with the swapped pair's negated one

    def __init__(self, velocity: torch.Tensor, steps: int = 7, extras: dict[str, torch.Tensor] | None = None,
                 info: dict[str, Any] | None = None):
        self.velocity, self.steps = velocity, int(steps)
        self.extras, self.info = dict(extras or {}), dict(info or {})
        self._exp: torch.Tensor | None = None

    @property
    def param(self) -> torch.Tensor:
        return self.velocity

    def with_param(self, velocity: torch.Tensor) -> "SVF":
        return SVF(velocity, self.steps, self.extras, self.info)

    def exp(self) -> torch.Tensor:
        """Displacement of exp(v) on the velocity's own grid."""
        if self._exp is None:
            self._exp = integrate_ss(self.velocity, self.steps)
        return self._exp

    def disp(self, shape) -> torch.Tensor:
        return resize_disp(self.exp(), tuple(shape))

    def inverse(self) -> "SVF":
        return SVF(-self.velocity, self.steps, info=self.info)


class Displacement(Deformation):
    """φ = id + u with u given; ``inverse_disp``: its inverse's displacement on the same grid, if the net has one."""

    def __init__(self, disp: torch.Tensor, inverse_disp: torch.Tensor | None = None,
                 info: dict[str, Any] | None = None):
        self.u, self.inverse_u, self.info = disp, inverse_disp, dict(info or {})

    @property
    def param(self) -> torch.Tensor:
        return self.u

    def with_param(self, disp: torch.Tensor) -> "Displacement":
        return Displacement(disp, None, self.info)      # a refined field no longer matches the net's inverse

    def disp(self, shape) -> torch.Tensor:
        return resize_disp(self.u, tuple(shape))

    def inverse(self) -> "Displacement | None":
        return None if self.inverse_u is None else Displacement(self.inverse_u, self.u, self.info)


class WithInverse(Deformation):
    """A deformation and the inverse a network gives with it (a forward + backward net, an NSVF integrated both
    ways): ``inverse()`` is ``backward``, not derived."""

    def __init__(self, forward: Deformation, backward: Deformation):
        self.forward, self.backward = forward, backward
        self.info = dict(forward.info)

    def disp(self, shape) -> torch.Tensor:
        return self.forward.disp(shape)

    def inverse(self) -> "WithInverse":
        return WithInverse(self.backward, self.forward)


class Composed(Deformation):
    """φ = parts[0] ∘ … ∘ parts[-1], composed on ``grid`` (left to right, as a cascade builds it) and resized to the
    shape asked for. One part: that part itself (no detour through ``grid``). ``stage_inputs``: for a cascade's
    result, the moving image each stage saw (on ``grid``)."""

    def __init__(self, parts: Sequence[Deformation], grid, stage_inputs: Sequence[torch.Tensor] = ()):
        if not parts:
            raise ValueError("Composed() needs at least one part")
        self.parts, self.grid, self.stage_inputs = list(parts), tuple(grid), list(stage_inputs)
        self.info: dict[str, Any] = {}
        for p in self.parts:
            self.info.update(p.info)
        self._on_grid: torch.Tensor | None = None

    def on_grid(self) -> torch.Tensor:
        """The composed displacement on ``grid`` (cached)."""
        if self._on_grid is None:
            acc = self.parts[0].disp(self.grid)
            for p in self.parts[1:]:
                acc = compose(acc, p.disp(self.grid))           # φ_so_far ∘ φ_k
            self._on_grid = acc
        return self._on_grid

    def disp(self, shape) -> torch.Tensor:
        if len(self.parts) == 1:
            return self.parts[0].disp(shape)
        return resize_disp(self.on_grid(), tuple(shape))

    def inverse(self) -> "Composed | None":
        inv = [p.inverse() for p in reversed(self.parts)]
        return None if any(i is None for i in inv) else Composed(inv, self.grid)


class Cascade:
    """Recursive cascade (Zhao et al., ICCV 2019): stage k sees the moving image warped by stages 1..k−1 composed
    on the fixed image's grid; returns their ``Composed`` (with ``stage_inputs``)."""

    def __init__(self, stages: Sequence[Module]):
        if not stages:
            raise ValueError("Cascade() needs at least one stage")
        self.stages = list(stages)

    def __call__(self, moving: torch.Tensor, fixed: torch.Tensor) -> Composed:
        grid = tuple(fixed.shape[2:])
        parts, inputs, acc, m = [], [], None, moving
        for stage in self.stages:
            inputs.append(m)
            d = stage(m, fixed)
            parts.append(d)
            if len(parts) < len(self.stages):               # the next stage's input: one warp of the original
                u = d.disp(grid)
                acc = u if acc is None else compose(acc, u)
                m = warp(moving, acc)
        return Composed(parts, grid, inputs)


class Deeper:
    """A recursive cascade run with up to ``extra`` more passes of its last stage: each pass registers the moving
    image warped by everything before it, so it corrects what the earlier passes left (Zhao et al., ICCV 2019, run
    their cascades deeper at test time than in training); φ stays a composition of the stages' own maps.

    ``accept(fixed, moving, before, after) -> (keep, facts)``: the pair as given and the moving image warped
    without and with the new pass; a pass that is not kept ends the deepening (the result is the cascade before it). None: every pass is kept, and
    the result is ``Cascade(stages + [stages[-1]] * extra)``'s, number for number. What was tried goes into the
    result's ``info["extra_passes"]``: {"asked", "kept", "checks": [facts of each pass tried]}."""

    def __init__(self, stages: Sequence[Module], extra: int,
                 accept: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[bool, dict]]
                 | None = None):
        if not stages or int(extra) < 0:
            raise ValueError(f"Deeper() needs at least one stage and extra >= 0, got {len(stages)}, {extra}")
        self.stages, self.extra, self.accept = list(stages), int(extra), accept

    def __call__(self, moving: torch.Tensor, fixed: torch.Tensor) -> Composed:
        phi = Cascade(self.stages)(moving, fixed)
        checks: list[dict] = []
        before = warp(moving, phi.on_grid()) if self.extra else None   # what a pass sees: one warp of the original
        for _ in range(self.extra):
            nxt = Composed(phi.parts + [self.stages[-1](before, fixed)], phi.grid, phi.stage_inputs + [before])
            after = warp(moving, nxt.on_grid())
            keep, facts = (True, {}) if self.accept is None else self.accept(fixed, moving, before, after)
            checks.append({**facts, "kept": bool(keep)})
            if not keep:
                break
            phi, before = nxt, after                             # the next pass sees what this one made
        phi.info["extra_passes"] = {"asked": self.extra, "kept": sum(c["kept"] for c in checks), "checks": checks}
        return phi


class Symmetric:
    """v = ½(v(m, f) − v(f, m)) for a module whose deformation is a function of a velocity-like parameter
    (``param``/``with_param`` and ``velocity_param = True``: an ``SVF``, where exp(−v) is the inverse, or a learned
    integrator of an initial velocity); not a plain displacement, whose negation is no inverse. Extras and info are
    the forward pass's."""

    def __init__(self, module: Module):
        self.module = module

    def __call__(self, moving: torch.Tensor, fixed: torch.Tensor) -> Deformation:
        fwd, back = self.module(moving, fixed), self.module(fixed, moving)
        if not (getattr(fwd, "velocity_param", False) and type(fwd) is type(back)):
            raise TypeError(f"Symmetric() wraps modules whose deformation has a velocity parameter, got "
                            f"{type(fwd).__name__}")
        return fwd.with_param(0.5 * (fwd.param - back.param))


class Refine:
    """Test-time refinement of a module's prediction: ``steps`` Adam steps (lr ``lr``, in the units of the
    parameter) on ``deformation.param`` minimising ``loss(deformation, moving, fixed)``; the lowest-loss parameter
    is kept (methods/refine.py). What it did goes into the deformation's ``info`` (refine_*). steps = 0: the
    module's output unchanged."""

    def __init__(self, module: Module, loss: Callable[[Deformation, torch.Tensor, torch.Tensor], torch.Tensor],
                 steps: int, lr: float, progress: Callable[[float, str], None] | None = None):
        self.module, self.loss, self.steps, self.lr, self.progress = module, loss, int(steps), float(lr), progress

    def __call__(self, moving: torch.Tensor, fixed: torch.Tensor) -> Deformation:
        from ..methods.refine import refine
        d = self.module(moving, fixed)
        if self.steps <= 0:
            return d
        if not hasattr(d, "with_param"):
            raise TypeError(f"Refine() needs a deformation with a free parameter, got {type(d).__name__}")
        p, info = refine(d.param, lambda q: self.loss(d.with_param(q), moving, fixed), self.steps, lr=self.lr,
                         progress=self.progress)
        out = d.with_param(p)
        out.info.update(info)
        return out


def zero_svf_stage(factor: int = 2, steps: int = 7) -> Module:
    """A module that predicts nothing: φ = exp(0), the velocity zeros (B, 3, ⌈D/f⌉, ⌈H/f⌉, ⌈W/f⌉) on a 1/``factor``
    grid of the fixed image's (``steps`` squarings when it is integrated). Wrapped in ``Refine`` and appended to a
    cascade, its velocity is optimised from the identity on the moving image the trained stages warped."""
    def stage(moving: torch.Tensor, fixed: torch.Tensor) -> SVF:
        shape = [max(1, -(-int(n) // int(factor))) for n in fixed.shape[2:]]
        return SVF(fixed.new_zeros((fixed.shape[0], 3, *shape)), steps)
    return stage


@dataclass
class NetResult:
    """What ``OnNetGrid`` returns: the deformation on the network grid, the grid mapping, and the pair as the
    network saw it (canonical axes, net grid)."""
    deformation: Deformation
    grid: NetGrid
    fixed: torch.Tensor
    moving: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def disp_vox(self) -> torch.Tensor:
        """(1, 3, *working grid) displacement in working-grid voxels, working array order."""
        return self.grid.disp_to_work(self.deformation.disp(self.grid.shape))

    def inverse_disp_vox(self) -> torch.Tensor | None:
        inv = self.deformation.inverse()
        return None if inv is None else self.grid.disp_to_work(inv.disp(self.grid.shape))

    def scalar_to_work(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid.scalar_to_work(x)


class OnNetGrid:
    """Run ``module`` on the network grid of a pair (see nn/grid.py); ``multiple``: the network's size multiple."""

    def __init__(self, module: Module, multiple: int):
        self.module, self.multiple = module, int(multiple)

    def __call__(self, pair, device: torch.device) -> NetResult:
        grid = NetGrid.for_working_grid(pair.geometry, tuple(pair.fixed.shape[2:]), self.multiple)
        f = grid.image_to_net(pair.fixed.to(device, torch.float32))
        m = grid.image_to_net(pair.moving.to(device, torch.float32))
        d = self.module(m, f)
        return NetResult(d, grid, f, m, {"net_grid": list(grid.net_shape),
                                         "axes_to_canonical": {"src": grid.src, "flip": grid.flip}})
