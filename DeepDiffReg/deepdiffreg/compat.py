"""Differences between the torch versions the engine supports (>= 2.1), in one place.

``torch.OutOfMemoryError`` exists only from torch 2.5 (before, only ``torch.cuda.OutOfMemoryError``, a
RuntimeError subclass since 1.13); naming the missing attribute in an ``except`` clause turns every exception that
reaches it into an AttributeError. Use ``OUT_OF_MEMORY_ERRORS`` in ``except`` clauses and ``is_out_of_memory``
for an exception already caught.
"""
from __future__ import annotations

import torch


def _oom_types() -> tuple[type[BaseException], ...]:
    types = []
    for owner, name in ((torch, "OutOfMemoryError"), (getattr(torch, "cuda", None), "OutOfMemoryError")):
        t = getattr(owner, name, None) if owner is not None else None
        if isinstance(t, type) and issubclass(t, BaseException) and t not in types:
            types.append(t)
    return tuple(types)


TORCH_OUT_OF_MEMORY_ERRORS: tuple[type[BaseException], ...] = _oom_types()
OUT_OF_MEMORY_ERRORS: tuple[type[BaseException], ...] = TORCH_OUT_OF_MEMORY_ERRORS + (MemoryError,)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's (CUDA) out-of-memory errors, also on versions without ``torch.OutOfMemoryError`` (old
    builds raise a plain RuntimeError whose message starts with 'CUDA out of memory')."""
    if isinstance(exc, TORCH_OUT_OF_MEMORY_ERRORS):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
