"""Context parallelism: one sequence over the ranks of a torch.distributed group.

```python
from flashlite import distributed as fld
q_l, k_l, v_l = (fld.shard(t, dim=2, layout="zigzag") for t in (q, k, v))
out_l = fld.context_parallel_attention(q_l, k_l, v_l, flashlite.Full(causal=True))
out = fld.unshard(out_l, dim=2, layout="zigzag")
fld.last_stats()   # what this rank computed, skipped, sent, and how long it waited
```

* ``layouts``: which global tokens each rank holds (``"contiguous"``, ``"zigzag"``), ``shard``,
  ``unshard``, ``positions``;
* ``pairs``: a global pattern cut into the kernel calls of one (query shard, key shard) pair,
  and which pairs have any work (the rest are skipped);
* ``ring``: ring attention (P2P K/V passing overlapped with the kernel, LSE merge, dK/dV ring);
* ``ulysses``: all-to-all from sequence shards to head shards and back;
* ``comm``: group checks, P2P exchanges, per-rank statistics.

Built on torch.distributed: gloo for CPU tensors, NCCL for CUDA tensors. See
docs/context_parallel.md for the cost model (when the ring's transfers hide under the kernel,
when Ulysses wins).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..api import check_qkv, check_scalars
from ..core.patterns import BlockSparse, Full, Pattern, SlidingWindow, TopK
from .comm import Stats, check_device, check_same_everywhere, group_rank_world, last_stats, set_last
from .layouts import LAYOUTS, check_layout, positions, rank_order, segments, shard, unshard

METHODS = ("ring", "ulysses")
_PATTERN_CODES = {Full: 1, SlidingWindow: 2, BlockSparse: 3, TopK: 4}


def _pattern_code(pattern: Pattern) -> int:
    code = _PATTERN_CODES.get(type(pattern), 0) * 16
    if isinstance(pattern, SlidingWindow):
        return code + 1
    return code + 2 * int(getattr(pattern, "causal", False))


def context_parallel_attention(
    q_l: Tensor, k_l: Tensor, v_l: Tensor, pattern: Optional[Pattern] = None, *, group=None,
    layout: str = "zigzag", method: str = "ring", scale: Optional[float] = None, softcap: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None, return_lse: bool = False, backend: Optional[str] = None,
):
    """Exact attention over a sequence sharded across the ranks of ``group`` (self-attention).

    Every rank of the group calls this with its shard and the same arguments.

    Args:
        q_l, k_l, v_l: this rank's shard, ``[B, Hq, n, D]`` and ``[B, Hkv, n, D]`` (GQA allowed), the
            tokens ``layout`` assigns to the rank (``shard`` cuts them); the global sequence has
            ``N = P·n`` tokens, ``P`` the group's size. Every rank holds the same ``n``.
        pattern: over the *global* sequence: ``Full`` (default non-causal), ``SlidingWindow``,
            ``BlockSparse`` (the global layout ``[B|1, Hq|1, N/bs, N/bs]``, identical on every rank;
            the ring needs each rank's segments to be whole blocks) or ``TopK`` (indices for this
            rank's queries, ``[B, Hkv|1, n, K]`` or ``[B, Hkv|1, K]``, as global key positions).
        group: a torch.distributed process group (default: the world).
        layout: ``"zigzag"`` (default; balances causal work) or ``"contiguous"``.
        method: ``"ring"`` (K/V shards pass around the ring; shards the pattern cannot see are
            skipped) or ``"ulysses"`` (all-to-all to head shards; needs ``Hq`` divisible by ``P``
            and ``Hkv`` a multiple or a divisor of ``P``).
        scale, softcap, backend: as :func:`flashlite.attention`; ``backend`` runs the local kernels.
        alibi_slopes: ``[Hq]`` or ``[B, Hq]``; ``method="ulysses"`` only (the ring's calls see
            positions local to each shard pair, and ALiBi's ``|i − j|`` cannot be shifted into them).
        return_lse: also return the lse of this rank's queries, ``[B, Hq, n]`` float32 (no gradient).

    Returns ``out_l`` like ``q_l`` (and ``lse_l``). Autograd gives q, k, v gradients of the shards.
    ``last_stats()`` reports what this rank did. Bad input raises ValueError (TypeError for a wrong
    type) naming the argument, on every rank alike where the problem is visible to all.
    """
    q_l, k_l, v_l = check_qkv(q_l, k_l, v_l)
    if pattern is None:
        pattern = Full()
    elif not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a flashlite pattern (Full, SlidingWindow, BlockSparse, TopK) or None, "
                        f"got {type(pattern).__name__}")
    if type(pattern) not in _PATTERN_CODES:
        raise TypeError(f"pattern must be Full, SlidingWindow, BlockSparse or TopK, got {type(pattern).__name__}")
    check_layout(layout)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(return_lse, bool):
        raise TypeError("return_lse must be a bool")
    if k_l.shape[2] != q_l.shape[2]:
        raise ValueError(f"k_l: context parallelism is self-attention: k_l must hold the same {q_l.shape[2]} "
                         f"tokens as q_l, got {k_l.shape[2]}")
    if q_l.shape[2] == 0:
        raise ValueError("q_l: the local sequence is empty")
    if layout == "zigzag" and q_l.shape[2] % 2:
        raise ValueError(f"q_l: layout='zigzag' holds two equal chunks per rank: the local sequence length must "
                         f"be even, got {q_l.shape[2]}")
    scale, softcap, alibi_slopes = check_scalars(q_l, scale, softcap, alibi_slopes)
    if method == "ring" and alibi_slopes is not None:
        raise ValueError("alibi_slopes: not supported with method='ring' (each shard pair's kernel sees local "
                         "positions); use method='ulysses'")
    rank, world_size = group_rank_world(group)
    check_device(group, q_l.device)
    batch, heads_q, n, head_dim = q_l.shape
    heads_kv = k_l.shape[1]

    # Rank-local checks of the pattern and head split, then one all-reduce: every rank must agree
    # on the shapes and arguments, and a rank that rejected its input makes every rank raise.
    error = None
    sharded = None
    try:
        if method == "ulysses":
            _check_ulysses(batch, heads_q, heads_kv, world_size, pattern, n)
        else:
            from .pairs import ShardedPattern

            sharded = ShardedPattern(pattern, rank, world_size, n, layout, batch, heads_q, heads_kv, q_l.device)
    except (ValueError, TypeError) as exc:
        error = exc
    fields = [
        ("q_l", n, "the local sequence length (uneven shards are not supported)"),
        ("q_l", batch, "the batch size"), ("q_l", heads_q, "the number of query heads"),
        ("k_l", heads_kv, "the number of key/value heads"), ("q_l", head_dim, "the head dim"),
        ("layout", LAYOUTS.index(layout), "the layout"), ("method", METHODS.index(method), "the method"),
        ("pattern", _pattern_code(pattern), "the pattern's kind"),
        ("pattern", 0 if error is None else 1, "acceptance of the pattern or heads (rejected on some rank)"),
    ]
    try:
        check_same_everywhere(group, q_l.device, fields)
    except ValueError:
        if error is not None:
            raise error from None
        raise
    if error is not None:
        raise error

    stats = Stats(method, layout, rank, world_size)
    set_last(stats)
    if method == "ring":
        from .ring import RingAttention, RingConfig

        cfg = RingConfig(sharded, group, rank, world_size, scale, softcap, backend, stats)
        out, lse = RingAttention.apply(q_l, k_l, v_l, cfg)
    else:
        from .ulysses import Exchange, ulysses_attention

        to_global, to_ranks = rank_order(world_size, n, layout, q_l.device)
        ex = Exchange(group, rank, world_size, n, to_global, to_ranks, stats)
        out, lse = ulysses_attention(q_l, k_l, v_l, pattern, ex, scale=scale, softcap=softcap,
                                     alibi_slopes=alibi_slopes, backend=backend)
        stats.set("forward", "steps", 1)
        stats.set("forward", "pairs_computed", world_size)
        stats.set("forward", "pairs_skipped", 0)
    return (out, lse) if return_lse else out


def _check_ulysses(batch: int, heads_q: int, heads_kv: int, world_size: int, pattern: Pattern, n: int) -> None:
    if heads_q % world_size:
        raise ValueError(f"q_l: method='ulysses' splits the query heads over the {world_size} ranks: the number of "
                         f"heads ({heads_q}) must be divisible by {world_size}")
    if heads_kv % world_size and world_size % heads_kv:
        raise ValueError(f"k_l: method='ulysses' needs the key/value heads ({heads_kv}) to be a multiple or a "
                         f"divisor of the {world_size} ranks")
    seqlen = n * world_size
    if isinstance(pattern, BlockSparse):
        from ..core.schedule import cdiv

        want = cdiv(seqlen, pattern.block_size)
        lb, lh = pattern.layout.shape[:2]
        if tuple(pattern.layout.shape[2:]) != (want, want) or lh not in (1, heads_q) or lb not in (1, batch):
            raise ValueError(f"pattern: the BlockSparse layout must cover the whole sequence of {seqlen} tokens: "
                             f"shape [{batch}|1, {heads_q}|1, {want}, {want}], got {tuple(pattern.layout.shape)}")
    if isinstance(pattern, TopK):
        ind = pattern.indices
        if ind.shape[0] != batch or ind.shape[1] not in (1, heads_kv) or (pattern.per_query and ind.shape[2] != n):
            raise ValueError(f"pattern: TopK indices must have shape [{batch}, {heads_kv}|1, {n}, K] or [{batch}, {heads_kv}|1, K] "
                             f"(this rank's queries, global key positions), got {tuple(ind.shape)}")
        if ind.numel():
            low, high = (int(x) for x in torch.aminmax(ind))
            if low < -1 or high >= seqlen:
                raise ValueError(f"pattern: TopK indices must lie in [-1, N) = [-1, {seqlen}) (global key positions); "
                                 f"got values in [{low}, {high}]")


__all__ = ["context_parallel_attention", "shard", "unshard", "positions", "segments", "last_stats", "LAYOUTS",
           "METHODS"]
