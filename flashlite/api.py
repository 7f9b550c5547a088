"""The api layer: the public functions. Validate the inputs, build the pattern, hand over to dispatch."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import dispatch
from .backend.base import DTYPES, MAX_HEAD_DIM
from .core.packed import Packed
from .core.patterns import BlockSparse, Full, Pattern, SlidingWindow, TopK

Window = Union[int, Tuple[int, int], Sequence[int]]


def check_qkv(q, k, v) -> Tuple[Tensor, Tensor, Tensor]:
    """Validate q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D]`` (errors name the argument); returns
    them with a contiguous last dimension (a copy only where it was not)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [batch, heads, seq, head_dim], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch, heads_q, _, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Hkv, Nk, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch:
        raise ValueError(f"k/v batch {k.shape[0]} does not match q batch {batch}")
    if k.shape[-1] != head_dim:
        raise ValueError(f"k/v head_dim {k.shape[-1]} does not match q head_dim {head_dim}")
    if head_dim < 1 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    heads_kv = k.shape[1]
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(f"q heads ({heads_q}) must be a multiple of k/v heads ({heads_kv}) (GQA/MQA)")
    # Any strides work as long as the last dimension is contiguous; otherwise copy.
    q, k, v = (t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous() for t in (q, k, v))
    return q, k, v


def check_scalars(q: Tensor, scale, softcap, alibi_slopes,
                  batch: Optional[int] = None) -> Tuple[float, float, Optional[Tensor]]:
    """(scale, softcap with 0.0 = off, alibi slopes as float32 contiguous): converted here, once.
    ``batch``: the slopes' batch size where it is not q's (a packed batch: its sequence count)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap < 0:
            raise ValueError(f"softcap must be a float > 0 or None, got {softcap!r}")
    softcap = float(softcap or 0.0)
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, Tensor) or not alibi_slopes.is_floating_point():
            raise TypeError("alibi_slopes must be a float tensor [Hq] or [B, Hq]")
        heads_q = q.shape[1]
        batch = q.shape[0] if batch is None else batch
        if tuple(alibi_slopes.shape) not in ((heads_q,), (batch, heads_q)):
            raise ValueError(f"alibi_slopes must have shape [{heads_q}] or [{batch}, {heads_q}], "
                             f"got {tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {q.device}")
        alibi_slopes = alibi_slopes.to(torch.float32).contiguous()
    return float(scale), softcap, alibi_slopes


def check_dropout(dropout_p, generator) -> Optional[Tuple[float, int]]:
    """None for no dropout, else (p, seed) with the seed drawn from ``generator`` now."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if not dropout_p:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        return None
    from .core.dropout import draw_seed

    return float(dropout_p), draw_seed(generator)


def check_head_mask(head_mask, q: Tensor, batch: Optional[int] = None, batch_name: str = "B") -> Optional[Tensor]:
    """None, or the mask as given, ``[Hq]`` or ``[batch, Hq]`` (bool: which heads run; float: each
    head's output gate). ``batch``: the mask's rows where they are not q's batch (a packed batch's
    sequences, named ``batch_name``)."""
    if head_mask is None:
        return None
    heads_q = q.shape[1]
    batch = q.shape[0] if batch is None else batch
    form = f"[{heads_q}] or [{batch_name}={batch}, {heads_q}]"
    if not isinstance(head_mask, Tensor) or not (head_mask.dtype == torch.bool or head_mask.is_floating_point()):
        raise TypeError(f"head_mask must be a bool or float tensor {form}, got "
                        f"{type(head_mask).__name__}{'' if not isinstance(head_mask, Tensor) else ' ' + str(head_mask.dtype)}")
    if tuple(head_mask.shape) not in ((heads_q,), (batch, heads_q)):
        raise ValueError(f"head_mask must have shape {form}, got {tuple(head_mask.shape)}")
    if head_mask.device != q.device:
        raise ValueError(f"head_mask is on {head_mask.device} but q is on {q.device}")
    return head_mask


def _check_pattern(pattern) -> Pattern:
    if pattern is None:
        return Full()
    if not isinstance(pattern, Pattern) or isinstance(pattern, Packed):
        raise TypeError(f"pattern must be a flashlite pattern (Full, SlidingWindow, BlockSparse, TopK) or None, "
                        f"got {type(pattern).__name__}")
    return pattern


