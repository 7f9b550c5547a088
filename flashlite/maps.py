"""``flashlite.attention_map``: the attention probabilities pooled per (query block, key block).

Two passes, never an ``Nq × Nk`` matrix:

1. ``flashlite.attention(..., return_lse=True)`` on the chosen backend gives each query's
   log-sum-exp (the output is discarded; v = k, so the head dims match);
2. the scores are recomputed in float32 PyTorch for a chunk of query rows at a time
   (``CHUNK_ELEMENTS`` scores at most, one row per head being the smallest chunk), masked to the
   pattern's keys for those rows (``Pattern.dense_mask(rows=...)``; only the key columns the
   pattern's band reaches, so a window costs O(rows × window); ``TopK``: only the listed keys,
   O(rows × K)), turned into probabilities ``exp(s − lse)``, summed per key block and per query
   block.

The api layer: imports ``flashlite.api`` and ``flashlite.core``.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .api import attention, check_head_mask, check_qkv, check_scalars
from .core.patterns import BlockSparse, Full, Pattern, SlidingWindow, TopK
from .core.schedule import cdiv

# Scores (batch × heads × rows × keys) recomputed per step of pass 2.
CHUNK_ELEMENTS = 1 << 22

Block = Union[int, Tuple[int, int]]


def check_block(block) -> Tuple[int, int]:
    """``block`` as ``(block_q, block_k)``: an int ``b`` is ``(b, b)``."""
    def positive(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x > 0

    if positive(block):
        return block, block
    if isinstance(block, (tuple, list)) and len(block) == 2 and all(positive(x) for x in block):
        return int(block[0]), int(block[1])
    message = f"block must be a positive int or a (block_q, block_k) pair of positive ints, got {block!r}"
    if isinstance(block, int) and not isinstance(block, bool):
        raise ValueError(message)
    if isinstance(block, (tuple, list)) and len(block) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) for x in block):
        raise ValueError(message)
    raise TypeError(message)


def attention_map(q: Tensor, k: Tensor, pattern: Optional[Pattern] = None, *, block: Block = (64, 64),
                  scale: Optional[float] = None, softcap: Optional[float] = None,
                  alibi_slopes: Optional[Tensor] = None, backend: Optional[str] = None,
                  head_mask: Optional[Tensor] = None) -> Tensor:
    """The attention probabilities pooled per block: where each block of queries looks.

    Args:
        q: ``[B, Hq, Nq, D]``; k: ``[B, Hkv, Nk, D]`` with ``Hq % Hkv == 0``; float16/bfloat16/float32.
        pattern: ``Full`` (default, non-causal), ``SlidingWindow``, ``BlockSparse`` or ``TopK``.
        block: ``(block_q, block_k)``, or an int for both; any positive sizes (they need not divide
            the lengths: the last blocks may be partial).
        scale, softcap, alibi_slopes: as in ``flashlite.attention``.
        backend: the backend that computes the log-sum-exp (pass 1), as in ``flashlite.attention``.
        head_mask: bool ``[Hq]`` or ``[B, Hq]``: a False head's map is zeros. Pass 1 visits none of
            its tiles (the plan's skip, as in ``flashlite.attention``); pass 2 recomputes scores only
            for the (batch row, KV head) pairs with a kept head (a masked head that shares its KV head
            with a kept one gets its zeros from lse = −inf).

    Returns float32 ``[B, Hq, ⌈Nq/block_q⌉, ⌈Nk/block_k⌉]``: entry ``(a, c)`` is the mean over the
    query rows of block ``a`` (the rows that exist) of the probability mass those rows put on the
    keys of block ``c``. A row that sees no key counts 0, so a row of the map sums to the fraction
    of its block's rows that see a key. No gradient. Memory: the map, plus temporaries of at most
    about ``CHUNK_ELEMENTS`` scores (``TopK``: rows × K).
    """
    q, k, _ = check_qkv(q, k, k)
    scale, softcap, alibi_slopes = check_scalars(q, scale, softcap, alibi_slopes)
    block_q, block_k = check_block(block)
    if pattern is None:
        pattern = Full()
    elif not isinstance(pattern, (Full, SlidingWindow, BlockSparse, TopK)):
        raise TypeError(f"pattern must be a flashlite pattern (Full, SlidingWindow, BlockSparse, TopK) or None, "
                        f"got {type(pattern).__name__}")
    pattern.validate(q, k)
    head_mask = check_head_mask(head_mask, q)
    if head_mask is not None and head_mask.dtype != torch.bool:
        raise TypeError(f"head_mask must be a bool tensor (which heads run) for attention_map, got {head_mask.dtype}"
                        f" (a float gate scales a head's output, not its probabilities)")
    batch, heads_q, seqlen_q, _ = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    out = torch.zeros(batch, heads_q, cdiv(seqlen_q, block_q), cdiv(seqlen_k, block_k),
                      dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    pattern.check_values(seqlen_k)

    with torch.no_grad():
        q, k = q.detach(), k.detach()
        _, lse = attention(q, k, k, pattern, scale=scale, softcap=softcap or None, alibi_slopes=alibi_slopes,
                           return_lse=True, backend=backend, head_mask=head_mask)
        # A row that sees no key has lse = -inf: make it +inf so exp(s - lse) is 0 there.
        lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
        group = heads_q // heads_kv
        qf, kf = q.float(), k.float()
        slopes = None if alibi_slopes is None else alibi_slopes.view(-1, heads_q)  # [1|B, Hq]
        indices = pattern.row_indices(seqlen_q) if isinstance(pattern, TopK) else None

        def visible(r0: int, r1: int) -> Tensor:  # the pattern's mask of rows r0 .. r1 - 1
            return pattern.dense_mask(batch, heads_q, heads_kv, seqlen_q, seqlen_k, q.device, rows=(r0, r1))

        # Pass 2's batch: (B, Hkv), or with a head mask the P' (batch row, KV head) pairs with a
        # kept head, as a batch of P' with one KV head each.
        target, rows_mask, pass_batch, pass_kv = out, visible, batch, heads_kv
        if head_mask is not None:
            kept = head_mask.expand(batch, heads_q).reshape(batch * heads_kv, group).any(-1).nonzero()[:, 0]
            pairs = _Pairs(batch, heads_kv, kept)
            qf, kf, lse = pairs.take(qf), pairs.take(kf), pairs.take(lse)
            slopes = None if slopes is None else pairs.take(slopes)
            indices = None if indices is None else pairs.take(indices)
            target, pass_batch, pass_kv = out.new_zeros(kept.numel(), group, *out.shape[2:]), kept.numel(), 1

            def rows_mask(r0: int, r1: int) -> Tensor:
                return pairs.take(visible(r0, r1))
        qf = qf.view(pass_batch, pass_kv, group, seqlen_q, q.shape[-1])
        if slopes is not None:
            slopes = slopes[:, :, None, None]  # [1|B, Hq, 1, 1]
        width = seqlen_k if indices is None else indices.shape[-1]
        # Per row: the scores of every head (TopK: also the gathered keys, K × D per KV head).
        heads = pass_kv * group
        per_row = pass_batch * width * (heads if indices is None else max(heads, pass_kv * q.shape[-1]))
        rows_per_chunk = max(1, CHUNK_ELEMENTS // max(1, per_row))
        if rows_per_chunk >= block_q:
            rows_per_chunk -= rows_per_chunk % block_q  # whole query blocks per chunk
        for r0, r1 in _chunks(seqlen_q, block_q, rows_per_chunk):
            pos = torch.arange(r0, r1, device=q.device) + (seqlen_k - seqlen_q)  # p(i)
            if indices is None:
                mass, c0 = _dense_rows(qf, kf, pattern.band(), rows_mask, r0, r1, pos, scale, softcap, slopes, lse,
                                       block_k)
            else:
                mass, c0 = _topk_rows(qf, kf, indices[:, :, r0:r1], pattern.causal, r0, pos, scale, softcap,
                                      slopes, lse[:, :, r0:r1], block_k, out.shape[-1]), 0
            if mass is not None:
                _add_rows(target, mass, r0, c0, block_q)
        if target is not out:
            out.view(-1, group, *out.shape[2:])[kept] = target
        counts = (seqlen_q - torch.arange(out.shape[2], device=q.device) * block_q).clamp(max=block_q)
        out /= counts.to(torch.float32)[:, None]
    return out


class _Pairs:
    """The (batch row, KV head) pairs ``kept`` (indices into ``B·Hkv``) of a call's tensors."""

    def __init__(self, batch: int, heads_kv: int, kept: Tensor) -> None:
        self.batch, self.heads_kv, self.kept = batch, heads_kv, kept

    def take(self, t: Tensor) -> Tensor:
        """``t`` ``[B|1, H|1, ...]`` (H: Hq or Hkv) -> ``[P', H / Hkv, ...]``: the kept pairs' entries."""
        t = t.expand(self.batch, max(t.shape[1], self.heads_kv), *t.shape[2:])
        return t.reshape(self.batch * self.heads_kv, t.shape[1] // self.heads_kv, *t.shape[2:])[self.kept]


def _chunks(seqlen_q: int, block_q: int, rows: int):
    """Row ranges of at most ``rows`` rows, each either whole query blocks or inside one block."""
    if rows >= block_q:
        for r0 in range(0, seqlen_q, rows):
            yield r0, min(seqlen_q, r0 + rows)
        return
    for b0 in range(0, seqlen_q, block_q):
        b1 = min(seqlen_q, b0 + block_q)
        for r0 in range(b0, b1, rows):
            yield r0, min(b1, r0 + rows)


def _bias(s: Tensor, pos: Tensor, keys: Tensor, scale: float, softcap: float, slopes: Optional[Tensor]) -> Tensor:
    """Scaled scores ``s`` with the softcap and the ALiBi bias (``keys``: each score's key position,
    broadcastable to ``s [B, Hq, rows, n]``; ``pos``: each row's ``p(i)``)."""
    s = s * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if slopes is not None:
        s = s - slopes * (pos[:, None] - keys).abs().to(torch.float32)
    return s


def _dense_rows(qf, kf, band, visible, r0, r1, pos, scale, softcap, slopes, lse,
                block_k) -> Tuple[Optional[Tensor], int]:
    """Rows ``r0 .. r1 − 1``: the probability mass per key block, ``[B, Hq, rows, m]`` for the key
    blocks ``c0 .. c0 + m − 1`` (those the pattern's ``band`` lets these rows reach; None if none);
    and ``c0``. ``visible(r0, r1)``: the pattern's mask of the rows, ``[B|1, Hq|1, rows, Nk]``."""
    batch, heads_kv, group, seqlen_q, _ = qf.shape
    heads_q, seqlen_k = heads_kv * group, kf.shape[2]
    left, right = band  # the key columns these rows may reach: lo .. hi - 1
    first, last = r0 + seqlen_k - seqlen_q, r1 - 1 + seqlen_k - seqlen_q  # p(r0), p(r1 - 1)
    lo = 0 if left is None else max(0, first - left) // block_k * block_k
    hi = seqlen_k if right is None else min(seqlen_k, last + right + 1)
    if hi <= lo:
        return None, 0  # no row here sees a key
    s = torch.matmul(qf[:, :, :, r0:r1], kf[:, :, None, lo:hi].transpose(-1, -2))  # [B, Hkv, G, rows, keys]
    s = s.view(batch, heads_q, r1 - r0, hi - lo)
    s = _bias(s, pos, torch.arange(lo, hi, device=qf.device), scale, softcap, slopes)
    s = s.masked_fill_(~visible(r0, r1)[..., lo:hi], float("-inf")).sub_(lse[:, :, r0:r1, None]).exp_()
    pad = (-(hi - lo)) % block_k
    if pad:
        s = torch.nn.functional.pad(s, (0, pad))
    return s.view(*s.shape[:-1], -1, block_k).sum(-1), lo // block_k


def _topk_rows(qf, kf, indices, causal, r0, pos, scale, softcap, slopes, lse, block_k, key_blocks) -> Tensor:
    """As ``_dense_rows`` for a ``TopK`` pattern: only the listed keys (``indices [B, Hkv|1, rows, K]``;
    a row is a set: a repeated key counts once, -1 and, with ``causal``, keys after ``p(i)`` none)."""
    batch, heads_kv, group, _, head_dim = qf.shape
    seqlen_k = kf.shape[2]
    rows, width = indices.shape[2], indices.shape[3]
    ind = indices.to(qf.device).long().expand(batch, heads_kv, rows, width).sort(-1).values
    valid = ind >= 0
    valid[..., 1:] &= ind[..., 1:] != ind[..., :-1]  # sorted: a repeat follows its first copy
    if causal:
        valid &= ind <= pos[:, None]
    ind = ind.clamp(min=0)
    flat = kf.reshape(batch * heads_kv, seqlen_k, head_dim)
    gathered = flat[torch.arange(batch * heads_kv, device=qf.device)[:, None], ind.reshape(batch * heads_kv, -1)]
    gathered = gathered.view(batch, heads_kv, 1, rows, width, head_dim)
    qrows = qf[:, :, :, r0:r0 + rows, None]  # [B, Hkv, G, rows, 1, D]
    s = torch.matmul(qrows, gathered.transpose(-1, -2)).view(batch, heads_kv * group, rows, width)
    keys = ind.repeat_interleave(group, dim=1) if group > 1 else ind
    s = _bias(s, pos, keys, scale, softcap, slopes)
    visible = valid.repeat_interleave(group, dim=1) if group > 1 else valid
    probs = s.masked_fill_(~visible, float("-inf")).sub_(lse[..., None]).exp_()
    target = torch.where(visible, keys // block_k, torch.full_like(keys, key_blocks))
    mass = probs.new_zeros(*probs.shape[:-1], key_blocks + 1)
    mass.scatter_add_(-1, target, probs)
    return mass[..., :key_blocks]


def _add_rows(out: Tensor, mass: Tensor, r0: int, c0: int, block_q: int) -> None:
    """Add the rows' mass ``[B, Hq, rows, m]`` (rows from r0, key blocks from c0) into ``out``."""
    first = r0 // block_q
    before = r0 - first * block_q
    rows = mass.shape[2]
    after = (-(before + rows)) % block_q
    if before or after:
        mass = torch.nn.functional.pad(mass, (0, 0, before, after))
    blocks = mass.shape[2] // block_q
    out[:, :, first:first + blocks, c0:c0 + mass.shape[-1]] += mass.view(*mass.shape[:2], blocks, block_q, -1).sum(3)


__all__ = ["attention_map", "check_block", "CHUNK_ELEMENTS"]
