"""Paged KV caches: a pattern over the keys of a page pool, served by the gather engine.

A paged cache is the vLLM / flash-attn layout: ``k_cache, v_cache [num_pages, page_size, Hkv, D]``
hold every sequence's keys in fixed-size pages; ``block_table`` (int32 ``[B, max_pages]``) lists
sequence b's pages in logical order and ``cache_seqlens`` (int32 ``[B]``) how many keys it has.
Logical key ``j`` of sequence b lives in the physical slot

    slot(b, j) = block_table[b, j // page_size] · page_size + j % page_size

of the pool viewed as ``[1, Hkv, num_pages·page_size, D]`` (a view: the cache is never copied).
q ``[B, Hq, Nq, D]`` holds each sequence's newest Nq queries, query i at
``p(i) = cache_seqlens[b] − Nq + i`` (bottom-right, as everywhere in flashlite).

``Paged(inner, block_table, cache_seqlens, page_size, nq, tiles)`` adds no kernel of its own. Two
forms, one per engine:

* ``tiles=True`` (tile engine; ``Full`` and ``SlidingWindow`` on backends that declare
  ``paged_tiles``): a pattern over q ``[B, Hq, Nq, D]`` itself and the pool viewed as
  ``[B, Hkv, num_pages·page_size, D]`` (batch stride 0). Its plan (``schedule``) is each
  sequence's band schedule in logical key tiles, one row set per batch row (``[B, 1, ⌈Nq/BM⌉, 1]``),
  plus the block table and lengths as the schedule's indirection list: the tile kernels load key
  tile t of row b page by page (``slot(b, j)``), all query heads of a KV head share each load
  (decode), and long rows are split over threads and merged in a fixed order. Tiles wholly
  outside a window are not in the schedule, so their pages are never read.
* ``tiles=False`` (gather engine; ``TopK``, and every pattern on other backends): a pattern over
  the ``[1, Hq, B·Nq, D]`` view of q and the ``[1, Hkv, num_pages·page_size, D]`` pool view. Like a
  packed top-k batch (``core/packed.py``), its plan moves the rows once to physical coordinates
  (``gather_indices``): for every query the physical slots of the logical keys it sees, ``-1``
  padded, built vectorized in torch. The ordinary gather kernels (cpu, triton, cuda) then run
  non-causal over them.

* ``Full(causal)``: keys ``0..L_b−1`` (causal: ``j <= p(i)``);
* ``SlidingWindow(left, right)``: ``max(0, p(i) − left) <= j <= min(L_b − 1, p(i) + right)``;
  only those slots are listed, so pages wholly outside every window are never read;
* ``TopK``: logical positions ``[B, Hkv|1, Nq, K]`` or ``[B, Hkv|1, K]`` in ``[-1, L_b)``
  (causal: an index after ``p(i)`` is ignored).

Rows are ``[1, 1|Hkv, B·Nq, K]`` int64 with K the most keys any query sees: memory
O(B·Nq·K), built once per plan. Table entries beyond a sequence's ``ceil(L_b / page_size)`` pages
are never read nor validated (they may hold -1 or garbage). The reference runs each sequence on its
keys gathered contiguously (``gathered``). Reading ``cache_seqlens`` syncs the device once per plan
(the plan cache keys ``block_table`` and ``cache_seqlens`` by identity and version).
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from .patterns import Full, Pattern, SlidingWindow, TopK
from .schedule import TileSchedule, cdiv, clamp_band


def _int_tensor(t, name: str, dims: int, form: str, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor {form}, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have shape {form}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


class Paged(Pattern):
    """``inner`` (``Full``, ``SlidingWindow`` or ``TopK`` over logical positions) applied to each
    sequence of a paged cache (module docstring)."""

    name = "paged"

    def __init__(self, inner: Pattern, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                 page_size: int, seqlen_q: int, tiles: bool = False) -> None:
        if not isinstance(inner, (Full, SlidingWindow, TopK)):
            raise TypeError(f"pattern must be Full, SlidingWindow, TopK or None for a paged cache, "
                            f"got {type(inner).__name__}")
        if tiles and isinstance(inner, TopK):
            raise ValueError("a paged TopK runs on the gather engine (tiles=False)")
        self.inner = inner
        self.engine = "tile" if tiles else "gather"
        self.block_table, self.cache_seqlens = block_table, cache_seqlens
        self.page_size, self.seqlen_q = int(page_size), int(seqlen_q)
        self._lengths: Optional[torch.Tensor] = None

    @property
    def batch(self) -> int:
        return self.block_table.shape[0]

    @property
    def causal(self) -> bool:
        return False  # the rows are made with the causal drops already applied

    # -- identity and checks -----------------------------------------------------------------------
    def band(self):
        return self.inner.band()

    def cache_key(self) -> tuple:
        return ("Paged", self.engine, self.inner.cache_key(), self.page_size, self.seqlen_q,
                tuple(self.block_table.shape))

    def tensors(self) -> tuple:
        return (self.block_table, self.cache_seqlens) + self.inner.tensors()

    def validate(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Shapes, dtypes and devices (no device read). ``q``/``k`` are the original
        ``[B, Hq, Nq, D]`` query and the ``[num_pages, page_size, Hkv, D]`` cache."""
        batch, heads_kv = q.shape[0], k.shape[2]
        _int_tensor(self.block_table, "block_table", 2, "[B, max_pages]", q.device)
        _int_tensor(self.cache_seqlens, "cache_seqlens", 1, "[B]", q.device)
        if self.block_table.shape[0] != batch:
            raise ValueError(f"block_table must have shape [B={batch}, max_pages], got {tuple(self.block_table.shape)}")
        if self.cache_seqlens.shape[0] != batch:
            raise ValueError(f"cache_seqlens must have shape [B={batch}], got {tuple(self.cache_seqlens.shape)}")
        if isinstance(self.inner, TopK):
            ind = self.inner.indices
            per_query = ind.dim() == 4
            form = f"[{batch}, {heads_kv}|1, {self.seqlen_q}, K]" if per_query else f"[{batch}, {heads_kv}|1, K]"
            ok = ind.shape[0] == batch and ind.shape[1] in (1, heads_kv) and ind.shape[-1] >= 1
            if per_query:
                ok = ok and ind.shape[2] == self.seqlen_q
            if not ok:
                raise ValueError(f"indices must have shape {form} (logical key positions), got {tuple(ind.shape)}")
            if ind.device != q.device:
                raise ValueError(f"indices is on {ind.device} but q is on {q.device}")

    def lengths(self) -> torch.Tensor:
        """int64 ``[B]``: each sequence's number of keys, on the device."""
        if self._lengths is None:
            self._lengths = self.cache_seqlens.long()
        return self._lengths

    def check_values(self, seqlen_k: int = 0, num_pages: Optional[int] = None) -> None:
        """Lengths, the table's width and the used page ids (reads the device: once per plan).
        ``num_pages``: the pool's page count (the plan passes the pool's slot count as ``seqlen_k``)."""
        if num_pages is None:
            num_pages = seqlen_k // self.page_size
        lengths = self.lengths()
        if lengths.numel() == 0:
            return
        low = int(lengths.min())
        if low < self.seqlen_q:
            b = int((lengths < self.seqlen_q).nonzero()[0])
            raise ValueError(f"cache_seqlens must be >= Nq = {self.seqlen_q} (the new queries' keys are already in the "
                             f"cache); cache_seqlens[{b}] = {int(lengths[b])}")
        pages = (lengths + self.page_size - 1) // self.page_size
        width = self.block_table.shape[1]
        if int(pages.max()) > width:
            b = int((pages > width).nonzero()[0])
            raise ValueError(f"block_table is too narrow: cache_seqlens[{b}] = {int(lengths[b])} keys need "
                             f"{int(pages[b])} pages of {self.page_size}, the table has {width} columns")
        used = torch.arange(width, device=lengths.device)[None, :] < pages[:, None]
        table = self.block_table.long()
        bad = used & ((table < 0) | (table >= num_pages))
        if bool(bad.any()):
            b, j = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"block_table[{b}, {j}] = {int(table[b, j])} is not a page id in [0, {num_pages}) "
                             f"(sequence {b} uses its first {int(pages[b])} entries)")
        if isinstance(self.inner, TopK) and self.inner.indices.numel():
            ind = self.inner.indices.long()
            limit = lengths.view(-1, *([1] * (ind.dim() - 1)))
            bad = (ind < -1) | (ind >= limit)
            if bool(bad.any()):
                b = int(bad.flatten(1).any(1).nonzero()[0])
                raise ValueError(f"indices must lie in [-1, cache_seqlens[b]) (logical key positions); sequence {b} "
                                 f"has values in [{int(ind[b].min())}, {int(ind[b].max())}] with "
                                 f"cache_seqlens[{b}] = {int(lengths[b])}")

    # -- the tile engine's plan: per-sequence schedules over logical tiles ------------------------------
    def schedule(self, seqlen_q: int, seqlen_k: int, block_m: int, block_n: int,
                 device="cpu") -> TileSchedule:
        """Each sequence's band schedule (forward only): query tile m of batch row b visits logical
        key tiles ``kv_tiles[b, 0, m, 0] + t``, ``t < kv_count[b, 0, m]``, those holding a key
        ``max(0, p(i) − left) <= j <= min(L_b − 1, p(i) + right)`` for a row i of the tile
        (``p(i) = L_b − Nq + i``); with the block table, lengths and page size the kernels read
        them through. ``seqlen_k`` is the pool's slot count (the band's "unbounded")."""
        left, right = clamp_band(*self.inner.band(), seqlen_q, seqlen_k)
        lengths = self.lengths()
        first_row = torch.arange(cdiv(seqlen_q, block_m), device=lengths.device) * block_m
        last_row = torch.clamp(first_row + block_m - 1, max=seqlen_q - 1)
        shift = (lengths - seqlen_q)[:, None]  # p(i) − i per sequence
        low = torch.clamp(first_row + shift - left, min=0)
        high = torch.minimum(last_row + shift + right, lengths[:, None] - 1)
        seen = high >= low
        start = torch.where(seen, low // block_n, 0)
        count = torch.where(seen, high // block_n - start + 1, 0)
        batch, rows = start.shape
        none = torch.zeros(1, 1, 0, 1, dtype=torch.int32, device=lengths.device)  # forward only: no transpose
        return TileSchedule("range", block_m, block_n, seqlen_q, seqlen_k, left, right,
                            start.to(torch.int32).view(batch, 1, rows, 1), count.to(torch.int32).view(batch, 1, rows),
                            none, none[..., 0], block_table=self.block_table.contiguous(),
                            cache_seqlens=self.cache_seqlens.contiguous(), page_size=self.page_size)

    # -- rows in physical coordinates ----------------------------------------------------------------
    def _positions(self) -> torch.Tensor:
        """int64 ``[B, Nq]``: p(i) of every query."""
        lengths = self.lengths()
        return lengths[:, None] - self.seqlen_q + torch.arange(self.seqlen_q, device=lengths.device)[None, :]

    def logical_rows(self) -> torch.Tensor:
        """int64 ``[B, 1|Hkv, Nq, K]``: the logical keys each query sees, ``-1`` padded."""
        lengths, nq = self.lengths(), self.seqlen_q
        position = self._positions()
        inner = self.inner
        if isinstance(inner, TopK):
            ind = inner.indices.long()
            if ind.dim() == 3:
                ind = ind.unsqueeze(2).expand(-1, -1, nq, -1)
            if inner.causal:
                ind = torch.where(ind > position[:, None, :, None], -1, ind)
            return ind
        if isinstance(inner, SlidingWindow):
            first = torch.clamp(position - inner.left, min=0)
            last = torch.minimum(position + inner.right, lengths[:, None] - 1)
        elif inner.causal:
            first, last = torch.zeros_like(position), position
        else:
            first, last = torch.zeros_like(position), (lengths - 1)[:, None].expand_as(position)
        count = torch.clamp(last - first + 1, min=0)
        width = max(int(count.max()) if count.numel() else 0, 1)
        step = torch.arange(width, device=count.device)
        rows = first[..., None] + step
        return torch.where(step < count[..., None], rows, -1).unsqueeze(1)

    def physical(self, logical: torch.Tensor) -> torch.Tensor:
        """Logical key positions ``[B, ...]`` -> physical pool slots (``-1`` stays ``-1``)."""
        batch, ps = self.batch, self.page_size
        flat = logical.reshape(batch, -1)
        valid = flat >= 0
        safe = torch.where(valid, flat, 0)
        page = torch.gather(self.block_table.long(), 1, safe // ps)
        return torch.where(valid, page * ps + safe % ps, -1).view(logical.shape)

    def gather_indices(self) -> torch.Tensor:
        """The rows in physical coordinates ``[1, 1|Hkv, B·Nq, K]`` (the gather plan's input)."""
        rows = self.physical(self.logical_rows())  # [B, Hi, Nq, K]
        batch, heads, nq, width = rows.shape
        return rows.permute(1, 0, 2, 3).reshape(1, heads, batch * nq, width).contiguous()

    def dense_mask(self, batch, heads_q, heads_kv, seqlen_q, seqlen_k, device):
        """``[1, Hq|1, B·Nq, num_pages·page_size]`` over the flattened pool (a slow path: the
        reference backend runs ``sequences`` instead)."""
        return TopK(self.gather_indices()).dense_mask(batch, heads_q, heads_kv, seqlen_q, seqlen_k, device)

    # -- the reference: each sequence on its keys gathered contiguously -------------------------------
    def sequences(self) -> Iterator[Tuple[int, torch.Tensor, Pattern]]:
        """(b, slots int64 ``[L_b]`` of its keys in logical order, its own pattern over them)."""
        lengths = self.lengths().tolist()
        table = self.block_table.long()
        for b, length in enumerate(lengths):
            j = torch.arange(length, device=table.device)
            slots = table[b, j // self.page_size] * self.page_size + j % self.page_size
            if isinstance(self.inner, TopK):
                pattern: Pattern = TopK(self.inner.indices[b:b + 1], causal=self.inner.causal)
            else:
                pattern = self.inner
            yield b, slots, pattern

    def __repr__(self) -> str:
        return (f"Paged({self.inner!r}, batch={self.batch}, page_size={self.page_size}, Nq={self.seqlen_q}, "
                f"engine={self.engine})")


def pool_view(cache: torch.Tensor, name: str) -> torch.Tensor:
    """``[num_pages, page_size, Hkv, D]`` -> the ``[1, Hkv, num_pages·page_size, D]`` view (never a copy)."""
    pages, page_size, heads, dim = cache.shape
    try:
        flat = cache.view(1, pages * page_size, heads, dim)
    except RuntimeError as error:
        raise ValueError(f"{name} must have its page and slot dimensions mergeable into one (as a contiguous "
                         f"[num_pages, page_size, Hkv, D] cache has); got strides {cache.stride()}") from error
    if flat.stride(-1) != 1 and dim != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, got strides {cache.stride()}")
    return flat.transpose(1, 2)


__all__ = ["Paged", "pool_view"]
