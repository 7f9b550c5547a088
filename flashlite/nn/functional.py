"""Functional drop-ins: ``scaled_dot_product_attention`` with PyTorch's signature, and the router
that the modules (``MultiheadAttention``, the transformers integration) share.

How a call is served (``attend``):

* **kernel path** - the pattern alone (full, causal, sliding window, block-sparse, top-k) goes to
  :func:`flashlite.attention` and its backends; no dense mask is built.
* **key padding** (a bool ``[B, Nk]`` keep-mask on top of a band pattern) becomes top-k indices:
  the list of kept keys, shared by every query (full/causal), or per query inside the window
  (sliding window). Work stays O(Nq·K), and no ``[Nq, Nk]`` mask exists.
* **slow path** (documented): an arbitrary dense mask (bool or float), ``dropout_p > 0`` or a
  request for the attention weights runs plain PyTorch with the explicit mask - the reference's
  math in float32 (``flashlite.reference``), O(Nq·Nk) memory.

Alignment. flashlite patterns align queries to the *end* of the keys (bottom-right,
``p(i) = i + Nk - Nq``). PyTorch's ``is_causal`` aligns them to the *start* (top-left: query i
sees keys ``j <= i``). :func:`top_left_causal` maps one to the other exactly:

* ``Nq <= Nk``: keys after index ``Nq - 1`` are never visible, so top-left causal over
  ``Nk`` keys is bottom-right causal over the first ``Nq`` keys (the keys are sliced);
* ``Nq > Nk``: ``j <= i = p(i) + (Nq - Nk)`` is the band ``SlidingWindow(left=Nk, right=Nq - Nk)``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..api import attention as _attention
from ..core.patterns import BlockSparse, Full, Pattern, SlidingWindow, TopK

# PyTorch's own function, captured before anyone monkey-patches ours in its place; used only for
# inputs flashlite does not take (e.g. float64, value head_dim != key head_dim).
_torch_sdpa = F.scaled_dot_product_attention

_FULL = Full(causal=False)
_CAUSAL = Full(causal=True)
_SHIFTED: Dict[Tuple[int, int], SlidingWindow] = {}
_FLASHLITE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------
# Pattern helpers
# ---------------------------------------------------------------------------------------------
def top_left_causal(seqlen_q: int, seqlen_k: int) -> Tuple[Pattern, int]:
    """PyTorch's top-left causal mask (query i sees keys ``j <= i``) as a flashlite pattern.

    Returns ``(pattern, keys)``: attend over the first ``keys`` keys with ``pattern``
    (bottom-right aligned). Patterns are shared objects, so their schedules are cached.
    """
    if seqlen_q <= seqlen_k:
        return _CAUSAL, seqlen_q
    key = (seqlen_q, seqlen_k)
    pattern = _SHIFTED.get(key)
    if pattern is None:
        if len(_SHIFTED) > 256:
            _SHIFTED.clear()
        pattern = _SHIFTED[key] = SlidingWindow(seqlen_k, seqlen_q - seqlen_k)
    return pattern, seqlen_k


def causal_variant(pattern: Optional[Pattern]) -> Optional[Pattern]:
    """``pattern`` intersected with the (bottom-right) causal mask, or None if it has no such form."""
    if pattern is None or (isinstance(pattern, Full) and not pattern.causal):
        return _CAUSAL
    if isinstance(pattern, Full):
        return pattern
    if isinstance(pattern, SlidingWindow):
        return pattern if pattern.right == 0 else SlidingWindow(pattern.left, 0)
    if isinstance(pattern, BlockSparse):
        return pattern if pattern.causal else BlockSparse(pattern.layout, pattern.block_size, causal=True)
    if isinstance(pattern, TopK):
        return pattern if pattern.causal else TopK(pattern.indices, causal=True)
    return None


def _shared_key_indices(key_keep: Tensor) -> Tensor:
    """Bool ``[B, Nk]`` -> int32 ``[B, 1, K]``: each row's kept key positions, ascending, ``-1`` padded."""
    seqlen_k = key_keep.shape[-1]
    width = max(int(key_keep.sum(-1).max()), 1)
    positions = torch.arange(seqlen_k, device=key_keep.device, dtype=torch.int32)
    # Kept keys keep their position, the rest sort to the end as Nk; then take the first K.
    keyed = torch.where(key_keep, positions, torch.full_like(positions, seqlen_k))
    ordered = keyed.sort(dim=-1).values[:, :width]
    ordered = torch.where(ordered >= seqlen_k, torch.full_like(ordered, -1), ordered)
    return ordered.unsqueeze(1).contiguous()


