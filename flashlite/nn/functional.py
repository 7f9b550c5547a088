"""Functional drop-ins: ``scaled_dot_product_attention`` and ``varlen_attn`` with PyTorch's
signatures, and the router that the modules (``MultiheadAttention``, the transformers integration)
share.

Every face lowers its masks with :func:`flashlite.core.masks.lower` (the one mask front: bool /
float masks, key padding, ``is_causal``, a pattern -> a pattern plus whatever is left dense) and
hands the result to :func:`serve`:

* **kernel path** - nothing left dense: the pattern (full, causal, sliding window, block-sparse,
  top-k; key padding has become top-k indices) goes to :func:`flashlite.attention`, with
  ``dropout_p`` (flashlite's counter-based attention dropout, in the kernels of the backends that
  have it - the cpu backend's C++ kernels - else on the reference backend);
* **slow path** (documented): a dense mask or bias that has no pattern form, a request for the
  attention weights, ``dropout_p >= 1``, value head_dim != key head_dim, a dtype flashlite does not
  take, or dropout with a ``backend=`` whose kernels have none runs :func:`dense_attention` - the
  oracle, ``flashlite.reference.attention`` with its ``mask=`` / ``attn_bias=`` arguments, in
  float32 (float64 inputs in float64), O(Nq·Nk) memory (its dropout draws from ``torch.rand``).

Alignment. flashlite patterns align queries to the *end* of the keys (bottom-right,
``p(i) = i + Nk - Nq``). PyTorch's ``is_causal`` aligns them to the *start* (top-left: query i
sees keys ``j <= i``); the mask front maps one to the other exactly (:func:`top_left_causal`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..api import attention as _attention
from ..api import varlen_attention as _varlen_attention
from ..core.masks import (Lowered, causal_variant, is_top_left_causal, lower, padded_pattern,  # noqa: F401
                          top_left_causal)
from ..core.patterns import Pattern
from ..heads import _hook as _heads

# PyTorch's own function, captured before anyone monkey-patches ours in its place; used only for
# inputs flashlite does not take (e.g. float64, broadcast batch dims).
_torch_sdpa = F.scaled_dot_product_attention

_FLASHLITE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def needs_slow_path(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, need_weights: bool = False) -> bool:
    """True if the call runs on the slow path whatever its masks: attention weights, dropout_p >= 1
    (everything dropped; flashlite.attention takes p in [0, 1)), a value head_dim other than the
    key head_dim, or a dtype the kernels do not take. Dropout below 1 stays on the kernels."""
    return (need_weights or dropout_p >= 1.0 or k.shape[-1] != v.shape[-1]
            or q.dtype not in _FLASHLITE_DTYPES)


def _backend_drops(backend: Optional[str], dropout_p: float) -> bool:
    """False only for dropout with a forced ``backend`` whose kernels have no dropout (the call
    then takes the slow path rather than failing)."""
    if dropout_p == 0.0 or backend is None:
        return True
    from ..backend import get as _get_backend
    try:
        return bool(_get_backend(backend).dropout)
    except ValueError:  # unknown / unavailable: flashlite.attention says why
        return True


# ---------------------------------------------------------------------------------------------
# The slow path: the reference with an explicit mask (plus dropout and attention weights)
# ---------------------------------------------------------------------------------------------
def _probabilities(q: Tensor, k: Tensor, pattern: Optional[Pattern], compute: torch.dtype, **masks) -> Tensor:
    """The reference's softmax probabilities ``[B, Hq, Nq, Nk]`` in ``compute`` (the reference run
    on an identity value matrix: its output rows are the probability rows)."""
    batch, heads_kv, seqlen_k = k.shape[0], k.shape[1], k.shape[2]
    eye = torch.eye(seqlen_k, dtype=compute, device=k.device).expand(batch, heads_kv, seqlen_k, seqlen_k)
    return reference.attention(q.to(compute), k.to(compute), eye, pattern, compute_dtype=compute, **masks)


def _dropped_keys(shape, dropout_p: float, device) -> Tensor:
    """Bool keep-mask of the dropout draw: each entry kept with probability ``1 - dropout_p``."""
    return torch.rand(shape, device=device) >= dropout_p


def _dropout_attention(q: Tensor, k: Tensor, v: Tensor, pattern: Optional[Pattern], keep: Optional[Tensor],
                       dropout_p: float, compute: torch.dtype, **kw) -> Tensor:
    """``sum_j m_ij·P_ij·v_j / (1 - p)`` (dropout on the probabilities) from two reference calls:
    with the dropped entries masked out the reference gives ``out_m = sum_{j kept} P_ij·v_j / S_i``
    and ``lse_m``, where ``S_i = sum_{j kept} P_ij = exp(lse_m - lse)``; so the dropped-out output is
    ``out_m·exp(lse_m - lse) / (1 - p)`` - exact, differentiable, O(Nq·Nk) memory, no weights."""
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    if dropout_p >= 1.0:
        return (qc.new_zeros(*q.shape[:-1], v.shape[-1]) + 0 * (qc.sum() + kc.sum() + vc.sum())).to(q.dtype)
    batch, heads_q, seqlen_q = q.shape[:3]
    kept = _dropped_keys((batch, heads_q, seqlen_q, k.shape[2]), dropout_p, q.device)
    mask = kept if keep is None else keep & kept
    out_m, lse_m = reference.attention(qc, kc, vc, pattern, mask=mask, return_lse=True, compute_dtype=compute, **kw)
    _, lse = reference.attention(qc, kc, vc, pattern, mask=keep, return_lse=True, compute_dtype=compute, **kw)
    share = torch.where(torch.isneginf(lse_m), torch.zeros_like(lse_m), torch.exp(lse_m - lse))
    return (out_m * (share / (1.0 - dropout_p)).unsqueeze(-1).to(compute)).to(q.dtype)


def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: Optional[Pattern] = None, *, keep: Optional[Tensor] = None,
    bias: Optional[Tensor] = None, scale: Optional[float] = None, softcap: Optional[float] = None,
    dropout_p: float = 0.0, need_weights: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """The slow path: ``flashlite.reference.attention`` with an explicit mask, in float32 (float64
    inputs in float64).

    ``keep``: bool, True where a query may attend a key, broadcastable to ``[B, Hq, Nq, Nk]``;
    ``bias``: float, added to the scores. ``v`` may have its own head_dim. Rows with no visible
    key give zeros. ``dropout_p`` drops attention probabilities (always, like
    ``F.scaled_dot_product_attention``). Returns ``(out, weights)``; weights ``[B, Hq, Nq, Nk]``
    in q's dtype when ``need_weights`` (computed as the reference's output on an identity value
    matrix: O(Nq·Nk²) work - pass ``need_weights=False`` where the weights are not needed).
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    kw = dict(scale=scale, softcap=softcap, attn_bias=bias)
    if need_weights:
        probs = _probabilities(q, k, pattern, compute, mask=keep, **kw)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p, training=True)
        vc = v.to(compute)
        if q.shape[1] != v.shape[1]:
            vc = vc.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return torch.matmul(probs, vc).to(q.dtype), probs.to(q.dtype)
    if dropout_p > 0.0:
        return _dropout_attention(q, k, v, pattern, keep, dropout_p, compute, **kw), None
    return reference.attention(q, k, v, pattern, mask=keep, compute_dtype=compute, **kw), None


