"""flashlite: exact attention kernels (Triton and C++/CUDA) over full, sliding-window,
block-sparse and top-k selected patterns, for PyTorch."""
from __future__ import annotations

from typing import Dict

from . import reference
from .api import (
    attention,
    block_sparse_attention,
    flash_attention,
    sliding_window_attention,
    topk_attention,
)
from .dispatch import last_backend
from .patterns import BlockSparse, Full, Pattern, SlidingWindow, TopK
from . import nn  # noqa: E402  (drop-in modules)
from .swap import swap  # noqa: E402
from . import selection  # noqa: E402  (marks / top-k -> indices)
from .cache import SelectiveKVCache  # noqa: E402

__version__ = "0.1.0"


def backends() -> Dict[str, str]:
    """Each backend name -> ``"available"`` or why it is not (e.g. the C++ extension is not built)."""
    from . import _backends

    return _backends.report()


__all__ = [
    "attention", "flash_attention", "sliding_window_attention", "block_sparse_attention", "topk_attention",
    "Pattern", "Full", "SlidingWindow", "BlockSparse", "TopK", "reference", "backends", "last_backend",
    "nn", "swap", "selection", "SelectiveKVCache",
]
