"""Command-line flags of the methods' declared options (methods/base.py ``Options``), for every command that runs a
method (``register``, ``batch``, the benchmark's children).

Each option becomes ``--<prefix>-<name>`` (``Method.flag``). A deprecated spelling (``option(aliases=...)``) may be
shared by several methods (``--refine``): it is added once and resolved against the method actually chosen. Values
are taken as text here and checked in one place, ``Method.parse_options``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from .errors import BadInput
from .methods.base import Method, OptionSpec, all_methods

_OPT = "method_option:"    # dest of a method's own flag: method_option:<method>:<option>
_ALIAS = "method_alias:"   # dest of a deprecated spelling: method_alias:<flag>


def _help(spec: OptionSpec) -> str:
    bits = [spec.help]
    default = spec.default
    if spec.kind == "int_list" and default is not None:
        default = " ".join(map(str, default))
    if spec.kind == "bool":
        bits.append(f"(default {'on' if default else 'off'})")
    elif default is not None:
        bits.append(f"(default {default})")
    if spec.min is not None or spec.max is not None:
        lo = "" if spec.min is None else f"{spec.min:g}"
        hi = "" if spec.max is None else f"{spec.max:g}"
        bits.append(f"[{lo}..{hi}]")
    return " ".join(bits).replace("%", "%%")


def _add(group, flags: list[str], spec: OptionSpec, dest: str, help: str, negative: str | None = None) -> None:
    kw: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help}
    if spec.kind == "bool":
        group.add_argument(*flags, action="store_const", const=True, **kw)
        if negative:
            group.add_argument(negative, action="store_const", const=False, dest=dest, default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS if help == argparse.SUPPRESS else f"turn {flags[0]} off")
        return
    else:
        kw["metavar"] = spec.name.upper() if spec.kind != "choice" else "{" + ",".join(map(str, spec.choices)) + "}"
        if spec.kind == "int_list":
            kw["nargs"] = "+"
    group.add_argument(*flags, **kw)


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """One argument group per method with its flags, plus the deprecated spellings (hidden from --help's groups
    but listed in each option's help)."""
    aliases: dict[str, OptionSpec] = {}
    for name, cls in sorted(all_methods().items()):
        specs = [s for s in cls.option_specs() if s.cli]
        if not specs:
            continue
        g = parser.add_argument_group(f"{name} options (with --method {name})")
        for spec in specs:
            h = _help(spec)
            if spec.aliases:
                h += f"; was {', '.join(spec.aliases)} (deprecated)"
            _add(g, [cls.flag(spec.name)], spec, f"{_OPT}{name}:{spec.name}", h, cls.negative_flag(spec.name))
            for a in spec.aliases:
                aliases.setdefault(a, spec)
    for flag, spec in aliases.items():
        _add(parser, [flag], spec, f"{_ALIAS}{flag}", argparse.SUPPRESS)


def method_options_from_args(args: argparse.Namespace, cls: type[Method], warn=None) -> dict[str, Any]:
    """The options the user gave for ``cls`` (raw values, for ``cls.parse_options``). A flag of another method, or
    a deprecated spelling the chosen method does not have, is a one-line BadInput."""
    warn = warn or (lambda msg: print(f"deepdiffreg: warning: {msg}", file=sys.stderr))
    out: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest.startswith(_OPT):
            method, opt = dest[len(_OPT):].split(":", 1)
            if method != cls.name:
                other = all_methods()[method]
                raise BadInput(f"{other.flag(opt)} is an option of method {method}, not of {cls.name}")
            out[opt] = value
    for dest, value in vars(args).items():
        if dest.startswith(_ALIAS):
            flag = dest[len(_ALIAS):]
            spec = next((s for s in cls.option_specs() if flag in s.aliases), None)
            if spec is None:
                raise BadInput(f"{flag} does not apply to method {cls.name}")
            if spec.name in out:
                raise BadInput(f"give {cls.flag(spec.name)} or {flag}, not both")
            warn(f"{flag} is deprecated; use {cls.flag(spec.name)}")
            out[spec.name] = value
    return out


def cli_args_for(cls: type[Method], options: dict[str, Any]) -> list[str]:
    """The inverse: flags that make ``register`` run ``cls`` with ``options`` (e.g. a benchmark variant)."""
    specs = {s.name: s for s in cls.option_specs()}
    out: list[str] = []
    for name, value in options.items():
        spec = specs[name]
        flag = cls.flag(name)
        if spec.kind == "bool":
            out.append(flag if value else cls.negative_flag(name))
        elif spec.kind == "int_list":
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out
