"""Selection: which keys each query attends, for ``flashlite.topk_attention`` / ``flashlite.TopK``.

Three ways to choose, and they combine:

* **a person's marks** - ``from_marks(marks, seq_len, window=..., sinks=...)``: every query keeps
  the marked positions, the ``sinks`` first tokens and its ``window`` most recent tokens;
* **automatic, per key** - ``topk_by_score(q, k, k_top)``: the ``k_top`` keys with the largest
  scores ``q·k``, computed in chunks (never an ``Nq × Nk`` score matrix at once);
* **automatic, per key block** - ``topk_blocks_by_score(q, k, k_blocks, block_size)``: key blocks
  ranked by a summary (mean or elementwise max of the block's keys) against the query block's mean;
  ``blocks_to_pattern`` turns the result into a ``flashlite.BlockSparse`` pattern;
  ``topk_blocks_by_attention`` ranks them instead by the exact attention mass the query block puts
  on them (``flashlite.attention_map``: it runs the attention, so it loads the api layer on call).

Combining: ``topk_by_score(..., keep=from_marks(...))`` - the kept (marked) keys are always in the
result and the selector fills the remaining slots; ``merge(a, b)`` is the plain row-wise union.

All index tensors follow ``flashlite.TopK``: int ``[B, Hkv|1, Nq, K]`` (or ``[B, Hkv|1, K]``
shared by every query), ``-1`` for an empty slot, distinct entries per row, sorted ascending
with the empty slots last. Query ``i`` sits at ``p(i) = i + Nk − Nq``. Everything is vectorized
torch (no Python loop over tokens; the score helpers loop over blocks of keys and queries).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from .core.patterns import BLOCK_SIZES, BlockSparse, Full

Marks = Union[None, Tensor, Sequence[int], Sequence[Sequence[int]]]

# Elements of one score chunk (queries × keys × heads × batch) in topk_by_score.
CHUNK_ELEMENTS = 1 << 24


def _check_count(value, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_index_dtype(dtype) -> torch.dtype:
    if dtype not in (torch.int32, torch.int64):
        raise TypeError(f"dtype must be torch.int32 or torch.int64, got {dtype}")
    return dtype


# ---------------------------------------------------------------------------------------------
# Marks
# ---------------------------------------------------------------------------------------------
def marks_tensor(marks: Marks, seq_len: int, batch: Optional[int] = None,
                 device: Union[str, torch.device, None] = None) -> Tensor:
    """A person's marks as int64 ``[B, M]``: each row's distinct positions ascending, ``-1`` padded.

    ``marks`` may be: None (no marks); a bool tensor ``[B, N]`` (True = marked, ``N <= seq_len``);
    an int tensor ``[B, M]`` of positions (``-1`` = none); a list of positions (one batch row,
    repeated to ``batch`` rows if given); or a list of such lists, one per batch row.
    """
    if marks is None:
        rows = batch or 1
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return torch.empty((rows, 0), dtype=torch.int64, device=dev)
    if isinstance(marks, Tensor):
        dev = marks.device if device is None else torch.device(device)
        if marks.dim() != 2:
            raise ValueError(f"marks must be a bool tensor [B, N] or an int tensor [B, M], got shape "
                             f"{tuple(marks.shape)}")
        if marks.dtype == torch.bool:
            if marks.shape[1] > seq_len:
                raise ValueError(f"marks as a bool tensor [B, N] needs N <= seq_len = {seq_len}, got N = "
                                 f"{marks.shape[1]}")
            position = torch.arange(marks.shape[1], device=marks.device)
            positions = torch.where(marks, position, torch.full_like(position, -1).expand_as(marks))
        elif marks.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
            positions = marks.long()
        else:
            raise TypeError(f"marks must be a bool or integer tensor, got {marks.dtype}")
        positions = positions.to(dev)
    else:
        if not isinstance(marks, (list, tuple)):
            raise TypeError(f"marks must be None, a tensor, a list of positions or a list of lists of positions, "
                            f"got {type(marks).__name__}")
        nested = len(marks) > 0 and all(isinstance(row, (list, tuple, range)) for row in marks)
        rows: List[Sequence[int]] = list(marks) if nested else [marks]
        for row in rows:
            for position in row:
                if isinstance(position, bool) or not isinstance(position, int):
                    raise TypeError(f"marks must hold int positions, got {type(position).__name__} {position!r}")
        width = max((len(row) for row in rows), default=0)
        positions = torch.full((len(rows), width), -1, dtype=torch.int64)
        for r, row in enumerate(rows):  # one tensor per batch row, not per token
            positions[r, : len(row)] = torch.as_tensor(list(row), dtype=torch.int64)
        positions = positions.to(device if device is not None else "cpu")
    if positions.numel():
        low, high = int(positions.min()), int(positions.max())
        if low < -1 or high >= seq_len:
            raise ValueError(f"marks must be positions in [0, seq_len) = [0, {seq_len}) (or -1 for none in an "
                             f"int tensor); got values in [{low}, {high}]")
    if batch is not None and positions.shape[0] != batch:
        if positions.shape[0] != 1:
            raise ValueError(f"marks have {positions.shape[0]} batch rows, expected {batch} (or 1)")
        positions = positions.expand(batch, -1)
    return _sorted_distinct(positions)


def _sorted_distinct(positions: Tensor) -> Tensor:
    """Rows ascending, repeats and -1 moved to the end as -1, width trimmed to the longest row."""
    big = torch.iinfo(torch.int64).max
    values = torch.where(positions < 0, torch.full_like(positions, big), positions).sort(-1).values
    repeat = torch.zeros_like(values, dtype=torch.bool)
    repeat[..., 1:] = values[..., 1:] == values[..., :-1]
    values = torch.where(repeat, torch.full_like(values, big), values).sort(-1).values
    width = int((values != big).sum(-1).max()) if values.numel() else 0
    values = values[..., :width]
    return torch.where(values == big, torch.full_like(values, -1), values)


def from_marks(marks: Marks, seq_len: int, window: int = 0, sinks: int = 0, causal: bool = True, *,
               num_queries: Optional[int] = None, batch: Optional[int] = None,
               dtype: torch.dtype = torch.int64, device: Union[str, torch.device, None] = None) -> Tensor:
    """Per-query indices from a person's marks, plus attention sinks and a recent window.

    Query ``i`` (at ``p(i) = i + seq_len − num_queries``) keeps, deduplicated:

    * every marked position (see ``marks_tensor`` for the accepted forms),
    * the ``sinks`` first positions ``0 … sinks − 1``,
    * its ``window`` most recent positions ``p(i) − window + 1 … p(i)`` (itself included),

    and with ``causal=True`` only positions ``<= p(i)``. ``num_queries`` defaults to ``seq_len``
    (self-attention over the whole sequence; use 1 for a decode step). ``batch`` repeats marks
    given for one row (and sizes the result when ``marks`` is None).

    Returns ``[B, 1, num_queries, K]`` (broadcast over KV heads) ascending per row, ``-1`` padded,
    ``K`` = the largest row (``<= marks + sinks + window``). Memory O(num_queries · K).
    """
    seq_len = _check_count(seq_len, "seq_len", 1)
    window = _check_count(window, "window")
    sinks = _check_count(sinks, "sinks")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    num_queries = seq_len if num_queries is None else _check_count(num_queries, "num_queries", 1)
    _check_index_dtype(dtype)
    marked = marks_tensor(marks, seq_len, batch, device)
    dev = marked.device
    rows, width_m = marked.shape

    query_pos = torch.arange(num_queries, device=dev) + (seq_len - num_queries)  # p(i)
    # Candidates per row: marks | sinks | window, each set already distinct; overlaps are dropped
    # from the later sets (window positions < sinks; marks inside sinks or the window).
    sink_pos = torch.arange(min(sinks, seq_len), device=dev)
    window_pos = query_pos[:, None] - torch.arange(window, device=dev).flip(0)[None, :]  # [Nq, W] ascending
    window_ok = (window_pos >= max(sinks, 0)) & (window_pos < seq_len)
    marks_q = marked[:, None, :].expand(rows, num_queries, width_m)
    marks_ok = (marks_q >= sinks)
    if window:
        in_window = (marks_q > query_pos[None, :, None] - window) & (marks_q <= query_pos[None, :, None])
        marks_ok &= ~in_window
    sink_q = sink_pos[None, None, :].expand(rows, num_queries, -1)
    sink_ok = torch.ones_like(sink_q, dtype=torch.bool)
    if causal:
        marks_ok &= marks_q <= query_pos[None, :, None]
        sink_ok = sink_q <= query_pos[None, :, None]
    candidates = torch.cat([marks_q, sink_q, window_pos[None].expand(rows, -1, -1)], dim=-1)
    valid = torch.cat([marks_ok, sink_ok, window_ok[None].expand(rows, -1, -1)], dim=-1) & (candidates >= 0)
    indices = _compact(candidates, valid)
    return indices.to(dtype).unsqueeze(1).contiguous()


def _compact(candidates: Tensor, valid: Tensor) -> Tensor:
    """Valid entries ascending, -1 after them, width = the largest row's count."""
    big = torch.iinfo(torch.int64).max
    values = torch.where(valid, candidates.long(), torch.full_like(candidates, big, dtype=torch.int64))
    values = values.sort(-1).values
    width = max(int(valid.sum(-1).max()) if valid.numel() else 0, 1)
    values = values[..., :width]
    return torch.where(values == big, torch.full_like(values, -1), values)