def _linked_zeros(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Zeros like q that keep autograd links to q, k and v (zero gradients) without reading them:
    a sum over an empty slice is exactly 0, whatever q, k, v hold (inf or NaN included)."""
    link = sum(t.narrow(-1, 0, 0).sum() for t in (q, k, v))
    return q.new_zeros(q.shape) + link.to(q.dtype)


def _gate(out: Tensor, gate: Tensor, batch: int, per_row: Optional[Tensor] = None) -> Tensor:
    """``out`` ``[B, Hq, N, D]`` times a float head mask ``[Hq]`` / ``[batch, Hq]`` (``per_row``: the
    mask row of each of the N rows, for a packed batch, whose B is 1)."""
    gate = gate.to(out.dtype).expand(batch, out.shape[1])
    if per_row is not None:
        return out * gate[per_row].t()[None, :, :, None]
    return out * gate[:, :, None, None]


def _attend(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, head_mask: Optional[Tensor], stats: Optional[int],
            **kw) -> tuple:
    """(out, lse) or, with ``stats=sink_tokens``, (out, lse, row_stats): dispatch.run with the
    empty shapes and the head mask handled here.

    A bool mask goes into the call's plan (``dispatch.run(head_mask=)``, flashlite.core.head_mask):
    one call for every head, in which a masked head's tiles (or gathered rows) are never visited, so
    it gets zeros, lse −inf, zero statistics and zero gradients. A float mask gates each head's output."""
    if q.shape[2] == 0 or k.shape[2] == 0 or q.shape[0] == 0 or q.shape[1] == 0:
        out = _linked_zeros(q, k, v)
        lse = torch.full(q.shape[:3], float("-inf"), device=q.device, dtype=torch.float32)
        return (out, lse) if stats is None else (out, lse, q.new_zeros((5,) + lse.shape, dtype=torch.float32))
    if head_mask is None or head_mask.dtype == torch.bool:
        return dispatch.run(q, k, v, pattern, stats=stats, head_mask=head_mask, **kw)
    result = dispatch.run(q, k, v, pattern, stats=stats, **kw)
    return (_gate(result[0], head_mask, q.shape[0]),) + tuple(result[1:])


def attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: Optional[Pattern] = None, *, scale: Optional[float] = None,
    softcap: Optional[float] = None, alibi_slopes: Optional[Tensor] = None, return_lse: bool = False,
    backend: Optional[str] = None, deterministic: bool = True, dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None, head_mask: Optional[Tensor] = None,
):
    """Exact attention ``softmax(q·kᵀ·scale + bias)·v`` over ``pattern``.

    Args:
        q: ``[B, Hq, Nq, D]``; k, v: ``[B, Hkv, Nk, D]`` with ``Hq % Hkv == 0``; float16/bfloat16/float32,
            ``D <= 256``, any strides with a contiguous last dimension.
        pattern: ``Full`` (default, non-causal), ``SlidingWindow``, ``BlockSparse`` or ``TopK``.
        scale: score scale, default ``D ** -0.5``.
        softcap: if set, scores become ``softcap·tanh(score / softcap)``.
        alibi_slopes: float ``[Hq]`` or ``[B, Hq]``; adds ``−slope·|p(i) − j|``.
        return_lse: also return the log-sum-exp per query, ``[B, Hq, Nq]`` float32.
        backend: ``"triton"``, ``"cuda"``, ``"cpu"``, ``"reference"`` or None (auto; the environment
            variable ``FLASHLITE_BACKEND`` overrides auto).
        deterministic: ``True`` (default) keeps the backward bitwise reproducible; ``False`` lets a
            backend use a faster backward with atomic adds where it has one (CUDA).
        dropout_p: attention dropout probability (inverted dropout of the probabilities; applied
            whenever > 0, training or not). The mask is a counter-based stream
            (``flashlite.core.dropout``) seeded from ``generator`` (a CPU ``torch.Generator``;
            None: torch's default), regenerated in the backward, never stored. Served by the
            cpu, triton and reference backends (CUDA tensors: Triton).
        head_mask: ``[Hq]`` or ``[B, Hq]``. Bool: a False head does no work at all (part of the
            call's plan: its tiles or gathered rows are never visited; the kept heads give the
            same bits as without the mask, dropout included) and gets zeros, lse −inf and zero
            gradients. Float: multiplies each head's output (differentiable: its gradient is the
            head-importance score of Michel et al. 2019).

    Returns ``out`` shaped like q (and ``lse``, the undropped softmax's). A query that sees no key
    gets zeros and lse = −inf.
    """
    q, k, v = check_qkv(q, k, v)
    scale, softcap, alibi_slopes = check_scalars(q, scale, softcap, alibi_slopes)
    pattern = _check_pattern(pattern)
    if not isinstance(return_lse, bool):
        raise TypeError("return_lse must be a bool")
    if not isinstance(deterministic, bool):
        raise TypeError("deterministic must be a bool")
    pattern.validate(q, k)
    dropout = check_dropout(dropout_p, generator)
    head_mask = check_head_mask(head_mask, q)
    out, lse = _attend(q, k, v, pattern, head_mask, None, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes,
                       backend=backend, deterministic=deterministic, dropout=dropout)
    return (out, lse) if return_lse else out


