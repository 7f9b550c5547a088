"""Other libraries' signatures on flashlite.

* :mod:`flashlite.compat.flash_attn`: flash-attn 2's ``flash_attn_func``, the qkv/kv-packed and
  varlen variants, with flash-attn's arguments, layout ``[B, S, H, D]`` and lse layout;
* :mod:`flashlite.compat.bert_padding`: flash-attn's ``unpad_input`` / ``pad_input`` helpers.

Switch code written for flash-attn by changing one import line::

    from flashlite.compat.flash_attn import flash_attn_func, flash_attn_varlen_func

or, leaving the code alone, opt in once at start-up::

    import flashlite.compat
    flashlite.compat.install()     # `import flash_attn` now resolves to flashlite
    from flash_attn import flash_attn_func
    from flash_attn.bert_padding import unpad_input, pad_input

:func:`install` puts ``flash_attn``, ``flash_attn.flash_attn_interface`` and
``flash_attn.bert_padding`` into ``sys.modules`` (nothing else: it is opt-in and idempotent);
:func:`uninstall` takes them out again and restores whatever was there before (a real flash-attn
already imported, say). Modules that imported the real flash-attn before ``install()`` keep it.
"""
from __future__ import annotations

import importlib.machinery
import sys
import types
from typing import Dict, Optional

from . import bert_padding, flash_attn
from .flash_attn import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)

#: flash-attn's version whose signatures this layer follows.
FLASH_ATTN_VERSION = "2.8.4"

_NAMES = ("flash_attn", "flash_attn.flash_attn_interface", "flash_attn.bert_padding")
_MISSING = object()
_saved: Optional[Dict[str, object]] = None  # module name -> what sys.modules held before install()
_package: Optional[types.ModuleType] = None


def _make_package() -> types.ModuleType:
    package = types.ModuleType("flash_attn", "flash-attn 2's public functions, served by flashlite.compat "
                                             "(flashlite.compat.install())")
    package.__path__ = []  # a package: `import flash_attn.bert_padding` finds the submodule in sys.modules
    package.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None, is_package=True)
    package.__version__ = FLASH_ATTN_VERSION
    package.__flashlite__ = True
    for name in flash_attn.__all__:
        if name.startswith("flash_attn"):
            setattr(package, name, getattr(flash_attn, name))
    package.flash_attn_interface = flash_attn
    package.bert_padding = bert_padding
    return package


def installed() -> bool:
    """Whether ``import flash_attn`` currently resolves to flashlite."""
    return _saved is not None and sys.modules.get("flash_attn") is _package


def install() -> types.ModuleType:
    """Make ``import flash_attn`` (and ``flash_attn.flash_attn_interface``, ``flash_attn.bert_padding``)
    resolve to flashlite's compat modules. Idempotent; returns the ``flash_attn`` module."""
    global _saved, _package
    if installed():
        return _package
    if _package is None:
        _package = _make_package()
    if _saved is None:
        _saved = {name: sys.modules.get(name, _MISSING) for name in _NAMES}
    sys.modules["flash_attn"] = _package
    sys.modules["flash_attn.flash_attn_interface"] = flash_attn
    sys.modules["flash_attn.bert_padding"] = bert_padding
    return _package


def uninstall() -> None:
    """Undo :func:`install`: remove the entries and restore what ``sys.modules`` held before. Idempotent."""
    global _saved
    if _saved is None:
        return
    for name, previous in _saved.items():
        if previous is _MISSING:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous
    _saved = None


__all__ = ["install", "uninstall", "installed", "flash_attn", "bert_padding", "flash_attn_func",
           "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache",
           "FLASH_ATTN_VERSION"]
