"""What every registration method implements, and the registry the CLI and the Slicer panel list.

The pipeline (pipeline.py) hands a method a ``PairOnGrid``: fixed and (initially aligned) moving images on one
working grid, intensities in [0, 1]. The method returns a ``FieldEstimate``: a voxel displacement u on that grid
such that moving(x + u(x)) ≈ fixed(x) (pull / ITK resampling direction). The pipeline maps it to LPS mm on the
fixed image's own grid, chains the initial alignment and writes the result files. Methods never touch files.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from ..frames import Geometry
from ..progress import Reporter


@dataclass
class PairOnGrid:
    fixed: torch.Tensor              # (1, 1, D, H, W) float32 in [0, 1], working grid
    moving: torch.Tensor             # (1, 1, D, H, W) float32 in [0, 1], moving resampled through the initial alignment
    geometry: Geometry               # the working grid (LPS), shared by fixed and moving
    fixed_mask: torch.Tensor | None = None   # (1, 1, D, H, W) {0,1} user's region of interest: similarity inside it


@dataclass
class FieldEstimate:
    disp_vox: torch.Tensor                       # (1, 3, D, H, W) voxel units on the working grid, fixed → moving
    inverse_disp_vox: torch.Tensor | None = None # (1, 3, D, H, W) moving → fixed on the same grid, if the method has one
    uncertainty: torch.Tensor | None = None      # (1, 1, D, H, W) e.g. std of the displacement in mm, if any
    info: dict[str, Any] = field(default_factory=dict)   # method facts for report.json (iterations, losses, ...)
    model: dict[str, Any] | None = None          # {"id", "version", "sha256"} for learned methods


ProgressFn = Callable[[float, str], None]  # fraction of this method's work in [0, 1], message


class Method:
    """Base class. Subclasses set the class attributes and implement ``register``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""          # one line, shown in `deepdiffreg methods` and the Slicer panel
    learned: ClassVar[bool] = False          # needs weights from models/
    default_spacing_mm: ClassVar[float] = 2.0  # working-grid spacing when the user gives none (CPU)
    default_spacing_mm_gpu: ClassVar[float | None] = None  # finer default on a GPU (None: same as CPU)
    size_multiple: ClassVar[int] = 1         # grid sizes the network needs (U-Nets: 16); the method resamples itself
    has_inverse: ClassVar[bool] = True
    bytes_per_working_voxel: ClassVar[int] = 1000  # peak memory of ``register`` per working-grid voxel (estimate)

    def __init__(self, **options: Any):
        self.options = options

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add method-specific CLI options (prefixed with the method, e.g. --nodeo-iterations)."""

    @classmethod
    def options_from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        return {}

    @classmethod
    def default_spacing(cls, device: torch.device) -> float:
        if device.type == "cuda" and cls.default_spacing_mm_gpu is not None:
            return cls.default_spacing_mm_gpu
        return cls.default_spacing_mm

    def register(self, pair: PairOnGrid, device: torch.device, progress: ProgressFn) -> FieldEstimate:
        raise NotImplementedError


REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    from . import load_all  # noqa: F401  (fills REGISTRY)
    load_all()
    from ..errors import BadInput
    if name not in REGISTRY:
        raise BadInput(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
