"""Registration methods. Each module registers its class in base.REGISTRY on import."""
import importlib

_MODULES = ("nodeo", "demons", "vxm_diff")


def load_all() -> None:
    for m in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{m}")
        except ModuleNotFoundError as e:  # a method module not written yet must not break the others
            if e.name != f"{__name__}.{m}":
                raise
