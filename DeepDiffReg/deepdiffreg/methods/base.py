"""What every registration method declares and implements, and the registry everything else reads.

A method is one class in one file of this package (plus its network in ``nn/``). The class declares, once:

- ``name``, ``title``, ``description``: what the CLI, ``methods --json`` and the Slicer panel show;
- ``caps``: its capabilities (``Capabilities``: learned, inverse, uncertainty, own affine, default alignment,
  working spacing per device, memory per working voxel);
- ``Options``: a dataclass of typed options, each made with ``option(default, help=..., min=..., max=...)``.
  From it come the CLI flags (``--<flag_prefix>-<name>``), the JSON schema, the Slicer panel's advanced options
  and the one place where values are checked (``parse_options``);
- ``variants``: named option sets (benchmark rows, panel presets), e.g. ``{"refine": {"refine": 50}}``;
  ``benchmark_variants``: the names of those that ``deepdiffreg benchmark`` runs as rows of their own (besides the
  defaults), e.g. ``("refine",)``; ``--quick`` uses a variant named ``fast`` when there is one.

The pipeline (pipeline.py) hands ``estimate`` a ``PairOnGrid``: fixed and (initially aligned) moving images on one
working grid, intensities in [0, 1]. The method returns a ``FieldEstimate``: a voxel displacement u on that grid
such that moving(A(x + u(x))) ≈ fixed(x) (pull / ITK resampling direction), A its own affine if it has one
(identity otherwise). The pipeline maps it to LPS mm on the fixed image's own grid, chains the initial alignment and
writes the result files. Methods never touch files.

Methods are discovered: every module of this package is imported (``load_all``), then the ``deepdiffreg.methods``
entry-point group, then the modules or ``.py`` files listed in ``$DEEPDIFFREG_PLUGINS`` (``os.pathsep``-separated).
Nothing outside a method's own file names it.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from ..errors import BadInput
from ..frames import Geometry


# ------------------------------------------------------------------------------------------------------------------
# what a method is given and what it returns

@dataclass
class PairOnGrid:
    fixed: torch.Tensor              # (1, 1, D, H, W) float32 in [0, 1], working grid
    moving: torch.Tensor             # (1, 1, D, H, W) float32 in [0, 1], moving resampled through the initial alignment
    geometry: Geometry               # the working grid (LPS), shared by fixed and moving
    fixed_mask: torch.Tensor | None = None   # (1, 1, D, H, W) {0,1} user's region of interest: similarity inside it
    # the pipeline's contrast check of this pair (contrast.check, report.json "contrast_check"), made before the
    # method runs; None when it was not made (--contrast-check off, or a caller outside the pipeline)
    contrast: dict | None = None
    # the user says the two images are one patient's (register --follow-up: a follow-up scan, no change of subject)
    follow_up: bool = False


class Deferred:
    """A map's data computed on a helper thread while the pipeline composes and writes the rest of the result:
    ``fn(stop)`` starts now, on its own thread; ``result()`` waits for its tensor (and raises its error) — the map's
    file is the first thing that needs it. ``stop`` is a ``threading.Event`` set by ``close()`` when the run ends
    without needing the value (a cancel, an error elsewhere); ``fn`` may check it and raise ``Deferred.Stopped``.
    ``close()`` (the pipeline calls it on every way out of a run) returns when the thread has ended; ``seconds``:
    how long ``fn`` ran; ``waited``: how long ``result()`` waited for it. Worth it only with a core to spare
    (``cores.spare_core()``)."""

    class Stopped(Exception):
        """Raised by ``fn`` when ``stop`` is set."""

    def __init__(self, fn: Callable[[Any], torch.Tensor], name: str = "map"):
        import threading
        from concurrent.futures import ThreadPoolExecutor
        self.stop, self.seconds, self.waited = threading.Event(), None, 0.0
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"deepdiffreg-{name}")
        self._future = pool.submit(self._run, fn)
        pool.shutdown(wait=False)                       # the thread ends with its one task

    def _run(self, fn):
        import time
        t0 = time.perf_counter()
        try:
            return fn(self.stop)
        finally:
            self.seconds = round(time.perf_counter() - t0, 3)

    def result(self) -> torch.Tensor:
        import time
        t0 = time.perf_counter()
        try:
            return self._future.result()
        finally:
            self.waited = round(self.waited + time.perf_counter() - t0, 3)

    def close(self) -> None:
        from concurrent.futures import wait
        self.stop.set()
        wait([self._future])    # its outcome (a value, Stopped, an error) is nobody's now; a cancel still gets through


@dataclass
class Map:
    """A named scalar map a method returns besides its field (e.g. the uncertainty), written as ``<name>.nii.gz``
    on the fixed grid. ``data``: (1, 1, D, H, W) on the working grid, or a ``Deferred`` that makes it (``value()``
    gives the tensor either way); ``unit``: e.g. "mm"; ``description``: one line for report.json."""
    data: "torch.Tensor | Deferred"
    unit: str
    description: str = ""

    @property
    def deferred(self) -> "Deferred | None":
        """The ``Deferred`` that makes the data (None: the data is a tensor already)."""
        return self.data if isinstance(self.data, Deferred) else None

    def value(self) -> torch.Tensor:
        return self.deferred.result() if self.deferred is not None else self.data

    def close(self) -> None:
        """End a ``Deferred`` data's thread (a no-op for a tensor)."""
        if self.deferred is not None:
            self.deferred.close()


