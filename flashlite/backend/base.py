"""What a backend is: a named set of kernels that declares what it serves and answers "why not".

A backend declares its devices, dtypes, largest head_dim, engines (``"tile"`` for full, causal,
window and block-sparse schedules; ``"gather"`` for top-k) and whether its backward can be
non-deterministic (atomics, GPU only). ``why_not(request)`` reads those declarations (plus
``available()``, which says whether the backend runs on this machine at all), so the dispatcher
can list every backend's reason when none fits.

Work goes through a plan (``flashlite.dispatch.plan``): the backend contributes its launch
configuration (``tile_config``) and any tensors of its own (``prepare_gather``), and its
``forward`` / ``backward`` take the plan. ``out`` is like q, ``lse`` float32 ``[B, Hq, Nq]``;
``softcap`` is 0.0 when off; ``alibi_slopes`` is None or float32 contiguous ``[Hq]`` / ``[B, Hq]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..core.gather_rows import canonical_rows, key_index

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
    deterministic: bool = True
    block_size: Optional[int] = None
    packed: bool = False  # a packed (varlen) batch on the tile engine: work items in the schedule
    dropout: bool = False  # attention dropout (flashlite.core.dropout's mask)
    stats: bool = False  # head statistics (flashlite.attention_stats) from the forward, entropy in the backward
    head_mask: bool = False  # a bool head mask in the plan (flashlite.core.head_mask): masked heads skipped


@dataclass(frozen=True)
class TileConfig:
    """A tile-engine launch: tile sizes, and for GPU kernels warps and pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int = 0
    num_stages: int = 0


class Backend:
    """Base class: declarations plus the kernels a subclass implements."""

    name = "base"
    devices: Tuple[str, ...] = ()
    dtypes: Tuple[torch.dtype, ...] = DTYPES
    max_head_dim = MAX_HEAD_DIM
    engines: Tuple[str, ...] = ("tile", "gather")
    # True where the backend has a faster backward with atomics that `deterministic=False` selects.
    atomic_backward = False
    # True when forward is plain differentiable PyTorch (autograd needs no custom op).
    differentiable = False
    # True where the tile kernels read packed work items (TileSchedule.q_items / k_items). The
    # gather engine needs nothing: packed top-k rows are ordinary rows in packed coordinates.
    packed_tiles = False
    # True where the tile kernels' forward reads keys through a paged cache's block table
    # (TileSchedule.block_table / cache_seqlens / page_size); elsewhere a paged cache runs on the
    # gather engine over physical rows (flashlite.core.paged).
    paged_tiles = False
    # True where forward/backward take ``dropout=(p, seed)`` and apply flashlite.core.dropout's mask.
    dropout = False
    # True where forward takes ``stats=sink_tokens`` and returns ``(out, lse, row_stats)``, and
    # backward takes ``entropy=entropy_terms`` (flashlite.reference.attention_stats /
    # attention_backward give the contract).
    stats = False
    # The engines whose kernels skip a bool head mask's masked heads (flashlite.core.head_mask): the
    # tile engine's plan zeroes their schedule counts, which every tile kernel reads; a gather
    # engine must read the plan's ``row_keep`` (passed to forward/backward through the plan).
    head_mask: Tuple[str, ...] = ("tile",)

    def available(self) -> Optional[str]:
        """None if the backend can run on this machine, else the reason it cannot."""
        return None

    def why_not(self, req: Request) -> Optional[str]:
        """None if the backend serves ``req``, else a short reason."""
        reason = self.available()
        if reason:
            return reason
        if req.device_type not in self.devices:
            return f"runs on {'/'.join(self.devices)} tensors; these are on {req.device_type}"
        if req.dtype not in self.dtypes:
            return f"dtype {req.dtype} not supported"
        if req.head_dim > self.max_head_dim:
            return f"head_dim {req.head_dim} > {self.max_head_dim}"
        if req.engine not in self.engines:
            return f"no {req.engine} engine (pattern {req.pattern})"
        if req.packed and req.engine == "tile" and not self.packed_tiles:
            return f"no packed (varlen) work items in its tile kernels yet (pattern {req.pattern})"
        if req.dropout and not self.dropout:
            return "no attention dropout in its kernels yet"
        if req.stats and not self.stats:
            return "no head statistics in its kernels yet"
        if req.head_mask and req.engine not in self.head_mask:
            return f"no per-head skip (bool head_mask) in its {req.engine} kernels yet"
        return None

    def slower_here(self, req: Request) -> Optional[str]:
        """For automatic selection only: why another backend is the better choice for ``req`` even
        though this one serves it (None = no reason). ``backend=`` still picks this one."""
        return None

    # -- plan ingredients -------------------------------------------------------------------------
    def tile_config(self, req: Request, device: torch.device) -> TileConfig:
        """The complete launch configuration of the tile engine for this request."""
        raise NotImplementedError(f"backend {self.name!r} has no tile engine")

    def gather_rows(self, indices: torch.Tensor, seqlen_q: int, seqlen_k: int, causal: bool) -> torch.Tensor:
        """Canonical top-k rows (``flashlite.core.gather_rows.canonical_rows``); a backend may build
        the same tensor faster on its device."""
        return canonical_rows(indices, seqlen_q, seqlen_k, causal)

    def key_index(self, rows: torch.Tensor, seqlen_q: int, seqlen_k: int,
                  causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """The inverse key index of canonical rows (``flashlite.core.gather_rows.key_index``); a
        backend may build the same CSR faster on its device."""
        return key_index(rows, seqlen_q, seqlen_k, causal)

    def prepare_gather(self, rows: torch.Tensor, key_offsets: Optional[torch.Tensor],
                       key_slots: Optional[torch.Tensor], req: Request, shape: Tuple[int, ...],
                       causal: bool) -> Tuple[Tuple[int, ...], Tuple[torch.Tensor, ...]]:
        """Backend-specific part of a top-k plan: (ints, tensors) (none by default)."""
        return (), ()

    # -- kernels ----------------------------------------------------------------------------------
    # A backend that declares ``dropout`` also takes the keyword ``dropout=(p, seed)`` (p > 0) in
    # forward and backward; it is passed only when dropout is on. One that declares ``stats`` takes
    # ``stats=sink_tokens`` in forward (then it returns ``(out, lse, row_stats)``, row_stats float32
    # ``[5, B, Hq, Nq]`` in flashlite.reference.STAT_NAMES order) and ``entropy=entropy_terms``
    # (float32 ``[2, B, Hq, Nq]``: the entropy's gradient g and g·(lse − H)) in backward.
    def forward(self, plan, q, k, v, scale: float, softcap: float, alibi_slopes):
        raise NotImplementedError(f"backend {self.name!r} has no forward")

    def backward(self, plan, grad_out, q, k, v, out, lse, scale: float, softcap: float, alibi_slopes):
        raise NotImplementedError(f"backend {self.name!r} has no backward")

    def __repr__(self) -> str:
        return f"<flashlite backend {self.name}>"
