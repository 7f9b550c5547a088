"""Block schedules: which key tiles each query tile visits (and the transpose for backward).

Every tile-engine pattern (full, causal, sliding window, block-sparse) is described by

* a **band**: key ``j`` is visible to query ``i`` only if
  ``p(i) - window_left <= j <= p(i) + window_right`` with ``p(i) = i + Nk - Nq``
  (bottom-right alignment); an unbounded side is stored as ``Nq + Nk``, which no
  distance reaches, so every value fits in int32;
* a **tile schedule** at the kernel's tile size ``(block_m, block_n)``:

  - forward, per query tile ``m``: ``kv_count[b, h, m]`` key tiles, taken from
    ``kv_tiles[b, h, m, :]``;
  - backward, per key tile ``n``: ``q_count[b, h, n]`` query tiles from ``q_tiles[b, h, n, :]``.

  Two storage kinds share that layout. ``"range"`` (band patterns): ``kv_tiles[..., 0]`` is
  the first tile and tile ``t`` of the loop is ``kv_tiles[..., 0] + t``. ``"list"``
  (block-sparse): tile ``t`` is ``kv_tiles[..., t]``, ascending. Leading dims are 1 where the
  schedule is shared by every batch row / head (kernels index them with stride 0).

Everything here is vectorized torch on the schedule's device: no Python loop over tiles.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class TileSchedule:
    """Forward and transposed (backward) tile lists for one pattern at one problem size."""

    kind: str  # "range" or "list"
    block_m: int
    block_n: int
    seqlen_q: int
    seqlen_k: int
    window_left: int
    window_right: int
    kv_tiles: torch.Tensor  # int32 [Bs, Hs, num_q_tiles, L]
    kv_count: torch.Tensor  # int32 [Bs, Hs, num_q_tiles]
    q_tiles: torch.Tensor  # int32 [Bs, Hs, num_kv_tiles, L']
    q_count: torch.Tensor  # int32 [Bs, Hs, num_kv_tiles]
    # Packed batches (flashlite.core.packed): work items instead of (batch, tile). Forward item t is
    # (sequence, query tile) = q_items[t] and its key tiles are kv_tiles[0, h, t, :]; backward item t
    # is (sequence, key tile) = k_items[t] with query tiles q_tiles[0, h, t, :]; tile numbers are
    # local to the sequence, whose rows start at cu_seqlens_q/k[sequence]. None for a plain batch.
    q_items: Optional[torch.Tensor] = None  # int32 [num_q_items, 2]
    k_items: Optional[torch.Tensor] = None  # int32 [num_k_items, 2]
    cu_seqlens_q: Optional[torch.Tensor] = None  # int32 [S + 1]
    cu_seqlens_k: Optional[torch.Tensor] = None  # int32 [S + 1]
    # Paged caches (flashlite.core.paged, forward): k, v are the page pool viewed as
    # [B, Hkv, num_pages·page_size, D]; batch row b has cache_seqlens[b] keys, its logical key j in
    # slot block_table[b, j // page_size]·page_size + j % page_size, and its own schedule rows
    # (kv_tiles[b], in logical tiles). None for contiguous keys.
    block_table: Optional[torch.Tensor] = None  # int32 [B, max_pages]
    cache_seqlens: Optional[torch.Tensor] = None  # int32 [B]
    page_size: int = 0

    @property
    def is_packed(self) -> bool:
        return self.q_items is not None

    @property
    def is_paged(self) -> bool:
        return self.block_table is not None

    @property
    def is_list(self) -> bool:
        return self.kind == "list"

    @property
    def num_q_tiles(self) -> int:
        """Forward programs per (batch, head): query tiles, or work items when packed."""
        return self.q_items.shape[0] if self.is_packed else cdiv(self.seqlen_q, self.block_m)

    @property
    def num_kv_tiles(self) -> int:
        """Backward (dK/dV) programs per (batch, head): key tiles, or work items when packed."""
        return self.k_items.shape[0] if self.is_packed else cdiv(self.seqlen_k, self.block_n)

    @property
    def bounded(self) -> bool:
        """True when the band limits some key on either side (the kernels then mask by it)."""
        big = unbounded(self.seqlen_q, self.seqlen_k)
        return self.window_left < big or self.window_right < big

    def density(self) -> float:
        """Share of all (query tile, key tile) pairs that the forward pass computes."""
        total = self.num_q_tiles * max(self.num_kv_tiles, 1)
        return float(self.kv_count.float().mean()) * self.num_q_tiles / max(total, 1)


def unbounded(seqlen_q: int, seqlen_k: int) -> int:
    """The window size that stands for "no limit" on one side of the band."""
    return seqlen_q + seqlen_k


def clamp_band(left: int | None, right: int | None, seqlen_q: int, seqlen_k: int) -> tuple[int, int]:
    """Band sizes as the kernels take them: None (no limit) and oversized values become Nq + Nk."""
    big = unbounded(seqlen_q, seqlen_k)
    left = big if left is None else min(int(left), big)
    right = big if right is None else min(int(right), big)
    return left, right


def _band_ranges(
    rows: int, cols: int, row_block: int, col_block: int, low_offset: int, high_offset: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each tile of ``row_block`` rows, the tiles of ``col_block`` columns that hold a column
    ``c`` with ``r + low_offset <= c <= r + high_offset`` for some row ``r`` of the tile.

    Returns (first tile, tile count), int32 [num_row_tiles].
    """
    tile = torch.arange(cdiv(rows, row_block), device=device, dtype=torch.int64)
    first_row = tile * row_block
    last_row = torch.clamp(first_row + row_block - 1, max=rows - 1)
    # The band is monotone in r, so the tile's columns lie between its first row's lowest
    # column and its last row's highest one, clipped to [0, cols).
    lo = torch.clamp(first_row + low_offset, min=0)
    hi = torch.clamp(last_row + high_offset, max=cols - 1)
    start = torch.div(lo, col_block, rounding_mode="floor")
    stop = torch.div(hi, col_block, rounding_mode="floor") + 1
    count = torch.where(hi >= lo, stop - start, torch.zeros_like(start))
    start = torch.where(hi >= lo, start, torch.zeros_like(start))
    return start.to(torch.int32), count.to(torch.int32)