@dataclass
class FieldEstimate:
    """What ``Method.estimate`` returns. Frames: voxel units of the working grid, channel c along array axis c.

    ``disp_vox``: (1, 3, D, H, W), u such that T_method(x) = A(x + u(x)) maps fixed-space to moving-space points.
    ``inverse_disp_vox``: (1, 3, D', H', W') the displacement w of the inverse deformation x ↦ x + w(x) (moving
    → fixed, before A⁻¹ is undone: T_method⁻¹(y) = A⁻¹(y) + w(A⁻¹(y))), on ``inverse_geometry`` (None: the working
    grid). ``affine_lps``: (4, 4) homogeneous LPS matrix A of a method that learns its own alignment (None:
    identity); the pipeline chains it after the initial alignment, T(x) = A_init(A(x + u(x))).
    ``maps``: named extra maps with units. ``info``: facts for report.json. ``model``: {"id", "version", "sha256"}.
    """
    disp_vox: torch.Tensor
    inverse_disp_vox: torch.Tensor | None = None
    affine_lps: np.ndarray | None = None
    maps: dict[str, Map] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] | None = None
    inverse_geometry: Geometry | None = None


ProgressFn = Callable[[float, str], None]  # fraction of this method's work in [0, 1], message


# ------------------------------------------------------------------------------------------------------------------
# capabilities and options

@dataclass(frozen=True)
class Capabilities:
    learned: bool = False              # needs weights from models/ (the registry's entries with method == name)
    inverse: str | None = "numerical"  # "exact" (exp(-v), a network's backward field), "numerical", None
    uncertainty: bool = False          # returns an "uncertainty" map
    uncertainty_qa: bool = False       # that map follows the true registration error well enough to be read as QA
                                       # (benchmark: Spearman ρ ≥ UNCERTAINTY_QA_RHO against the true displacement
                                       # error on every known-deformation pair); False: shown labelled unreliable
    own_affine: bool = False           # learns its own alignment (FieldEstimate.affine_lps)
    default_align: str = "affine"      # the engine's initial alignment when the user gives none: affine|rigid|none
    spacing_mm: tuple[tuple[str, float], ...] = (("cpu", 2.0),)  # working spacing per device type ("cpu" fallback)
    # per device type: finer working spacings for fine images — fixed voxels of at most ``fine_image_mm`` on every
    # axis (a 1 mm brain, not a 2 mm head nor a thick-slice CT): the finest listed whose grid has at most
    # ``fine_max_voxels`` (a device may be listed more than once, e.g. 1.5 mm, else 2 mm)
    # (the run's time and memory stay bounded: a 0.8 mm CT keeps the coarse one); see ``Method.default_spacing``
    fine_spacing_mm: tuple[tuple[str, float], ...] = ()
    fine_image_mm: float = 1.2
    fine_max_voxels: int = 3_000_000
    contrasts: str = "same"            # "same": mono-contrast only (MSE/demons-like similarity, or weights trained
                                       # on mono-contrast pairs); "different": handles two contrasts (local NCC,
                                       # MI, contrast-agnostic training). A learned method's model entry may state
                                       # its own ("contrasts" in the manifest): ``contrasts_of``
    bytes_per_working_voxel: int = 1000  # peak memory of ``estimate`` per working-grid voxel (estimate); the
                                         # default is a guess for a method nobody measured: measure it
                                         # (Testing/engine/measure_method_memory.py) and declare it
    extra_memory_mb: int = 0           # memory the method holds whatever the grid size (network, weights), MB
    reference: bool = False            # a classical reference the learned methods are compared with on the
                                       # training validation pairs (the benchmark's validation table)

    def spacing_for(self, device_type: str) -> float:
        table = dict(self.spacing_mm)
        return float(table.get(device_type, table["cpu"]))

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["spacing_mm"] = dict(self.spacing_mm)
        d["fine_spacing_mm"] = {dev: sorted(v for k, v in self.fine_spacing_mm if k == dev)
                                for dev in dict(self.fine_spacing_mm)}
        return d


