"""Dependencies of the engine, installed on the first Register (never at import), in child processes.

- torch: the same ``light-the-torch`` install the PyTorch extension's PyTorchUtils runs (it picks the CUDA or CPU
  wheel that fits the driver), but started as a child process by the run controller: the panel stays responsive,
  shows the output in its log, can be cancelled, and torch is never imported into Slicer (PyTorchUtils'
  ``installTorch`` and ``torchInstalled`` both ``import torch``). An installed torch that is too old is not
  replaced behind the user's back: the message sends them to the PyTorch Utils module.
- psutil: optional (process-tree cancel; without it the runner signals the process group). Its install is tried
  and a failure (offline site) is only logged: registration goes on.
- SimpleITK, numpy, vtk, torch and requests are never installed or replaced by ``pip`` from here (Slicer ships
  its own; SimpleITK's Slicer build has the MRML image IO).
- After installing torch, a torch/numpy check runs in a child process (numpy 2 vs. an old torch wheel); a failure
  asks for a restart.

Everything here is plain Python; ``plan`` and ``install_steps`` are what the controller uses.
"""
from __future__ import annotations

import importlib.metadata
import subprocess
from dataclasses import dataclass, field
from typing import Callable

TORCH_REQUIREMENT = ">=2.1"
LIGHT_THE_TORCH = "light-the-torch>=0.5"
OPTIONAL = {"psutil": "psutil>=5.9,<8"}   # name -> requirement; best effort
NEVER_INSTALL = {"simpleitk", "numpy", "vtk", "torch", "torchvision", "requests"}


class InstallError(RuntimeError):
    def __init__(self, message: str, restart_required: bool = False):
        super().__init__(message)
        self.restart_required = restart_required


@dataclass
class Step:
    """One child process of the install. ``required``: its failure stops the run (else it is logged only)."""

    label: str
    command: list[str]
    required: bool = True
    failure_message: str = ""


@dataclass
class Plan:
    torch: bool                                   # torch must be installed
    optional: list[str] = field(default_factory=list)  # pip requirements installed best effort
    torch_version: str | None = None              # the installed torch, when there is one
    torch_too_old: bool = False                   # installed but not TORCH_REQUIREMENT

    @property
    def empty(self) -> bool:
        return not self.torch and not self.optional and not self.torch_too_old

    def describe(self) -> str:
        items = ([f"torch{TORCH_REQUIREMENT} (through light-the-torch, as the PyTorch extension does)"]
                 if self.torch else []) + [f"{r} (optional)" for r in self.optional]
        return "\n".join(items)

    def confirmation_text(self) -> str:
        """The one question asked before installing; the download size is only claimed when torch is in it."""
        if self.torch:
            return ("DeepDiffReg needs PyTorch before the first registration. This downloads about 1-3 GB and may "
                    "take several minutes; Slicer stays usable meanwhile (the output is in the Log section).")
        return ("DeepDiffReg would like to install a small optional Python package (under 1 MB) that makes "
                "Cancel more reliable. Registration works without it.")


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def satisfies(version: str, requirement: str) -> bool:
    """``version`` meets ``requirement`` (e.g. ">=2.1"); local tags such as "+cpu" are ignored."""
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:  # pragma: no cover - packaging ships with pip/Slicer
        return True
    try:
        v = Version(version)
    except InvalidVersion:
        return False
    return SpecifierSet(requirement).contains(Version(v.base_version), prereleases=True)


def plan(version_of: Callable[[str], str | None] = installed_version) -> Plan:
    """What is missing or too old, without importing or installing anything."""
    tv = version_of("torch")
    optional = []
    for name, req in OPTIONAL.items():
        if name.lower() in NEVER_INSTALL:  # pragma: no cover - guarded by a test
            raise AssertionError(f"{name} must not be pip-installed by DeepDiffReg")
        v = version_of(name)
        if v is None or not satisfies(v, req[len(name):]):
            optional.append(req)
    return Plan(torch=tv is None, optional=optional, torch_version=tv,
                torch_too_old=tv is not None and not satisfies(tv, TORCH_REQUIREMENT))


def torch_too_old_message(version: str) -> str:
    return (f"PyTorch {version} is installed, but DeepDiffReg needs torch{TORCH_REQUIREMENT}. Open the 'PyTorch "
            "Utils' module, uninstall PyTorch, install it again (choose the CUDA version matching your driver, or "
            "CPU) and restart Slicer.")


def install_steps(p: Plan, python: str) -> list[Step]:
    """The child processes that carry out ``p`` (the controller runs them one by one)."""
    if p.torch_too_old:
        raise InstallError(torch_too_old_message(p.torch_version or "?"))
    steps = []
    if p.torch:
        offline = ("Could not download PyTorch (no network connection, a proxy, or the package index refused). "
                   "Install it from the 'PyTorch Utils' module, or on a machine without internet access copy a "
                   "torch wheel here and run: PythonSlicer -m pip install <wheel>. Details are in the log.")
        steps.append(Step("Installing light-the-torch", [python, "-m", "pip", "install", LIGHT_THE_TORCH],
                          failure_message=offline))
        steps.append(Step("Installing PyTorch", [python, "-m", "light_the_torch", "install",
                                                 f"torch{TORCH_REQUIREMENT}"], failure_message=offline))
    for req in p.optional:
        steps.append(Step(f"Installing {req} (optional)", [python, "-m", "pip", "install", req, "--no-deps"],
                          required=False))
    if p.torch:
        steps.append(Step("Checking that PyTorch loads", [python, "-c", TORCH_NUMPY_CHECK],
                          failure_message="PyTorch does not load with this Slicer's numpy. Restart Slicer; if it "
                                          "persists, reinstall PyTorch from the 'PyTorch Utils' module."))
    return steps


TORCH_NUMPY_CHECK = "import numpy, torch; torch.from_numpy(numpy.zeros(2)); print(torch.__version__)"


def check_torch_numpy(python: str, env: dict[str, str] | None = None, timeout_s: float = 120.0) -> str | None:
    """Import torch + numpy together in a child (as the engine will); None if fine, else the error's last line."""
    try:
        r = subprocess.run([python, "-c", TORCH_NUMPY_CHECK], env=env, capture_output=True, text=True,
                           timeout=timeout_s)
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    if r.returncode == 0:
        return None
    lines = [ln for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit code {r.returncode}"