def merge(first: Tensor, second: Tensor) -> Tensor:
    """Row-wise union of two index tensors (``-1`` = empty; each ``[B|1, H|1, Nq, K]`` or shared
    ``[B|1, H|1, K]``): int64, ascending, distinct, ``-1`` padded, per query unless both are shared."""
    for name, t in (("first", first), ("second", second)):
        if not isinstance(t, Tensor) or t.dtype not in (torch.int32, torch.int64) or t.dim() not in (3, 4):
            raise TypeError(f"{name} must be an int32/int64 index tensor [B, H, Nq, K] or [B, H, K]")
    a, b = first.long(), second.long()
    if a.dim() != b.dim():
        n = a.shape[2] if a.dim() == 4 else b.shape[2]
        a, b = (t.unsqueeze(2).expand(-1, -1, n, -1) if t.dim() == 3 else t for t in (a, b))
    lead = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    both = torch.cat([a.expand(*lead, -1), b.expand(*lead, -1)], -1)
    merged = _sorted_distinct(both)
    return merged if merged.shape[-1] else both.new_full((*lead, 1), -1)


# ---------------------------------------------------------------------------------------------
# Automatic selection by score
# ---------------------------------------------------------------------------------------------
def _check_qk(q: Tensor, k: Tensor) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor [batch, heads, seq, head_dim]")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head_dim, with "
                         f"q heads a multiple of k heads")


