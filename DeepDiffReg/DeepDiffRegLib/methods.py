"""The panel's method list, presets and advanced options, all from the engine's ``deepdiffreg methods --json``.

Nothing here knows a method by name: the list, each method's human title and one-line description, its typed
options (the Advanced section) and its declared variants (presets) come from the JSON, which
``parse_methods_json`` — the one function that reads it — turns into ``MethodInfo`` objects. There is no static
copy of the engine's registry: until the engine has answered, the panel lists nothing (or the answer it
remembered from the last session, see ``DeepDiffReg.py``).

JSON read, per method: ``name``, ``title``, ``description``, ``default`` (bool), ``learned``, ``has_inverse``,
``default_spacing_mm``, ``contrasts`` ("same" | "different"; else ``caps.contrasts``), ``caps`` (dict, kept as is;
``uncertainty`` and ``uncertainty_qa`` are read for the uncertainty line), ``options`` (list of {``name``, ``flag``, ``type`` in
int|float|bool|str|choice|int_list, ``default``, ``optional`` (None allowed), ``min``, ``max``, ``choices``,
``help``, ``negative_flag`` (bool options: the flag that turns it off)}), ``variants`` ({variant: {option name:
value}}), ``models`` (list of {``id``, ``version``, ``source``, ``path``, ``licence``, ``card``, ...}).

The command line is built from the declared options only, and only for the options the user changed
(``option_args``): a flag the method does not declare is never added.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

OPTION_TYPES = ("int", "float", "bool", "str", "choice", "int_list")


@dataclass
class OptionSpec:
    name: str
    flag: str
    type: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    choices: list[Any] = field(default_factory=list)
    help: str = ""
    negative_flag: str | None = None  # bool options: the flag that turns it off
    optional: bool = False            # None is a valid value (e.g. "the newest model")

    @property
    def label(self) -> str:
        return self.name.replace("_", " ").capitalize()

    def coerce(self, value: Any) -> Any:
        """The value in this option's type; raises ValueError when it does not fit (type, range, choices)."""
        t = self.type
        if value is None:
            return None
        if t == "bool":
            if isinstance(value, str):
                if value.strip().lower() in ("1", "true", "yes", "on"):
                    return True
                if value.strip().lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(f"{self.name}: not a yes/no value: {value!r}")
            return bool(value)
        if t == "int":
            v = int(value)
            if isinstance(value, float) and v != value:
                raise ValueError(f"{self.name}: not an integer: {value!r}")
            self._check_range(v)
            return v
        if t == "float":
            v = float(value)
            if not math.isfinite(v):
                raise ValueError(f"{self.name}: not a finite number: {value!r}")
            self._check_range(v)
            return v
        if t == "int_list":
            items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
            v = [int(x) for x in items]
            if not v:
                raise ValueError(f"{self.name}: needs at least one integer")
            for x in v:
                self._check_range(x)
            return v
        if t == "choice":
            if self.choices and value not in self.choices:
                raise ValueError(f"{self.name}: {value!r} is not one of {self.choices}")
            return value
        return str(value)

    def _check_range(self, v: float) -> None:
        if self.min is not None and v < self.min:
            raise ValueError(f"{self.name}: {v} is below the minimum {self.min}")
        if self.max is not None and v > self.max:
            raise ValueError(f"{self.name}: {v} is above the maximum {self.max}")

    def args(self, value: Any) -> list[str]:
        """The command-line words for ``value`` (already coerced)."""
        if self.type == "bool":
            if value:
                return [self.flag]
            if not self.negative_flag:
                raise ValueError(f"{self.name}: the method declares no flag to turn it off")
            return [self.negative_flag]
        if self.type == "int_list":
            return [self.flag] + [str(int(x)) for x in value]
        if self.type == "float":
            return [self.flag, f"{float(value):g}"]
        return [self.flag, str(value)]


@dataclass
class MethodInfo:
    name: str
    title: str
    description: str
    default: bool = False
    learned: bool = False
    has_inverse: bool = True
    default_spacing_mm: float | None = None
    caps: dict[str, Any] = field(default_factory=dict)
    options: list[OptionSpec] = field(default_factory=list)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)
    contrasts: str = "same"           # "same" | "different": what a run gets (the installed model's statement)

    @property
    def contrast_text(self) -> str:
        """One line for the panel: whether the method registers images of different contrasts."""
        if self.contrasts == "different":
            return "Contrasts: also different ones (e.g. T1 to T2)."
        return "Contrasts: one only — both images must look alike (e.g. T1 to T1), not T1 to T2."

    @property
    def uncertainty_text(self) -> str | None:
        """One line for the panel about the method's uncertainty map; None when it has none."""
        if not self.caps.get("uncertainty"):
            return None
        if self.caps.get("uncertainty_qa"):
            return "Uncertainty map: validated against the true error (QA)."
        return ("Uncertainty map: unreliable — it does not follow the registration error closely enough to be "
                "used as QA (see docs/benchmarks.md).")

    @property
    def facts_text(self) -> str:
        """The description and the lines above, as the panel shows them under the method list."""
        return "\n".join(t for t in (self.description, self.contrast_text, self.uncertainty_text) if t)

    def option(self, name: str) -> OptionSpec | None:
        return next((o for o in self.options if o.name == name), None)

    @property
    def model_text(self) -> str:
        """'model <id> v<version>' of the first installed model; what an optimisation method needs otherwise."""
        if not self.learned:
            return "no trained weights needed (optimised on this pair)"
        if not self.models:
            return "model: not installed (import one under Models)"
        m = self.models[0]
        return f"model {m.get('id', '?')} v{m.get('version', '?')}"