# ---------------------------------------------------------------------------------------------
# The router
# ---------------------------------------------------------------------------------------------
def serve(q: Tensor, k: Tensor, v: Tensor, lowered: Lowered, *, scale: Optional[float] = None,
          softcap: Optional[float] = None, dropout_p: float = 0.0, need_weights: bool = False,
          backend: Optional[str] = None, return_lse: bool = False, layer=None, head_mask: Optional[Tensor] = None):
    """Run a lowered call (:func:`flashlite.core.masks.lower`): the kernels when nothing is left
    dense, else the slow path. Returns ``(out, weights)`` (``weights`` None unless
    ``need_weights``), or ``(out, lse)`` with ``return_lse`` (kernel path only).

    ``layer``: the module making the call, its identity for ``flashlite.heads`` (recording,
    importance gates, its ``head_mask`` buffer); ``head_mask``: a per-call head mask (as
    :func:`flashlite.attention`; on the slow path it multiplies the output)."""
    pattern, keep, bias, keys = lowered
    if keys < k.shape[2]:
        k, v = k[:, :, :keys], v[:, :, :keys]
    heads = layer is not None and _heads.engaged(layer, head_mask)
    if (not lowered.dense and not needs_slow_path(q, k, v, dropout_p, need_weights)
            and _backend_drops(backend, dropout_p)):
        if heads:
            result = _heads.attend(layer, q, k, v, pattern, head_mask=head_mask, scale=scale, softcap=softcap,
                                   backend=backend, return_lse=return_lse, dropout_p=dropout_p)
            return result if return_lse else (result, None)
        result = _attention(q, k, v, pattern, scale=scale, softcap=softcap, backend=backend, return_lse=return_lse,
                            dropout_p=dropout_p)
        return result if return_lse else (result, None)
    if return_lse:
        raise ValueError("return_lse is not available with dense masks, need_weights, dropout_p >= 1 or dropout on "
                         "a backend without it")
    out, weights = dense_attention(q, k, v, pattern, keep=keep, bias=bias, scale=scale, softcap=softcap,
                                   dropout_p=dropout_p, need_weights=need_weights)
    if heads:
        out = _heads.after_dense(layer, q, k, out, pattern, keep=keep, bias=bias, scale=scale, softcap=softcap,
                                 head_mask=head_mask)
        weights = _heads.mask_weights(layer, q, weights, head_mask)
    return out, weights


