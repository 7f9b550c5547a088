"""What a backend is: a named set of kernels that says what it supports and why not.

A backend serves the two engines:

* tile engine (full, causal, window, block-sparse): ``tile_forward`` / ``tile_backward`` over a
  ``TileSchedule`` built at the backend's own tile size (``tile_config``);
* gather engine (top-k): ``gather_forward`` / ``gather_backward`` over an index tensor
  ``[B, Hkv|1, Nq, K]`` or ``[B, Hkv|1, K]`` (-1 = empty slot).

Each returns/consumes ``out`` like q and ``lse`` float32 ``[B, Hq, Nq]``. ``softcap`` is 0.0
when off; ``alibi_slopes`` is None or float32 ``[Hq]`` / ``[B, Hq]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Request:
    """What a call needs, as a backend sees it."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    engine: str  # "tile" or "gather"
    pattern: str  # "full", "causal", "window", "block_sparse", "topk"
    requires_grad: bool = False
    has_alibi: bool = False
    has_softcap: bool = False
    block_size: Optional[int] = None


@dataclass(frozen=True)
class TileSizes:
    block_m: int
    block_n: int


class Backend:
    """Base class; subclasses override what they implement."""

    name = "base"
    devices: Tuple[str, ...] = ()
    deterministic_backward = True

    def available(self) -> Optional[str]:
        """None if the backend can run on this machine, else the reason it cannot."""
        return None

    def why_not(self, req: Request) -> Optional[str]:
        """None if the backend serves ``req``, else a short reason."""
        reason = self.available()
        if reason:
            return reason
        if req.device_type not in self.devices:
            return f"runs on {'/'.join(self.devices)} tensors, not {req.device_type}"
        if req.dtype not in DTYPES:
            return f"dtype {req.dtype} not supported"
        if req.head_dim > MAX_HEAD_DIM:
            return f"head_dim {req.head_dim} > {MAX_HEAD_DIM}"
        return None

    def tile_config(self, req: Request) -> TileSizes:
        raise NotImplementedError

    def tile_forward(self, q, k, v, schedule, scale: float, softcap: float, alibi_slopes):
        raise NotImplementedError(f"backend {self.name!r} has no tile forward")

    def tile_backward(self, grad_out, q, k, v, out, lse, schedule, scale, softcap, alibi_slopes):
        raise NotImplementedError(f"backend {self.name!r} has no tile backward")

    def gather_forward(self, q, k, v, indices, causal: bool, scale: float, softcap: float, alibi_slopes):
        raise NotImplementedError(f"backend {self.name!r} has no gather forward")

    def gather_backward(self, grad_out, q, k, v, out, lse, indices, causal, scale, softcap, alibi_slopes):
        raise NotImplementedError(f"backend {self.name!r} has no gather backward")

    def __repr__(self) -> str:
        return f"<flashlite backend {self.name}>"