class AttentionStats(NamedTuple):
    """Per-query head statistics, each ``[B, Hq, Nq]`` float32, over the probabilities ``P_ij`` of
    the keys query i sees (DESIGN.md, "Head statistics"). A query with no key: all 0, lse −inf."""

    entropy: Tensor  # −Σ P log P (nats); differentiable to q and k
    max_prob: Tensor  # max_j P_ij
    mean_distance: Tensor  # Σ P_ij·|p(i) − j|, p(i) = i + Nk − Nq
    sink_mass: Tensor  # Σ over the first sink_tokens keys of P_ij
    keys: Tensor  # how many keys query i sees
    lse: Tensor  # log Σ_j exp(s_ij)


def attention_stats(
    q: Tensor, k: Tensor, v: Tensor, pattern: Optional[Pattern] = None, *, sink_tokens: int = 4,
    scale: Optional[float] = None, softcap: Optional[float] = None, alibi_slopes: Optional[Tensor] = None,
    head_mask: Optional[Tensor] = None, backend: Optional[str] = None, deterministic: bool = True,
) -> Tuple[Tensor, AttentionStats]:
    """``attention`` plus what each head does, per query, from the same kernel pass (running sums
    beside the online softmax; never an Nq×Nk matrix).

    Args: as :func:`attention`; ``sink_tokens`` (int >= 0): the leading keys whose mass is
    ``sink_mass``. Returns ``(out, AttentionStats)``. ``out`` and ``stats.entropy`` carry gradients
    (to q, k, and v for out): the entropy can be a loss term, its gradient joins the same backward
    pass. The other statistics carry none.
    """
    q, k, v = check_qkv(q, k, v)
    scale, softcap, alibi_slopes = check_scalars(q, scale, softcap, alibi_slopes)
    pattern = _check_pattern(pattern)
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise ValueError(f"sink_tokens must be an int >= 0, got {sink_tokens!r}")
    if not isinstance(deterministic, bool):
        raise TypeError("deterministic must be a bool")
    pattern.validate(q, k)
    head_mask = check_head_mask(head_mask, q)
    out, lse, row_stats = _attend(q, k, v, pattern, head_mask, sink_tokens, scale=scale, softcap=softcap,
                                  alibi_slopes=alibi_slopes, backend=backend, deterministic=deterministic,
                                  dropout=None)
    entropy, *others = row_stats.unbind(0)
    return out, AttentionStats(entropy, *(plane.detach() for plane in others), lse)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, **kw):
    """Full attention; ``causal=True`` keeps keys ``j <= p(i) = i + Nk − Nq`` (bottom-right)."""
    return attention(q, k, v, Full(causal=causal), **kw)


def window_pattern(window: Window, causal: bool = True) -> SlidingWindow:
    """An int ``w`` means ``(w, 0)`` when causal and ``(w, w)`` otherwise; a pair is ``(left, right)``."""
    if isinstance(window, bool):
        raise TypeError("window must be an int or a (left, right) pair of ints, got bool")
    if isinstance(window, int):
        return SlidingWindow(window, 0 if causal else window)
    if isinstance(window, (tuple, list)) and len(window) == 2:
        left, right = window
        if causal and right not in (0, None):
            raise ValueError(f"window=(left, right) with causal=True needs right == 0, got right={right}")
        return SlidingWindow(left, right)
    raise TypeError(f"window must be an int or a (left, right) pair of ints, got {window!r}")


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: Window, causal: bool = True, **kw):
    """Attention over keys ``p(i) − left <= j <= p(i) + right``."""
    return attention(q, k, v, window_pattern(window, causal), **kw)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout, block_size: int = 64, **kw):
    """Attention over the ``block_size`` tiles marked in ``layout`` (bool ``[B|1, Hq|1, ⌈Nq/bs⌉, ⌈Nk/bs⌉]``),
    or a prebuilt ``BlockSparse`` pattern. The layout's schedule is built once per layout (and
    version) and reused by the plan cache."""
    pattern = layout if isinstance(layout, BlockSparse) else BlockSparse(layout, block_size)
    return attention(q, k, v, pattern, **kw)


