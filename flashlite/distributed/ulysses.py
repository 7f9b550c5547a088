"""DeepSpeed-Ulysses: trade sequence shards for head shards with an all-to-all, attend over the
whole sequence locally, and trade back.

Rank ``g`` of ``P`` takes query heads ``[g·Hq/P, (g+1)·Hq/P)`` over all ``N`` tokens. K/V heads go
with their query heads: ``Hkv/P`` of them each when ``P`` divides ``Hkv``; when there are fewer
K/V heads than ranks (GQA/MQA, ``Hkv`` divides ``P``), each rank receives the one K/V head its
query heads share, replicated (the backward sums the replicas' gradients). One
``all_to_all_single`` per tensor each way; the gathered sequence comes in rank order and is put in
global order (zigzag's permutation undone) before the kernel, so the pattern applies as written.
The kernel call is the ordinary one, with its own autograd; the all-to-alls are differentiable.
"""
from __future__ import annotations

import time
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .. import dispatch
from ..core.patterns import BlockSparse, Pattern, TopK
from .comm import Stats


class Exchange:
    """The geometry of one Ulysses call: the group, the head groups, the sequence permutation."""

    def __init__(self, group, rank: int, world_size: int, local_len: int, to_global: Optional[Tensor],
                 to_ranks: Optional[Tensor], stats: Stats) -> None:
        self.group, self.rank, self.world_size, self.local_len = group, rank, world_size, local_len
        self.to_global, self.to_ranks, self.stats = to_global, to_ranks, stats