def _window_key_indices(key_keep: Tensor, seqlen_q: int, left: int, right: int) -> Tensor:
    """Bool ``[B, Nk]`` and a band -> int32 ``[B, 1, Nq, W]``: for query i the keys
    ``p(i) - left .. p(i) + right`` that exist and are kept, ``-1`` elsewhere."""
    batch, seqlen_k = key_keep.shape
    device = key_keep.device
    width = min(left + right + 1, seqlen_k)
    pos = torch.arange(seqlen_q, device=device) + (seqlen_k - seqlen_q)  # p(i)
    first = (pos - left).clamp(min=0)
    last = (pos + right).clamp(max=seqlen_k - 1)
    idx = first[:, None] + torch.arange(width, device=device)[None, :]  # [Nq, W]
    inside = idx <= last[:, None]
    idx = idx.clamp(max=seqlen_k - 1)
    kept = key_keep[:, idx] & inside  # [B, Nq, W]
    out = torch.where(kept, idx.to(torch.int32).expand(batch, -1, -1), torch.full_like(kept, -1, dtype=torch.int32))
    return out.unsqueeze(1).contiguous()


def padded_pattern(pattern: Pattern, key_keep: Tensor, seqlen_q: int) -> Optional[Pattern]:
    """``pattern`` restricted to the keys ``key_keep [B, Nk]`` marks, as a TopK pattern
    (None where that has no index form: block-sparse)."""
    if isinstance(pattern, Full):
        return TopK(_shared_key_indices(key_keep), causal=pattern.causal)
    if isinstance(pattern, SlidingWindow):
        return TopK(_window_key_indices(key_keep, seqlen_q, pattern.left, pattern.right), causal=False)
    if isinstance(pattern, TopK):
        rows = pattern.indices.long()
        batch = key_keep.shape[0]
        gathered = torch.gather(key_keep.view(batch, 1, -1).expand(-1, rows.shape[1], -1), -1,
                                rows.clamp(min=0).flatten(2)).view(rows.shape)
        return TopK(torch.where(gathered, pattern.indices, torch.full_like(pattern.indices, -1)),
                    causal=pattern.causal)
    return None


