"""The C++ backends: flashlite._C's CPU kernels ("cpu") and CUDA kernels ("cuda").

Importing this module registers them. If flashlite._C is missing (not built, or built against
another torch), flashlite still works: one warning says how to build it, CPU tensors fall back
to the reference backend, and ``flashlite.backends()`` reports the reason.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from typing import Optional, Tuple

import torch

from .base import Backend, Request, TileSizes

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (or `make setup`) in the flashlite checkout"

# Why flashlite._C could not be imported (None when it was, or before the first attempt).
missing_reason: Optional[str] = None
_warned = False


def load_extension():
    """Import flashlite._C; on failure record why, warn once, and return None."""
    global missing_reason, _warned
    try:
        module = importlib.import_module("flashlite._C")
    except ImportError as exc:
        missing_reason = f"flashlite._C (the C++ extension) is not built or does not load ({exc}); {BUILD_HINT}"
        if not _warned:
            _warned = True
            warnings.warn(f"{missing_reason}. CPU tensors fall back to the reference backend.", RuntimeWarning,
                          stacklevel=2)
        return None
    missing_reason = None
    return module


CPU_TILE = 64  # csrc/cpu/driver.cpp tile_config()


def cpu_tile_sizes(block_size: int) -> Tuple[int, int]:
    """The CPU kernels' (block_m, block_n): 64 x 64, or block_size x block_size for a smaller
    block-sparse block. Mirrors ``flashlite._C.cpu_tile_config`` (a test checks they agree) in plain
    Python, so ``torch.compile`` traces dispatch without calling into the extension."""
    tile = block_size if 0 < block_size < CPU_TILE else CPU_TILE
    return tile, tile


def _assume_constant(fn):
    assume = getattr(getattr(torch, "compiler", None), "assume_constant_result", None)
    return assume(fn) if assume is not None else fn


def _slopes(alibi_slopes: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if alibi_slopes is None else alibi_slopes.to(torch.float32).contiguous()


def _indices(indices: torch.Tensor) -> torch.Tensor:
    return indices.to(torch.int64).contiguous()


class NativeBackend(Backend):
    """Shared wiring of the flashlite._C kernels ``{prefix}_tile_forward`` etc."""

    prefix = ""
    deterministic_backward = True

    def __init__(self, extension) -> None:
        self._ext = extension

    def _fn(self, name: str):
        return getattr(self._ext, f"{self.prefix}_{name}")

    def tile_config(self, req: Request) -> TileSizes:
        block_m, block_n = self._fn("tile_config")(req.head_dim, req.dtype, int(req.block_size or 0))
        return TileSizes(block_m, block_n)

    def tile_forward(self, q, k, v, schedule, scale, softcap, alibi_slopes):
        out, lse = self._fn("tile_forward")(
            q, k, v, schedule.kv_tiles, schedule.kv_count, _slopes(alibi_slopes), schedule.is_list,
            schedule.block_m, schedule.block_n, schedule.window_left, schedule.window_right,
            float(scale), float(softcap or 0.0))
        return out, lse

    def tile_backward(self, grad_out, q, k, v, out, lse, schedule, scale, softcap, alibi_slopes):
        dq, dk, dv = self._fn("tile_backward")(
            grad_out, q, k, v, out, lse, schedule.kv_tiles, schedule.kv_count, schedule.q_tiles, schedule.q_count,
            _slopes(alibi_slopes), schedule.is_list, schedule.block_m, schedule.block_n, schedule.window_left,
            schedule.window_right, float(scale), float(softcap or 0.0), self.deterministic_backward)
        return dq, dk, dv

    def gather_forward(self, q, k, v, indices, causal, scale, softcap, alibi_slopes):
        out, lse = self._fn("gather_forward")(q, k, v, _indices(indices), _slopes(alibi_slopes), bool(causal),
                                              float(scale), float(softcap or 0.0))
        return out, lse

    def gather_backward(self, grad_out, q, k, v, out, lse, indices, causal, scale, softcap, alibi_slopes):
        dq, dk, dv = self._fn("gather_backward")(
            grad_out, q, k, v, out, lse, _indices(indices), _slopes(alibi_slopes), bool(causal), float(scale),
            float(softcap or 0.0), self.deterministic_backward)
        return dq, dk, dv


class CpuBackend(NativeBackend):
    """C++ kernels for CPU tensors (OpenMP, vectorized; float16/bfloat16 computed in float32)."""

    name = "cpu"
    prefix = "cpu"
    devices = ("cpu",)

    def tile_config(self, req: Request) -> TileSizes:
        return TileSizes(*cpu_tile_sizes(int(req.block_size or 0)))


class CudaBackend(NativeBackend):
    """CUDA C++ kernels (csrc/cuda/) for CUDA tensors."""

    name = "cuda"
    prefix = "cuda"
    devices = ("cuda",)

    def available(self) -> Optional[str]:
        if not torch.cuda.is_available():
            return "no CUDA device is present"
        return None

    def tile_config(self, req: Request) -> TileSizes:
        device = torch.cuda.current_device()
        return TileSizes(*_cuda_tile_sizes(req.head_dim, req.dtype, int(req.block_size or 0), device))

    def why_not(self, req: Request) -> Optional[str]:
        # csrc/cuda/launch.h: float16/bfloat16/float32, head_dim 1..256, every tile schedule and the
        # gather engine, softcap and ALiBi - exactly the base checks (device, dtype, head_dim).
        return super().why_not(req)


@_assume_constant
@functools.lru_cache(maxsize=None)
def _cuda_tile_sizes(head_dim: int, dtype: torch.dtype, block_size: int, device: int) -> Tuple[int, int]:
    """cuda_tile_config for the current device, cached; a constant to torch.compile."""
    block_m, block_n = importlib.import_module("flashlite._C").cuda_tile_config(head_dim, dtype, block_size)
    return int(block_m), int(block_n)


def register_all() -> None:
    """Register "cpu" (and "cuda" where flashlite._C has CUDA kernels and a device exists)."""
    from . import register

    extension = load_extension()
    if extension is None:
        return
    register(CpuBackend(extension))
    if hasattr(extension, "cuda_tile_forward") and torch.cuda.is_available():
        register(CudaBackend(extension))


register_all()
