"""Which of our methods a benchmark run registers, and with which options: everything comes from the method
registry (methods/base.py), nothing here names a method.

- A run's rows are every discovered method with its default options, in the order: the default method, then the
  methods that need no weights, then the learned ones (by name), each followed by the variants it marks for the
  benchmark (``Method.benchmark_variants``, names of its ``variants``), labelled ``name+variant``.
- ``--methods`` takes names and ``name+variant`` labels (any declared variant).
- ``--quick`` (a tiny phantom, seconds per run) defaults to the methods that need no weights, and runs a plain row
  with the method's ``QUICK_VARIANT`` when it declares one (its defaults otherwise), on a ``QUICK_SPACING_MM`` grid.
- A learned method without installed weights is not run: its rows are skipped with a note.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import BadInput
from ..method_args import cli_args_for
from ..methods.base import Method, all_methods, default_method

QUICK_VARIANT = "fast"        # the variant --quick uses for a plain row, when the method declares it
QUICK_SPACING_MM = 3.0        # working grid of every --quick run


@dataclass(frozen=True)
class MethodRow:
    label: str                  # "name" or "name+variant": the row's name in the tables and the JSON
    method: str                 # the registry name
    variant: str | None = None
    options: dict[str, Any] = field(default_factory=dict)   # given options (the variant's; {} = defaults)

    @property
    def cls(self) -> type[Method]:
        return all_methods()[self.method]

    def register_args(self, quick: bool = False) -> list[str]:
        """``register`` flags of this row (``--method NAME`` and the method's own flags)."""
        opts = dict(self.options)
        if quick and self.variant is None:
            opts = dict(self.cls.variants.get(QUICK_VARIANT, {}))
        args = ["--method", self.method] + cli_args_for(self.cls, opts)
        if quick:
            args += ["--spacing", f"{QUICK_SPACING_MM:g}"]
        return args


def benchmark_variants(cls: type[Method]) -> tuple[str, ...]:
    """The variants ``cls`` marks for the benchmark (each gets a row); an unknown name is a declaration error."""
    names = tuple(getattr(cls, "benchmark_variants", ()) or ())
    for v in names:
        if v not in cls.variants:
            raise ValueError(f"{cls.name}: benchmark variant {v!r} is not one of its variants "
                             f"({', '.join(cls.variants) or 'none'})")
    return names


def _order(methods: dict[str, type[Method]]) -> list[str]:
    first = default_method()
    return sorted(methods, key=lambda n: (n != first, methods[n].caps.learned, n))


def all_rows() -> list[MethodRow]:
    methods = all_methods()
    out = []
    for name in _order(methods):
        cls = methods[name]
        out.append(MethodRow(name, name))
        out += [MethodRow(f"{name}+{v}", name, v, dict(cls.variants[v])) for v in benchmark_variants(cls)]
    return out


def default_rows(quick: bool) -> list[MethodRow]:
    """The rows of a run without --methods: all of them; with --quick, the plain rows of the methods that need no
    weights."""
    rows = all_rows()
    if quick:
        rows = [r for r in rows if r.variant is None and not r.cls.caps.learned]
    return rows


def parse_rows(labels: list[str]) -> list[MethodRow]:
    """``--methods`` values → rows (one-line BadInput for an unknown method or variant)."""
    methods = all_methods()
    known = [r.label for r in all_rows()]
    out = []
    for label in labels:
        name, plus, variant = label.partition("+")
        if name not in methods:
            raise BadInput(f"unknown benchmark method {label!r}; use any of: {', '.join(known)} "
                           f"(or NAME+VARIANT with a variant from `deepdiffreg methods --json`)")
        cls = methods[name]
        if not plus:
            out.append(MethodRow(name, name))
        elif variant in cls.variants:
            out.append(MethodRow(label, name, variant, dict(cls.variants[variant])))
        else:
            raise BadInput(f"method {name} has no variant {variant!r}; its variants: "
                           f"{', '.join(cls.variants) or 'none'}")
    if len({r.label for r in out}) != len(out):
        raise BadInput("--methods lists a row twice")
    return out


def missing_weights(row: MethodRow) -> str | None:
    """None when the row can run; for a learned method without installed weights, why not (one line)."""
    cls = row.cls
    if not cls.caps.learned:
        return None
    try:
        from ..io.weights import find_model
        find_model(row.options.get("model"), method=cls.name)
    except Exception as e:  # noqa: BLE001 — any reason to skip is reported, not raised
        return " ".join(str(e).split()) or type(e).__name__
    return None
