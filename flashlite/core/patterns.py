"""Attention patterns: pure data describing which keys each query sees.

A pattern knows four things: how to check its shapes against q/k (``validate``, no device
sync) and its values (``check_values``, once per plan), the dense boolean mask the reference
uses (``dense_mask``), its identity for the plan cache (``cache_key``), and - for the tile
engine - its block schedule at a given tile size (``schedule``; the plan in
``flashlite.dispatch.plan`` builds it once per call shape and reuses it). ``TopK`` is served by
the gather engine: its rows are made canonical by ``flashlite.core.gather_rows``.

Positions are aligned bottom-right: query ``i`` sits at ``p(i) = i + Nk - Nq``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .schedule import TileSchedule, band_schedule, block_layout_schedule, cdiv, expand_layout, compress_layout

BLOCK_SIZES = (16, 32, 64, 128)


def _nonneg_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a non-negative int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


class Pattern:
    """Base class. ``engine`` is ``"tile"`` (block schedule) or ``"gather"`` (top-k)."""

    engine = "tile"
    name = "pattern"

    # -- tile engine -------------------------------------------------------------------------
    def band(self) -> tuple[Optional[int], Optional[int]]:
        """(left, right) band limits; None means unbounded on that side."""
        return None, None

    def schedule(self, seqlen_q: int, seqlen_k: int, block_m: int, block_n: int,
                 device: Union[str, torch.device] = "cpu") -> TileSchedule:
        """The block schedule at this tile size (built anew; plans keep the one they use)."""
        left, right = self.band()
        return band_schedule(seqlen_q, seqlen_k, block_m, block_n, left, right, torch.device(device))

    def cache_key(self) -> tuple:
        """What identifies this pattern for the plan cache: plain values, plus the tensors it holds
        (the cache keys those by identity and version and holds them weakly)."""
        return (type(self).__name__,) + tuple(x if x is not None else -1 for x in self.band())

    def tensors(self) -> tuple:
        """The tensors the pattern holds (keyed by identity + version in the plan cache)."""
        return ()

    # -- reference ----------------------------------------------------------------------------
    def dense_mask(self, batch: int, heads_q: int, heads_kv: int, seqlen_q: int, seqlen_k: int,
                   device, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Bool mask ``[B|1, Hq|1, Nq, Nk]``: True where query i may attend key j. ``rows=(r0, r1)``:
        only query rows ``r0 <= i < r1`` (``[B|1, Hq|1, r1 - r0, Nk]``, never the whole matrix)."""
        left, right = self.band()
        return band_mask(seqlen_q, seqlen_k, left, right, device, rows)[None, None]

    def validate(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Raise ValueError/TypeError if the pattern's shapes do not fit q ``[B,Hq,Nq,D]`` /
        k ``[B,Hkv,Nk,D]``. Reads no tensor values (no device sync)."""

    def check_values(self, seqlen_k: int) -> None:
        """Raise ValueError if the pattern's tensor values are out of range (may sync a device;
        run once per plan, skipped while compiling or capturing a CUDA graph)."""

    def keys_per_query(self, seqlen_q: int, seqlen_k: int) -> torch.Tensor:
        """How many keys each query attends (``[B|1, H|1, Nq]``), for FLOP counts and tests."""
        return self.dense_mask(1, 1, 1, seqlen_q, seqlen_k, "cpu").sum(-1)

    def slice_heads(self, batch: slice, heads_q: slice, heads_kv: slice) -> "Pattern":
        """The pattern of the batch rows ``batch``, query heads ``heads_q`` and their key heads
        ``heads_kv`` (how a head mask runs only the kept heads, on views). Head-independent patterns
        return themselves."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def row_range(rows: Optional[tuple[int, int]], seqlen_q: int) -> tuple[int, int]:
    """``rows`` checked as ``(r0, r1)`` with ``0 <= r0 <= r1 <= Nq``; None is every row."""
    if rows is None:
        return 0, seqlen_q
    ok = isinstance(rows, (tuple, list)) and len(rows) == 2 and all(
        isinstance(r, int) and not isinstance(r, bool) for r in rows)
    if not ok or not 0 <= rows[0] <= rows[1] <= seqlen_q:
        raise ValueError(f"rows must be a (start, end) pair of ints with 0 <= start <= end <= Nq = {seqlen_q}, "
                         f"got {rows!r}")
    return rows[0], rows[1]


