"""Registration methods. Every module of this package is imported by ``load_all``; a module that defines a method
registers its class in ``base.REGISTRY`` with ``@register_method``. Methods from outside the package come from the
``deepdiffreg.methods`` entry-point group or from ``$DEEPDIFFREG_PLUGINS`` (modules or ``.py`` files, separated by
``os.pathsep``) — a new method needs no edit here or anywhere else."""
from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys

_loaded = False


def _import_path(path: str) -> None:
    name = "deepdiffreg_plugin_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import method plugin {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def load_all() -> None:
    """Import every method module once (cheap after the first call)."""
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    try:
        from importlib.metadata import entry_points
        for ep in entry_points(group="deepdiffreg.methods"):
            ep.load()
    except Exception as e:  # noqa: BLE001 — a broken third-party plugin must not stop the built-in methods
        print(f"deepdiffreg: warning: a method plugin failed to load: {e}", file=sys.stderr)
    for item in filter(None, os.environ.get("DEEPDIFFREG_PLUGINS", "").split(os.pathsep)):
        if item.endswith(".py") or os.sep in item:
            _import_path(item)
        else:
            importlib.import_module(item)
    _loaded = True
