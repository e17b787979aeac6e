"""Model management for the panel (list, import, delete, licence), through the engine's own CLI
(``deepdiffreg models import|delete``) run as background commands: the Slicer side never reads weights itself.
The list comes from the ``models`` of each method in ``methods --json``."""
from __future__ import annotations

import os
from typing import Sequence

from .methods import MethodInfo

COLUMNS = ("Model", "Method", "Version", "Where", "Licence")


def model_rows(methods: Sequence[MethodInfo]) -> list[dict]:
    """One row per installed model: the table's cells plus what the buttons need (id, path, deletable)."""
    rows = []
    for m in methods:
        for e in m.models:
            source = str(e.get("source", ""))
            rows.append({"cells": (str(e.get("id", "?")), m.title, str(e.get("version", "")),
                                   "bundled with the extension" if source == "bundled" else "user cache",
                                   str(e.get("licence", "unknown"))),
                         "id": str(e.get("id", "")), "path": str(e.get("path", "")),
                         "deletable": source == "user", "card": str(e.get("card", ""))})
    return rows


def import_command(python: str, weights_file: str) -> list[str]:
    return [python, "-m", "deepdiffreg", "models", "import", weights_file]


def delete_command(python: str, model_id: str) -> list[str]:
    return [python, "-m", "deepdiffreg", "models", "delete", model_id]


def user_models_dir(env: dict[str, str] | None = None) -> str:
    """The user cache the engine imports into (``deepdiffreg/io/weights.py: user_dir``)."""
    env = os.environ if env is None else env
    return env.get("DEEPDIFFREG_MODELS_DIR") or os.path.join(os.path.expanduser("~"), ".deepdiffreg", "models")