def head_groups(heads: int, heads_q: int, world_size: int) -> List[List[int]]:
    """The heads (of a tensor with ``heads`` heads) each rank receives, for query heads split
    ``Hq/P`` per rank. Replicates when ``heads < P`` (every rank's query heads share one)."""
    per_q = heads_q // world_size
    if heads == heads_q:
        return [list(range(g * per_q, (g + 1) * per_q)) for g in range(world_size)]
    if heads == 1:
        return [[0] for _ in range(world_size)]
    group = heads_q // heads  # query heads per K/V head
    if heads % world_size == 0:
        per = heads // world_size
        return [list(range(g * per, (g + 1) * per)) for g in range(world_size)]
    return [[(g * per_q) // group] for g in range(world_size)]  # world_size % heads == 0


def _all_to_all(x: Tensor, ex: Exchange, phase: str) -> Tensor:
    import torch.distributed as dist

    out = torch.empty_like(x)
    start = time.perf_counter()
    dist.all_to_all_single(out, x, group=ex.group)
    ex.stats.add(phase, "comm_wait_s", time.perf_counter() - start)
    ex.stats.add(phase, "bytes_sent", x.numel() * x.element_size() * (ex.world_size - 1) // ex.world_size)
    return out


def seq_to_heads(x: Tensor, groups: Sequence[Sequence[int]], ex: Exchange, phase: str = "forward") -> Tensor:
    """``[B, H, n, ...]`` (this rank's tokens, all heads) -> ``[B, h, N, ...]`` (all tokens in global
    order, this rank's ``groups[rank]`` heads)."""
    send = torch.stack([x[:, list(g)] for g in groups])  # [P, B, h, n, ...]
    recv = _all_to_all(send, ex, phase)  # recv[i]: rank i's tokens of my heads
    y = recv.movedim(0, 2).flatten(2, 3)  # [B, h, P·n, ...] in rank order
    return y if ex.to_global is None else y.index_select(2, ex.to_global)


def heads_to_seq(y: Tensor, groups: Sequence[Sequence[int]], heads: int, ex: Exchange,
                 phase: str = "forward") -> Tensor:
    """The inverse of ``seq_to_heads``: ``[B, h, N, ...]`` -> ``[B, heads, n, ...]``, summing where
    a head was replicated to several ranks."""
    if ex.to_ranks is not None:
        y = y.index_select(2, ex.to_ranks)
    send = y.unflatten(2, (ex.world_size, ex.local_len)).movedim(2, 0).contiguous()  # [P, B, h, n, ...]
    recv = _all_to_all(send, ex, phase)  # recv[j]: my tokens of rank j's heads
    out = y.new_zeros((y.shape[0], heads, ex.local_len) + tuple(y.shape[3:]))
    for j, g in enumerate(groups):
        out.index_add_(1, torch.tensor(list(g), device=y.device), recv[j])
    return out


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, groups, ex: Exchange):
        ctx.groups, ctx.ex, ctx.heads = groups, ex, x.shape[1]
        return seq_to_heads(x, groups, ex)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return heads_to_seq(grad.contiguous(), ctx.groups, ctx.heads, ctx.ex, "backward"), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, groups, heads: int, ex: Exchange):
        ctx.groups, ctx.ex = groups, ex
        return heads_to_seq(y, groups, heads, ex)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return seq_to_heads(grad.contiguous(), ctx.groups, ctx.ex, "backward"), None, None, None


def local_pattern(pattern: Pattern, heads_q: int, heads_kv: int, ex: Exchange) -> Pattern:
    """The pattern of this rank's heads over the whole sequence in global order."""
    if isinstance(pattern, BlockSparse):
        if pattern.layout.shape[1] == 1:
            return pattern
        mine = head_groups(heads_q, heads_q, ex.world_size)[ex.rank]
        return BlockSparse(pattern.layout[:, mine[0]:mine[-1] + 1], pattern.block_size, pattern.causal)
    if isinstance(pattern, TopK):
        ind = pattern.indices
        if ind.dim() == 3:  # one list shared by every query: no exchange, only this rank's heads
            if ind.shape[1] == 1:
                return pattern
            mine = head_groups(heads_kv, heads_q, ex.world_size)[ex.rank]
            return TopK(ind[:, mine[0]:mine[-1] + 1], causal=pattern.causal)
        groups = head_groups(ind.shape[1], heads_q, ex.world_size)
        if ind.shape[1] != 1 and ind.shape[1] != heads_kv:
            raise ValueError(f"pattern: TopK indices must have {heads_kv} or 1 heads, got {ind.shape[1]}")
        return TopK(seq_to_heads(ind.contiguous(), groups, ex), causal=pattern.causal)
    return pattern


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, ex: Exchange, *, scale: float,
                      softcap: float, alibi_slopes: Optional[Tensor], backend: Optional[str]):
    """(out ``[B, Hq, n, D]``, lse ``[B, Hq, n]``) of this rank's tokens; differentiable in q, k, v."""
    heads_q, heads_kv = q.shape[1], k.shape[1]
    q_groups = head_groups(heads_q, heads_q, ex.world_size)
    kv_groups = head_groups(heads_kv, heads_q, ex.world_size)
    qh = _SeqToHeads.apply(q, q_groups, ex)
    kh = _SeqToHeads.apply(k, kv_groups, ex)
    vh = _SeqToHeads.apply(v, kv_groups, ex)
    mine = q_groups[ex.rank]
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes[..., mine[0]:mine[-1] + 1].contiguous()
    local = local_pattern(pattern, heads_q, heads_kv, ex)
    ex.stats.record_call("forward", local, qh, kh)
    out_h, lse_h = _Local.apply(qh, kh, vh, (local, scale, softcap, alibi_slopes, backend, ex.stats))
    out = _HeadsToSeq.apply(out_h, q_groups, heads_q, ex)
    with torch.no_grad():
        lse = heads_to_seq(lse_h.unsqueeze(-1), q_groups, heads_q, ex).squeeze(-1)
    return out, lse


class _Local(torch.autograd.Function):
    """The local kernel over the whole sequence: ``dispatch.run`` forward, ``dispatch.run_backward``
    backward (as the ring does; no custom-op machinery between the two all-to-alls)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, args):
        pattern, scale, softcap, alibi_slopes, backend, stats = args
        start = time.perf_counter()
        out, lse = dispatch.run(q, k, v, pattern, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes,
                                backend=backend)
        stats.add("forward", "compute_s", time.perf_counter() - start)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = args
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        pattern, scale, softcap, alibi_slopes, backend, stats = ctx.args
        start = time.perf_counter()
        stats.record_call("backward", pattern, q, k)
        dq, dk, dv = dispatch.run_backward(grad_out, q, k, v, out, lse, pattern, scale=scale, softcap=softcap,
                                           alibi_slopes=alibi_slopes, backend=backend)
        stats.add("backward", "compute_s", time.perf_counter() - start)
        return dq, dk, dv, None


__all__ = ["ulysses_attention", "head_groups", "seq_to_heads", "heads_to_seq", "Exchange"]
