"""Host side of the gather (top-k) engine: the plan pieces it needs, and the launches.

The rows arrive canonical (``flashlite.core.gather_rows``): int64 ``[B, Hi, Nq, K]`` per query or
``[B, Hi, K]`` shared, each row sorted with repeats dropped (``-1`` = empty slot), values in
``[-1, Nk)``. The inverse key index for the backward arrives as CSR (``key_offsets``,
``key_slots``, the same one the C++ backends read).

Forward modes (see ``gather_engine``): ``"row"`` (each query its own list, one query position
per program), ``"shared"`` (one list for all queries, a query tile per program) and ``"union"``
(a query tile gathers the union of its rows' keys once; chosen for per-query indices whose tile
rows overlap a lot, as ``flashlite.selection.from_marks`` produces). ``forward_plan`` and
``inverse_plan`` build the pieces with vectorized torch ops; the caller's plan keeps them (this
module caches nothing).

Determinism: the backward uses no atomics (dK/dV reduce over per-key inverse lists in a fixed
order), so forward and backward are bitwise deterministic for fixed inputs, on a GPU too.
Memory: O(B·H·Nq·K) for the plans; nothing of size Nq × Nk is allocated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton

from . import gather_engine
from .launch import (_alibi_args, _poison, dropout_args, entropy_args, program_grid, row_align, row_dot, softcap_mode,
                     stats_args)

MODES = ("row", "shared", "union")
# dK/dV kernel: head-dim columns per step (on a GPU: no spills, tests/test_triton_budget.py; the
# interpreter prefers whole rows) and its GPU launch.
KV_COLUMNS = 32
KV_COLUMNS_INTERPRETED = 256
KV_LAUNCH = dict(num_warps=4, num_stages=1)
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
    """Key lists per program: ``lists`` (the rows themselves in row/shared mode, the tile unions
    ``[B, Hi, T, U]`` in union mode), per-program counts, optional membership mask
    ``[B, Hi, T·BLOCK_Q, U]`` (union mode)."""

    mode: str
    block_q: int
    num_tiles: int
    lists: torch.Tensor
    counts: torch.Tensor
    member: Optional[torch.Tensor]

    @property
    def list_strides(self) -> Tuple[int, int, int, int]:
        """(batch, head, program, slot) strides; a shared list is the same for every program."""
        if self.mode == "shared":
            return self.lists.stride(0), self.lists.stride(1), 0, self.lists.stride(2)
        return tuple(self.lists.stride())

    @property
    def count_strides(self) -> Tuple[int, int, int]:
        return tuple(self.counts.stride()) if self.mode == "union" else (0, 0, 0)

    def parts(self) -> Tuple[Tuple[int, ...], Tuple[torch.Tensor, ...]]:
        """(ints, tensors) that rebuild this plan with ``from_parts`` (a plan crosses custom ops so)."""
        member = self.member if self.member is not None else self.counts
        return (MODES.index(self.mode), self.block_q, self.num_tiles), (self.lists, self.counts, member)

    @classmethod
    def from_parts(cls, ints, tensors) -> "ForwardPlan":
        mode = MODES[ints[0]]
        return cls(mode, ints[1], ints[2], tensors[0], tensors[1], tensors[2] if mode == "union" else None)


@dataclass
class InversePlan:
    """Every (query, key) selection as an *entry*, sorted by flattened key ``(b·Hi + hi)·Nk + j``
    then query; cut into chunks of ``block_e`` entries; runs of one key inside a chunk are
    *pieces* (a key's pieces are consecutive and are added in order by the reduce kernel)."""

    block_e: int
    num_pieces: int  # known when the plan is built, so a launch reads nothing back from the device
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

    def parts(self) -> Tuple[Tuple[int, ...], Tuple[torch.Tensor, ...]]:
        return (self.block_e, self.num_pieces), (self.entry_query, self.entry_key, self.entry_piece,
                                                 self.chunk_piece, self.key_id, self.key_piece_start,
                                                 self.key_piece_count)

    @classmethod
    def from_parts(cls, ints, tensors) -> "InversePlan":
        return cls(ints[0], ints[1], *tensors)


def _block_sizes(head_dim: int, group: int, device: torch.device,
                 dtype: Optional[torch.dtype] = None) -> Tuple[int, int, int]:
    """(BLOCK_K, GROUP_PAD, rows per program target). The interpreter likes few, large programs;
    float32 on a GPU (tf32x3 dots) takes fewer keys per step and fewer rows (measured on sm_90a,
    tests/test_triton_budget.py: 64 rows spilled at d128)."""
    block_d = max(triton.next_power_of_2(head_dim), 16)
    group_pad = triton.next_power_of_2(group)
    if device.type != "cuda":
        return 32, group_pad, 64
    if dtype == torch.float32:
        return 16, group_pad, (32 if block_d <= 64 else 16)
    return (64 if block_d <= 128 else 32), group_pad, (64 if block_d <= 128 else 32)


def forward_block_q(head_dim: int, group: int, device: torch.device, dtype: Optional[torch.dtype] = None) -> int:
    """Query positions per program in shared and union mode (times the group's padded heads)."""
    _, group_pad, rows_target = _block_sizes(head_dim, group, device, dtype)
    return max(1, rows_target // group_pad, 16 // group_pad)


def _valid_keys(rows: torch.Tensor, seqlen_q: int, seqlen_k: int, causal: bool) -> torch.Tensor:
    """Canonical rows as ``[B, Hi, Nq, K]`` (a shared list broadcast) with causally excluded slots −1."""
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


def forward_plan(rows: torch.Tensor, seqlen_q: int, seqlen_k: int, causal: bool, group: int,
                 head_dim: int, mode: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> ForwardPlan:
    """How the forward and dQ kernels walk the keys of canonical ``rows`` (``dtype``: q's, which
    sets the query tile of float32 on a GPU; None plans as for 16-bit inputs)."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
    shared = rows.dim() == 3
    mode = mode or FORCE_MODE
    if shared:
        mode = "shared"  # one list for every query: nothing to choose
    elif mode == "shared":
        raise ValueError("mode 'shared' needs indices [B, Hkv|1, K]")
    block_q = forward_block_q(head_dim, group, rows.device, dtype)
    width = rows.shape[-1]
    if shared:
        counts = torch.full((1,), width, dtype=torch.int32, device=rows.device)
        return ForwardPlan("shared", block_q, -(-seqlen_q // block_q), rows, counts, None)
    chosen = mode
    valid = None
    if chosen is None:
        # The interpreter runs few large programs much faster than many small ones, so on CPU
        # tensors a little sharing already favours union mode.
        interpreted = rows.device.type != "cuda"
        chosen = "row"
        if seqlen_q > 1 and (interpreted or seqlen_q >= 2 * block_q):
            valid = _valid_keys(rows, seqlen_q, seqlen_k, causal)
            if _union_reuse(valid, block_q, seqlen_k) >= (UNION_MIN_REUSE_INTERPRETED if interpreted
                                                          else UNION_MIN_REUSE):
                chosen = "union"
    if chosen == "row":
        return _row_plan(rows, seqlen_q, width)
    valid = valid if valid is not None else _valid_keys(rows, seqlen_q, seqlen_k, causal)
    plan = _union_plan(valid, block_q, seqlen_k)
    if mode is None and plan.member.numel() > UNION_MAX_MEMBER * valid.numel():
        return _row_plan(rows, seqlen_q, width)  # the sample was not representative
    return plan


def _row_plan(rows: torch.Tensor, seqlen_q: int, width: int) -> ForwardPlan:
    counts = torch.full((1,), width, dtype=torch.int32, device=rows.device)
    return ForwardPlan("row", 1, seqlen_q, rows, counts, None)


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
    return ForwardPlan("union", block_q, tiles, union.to(torch.int32).contiguous(),
                       count.to(torch.int32).contiguous(), member)


def backward_block_e(group: int) -> int:
    """Entries per dK/dV program (times the group's heads)."""
    return max(16, 64 // triton.next_power_of_2(group))


def inverse_plan(key_offsets: torch.Tensor, key_slots: torch.Tensor, top_k: int, block_e: int) -> InversePlan:
    """The dK/dV kernel's view of the inverse key index (CSR over keys, ``flashlite.core.gather_rows``):
    entries in key order cut into chunks of ``block_e``; a run of one key inside a chunk is a piece."""
    device = key_offsets.device
    per_key = key_offsets[1:] - key_offsets[:-1]
    entries = int(key_offsets[-1])
    entry_key = torch.repeat_interleave(torch.arange(per_key.numel(), device=device), per_key)
    entry_query = torch.div(key_slots[:entries], top_k, rounding_mode="floor").to(torch.int32)
    # A piece starts at every chunk start and wherever the key changes.
    position = torch.arange(entries, device=device)
    new_piece = position % block_e == 0
    new_piece[1:] |= entry_key[1:] != entry_key[:-1]
    piece = new_piece.cumsum(0) - 1
    num_pieces = int(piece[-1]) + 1 if entries else 0
    chunk_piece = torch.cat([piece[::block_e], piece.new_full((1,), num_pieces)])
    entry_piece = (piece - chunk_piece[position // block_e]).to(torch.int32)
    key_id, key_piece_count = torch.unique_consecutive(entry_key[new_piece], return_counts=True)
    key_piece_start = key_piece_count.cumsum(0) - key_piece_count
    return InversePlan(block_e, num_pieces, entry_query, entry_key.contiguous(), entry_piece, chunk_piece.contiguous(),
                       key_id, key_piece_start, key_piece_count.to(torch.int32))


def _index_head_stride(plan_strides, index_heads: int):
    """Broadcast index heads (Hi = 1) read the same list for every KV head."""
    b, h, t, s = plan_strides
    return b, (h if index_heads > 1 else 0), t, s


def _flags(q: torch.Tensor, causal: bool, softcap: float, alibi_slopes, plan: ForwardPlan, group: int) -> dict:
    interpreted = q.device.type != "cuda"
    block_k, group_pad, _ = _block_sizes(q.shape[-1], group, q.device, q.dtype)
    if plan.mode == "row":
        group_pad = max(group_pad, 16)  # tl.dot needs >= 16 rows
    return dict(
        CAUSAL=bool(causal), HAS_MEMBER=plan.member is not None, HAS_SOFTCAP=softcap_mode(q, softcap),
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


def gather_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: ForwardPlan, index_heads: int,
                   causal: bool, scale: float, softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                   dropout: Optional[Tuple[float, int]] = None, stats: Optional[int] = None,
                   row_keep: Optional[torch.Tensor] = None):
    """Top-k attention forward over ``plan`` (``forward_plan``). Returns (out like q, lse float32 ``[B, Hq, Nq]``).
    ``dropout``: (p, seed) of attention dropout at the key positions the rows name, or None. ``stats`` =
    sink_tokens: also the head statistics, (out, lse, row_stats float32 ``[5, B, Hq, Nq]``). ``row_keep``:
    the head mask (uint8 ``[B, Hq, Nq]``, ``keep_args``), or None."""
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads_q, seqlen_q), device=q.device, dtype=torch.float32)
    _poison(out, lse)
    row_stats, stat_flags = stats_args(stats, lse)
    tensors, plan_strides = _plan_args(plan, index_heads)
    alibi, alibi_stride = _alibi_args(alibi_slopes, lse)
    flags = _flags(q, causal, softcap, alibi_slopes, plan, group)
    gather_engine.gather_forward_kernel[gather_grid(plan.num_tiles, batch, heads_kv)](
        q, k, v, out, lse, *tensors, alibi,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *plan_strides, alibi_stride,
        heads_q, heads_kv, group, seqlen_q, seqlen_k, head_dim, float(scale), float(softcap or 0.0),
        plan.num_tiles, batch * heads_kv,
        ALIGN=row_align(head_dim, q, k, v, out), **flags, **dropout_args(dropout), **stat_flags,
        **keep_args(row_keep), **_launch(q, flags),
    )
    return (out, lse) if row_stats is None else (out, lse, row_stats)


def keep_args(row_keep: Optional[torch.Tensor]) -> dict:
    """The kernels' head-mask arguments for ``row_keep`` (uint8 ``[B, Hq, Nq]``, any strides:
    flashlite.core.head_mask.row_keep): HEAD_MASK=True, the pointer and its strides; None: {} (the
    kernels compile without it)."""
    if row_keep is None:
        return {}
    return dict(HEAD_MASK=True, KEEP=row_keep, stride_keep_b=row_keep.stride(0), stride_keep_h=row_keep.stride(1),
                stride_keep_n=row_keep.stride(2))


def gather_grid(num_tiles: int, batch: int, heads_kv: int) -> Tuple[int, int, int]:
    """Grid of the forward and dQ kernels: one program per (query tile of the plan, batch × KV head)."""
    return program_grid(num_tiles, batch * heads_kv)


def backward_kv_grid(num_entries: int, block_e: int, replicas: int) -> Tuple[int, int, int]:
    """Grid of the dK/dV kernel: one program per (chunk of ``block_e`` entries, KV-head replica)."""
    return program_grid(triton.cdiv(num_entries, block_e), replicas)


def reduce_grid(num_keys: int, block_r: int, replicas: int) -> Tuple[int, int, int]:
    """Grid of the reduce kernel: one program per (``block_r`` selected keys, KV-head replica)."""
    return program_grid(triton.cdiv(num_keys, block_r), replicas)


def _launch(q: torch.Tensor, flags: dict) -> dict:
    if q.device.type != "cuda":
        return {}
    rows = flags["BLOCK_Q"] * flags["GROUP_PAD"]
    if q.dtype == torch.float32:
        return dict(num_warps=4 if flags["BLOCK_D"] <= 64 else 8, num_stages=2)
    return dict(num_warps=4 if rows * flags["BLOCK_D"] <= 64 * 64 else 8, num_stages=2)


def gather_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, plan: ForwardPlan, inverse: InversePlan, index_heads: int, causal: bool,
                    scale: float, softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                    dropout: Optional[Tuple[float, int]] = None,
                    entropy: Optional[torch.Tensor] = None,
                    row_keep: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k attention backward: (dq, dk, dv). Bitwise deterministic (no atomics). ``entropy``:
    attention_stats' terms float32 ``[2, B, Hq, Nq]``, the entropy's gradient joins dS. ``row_keep``:
    the forward's head mask (masked rows: dq 0, nothing added to dk/dv).

    dQ walks the forward's key lists; dK/dV walk the inverse key index (``inverse_plan``) in chunks
    of ``inverse.block_e`` entries, then add each key's pieces in order."""
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    delta = row_dot(grad_out, out)
    lse = lse.contiguous()
    alibi, alibi_stride = _alibi_args(alibi_slopes, lse)
    common = (float(scale), float(softcap or 0.0))
    row_flags = dict(entropy_args(entropy, lse), **keep_args(row_keep))  # ENTROPY, HEAD_MASK

    dq = torch.empty_like(q)
    _poison(dq)
    tensors, plan_strides = _plan_args(plan, index_heads)
    flags = _flags(q, causal, softcap, alibi_slopes, plan, group)
    gather_engine.gather_backward_q_kernel[gather_grid(plan.num_tiles, batch, heads_kv)](
        q, k, v, grad_out, lse, delta, dq, *tensors, alibi,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *dq.stride()[:3],
        *plan_strides, alibi_stride,
        heads_q, heads_kv, group, seqlen_q, seqlen_k, head_dim, *common, plan.num_tiles, batch * heads_kv,
        ALIGN=row_align(head_dim, q, k, v, grad_out, dq), **flags, **dropout_args(dropout), **row_flags,
        **_launch(q, flags),
    )

    group_pad = triton.next_power_of_2(group)
    block_e = inverse.block_e
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)  # keys nobody selected get zero gradient
    if inverse.num_entries == 0:
        return dq, dk, dv
    replicas = heads_kv // index_heads
    num_pieces = inverse.num_pieces
    dk_part = torch.empty((replicas, num_pieces, head_dim), device=q.device, dtype=torch.float32)
    dv_part = torch.empty_like(dk_part)
    block_d = max(triton.next_power_of_2(head_dim), 16)
    interpreted = q.device.type != "cuda"
    # One-hot sums of fp32 terms: tf32x3 on tensor cores is as exact as fp32 here (the one-hot is exact).
    precision = "ieee" if interpreted else "tf32x3"
    gather_engine.gather_backward_kv_kernel[backward_kv_grid(inverse.num_entries, block_e, replicas)](
        q, k, v, grad_out, lse, delta, dk_part, dv_part, inverse.entry_query, inverse.entry_key,
        inverse.entry_piece, inverse.chunk_piece, alibi,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], alibi_stride,
        heads_q, heads_kv, index_heads, group, inverse.num_entries, num_pieces, seqlen_q, seqlen_k, head_dim,
        *common, triton.cdiv(inverse.num_entries, block_e), replicas,
        HAS_SOFTCAP=softcap_mode(q, softcap), HAS_ALIBI=alibi_slopes is not None, PIECE_PRECISION=precision,
        BLOCK_E=block_e, GROUP_PAD=group_pad,
        BLOCK_DC=min(block_d, KV_COLUMNS_INTERPRETED if interpreted else KV_COLUMNS),
        ALIGN=row_align(head_dim, q, k, v, grad_out), **dropout_args(dropout), **row_flags,
        **({} if interpreted else KV_LAUNCH),
    )
    num_keys = inverse.key_id.numel()
    block_r = 64 if interpreted else 16
    gather_engine.gather_reduce_kv_kernel[reduce_grid(num_keys, block_r, replicas)](
        dk, dv, dk_part, dv_part, inverse.key_id, inverse.key_piece_start, inverse.key_piece_count,
        *dk.stride()[:3], *dv.stride()[:3], heads_kv, index_heads, num_keys, num_pieces, seqlen_k, head_dim,
        triton.cdiv(num_keys, block_r), replicas,
        BLOCK_R=block_r, BLOCK_D=block_d, ALIGN=row_align(head_dim, dk, dv),
    )
    return dq, dk, dv


__all__ = ["gather_forward", "gather_backward", "forward_plan", "inverse_plan", "backward_block_e", "forward_block_q",
           "gather_grid", "backward_kv_grid", "reduce_grid", "ForwardPlan", "InversePlan", "MODES"]