def _keep_rows(keep: Optional[Tensor], batch: int, heads: int, seqlen_q: int, seqlen_k: int) -> Optional[Tensor]:
    """``keep`` as int64 ``[B, heads, Nq, Kk]`` (validated; -1 empty)."""
    if keep is None:
        return None
    if not isinstance(keep, Tensor) or keep.dtype not in (torch.int32, torch.int64) or keep.dim() not in (3, 4):
        raise TypeError("keep must be an int32/int64 index tensor [B, Hkv|1, Nq, K] or [B, Hkv|1, K]")
    wrong_queries = keep.dim() == 4 and keep.shape[2] != seqlen_q
    if keep.shape[0] not in (1, batch) or keep.shape[1] not in (1, heads) or wrong_queries:
        raise ValueError(f"keep must have shape [{batch}, {heads}|1, {seqlen_q}, K] or [{batch}, {heads}|1, K], "
                         f"got {tuple(keep.shape)}")
    if keep.numel() and (int(keep.min()) < -1 or int(keep.max()) >= seqlen_k):
        raise ValueError(f"keep must lie in [-1, Nk) = [-1, {seqlen_k})")
    rows = keep.long() if keep.dim() == 4 else keep.long().unsqueeze(2).expand(-1, -1, seqlen_q, -1)
    return rows.expand(batch, heads, -1, -1)


