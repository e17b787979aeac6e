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

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInput, MissingWeights
from ..progress import dumps

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
    """Write manifest.json atomically (a temporary file renamed over it: a crash never leaves half a manifest)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(dumps({"models": entries}, indent=2) + "\n")   # strict: null, never NaN
        os.replace(tmp, folder / "manifest.json")
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def manifest_lock(folder: Path, timeout_s: float = 60.0):
    """Exclusive lock on ``folder``'s manifest for a read-modify-write (concurrent imports would drop entries).
    The lock file ``.manifest.lock`` stays in the cache; the kernel releases the lock if the process dies."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:   # no flock (Windows): best effort without a lock
        yield
        return
    fd = os.open(folder / ".manifest.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BadInput(f"the model cache {folder} is locked by another deepdiffreg process") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def upsert_entry(folder: Path, entry: dict[str, Any]) -> None:
    with manifest_lock(folder):
        entries = [e for e in read_manifest(folder) if e.get("id") != entry["id"]]
        write_manifest(folder, entries + [entry])


_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_model_id(model_id: str, where: str = "model id") -> str:
    """A model id is a plain name (letters, digits, '.', '_', '-'; no path): it becomes ``<cache>/<id>.pt``."""
    if not isinstance(model_id, str) or not _ID.match(model_id) or ".." in model_id:
        raise BadInput(f"{where} {model_id!r} is not a plain name: use letters, digits, '.', '_' and '-' only "
                       "(no '/', '..' or absolute paths)")
    return model_id


def inside(folder: Path, name: str) -> Path | None:
    """``folder / name`` when it resolves to a file directly inside ``folder`` (no '..', no absolute path, no
    symlink out of it); None otherwise."""
    if not name or not isinstance(name, str):
        return None
    base = Path(folder).resolve()
    try:
        path = (base / name).resolve()
    except (OSError, RuntimeError):
        return None
    return path if path.parent == base else None


def list_models() -> list[dict[str, Any]]:
    """Bundled then user models; each entry gets "source" ("bundled"/"user") and "path"."""
    out = []
    for source, folder in (("bundled", bundled_dir()), ("user", user_dir())):
        for e in read_manifest(folder):
            path = inside(folder, e.get("file", ""))
            out.append({**e, "source": source, "path": str(path) if path is not None else "",
                        **({} if path is not None else {"status": f"invalid: file {e.get('file')!r} is not inside "
                                                                  f"{folder}"})})
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


_VERIFIED: dict[tuple, str] = {}   # (path, size, mtime) → sha256 already checked in this process


def verify_entry(entry: dict[str, Any]) -> Path:
    """The weights file of ``entry`` when it exists, lies inside its model folder and matches its sha256 (checked
    once per process and file version); MissingWeights otherwise. Cheap enough for the input gate (no unpickling)."""
    if not entry.get("path"):
        raise MissingWeights(f"model {entry.get('id')!r}: its manifest entry names a file outside the model folder "
                             f"({entry.get('file')!r}); it is not loaded")
    path = Path(entry["path"])
    if not path.is_file():
        raise MissingWeights(f"weights file for model {entry.get('id')!r} is missing: {path}")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    digest = _VERIFIED.get(key) or sha256_of(path)
    if digest != entry.get("sha256"):
        raise MissingWeights(f"weights file {path} fails its sha256 check (expected {str(entry.get('sha256'))[:12]}…, "
                             f"got {digest[:12]}…): the file is corrupt or was replaced")
    _VERIFIED[key] = digest
    return path


def load_weights(entry: dict[str, Any]) -> dict[str, Any]:
    """Verify the sha256 and load {"config": dict, "state_dict": {name: tensor}, ...} with weights_only=True."""
    return _load_file(verify_entry(entry))


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
    """Copy a weights file into the user cache and register it; returns the manifest entry.

    The id (``--id``, else the file's meta.id, else its name) must be a plain name, so nothing is written outside
    the cache; an id already in the cache is refused unless it holds the very same file (then nothing changes)."""
    file = Path(file)
    if not file.is_file():
        raise BadInput(f"no such weights file: {file}")
    obj = _load_file(file)
    meta = obj.get("meta", {}) or {}
    if not isinstance(meta, dict):
        raise BadInput(f"{file}: its 'meta' is not a dictionary")
    method = meta.get("method") or obj["config"].get("method")
    if not method:
        raise BadInput(f"{file} does not say which method it is for (meta.method)")
    if model_id is not None:
        mid = check_model_id(model_id, "--id")
    elif meta.get("id"):
        mid = check_model_id(str(meta["id"]), f"the id stored in {file.name} (meta.id)")
    else:
        mid = check_model_id(file.stem, f"the file name of {file.name}")
    if any(m.get("id") == mid and m["source"] == "bundled" for m in list_models()):
        mid = f"{mid}-user"
    dest_dir = user_dir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = inside(dest_dir, f"{mid}.pt")
    if dest is None:                     # cannot happen for a checked id; the resolved-path check is the guarantee
        raise BadInput(f"model id {mid!r} would write outside the model cache {dest_dir}")
    digest = sha256_of(file)
    with manifest_lock(dest_dir):
        existing = [e for e in read_manifest(dest_dir) if e.get("id") == mid]
        if existing:
            if existing[0].get("sha256") == digest and dest.is_file() and sha256_of(dest) == digest:
                return existing[0]       # the same file imported again: nothing to do
            raise BadInput(f"a user model {mid!r} exists already in {dest_dir}; delete it first "
                           f"(`deepdiffreg models delete {mid}`) or import with another --id")
        if file.resolve() != dest:
            fd, tmp = tempfile.mkstemp(prefix=f".{mid}-", suffix=".pt.tmp", dir=dest_dir)
            os.close(fd)
            try:
                shutil.copyfile(file, tmp)
                if sha256_of(Path(tmp)) != digest:
                    raise MissingWeights(f"copying {file} into the cache gave a different file (changed meanwhile?)")
                os.replace(tmp, dest)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
        entry = {k: v for k, v in meta.items() if k not in ("id", "file", "sha256")}
        entry.update(id=mid, method=method, file=dest.name, sha256=digest,
                     version=meta.get("version", "imported"), licence=meta.get("licence", "unknown (user import)"))
        entries = [e for e in read_manifest(dest_dir) if e.get("id") != mid]
        write_manifest(dest_dir, entries + [entry])
    return entry


def delete_model(model_id: str) -> Path:
    """Remove a user-imported model (file and manifest entry). Bundled models are refused, and so is an entry
    whose file is not inside the cache (nothing outside the cache is ever deleted)."""
    folder = user_dir()
    with manifest_lock(folder):
        entries = read_manifest(folder)
        hit = [e for e in entries if e.get("id") == model_id]
        if not hit:
            if any(m.get("id") == model_id for m in list_models()):
                raise BadInput(f"model {model_id!r} is bundled with DeepDiffReg and cannot be deleted")
            raise BadInput(f"no user model {model_id!r} in {folder}")
        name = hit[0].get("file", "")
        path = inside(folder, name)
        if path is None:
            raise BadInput(f"model {model_id!r}: its manifest entry names the file {name!r}, which is not inside the "
                           f"model cache {folder}; nothing was deleted (remove the entry from {folder / 'manifest.json'} "
                           "by hand)")
        if path.name in ("manifest.json", ".manifest.lock"):
            raise BadInput(f"model {model_id!r}: its manifest entry names {name!r}; nothing was deleted")
        if path.is_file():
            path.unlink()
        write_manifest(folder, [e for e in entries if e.get("id") != model_id])
    return path