def topk_attention(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, causal: bool = False, **kw):
    """Each query attends only the keys listed in ``indices`` (``[B, Hkv|1, Nq, K]`` or ``[B, Hkv|1, K]``,
    ``-1`` = empty). Work is O(Nq·K·D)."""
    return attention(q, k, v, TopK(indices, causal=causal), **kw)


def _packed_view(t, name: str, heads_name: str) -> Tensor:
    """A packed ``[T, H, D]`` tensor as the ``[1, H, T, D]`` view the kernels take (no copy)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [total_tokens, {heads_name}, head_dim], got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must be 3-D [total_tokens, {heads_name}, head_dim] (packed varlen layout), "
                         f"got shape {tuple(t.shape)}")
    return t.unsqueeze(0).transpose(1, 2)


def varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, pattern: Optional[Pattern] = None,
    *, max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None, dropout_p: float = 0.0,
    generator: Optional[torch.Generator] = None, scale: Optional[float] = None, softcap: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None, return_lse: bool = False, backend: Optional[str] = None,
    deterministic: bool = True, head_mask: Optional[Tensor] = None,
):
    """Attention over a packed batch of sequences of different lengths (flash-attn's varlen layout).

    Args:
        q: ``[Tq, Hq, D]``; k, v: ``[Tk, Hkv, D]``: S sequences back to back, any strides with a
            contiguous last dimension.
        cu_seqlens_q, cu_seqlens_k: int32 ``[S + 1]``, starting at 0, non-decreasing, ending at Tq / Tk.
            Sequence s owns query rows ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` and the keys
            ``cu_seqlens_k[s]:cu_seqlens_k[s+1]``; positions are local, ``p(i) = i + Nk_s − Nq_s``.
            Empty sequences are allowed.
        pattern: applied inside each sequence: ``Full`` (default), ``SlidingWindow``, ``BlockSparse``
            (layout ``[S|1, Hq|1, ⌈max_q/bs⌉, ⌈max_k/bs⌉]`` at local block positions) or ``TopK``
            (indices ``[Tq, Hkv|1, K]``, local key positions).
        max_seqlen_q, max_seqlen_k: flash-attn's bounds on the longest sequence (checked; optional).
        dropout_p, generator: attention dropout, as in ``attention`` (the mask indexes the packed
            ``[1, Hq, Tq, Tk]`` matrix).
        scale, softcap, backend, deterministic: as in ``attention``.
        alibi_slopes: float ``[Hq]`` or ``[S, Hq]`` (per sequence).
        return_lse: also return the log-sum-exp, ``[Tq, Hq]`` float32.
        head_mask: ``[Hq]`` or ``[S, Hq]`` (per sequence), as in ``attention``: bool, a False
            (sequence, head) visits no tile or key (zeros, lse −inf, zero gradients); float, a gate.

    Returns ``out`` ``[Tq, Hq, D]`` (and lse). The work is the sum over the sequences: nothing is
    padded. Differentiable in q, k, v.
    """
    q4 = _packed_view(q, "q", "heads_q")
    k4 = _packed_view(k, "k", "heads_kv")
    v4 = _packed_view(v, "v", "heads_kv")
    q4, k4, v4 = check_qkv(q4, k4, v4)
    if pattern is None:
        pattern = Full()
    elif isinstance(pattern, Packed) or not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a flashlite pattern (Full, SlidingWindow, BlockSparse, TopK) or None, "
                        f"got {type(pattern).__name__}")
    dropout = check_dropout(dropout_p, generator)
    packed = Packed(pattern, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    packed.validate(q4, k4)
    scale, softcap, alibi_slopes = check_scalars(q4, scale, softcap, alibi_slopes, batch=packed.num_sequences)
    if alibi_slopes is not None and isinstance(pattern, TopK):
        raise ValueError("alibi_slopes with a packed TopK pattern is not supported (the gather kernels read packed "
                         "positions); use attention() per sequence, or no ALiBi")
    if not isinstance(return_lse, bool):
        raise TypeError("return_lse must be a bool")
    if not isinstance(deterministic, bool):
        raise TypeError("deterministic must be a bool")
    head_mask = check_head_mask(head_mask, q4, batch=packed.num_sequences, batch_name="S")
    if q4.shape[2] == 0 or k4.shape[2] == 0 or q4.shape[1] == 0:
        if q4.shape[2] and k4.shape[2] == 0:
            packed.check_values(0)
        out = _linked_zeros(q, k, v)
        lse = torch.full(q.shape[:2], float("-inf"), device=q.device, dtype=torch.float32)
        return (out, lse) if return_lse else out
    gate = head_mask is not None and head_mask.is_floating_point()
    out, lse = dispatch.run(q4, k4, v4, packed, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes,
                            backend=backend, deterministic=deterministic, dropout=dropout,
                            head_mask=None if gate else head_mask)
    if gate:
        out = _gate(out, head_mask, packed.num_sequences, per_row=packed._sequence_of_rows())
    out, lse = out[0].transpose(0, 1), lse[0].transpose(0, 1)
    return (out, lse) if return_lse else out


def paged_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, cache_seqlens: Tensor,
    pattern: Optional[Pattern] = None, *, scale: Optional[float] = None, softcap: Optional[float] = None,
    alibi_slopes: Optional[Tensor] = None, return_lse: bool = False, backend: Optional[str] = None,
    head_mask: Optional[Tensor] = None,
):
    """Attention of each sequence's newest queries over its keys in a paged KV cache (forward only).

    Args:
        q: ``[B, Hq, Nq, D]``: sequence b's newest Nq queries (decode: Nq = 1; chunked prefill: Nq > 1),
            query i at logical position ``p(i) = cache_seqlens[b] − Nq + i``.
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]`` (vLLM / flash-attn layout; ``Hq % Hkv == 0``),
            q's dtype and device, page and slot dimensions mergeable (a contiguous cache is). Any
            page_size >= 1 (16 to 256 are the usual ones).
        block_table: int32 ``[B, max_pages]``: sequence b's pages in logical order. Only its first
            ``ceil(cache_seqlens[b] / page_size)`` entries are read (and checked to be page ids in
            ``[0, num_pages)``); the rest may hold anything (-1, say).
        cache_seqlens: int32 ``[B]``: keys per sequence, the new queries' keys already written
            (so ``cache_seqlens[b] >= Nq``).
        pattern: ``Full`` (default, non-causal: every key), ``Full(causal=True)`` (keys ``j <= p(i)``),
            ``SlidingWindow(left, right)`` (pages wholly outside every window are never read) or
            ``TopK`` (logical positions ``[B, Hkv|1, Nq, K]`` or ``[B, Hkv|1, K]`` in ``[-1, cache_seqlens[b])``).
        scale, softcap, backend: as in ``attention``.
        alibi_slopes: float ``[Hq]`` or ``[B, Hq]``; adds ``−slope·|p(i) − j|`` at logical positions. Served by
            the tile plan (cpu) and the reference with ``Full``/``SlidingWindow``; elsewhere a ValueError (the
            gather plan's rows are physical slots, not logical positions).
        return_lse: also return the log-sum-exp, ``[B, Hq, Nq]`` float32.
        head_mask: ``[Hq]`` or ``[B, Hq]``, as in ``attention``: bool, a False (sequence, head)
            gathers no key (zeros, lse −inf); float, a gate on each head's output.

    Returns ``out`` ``[B, Hq, Nq, D]`` (and lse). Forward only: the result carries no gradient (the
    inputs are detached). The plan (physical rows) is built once per (block_table, cache_seqlens)
    version and reused while neither changes.
    """
    from . import backend as backends
    from .core.head_mask import row_keep
    from .core.paged import Paged, pool_view
    from .dispatch.plan import Plan

    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [batch, heads_q, seqlen_q, head_dim], got shape {tuple(q.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [num_pages, page_size, heads_kv, head_dim], "
                             f"got shape {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape [num_pages, page_size, Hkv, D], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    batch, heads_q, seqlen_q, head_dim = q.shape
    num_pages, page_size, heads_kv, _ = k_cache.shape
    if k_cache.shape[-1] != head_dim:
        raise ValueError(f"k_cache/v_cache head_dim {k_cache.shape[-1]} does not match q head_dim {head_dim}")
    if head_dim < 1 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    if page_size < 1:
        raise ValueError(f"k_cache must have page_size >= 1 (its dimension 1), got {page_size}")
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(f"q heads ({heads_q}) must be a multiple of k_cache heads ({heads_kv}) (GQA/MQA)")
    if pattern is None:
        pattern = Full()
    elif not isinstance(pattern, (Full, SlidingWindow, TopK)):
        raise TypeError(f"pattern must be Full, SlidingWindow, TopK or None for a paged cache, "
                        f"got {type(pattern).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError("return_lse must be a bool")
    paged = Paged(pattern, block_table, cache_seqlens, page_size, seqlen_q)
    paged.validate(q, k_cache)
    head_mask = check_head_mask(head_mask, q)
    gate, keep = (head_mask, None) if head_mask is not None and head_mask.is_floating_point() else (None, head_mask)
    scale, softcap, alibi_slopes = check_scalars(q, scale, softcap, alibi_slopes)
    q, k_cache, v_cache = q.detach(), k_cache.detach(), v_cache.detach()
    if q.stride(-1) != 1 and head_dim != 1:
        q = q.contiguous()
    k4, v4 = pool_view(k_cache, "k_cache"), pool_view(v_cache, "v_cache")
    if batch == 0 or seqlen_q == 0 or heads_q == 0:
        out = q.new_zeros(q.shape)
        lse = torch.full(q.shape[:3], float("-inf"), device=q.device, dtype=torch.float32)
        return (out, lse) if return_lse else out

    with torch.no_grad():
        chosen = backends.select(dispatch._request(q, paged, False, True, False, head_mask=keep is not None),
                                 backend)
        tiles = chosen.paged_tiles and not isinstance(pattern, TopK)
        if alibi_slopes is not None and not (tiles or (chosen.differentiable and not isinstance(pattern, TopK))):
            raise ValueError(f"alibi_slopes on a paged cache needs logical key positions: the tile plan (Full or "
                             f"SlidingWindow on the cpu backend) or the reference; backend {chosen.name!r} with "
                             f"{type(pattern).__name__} runs gather rows over physical slots")
        if tiles:
            # The tile engine: q as it is, the pool as [B, Hkv, slots, D] (batch stride 0), the
            # block table in the plan's schedule.
            tiled = Paged(pattern, block_table, cache_seqlens, page_size, seqlen_q, tiles=True)
            pool_k, pool_v = (t.expand(batch, -1, -1, -1) for t in (k4, v4))
            out, lse = dispatch.run(q, pool_k, pool_v, tiled, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes,
                                    backend=chosen.name, head_mask=keep)
        elif chosen.differentiable:  # the reference: each sequence on its keys gathered contiguously
            paged.check_values(num_pages=num_pages)
            dispatch._last.name = chosen.name
            outs, lses = [], []
            for b, slots, inner in paged.sequences():
                keys = k4.index_select(2, slots)
                values = v4.index_select(2, slots)
                slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b:b + 1]
                rows = None if keep is None else row_keep(inner, keep.expand(batch, heads_q)[b:b + 1], q[b:b + 1].shape)
                o, l = chosen.forward(Plan(chosen, "dense", pattern=inner, row_keep=rows), q[b:b + 1], keys, values,
                                      scale, softcap, slopes)
                outs.append(o)
                lses.append(l)
            out, lse = torch.cat(outs, 0).to(q.dtype), torch.cat(lses, 0)
        else:
            q4 = q.permute(1, 0, 2, 3).reshape(1, heads_q, batch * seqlen_q, head_dim)  # a copy unless B == 1
            out4, lse4 = dispatch.run(q4, k4, v4, paged, scale=scale, softcap=softcap, alibi_slopes=None,
                                      backend=chosen.name, head_mask=keep)
            out = out4[0].view(heads_q, batch, seqlen_q, head_dim).permute(1, 0, 2, 3)
            lse = lse4[0].view(heads_q, batch, seqlen_q).permute(1, 0, 2)
    if gate is not None:
        out = _gate(out, gate, batch)
    return (out, lse) if return_lse else out
