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


def key_index(rows: torch.Tensor, seqlen_q: int, seqlen_k: int, causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The inverse of canonical ``rows``: (key_offsets int64 ``[B·Hi·Nk + 1]``, key_slots int64
    ``[B·Hi·Nq·K]``, of which the first ``key_offsets[-1]`` are entries)."""
    batch, heads = rows.shape[:2]
    width = rows.shape[-1]
    if rows.dim() == 3:  # a shared list: every query row holds it
        rows = rows.unsqueeze(2).expand(batch, heads, seqlen_q, width)
    if causal:  # per-query rows are already causal; a shared list is cut here per query
        position = torch.arange(seqlen_q, device=rows.device) + (seqlen_k - seqlen_q)
        rows = torch.where(rows <= position[:, None], rows, torch.full_like(rows, -1))
    num_keys = batch * heads * seqlen_k
    per_block = seqlen_q * width
    head_base = (torch.arange(batch * heads, device=rows.device) * seqlen_k).view(batch, heads, 1, 1)
    # Key id of every slot (invalid ones -> num_keys, sorted last). One stable sort over all
    # slots keeps each key's slots ascending, so the order is fixed and the backward reduces in
    # it deterministically. The valid entries are the first E of the result; the tail (invalid
    # slots) is left in place, so no size depends on the data (no host sync).
    key = torch.where(rows >= 0, rows + head_base, torch.full_like(rows, num_keys)).reshape(-1)
    ordered, flat_slot = key.sort(stable=True)
    counts = torch.zeros(num_keys + 1, dtype=torch.int64, device=rows.device)
    counts.scatter_add_(0, ordered, torch.ones_like(ordered))
    key_offsets = torch.zeros(num_keys + 1, dtype=torch.int64, device=rows.device)
    key_offsets[1:] = counts[:-1].cumsum(0)
    key_slots = (flat_slot % per_block).contiguous()
    return key_offsets, key_slots


__all__ = ["canonical_rows", "key_index"]
