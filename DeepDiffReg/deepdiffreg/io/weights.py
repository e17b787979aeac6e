"""The models registry: bundled weights (manifest.json; ``models/`` in the repository, the module's
``Resources/models`` in an installed Slicer extension, see ``bundled_dir``) plus a visible user cache.

Manifest entry (one per weights file)::

    {"id", "method", "version", "file", "sha256", "input_grid": {"spacing_mm", "size_multiple", "train_shape_dhw",
     "orientation"}, "modality", "training": {"data", "steps", ...}, "licence", "card"}

Loading verifies the sha256 of the file against the manifest and reads it with ``torch.load(weights_only=True)``;
a missing file, a wrong hash or an unreadable file raises ``MissingWeights`` with a one-line message.
User cache: ``$DEEPDIFFREG_MODELS_DIR`` or ``~/.deepdiffreg/models`` (its own manifest.json); ``deepdiffreg models
import FILE`` copies a weights file there, ``deepdiffreg models delete ID`` removes it again. Bundled models cannot
be deleted from the CLI.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInput, MissingWeights

_PKG = Path(__file__).resolve().parents[1]                      # .../deepdiffreg
# Where the bundled models are, first match (a folder holding manifest.json) wins:
BUNDLED_CANDIDATES = (
    _PKG / "models",                                             # next to the package (a wheel's package data)
    _PKG.parent / "Resources" / "models",                        # installed Slicer extension: the module's resources
    _PKG.parents[1] / "models",                                  # the repository: <repo>/models
)
BUNDLED_DIR = BUNDLED_CANDIDATES[-1]


def bundled_dir() -> Path:
    """``$DEEPDIFFREG_BUNDLED_MODELS``, else the first of ``BUNDLED_CANDIDATES`` with a manifest.json (in the
    installed extension, ``lib/Slicer-X.Y/qt-scripted-modules/Resources/models``, which the module's CMake
    installs), else the repository's ``models/``."""
    env = os.environ.get("DEEPDIFFREG_BUNDLED_MODELS")
    if env:
        return Path(env)
    return next((c for c in BUNDLED_CANDIDATES if (c / "manifest.json").is_file()), BUNDLED_DIR)


def user_dir() -> Path:
    return Path(os.environ.get("DEEPDIFFREG_MODELS_DIR", Path.home() / ".deepdiffreg" / "models"))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: Path) -> list[dict[str, Any]]:
    p = Path(folder) / "manifest.json"
    if not p.exists():
        return []
    try:
        return list(json.loads(p.read_text()).get("models", []))
    except (ValueError, AttributeError) as e:
        raise MissingWeights(f"model manifest {p} is not valid JSON ({e})") from None


def write_manifest(folder: Path, entries: list[dict[str, Any]]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"models": entries}, indent=2) + "\n")


def upsert_entry(folder: Path, entry: dict[str, Any]) -> None:
    entries = [e for e in read_manifest(folder) if e.get("id") != entry["id"]]
    write_manifest(folder, entries + [entry])


def list_models() -> list[dict[str, Any]]:
    """Bundled then user models; each entry gets "source" ("bundled"/"user") and "path"."""
    out = []
    for source, folder in (("bundled", bundled_dir()), ("user", user_dir())):
        for e in read_manifest(folder):
            out.append({**e, "source": source, "path": str(Path(folder) / e.get("file", ""))})
    return out


def find_model(model_id: str | None = None, method: str | None = None, file: str | Path | None = None
               ) -> dict[str, Any]:
    """The entry with ``model_id``, or (None) the newest-listed model for ``method`` (user models win).

    ``file``: a weights file outside the registry (e.g. a training run's best.pt): an entry for it with its own
    sha256 (so ``load_weights`` reads it like any model and the report records what was run), id = its stem."""
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise MissingWeights(f"no such weights file: {path}")
        return {"id": path.stem, "method": method, "version": "file", "file": path.name, "sha256": sha256_of(path),
                "source": "file", "path": str(path)}
    models = list_models()
    if model_id:
        hits = [m for m in models if m.get("id") == model_id]
        if not hits:
            raise MissingWeights(f"no model {model_id!r} in {bundled_dir()} or {user_dir()} "
                                 f"(see `deepdiffreg models list`)")
        return hits[-1]
    hits = [m for m in models if m.get("method") == method]
    if not hits:
        raise MissingWeights(f"no weights for method {method!r} in {bundled_dir()} or {user_dir()}; "
                             f"train some (`deepdiffreg train`) or import a file (`deepdiffreg models import`)")
    return hits[-1]


def load_weights(entry: dict[str, Any]) -> dict[str, Any]:
    """Verify the sha256 and load {"config": dict, "state_dict": {name: tensor}, ...} with weights_only=True."""
    path = Path(entry["path"])
    if not path.is_file():
        raise MissingWeights(f"weights file for model {entry.get('id')!r} is missing: {path}")
    digest = sha256_of(path)
    if digest != entry.get("sha256"):
        raise MissingWeights(f"weights file {path} fails its sha256 check (expected {str(entry.get('sha256'))[:12]}…, "
                             f"got {digest[:12]}…): the file is corrupt or was replaced")
    return _load_file(path)


def _load_file(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (any unpickling failure means: not a weights file we accept)
        raise MissingWeights(f"cannot read weights file {path}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(obj, dict) or "state_dict" not in obj or "config" not in obj:
        raise MissingWeights(f"{path} is not a DeepDiffReg weights file (needs 'config' and 'state_dict')")
    return obj


def save_weights(path: Path, config: dict[str, Any], state_dict: dict[str, torch.Tensor],
                 meta: dict[str, Any] | None = None) -> str:
    """Write a weights file (plain dict, loadable with weights_only=True); returns its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": dict(config), "state_dict": {k: v.detach().cpu().contiguous() for k, v in
                                                        state_dict.items()}, "meta": dict(meta or {})}, path)
    return sha256_of(path)


def import_weights(file: Path, model_id: str | None = None) -> dict[str, Any]:
    """Copy a weights file into the user cache and register it; returns the manifest entry."""
    file = Path(file)
    if not file.is_file():
        raise BadInput(f"no such weights file: {file}")
    obj = _load_file(file)
    meta = obj.get("meta", {}) or {}
    method = meta.get("method") or obj["config"].get("method")
    if not method:
        raise BadInput(f"{file} does not say which method it is for (meta.method)")
    mid = model_id or meta.get("id") or file.stem
    if any(m.get("id") == mid and m["source"] == "bundled" for m in list_models()):
        mid = f"{mid}-user"
    dest_dir = user_dir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{mid}.pt"
    shutil.copyfile(file, dest)
    entry = {k: v for k, v in meta.items() if k not in ("id", "file", "sha256")}
    entry.update(id=mid, method=method, file=dest.name, sha256=sha256_of(dest),
                 version=meta.get("version", "imported"), licence=meta.get("licence", "unknown (user import)"))
    upsert_entry(dest_dir, entry)
    return entry


def delete_model(model_id: str) -> Path:
    """Remove a user-imported model (file and manifest entry). Bundled models are refused."""
    folder = user_dir()
    entries = read_manifest(folder)
    hit = [e for e in entries if e.get("id") == model_id]
    if not hit:
        if any(m.get("id") == model_id for m in list_models()):
            raise BadInput(f"model {model_id!r} is bundled with DeepDiffReg and cannot be deleted")
        raise BadInput(f"no user model {model_id!r} in {folder}")
    path = folder / hit[0].get("file", "")
    if path.is_file():
        path.unlink()
    write_manifest(folder, [e for e in entries if e.get("id") != model_id])
    return path