def _option(r: dict[str, Any]) -> OptionSpec:
    t = str(r.get("type", "str"))
    if t not in OPTION_TYPES:
        t = "str"
    o = OptionSpec(name=str(r["name"]), flag=str(r["flag"]), type=t, default=r.get("default"),
                   min=r.get("min"), max=r.get("max"), choices=list(r.get("choices") or []),
                   help=str(r.get("help") or ""), negative_flag=r.get("negative_flag"),
                   optional=bool(r.get("optional", False)))
    if o.type == "choice" and o.default is None and o.choices:
        o.default = o.choices[0]
    return o


def parse_methods_json(text: str) -> list[MethodInfo]:
    """The one reader of ``deepdiffreg methods --json``. Accepts a list of methods or {"methods": [...]}.

    Raises ValueError (json.JSONDecodeError is one) or KeyError when the text is not that JSON.
    """
    rows = json.loads(text)
    if isinstance(rows, dict):
        rows = rows.get("methods", [])
    if not isinstance(rows, list):
        raise ValueError("methods --json: expected a list of methods")
    out = []
    for r in rows:
        name = str(r["name"])
        options = [_option(o) for o in (r.get("options") or []) if isinstance(o, dict) and o.get("flag")]
        variants = {str(k): dict(v or {}) for k, v in (r.get("variants") or {}).items()}
        out.append(MethodInfo(name=name, title=str(r.get("title") or name), description=str(r.get("description", "")),
                              default=bool(r.get("default", False)), learned=bool(r.get("learned", False)),
                              has_inverse=bool(r.get("has_inverse", True)),
                              default_spacing_mm=r.get("default_spacing_mm"), caps=dict(r.get("caps") or {}),
                              options=options, variants=variants, models=list(r.get("models") or []),
                              contrasts="different" if (r.get("contrasts") or (r.get("caps") or {}).get("contrasts"))
                              == "different" else "same"))
    return out


def by_name(methods: Sequence[MethodInfo], name: str | None) -> MethodInfo | None:
    return next((m for m in methods if m.name == name), None)


def default_method(methods: Sequence[MethodInfo]) -> MethodInfo | None:
    """The method the engine marks ``default``; else the first one."""
    return next((m for m in methods if m.default), methods[0] if methods else None)


def methods_command(python: str) -> list[str]:
    return [python, "-m", "deepdiffreg", "methods", "--json"]


# -- presets: generic (working spacing) plus each method's declared variants ---------------------------------
# spacing factor relative to the method's own default spacing (None: the method's default, nothing passed)
SPACING_PRESETS = {
    "fast": ("Fast (coarser working grid)", 1.5),
    "balanced": ("Balanced (the method's defaults)", None),
    "accurate": ("Accurate (finer working grid, slower)", 0.75),
}
DEFAULT_PRESET = "balanced"
VARIANT_PREFIX = "variant:"


def presets_for(method: MethodInfo | None) -> list[tuple[str, str]]:
    """(key, label) of the presets offered for ``method``: fast / balanced / accurate (working spacing, plus the
    method's own variant of the same name when it declares one), then its other variants."""
    def describe(opts: dict[str, Any]) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in opts.items())

    variants = method.variants if method is not None else {}
    out = []
    for k, (label, _) in SPACING_PRESETS.items():
        extra = describe(variants.get(k, {}))
        out.append((k, f"{label[:-1]}, {extra})" if extra and label.endswith(")") else label))
    for v, opts in variants.items():
        if v not in SPACING_PRESETS:
            desc = describe(opts)
            out.append((VARIANT_PREFIX + v, v.replace("_", " ").replace("-", " ").capitalize()
                        + (f" ({desc})" if desc else "")))
    return out


def preset_spacing_scale(method: MethodInfo | None, preset: str) -> float | None:
    """The factor a spacing preset applies to the working spacing the engine chooses for the fixed image
    (``register --spacing-scale``; None: the method's default, nothing passed). A factor, not a spacing: the
    engine's default depends on the image (a method may declare a finer grid for fine images, e.g. 1.5 mm instead of
    3 mm for a 1 mm brain), which the panel cannot know; 0.75 × the CPU default would have made "Accurate" coarser
    than "Balanced" there."""
    if method is None or method.default_spacing_mm is None:
        return None
    return SPACING_PRESETS.get(preset, (None, None))[1]


def preset_options(method: MethodInfo | None, preset: str) -> dict[str, Any]:
    """Option values the preset sets: a variant's, or the same-named variant of a spacing preset."""
    if method is None:
        return {}
    name = preset[len(VARIANT_PREFIX):] if preset.startswith(VARIANT_PREFIX) else preset
    return dict(method.variants.get(name, {}))


def effective_options(method: MethodInfo, preset: str, user_values: dict[str, Any]) -> dict[str, Any]:
    """Preset (variant) values overridden by what the user set in Advanced; unknown names are dropped."""
    merged = {**preset_options(method, preset), **(user_values or {})}
    return {k: v for k, v in merged.items() if method.option(k) is not None}


def option_args(method: MethodInfo, values: dict[str, Any]) -> list[str]:
    """Command-line words for the options in ``values`` that differ from their declared default.

    Only declared options are passed (an undeclared name raises KeyError: the caller's values are stale), each
    checked against its type, range and choices (ValueError with a one-line message otherwise).
    """
    out: list[str] = []
    for name, raw in values.items():
        spec = method.option(name)
        if spec is None:
            raise KeyError(f"{method.title}: no option {name!r}")
        value = spec.coerce(raw)
        if value is None:
            continue
        default = spec.coerce(spec.default) if spec.default is not None else None
        if value == default:
            continue
        out += spec.args(value)
    return out
