"""A bool head mask in the plan: a masked (sequence, query head) does no work at all.

A call's mask is ``keep``, bool ``[Hq]`` or ``[S, Hq]``, S the batch of a plain call, the
sequences of a packed (varlen) batch, or the sequences of a paged cache. ``dispatch.plan``
lowers it into the plan of the call's engine, so every backend serves it in one call:

* tile engine: the masked heads' schedule counts become 0 (forward ``kv_count``, backward
  ``q_count``). Their query tiles visit no key tile: out 0, lse −inf, statistics 0 (a row that
  sees no key), dQ 0; and the dK/dV loops over a key tile's query tiles find none of theirs. The
  kernels already read counts per (b, h): none changed for this (the CPU decode path, which runs a
  KV group's heads together, stops each row at its own count);
* gather engine: ``row_keep``, uint8 ``[B, Hq, Nq]`` in the tensors' coordinates (a view, stride 0
  along the rows of a plain call), which the gather kernels read: a masked row visits no key and
  adds nothing to dK/dV;
* the reference: ``row_keep`` as a mask on the dense scores.

Lowering is a few tensor ops, no host read: a masked call can be captured in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .schedule import TileSchedule


def _per_sequence(keep: Tensor, sequences: int) -> Tensor:
    """``[S, Hq]`` of a ``[Hq]`` or ``[S, Hq]`` mask (a view)."""
    return keep.expand(sequences, keep.shape[-1])


def masked_schedule(schedule: TileSchedule, keep: Tensor) -> TileSchedule:
    """``schedule`` with the counts of masked heads 0: ``count[b, h, row] · keep[b, h]`` (a packed
    schedule: ``keep[sequence of item row, h]``). Counts become ``[B|1, Hq, rows]`` int32, the
    tiles views of that shape."""
    if schedule.is_packed:
        sequences = int(schedule.cu_seqlens_q.numel()) - 1
        keep = _per_sequence(keep, sequences)
        forward = keep[schedule.q_items[:, 0].long()].t()[None]  # [1, Hq, items]
        backward = keep[schedule.k_items[:, 0].long()].t()[None]
    else:
        forward = backward = keep[..., None] if keep.dim() == 2 else keep[None, :, None]
    kv_count = (schedule.kv_count * forward).to(torch.int32).contiguous()
    q_count = (schedule.q_count * backward).to(torch.int32).contiguous()
    # The tiles stay shared: views broadcast to the counts' [B|1, Hq] (stride 0, never copied).
    return replace(schedule, kv_count=kv_count, q_count=q_count,
                   kv_tiles=schedule.kv_tiles.expand(*kv_count.shape[:2], -1, -1),
                   q_tiles=schedule.q_tiles.expand(*q_count.shape[:2], -1, -1))


def row_keep(pattern, keep: Tensor, shape) -> Tensor:
    """uint8 ``[B, Hq, Nq]`` (the q tensor's ``shape[:3]``): 1 where the query row runs."""
    from .packed import Packed
    from .paged import Paged

    batch, heads_q, rows = shape[:3]
    keep = keep.to(torch.uint8)
    if isinstance(pattern, Packed):  # packed rows of sequence s: its cu_seqlens_q slice
        return _per_sequence(keep, pattern.num_sequences)[pattern._sequence_of_rows()].t()[None]
    if isinstance(pattern, Paged):  # rows b·Nq .. (b + 1)·Nq − 1 are sequence b's
        return _per_sequence(keep, pattern.batch).t().repeat_interleave(pattern.seqlen_q, 1)[None]
    return _per_sequence(keep, batch)[:, :, None].expand(batch, heads_q, rows)


__all__ = ["masked_schedule", "row_keep"]
