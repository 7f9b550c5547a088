"""Sequence layouts: which global tokens each rank of a context-parallel group holds.

A sequence of ``N`` tokens is split over the ``P`` ranks of a group:

* ``"contiguous"``: rank ``r`` holds tokens ``[r·N/P, (r+1)·N/P)`` (one segment);
* ``"zigzag"``: the sequence is cut into ``2P`` chunks of ``N/(2P)`` tokens and rank ``r`` holds
  chunks ``r`` and ``2P−1−r``, in that order (two segments), so every rank does the same causal
  work.

A rank's local tensor is its segments concatenated along the sequence dim. ``segments`` gives
their global starts, ``positions`` every local token's global position, ``rank_order`` the
permutation between "all ranks' tokens concatenated in rank order" and the global order (what
Ulysses' all-to-all needs). ``shard`` / ``unshard`` move whole tensors between the two forms.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def num_segments(layout: str) -> int:
    """Segments per rank: 1 (contiguous) or 2 (zigzag)."""
    return 1 if check_layout(layout) == "contiguous" else 2


def chunks_of(rank: int, world_size: int, layout: str) -> Tuple[int, ...]:
    """The global chunk ids rank ``rank`` holds, in local order (chunks of ``N/P`` tokens for
    contiguous, ``N/(2P)`` for zigzag)."""
    if check_layout(layout) == "contiguous":
        return (rank,)
    return (rank, 2 * world_size - 1 - rank)


def segments(rank: int, world_size: int, local_len: int, layout: str) -> List[Tuple[int, int, int]]:
    """``(local_start, global_start, length)`` of each segment rank ``rank`` holds."""
    count = num_segments(layout)
    if local_len % count:
        raise ValueError(f"the local sequence length must be even for layout='zigzag', got {local_len}")
    length = local_len // count
    return [(i * length, chunk * length, length) for i, chunk in enumerate(chunks_of(rank, world_size, layout))]


def positions(rank: int, world_size: int, local_len: int, layout: str = "zigzag",
              device: Optional[torch.device] = None) -> Tensor:
    """Global positions (int64 ``[local_len]``) of the tokens rank ``rank`` holds: what a rank
    needs to build rotary embeddings or top-k indices for its shard."""
    parts = [torch.arange(g, g + n, device=device) for _, g, n in segments(rank, world_size, local_len, layout)]
    return torch.cat(parts)


def rank_order(world_size: int, local_len: int, layout: str, device=None) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(to_global, to_ranks)``: with ``x_r`` the ranks' shards concatenated in rank order,
    ``x_r.index_select(dim, to_global)`` is the sequence in global order and
    ``x_g.index_select(dim, to_ranks)`` goes back. Both None for contiguous (the identity)."""
    if check_layout(layout) == "contiguous":
        return None, None
    to_ranks = torch.cat([positions(r, world_size, local_len, layout, device) for r in range(world_size)])
    return torch.argsort(to_ranks), to_ranks


def _split_len(total: int, world_size: int, layout: str, name: str, dim: int) -> int:
    parts = world_size * num_segments(layout)
    if total % parts:
        raise ValueError(f"{name}: the sequence length along dim {dim} ({total}) must be divisible by "
                         f"{'2·' if layout == 'zigzag' else ''}world size = {parts} for layout={layout!r}")
    return total // world_size


def _rank_world(group, rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    if (rank is None) != (world_size is None):
        raise ValueError("rank and world_size must be given together (or neither: then the group's)")
    if rank is not None:
        if not (0 <= rank < world_size):
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        return rank, world_size
    from .comm import group_rank_world

    return group_rank_world(group)


def shard(t: Tensor, dim: int = 2, layout: str = "zigzag", *, group=None, rank: Optional[int] = None,
          world_size: Optional[int] = None) -> Tensor:
    """This rank's shard of the full tensor ``t`` along ``dim`` (a new contiguous tensor; autograd
    flows back into ``t``). ``rank`` / ``world_size`` default to the group's (the world's)."""
    check_layout(layout)
    rank, world_size = _rank_world(group, rank, world_size)
    dim = dim % t.dim()
    local_len = _split_len(t.shape[dim], world_size, layout, "t", dim)
    parts = [t.narrow(dim, g, n) for _, g, n in segments(rank, world_size, local_len, layout)]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim)).contiguous()


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: Tensor, dim: int, layout: str, group, rank: int, world_size: int):
        import torch.distributed as dist

        ctx.dim, ctx.layout, ctx.rank, ctx.world_size = dim, layout, rank, world_size
        local = local.contiguous()
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=group)
        full = torch.cat(gathered, dim)
        to_global, _ = rank_order(world_size, local.shape[dim], layout, local.device)
        return full if to_global is None else full.index_select(dim, to_global)

    @staticmethod
    def backward(ctx, grad):
        # Every rank holds the same full tensor: the gradient of this rank's shard is its slice of
        # the gradient (the loss is taken to be computed the same on every rank, as in the usual
        # "unshard, then compare" use), not a sum over ranks.
        return shard(grad, ctx.dim, ctx.layout, rank=ctx.rank, world_size=ctx.world_size), None, None, None, None, None


def unshard(t_local: Tensor, dim: int = 2, layout: str = "zigzag", *, group=None) -> Tensor:
    """The full tensor from every rank's shard (an all-gather over ``group``), in global order.
    Differentiable: the gradient of a rank's shard is its slice of the full tensor's gradient (as
    when every rank computes the same loss on the full tensor)."""
    check_layout(layout)
    from .comm import group_rank_world

    rank, world_size = group_rank_world(group)
    dim = dim % t_local.dim()
    segments(rank, world_size, t_local.shape[dim], layout)  # checks zigzag's even length
    return _Unshard.apply(t_local, dim, layout, group, rank, world_size)


__all__ = ["LAYOUTS", "check_layout", "chunks_of", "segments", "positions", "rank_order", "shard", "unshard"]
