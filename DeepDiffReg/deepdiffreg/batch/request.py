"""What a batch passes to every pair's ``register``, and when an existing result already answers it.

The register arguments after ``--`` are opaque to the batch: method flags and generic ones alike are handed to
each child unchanged. They are parsed once here with the engine's own ``register`` parser, only to refuse bad
ones before any pair starts and to get a normalised request for resuming (flag spellings, aliases and order do
not matter; only the values that differ from the parser's defaults count).

A pair is up to date — skipped — when all of these hold:
- its ledger entry (``OUT/.deepdiffreg-batch/pairs/<id>.json``) is a success with the same request: the same
  non-default register values and the same input files (path, size, modification time);
- ``OUT/<id>/report.json`` is readable and every file it lists exists;
- the report's engine version, method and method options are the ones this request gives now (options
  resolved by the method itself, defaults filled in), so a changed default re-runs the pair;
- the weights the report names are installed with the same sha256, and the models installed for the method are
  the ones the pair was run with.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any

from .. import __version__
from ..errors import BadInput
from .pairs import INPUT_FLAGS, STATE_DIR, Pair

_SENTINEL = "\0deepdiffreg-batch\0"
# Namespace entries that are the batch's business, not the request's: where results go and how many threads.
_NOT_REQUEST = {"command", "func", "debug", "out", "overwrite", "threads"}


def strict_json(obj: Any) -> Any:
    """``obj`` with NaN / ±inf replaced by None and tuples by lists (for json.dumps(allow_nan=False))."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return strict_json(obj.item())
    return obj


def _parse_register(argv: list[str]):
    from ..cli import build_parser
    return build_parser().parse_args(["register", *argv])


@dataclass
class RegisterRequest:
    """The register arguments of a batch, parsed and checked once."""
    argv: list[str]            # the user's register arguments, passed to every child as given
    namespace: Any             # the engine's parse of them (argparse.Namespace)
    changed: dict[str, Any]    # the values that differ from the register parser's defaults

    @property
    def method(self) -> str:
        return self.namespace.method

    @property
    def gives_threads(self) -> bool:
        return getattr(self.namespace, "threads", None) is not None

    @property
    def device(self) -> str:
        return str(getattr(self.namespace, "device", "auto"))


def parse_register_args(argv: list[str]) -> RegisterRequest:
    """Check the pass-through register arguments with the engine's parser (BadInput on any error)."""
    base = ["--fixed", _SENTINEL, "--moving", _SENTINEL, "--out", _SENTINEL]
    try:
        ns = _parse_register(base + list(argv))
        defaults = vars(_parse_register(base))
    except SystemExit as e:  # --help and friends
        raise BadInput("register arguments after -- could not be parsed") from e
    except BadInput as e:
        raise BadInput(f"register arguments after --: {str(e).split(': ', 1)[-1]}") from None
    if ns.fixed != _SENTINEL or ns.moving != _SENTINEL or ns.out != _SENTINEL:
        raise BadInput("register arguments after -- must not give --fixed, --moving or --out: the batch sets them per "
                       "pair (pairs CSV or --atlas/--moving, and --out)")
    for col, flag in INPUT_FLAGS.items():
        if col not in ("fixed", "moving") and getattr(ns, col, None) is not None and col != "fixed_mask":
            raise BadInput(f"register arguments after -- must not give {flag}: per-pair inputs go in the pairs CSV "
                           f"(column {col})")
    if getattr(ns, "overwrite", False):
        raise BadInput("--overwrite is not needed: the batch replaces results that are not up to date itself")
    changed = {k: v for k, v in vars(ns).items()
               if k not in _NOT_REQUEST and k not in INPUT_FLAGS and v != defaults.get(k)}
    if getattr(ns, "fixed_mask", None):
        changed["fixed_mask"] = file_identity(os.path.abspath(ns.fixed_mask))
    return RegisterRequest(list(argv), ns, strict_json(changed))


def file_identity(path: str) -> dict[str, Any]:
    """Path, size and modification time of a file (a folder: of its files, e.g. a DICOM series)."""
    try:
        st = os.stat(path)
    except OSError:
        return {"path": path, "missing": True}
    if not os.path.isdir(path):
        return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    size, newest, count = 0, st.st_mtime_ns, 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                s = os.stat(os.path.join(root, f))
            except OSError:
                continue
            size, newest, count = size + s.st_size, max(newest, s.st_mtime_ns), count + 1
    return {"path": path, "files": count, "size": size, "mtime_ns": newest}


def pair_request(pair: Pair, req: RegisterRequest) -> dict[str, Any]:
    """Everything a pair's result depends on that the batch controls: the request and the input files."""
    return {"args": req.changed, "method": req.method,
            "inputs": {col: file_identity(path) for col, path in sorted(pair.inputs.items())}}


def request_sha256(request: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True, allow_nan=False).encode()).hexdigest()


def expected_method_options(req: RegisterRequest) -> dict[str, Any] | None:
    """The method options a register run of this request reports (report.json ``method_options``), resolved by the
    method class as ``cli._cmd_register`` does: the flags given, checked, defaults filled in."""
    from ..method_args import method_options_from_args
    from ..methods.base import get_method
    cls = get_method(req.method)
    options = method_options_from_args(req.namespace, cls, warn=lambda msg: None)
    return strict_json(cls(**options).options)


def installed_models(method: str) -> dict[str, str]:
    """{model id: sha256} of the models installed for ``method`` (empty for methods without weights)."""
    try:
        from ..io.weights import list_models
        return {str(m.get("id")): str(m.get("sha256")) for m in list_models() if m.get("method") == method}
    except Exception:  # noqa: BLE001 — an unreadable manifest: then nothing can be said to be unchanged
        return {"unreadable": ""}


# -- the ledger: one small JSON file per pair in OUT/.deepdiffreg-batch/pairs/ -----------------------------------

def ledger_path(out: str, pair_id: str) -> str:
    return os.path.join(out, STATE_DIR, "pairs", pair_id + ".json")


def read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None


def write_json_atomic(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(strict_json(obj), fh, indent=2, allow_nan=False)
        fh.write("\n")
    os.replace(tmp, path)


def up_to_date(out: str, pair: Pair, request: dict[str, Any], options: dict[str, Any] | None,
               models: dict[str, str]) -> tuple[bool, str]:
    """(True, "") when OUT/<id>/ already holds this request's result; else (False, why it runs)."""
    result = os.path.join(out, pair.id)
    report = read_json(os.path.join(result, "report.json"))
    if report is None:
        return False, "no result yet" if not os.path.exists(result) else "report.json missing or unreadable"
    missing = [f for f in (report.get("files") or {}).values() if not os.path.isfile(os.path.join(result, str(f)))]
    if missing:
        return False, f"result incomplete ({', '.join(missing)} missing)"
    ledger = read_json(ledger_path(out, pair.id))
    if not ledger or ledger.get("status") != "ok":
        return False, "result was not made by this batch"
    if ledger.get("request_sha256") != request_sha256(request):
        return False, "request or input files changed"
    if report.get("deepdiffreg_version") != __version__:
        return False, f"engine version {report.get('deepdiffreg_version')} -> {__version__}"
    if report.get("method") != request["method"]:
        return False, f"method {report.get('method')} -> {request['method']}"
    if options is not None and strict_json(report.get("method_options")) != options:
        return False, "method options changed"
    model = report.get("model") or {}
    if model and models.get(str(model.get("id"))) != model.get("sha256"):
        return False, f"weights of model {model.get('id')} changed or removed"
    if ledger.get("models") != models:
        return False, "installed models for the method changed"
    return True, ""
