"""flashlite: exact attention kernels (Triton and C++/CUDA) over full, sliding-window,
block-sparse and top-k selected patterns, for PyTorch.

The layers, each importing only the ones below it:

    faces      flashlite.nn (and flashlite.swap), SelectiveKVCache, flashlite.integrations,
               flashlite.heads (what each head does; prune), the CLI
    api        flashlite.api: the public functions (validate, build the pattern);
               flashlite.distributed: one sequence over several devices (context parallelism)
    dispatch   flashlite.dispatch: backend choice, the plan (cached), custom ops + autograd
    backend    flashlite.backend: triton (flashlite.kernels), cpu and cuda (flashlite._C), reference
    kernels    flashlite.kernels (Triton), csrc/ (C++ and CUDA, built into flashlite._C)
    base       flashlite.core (patterns, schedules, top-k rows), flashlite.reference (the oracle),
               flashlite.selection (marks -> indices)

The faces and the selection helpers load on first use, so ``import flashlite`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Dict

from .api import (
    AttentionStats,
    attention,
    attention_stats,
    block_sparse_attention,
    flash_attention,
    paged_attention,
    sliding_window_attention,
    topk_attention,
    varlen_attention,
)
from .maps import attention_map
from .core.patterns import BlockSparse, Full, Pattern, SlidingWindow, TopK
from .dispatch import last_backend

__version__ = "0.1.0"

# Public names loaded on first use: name -> (module, attribute or None for the module itself).
_LAZY = {
    "nn": ("flashlite.nn", None),
    "selection": ("flashlite.selection", None),
    "reference": ("flashlite.reference", None),
    "integrations": ("flashlite.integrations", None),
    "kernels": ("flashlite.kernels", None),
    "swap": ("flashlite.nn.swap", "swap"),
    "SelectiveKVCache": ("flashlite.cache", "SelectiveKVCache"),
    "PagedKVCache": ("flashlite.paged_cache", "PagedKVCache"),
    "distributed": ("flashlite.distributed", None),
    "compat": ("flashlite.compat", None),
    "heads": ("flashlite.heads", None),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'flashlite' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def backends() -> Dict[str, str]:
    """Each backend name -> ``"available"`` or why it is not (e.g. the C++ extension is not built)."""
    from . import backend as registry

    return registry.report()


__all__ = [
    "attention", "flash_attention", "sliding_window_attention", "block_sparse_attention", "topk_attention",
    "varlen_attention", "paged_attention", "attention_stats", "AttentionStats", "Pattern", "Full", "SlidingWindow",
    "BlockSparse", "TopK", "reference",
    "backends", "last_backend", "nn", "swap", "selection", "SelectiveKVCache", "PagedKVCache", "integrations", "heads",
    "distributed", "compat", "attention_map",
]