def _fill(kept: Optional[Tensor], ranked: Tensor, k_top: int) -> Tensor:
    """Kept entries first (all of them), then ranked entries (best first, disjoint from kept) up to
    ``k_top`` per row. Returns ascending rows, -1 padded, width max(k_top, most kept)."""
    if kept is None:
        return _compact(ranked, ranked >= 0)
    kept_count = (kept >= 0).sum(-1, keepdim=True)
    rank = torch.arange(ranked.shape[-1], device=ranked.device)
    take = (ranked >= 0) & (rank < k_top - kept_count)
    return _compact(torch.cat([kept, ranked], -1), torch.cat([kept >= 0, take], -1))


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def topk_by_score(q: Tensor, k: Tensor, k_top: int, block_size: int = 1024, *, causal: bool = False,
                  scale: Optional[float] = None, keep: Optional[Tensor] = None, query_block: Optional[int] = None,
                  group_reduce: str = "mean", dtype: torch.dtype = torch.int64) -> Tensor:
    """The ``k_top`` keys with the largest scores ``q·k·scale`` per query (or per query block).

    Args:
        q: ``[B, Hq, Nq, D]``; k: ``[B, Hkv, Nk, D]``. Scores are per KV head: the query heads of a
            group are combined by ``group_reduce`` - ``"mean"`` (of their scores) or ``"max"``.
        k_top: keys per query. Rows with fewer candidates get ``-1`` slots.
        block_size: keys scored per step; queries are chunked too, so a step holds at most about
            ``CHUNK_ELEMENTS`` scores - never ``Nq × Nk`` at once.
        causal: only keys ``j <= p(i)``.
        keep: indices always kept (e.g. ``from_marks(...)``): all kept keys are in the result and
            the selector fills the remaining ``k_top − kept`` slots.
        query_block: if set, rows of each block of that many queries share one selection, ranked by
            their best score (causal: by the block's last query) - what the union kernel path likes.

    Returns int ``[B, Hkv, Nq, max(k_top, most kept)]``, ascending per row, ``-1`` padded.
    """
    _check_qk(q, k)
    k_top = _check_count(k_top, "k_top", 1)
    block_size = _check_count(block_size, "block_size", 1)
    if group_reduce not in ("mean", "max"):
        raise ValueError(f"group_reduce must be 'mean' or 'max', got {group_reduce!r}")
    if query_block is not None:
        query_block = _check_count(query_block, "query_block", 1)
    _check_index_dtype(dtype)
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    scale = head_dim ** -0.5 if scale is None else float(scale)
    ctype = _compute_dtype(q)
    kept = _keep_rows(keep, batch, heads_kv, seqlen_q, seqlen_k)

    qg = q.detach().to(ctype).reshape(batch, heads_kv, group, seqlen_q, head_dim)
    if group_reduce == "mean":  # mean_g(q_g·k) = (mean_g q_g)·k
        qg = qg.mean(2, keepdim=True)
    kc = k.detach().to(ctype)
    qb = query_block or 1
    # Rank a few extra keys when blocks share a list: a row drops the ones it already keeps.
    width = min(k_top + (kept.shape[-1] if kept is not None and qb > 1 else 0), seqlen_k)
    rows_per_chunk = CHUNK_ELEMENTS // max(1, batch * heads_kv * qg.shape[2] * block_size)
    rows_per_chunk = max(qb, rows_per_chunk // qb * qb)
    picked_val, picked_idx = [], []
    for q0 in range(0, seqlen_q, rows_per_chunk):  # chunks of queries ...
        q1 = min(seqlen_q, q0 + rows_per_chunk)
        pos = torch.arange(q0, q1, device=q.device) + (seqlen_k - seqlen_q)  # p(i)
        vals = idx = None
        for k0 in range(0, seqlen_k, block_size):  # ... times blocks of keys: [n, bs] scores at a time
            k1 = min(seqlen_k, k0 + block_size)
            keys = torch.arange(k0, k1, device=q.device)
            s = torch.matmul(qg[:, :, :, q0:q1], kc[:, :, None, k0:k1].transpose(-1, -2)) * scale
            s = s.amax(2)  # over the group's heads ("max"), or the single mean row
            if causal:
                s = s.masked_fill(keys[None, :] > pos[:, None], float("-inf"))
            if kept is not None:  # kept keys are not ranked: they are in the result anyway
                local = kept[:, :, q0:q1] - k0
                local = torch.where((local >= 0) & (local < k1 - k0), local, torch.full_like(local, k1 - k0))
                is_kept = torch.zeros((*s.shape[:-1], k1 - k0 + 1), dtype=torch.bool, device=q.device)
                is_kept.scatter_(-1, local, True)
                s = s.masked_fill(is_kept[..., :-1], float("-inf"))
            if qb > 1:  # a block of queries ranks keys by its best row
                pad = (-s.shape[2]) % qb
                if pad:
                    s = torch.cat([s, s.new_full((*s.shape[:2], pad, s.shape[3]), float("-inf"))], 2)
                s = s.view(batch, heads_kv, -1, qb, s.shape[-1]).amax(3)
            cand_val = s if vals is None else torch.cat([vals, s], -1)
            cand_idx = keys.expand(*s.shape[:-1], -1)
            cand_idx = cand_idx if idx is None else torch.cat([idx, cand_idx], -1)
            vals, order = cand_val.topk(min(width, cand_val.shape[-1]), dim=-1)
            idx = cand_idx.gather(-1, order)
        picked_val.append(vals)
        picked_idx.append(idx)
    vals, idx = torch.cat(picked_val, 2), torch.cat(picked_idx, 2)
    idx = torch.where(vals == float("-inf"), torch.full_like(idx, -1), idx)  # fewer candidates than k_top
    if qb > 1:
        idx = idx.repeat_interleave(qb, dim=2)[:, :, :seqlen_q]
        if kept is not None:
            repeat = (idx[..., :, None] == kept[..., None, :]).any(-1)
            idx = _rank_compact(idx, (idx >= 0) & ~repeat)
    return _fill(kept, idx, k_top).to(dtype).contiguous()


def _rank_compact(ranked: Tensor, valid: Tensor) -> Tensor:
    """Keep the valid entries of a best-first list in their order, -1 after them."""
    order = (~valid).to(torch.int8).argsort(dim=-1, stable=True)
    ranked = ranked.gather(-1, order)
    return torch.where(valid.gather(-1, order), ranked, torch.full_like(ranked, -1))


def topk_blocks_by_score(q: Tensor, k: Tensor, k_blocks: int, block_size: int = 64, *, summary: str = "mean",
                         causal: bool = False, local: bool = True, keep_blocks: Optional[Sequence[int]] = None,
                         scale: Optional[float] = None) -> Tensor:
    """Per query block, the ``k_blocks`` key blocks with the best summary score (cheap: O(n²/bs²) scores).

    Query block ``a`` is summarized by the mean of its queries, key block ``b`` by the ``summary`` of
    its keys (``"mean"``, or ``"max"``: elementwise max); the score is their dot product times
    ``scale``. ``causal``: key blocks entirely after the query block's last position are excluded.
    ``local``: the key blocks holding the query block's own positions ``p(i)`` are always kept, and
    so are ``keep_blocks`` (e.g. ``[0]`` for the sink block); the ranking fills the rest.

    Returns int64 ``[B, Hq, ceil(Nq/bs), max(k_blocks, kept)]`` key-block indices, ascending, ``-1``
    padded: pass to ``blocks_to_pattern`` (or ``BlockSparse.from_compressed``).
    """
    _check_qk(q, k)
    k_blocks = _check_count(k_blocks, "k_blocks", 1)
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    if summary not in ("mean", "max"):
        raise ValueError(f"summary must be 'mean' or 'max', got {summary!r}")
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    scale = head_dim ** -0.5 if scale is None else float(scale)
    ctype = _compute_dtype(q)
    q_blocks, kv_blocks = -(-seqlen_q // block_size), -(-seqlen_k // block_size)

    def blocked(t: Tensor, n_blocks: int, fill: float) -> Tensor:
        pad = n_blocks * block_size - t.shape[2]
        t = t.detach().to(ctype)
        if pad:
            t = torch.cat([t, t.new_full((*t.shape[:2], pad, head_dim), fill)], 2)
        return t.view(*t.shape[:2], n_blocks, block_size, head_dim)

    def block_counts(n: int, n_blocks: int) -> Tensor:
        return (n - torch.arange(n_blocks, device=q.device) * block_size).clamp(max=block_size).to(ctype)

    q_mean = blocked(q, q_blocks, 0.0).sum(3) / block_counts(seqlen_q, q_blocks)[:, None]
    if summary == "mean":
        k_sum = blocked(k, kv_blocks, 0.0).sum(3) / block_counts(seqlen_k, kv_blocks)[:, None]
    else:
        k_sum = blocked(k, kv_blocks, float("-inf")).amax(3)
    k_sum = k_sum.repeat_interleave(group, dim=1) if group > 1 else k_sum
    scores = torch.matmul(q_mean, k_sum.transpose(-1, -2)) * scale  # [B, Hq, Mb, Nb]
    return _rank_blocks(scores, k_blocks, block_size, seqlen_q, seqlen_k, causal, local, keep_blocks)


def _rank_blocks(scores: Tensor, k_blocks: int, block_size: int, seqlen_q: int, seqlen_k: int, causal: bool,
                 local: bool, keep_blocks: Optional[Sequence[int]]) -> Tensor:
    """Key-block scores ``[B, Hq, Mb, Nb]`` -> the ``topk_blocks_by_*`` result: the forced blocks
    (local, ``keep_blocks``) plus the best-scored allowed ones, ascending, ``-1`` padded."""
    batch, heads_q, q_blocks, kv_blocks = scores.shape
    device = scores.device
    # Positions: the query block's rows span p(first) .. p(last).
    first = torch.arange(q_blocks, device=device) * block_size + (seqlen_k - seqlen_q)
    last = (first + block_size - 1).clamp(max=seqlen_k - 1)
    kv_block = torch.arange(kv_blocks, device=device)
    allowed = torch.ones(q_blocks, kv_blocks, dtype=torch.bool, device=device)
    if causal:
        allowed = kv_block[None, :] * block_size <= last[:, None]
    forced = torch.zeros(q_blocks, kv_blocks, dtype=torch.bool, device=device)
    if local:
        lo = first.clamp(min=0) // block_size
        hi = last.clamp(min=0) // block_size
        forced |= (kv_block[None, :] >= lo[:, None]) & (kv_block[None, :] <= hi[:, None]) & (last[:, None] >= 0)
    if keep_blocks:
        keep = torch.as_tensor(list(keep_blocks), dtype=torch.int64, device=device)
        if int(keep.min()) < 0 or int(keep.max()) >= kv_blocks:
            raise ValueError(f"keep_blocks must lie in [0, {kv_blocks}), got {list(keep_blocks)}")
        forced[:, keep] = True
    forced &= allowed
    scores = scores.masked_fill(~allowed | forced, float("-inf"))
    take = min(k_blocks, kv_blocks)
    vals, ranked = scores.topk(take, dim=-1)
    ranked = torch.where(vals == float("-inf"), torch.full_like(ranked, -1), ranked)
    kept = torch.where(forced, kv_block, torch.full_like(kv_block, -1)).expand(batch, heads_q, -1, -1)
    return _fill(kept, ranked, k_blocks)


def topk_blocks_by_attention(q: Tensor, k: Tensor, k_blocks: int, block_size: int = 64, *, causal: bool = False,
                             local: bool = True, keep_blocks: Optional[Sequence[int]] = None,
                             scale: Optional[float] = None, softcap: Optional[float] = None,
                             alibi_slopes: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """Per query block, the ``k_blocks`` key blocks that receive the most attention probability.

    The score of key block ``b`` for query block ``a`` is the exact pooled mass of
    ``flashlite.attention_map(q, k, Full(causal), block=block_size)`` (the mean over the query
    block's rows of the softmax mass on the block's keys; ``scale``, ``softcap``, ``alibi_slopes``
    and ``backend`` as there), not a summary of the keys: slower than ``topk_blocks_by_score`` (the
    attention runs once, then the scores are recomputed in chunks), but it picks the blocks the
    full attention actually uses. ``causal``, ``local`` and ``keep_blocks`` as in
    ``topk_blocks_by_score``. q, k: float16/bfloat16/float32 (as ``flashlite.attention`` takes them).

    Returns int64 ``[B, Hq, ceil(Nq/bs), max(k_blocks, kept)]`` key-block indices, ascending, ``-1``
    padded: pass to ``blocks_to_pattern`` (or ``BlockSparse.from_compressed``).
    """
    from .maps import attention_map  # the api layer, loaded only by this helper

    k_blocks = _check_count(k_blocks, "k_blocks", 1)
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    scores = attention_map(q, k, Full(causal=causal), block=block_size, scale=scale, softcap=softcap,
                           alibi_slopes=alibi_slopes, backend=backend)
    return _rank_blocks(scores, k_blocks, block_size, q.shape[2], k.shape[2], causal, local, keep_blocks)


def blocks_to_pattern(block_indices: Tensor, block_size: int, seqlen_k: int, causal: bool = False) -> BlockSparse:
    """A ``flashlite.BlockSparse`` pattern from key-block indices ``[B|1, H|1, Mb, L]`` (``-1`` empty)."""
    if not isinstance(block_indices, Tensor) or block_indices.dtype not in (torch.int32, torch.int64):
        raise TypeError("block_indices must be an int32/int64 tensor [B|1, H|1, Mb, L]")
    if block_indices.dim() != 4:
        raise ValueError(f"block_indices must have shape [B|1, H|1, Mb, L], got {tuple(block_indices.shape)}")
    kv_blocks = -(-seqlen_k // block_size)
    ordered = _sorted_distinct(block_indices.long())
    counts = (ordered >= 0).sum(-1)
    ordered = ordered.clamp(min=0) if ordered.numel() else ordered
    if ordered.shape[-1] == 0:
        ordered = torch.zeros((*ordered.shape[:-1], 1), dtype=torch.int64, device=ordered.device)
    return BlockSparse.from_compressed(counts, ordered, block_size, kv_blocks, causal=causal)


__all__ = ["from_marks", "marks_tensor", "merge", "topk_by_score", "topk_blocks_by_score",
           "topk_blocks_by_attention", "blocks_to_pattern", "CHUNK_ELEMENTS"]
