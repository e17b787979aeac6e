"""Dependencies for the engine, installed on the first Register (never at import).

- torch comes from the PyTorch extension (PyTorchUtils), which picks the wheel for the GPU driver;
- everything else is pinned here and installed one by one with ``--no-deps`` where it could drag in a package that
  Slicer ships itself: **SimpleITK** (Slicer's build has its MRML image IO), numpy, vtk and torch are never
  installed or replaced by us;
- after installing torch, a torch/numpy ABI check runs in a child process (numpy 2 vs. old torch wheels); a
  failure asks for a restart instead of crashing later.

Only ``ensure_dependencies`` touches Slicer (imported lazily); the planning functions are plain Python.
"""
from __future__ import annotations

import importlib.metadata
import subprocess
from dataclasses import dataclass
from typing import Callable

TORCH_REQUIREMENT = ">=2.1"
# name -> (pip requirement, install with --no-deps)
PINNED = {
    "psutil": ("psutil>=5.9,<8", True),   # tree-kill on cancel (not bundled with Slicer)
}
NEVER_INSTALL = {"simpleitk", "numpy", "vtk", "torch", "torchvision", "requests"}


class InstallError(RuntimeError):
    def __init__(self, message: str, restart_required: bool = False):
        super().__init__(message)
        self.restart_required = restart_required


@dataclass
class Plan:
    torch: bool                 # torch must be installed through PyTorchUtils
    pip: list[tuple[str, bool]]  # (requirement, no_deps)

    @property
    def empty(self) -> bool:
        return not self.torch and not self.pip

    def describe(self) -> str:
        items = (["torch (through the PyTorch extension)"] if self.torch else []) + [r for r, _ in self.pip]
        return "\n".join(items)


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _satisfies(version: str, requirement: str) -> bool:
    try:
        from packaging.requirements import Requirement
        return Requirement(requirement).specifier.contains(version, prereleases=True)
    except ImportError:  # pragma: no cover - packaging ships with pip/Slicer; be permissive without it
        return True


def plan(version_of: Callable[[str], str | None] = installed_version) -> Plan:
    """What is missing, without installing anything."""
    need_torch = version_of("torch") is None
    pip = []
    for name, (req, no_deps) in PINNED.items():
        if name.lower() in NEVER_INSTALL:  # pragma: no cover - guarded by a test
            raise AssertionError(f"{name} must not be pip-installed by DeepDiffReg")
        v = version_of(name)
        if v is None or not _satisfies(v, req):
            pip.append((req, no_deps))
    return Plan(torch=need_torch, pip=pip)


def check_torch_numpy(python: str, env: dict[str, str] | None = None, timeout_s: float = 120.0) -> str | None:
    """Import torch + numpy together in a child (as the engine will); None if fine, else the error's last line."""
    code = "import numpy, torch; torch.from_numpy(numpy.zeros(2)); print(torch.__version__)"
    try:
        r = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    if r.returncode == 0:
        return None
    lines = [ln for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit code {r.returncode}"


def ensure_dependencies(confirm: Callable[[str, str], bool], python: str | None = None,
                        env: dict[str, str] | None = None) -> bool:
    """Install what is missing inside Slicer. ``confirm(message, details)`` asks the user once.

    Returns True when something was installed. Raises InstallError (with ``restart_required`` where a restart
    fixes it) when the user declines or an install fails.
    """
    import slicer  # Slicer only

    todo = plan()
    if todo.empty:
        return False
    if not confirm("DeepDiffReg needs to install Python packages before the first registration. "
                   "This downloads about 1-3 GB (PyTorch) and may take several minutes.", todo.describe()):
        raise InstallError("Registration needs these packages:\n" + todo.describe())
    if todo.torch:
        try:
            import PyTorchUtils  # from the PyTorch extension (EXTENSION_DEPENDS)
        except ImportError as e:
            raise InstallError("The PyTorch extension is missing. Install 'PyTorch' from the Extensions Manager, "
                               "restart Slicer and press Register again.", restart_required=True) from e
        torch_logic = PyTorchUtils.PyTorchUtilsLogic()
        if not torch_logic.torchInstalled():
            torch = torch_logic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
            if torch is None:
                raise InstallError("PyTorch could not be installed. Use the 'PyTorch Utils' module to install it "
                                   "(choose the CUDA version matching your driver, or CPU).")
    for req, no_deps in todo.pip:
        slicer.util.pip_install(([req, "--no-deps"] if no_deps else [req]))
    if python:
        err = check_torch_numpy(python, env)
        if err:
            raise InstallError(f"PyTorch does not load with this Slicer's numpy ({err}). Restart Slicer; if it "
                               "persists, reinstall PyTorch from the 'PyTorch Utils' module.", restart_required=True)
    return True
