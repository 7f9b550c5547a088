"""Functional drop-ins: ``scaled_dot_product_attention`` with PyTorch's signature, and the router
that the modules (``MultiheadAttention``, the transformers integration) share.

Every face lowers its masks with :func:`flashlite.core.masks.lower` (the one mask front: bool /
float masks, key padding, ``is_causal``, a pattern -> a pattern plus whatever is left dense) and
hands the result to :func:`serve`:

* **kernel path** - nothing left dense: the pattern (full, causal, sliding window, block-sparse,
  top-k; key padding has become top-k indices) goes to :func:`flashlite.attention`;
* **slow path** (documented): a dense mask or bias that has no pattern form, ``dropout_p > 0``, a
  request for the attention weights, value head_dim != key head_dim or a dtype flashlite does not
  take runs :func:`dense_attention` - the oracle, ``flashlite.reference.attention`` with its
  ``mask=`` / ``attn_bias=`` arguments, in float32 (float64 inputs in float64), O(Nq·Nk) memory.

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
from ..core.masks import (Lowered, causal_variant, is_top_left_causal, lower, padded_pattern,  # noqa: F401
                          top_left_causal)
from ..core.patterns import Pattern

# PyTorch's own function, captured before anyone monkey-patches ours in its place; used only for
# inputs flashlite does not take (e.g. float64, broadcast batch dims).
_torch_sdpa = F.scaled_dot_product_attention

_FLASHLITE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def needs_slow_path(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, need_weights: bool = False) -> bool:
    """True if the call runs on the slow path whatever its masks: attention weights, dropout, a
    value head_dim other than the key head_dim, or a dtype the kernels do not take."""
    return (need_weights or dropout_p > 0.0 or k.shape[-1] != v.shape[-1]
            or q.dtype not in _FLASHLITE_DTYPES)


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
          backend: Optional[str] = None, return_lse: bool = False):
    """Run a lowered call (:func:`flashlite.core.masks.lower`): the kernels when nothing is left
    dense, else the slow path. Returns ``(out, weights)`` (``weights`` None unless
    ``need_weights``), or ``(out, lse)`` with ``return_lse`` (kernel path only)."""
    pattern, keep, bias, keys = lowered
    if keys < k.shape[2]:
        k, v = k[:, :, :keys], v[:, :, :keys]
    if not lowered.dense and not needs_slow_path(q, k, v, dropout_p, need_weights):
        result = _attention(q, k, v, pattern, scale=scale, softcap=softcap, backend=backend, return_lse=return_lse)
        return result if return_lse else (result, None)
    if return_lse:
        raise ValueError("return_lse is not available with dense masks, dropout or need_weights")
    return dense_attention(q, k, v, pattern, keep=keep, bias=bias, scale=scale, softcap=softcap,
                           dropout_p=dropout_p, need_weights=need_weights)


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
    (``[B|1, 1, 1, S]``, as top-k indices). Other masks, ``dropout_p > 0`` and ``Ev != E`` run the
    slow path (the reference with the explicit mask); dtypes flashlite does not take (e.g.
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


__all__ = ["scaled_dot_product_attention", "attend", "serve", "dense_attention", "needs_slow_path",
           "top_left_causal", "causal_variant", "padded_pattern", "is_top_left_causal"]