# ---------------------------------------------------------------------------------------------
# The slow path: explicit masks, dropout, attention weights
# ---------------------------------------------------------------------------------------------
def dense_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: Optional[Pattern] = None, *, keep: Optional[Tensor] = None,
    bias: Optional[Tensor] = None, scale: Optional[float] = None, softcap: Optional[float] = None,
    dropout_p: float = 0.0, need_weights: bool = False,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Plain-PyTorch attention with an explicit mask (the reference's math, in float32; float64 inputs
    in float64).

    ``keep``: bool, True where a query may attend a key, broadcastable to ``[B, Hq, Nq, Nk]``;
    ``bias``: float, added to the scores. ``v`` may have its own head_dim. Rows with no visible
    key give zeros. ``dropout_p`` drops attention probabilities (always, like
    ``F.scaled_dot_product_attention``). Returns ``(out, weights)``; weights ``[B, Hq, Nq, Nk]``
    in q's dtype when ``need_weights``.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    if dropout_p == 0.0 and not need_weights and k.shape[-1] == v.shape[-1]:
        return reference.attention(q, k, v, pattern, scale=scale, softcap=softcap, mask=keep, attn_bias=bias,
                                   compute_dtype=compute), None
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    if heads_q != heads_kv:
        kc = kc.repeat_interleave(heads_q // heads_kv, dim=1)
        vc = vc.repeat_interleave(heads_q // heads_kv, dim=1)
    # s = q·kᵀ·scale (softcapped) + bias; masked entries -inf; p = softmax(s) with empty rows -> 0.
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.to(compute)
    visible = None
    if pattern is not None:
        visible = pattern.dense_mask(batch, heads_q, heads_kv, seqlen_q, seqlen_k, q.device)
    if keep is not None:
        visible = keep if visible is None else visible & keep
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    probs, _, _ = reference.safe_softmax(scores)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, vc).to(q.dtype)
    return out, (probs.to(q.dtype) if need_weights else None)


# ---------------------------------------------------------------------------------------------
# The router
# ---------------------------------------------------------------------------------------------
def attend(
    q: Tensor, k: Tensor, v: Tensor, pattern: Optional[Pattern] = None, *, key_keep: Optional[Tensor] = None,
    keep: Optional[Tensor] = None, bias: Optional[Tensor] = None, scale: Optional[float] = None,
    softcap: Optional[float] = None, dropout_p: float = 0.0, need_weights: bool = False,
    backend: Optional[str] = None, return_lse: bool = False,
):
    """Attention over ``pattern`` (bottom-right aligned) with optional extra masking.

    ``q [B, Hq, Nq, D]``, ``k/v [B, Hkv, Nk, D]``. ``key_keep``: bool ``[B, Nk]`` (True = a real
    key, False = padding). ``keep``/``bias``: a dense bool keep-mask / float additive mask,
    broadcastable to ``[B, Hq, Nq, Nk]`` (these, dropout and ``need_weights`` take the slow path).
    Returns ``(out, weights)`` (``weights`` None unless ``need_weights``), or ``(out, lse)`` with
    ``return_lse`` (kernel and padding paths only).
    """
    pattern = _FULL if pattern is None else pattern
    dense = (need_weights or dropout_p > 0.0 or keep is not None or bias is not None
             or k.shape[-1] != v.shape[-1] or q.dtype not in _FLASHLITE_DTYPES)
    if not dense and key_keep is not None and not bool(key_keep.all()):
        restricted = padded_pattern(pattern, key_keep, q.shape[2])
        if restricted is None:
            dense = True
        else:
            pattern, key_keep = restricted, None
    if dense:
        if return_lse:
            raise ValueError("return_lse is not available with dense masks, dropout or need_weights")
        if key_keep is not None:
            keep_keys = key_keep[:, None, None, :]
            keep = keep_keys if keep is None else keep & keep_keys
        return dense_attention(q, k, v, pattern, keep=keep, bias=bias, scale=scale, softcap=softcap,
                               dropout_p=dropout_p, need_weights=need_weights)
    result = _attention(q, k, v, pattern, scale=scale, softcap=softcap, backend=backend, return_lse=return_lse)
    return result if return_lse else (result, None)


# ---------------------------------------------------------------------------------------------
# scaled_dot_product_attention
# ---------------------------------------------------------------------------------------------
def _split_mask(attn_mask: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """SDPA's ``attn_mask`` -> (bool keep-mask, float bias); a float mask of only 0 / -inf is a keep-mask."""
    if attn_mask is None:
        return None, None
    if attn_mask.dtype == torch.bool:
        return attn_mask, None
    if not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be a bool or float tensor, got {attn_mask.dtype}")
    is_zero = attn_mask == 0
    if bool((is_zero | torch.isneginf(attn_mask)).all()):
        return is_zero, None
    return None, attn_mask


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

    Masks other than ``is_causal``, ``dropout_p > 0``, ``Ev != E`` and dtypes flashlite does not
    take (e.g. float64) run the slow path (plain PyTorch, explicit mask). Monkey-patch with
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
    seqlen_q, seqlen_k = query.shape[-2], key.shape[-2]
    q = query.reshape(-1, *query.shape[-3:])
    k = key.reshape(-1, *key.shape[-3:])
    v = value.reshape(-1, *value.shape[-3:])
    keep, bias = _split_mask(attn_mask)
    if keep is not None:
        keep = keep.reshape(-1, *keep.shape[-3:]) if keep.dim() > 4 else keep
    if bias is not None:
        bias = bias.reshape(-1, *bias.shape[-3:]) if bias.dim() > 4 else bias
    pattern: Pattern = _FULL
    if is_causal:
        pattern, keys = top_left_causal(seqlen_q, seqlen_k)
        if keys < seqlen_k:
            k, v = k[:, :, :keys], v[:, :, :keys]
    if scale is not None:
        scale = float(scale)
    out, _ = attend(q, k, v, pattern, keep=keep, bias=bias, scale=scale, dropout_p=float(dropout_p))
    return out.reshape(*lead, *out.shape[-3:])


def is_top_left_causal(mask: Tensor, seqlen_q: int, seqlen_k: int, masked_value) -> bool:
    """True if ``mask`` (2-D ``[Nq, Nk]``, or with leading 1s) is exactly the top-left causal mask,
    where ``masked_value`` marks a hidden entry (True for torch MHA's bool masks, -inf for float)."""
    if mask.shape[-2:] != (seqlen_q, seqlen_k) or any(s != 1 for s in mask.shape[:-2]):
        return False
    mask = mask.reshape(seqlen_q, seqlen_k)
    hidden = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, hidden if masked_value is True else ~hidden))
    if not mask.is_floating_point():
        return False
    return bool(torch.equal(torch.isneginf(mask), hidden) and bool((mask[~hidden] == 0).all()))


__all__ = ["scaled_dot_product_attention", "attend", "dense_attention", "top_left_causal", "causal_variant",
           "padded_pattern", "is_top_left_causal"]
