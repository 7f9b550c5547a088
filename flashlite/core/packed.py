"""Packed (variable-length) batches: a pattern applied inside each sequence of a packed batch.

A packed batch is flash-attn's varlen layout: ``q [Tq, Hq, D]`` and ``k, v [Tk, Hkv, D]`` hold
S sequences back to back; ``cu_seqlens_q/k`` (int32 ``[S+1]``) say where each starts. Sequence
s owns query rows ``cu_q[s]:cu_q[s+1]`` and keys ``cu_k[s]:cu_k[s+1]``; positions are local and
aligned bottom-right inside it, ``p(i) = i + Nk_s − Nq_s``.

``Packed(inner, cu_seqlens_q, cu_seqlens_k)`` is a pattern over the ``[1, H, T, D]`` views of
those tensors. It adds no kernel of its own:

* tile engine (full, causal, window, block-sparse): the plan's schedule is a **work-item list**
  (``packed_schedule``): forward items (sequence, query tile), each with its key tiles, and
  backward items (sequence, key tile), each with its query tiles, all in local tile numbers.
  A kernel reads an item, offsets its rows by ``cu_seqlens`` and runs the ordinary tile loop
  with the sequence's lengths. Work is the sum over sequences, never the padded box.
* gather engine (top-k): the rows are moved to packed coordinates once in the plan
  (``gather_indices``: local key ``j`` of sequence s becomes ``cu_k[s] + j``, causal drops
  become ``-1``), and the ordinary gather kernels run non-causal over them.
* reference: one oracle call per sequence (``sequences``).

Reading the lengths syncs the device once per plan (the plan cache keys ``cu_seqlens`` by
identity and version).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

from .patterns import BlockSparse, Pattern, TopK
from .schedule import TileSchedule, cdiv, clamp_band, compress_layout


def check_cu_seqlens(cu_seqlens, name: str, total: int, device: torch.device) -> None:
    """Shape, dtype and device of one ``cu_seqlens`` (no device read)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor [batch + 1], got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be 1-D [batch + 1] (cumulative lengths starting at 0), "
                         f"got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} is on {cu_seqlens.device} but q is on {device}")
    if total >= 2 ** 31:
        raise ValueError(f"{name}: {total} packed rows do not fit int32 offsets")


def check_cu_values(cu_seqlens: torch.Tensor, name: str, total: int) -> None:
    """Starts at 0, non-decreasing, ends at ``total`` (reads the device: once per plan)."""
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    if values[-1] != total:
        raise ValueError(f"{name} must end at the packed length {total}, got {values[-1]}")
    steps = [b - a for a, b in zip(values, values[1:])]
    if any(s < 0 for s in steps):
        where = next(i for i, s in enumerate(steps) if s < 0)
        raise ValueError(f"{name} must be non-decreasing; {name}[{where + 1}] = {values[where + 1]} < "
                         f"{name}[{where}] = {values[where]}")


@dataclass(frozen=True)
class Sequence:
    """One sequence of a packed batch: its rows, its keys and its own pattern (reference path)."""

    index: int
    q_start: int
    q_end: int
    k_start: int
    k_end: int
    pattern: Pattern