def band_mask(seqlen_q: int, seqlen_k: int, left: Optional[int], right: Optional[int], device,
              rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """``[Nq, Nk]`` bool: ``p(i) - left <= j <= p(i) + right`` (None = unbounded); with
    ``rows=(r0, r1)`` only query rows ``r0 <= i < r1`` (``[r1 - r0, Nk]``)."""
    r0, r1 = row_range(rows, seqlen_q)
    pos = torch.arange(r0, r1, device=device)[:, None] + (seqlen_k - seqlen_q)
    key = torch.arange(seqlen_k, device=device)[None, :]
    mask = torch.ones(r1 - r0, seqlen_k, dtype=torch.bool, device=device)
    if left is not None:
        mask &= key >= pos - left
    if right is not None:
        mask &= key <= pos + right
    return mask


class Full(Pattern):
    """Every key (``causal=False``) or keys ``j <= p(i)`` (``causal=True``)."""

    def __init__(self, causal: bool = False) -> None:
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        self.causal = causal

    def band(self):
        return (None, 0) if self.causal else (None, None)

    @property
    def name(self) -> str:  # type: ignore[override]
        return "causal" if self.causal else "full"

    def __repr__(self) -> str:
        return f"Full(causal={self.causal})"


class SlidingWindow(Pattern):
    """Keys ``p(i) - left <= j <= p(i) + right``. ``SlidingWindow(w)`` is causal with window w."""

    name = "window"

    def __init__(self, left: int, right: int = 0) -> None:
        self.left = _nonneg_int(left, "window left")
        self.right = _nonneg_int(right, "window right")

    def band(self):
        return self.left, self.right

    def __repr__(self) -> str:
        return f"SlidingWindow(left={self.left}, right={self.right})"


def _check_bool_layout(layout, name: str) -> torch.Tensor:
    if not isinstance(layout, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype bool, got {type(layout).__name__}")
    if layout.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool, got {layout.dtype}")
    if layout.dim() != 4:
        raise ValueError(f"{name} must have shape [B|1, H|1, ceil(Nq/block_size), ceil(Nk/block_size)], "
                         f"got {tuple(layout.shape)}")
    return layout


class BlockSparse(Pattern):
    """Keys in the ``block_size`` x ``block_size`` tiles marked True in ``layout``.

    ``layout``: bool ``[B|1, Hq|1, ceil(Nq/block_size), ceil(Nk/block_size)]``, broadcast over
    batch and query heads. ``causal=True`` additionally applies the causal band inside tiles.
    Build from the compressed form (per query block: a count and a list of key blocks, as in
    FlexAttention's BlockMask ``kv_num_blocks`` / ``kv_indices``) with ``from_compressed``.
    """

    name = "block_sparse"

    def __init__(self, layout: torch.Tensor, block_size: int = 64, causal: bool = False) -> None:
        self.layout = _check_bool_layout(layout, "layout")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
        self.block_size = block_size
        self.causal = bool(causal)
        self._compressed = None

    @classmethod
    def from_compressed(cls, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, block_size: int,
                        num_kv_blocks: int, causal: bool = False) -> "BlockSparse":
        """From counts ``[B|1, H|1, Mb]`` and key-block lists ``[B|1, H|1, Mb, L]`` (entries past the
        count are ignored)."""
        if kv_indices.dim() != 4 or kv_num_blocks.shape != kv_indices.shape[:-1]:
            raise ValueError(f"kv_num_blocks must be [B, H, Mb] and kv_indices [B, H, Mb, L]; got "
                             f"{tuple(kv_num_blocks.shape)} and {tuple(kv_indices.shape)}")
        if kv_indices.dtype not in (torch.int32, torch.int64) or kv_num_blocks.dtype not in (torch.int32, torch.int64):
            raise TypeError("kv_num_blocks and kv_indices must be int32 or int64 tensors")
        width = kv_indices.shape[-1]
        used = torch.arange(width, device=kv_indices.device) < kv_num_blocks.unsqueeze(-1)
        if bool(((kv_indices < 0) | (kv_indices >= num_kv_blocks))[used].any()):
            raise ValueError(f"kv_indices must lie in [0, {num_kv_blocks}) where used")
        pattern = cls(expand_layout(kv_num_blocks, kv_indices, num_kv_blocks), block_size, causal)
        pattern._compressed = (kv_num_blocks.to(torch.int32), kv_indices.to(torch.int32))
        return pattern

    def to_compressed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv_num_blocks ``[B|1, H|1, Mb]`` int32, kv_indices ``[B|1, H|1, Mb, L]`` int32, -1 padded)."""
        if self._compressed is None:
            lists, counts = compress_layout(self.layout)
            self._compressed = (counts, lists)
        return self._compressed

    def band(self):
        return (None, 0) if self.causal else (None, None)

    def schedule(self, seqlen_q, seqlen_k, block_m, block_n, device="cpu") -> TileSchedule:
        left, right = self.band()
        return block_layout_schedule(self.layout.to(device), self.block_size, seqlen_q, seqlen_k,
                                     block_m, block_n, left, right)

    def cache_key(self) -> tuple:
        return ("BlockSparse", self.block_size, self.causal)

    def tensors(self) -> tuple:
        return (self.layout,)

    def validate(self, q: torch.Tensor, k: torch.Tensor) -> None:
        batch, heads_q, seqlen_q = q.shape[0], q.shape[1], q.shape[2]
        seqlen_k = k.shape[2]
        want = (cdiv(seqlen_q, self.block_size), cdiv(seqlen_k, self.block_size))
        lb, lh = self.layout.shape[:2]
        if tuple(self.layout.shape[2:]) != want or lb not in (1, batch) or lh not in (1, heads_q):
            raise ValueError(
                f"layout must have shape [{batch}|1, {heads_q}|1, {want[0]}, {want[1]}] for Nq={seqlen_q}, "
                f"Nk={seqlen_k}, block_size={self.block_size}; got {tuple(self.layout.shape)}")
        if self.layout.device != q.device:
            raise ValueError(f"layout is on {self.layout.device} but q is on {q.device}")

    def dense_mask(self, batch, heads_q, heads_kv, seqlen_q, seqlen_k, device, rows=None):
        r0, r1 = row_range(rows, seqlen_q)
        bs = self.block_size
        first = r0 // bs  # the layout rows that hold query rows r0 .. r1 - 1
        mask = self.layout[..., first:cdiv(r1, bs), :].to(device).repeat_interleave(bs, -2)
        mask = mask[..., r0 - first * bs:r1 - first * bs, :].repeat_interleave(bs, -1)[..., :seqlen_k]
        left, right = self.band()
        return mask & band_mask(seqlen_q, seqlen_k, left, right, device, (r0, r1))

    def keys_per_query(self, seqlen_q, seqlen_k):
        return self.dense_mask(1, 1, 1, seqlen_q, seqlen_k, self.layout.device).sum(-1)

    def slice_heads(self, batch, heads_q, heads_kv):
        layout = self.layout[batch if self.layout.shape[0] > 1 else slice(None),
                             heads_q if self.layout.shape[1] > 1 else slice(None)]
        return BlockSparse(layout, self.block_size, self.causal)

    def __repr__(self) -> str:
        return (f"BlockSparse(layout={tuple(self.layout.shape)}, block_size={self.block_size}, "
                f"density={float(self.layout.float().mean()):.3f}, causal={self.causal})")


class TopK(Pattern):
    """Each query attends exactly the key positions listed for it.

    ``indices``: int32/int64 ``[B, Hkv|1, Nq, K]`` (per query) or ``[B, Hkv|1, K]`` (shared by every
    query). ``-1`` marks an empty slot; entries of a row are distinct. With ``causal=True`` an index
    after ``p(i)`` is ignored.
    """

    engine = "gather"
    name = "topk"

    def __init__(self, indices: torch.Tensor, causal: bool = False) -> None:
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be an int32/int64 torch.Tensor, got {type(indices).__name__}")
        if indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"indices must have dtype int32 or int64, got {indices.dtype}")
        if indices.dim() not in (3, 4):
            raise ValueError(f"indices must have shape [B, Hkv|1, Nq, K] or [B, Hkv|1, K], got {tuple(indices.shape)}")
        self.indices = indices
        self.causal = bool(causal)

    @property
    def per_query(self) -> bool:
        return self.indices.dim() == 4

    def validate(self, q: torch.Tensor, k: torch.Tensor) -> None:
        batch, seqlen_q, heads_kv = q.shape[0], q.shape[2], k.shape[1]
        ind = self.indices
        form = f"[{batch}, {heads_kv}|1, {seqlen_q}, K]" if self.per_query else f"[{batch}, {heads_kv}|1, K]"
        ok = ind.shape[0] == batch and ind.shape[1] in (1, heads_kv) and ind.shape[-1] >= 1
        if self.per_query:
            ok = ok and ind.shape[2] == seqlen_q
        if not ok:
            raise ValueError(f"indices must have shape {form}, got {tuple(ind.shape)}")
        if ind.device != q.device:
            raise ValueError(f"indices is on {ind.device} but q is on {q.device}")

    def check_values(self, seqlen_k: int) -> None:
        if self.indices.numel():
            low, high = (int(x) for x in torch.aminmax(self.indices))
            if low < -1 or high >= seqlen_k:
                raise ValueError(f"indices must lie in [-1, Nk) = [-1, {seqlen_k}); got values in [{low}, {high}]")

    def cache_key(self) -> tuple:
        return ("TopK", self.causal)

    def tensors(self) -> tuple:
        return (self.indices,)

    def gather_indices(self) -> torch.Tensor:
        """The indices the gather plan is built from (a packed pattern moves them first)."""
        return self.indices

    def slice_heads(self, batch, heads_q, heads_kv):
        return TopK(self.indices[batch, heads_kv if self.indices.shape[1] > 1 else slice(None)], causal=self.causal)

    def row_indices(self, seqlen_q: int) -> torch.Tensor:
        """Indices as ``[B, Hkv|1, Nq, K]`` (a shared list is broadcast to every query)."""
        if self.per_query:
            return self.indices
        return self.indices.unsqueeze(2).expand(-1, -1, seqlen_q, -1)

    def dense_mask(self, batch, heads_q, heads_kv, seqlen_q, seqlen_k, device, rows=None):
        r0, r1 = row_range(rows, seqlen_q)
        ind = self.row_indices(seqlen_q)[:, :, r0:r1].to(device).long()
        target = torch.where(ind < 0, torch.full_like(ind, seqlen_k), ind)
        mask = torch.zeros((*ind.shape[:-1], seqlen_k + 1), dtype=torch.bool, device=device)
        mask.scatter_(-1, target, True)
        mask = mask[..., :seqlen_k]
        if self.causal:
            mask = mask & band_mask(seqlen_q, seqlen_k, None, 0, device, (r0, r1))
        if mask.shape[1] not in (1, heads_q):  # per-KV-head -> per-query-head
            if heads_q % mask.shape[1]:
                raise ValueError(f"indices have {mask.shape[1]} heads; q has {heads_q} (must be a multiple)")
            mask = mask.repeat_interleave(heads_q // mask.shape[1], dim=1)
        return mask

    def keys_per_query(self, seqlen_q, seqlen_k):
        heads = self.indices.shape[1]  # per KV head (or 1 when broadcast)
        return self.dense_mask(self.indices.shape[0], heads, heads, seqlen_q, seqlen_k, self.indices.device).sum(-1)

    def __repr__(self) -> str:
        return f"TopK(indices={tuple(self.indices.shape)}, causal={self.causal})"


__all__ = ["Pattern", "Full", "SlidingWindow", "BlockSparse", "TopK", "band_mask", "row_range", "BLOCK_SIZES"]
