"""A global pattern cut into the kernel calls of one (query shard, key shard) pair.

Every rank holds ``S`` segments (1 contiguous, 2 zigzag) of ``c`` tokens each, at known global
offsets. For a query segment at global offset ``a`` and a key segment at ``b``, query ``i`` and
key ``j`` of the segments sit at global positions ``a + i`` and ``b + j``; since both segments have
``c`` tokens, a call over them aligns ``p(i) = i`` and the global band ``P − L <= K <= P + R``
becomes the local band ``(L − δ, R + δ)`` with ``δ = a − b`` (possibly negative: ``_Band`` below).

Each segment pair is classified once per call as **none** (no key visible: skipped), **full**
(every key visible: the plain ``Full()`` schedule, no masking) or **partial** (a local pattern).
A pair of shards then becomes a few calls: all of it at once when every segment pair is full, a
query segment against both key segments (or both query segments against one key segment) when
those are full, and the remaining visible segment pairs one by one. Top-k is one gather call
per shard pair, its indices mapped to the visiting shard's local positions.

``ShardedPattern.visible()`` is the rank × rank matrix of shard pairs with any work: band and
block-sparse patterns compute it for every rank locally (every rank holds the whole pattern);
top-k indices are per rank, so each rank fills its row and one all-reduce shares them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..core.patterns import BlockSparse, Full, Pattern, SlidingWindow, TopK
from .layouts import segments

NONE, FULL, PARTIAL = "none", "full", "partial"


class _Band(SlidingWindow):
    """``SlidingWindow`` with any integer (or None = unbounded) sides: ``p(i) − left <= j <= p(i) + right``.
    Internal: the band of a global pattern seen from one segment pair."""

    def __init__(self, left: Optional[int], right: Optional[int]) -> None:  # no range check: negative sides allowed
        self.left, self.right = left, right

    def __repr__(self) -> str:
        return f"_Band(left={self.left}, right={self.right})"


class _PairBlockSparse(BlockSparse):
    """``BlockSparse`` over a slice of the global layout, with the pair's band (causal: ``(None, δ)``)."""

    def __init__(self, layout: Tensor, block_size: int, band: Tuple[Optional[int], Optional[int]]) -> None:
        super().__init__(layout, block_size, causal=band != (None, None))
        self._band = band

    def band(self):
        return self._band

    def cache_key(self) -> tuple:
        return ("_PairBlockSparse", self.block_size) + tuple(-1 if x is None else x for x in self._band)


def band_class(left: Optional[int], right: Optional[int], delta: int, length: int) -> Tuple[str, Optional[Pattern]]:
    """Classify the global band ``(left, right)`` on a segment pair with ``δ = a − b`` and ``length``
    tokens each: key ``j`` is visible to query ``i`` when ``δ − left <= j − i <= δ + right``."""
    lo = None if left is None else delta - left
    hi = None if right is None else delta + right
    span = length - 1  # j − i ranges over [−span, span]
    if (hi is not None and hi < -span) or (lo is not None and lo > span) or (
            lo is not None and hi is not None and lo > hi):
        return NONE, None
    if (lo is None or lo <= -span) and (hi is None or hi >= span):
        return FULL, Full()
    return PARTIAL, _Band(None if left is None else left - delta, None if right is None else right + delta)


@dataclass
class Call:
    """One kernel call of a shard pair: local query rows ``[q0, q1)`` against rows ``[k0, k1)`` of the
    visiting key shard, over ``pattern`` (positions local to the call)."""

    q0: int
    q1: int
    k0: int
    k1: int
    pattern: Pattern


def combine(grid: List[List[Tuple[str, Optional[Pattern]]]], seg_len: int) -> List[Call]:
    """Calls covering the visible segment pairs of a shard pair (``grid[qs][ks]``), as few as the
    full ones allow."""
    count = len(grid)
    done = [[grid[i][j][0] == NONE for j in range(count)] for i in range(count)]
    calls: List[Call] = []
    span = count * seg_len
    if all(grid[i][j][0] == FULL for i in range(count) for j in range(count)):
        return [Call(0, span, 0, span, Full())]
    for i in range(count):  # a query segment that sees both key segments fully
        if count > 1 and all(grid[i][j][0] == FULL for j in range(count)):
            calls.append(Call(i * seg_len, (i + 1) * seg_len, 0, span, Full()))
            done[i] = [True] * count
    for j in range(count):  # a key segment both (remaining) query segments see fully
        if count > 1 and all(grid[i][j][0] == FULL and not done[i][j] for i in range(count)):
            calls.append(Call(0, span, j * seg_len, (j + 1) * seg_len, Full()))
            for i in range(count):
                done[i][j] = True
    for i in range(count):
        for j in range(count):
            if not done[i][j]:
                calls.append(Call(i * seg_len, (i + 1) * seg_len, j * seg_len, (j + 1) * seg_len, grid[i][j][1]))
    return calls


