"""The one device resolver: ``--device auto|cpu|cuda`` → a ``torch.device`` (register, train, evaluation).

"auto" takes CUDA when present, else the CPU; asking for CUDA where there is none is a one-line
``DeviceUnavailable`` (exit code 5), never a silent fall-back. Other torch device strings ("cuda:1", "mps") are
passed to torch as given.
"""
from __future__ import annotations

import torch

from .errors import BadInput, DeviceUnavailable


def resolve_device(name: str = "auto") -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name in ("cuda", "gpu") or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            built = "without CUDA" if torch.version.cuda is None else f"for CUDA {torch.version.cuda}"
            raise DeviceUnavailable(f"CUDA was requested but no CUDA device is available (torch {torch.__version__} "
                                    f"built {built}); use --device cpu or auto")
        return torch.device("cuda" if name == "gpu" else name)
    try:
        return torch.device(name)
    except (RuntimeError, TypeError):
        raise BadInput(f"unknown device {name!r}; use auto, cpu or cuda") from None
