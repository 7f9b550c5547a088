"""Top-k rows as every backend consumes them: canonical rows and the inverse key index.

The ``TopK`` pattern holds the indices a person or a selector wrote: ``[B, Hi, Nq, K]`` (one
list per query) or ``[B, Hi, K]`` (one list shared by every query), ``-1`` = empty slot, keys
possibly listed twice. The plan turns them, once, into

* **canonical rows** (``canonical_rows``): int64, same shape, each row sorted ascending with
  repeated keys dropped (a row is a set: docs/design.md), out-of-range entries and — for per-query
  rows with ``causal`` — keys after ``p(i) = i + Nk − Nq`` turned into ``-1``. Dropped slots
  sort to the end. Every backend reads these, so all of them count a key once.
* the **inverse key index** (``key_index``) for the backward, CSR over keys:
  ``key_offsets`` int64 ``[B·Hi·Nk + 1]``; for key ``s = (b·Hi + hi)·Nk + j`` the entries are
  ``key_slots[key_offsets[s] : key_offsets[s + 1]]``, each a slot ``i·K + t`` (query row ``i``,
  list position ``t``) of a valid selection of ``j``, ascending. The CPU, CUDA and Triton
  backwards all walk this one index (docs/native_abi.md).

Pure torch on the indices' device, no host synchronization: safe under ``torch.compile`` and
CUDA-graph capture. Memory O(B·Hi·Nq·K).
"""
from __future__ import annotations

from typing import Tuple

import torch


def canonical_rows(indices: torch.Tensor, seqlen_q: int, seqlen_k: int, causal: bool) -> torch.Tensor:
    """Sorted, de-duplicated rows with invalid (and, per query, causally hidden) slots = -1."""
    rows = indices.to(torch.int64)
    invalid = (rows < 0) | (rows >= seqlen_k)
    if causal and rows.dim() == 4:
        position = torch.arange(seqlen_q, device=rows.device) + (seqlen_k - seqlen_q)  # p(i)
        invalid |= rows > position[:, None]
    # Invalid slots become Nk, which sorts after every key; a repeat of its left neighbour is
    # a duplicate. One sort: the dropped slots (-1) then sit among the valid ones only where a
    # duplicate was, and the kernels skip -1 wherever it is.
    ordered = torch.where(invalid, torch.full_like(rows, seqlen_k), rows).sort(dim=-1).values
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[..., 1:] = ordered[..., 1:] == ordered[..., :-1]
    return torch.where(repeat | (ordered == seqlen_k), torch.full_like(ordered, -1), ordered).contiguous()


KEY_INDEX_CHUNK = 1 << 24  # slots sorted at once: bounds key_index's temporaries (~0.5 GB), not its result


def key_index(rows: torch.Tensor, seqlen_q: int, seqlen_k: int, causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The inverse of canonical ``rows``: (key_offsets int64 ``[B·Hi·Nk + 1]``, key_slots int64
    ``[B·Hi·Nq·K]``, of which the first ``key_offsets[-1]`` are entries).

    Equal to one stable sort of every slot by key id ``(b·Hi + hi)·Nk + j`` (invalid slots last, in
    slot order), done over groups of whole (b, hi) blocks of at most ``KEY_INDEX_CHUNK`` slots, so
    the temporaries stay bounded; every size and position is computed on the device (no host sync).
    """
    batch, heads = rows.shape[:2]
    width = rows.shape[-1]
    device = rows.device
    if rows.dim() == 3:  # a shared list: every query row holds it
        rows = rows.unsqueeze(2).expand(batch, heads, seqlen_q, width)
    blocks, per_block = batch * heads, seqlen_q * width
    num_keys = blocks * seqlen_k
    rows = rows.reshape(blocks, seqlen_q, width)
    position = torch.arange(seqlen_q, device=device) + (seqlen_k - seqlen_q)  # p(i)
    group = max(1, KEY_INDEX_CHUNK // max(per_block, 1))
    starts = range(0, blocks, group)

    def keys_of(first: int) -> torch.Tensor:
        """Key ids of the slots of blocks [first, first + group), invalid -> num_keys, flat."""
        part = rows[first:first + group]
        valid = part >= 0
        if causal:  # per-query rows are already causal; a shared list is cut here per query
            valid &= part <= position[:, None]
        base = (torch.arange(first, first + part.shape[0], device=device) * seqlen_k).view(-1, 1, 1)
        return torch.where(valid, part + base, torch.full_like(part, num_keys)).reshape(-1)

    # Pass 1: entries per key -> offsets, and the number of entries E (a device scalar).
    counts = torch.zeros(num_keys + 1, dtype=torch.int64, device=device)
    for first in starts:
        key = keys_of(first)
        counts.scatter_add_(0, key, torch.ones_like(key))
    key_offsets = torch.zeros(num_keys + 1, dtype=torch.int64, device=device)
    key_offsets[1:] = counts[:-1].cumsum(0)
    entries = key_offsets[-1]
    # Pass 2: per group, a stable sort; its valid slots go after the earlier groups' entries, its
    # invalid ones after E and the earlier groups' invalid slots - the global sort's order.
    key_slots = torch.empty(blocks * per_block, dtype=torch.int64, device=device)
    valid_before = torch.zeros((), dtype=torch.int64, device=device)
    for first in starts:
        ordered, slot = keys_of(first).sort(stable=True)
        rank = torch.arange(ordered.numel(), device=device)
        valid_here = (ordered < num_keys).sum()
        invalid_before = first * per_block - valid_before
        target = torch.where(ordered < num_keys, valid_before + rank, entries + invalid_before + rank - valid_here)
        key_slots.index_copy_(0, target, slot % per_block)
        valid_before = valid_before + valid_here
    return key_offsets, key_slots


__all__ = ["canonical_rows", "key_index"]