class ShardedPattern:
    """The global ``pattern`` over ``world_size`` shards of ``local_len`` tokens in ``layout``,
    seen from rank ``rank``: ``calls(src)`` for the key shard of rank ``src``, ``visible()``.

    Raises ValueError (naming the argument) when the pattern does not fit the sharded sequence.
    """

    def __init__(self, pattern: Pattern, rank: int, world_size: int, local_len: int, layout: str,
                 batch: int, heads_q: int, heads_kv: int, device: torch.device) -> None:
        self.pattern, self.rank, self.world_size, self.layout = pattern, rank, world_size, layout
        self.local_len, self.seqlen = local_len, local_len * world_size
        self.segs = [segments(r, world_size, local_len, layout) for r in range(world_size)]
        self.seg_len = self.segs[0][0][2]
        self.device = device
        self._topk_rows: Optional[Tensor] = None
        self._chunk_vis = None  # block-sparse: (any, all) per global chunk pair, on the host
        if isinstance(pattern, BlockSparse):
            self._init_block_sparse(batch, heads_q)
        elif isinstance(pattern, TopK):
            self._init_topk(batch, heads_kv)
        elif type(pattern) not in (Full, SlidingWindow):
            raise TypeError(f"pattern must be Full, SlidingWindow, BlockSparse, TopK or None, got {type(pattern).__name__}")

    # -- block-sparse ---------------------------------------------------------------------------
    def _init_block_sparse(self, batch: int, heads_q: int) -> None:
        p, bs, n = self.pattern, self.pattern.block_size, self.seqlen
        if self.seg_len % bs:
            raise ValueError(f"pattern: BlockSparse block_size={bs} must divide each rank's segment of "
                             f"{self.seg_len} tokens (layout={self.layout!r}, {self.world_size} ranks); "
                             f"pick a sequence length that is a multiple of {bs * self.world_size * len(self.segs[0])}")
        want = (n // bs, n // bs)
        lb, lh = p.layout.shape[:2]
        if tuple(p.layout.shape[2:]) != want or lb not in (1, batch) or lh not in (1, heads_q):
            raise ValueError(f"pattern: the BlockSparse layout must cover the whole sequence of {n} tokens "
                             f"({self.world_size} ranks x {self.local_len}): shape [{batch}|1, {heads_q}|1, "
                             f"{want[0]}, {want[1]}], got {tuple(p.layout.shape)}")
        if p.layout.device != self.device:
            raise ValueError(f"pattern: the BlockSparse layout is on {p.layout.device} but q_l is on {self.device}")
        chunks, per = n // self.seg_len, self.seg_len // bs
        tiles_any = p.layout.any(0).any(0)
        tiles_all = p.layout.all(0).all(0)
        if p.causal:  # tile (i, j) meets the causal band iff j <= i (block-aligned offsets)
            tiles_any = tiles_any & torch.ones_like(tiles_any).tril()
        vis_any = tiles_any.view(chunks, per, chunks, per).any(3).any(1)
        vis_all = tiles_all.view(chunks, per, chunks, per).all(3).all(1)
        self._chunk_vis = (vis_any.cpu(), vis_all.cpu())

    def _block_sparse_class(self, a: int, b: int):
        p, c, bs = self.pattern, self.seg_len, self.pattern.block_size
        has, full = (v[a // c, b // c].item() for v in self._chunk_vis)
        if not has:
            return NONE, None
        kind, _ = band_class(None, 0, a - b, c) if p.causal else (FULL, None)
        if kind == NONE:
            return NONE, None
        if full and kind == FULL:
            return FULL, Full()
        sub = p.layout[..., a // bs:(a + c) // bs, b // bs:(b + c) // bs]
        band = (None, a - b) if p.causal and kind == PARTIAL else (None, None)
        return PARTIAL, _PairBlockSparse(sub, bs, band)

    # -- top-k ------------------------------------------------------------------------------------
    def _init_topk(self, batch: int, heads_kv: int) -> None:
        p, n = self.pattern, self.local_len
        ind = p.indices
        form = f"[{batch}, {heads_kv}|1, {n}, K] or [{batch}, {heads_kv}|1, K]"
        ok = ind.shape[0] == batch and ind.shape[1] in (1, heads_kv) and ind.shape[-1] >= 1
        if p.per_query:
            ok = ok and ind.shape[2] == n
        if not ok:
            raise ValueError(f"pattern: TopK indices must have shape {form} (this rank's queries, global key "
                             f"positions), got {tuple(ind.shape)}")
        if ind.device != self.device:
            raise ValueError(f"pattern: TopK indices are on {ind.device} but q_l is on {self.device}")
        rows = p.row_indices(n).long()
        valid = rows >= 0
        if p.causal:
            pos = torch.cat([torch.arange(g, g + m, device=self.device) for _, g, m in self.segs[self.rank]])
            valid &= rows <= pos.view(1, 1, -1, 1)
        # which global chunk each valid index falls in (one host transfer for the whole call)
        chunk = torch.where(valid, rows // self.seg_len, torch.full_like(rows, -1))
        hits = torch.zeros(self.seqlen // self.seg_len + 1, dtype=torch.int64, device=self.device)
        hits.index_add_(0, (chunk + 1).flatten().clamp(0, hits.numel() - 1), torch.ones_like(chunk.flatten()))
        low, high = (int(x) for x in torch.aminmax(rows)) if rows.numel() else (0, 0)
        self._topk_hits = hits[1:].cpu()
        if low < -1 or high >= self.seqlen:
            raise ValueError(f"pattern: TopK indices must lie in [-1, N) = [-1, {self.seqlen}) (global key positions); "
                             f"got values in [{low}, {high}]")
        self._topk_rows = torch.where(valid, rows, torch.full_like(rows, -1))

    def _topk_call(self, src: int) -> List[Call]:
        c = self.seg_len
        chunks = [g // c for _, g, _ in self.segs[src]]
        if not any(int(self._topk_hits[x]) for x in chunks):
            return []
        rows = self._topk_rows
        local = torch.full_like(rows, -1)
        for start, g, m in self.segs[src]:
            inside = (rows >= g) & (rows < g + m)
            local = torch.where(inside, rows - g + start, local)
        return [Call(0, self.local_len, 0, self.local_len, TopK(local))]

    # -- all patterns ---------------------------------------------------------------------------
    def _segment_class(self, a: int, b: int):
        p, c = self.pattern, self.seg_len
        if isinstance(p, BlockSparse):
            return self._block_sparse_class(a, b)
        left, right = p.band()
        return band_class(left, right, a - b, c)

    def calls(self, src: int) -> List[Call]:
        """Kernel calls of (this rank's queries, rank ``src``'s keys); empty when nothing is visible."""
        if isinstance(self.pattern, TopK):
            return self._topk_call(src)
        grid = [[self._segment_class(qa, kb) for _, kb, _ in self.segs[src]] for _, qa, _ in self.segs[self.rank]]
        return combine(grid, self.seg_len)

    def visible(self, group) -> List[List[bool]]:
        """``[q rank][k rank]``: does that shard pair have any work."""
        size = self.world_size
        if isinstance(self.pattern, TopK):
            import torch.distributed as dist

            row = torch.zeros(size, size, dtype=torch.int64, device=self.device)
            c = self.seg_len
            for src in range(size):
                row[self.rank, src] = int(sum(int(self._topk_hits[g // c]) for _, g, _ in self.segs[src]) > 0)
            dist.all_reduce(row, op=dist.ReduceOp.MAX, group=group)
            return [[bool(x) for x in r] for r in row.tolist()]
        return [[any(self._segment_class(qa, kb)[0] != NONE for _, qa, _ in self.segs[q] for _, kb, _ in self.segs[k])
                 for k in range(size)] for q in range(size)]


__all__ = ["ShardedPattern", "Call", "band_class", "combine"]
