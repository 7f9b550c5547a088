"""Host side of the gather (top-k) engine: index plans, tile sizes, launches.

``gather_forward`` / ``gather_backward`` take ``indices`` as the API hands them over (int32 or
int64, ``[B, Hkv|1, Nq, K]`` per query or ``[B, Hkv|1, K]`` shared, ``-1`` = empty slot, entries
of a row distinct, values in ``[-1, Nk)``).

Forward modes (see ``gather_engine``): ``"row"`` (each query its own list, one query position
per program), ``"shared"`` (one list for all queries, a query tile per program) and ``"union"``
(a query tile gathers the union of its rows' keys once; chosen for per-query indices whose tile
rows overlap a lot, as ``flashlite.selection.from_marks`` produces). The plans (unions,
membership masks, inverse lists for the backward) are built with vectorized torch ops and cached
per index tensor (keyed by identity and version), so a model's layers that share one index
tensor - and the backward of a call - build them once.

Determinism: the backward uses no atomics (dK/dV reduce over per-key inverse lists in a fixed
order), so forward and backward are bitwise deterministic for fixed inputs, on a GPU too.
Memory: O(B·H·Nq·K) for the plans; nothing of size Nq × Nk is allocated.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton

from . import gather_engine
from .launch import _alibi_args, _poison

MODES = ("row", "shared", "union")
# Union mode is used when a query tile's rows select, on average, each key of the union at least
# this many times (measured on a sample of tiles): then gathering the union once wins.
UNION_MIN_REUSE = 4.0
UNION_MIN_REUSE_INTERPRETED = 2.0
# ... and its membership mask (int8, Nq × union width) stays within this many bytes per selection
# (int64 indices take 8), else the row path runs.
UNION_MAX_MEMBER = 8
# Tests set this to force a forward mode through the public API (None: chosen per call).
FORCE_MODE: Optional[str] = None


@dataclass
class ForwardPlan:
    """Key lists per program: ``lists [B|1.., Hi, T, S]`` with explicit strides, counts, optional
    membership mask ``[B, Hi, T·BLOCK_Q, S]`` (union mode)."""

    mode: str
    block_q: int
    num_tiles: int
    lists: torch.Tensor
    list_strides: Tuple[int, int, int, int]
    counts: torch.Tensor
    count_strides: Tuple[int, int, int]
    member: Optional[torch.Tensor]


@dataclass
class InversePlan:
    """Every (query, key) selection as an *entry*, sorted by flattened key ``(b·Hi + hi)·Nk + j``
    then query; cut into chunks of ``block_e`` entries; runs of one key inside a chunk are
    *pieces* (a key's pieces are consecutive and are added in order by the reduce kernel)."""

    block_e: int
    entry_query: torch.Tensor  # int32 [E]
    entry_key: torch.Tensor  # int64 [E]
    entry_piece: torch.Tensor  # int32 [E], relative to the chunk's first piece
    chunk_piece: torch.Tensor  # int64 [chunks + 1], first piece of each chunk (last = total)
    key_id: torch.Tensor  # int64 [selected keys]
    key_piece_start: torch.Tensor  # int64 [selected keys]
    key_piece_count: torch.Tensor  # int32 [selected keys]

    @property
    def num_entries(self) -> int:
        return self.entry_query.numel()

    @property
    def num_pieces(self) -> int:
        return int(self.chunk_piece[-1]) if self.num_entries else 0


def _block_sizes(head_dim: int, group: int, device: torch.device) -> Tuple[int, int, int]:
    """(BLOCK_K, GROUP_PAD, rows per program target). The interpreter likes few, large programs."""
    block_d = max(triton.next_power_of_2(head_dim), 16)
    group_pad = triton.next_power_of_2(group)
    if device.type != "cuda":
        return 32, group_pad, 64
    return (64 if block_d <= 128 else 32), group_pad, (64 if block_d <= 128 else 32)


def _alive(ref, tensor) -> bool:
    return ref() is tensor


class _PlanCache:
    """Plans keyed by the index tensor's identity and version (weak: an entry dies with its tensor)."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self.entries: "OrderedDict[tuple, tuple]" = OrderedDict()

    def get(self, indices: torch.Tensor, key: tuple):
        full_key = (id(indices), indices._version) + key
        hit = self.entries.get(full_key)
        if hit is not None and _alive(hit[0], indices):
            self.entries.move_to_end(full_key)
            return hit[1]
        return None

    def put(self, indices: torch.Tensor, key: tuple, plan) -> None:
        full_key = (id(indices), indices._version) + key
        try:
            ref = weakref.ref(indices)
        except TypeError:  # pragma: no cover - tensors support weak references
            return
        self.entries[full_key] = (ref, plan)
        self.entries.move_to_end(full_key)
        for stale in [k for k, (r, _) in self.entries.items() if r() is None]:
            del self.entries[stale]
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


_CACHE = _PlanCache()


def clear_plan_cache() -> None:
    _CACHE.entries.clear()


def _valid_keys(indices: torch.Tensor, seqlen_q: int, seqlen_k: int, causal: bool) -> torch.Tensor:
    """Row indices ``[B, Hi, Nq, K]`` int64 with empty and causally excluded slots set to −1."""
    rows = indices.long()
    if rows.dim() == 3:
        rows = rows.unsqueeze(2).expand(-1, -1, seqlen_q, -1)
    if causal:
        limit = torch.arange(seqlen_q, device=rows.device) + (seqlen_k - seqlen_q)  # p(i)
        rows = torch.where(rows <= limit[:, None], rows, torch.full_like(rows, -1))
    return rows


def _tile_unions(rows: torch.Tensor, block_q: int, seqlen_k: int):
    """Per query tile: the sorted union of its rows' keys (−1 padded) and its size.

    rows ``[B, Hi, Nq, K]`` (−1 = none) -> (union ``[B, Hi, T, U]`` int64, count ``[B, Hi, T]``)."""
    batch, heads, seqlen_q, width = rows.shape
    tiles = -(-seqlen_q // block_q)
    pad = tiles * block_q - seqlen_q
    if pad:
        rows = torch.cat([rows, rows.new_full((batch, heads, pad, width), -1)], dim=2)
    flat = rows.reshape(batch, heads, tiles, block_q * width)
    flat = torch.where(flat < 0, torch.full_like(flat, seqlen_k), flat)  # empty -> sorts last
    ordered = flat.sort(dim=-1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    first &= ordered < seqlen_k
    count = first.sum(-1)
    width_u = max(int(count.max()) if count.numel() else 0, 1)
    slot = torch.where(first, first.cumsum(-1) - 1, torch.full_like(ordered, width_u))
    union = ordered.new_full((batch, heads, tiles, width_u + 1), -1)
    union.scatter_(-1, slot, torch.where(first, ordered, torch.full_like(ordered, -1)))
    return union[..., :width_u], count


def _union_reuse(rows: torch.Tensor, block_q: int, seqlen_k: int, samples: int = 16) -> float:
    """Average selections per union key over a sample of query tiles (1 = no sharing)."""
    tiles = -(-rows.shape[2] // block_q)
    pick = torch.linspace(0, tiles - 1, steps=min(samples, tiles), device=rows.device).long().unique()
    starts = pick * block_q
    chunk = torch.stack([rows[:, :, s:s + block_q] if s + block_q <= rows.shape[2] else
                         torch.cat([rows[:, :, s:], rows.new_full((*rows.shape[:2], s + block_q - rows.shape[2],
                                                                   rows.shape[3]), -1)], dim=2)
                         for s in starts.tolist()], dim=2)
    chunk = chunk.flatten(2, 3)
    _, count = _tile_unions(chunk, block_q, seqlen_k)
    selected = (chunk >= 0).sum()
    return float(selected) / max(float(count.sum()), 1.0)


def forward_plan(indices: torch.Tensor, seqlen_q: int, seqlen_k: int, causal: bool, group: int,
                 head_dim: int, mode: Optional[str] = None) -> ForwardPlan:
    """How the forward and dQ kernels walk the keys (cached per index tensor)."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
    shared = indices.dim() == 3
    mode = mode or FORCE_MODE
    if shared:
        mode = "shared"  # one list for every query: nothing to choose
    elif mode == "shared":
        raise ValueError("mode 'shared' needs indices [B, Hkv|1, K]")
    _, group_pad, rows_target = _block_sizes(head_dim, group, indices.device)
    block_q = max(1, rows_target // group_pad, 16 // group_pad)
    key = ("fwd", seqlen_q, seqlen_k, causal, group_pad, block_q, mode)
    plan = _CACHE.get(indices, key)
    if plan is not None:
        return plan

    width = indices.shape[-1]
    if shared:
        tiles = -(-seqlen_q // block_q)
        counts = torch.full((1,), width, dtype=torch.int32, device=indices.device)
        plan = ForwardPlan("shared", block_q, tiles, indices,
                           (indices.stride(0), indices.stride(1), 0, indices.stride(2)), counts, (0, 0, 0), None)
    else:
        chosen = mode
        rows = None
        if chosen is None:
            # The interpreter runs few large programs much faster than many small ones, so on CPU
            # tensors a little sharing already favours union mode.
            interpreted = indices.device.type != "cuda"
            chosen = "row"
            if seqlen_q > 1 and (interpreted or seqlen_q >= 2 * block_q):
                rows = _valid_keys(indices, seqlen_q, seqlen_k, causal)
                if _union_reuse(rows, block_q, seqlen_k) >= (UNION_MIN_REUSE_INTERPRETED if interpreted
                                                             else UNION_MIN_REUSE):
                    chosen = "union"
        if chosen == "row":
            plan = _row_plan(indices, seqlen_q, width)
        else:
            rows = rows if rows is not None else _valid_keys(indices, seqlen_q, seqlen_k, causal)
            plan = _union_plan(rows, block_q, seqlen_k)
            if mode is None and plan.member.numel() > UNION_MAX_MEMBER * rows.numel():
                plan = _row_plan(indices, seqlen_q, width)  # the sample was not representative
    _CACHE.put(indices, key, plan)
    return plan


def _row_plan(indices: torch.Tensor, seqlen_q: int, width: int) -> ForwardPlan:
    counts = torch.full((1,), width, dtype=torch.int32, device=indices.device)
    return ForwardPlan("row", 1, seqlen_q, indices, tuple(indices.stride()), counts, (0, 0, 0), None)


def _union_plan(rows: torch.Tensor, block_q: int, seqlen_k: int) -> ForwardPlan:
    batch, heads, seqlen_q, width = rows.shape
    union, count = _tile_unions(rows, block_q, seqlen_k)
    tiles, width_u = union.shape[2], union.shape[3]
    # Membership: member[b, h, i, u] = 1 where query i selected union key u of its tile.
    pad = tiles * block_q - seqlen_q
    padded = torch.cat([rows, rows.new_full((batch, heads, pad, width), -1)], dim=2) if pad else rows
    per_tile = padded.reshape(batch, heads, tiles, block_q * width)
    lookup = torch.where(union < 0, torch.full_like(union, seqlen_k), union).contiguous()
    position = torch.searchsorted(lookup, per_tile.contiguous())
    position = torch.where(per_tile >= 0, position, torch.full_like(position, width_u))
    member = torch.zeros((batch, heads, tiles, block_q, width_u + 1), dtype=torch.int8, device=rows.device)
    member.view(batch, heads, tiles, block_q * (width_u + 1)).scatter_(
        -1, (torch.arange(block_q, device=rows.device).repeat_interleave(width) * (width_u + 1))
        .view(1, 1, 1, -1) + position, 1)
    member = member[..., :width_u].reshape(batch, heads, tiles * block_q, width_u)
    lists = union.to(torch.int32).contiguous()
    counts = count.to(torch.int32).contiguous()
    return ForwardPlan("union", block_q, tiles, lists, tuple(lists.stride()), counts, tuple(counts.stride()),
                       member)


def inverse_plan(indices: torch.Tensor, seqlen_q: int, seqlen_k: int, causal: bool, block_e: int) -> InversePlan:
    """Selections sorted by key, chunked for the dK/dV kernel (cached per index tensor)."""
    key = ("inv", seqlen_q, seqlen_k, causal, block_e)
    plan = _CACHE.get(indices, key)
    if plan is not None:
        return plan
    rows = _valid_keys(indices, seqlen_q, seqlen_k, causal)
    batch, heads, _, width = rows.shape
    device = rows.device
    num_keys = batch * heads * seqlen_k
    head_offset = (torch.arange(batch * heads, device=device) * seqlen_k).view(batch, heads, 1, 1)
    flat = torch.where(rows >= 0, rows + head_offset, torch.full_like(rows, num_keys)).reshape(-1)
    ordered, order = flat.sort(stable=True)  # by key, then by query (stable): a fixed order
    entries = int((ordered < num_keys).sum())
    entry_key, order = ordered[:entries].contiguous(), order[:entries]
    entry_query = ((order % (seqlen_q * width)) // width).to(torch.int32)
    # A piece starts at every chunk start and wherever the key changes.
    position = torch.arange(entries, device=device)
    new_piece = position % block_e == 0
    new_piece[1:] |= entry_key[1:] != entry_key[:-1]
    piece = new_piece.cumsum(0) - 1
    chunk_piece = torch.cat([piece[::block_e], piece.new_full((1,), int(piece[-1]) + 1 if entries else 0)])
    entry_piece = (piece - chunk_piece[position // block_e]).to(torch.int32)
    key_id, key_piece_count = torch.unique_consecutive(entry_key[new_piece], return_counts=True)
    key_piece_start = key_piece_count.cumsum(0) - key_piece_count
    plan = InversePlan(block_e, entry_query, entry_key, entry_piece, chunk_piece.contiguous(), key_id,
                       key_piece_start, key_piece_count.to(torch.int32))
    _CACHE.put(indices, key, plan)
    return plan


def _index_head_stride(plan_strides, index_heads: int):
    """Broadcast index heads (Hi = 1) read the same list for every KV head."""
    b, h, t, s = plan_strides
    return b, (h if index_heads > 1 else 0), t, s


def _flags(q: torch.Tensor, causal: bool, softcap: float, alibi_slopes, plan: ForwardPlan, group: int) -> dict:
    interpreted = q.device.type != "cuda"
    block_k, group_pad, _ = _block_sizes(q.shape[-1], group, q.device)
    if plan.mode == "row":
        group_pad = max(group_pad, 16)  # tl.dot needs >= 16 rows
    return dict(
        CAUSAL=bool(causal), HAS_MEMBER=plan.member is not None, HAS_SOFTCAP=bool(softcap),
        HAS_ALIBI=alibi_slopes is not None, UPCAST=interpreted,
        IEEE_DOT=q.dtype == torch.float32 and not interpreted,
        BLOCK_Q=plan.block_q, GROUP_PAD=group_pad, BLOCK_K=block_k,
        BLOCK_D=max(triton.next_power_of_2(q.shape[-1]), 16),
    )


def _plan_args(plan: ForwardPlan, index_heads: int):
    member = plan.member if plan.member is not None else plan.counts
    member_strides = ((member.stride(0), member.stride(1) if index_heads > 1 else 0, member.stride(2))
                      if plan.member is not None else (0, 0, 0))
    cb, ch, ct = plan.count_strides
    count_strides = (cb, ch if index_heads > 1 else 0, ct)
    return (plan.lists, plan.counts, member), (*_index_head_stride(plan.list_strides, index_heads),
                                               *count_strides, *member_strides)


def gather_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, causal: bool,
                   scale: float, softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                   *, mode: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k attention forward. Returns (out like q, lse float32 ``[B, Hq, Nq]``).

    ``mode`` forces ``"row"`` / ``"union"`` for per-query indices (None: chosen from the indices).
    """
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    plan = forward_plan(indices, seqlen_q, seqlen_k, causal, group, head_dim, mode)
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads_q, seqlen_q), device=q.device, dtype=torch.float32)
    _poison(out, lse)
    tensors, plan_strides = _plan_args(plan, indices.shape[1])
    alibi, alibi_stride = _alibi_args(alibi_slopes, lse)
    flags = _flags(q, causal, softcap, alibi_slopes, plan, group)
    gather_engine.gather_forward_kernel[(plan.num_tiles, batch * heads_kv)](
        q, k, v, out, lse, *tensors, alibi,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *plan_strides, alibi_stride,
        heads_q, heads_kv, group, seqlen_q, seqlen_k, head_dim, float(scale), float(softcap or 0.0),
        **flags, **_launch(q, flags),
    )
    return out, lse


def _launch(q: torch.Tensor, flags: dict) -> dict:
    if q.device.type != "cuda":
        return {}
    rows = flags["BLOCK_Q"] * flags["GROUP_PAD"]
    return dict(num_warps=4 if rows * flags["BLOCK_D"] <= 64 * 64 else 8, num_stages=2)


def gather_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, indices: torch.Tensor, causal: bool, scale: float, softcap: float = 0.0,
                    alibi_slopes: Optional[torch.Tensor] = None, *, mode: Optional[str] = None,
                    block_e: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k attention backward: (dq, dk, dv). Bitwise deterministic (no atomics).

    dQ walks the forward's key lists; dK/dV walk the selections sorted by key in chunks of
    ``block_e`` entries (default from the device and group size), then add each key's pieces."""
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    index_heads = indices.shape[1]
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    # δ_i = Σ_d dO_id · O_id  (the softmax-backward row term), float32 [B, Hq, Nq]
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    lse = lse.contiguous()
    alibi, alibi_stride = _alibi_args(alibi_slopes, lse)
    common = (float(scale), float(softcap or 0.0))

    plan = forward_plan(indices, seqlen_q, seqlen_k, causal, group, head_dim, mode)
    dq = torch.empty_like(q)
    _poison(dq)
    tensors, plan_strides = _plan_args(plan, index_heads)
    flags = _flags(q, causal, softcap, alibi_slopes, plan, group)
    gather_engine.gather_backward_q_kernel[(plan.num_tiles, batch * heads_kv)](
        q, k, v, grad_out, lse, delta, dq, *tensors, alibi,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *dq.stride()[:3],
        *plan_strides, alibi_stride,
        heads_q, heads_kv, group, seqlen_q, seqlen_k, head_dim, *common, **flags, **_launch(q, flags),
    )

    group_pad = triton.next_power_of_2(group)
    block_e = block_e or max(16, 64 // group_pad)
    inverse = inverse_plan(indices, seqlen_q, seqlen_k, causal, block_e)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)  # keys nobody selected get zero gradient
    if inverse.num_entries == 0:
        return dq, dk, dv
    replicas = heads_kv // index_heads
    num_pieces = inverse.num_pieces
    dk_part = torch.empty((replicas, num_pieces, head_dim), device=q.device, dtype=torch.float32)
    dv_part = torch.empty_like(dk_part)
    block_d = max(triton.next_power_of_2(head_dim), 16)
    interpreted = q.device.type != "cuda"
    precision = "ieee" if interpreted or q.dtype == torch.float32 else "tf32x3"
    gather_engine.gather_backward_kv_kernel[(triton.cdiv(inverse.num_entries, block_e), replicas)](
        q, k, v, grad_out, lse, delta, dk_part, dv_part, inverse.entry_query, inverse.entry_key,
        inverse.entry_piece, inverse.chunk_piece, alibi,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], alibi_stride,
        heads_q, heads_kv, index_heads, group, inverse.num_entries, num_pieces, seqlen_q, seqlen_k, head_dim,
        *common, HAS_SOFTCAP=bool(softcap), HAS_ALIBI=alibi_slopes is not None, PIECE_PRECISION=precision,
        BLOCK_E=block_e, GROUP_PAD=group_pad, BLOCK_D=block_d,
    )
    num_keys = inverse.key_id.numel()
    block_r = 64 if interpreted else 16
    gather_engine.gather_reduce_kv_kernel[(triton.cdiv(num_keys, block_r), replicas)](
        dk, dv, dk_part, dv_part, inverse.key_id, inverse.key_piece_start, inverse.key_piece_count,
        *dk.stride()[:3], *dv.stride()[:3], heads_kv, index_heads, num_keys, num_pieces, seqlen_k, head_dim,
        BLOCK_R=block_r, BLOCK_D=block_d,
    )
    return dq, dk, dv


__all__ = ["gather_forward", "gather_backward", "forward_plan", "inverse_plan", "clear_plan_cache", "MODES"]
