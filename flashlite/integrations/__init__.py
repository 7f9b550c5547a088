"""Adapters to other libraries, loaded on first use: ``flashlite.integrations.transformers``."""
import importlib

_SUBMODULES = ("transformers",)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