CONTRASTS = ("same", "different")
UNCERTAINTY_QA_RHO = 0.5       # the ρ an uncertainty map must reach to be declared QA (issue 18)


def contrasts_of(cls: type["Method"], model: dict[str, Any] | None = None) -> str:
    """What a method handles: the model entry's ``contrasts`` when it states one (weights decide for a learned
    method), else the method's declared ``caps.contrasts``."""
    stated = (model or {}).get("contrasts")
    return stated if stated in CONTRASTS else cls.caps.contrasts


_MISSING = object()


def option(default: Any, *, help: str, min: float | None = None, max: float | None = None,
           choices: tuple[Any, ...] | None = None, aliases: tuple[str, ...] = (), cli: bool = True) -> Any:
    """A field of a method's ``Options`` dataclass. ``min``/``max`` are inclusive bounds (numbers, and every
    element of an int list); ``aliases``: deprecated flag spellings still accepted (warned about); ``cli=False``:
    settable from Python and the JSON, but no flag."""
    meta = {"help": help, "min": min, "max": max, "choices": choices, "aliases": tuple(aliases), "cli": cli}
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple)")
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionSpec:
    """One declared option, as the CLI, the JSON schema and ``parse_options`` see it."""
    name: str
    kind: str                    # "int" | "float" | "bool" | "str" | "choice" | "int_list"
    default: Any
    help: str
    optional: bool               # None is allowed (means: the method decides, e.g. "the newest model")
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    aliases: tuple[str, ...] = ()
    cli: bool = True

    def to_json(self, flag: str) -> dict[str, Any]:
        d = {"name": self.name, "flag": flag, "type": self.kind, "default": _jsonable(self.default),
             "optional": self.optional, "min": self.min, "max": self.max,
             "choices": list(self.choices) if self.choices else None, "help": self.help}
        if self.aliases:
            d["deprecated_flags"] = list(self.aliases)
        return d


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _kind_of(tp: Any, choices) -> tuple[str, bool]:
    """(kind, optional) of a dataclass field type."""
    optional = False
    origin = typing.get_origin(tp)
    if origin is typing.Union or isinstance(tp, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
        origin = typing.get_origin(tp)
    if choices:
        return "choice", optional
    if tp is bool:
        return "bool", optional
    if tp is int:
        return "int", optional
    if tp is float:
        return "float", optional
    if tp is str:
        return "str", optional
    if origin is tuple and typing.get_args(tp)[:1] == (int,):
        return "int_list", optional
    raise TypeError(f"unsupported option type {tp!r}")


# ------------------------------------------------------------------------------------------------------------------
# the method base class

class Method:
    """Base class; see the module docstring. Subclasses set the class attributes and implement ``estimate``."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""                # short label for the Slicer panel's method list
    description: ClassVar[str] = ""          # one line, shown in `deepdiffreg methods` and the Slicer panel
    flag_prefix: ClassVar[str] = ""          # CLI flags are --<flag_prefix>-<option> (default: the name)
    default: ClassVar[bool] = False          # the method a user gets without --method (exactly one)
    caps: ClassVar[Capabilities] = Capabilities()
    variants: ClassVar[dict[str, dict[str, Any]]] = {}
    benchmark_variants: ClassVar[tuple[str, ...]] = ()   # names of ``variants`` that get their own benchmark row

    @dataclass
    class Options:
        pass

    def __init__(self, options: Any = None, **kw: Any):
        if options is not None and kw:
            raise TypeError("give an Options instance or keyword options, not both")
        self.opts = options if isinstance(options, self.Options) else self.parse_options(kw if options is None
                                                                                          else dict(options))

    @property
    def options(self) -> dict[str, Any]:
        """The options as a plain dict (report.json, the benchmark)."""
        return {k: _jsonable(v) for k, v in dataclasses.asdict(self.opts).items()}

    # -- declared facts ----------------------------------------------------------------------------------------
    @classmethod
    def prefix(cls) -> str:
        return cls.flag_prefix or cls.name

    @classmethod
    def option_specs(cls) -> list[OptionSpec]:
        hints = typing.get_type_hints(cls.Options)
        out = []
        for f in dataclasses.fields(cls.Options):
            m = f.metadata
            kind, optional = _kind_of(hints[f.name], m.get("choices"))
            out.append(OptionSpec(f.name, kind, f.default, m.get("help", ""), optional, m.get("min"), m.get("max"),
                                  m.get("choices"), m.get("aliases", ()), m.get("cli", True)))
        return out

    @classmethod
    def flag(cls, option_name: str) -> str:
        return f"--{cls.prefix()}-{option_name.replace('_', '-')}"

    @classmethod
    def negative_flag(cls, option_name: str) -> str:
        """The flag that turns a bool option off: --<prefix>-no-<name>."""
        return f"--{cls.prefix()}-no-{option_name.replace('_', '-')}"

    @classmethod
    def default_spacing(cls, device: torch.device, fixed_size=None, fixed_spacing=None) -> float:
        """The working spacing (mm) when the user gives none: ``caps.spacing_mm`` for the device, or
        ``caps.fine_spacing_mm`` for a fine fixed image (``fixed_size`` (i, j, k) voxels of ``fixed_spacing`` mm;
        without them: the device's spacing)."""
        coarse = cls.caps.spacing_for(device.type)
        fine = sorted(s for dev, s in cls.caps.fine_spacing_mm if dev == device.type and s < coarse)
        if not fine or fixed_size is None or fixed_spacing is None:
            return coarse
        if max(float(s) for s in fixed_spacing) > cls.caps.fine_image_mm:
            return coarse
        from ..preprocess import working_size      # here: preprocess loads SimpleITK, the registry must not
        for spacing in fine:                       # the finest whose grid stays within the voxel budget
            if float(np.prod(working_size(fixed_size, fixed_spacing, spacing))) <= cls.caps.fine_max_voxels:
                return float(spacing)
        return coarse

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """The method's entry of ``deepdiffreg methods --json`` (installed models are added by the CLI)."""
        return {"name": cls.name, "title": cls.title or cls.name, "description": cls.description,
                "default": bool(cls.default), "learned": cls.caps.learned, "trainable": _trainable(cls),
                "has_inverse": cls.caps.inverse is not None, "default_spacing_mm": cls.caps.spacing_for("cpu"),
                "caps": cls.caps.to_json(),
                "options": [{**s.to_json(cls.flag(s.name)),
                             **({"negative_flag": cls.negative_flag(s.name)} if s.kind == "bool" else {})}
                            for s in cls.option_specs()],
                "variants": {k: {o: _jsonable(v) for o, v in opts.items()} for k, opts in cls.variants.items()},
                "benchmark_variants": list(cls.benchmark_variants)}

    # -- option checking: the one place ------------------------------------------------------------------------
    @classmethod
    def parse_options(cls, given: dict[str, Any]) -> Any:
        """Check and convert ``given`` (option name → value; missing ones take their default) into an ``Options``
        instance. Every problem is a one-line ``BadInput`` naming the flag."""
        specs = {s.name: s for s in cls.option_specs()}
        unknown = sorted(set(given) - set(specs))
        if unknown:
            raise BadInput(f"{cls.name}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(specs))}")
        values = {}
        for name, spec in specs.items():
            values[name] = _check_value(cls, spec, given[name]) if name in given else spec.default
        return cls.Options(**values)

    # -- the work ----------------------------------------------------------------------------------------------
    def contrasts(self) -> str:
        """What this run handles, "same" | "different" (``contrasts_of``: a learned method's weights decide)."""
        return contrasts_of(type(self))

    def check_ready(self) -> None:
        """Fail now (before any voxel is read) when the method cannot run as configured, e.g. missing or tampered
        weights. Cheap: called by the pipeline's input gate."""

    def estimate(self, pair: PairOnGrid, device: torch.device, progress: ProgressFn) -> FieldEstimate:
        raise NotImplementedError


def _trainable(cls: type[Method]) -> bool:
    from .learned import is_trainable
    return bool(is_trainable(cls))


def _check_value(cls: type[Method], spec: OptionSpec, v: Any) -> Any:
    flag = cls.flag(spec.name)

    def bad(why: str) -> BadInput:
        return BadInput(f"{flag}: {why} (got {v!r})")

    if v is None:
        if spec.optional:
            return None
        raise bad("a value is required")
    kind = spec.kind
    if kind == "bool":
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
            return v.lower() in ("true", "1", "yes")
        raise bad("must be true or false")
    if kind == "choice":
        if v not in spec.choices:
            raise bad(f"must be one of {', '.join(map(str, spec.choices))}")
        return v
    if kind == "str":
        if not isinstance(v, str) or not v.strip():
            raise bad("must be a non-empty text")
        return v
    if kind == "int_list":
        seq = [v] if isinstance(v, (int, float, str)) else list(v)
        if not seq:
            raise bad("needs at least one value")
        out = tuple(_as_number(x, flag, whole=True) for x in seq)
        for x in out:
            _check_range(spec, x, flag, v)
        return out
    num = _as_number(v, flag, whole=kind == "int")
    _check_range(spec, num, flag, v)
    return num


def _as_number(v: Any, flag: str, whole: bool) -> float | int:
    """``v`` (a number or its text) as a finite float, or as an int when ``whole``; a bool is not a number."""
    kind = "a whole number" if whole else "a number"
    try:
        if isinstance(v, bool):
            raise ValueError
        f = float(v)
    except (TypeError, ValueError):
        raise BadInput(f"{flag}: must be {kind} (got {v!r})") from None
    if not math.isfinite(f):
        raise BadInput(f"{flag}: must be {'a whole number' if whole else 'a finite number'} (got {v!r})")
    if whole and f != int(f):
        raise BadInput(f"{flag}: must be a whole number (got {v!r})")
    return int(f) if whole else f


def _check_range(spec: OptionSpec, x: float, flag: str, given: Any) -> None:
    if spec.min is not None and x < spec.min:
        raise BadInput(f"{flag}: must be at least {spec.min:g} (got {given!r})")
    if spec.max is not None and x > spec.max:
        raise BadInput(f"{flag}: must be at most {spec.max:g} (got {given!r})")


# ------------------------------------------------------------------------------------------------------------------
# the registry

REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the registry (checks its declaration once, at import)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"two methods are called {cls.name!r}: {REGISTRY[cls.name].__qualname__}, {cls.__qualname__}")
    cls.option_specs()             # fails now, not in front of a user, on an unsupported option type
    for vname, opts in cls.variants.items():
        cls.parse_options(opts)    # a variant must be a valid option set
    missing = [v for v in cls.benchmark_variants if v not in cls.variants]
    if missing:
        raise ValueError(f"{cls.name}: benchmark_variants {missing} are not declared in variants")
    if cls.caps.contrasts not in CONTRASTS:
        raise ValueError(f"{cls.name}: caps.contrasts must be one of {', '.join(CONTRASTS)}")
    if cls.caps.uncertainty_qa and not cls.caps.uncertainty:
        raise ValueError(f"{cls.name}: caps.uncertainty_qa without an uncertainty map")
    if cls.caps.default_align not in ("affine", "rigid", "none"):
        raise ValueError(f"{cls.name}: default_align must be affine, rigid or none")
    REGISTRY[cls.name] = cls
    return cls


def all_methods() -> dict[str, type[Method]]:
    """Every discovered method, by name (see ``methods.load_all``)."""
    from . import load_all
    load_all()
    return dict(REGISTRY)


def get_method(name: str) -> type[Method]:
    methods = all_methods()
    if name not in methods:
        raise BadInput(f"unknown method {name!r}; available: {', '.join(sorted(methods))}")
    return methods[name]


def default_method() -> str:
    """The name of the method declared ``default = True`` (the first such one, by name)."""
    names = sorted(n for n, c in all_methods().items() if c.default)
    if not names:
        raise RuntimeError("no registration method declares default = True")
    return names[0]
