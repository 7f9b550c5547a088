"""When flashlite may read tensor values back to the host, and when it may cache.

* ``tracing``: compiling, exporting or under a dispatch mode (the tensor may be fake): work done
  now becomes part of a graph, so nothing is cached and no value is read.
* ``capturing``: a CUDA graph is being captured: no value is read (it would synchronize and fail),
  and nothing created now is cached (its data exists only after replay).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode


def tracing(t: Tensor) -> bool:
    return type(t) is not Tensor or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def values_readable(t: Tensor) -> bool:
    """True when reading ``t``'s values on the host is allowed (neither tracing nor capturing)."""
    return not (tracing(t) or capturing(t))


__all__ = ["tracing", "capturing", "values_readable"]
