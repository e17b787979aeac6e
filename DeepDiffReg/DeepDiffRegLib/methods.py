"""The method list shown in the panel.

A static table (so the panel works before torch is installed and without starting a process), refreshed from the
engine's own ``deepdiffreg methods --json`` once the dependencies are in place. Keys match the engine's REGISTRY
names; the widget stores the *name* in the parameter node, so never rename an entry.
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class MethodInfo:
    name: str
    description: str
    learned: bool = False
    default_spacing_mm: float | None = None
    has_inverse: bool = True
    models: list[dict[str, Any]] = field(default_factory=list)

    @property
    def model_text(self) -> str:
        """'model <id> v<version>' of the first installed model, 'no weights needed' for optimisation methods."""
        if not self.learned:
            return "no trained weights needed (optimised on this pair)"
        if not self.models:
            return "model: not installed"
        m = self.models[0]
        return f"model {m.get('id', '?')} v{m.get('version', '?')}"


# Mirrors `deepdiffreg methods --json` at the time of writing; refresh_from_engine() replaces it.
STATIC_METHODS: list[MethodInfo] = [
    MethodInfo("nodeo", "NODEO: neural-ODE flow fitted to this pair (no training data, any anatomy); ~1 min on CPU",
               learned=False, default_spacing_mm=3.0),
    MethodInfo("demons", "Diffeomorphic demons (SimpleITK), classical reference; CPU only",
               learned=False, default_spacing_mm=2.0),
    MethodInfo("vxm-diff", "VoxelMorph-diff: probabilistic diffeomorphic U-Net (SVF, scaling and squaring) with "
               "uncertainty", learned=True, default_spacing_mm=2.0),
]

DEFAULT_METHOD = "nodeo"

# Presets: the simple choice shown first; the advanced (collapsed) options override them.
PRESETS = {
    # spacing/iterations 0 = the engine's own default for the method and device (NODEO: 3 mm on CPU, 2 mm on GPU)
    "fast": {"label": "Fast (coarse, fewer iterations)", "spacing_mm": 4.0, "iterations": 100, "refine": 0},
    "balanced": {"label": "Balanced (default)", "spacing_mm": 0.0, "iterations": 0, "refine": 0},
    "accurate": {"label": "Accurate (finer, slower)", "spacing_mm": 2.0, "iterations": 300, "refine": 50},
}
DEFAULT_PRESET = "balanced"


def parse_methods_json(text: str) -> list[MethodInfo]:
    rows = json.loads(text)
    out = []
    for r in rows:
        out.append(MethodInfo(name=str(r["name"]), description=str(r.get("description", "")),
                              learned=bool(r.get("learned", False)),
                              default_spacing_mm=r.get("default_spacing_mm"),
                              has_inverse=bool(r.get("has_inverse", True)), models=list(r.get("models") or [])))
    return out


def refresh_from_engine(python: str, env: dict[str, str] | None = None, timeout_s: float = 60.0,
                        extra_args: Sequence[str] = ()) -> list[MethodInfo]:
    """Run ``python -m deepdiffreg methods --json``; falls back to the static table on any failure."""
    try:
        out = subprocess.run([python, "-m", "deepdiffreg", "methods", "--json", *extra_args], env=env,
                             capture_output=True, text=True, timeout=timeout_s)
        if out.returncode == 0:
            methods = parse_methods_json(out.stdout)
            if methods:
                return methods
    except (OSError, subprocess.SubprocessError, ValueError, KeyError):
        pass
    return list(STATIC_METHODS)


def by_name(methods: Sequence[MethodInfo], name: str) -> MethodInfo | None:
    return next((m for m in methods if m.name == name), None)
