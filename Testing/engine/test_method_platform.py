"""The method platform: declared options become flags, JSON and one check; methods are discovered; no method is
named outside its own files."""
from __future__ import annotations

import json
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

from deepdiffreg.errors import BadInput
from deepdiffreg.method_args import cli_args_for, method_options_from_args
from deepdiffreg.methods.base import Capabilities, Method, all_methods, default_method, option

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "DeepDiffReg"


class _Declared(Method):
    """Not registered: a declaration to exercise the option machinery."""
    name = "_declared"
    flag_prefix = "decl"
    caps = Capabilities(spacing_mm=(("cpu", 4.0), ("cuda", 1.5)))

    @dataclass
    class Options:
        lr: float = option(0.01, min=0.0, max=1.0, help="a learning rate")
        steps: int = option(10, min=1, help="steps")
        levels: tuple[int, ...] = option((4, 2, 1), min=1, help="levels")
        mode: str = option("a", choices=("a", "b"), help="a choice")
        flip: bool = option(True, help="a switch")
        model: str | None = option(None, help="optional text")


def test_parse_options_checks_types_ranges_and_finiteness():
    o = _Declared.parse_options({"lr": "0.5", "steps": 3.0, "levels": ["8", "2"], "mode": "b", "flip": "false"})
    assert (o.lr, o.steps, o.levels, o.mode, o.flip, o.model) == (0.5, 3, (8, 2), "b", False, None)
    bad = [({"lr": 2.0}, "--decl-lr: must be at most 1"), ({"lr": float("nan")}, "finite"),
           ({"lr": "x"}, "must be a number"), ({"steps": 0}, "at least 1"), ({"steps": 2.5}, "whole number"),
           ({"levels": [2, 0]}, "at least 1"), ({"mode": "c"}, "one of a, b"), ({"flip": "maybe"}, "true or false"),
           ({"nope": 1}, "unknown option"), ({"lr": None}, "required")]
    for given, needle in bad:
        with pytest.raises(BadInput, match=needle):
            _Declared.parse_options(given)


def test_describe_gives_the_schema_the_panel_reads():
    d = _Declared.describe()
    assert d["caps"]["spacing_mm"] == {"cpu": 4.0, "cuda": 1.5} and d["default_spacing_mm"] == 4.0
    opts = {o["name"]: o for o in d["options"]}
    assert opts["lr"]["flag"] == "--decl-lr" and opts["lr"]["type"] == "float" and opts["lr"]["max"] == 1.0
    assert opts["levels"]["type"] == "int_list" and opts["levels"]["default"] == [4, 2, 1]
    assert opts["mode"]["choices"] == ["a", "b"] and opts["flip"]["negative_flag"] == "--decl-no-flip"
    assert opts["model"]["optional"] is True
    json.dumps(d, allow_nan=False)


def test_cli_args_round_trip_through_the_register_parser():
    from deepdiffreg.cli import build_parser
    for name, cls in all_methods().items():
        for variant, opts in cls.variants.items():
            args = build_parser().parse_args(["register", "--fixed", "f", "--moving", "m", "--out", "o",
                                              "--method", name, *cli_args_for(cls, opts)])
            assert cls.parse_options(method_options_from_args(args, cls)) == cls.parse_options(opts), (name, variant)


def test_a_flag_of_another_method_or_a_foreign_alias_is_refused():
    from deepdiffreg.cli import build_parser
    methods = all_methods()
    a, b = sorted(methods)[:2]
    cls_a, cls_b = methods[a], methods[b]
    spec_b = next(s for s in cls_b.option_specs() if s.cli and s.kind in ("int", "float"))
    args = build_parser().parse_args(["register", "--fixed", "f", "--moving", "m", "--out", "o", "--method", a,
                                      cls_b.flag(spec_b.name), str(spec_b.default)])
    with pytest.raises(BadInput, match=f"option of method {b}"):
        method_options_from_args(args, cls_a)
    # every deprecated spelling is resolved against the chosen method only, with a warning
    for name, cls in methods.items():
        for spec in cls.option_specs():
            for alias in spec.aliases:
                value = [str(spec.default)] if spec.kind != "int_list" else [str(v) for v in spec.default]
                args = build_parser().parse_args(["register", "--fixed", "f", "--moving", "m", "--out", "o",
                                                  "--method", name, alias, *value])
                warned = []
                assert method_options_from_args(args, cls, warned.append) == {spec.name: value[0] if len(value) == 1
                                                                              else value}
                assert warned and cls.flag(spec.name) in warned[0]
                for other, ocls in methods.items():
                    if not any(alias in s.aliases for s in ocls.option_specs()):
                        with pytest.raises(BadInput, match="does not apply"):
                            method_options_from_args(args, ocls)


def test_exactly_one_default_method_and_every_declaration_is_valid():
    methods = all_methods()
    assert sum(c.default for c in methods.values()) == 1
    assert methods[default_method()].default
    for cls in methods.values():
        cls.parse_options({})          # the defaults are a valid option set
        assert cls.caps.default_align in ("affine", "rigid", "none")


def test_bad_option_value_through_the_cli_is_one_line_before_any_file_is_read(tmp_path):
    cls = all_methods()[default_method()]
    spec = next(s for s in cls.option_specs() if s.kind == "float" and s.min is not None)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "deepdiffreg", "register", "--fixed", str(tmp_path / "missing.nii"),
                        "--moving", str(tmp_path / "missing2.nii"), "--out", str(out), cls.flag(spec.name), "nan"],
                       capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and cls.flag(spec.name) in lines[0], r.stderr
    assert "finite" in lines[0] and not out.exists()


# -------------------------------------------------------------------------------------------------------------
# no method is named outside its own files

def _string_literals(path: Path) -> list[tuple[int, str]]:
    with open(path, "rb") as fh:
        toks = tokenize.tokenize(fh.readline)
        return [(t.start[0], t.string) for t in toks if t.type == tokenize.STRING]


def _method_files() -> set[Path]:
    """Files a method owns: its module in methods/ and nn/ (any module there may hold a network)."""
    return {p for d in ("deepdiffreg/methods", "deepdiffreg/nn") for p in (MODULE_DIR / d).rglob("*.py")}


def test_no_method_name_literal_outside_its_own_files():
    methods = all_methods()
    needles = set()
    for name, cls in methods.items():
        if name.startswith("_"):
            continue                      # test methods
        needles |= {f'"{name}"', f"'{name}'", f"{name}+", f"--{cls.prefix()}-"}
        if cls.prefix() != name:
            needles.add(f'"{cls.prefix()}"')
    owned = _method_files()
    hits = []
    for path in sorted(MODULE_DIR.rglob("*.py")):
        if path in owned:
            continue
        for line, text in _string_literals(path):
            low = text.lower()
            for n in needles:
                if n in low:
                    hits.append(f"{path.relative_to(REPO)}:{line}: {n} in {text[:60]!r}")
    assert not hits, "method names outside their own files:\n" + "\n".join(hits)
