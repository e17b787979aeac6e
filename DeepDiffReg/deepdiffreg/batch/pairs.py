"""The pairs of a cohort: a pairs CSV, or one atlas (fixed) against a list or glob of moving images.

A pairs CSV has a header with the columns ``fixed, moving`` and optionally ``id, fixed_seg, moving_seg,
fixed_landmarks, moving_landmarks, fixed_mask``. Relative paths are relative to the CSV's folder. Each pair's
result goes to ``OUT/<id>/``; without an ``id`` column the id is the moving image's file name without extension
(``<fixed>_to_<moving>`` where moving names repeat).
"""
from __future__ import annotations

import csv
import glob
import os
import re
from dataclasses import dataclass, field

from ..errors import BadInput

# Per-pair inputs: CSV column -> register flag. The flags are the engine's generic inputs, not method options.
INPUT_FLAGS = {"fixed": "--fixed", "moving": "--moving", "fixed_seg": "--fixed-seg", "moving_seg": "--moving-seg",
               "fixed_landmarks": "--fixed-landmarks", "moving_landmarks": "--moving-landmarks",
               "fixed_mask": "--fixed-mask"}
COLUMNS = ("id", *INPUT_FLAGS)

# Names in OUT that belong to the batch itself, so no pair may use them as its folder.
STATE_DIR = ".deepdiffreg-batch"
RESERVED = {"summary.csv", "summary.json", "summary.md", "qa_montage.png", STATE_DIR}

_ID_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".hdr", ".img", ".gz", ".dcm")


@dataclass
class Pair:
    id: str
    inputs: dict[str, str] = field(default_factory=dict)   # column -> absolute path ("fixed", "moving", ...)

    def register_argv(self) -> list[str]:
        """The input part of this pair's ``register`` command line."""
        out: list[str] = []
        for col, flag in INPUT_FLAGS.items():
            if self.inputs.get(col):
                out += [flag, self.inputs[col]]
        return out


def stem(path: str) -> str:
    """File name without directory and image extension: ``/a/sub-01_T1w.nii.gz`` -> ``sub-01_T1w``."""
    name = os.path.basename(os.path.normpath(path))
    for ext in _EXTENSIONS:
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name


def _safe_id(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return s or "pair"


def check_id(pair_id: str, where: str) -> None:
    if not _ID_OK.match(pair_id) or pair_id in RESERVED or ".partial-" in pair_id or ".old-" in pair_id:
        raise BadInput(f"{where}: pair id {pair_id!r} cannot be a folder name in OUT (use letters, digits, '.', '_', "
                       f"'-'; not starting with '.'; not one of {', '.join(sorted(RESERVED))})")


def _derive_ids(pairs: list[Pair], explicit: list[bool]) -> None:
    """Give pairs without an explicit id one from their file names; refuse duplicates."""
    moving_stems = [stem(p.inputs["moving"]) for p in pairs]
    for p, given, ms in zip(pairs, explicit, moving_stems):
        if not given:
            p.id = _safe_id(ms if moving_stems.count(ms) == 1 else f"{stem(p.inputs['fixed'])}_to_{ms}")
    seen: dict[str, int] = {}
    for i, (p, given) in enumerate(zip(pairs, explicit)):
        if not given:
            check_id(p.id, f"pair {i + 1} (id from its file names; give an 'id' column)")
        if p.id in seen:
            raise BadInput(f"pairs {seen[p.id] + 1} and {i + 1} have the same id {p.id!r}; give an 'id' column with "
                           f"distinct ids")
        seen[p.id] = i


def read_pairs_csv(path: str) -> list[Pair]:
    """Pairs from a CSV (see the module docstring). Paths are made absolute."""
    if not os.path.isfile(path):
        raise BadInput(f"pairs CSV not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = {"fixed", "moving"} - set(header)
        if missing:
            raise BadInput(f"{path}: the header needs the columns fixed and moving (missing: {', '.join(sorted(missing))};"
                           f" found: {', '.join(header) or 'nothing'})")
        unknown = set(header) - set(COLUMNS)
        if unknown:
            raise BadInput(f"{path}: unknown column(s) {', '.join(sorted(unknown))}; allowed: {', '.join(COLUMNS)}")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    pairs, explicit = [], []
    for n, row in enumerate(rows, start=2):  # line numbers as an editor shows them (header is line 1)
        if not any(row.values()):
            continue
        where = f"{path}, line {n}"
        inputs = {}
        for col in INPUT_FLAGS:
            value = row.get(col, "")
            if value:
                # not checked here: a missing file fails its own pair (exit 2), not the whole cohort
                inputs[col] = os.path.abspath(os.path.join(base, os.path.expanduser(value)))
        for col in ("fixed", "moving"):
            if col not in inputs:
                raise BadInput(f"{where}: the {col} column is empty")
        pid = row.get("id", "")
        if pid:
            check_id(pid, where)
        pairs.append(Pair(pid, inputs))
        explicit.append(bool(pid))
    if not pairs:
        raise BadInput(f"{path}: no pairs (only a header)")
    _derive_ids(pairs, explicit)
    return pairs


def atlas_pairs(atlas: str, moving: list[str], exclude_under: str | None = None) -> list[Pair]:
    """The atlas (fixed) against every moving image; ``moving`` holds paths and/or glob patterns. Files under
    ``exclude_under`` (the batch's OUT: a recursive glob must not pick up earlier results) are left out. (Pairs
    with segmentations or landmarks for Dice / TRE need a pairs CSV.)"""
    fixed = _existing(atlas, "--atlas", "atlas")
    skip = os.path.join(os.path.abspath(exclude_under), "") if exclude_under else None
    files: list[str] = []
    for item in moving:
        hits = [item] if os.path.exists(item) else sorted(glob.glob(os.path.expanduser(item), recursive=True))
        if not hits:
            raise BadInput(f"--moving: {item!r} matches no file")
        files += [os.path.abspath(h) for h in hits if os.path.abspath(h) not in files]
    files = [f for f in files if f != fixed  # a glob over the cohort may include the atlas subject itself
             and not (skip and f.startswith(skip))]
    if not files:
        raise BadInput("--moving: no moving image besides the atlas")
    pairs = [Pair("", {"fixed": fixed, "moving": f}) for f in files]
    _derive_ids(pairs, [False] * len(pairs))
    return pairs


def _existing(path: str, where: str, what: str) -> str:
    p = os.path.abspath(path)
    if not os.path.exists(p):
        raise BadInput(f"{where}: {what} not found: {path}")
    return p
