"""The C++ backends: flashlite._C's CPU kernels ("cpu") and CUDA kernels ("cuda").

``register_all`` registers them once flashlite._C imports. If it is missing (not built, or built
against another torch), flashlite still works: one warning says how to build it, CPU tensors
fall back to the reference backend, and ``flashlite.backends()`` reports the reason.

The cpu backend also builds the top-k plan's canonical rows and inverse key index in C++
(``cpu_canonical_rows`` / ``cpu_key_index``: the same elements as flashlite.core.gather_rows, without
its full-tensor sorts), except while tracing, where the torch builders become part of the graph.

Tile sizes come from the C++ side (``cpu_tile_config`` / ``cuda_tile_config``), read once into a
table per backend (per device for CUDA), so planning under ``torch.compile`` reads a Python dict
instead of calling into the extension.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Dict, Optional, Tuple

import torch

from ..core.patterns import BLOCK_SIZES
from ..core.tracing import tracing
from .base import MAX_HEAD_DIM, Backend, Request, TileConfig

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (or `make setup`) in the flashlite checkout"

# Why flashlite._C could not be imported (None when it was, or before the first attempt).
missing_reason: Optional[str] = None


def load_extension():
    """Import flashlite._C; on failure record why, warn once, and return None."""
    global missing_reason
    try:
        return importlib.import_module("flashlite._C")
    except ImportError as exc:
        missing_reason = f"flashlite._C (the C++ extension) is not built or does not load ({exc}); {BUILD_HINT}"
        warnings.warn(f"{missing_reason}. CPU tensors fall back to the reference backend.", RuntimeWarning,
                      stacklevel=3)
        return None


class NativeBackend(Backend):
    """Shared wiring of the flashlite._C kernels ``{prefix}_tile_forward`` etc. (named arguments)."""

    prefix = ""
    engines = ("tile", "gather")

    def __init__(self, extension) -> None:
        self._ext = extension
        self._fns = {name: getattr(extension, f"{self.prefix}_{name}")
                     for name in ("tile_forward", "tile_backward", "gather_forward", "gather_backward")}

    @staticmethod
    def _packed(schedule) -> dict:
        """A packed batch's work items as the kernels' named arguments (none for a plain batch, so
        a build without them still serves plain calls)."""
        if not schedule.is_packed:
            return {}
        return dict(q_items=schedule.q_items, k_items=schedule.k_items, cu_seqlens_q=schedule.cu_seqlens_q,
                    cu_seqlens_k=schedule.cu_seqlens_k)

    @staticmethod
    def _paged(schedule) -> dict:
        """A paged cache's block table as the kernels' named arguments (none for contiguous keys)."""
        if not schedule.is_paged:
            return {}
        return dict(block_table=schedule.block_table, cache_seqlens=schedule.cache_seqlens,
                    page_size=schedule.page_size)

    @staticmethod
    def _dropout(dropout) -> dict:
        """``dropout=(p, seed)`` as the kernels' named arguments (none when off, so a build without
        them still serves calls without dropout)."""
        if dropout is None:
            return {}
        p, seed = dropout
        return dict(dropout_p=float(p), dropout_seed=int(seed))

    @staticmethod
    def _keep(plan) -> dict:
        """A gather plan's head mask (``row_keep``) as the kernels' named argument (none without one,
        so a build without it still serves unmasked calls)."""
        return {} if plan.row_keep is None else dict(row_keep=plan.row_keep)

    def forward(self, plan, q, k, v, scale, softcap, alibi_slopes, dropout=None, stats=None):
        # stats=sink_tokens (backends that declare ``stats``): the kernels fill a row_stats buffer.
        extra = self._dropout(dropout)
        row_stats = None
        if stats is not None:
            row_stats = torch.empty((5,) + tuple(q.shape[:3]), dtype=torch.float32, device=q.device)
            extra.update(row_stats=row_stats, sink_tokens=int(stats))
        if plan.engine == "tile":
            s = plan.schedule
            out, lse = self._fns["tile_forward"](
                q, k, v, kv_tiles=s.kv_tiles, kv_count=s.kv_count, alibi_slopes=alibi_slopes, is_list=s.is_list,
                block_m=s.block_m, block_n=s.block_n, window_left=s.window_left, window_right=s.window_right,
                scale=scale, softcap=softcap, **self._packed(s), **self._paged(s), **extra)
        else:
            out, lse = self._fns["gather_forward"](q, k, v, indices=plan.rows, alibi_slopes=alibi_slopes,
                                                   causal=plan.causal, scale=scale, softcap=softcap,
                                                   **self._keep(plan), **extra)
        return (out, lse) if row_stats is None else (out, lse, row_stats)

    def backward(self, plan, grad_out, q, k, v, out, lse, scale, softcap, alibi_slopes, dropout=None, entropy=None):
        # entropy: float32 [2, B, Hq, Nq] (g, g·(lse − H)), the entropy's gradient terms.
        extra = self._dropout(dropout)
        if entropy is not None:
            extra["entropy"] = entropy
        if plan.engine == "tile":
            s = plan.schedule
            return self._fns["tile_backward"](
                grad_out, q, k, v, out, lse, kv_tiles=s.kv_tiles, kv_count=s.kv_count, q_tiles=s.q_tiles,
                q_count=s.q_count, alibi_slopes=alibi_slopes, is_list=s.is_list, block_m=s.block_m,
                block_n=s.block_n, window_left=s.window_left, window_right=s.window_right, scale=scale,
                softcap=softcap, deterministic=plan.deterministic, **self._packed(s), **extra)
        return self._fns["gather_backward"](
            grad_out, q, k, v, out, lse, indices=plan.rows, key_offsets=plan.key_offsets, key_slots=plan.key_slots,
            alibi_slopes=alibi_slopes, causal=plan.causal, scale=scale, softcap=softcap,
            deterministic=plan.deterministic, **self._keep(plan), **extra)


class CpuBackend(NativeBackend):
    """C++ kernels for CPU tensors (OpenMP, vectorized; float16/bfloat16 computed in float32)."""

    name = "cpu"
    prefix = "cpu"
    devices = ("cpu",)
    packed_tiles = True  # cpu_tile_forward/backward take q_items, k_items, cu_seqlens_q/k
    dropout = True  # the four kernel functions take dropout_p / dropout_seed (docs/native_abi.md)
    stats = True  # forwards take row_stats / sink_tokens, backwards entropy (docs/native_abi.md; checked per build)

    def __init__(self, extension) -> None:
        super().__init__(extension)
        # The CPU tile depends only on a block-sparse layout's block size (0 = none); the test
        # suite checks that against every head_dim and dtype.
        self._tiles = {size: tuple(extension.cpu_tile_config(64, torch.float32, size))
                       for size in (0,) + BLOCK_SIZES}
        # The plan's top-k tensors in C++ (same elements as core.gather_rows); None in an older build.
        self._canonical_rows = getattr(extension, "cpu_canonical_rows", None)
        self._key_index = getattr(extension, "cpu_key_index", None)
        # Paged caches on the tile kernels where this build's forward takes a block table (an older
        # build: the gather kernels over physical rows).
        self.paged_tiles = "block_table" in (extension.cpu_tile_forward.__doc__ or "")
        # Head statistics where this build's kernels take them (an older build: the reference serves them).
        self.stats = all(name in (getattr(extension, fn).__doc__ or "") for fn, name in (
            ("cpu_tile_forward", "row_stats"), ("cpu_gather_forward", "row_stats"),
            ("cpu_tile_backward", "entropy"), ("cpu_gather_backward", "entropy")))
        # The gather kernels skip masked heads where this build's take row_keep (the tile kernels
        # always do: the plan zeroes the masked heads' schedule counts).
        if all("row_keep" in (getattr(extension, fn).__doc__ or "") for fn in ("cpu_gather_forward",
                                                                               "cpu_gather_backward")):
            self.head_mask = ("tile", "gather")

    def why_not(self, req: Request) -> Optional[str]:
        # A packed top-k batch runs the gather kernels over packed key positions: mean_distance and
        # sink_mass need each sequence's local ones (the reference serves it).
        if req.stats and req.packed and req.engine == "gather":
            return "no head statistics for a packed top-k batch yet (the gather kernels see packed positions)"
        return super().why_not(req)

    def tile_config(self, req: Request, device: torch.device) -> TileConfig:
        return TileConfig(*self._tiles[req.block_size or 0])

    @staticmethod
    def _native(t: torch.Tensor) -> bool:
        """True for a CPU tensor with data, outside compiling/tracing (there the torch builders' ops
        must become part of the graph, and a fake tensor has no data)."""
        return t.device.type == "cpu" and not tracing(t)

    def gather_rows(self, indices: torch.Tensor, seqlen_q: int, seqlen_k: int, causal: bool) -> torch.Tensor:
        if (self._canonical_rows is not None and indices.dtype in (torch.int32, torch.int64)
                and self._native(indices)):
            return self._canonical_rows(indices, seqlen_q, seqlen_k, causal)
        return super().gather_rows(indices, seqlen_q, seqlen_k, causal)

    def key_index(self, rows: torch.Tensor, seqlen_q: int, seqlen_k: int,
                  causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._key_index is not None and rows.dtype == torch.int64 and rows.is_contiguous() and self._native(rows):
            return self._key_index(rows, seqlen_q, seqlen_k, causal)
        return super().key_index(rows, seqlen_q, seqlen_k, causal)


class CudaBackend(NativeBackend):
    """CUDA C++ kernels (csrc/cuda/) for CUDA tensors."""

    name = "cuda"
    prefix = "cuda"
    devices = ("cuda",)
    atomic_backward = True
    stats = True  # forwards take row_stats / sink_tokens, backwards entropy (docs/native_abi.md; checked per build)

    def __init__(self, extension) -> None:
        super().__init__(extension)
        self._tables: Dict[int, Dict[Tuple[int, torch.dtype, int], Tuple[int, int]]] = {}
        # Head statistics where this build's kernels take them (an older build: Triton or the
        # reference serves them).
        self.stats = all(name in (getattr(extension, fn).__doc__ or "") for fn, name in (
            ("cuda_tile_forward", "row_stats"), ("cuda_gather_forward", "row_stats"),
            ("cuda_tile_backward", "entropy"), ("cuda_gather_backward", "entropy")))

    def why_not(self, req: Request) -> Optional[str]:
        # As the cpu backend: a packed top-k batch's gather kernels see packed key positions.
        if req.stats and req.packed and req.engine == "gather":
            return "no head statistics for a packed top-k batch yet (the gather kernels see packed positions)"
        return super().why_not(req)

    def available(self) -> Optional[str]:
        return None if torch.cuda.is_available() else "no CUDA device is present"

    def slower_here(self, req: Request) -> Optional[str]:
        # Until the CUDA kernels have tensor-core tiles for these, Triton's are faster.
        if req.engine == "gather":
            return "top-k runs on SIMT cores here (no tensor-core gather yet): Triton is faster"
        if req.block_size is not None and req.block_size < 64 and req.dtype != torch.float32:
            return f"block_size {req.block_size} < 64 falls back to SIMT tiles here: Triton is faster"
        return None

    def _table(self, device: int):
        """cuda_tile_config for every (head_dim, dtype, block size) of one device, read once."""
        table = self._tables.get(device)
        if table is None:
            config = self._ext.cuda_tile_config
            table = {(d, dtype, size): tuple(config(d, dtype, size, device))
                     for d in range(1, MAX_HEAD_DIM + 1) for dtype in self.dtypes for size in (0,) + BLOCK_SIZES}
            self._tables[device] = table
        return table

    def tile_config(self, req: Request, device: torch.device) -> TileConfig:
        index = device.index if device.index is not None else torch.cuda.current_device()
        return TileConfig(*self._table(index)[(req.head_dim, req.dtype, req.block_size or 0)])


def register_all(register) -> None:
    """Register "cpu" (and "cuda" where flashlite._C has CUDA kernels and a device exists)."""
    extension = load_extension()
    if extension is None:
        return
    register(CpuBackend(extension))
    if hasattr(extension, "cuda_tile_forward") and torch.cuda.is_available():
        register(CudaBackend(extension))