class Packed(Pattern):
    """``inner`` applied inside each sequence of a packed batch (see the module docstring).

    ``inner``: ``Full``, ``SlidingWindow``, ``BlockSparse`` (layout ``[S|1, Hq|1, ⌈max_q/bs⌉,
    ⌈max_k/bs⌉]`` at local block positions) or ``TopK`` (indices ``[Tq, Hkv|1, K]``, local key
    positions). ``max_seqlen_q/k``: the caller's bound on the longest sequence (checked), or None.
    """

    def __init__(self, inner: Pattern, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                 max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None) -> None:
        if isinstance(inner, Packed) or not isinstance(inner, Pattern):
            raise TypeError(f"pattern must be Full, SlidingWindow, BlockSparse, TopK or None, got {type(inner).__name__}")
        self.inner = inner
        self.cu_seqlens_q, self.cu_seqlens_k = cu_seqlens_q, cu_seqlens_k
        self.max_seqlen_q, self.max_seqlen_k = max_seqlen_q, max_seqlen_k
        self.engine = inner.engine
        self.name = inner.name
        self.block_size = getattr(inner, "block_size", None)
        self._lengths: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._total_q: Optional[int] = None  # the packed query length, set by validate

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens_q.numel() - 1

    @property
    def causal(self) -> bool:
        # The gather kernels see packed rows with the causal drops already made.
        return False if self.engine == "gather" else bool(getattr(self.inner, "causal", False))

    def band(self):
        return self.inner.band()

    # -- identity and checks -----------------------------------------------------------------------
    def cache_key(self) -> tuple:
        return ("Packed", self.inner.cache_key(), self.max_seqlen_q, self.max_seqlen_k)

    def tensors(self) -> tuple:
        return (self.cu_seqlens_q, self.cu_seqlens_k) + self.inner.tensors()

    def validate(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """``q``/``k`` are the ``[1, H, T, D]`` views of the packed tensors."""
        total_q, total_k = q.shape[2], k.shape[2]
        check_cu_seqlens(self.cu_seqlens_q, "cu_seqlens_q", total_q, q.device)
        check_cu_seqlens(self.cu_seqlens_k, "cu_seqlens_k", total_k, q.device)
        if self.cu_seqlens_q.numel() != self.cu_seqlens_k.numel():
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences; got "
                             f"{self.cu_seqlens_q.numel() - 1} and {self.cu_seqlens_k.numel() - 1}")
        for name, value in (("max_seqlen_q", self.max_seqlen_q), ("max_seqlen_k", self.max_seqlen_k)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise TypeError(f"{name} must be a non-negative int or None, got {value!r}")
        sequences, heads_q = self.num_sequences, q.shape[1]
        self._total_q = total_q
        if isinstance(self.inner, TopK):
            ind = self.inner.indices
            if ind.dim() != 3 or ind.shape[0] != total_q or ind.shape[1] not in (1, k.shape[1]):
                raise ValueError(f"indices must have shape [Tq={total_q}, {k.shape[1]}|1, K] (local key positions "
                                 f"per packed query), got {tuple(ind.shape)}")
            if ind.device != q.device:
                raise ValueError(f"indices is on {ind.device} but q is on {q.device}")
        elif isinstance(self.inner, BlockSparse):
            layout = self.inner.layout
            if layout.shape[0] not in (1, sequences) or layout.shape[1] not in (1, heads_q):
                raise ValueError(f"layout must have shape [{sequences}|1, {heads_q}|1, ceil(max_seqlen_q/bs), "
                                 f"ceil(max_seqlen_k/bs)], got {tuple(layout.shape)}")
            if layout.device != q.device:
                raise ValueError(f"layout is on {layout.device} but q is on {q.device}")

    def lengths(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence (query, key) lengths, int64 ``[S]`` on the device."""
        if self._lengths is None:
            lq = (self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]).long()
            lk = (self.cu_seqlens_k[1:] - self.cu_seqlens_k[:-1]).long()
            self._lengths = (lq, lk)
        return self._lengths

    def check_values(self, seqlen_k: int) -> None:
        check_cu_values(self.cu_seqlens_q, "cu_seqlens_q", self._total_q)
        check_cu_values(self.cu_seqlens_k, "cu_seqlens_k", seqlen_k)
        lq, lk = self.lengths()
        longest_q = int(lq.max()) if lq.numel() else 0
        longest_k = int(lk.max()) if lk.numel() else 0
        for name, bound, longest in (("max_seqlen_q", self.max_seqlen_q, longest_q),
                                     ("max_seqlen_k", self.max_seqlen_k, longest_k)):
            if bound is not None and bound < longest:
                raise ValueError(f"{name}={bound} but the longest sequence has {longest}")
        if isinstance(self.inner, BlockSparse):
            bs = self.inner.block_size
            want = (cdiv(longest_q, bs), cdiv(longest_k, bs))
            have = tuple(self.inner.layout.shape[2:])
            if have[0] < want[0] or have[1] < want[1]:
                raise ValueError(f"layout covers {have} blocks of {bs}; the longest sequences need at least {want} "
                                 f"(ceil(max_seqlen/block_size))")
        if isinstance(self.inner, TopK) and self.inner.indices.numel():
            ind = self.inner.indices.long()
            seq_k = lk[self._sequence_of_rows()]
            bad = (ind < -1) | (ind >= seq_k.view(-1, 1, 1))
            if bool(bad.any()):
                row = int(bad.flatten(1).any(1).nonzero()[0])
                raise ValueError(f"indices must lie in [-1, Nk_s) for each sequence s (local key positions); row {row} "
                                 f"has {ind[row].flatten().tolist()[:8]} with Nk_s = {int(seq_k[row])}")

    def _sequence_of_rows(self) -> torch.Tensor:
        """int64 ``[Tq]``: the sequence each packed query row belongs to."""
        lq, _ = self.lengths()
        return torch.repeat_interleave(torch.arange(lq.numel(), device=lq.device), lq)

    # -- the three engines -------------------------------------------------------------------------
    def schedule(self, seqlen_q, seqlen_k, block_m, block_n, device="cpu") -> TileSchedule:
        return packed_schedule(self, seqlen_q, seqlen_k, block_m, block_n)

    def gather_indices(self) -> torch.Tensor:
        """The top-k rows in packed coordinates ``[1, Hkv|1, Tq, K]`` (key ``cu_k[s] + j``; ``-1`` for an
        empty slot and, when causal, for a key after ``p(i)``)."""
        ind = self.inner.indices.long()
        lq, lk = self.lengths()
        seq = self._sequence_of_rows()
        local_row = torch.arange(ind.shape[0], device=ind.device) - self.cu_seqlens_q[:-1].long()[seq]
        packed = torch.where(ind < 0, -1, ind + self.cu_seqlens_k[:-1].long()[seq].view(-1, 1, 1))
        if self.inner.causal:
            position = (local_row + lk[seq] - lq[seq]).view(-1, 1, 1)
            packed = torch.where(ind > position, -1, packed)
        return packed.permute(1, 0, 2).unsqueeze(0).contiguous()

    def sequences(self) -> Iterator[Sequence]:
        """Each sequence with its own (unpacked) pattern, for the reference."""
        cu_q, cu_k = self.cu_seqlens_q.tolist(), self.cu_seqlens_k.tolist()
        inner = self.inner
        for s in range(self.num_sequences):
            q0, q1, k0, k1 = cu_q[s], cu_q[s + 1], cu_k[s], cu_k[s + 1]
            if isinstance(inner, TopK):
                pattern: Pattern = TopK(inner.indices[q0:q1].permute(1, 0, 2).unsqueeze(0), causal=inner.causal)
            elif isinstance(inner, BlockSparse):
                bs = inner.block_size
                layout = inner.layout[s if inner.layout.shape[0] > 1 else 0][None]
                pattern = BlockSparse(layout[..., :cdiv(q1 - q0, bs), :cdiv(k1 - k0, bs)], bs, inner.causal)
            else:
                pattern = inner
            yield Sequence(s, q0, q1, k0, k1, pattern)

    def dense_mask(self, batch, heads_q, heads_kv, seqlen_q, seqlen_k, device):
        """Block-diagonal ``[1, Hq|1, Tq, Tk]`` (the per-sequence masks at their packed offsets)."""
        parts = [(s, s.pattern.dense_mask(1, heads_q, heads_kv, s.q_end - s.q_start, s.k_end - s.k_start, device))
                 for s in self.sequences()]
        heads = max((m.shape[1] for _, m in parts), default=1)
        mask = torch.zeros(1, heads, seqlen_q, seqlen_k, dtype=torch.bool, device=device)
        for s, m in parts:
            mask[:, :, s.q_start:s.q_end, s.k_start:s.k_end] = m
        return mask

    def __repr__(self) -> str:
        return f"Packed({self.inner!r}, sequences={self.num_sequences})"


def _items(lengths: torch.Tensor, block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sequence, tile) of every tile of every sequence, int64 ``[items]`` each."""
    tiles = torch.div(lengths + block - 1, block, rounding_mode="floor")
    sequence = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), tiles)
    first = torch.cumsum(tiles, 0) - tiles
    tile = torch.arange(sequence.numel(), device=lengths.device) - first[sequence]
    return sequence, tile