def attend(
    q: Tensor, k: Tensor, v: Tensor, pattern: Optional[Pattern] = None, *, key_keep: Optional[Tensor] = None,
    keep: Optional[Tensor] = None, bias: Optional[Tensor] = None, scale: Optional[float] = None,
    softcap: Optional[float] = None, dropout_p: float = 0.0, need_weights: bool = False,
    backend: Optional[str] = None, return_lse: bool = False,
):
    """Attention over ``pattern`` (bottom-right aligned) with optional extra masking.

    ``q [B, Hq, Nq, D]``, ``k/v [B, Hkv, Nk, D]``. ``key_keep``: bool ``[B, Nk]`` (True = a real
    key, False = padding). ``keep``/``bias``: a dense bool keep-mask / float additive mask,
    broadcastable to ``[B, Hq, Nq, Nk]``. Lowered by :func:`flashlite.core.masks.lower`, run by
    :func:`serve`. Returns ``(out, weights)`` (``weights`` None unless ``need_weights``), or
    ``(out, lse)`` with ``return_lse`` (kernel path only).
    """
    lowered = lower(q, k, pattern=pattern, attn_mask=keep, key_padding_mask=key_keep, attn_bias=bias,
                    dense=needs_slow_path(q, k, v, dropout_p, need_weights))
    return serve(q, k, v, lowered, scale=scale, softcap=softcap, dropout_p=dropout_p, need_weights=need_weights,
                 backend=backend, return_lse=return_lse)