def band_schedule(
    seqlen_q: int, seqlen_k: int, block_m: int, block_n: int,
    window_left: int | None, window_right: int | None, device: torch.device | str = "cpu",
) -> TileSchedule:
    """Range schedule of a band pattern (full, causal, sliding window)."""
    device = torch.device(device)
    left, right = clamp_band(window_left, window_right, seqlen_q, seqlen_k)
    shift = seqlen_k - seqlen_q  # p(i) = i + shift
    # Forward: query rows i see key columns j in [i + shift - left, i + shift + right].
    kv_start, kv_count = _band_ranges(seqlen_q, seqlen_k, block_m, block_n, shift - left, shift + right, device)
    # Backward: key column j is seen by rows i in [j - shift - right, j - shift + left].
    q_start, q_count = _band_ranges(seqlen_k, seqlen_q, block_n, block_m, -shift - right, -shift + left, device)
    return TileSchedule(
        "range", block_m, block_n, seqlen_q, seqlen_k, left, right,
        kv_start.view(1, 1, -1, 1), kv_count.view(1, 1, -1),
        q_start.view(1, 1, -1, 1), q_count.view(1, 1, -1),
    )


def compress_layout(tile_layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense bool ``[..., rows, cols]`` -> (ascending column lists ``[..., rows, L]`` int32, counts).

    ``L`` is the largest row count (at least 1); unused slots hold -1.
    """
    counts = tile_layout.sum(-1, dtype=torch.int32)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    cols = tile_layout.shape[-1]
    # Marked columns keep their index, the rest get `cols`; sorting brings the marked ones first
    # in ascending order.
    col_index = torch.arange(cols, device=tile_layout.device, dtype=torch.int32)
    keyed = torch.where(tile_layout, col_index, torch.full_like(col_index, cols))
    ordered = torch.sort(keyed, dim=-1).values[..., :width]
    if ordered.shape[-1] < width:  # cols == 0
        ordered = torch.full((*ordered.shape[:-1], width), cols, dtype=torch.int32, device=tile_layout.device)
    lists = torch.where(ordered == cols, torch.full_like(ordered, -1), ordered)
    return lists.to(torch.int32).contiguous(), counts.contiguous()


def expand_layout(compressed_counts: torch.Tensor, compressed_lists: torch.Tensor, num_cols: int) -> torch.Tensor:
    """(counts ``[..., rows]``, lists ``[..., rows, L]``) -> dense bool ``[..., rows, num_cols]``."""
    width = compressed_lists.shape[-1]
    slot = torch.arange(width, device=compressed_lists.device)
    used = slot < compressed_counts.unsqueeze(-1).to(slot.dtype)
    target = torch.where(used, compressed_lists.long(), torch.full_like(compressed_lists, num_cols, dtype=torch.long))
    dense = torch.zeros((*compressed_lists.shape[:-1], num_cols + 1), dtype=torch.bool, device=compressed_lists.device)
    dense.scatter_(-1, target, True)
    return dense[..., :num_cols]


def block_layout_schedule(
    layout: torch.Tensor, block_size: int, seqlen_q: int, seqlen_k: int, block_m: int, block_n: int,
    window_left: int | None = None, window_right: int | None = None,
) -> TileSchedule:
    """List schedule of a block-sparse layout ``[Bs, Hs, ceil(Nq/bs), ceil(Nk/bs)]``.

    The kernel tiles must divide ``block_size`` (each kernel tile then lies inside one layout
    block, so a tile is either wholly in the pattern or wholly out). An optional band (e.g.
    causal) is intersected: tiles wholly outside the band are dropped as well.
    """
    if block_size % block_m or block_size % block_n:
        raise ValueError(f"kernel tiles ({block_m}, {block_n}) must divide block_size={block_size}")
    device = layout.device
    num_q_tiles, num_kv_tiles = cdiv(seqlen_q, block_m), cdiv(seqlen_k, block_n)
    tile_layout = layout.repeat_interleave(block_size // block_m, dim=-2)[..., :num_q_tiles, :]
    tile_layout = tile_layout.repeat_interleave(block_size // block_n, dim=-1)[..., :num_kv_tiles]
    band = band_schedule(seqlen_q, seqlen_k, block_m, block_n, window_left, window_right, device)
    tile_index = torch.arange(num_kv_tiles, device=device, dtype=torch.int32)
    first = band.kv_tiles[0, 0, :, :1]
    in_band = (tile_index >= first) & (tile_index < first + band.kv_count[0, 0, :, None])
    tile_layout = tile_layout & in_band
    kv_tiles, kv_count = compress_layout(tile_layout)
    q_tiles, q_count = compress_layout(tile_layout.transpose(-1, -2))
    return TileSchedule(
        "list", block_m, block_n, seqlen_q, seqlen_k, band.window_left, band.window_right,
        kv_tiles, kv_count, q_tiles, q_count,
    )