def _item_ranges(rows, cols, tile, row_block, col_block, low_offset, high_offset):
    """Per item: the tiles of ``col_block`` columns holding a column ``c`` with
    ``r + low_offset <= c <= r + high_offset`` for some row ``r`` of the item's tile (each item has
    its own ``rows``/``cols`` lengths and offsets). Returns (first tile, count) int64."""
    first_row = tile * row_block
    last_row = torch.minimum(first_row + row_block, rows) - 1
    lo = torch.clamp(first_row + low_offset, min=0)
    hi = torch.minimum(last_row + high_offset, cols - 1)
    start = torch.div(lo, col_block, rounding_mode="floor")
    count = torch.where(hi >= lo, torch.div(hi, col_block, rounding_mode="floor") + 1 - start, 0)
    return torch.where(hi >= lo, start, 0), count


def _layout_tiles(layout, sequence, row_tile, row_block, col_block, block_size, col_tiles, in_band, transpose):
    """Dense ``[Hs, items, width]`` bool: for each item (a row tile of one sequence) the column
    tiles marked in that sequence's layout, inside its length and band."""
    width = in_band.shape[1]
    col = torch.arange(width, device=layout.device)
    layout_row = sequence if layout.shape[0] > 1 else torch.zeros_like(sequence)
    row_block_index = (row_tile * row_block) // block_size
    col_block_index = torch.clamp((col * col_block) // block_size,
                                  max=layout.shape[2 if transpose else 3] - 1)
    by_head = layout.permute(1, 0, 2, 3)  # [Hs, Bs, Mb, Nb]
    if transpose:
        marked = by_head[:, layout_row[:, None], col_block_index[None, :], row_block_index[:, None]]
    else:
        marked = by_head[:, layout_row[:, None], row_block_index[:, None], col_block_index[None, :]]
    return marked & (col[None, :] < col_tiles[:, None]) & in_band