# ---------------------------------------------------------------------------------------------
# scaled_dot_product_attention
# ---------------------------------------------------------------------------------------------
def scaled_dot_product_attention(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
    is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (same signature and meaning).

    ``query [..., Hq, L, E]``, ``key [..., Hkv, S, E]``, ``value [..., Hkv, S, Ev]``.
    ``attn_mask``: bool (True = take part) or float (added to the scores), broadcastable to
    ``[..., L, S]``. ``is_causal``: query i sees keys ``j <= i`` (PyTorch's top-left alignment;
    served by flashlite's causal / shifted-band schedules, no mask is built). ``enable_gqa``: allow
    ``Hq`` to be a multiple of ``Hkv``. A query that sees no key returns zeros (as PyTorch 2.5+).

    Masks that are patterns in disguise run on the kernels: a causal mask, a key-padding mask
    (``[B|1, 1, 1, S]``, as top-k indices), with ``dropout_p`` in flashlite's kernels. Other masks,
    ``dropout_p >= 1`` and ``Ev != E`` run the slow path (the reference with the explicit mask); dtypes
    flashlite does not take (e.g.
    float64) run PyTorch's own function. Monkey-patch with
    ``torch.nn.functional.scaled_dot_product_attention = flashlite.nn.functional.scaled_dot_product_attention``.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [..., heads, seq, head_dim], got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dims [..., seq, head_dim], got shape {tuple(t.shape)}")
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask must be None when is_causal=True (PyTorch's rule: pass one or the other)")
    if query.dim() != key.dim() or key.dim() != value.dim() or query.shape[:-3] != key.shape[:-3] \
            or key.shape[:-1] != value.shape[:-1] or query.shape[-1] != key.shape[-1] or query.dim() < 3 \
            or query.dtype not in _FLASHLITE_DTYPES:
        # Broadcast batch dims, 2-D inputs, float64 and the like: PyTorch's own kernel serves them.
        extra = {"enable_gqa": True} if enable_gqa else {}  # (torch < 2.5 has no enable_gqa)
        return _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, **extra)
    heads_q, heads_kv = query.shape[-3], key.shape[-3]
    if heads_q != heads_kv and not (enable_gqa and heads_kv > 0 and heads_q % heads_kv == 0):
        raise ValueError(f"query has {heads_q} heads and key/value {heads_kv}: they must match, or pass "
                         f"enable_gqa=True with query heads a multiple of key/value heads")
    lead = query.shape[:-3]
    q = query.reshape(-1, *query.shape[-3:])
    k = key.reshape(-1, *key.shape[-3:])
    v = value.reshape(-1, *value.shape[-3:])
    if attn_mask is not None and query.dim() > 4 and attn_mask.dim() >= 4:
        # Two or more batch dims were flattened into one: flatten the mask's the same way.
        attn_mask = attn_mask.reshape((1,) * (query.dim() - attn_mask.dim()) + tuple(attn_mask.shape))
        attn_mask = attn_mask.expand(*lead, *attn_mask.shape[-3:]).reshape(-1, *attn_mask.shape[-3:])
    dropout_p = float(dropout_p)
    lowered = lower(q, k, attn_mask=attn_mask, is_causal=bool(is_causal),
                    dense=needs_slow_path(q, k, v, dropout_p))
    out, _ = serve(q, k, v, lowered, scale=None if scale is None else float(scale), dropout_p=dropout_p)
    return out.reshape(*lead, *out.shape[-3:])


# ---------------------------------------------------------------------------------------------
# torch.nn.attention.varlen.varlen_attn
# ---------------------------------------------------------------------------------------------
def varlen_attn(
    query: Tensor, key: Tensor, value: Tensor, cu_seq_q: Tensor, cu_seq_k: Optional[Tensor], max_q: int, max_k: int,
    *, return_aux=None, scale: Optional[float] = None, window_size: Tuple[int, int] = (-1, -1),
    enable_gqa: bool = False, seqused_k: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
    num_splits: Optional[int] = None,
):
    """Twin of ``torch.nn.attention.varlen.varlen_attn`` (PyTorch 2.10+; same signature and return
    convention), on every device through :func:`flashlite.varlen_attention`.

    ``query [Tq, Hq, D]``, ``key/value [Tk, Hkv, D]`` (packed sequences); ``cu_seq_q/k`` int32
    ``[N + 1]``; ``max_q/max_k`` the longest sequence. ``window_size=(left, right)`` as in
    flash-attn, bottom-right aligned inside each sequence: ``(-1, -1)`` full, ``(-1, 0)`` causal,
    ``(W, 0)`` causal sliding window; a side ``>= max_k`` is unbounded. ``enable_gqa``: allow
    ``Hq`` a multiple of ``Hkv`` (else the head counts must match, as in PyTorch).
    ``return_aux``: an ``AuxRequest`` (``torch.nn.attention.varlen.AuxRequest`` or any object with
    an ``lse`` attribute); with ``lse=True`` returns ``(out, lse)``, lse float32 ``[Hq, Tq]`` - the
    layout PyTorch's op returns (its fake kernel and flash's varlen kernel; PyTorch's docstring
    says ``(Tq, Hq)``). ``num_splits`` is a CUDA split-KV tuning knob: accepted and ignored
    (flashlite's result for a sequence does not depend on the rest of the batch). ``seqused_k`` and
    ``block_table`` (paged KV caches) raise ``NotImplementedError`` until
    ``flashlite.paged_attention`` lands (issue 16, paged KV caches). No dropout (PyTorch's has none).
    Differentiable in query, key, value.
    """
    if seqused_k is not None or block_table is not None:
        name = "seqused_k" if seqused_k is not None else "block_table"
        raise NotImplementedError(f"{name}: paged / partially used KV caches come with flashlite.paged_attention "
                                  f"(issue 16, paged KV caches), not built yet")
    if cu_seq_k is None:
        raise ValueError("cu_seq_k may be None only with block_table (paged KV caches), which is not supported yet")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)):
        raise TypeError(f"num_splits must be an int or None, got {num_splits!r}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 3-D tensor [total_tokens, heads, head_dim], got {shape}")
    heads_q, heads_k = query.size(1), key.size(1)
    if not enable_gqa and heads_q != heads_k:
        raise ValueError(f"Expect query and key/value to have the same number of heads but got Hq={heads_q} and "
                         f"Hkv={heads_k}. Try setting enable_gqa=True for GQA.")
    if enable_gqa and (heads_k == 0 or heads_q % heads_k):
        raise ValueError(f"Expect number of query heads to be a multiple of kv heads for GQA but got Hq={heads_q} "
                         f"and Hkv={heads_k}.")
    from ..compat.flash_attn import _int, pattern_for  # flash-attn's window semantics, shared

    max_q, max_k = _int(max_q, "max_q"), _int(max_k, "max_k")
    pattern = pattern_for(False, window_size, max_k)
    want_lse = return_aux is not None and bool(getattr(return_aux, "lse", False))
    result = _varlen_attention(query, key, value, cu_seq_q, cu_seq_k, pattern, max_seqlen_q=max_q,
                               max_seqlen_k=max_k, scale=None if scale is None else float(scale), return_lse=want_lse)
    if want_lse:
        out, lse = result
        return out, lse.transpose(0, 1).contiguous()
    return result


__all__ = ["scaled_dot_product_attention", "attend", "serve", "dense_attention", "needs_slow_path",
           "top_left_causal", "causal_variant", "padded_pattern", "is_top_left_causal", "varlen_attn"]