def packed_schedule(pattern: Packed, total_q: int, total_k: int, block_m: int, block_n: int) -> TileSchedule:
    """The work-item schedule of a packed tile pattern (module docstring)."""
    lq, lk = pattern.lengths()
    device = lq.device
    left, right = clamp_band(*pattern.band(), total_q, total_k)
    inner = pattern.inner
    if isinstance(inner, BlockSparse) and (inner.block_size % block_m or inner.block_size % block_n):
        raise ValueError(f"kernel tiles ({block_m}, {block_n}) must divide block_size={inner.block_size}")

    # Forward items (sequence s, query tile m): key tiles of the band p(i) - left <= j <= p(i) + right.
    q_seq, q_tile = _items(lq, block_m)
    shift = (lk - lq)[q_seq]
    kv_start, kv_count = _item_ranges(lq[q_seq], lk[q_seq], q_tile, block_m, block_n, shift - left, shift + right)
    # Backward items (sequence s, key tile n): query tiles with j - shift - right <= i <= j - shift + left.
    k_seq, k_tile = _items(lk, block_n)
    shift_k = (lk - lq)[k_seq]
    q_start, q_count = _item_ranges(lk[k_seq], lq[k_seq], k_tile, block_n, block_m, -shift_k - right, -shift_k + left)

    if isinstance(inner, BlockSparse):
        layout, bs = inner.layout, inner.block_size
        width_k = int(cdiv(int(lk.max()), block_n)) if lk.numel() else 0
        width_q = int(cdiv(int(lq.max()), block_m)) if lq.numel() else 0
        cols_k = torch.arange(max(width_k, 1), device=device)
        cols_q = torch.arange(max(width_q, 1), device=device)
        band_k = (cols_k[None] >= kv_start[:, None]) & (cols_k[None] < (kv_start + kv_count)[:, None])
        band_q = (cols_q[None] >= q_start[:, None]) & (cols_q[None] < (q_start + q_count)[:, None])
        forward = _layout_tiles(layout, q_seq, q_tile, block_m, block_n, bs,
                                torch.div(lk[q_seq] + block_n - 1, block_n, rounding_mode="floor"), band_k, False)
        backward = _layout_tiles(layout, k_seq, k_tile, block_n, block_m, bs,
                                 torch.div(lq[k_seq] + block_m - 1, block_m, rounding_mode="floor"), band_q, True)
        kv_tiles, kv_count32 = compress_layout(forward[None])
        q_tiles, q_count32 = compress_layout(backward[None])
        kind = "list"
    else:
        kv_tiles, kv_count32 = kv_start.to(torch.int32).view(1, 1, -1, 1), kv_count.to(torch.int32).view(1, 1, -1)
        q_tiles, q_count32 = q_start.to(torch.int32).view(1, 1, -1, 1), q_count.to(torch.int32).view(1, 1, -1)
        kind = "range"
    return TileSchedule(
        kind, block_m, block_n, total_q, total_k, left, right,
        kv_tiles.contiguous(), kv_count32.contiguous(), q_tiles.contiguous(), q_count32.contiguous(),
        q_items=torch.stack([q_seq, q_tile], 1).to(torch.int32).contiguous(),
        k_items=torch.stack([k_seq, k_tile], 1).to(torch.int32).contiguous(),
        cu_seqlens_q=pattern.cu_seqlens_q, cu_seqlens_k=pattern.cu_seqlens_k,
    )


__all__ = ["Packed", "Sequence", "packed_schedule", "check_cu_seqlens", "check_cu_values"]
