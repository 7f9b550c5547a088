"""flash-attn 2's functions with flash-attn 2's signatures, running on flashlite.

Switch code written for flash-attn with one line::

    from flashlite.compat.flash_attn import flash_attn_func, flash_attn_varlen_func
    # or, without touching the code: flashlite.compat.install(), then `import flash_attn` as before

Every function takes flash-attn's arguments in flash-attn's order with flash-attn's defaults,
in flash-attn's layout (``[B, S, H, D]``; varlen: ``[total, H, D]``), and means the same:

* ``causal``: bottom-right aligned, query i sees keys ``j <= i + Nk - Nq`` (flashlite's own
  convention, ``Full(causal=True)``);
* ``window_size=(left, right)``: keys ``i + Nk - Nq - left <= j <= i + Nk - Nq + right``; ``-1``
  (any negative) is unbounded; a side at least Nk long (varlen: ``max_seqlen_k``) is unbounded too,
  as flash-attn clamps it; ``causal=True`` forces ``right = 0``. ``(-1, -1)`` is ``Full``, the
  rest ``SlidingWindow``;
* ``softcap``: 0.0 (or less, as flash-attn) is off, ``> 0`` caps the scores at
  ``softcap·tanh(s / softcap)``;
* ``alibi_slopes``: float ``[H]`` or ``[B, H]`` (per sequence for varlen); bias
  ``-slope·|i + Nk - Nq - j|``, exactly flashlite's ``alibi_slopes``;
* ``deterministic``: flash-attn's default ``False`` lets a backend that has an atomic backward
  (flashlite's CUDA kernels) use it; ``True`` keeps the backward bitwise reproducible;
* ``dropout_p``: handed to ``flashlite.attention`` / ``flashlite.varlen_attention`` with no
  generator, so the mask comes from torch's default generator (``torch.manual_seed`` repeats it;
  flash-attn too draws from torch's default CUDA generator, but the masks themselves differ). A
  flashlite without attention dropout raises ``NotImplementedError`` for ``dropout_p > 0``.
  Evaluation code passes 0.0;
* ``return_attn_probs=True`` returns ``(out, softmax_lse, None)``: lse in flash-attn's layout,
  ``[B, H, Sq]`` float32 for the padded functions and ``[H, total_q]`` for varlen. The third
  item is ``None`` where flash-attn returns ``S_dmask``, its debug copy of the (dropped-out,
  unnormalized) probabilities that only its own tests read: flashlite never builds an Nq×Nk
  matrix.

Differences: ``block_table`` (paged KV) and ``flash_attn_with_kvcache`` raise
``NotImplementedError`` until ``flashlite.paged_attention`` lands (issue 16, paged KV caches);
head_dim up to 256 of any size (no padding to a multiple of 8 needed); CPU tensors work too
(flashlite picks its CPU kernels). A query that sees no key gets zeros and lse ``+inf``, as in
flash-attn (flashlite's own functions say ``-inf``; the compat layer converts).

Gradients flow to q, k, v (and through the packed views to ``qkv`` / ``kv``).
"""
from __future__ import annotations

import inspect
import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import api
from ..core.patterns import Full, Pattern, SlidingWindow

# flash-attn's module-level names that its own test-suite imports from ``flash_attn_interface``.
USE_TRITON_ROCM = False

_UNBOUNDED = 1 << 30  # a window side that reaches past any sequence
_PAGED_ISSUE = ("flashlite.paged_attention (issue 16, paged KV caches) is not built yet; "
                "pass contiguous k/v without a block table")


# ---------------------------------------------------------------------------------------------
# Argument translation
# ---------------------------------------------------------------------------------------------
def _int(value, name: str) -> int:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be an int, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def _window(window_size, name: str = "window_size") -> Tuple[int, int]:
    if isinstance(window_size, Tensor):
        if window_size.numel() != 2:
            raise ValueError(f"{name} must be a (left, right) pair, got a tensor of shape {tuple(window_size.shape)}")
        window_size = window_size.tolist()
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"{name} must be a (left, right) pair of ints (-1 = unbounded), got {window_size!r}")
    return _int(window_size[0], f"{name}[0]"), _int(window_size[1], f"{name}[1]")


def pattern_for(causal: bool, window_size, seqlen_k: Optional[int]) -> Pattern:
    """The flashlite pattern of flash-attn's ``(causal, window_size)`` for keys of length ``seqlen_k``
    (the longest sequence for varlen; None: no clamping). Follows flash-attn's ``mha_fwd``: a side
    ``>= seqlen_k`` becomes unbounded, ``causal`` forces ``right = 0``, ``(-1, 0)`` is causal."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    left, right = _window(window_size)
    if seqlen_k is not None:
        left = -1 if left >= seqlen_k else left
        right = -1 if right >= seqlen_k else right
    if causal:
        right = 0
    if left < 0 and right < 0:
        return Full(causal=False)
    if left < 0 and right == 0:
        return Full(causal=True)
    return SlidingWindow(_UNBOUNDED if left < 0 else left, _UNBOUNDED if right < 0 else right)


def _softcap(softcap) -> Optional[float]:
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or math.isnan(softcap):
        raise TypeError(f"softcap must be a float (0.0 = off), got {softcap!r}")
    return float(softcap) if softcap > 0 else None


def _dropout(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def _bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _takes_dropout(fn) -> bool:
    """Whether flashlite's ``fn`` has a ``dropout_p`` argument (``attention`` gets one with dropout)."""
    try:
        return "dropout_p" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _check_tensor(t, name: str, dims: int, layout: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")
    return t


def _check_block_table(block_table) -> None:
    if block_table is not None:
        raise NotImplementedError(f"block_table: {_PAGED_ISSUE}")


def _flash_lse(lse: Tensor) -> Tensor:
    """flashlite's lse with flash-attn's value for a query that sees no key (+inf, not -inf)."""
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


# ---------------------------------------------------------------------------------------------
# The two cores: padded [B, S, H, D] and packed [total, H, D]
# ---------------------------------------------------------------------------------------------
def _padded(q: Tensor, k: Tensor, v: Tensor, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
            deterministic, return_attn_probs, names=("q", "k", "v")):
    for t, name in zip((q, k, v), names):
        _check_tensor(t, name, 4, "[batch, seqlen, heads, head_dim]")
    dropout_p = _dropout(dropout_p)
    return_attn_probs = _bool(return_attn_probs, "return_attn_probs")
    pattern = pattern_for(causal, window_size, k.shape[1])
    kw = dict(scale=softmax_scale, softcap=_softcap(softcap), alibi_slopes=alibi_slopes,
              deterministic=_bool(deterministic, "deterministic"), return_lse=True)
    if dropout_p:
        if not _takes_dropout(api.attention):
            raise NotImplementedError(f"dropout_p={dropout_p}: this flashlite has no attention dropout; "
                                      f"pass dropout_p=0.0 (evaluation)")
        kw["dropout_p"] = dropout_p
    # [B, S, H, D] -> [B, H, S, D]: a view (the last dim stays contiguous), no copy.
    out, lse = api.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), pattern, **kw)
    out = out.transpose(1, 2)
    return (out, _flash_lse(lse), None) if return_attn_probs else out


def _varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
            softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
            names=("q", "k", "v")):
    for t, name in zip((q, k, v), names):
        _check_tensor(t, name, 3, "[total_tokens, heads, head_dim]")
    max_seqlen_q = _int(max_seqlen_q, "max_seqlen_q")
    max_seqlen_k = _int(max_seqlen_k, "max_seqlen_k")
    return_attn_probs = _bool(return_attn_probs, "return_attn_probs")
    pattern = pattern_for(causal, window_size, max_seqlen_k)
    out, lse = api.varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, pattern, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        dropout_p=_dropout(dropout_p), scale=softmax_scale, softcap=_softcap(softcap), alibi_slopes=alibi_slopes,
        deterministic=_bool(deterministic, "deterministic"), return_lse=True)
    if not return_attn_probs:
        return out
    return out, _flash_lse(lse.transpose(0, 1).contiguous()), None  # flash-attn's varlen lse: [H, total_q]


# ---------------------------------------------------------------------------------------------
# flash-attn's public functions
# ---------------------------------------------------------------------------------------------
def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # <=0.0 means deactivate
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """flash-attn's ``flash_attn_qkvpacked_func`` on flashlite.

    qkv: ``[B, S, 3, H, D]``. Returns ``out [B, S, H, D]``, or with ``return_attn_probs``
    ``(out, softmax_lse [B, H, S] float32, None)`` - ``None`` where flash-attn returns its debug
    ``S_dmask``. ``dropout_p`` as in the module docstring, and the rest.
    """
    _check_tensor(qkv, "qkv", 5, "[batch, seqlen, 3, heads, head_dim]")
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv must be [batch, seqlen, 3, heads, head_dim], got shape {tuple(qkv.shape)}")
    return _padded(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size, softcap,
                   alibi_slopes, deterministic, return_attn_probs,
                   names=("qkv[:, :, 0]", "qkv[:, :, 1]", "qkv[:, :, 2]"))


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """flash-attn's ``flash_attn_kvpacked_func`` on flashlite.

    q: ``[B, Sq, H, D]``; kv: ``[B, Sk, 2, Hk, D]`` (``H % Hk == 0``: GQA/MQA). Returns
    ``out [B, Sq, H, D]``, or ``(out, softmax_lse [B, H, Sq], None)`` with ``return_attn_probs``
    (``None``: flash-attn's debug ``S_dmask`` is not built). ``dropout_p`` as in the module docstring.
    """
    _check_tensor(kv, "kv", 5, "[batch, seqlen_k, 2, heads_k, head_dim]")
    if kv.shape[2] != 2:
        raise ValueError(f"kv must be [batch, seqlen_k, 2, heads_k, head_dim], got shape {tuple(kv.shape)}")
    return _padded(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                   deterministic, return_attn_probs, names=("q", "kv[:, :, 0]", "kv[:, :, 1]"))


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """flash-attn's ``flash_attn_func`` on flashlite.

    q: ``[B, Sq, H, D]``; k, v: ``[B, Sk, Hk, D]`` (``H % Hk == 0``: GQA/MQA), any strides with a
    contiguous last dim (no copy is made). ``causal`` is bottom-right aligned; ``window_size``,
    ``softcap`` (0.0 = off), ``alibi_slopes`` (``[H]`` or ``[B, H]``), ``deterministic`` as in
    flash-attn. Returns ``out [B, Sq, H, D]``, or ``(out, softmax_lse [B, H, Sq] float32, None)``
    with ``return_attn_probs`` - ``None`` where flash-attn returns its debug ``S_dmask``.
    ``dropout_p`` is passed to ``flashlite.attention`` (torch's default generator draws the
    mask; where flashlite has no dropout, ``dropout_p > 0`` raises ``NotImplementedError``).
    """
    return _padded(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs)


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """flash-attn's ``flash_attn_varlen_qkvpacked_func`` on flashlite (``flashlite.varlen_attention``).

    qkv: ``[total, 3, H, D]``; cu_seqlens: int32 ``[B + 1]``; max_seqlen: int. Returns
    ``out [total, H, D]``, or ``(out, softmax_lse [H, total] float32, None)`` with
    ``return_attn_probs`` (``None``: no debug ``S_dmask``). ``dropout_p`` as in the module docstring.
    """
    _check_tensor(qkv, "qkv", 4, "[total_tokens, 3, heads, head_dim]")
    if qkv.shape[1] != 3:
        raise ValueError(f"qkv must be [total_tokens, 3, heads, head_dim], got shape {tuple(qkv.shape)}")
    return _varlen(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                   names=("qkv[:, 0]", "qkv[:, 1]", "qkv[:, 2]"))


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """flash-attn's ``flash_attn_varlen_kvpacked_func`` on flashlite.

    q: ``[total_q, H, D]``; kv: ``[total_k, 2, Hk, D]``; cu_seqlens_q/k: int32 ``[B + 1]``.
    Returns ``out [total_q, H, D]``, or ``(out, softmax_lse [H, total_q], None)`` with
    ``return_attn_probs``. ``dropout_p`` as in the module docstring.
    """
    _check_tensor(kv, "kv", 4, "[total_tokens, 2, heads_k, head_dim]")
    if kv.shape[1] != 2:
        raise ValueError(f"kv must be [total_tokens, 2, heads_k, head_dim], got shape {tuple(kv.shape)}")
    return _varlen(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                   names=("q", "kv[:, 0]", "kv[:, 1]"))


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """flash-attn's ``flash_attn_varlen_func`` on flashlite (``flashlite.varlen_attention``).

    q: ``[total_q, H, D]``; k, v: ``[total_k, Hk, D]``; cu_seqlens_q/k: int32 ``[B + 1]``;
    max_seqlen_q/k: ints (a window side ``>= max_seqlen_k`` is unbounded, as in flash-attn).
    Causal and windows are bottom-right aligned inside each sequence; ``alibi_slopes`` ``[H]`` or
    ``[B, H]``. Returns ``out [total_q, H, D]``, or ``(out, softmax_lse [H, total_q] float32,
    None)`` with ``return_attn_probs`` - ``None`` where flash-attn returns its debug ``S_dmask``.
    ``dropout_p`` is passed to ``flashlite.varlen_attention`` (torch's default generator draws
    the mask; where flashlite has no dropout, ``dropout_p > 0`` raises ``NotImplementedError``).
    ``block_table`` (paged KV) raises ``NotImplementedError`` until ``flashlite.paged_attention``
    lands.
    """
    _check_block_table(block_table)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens: Optional[Union[(int, torch.Tensor)]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """flash-attn's ``flash_attn_with_kvcache`` signature. Not built yet: it lands with
    ``flashlite.paged_attention`` (issue 16, paged KV caches) and raises ``NotImplementedError``."""
    raise NotImplementedError(f"flash_attn_with_kvcache: {_PAGED_ISSUE}. For a contiguous cache, slice the "
                              f"valid keys and call flash_attn_func (causal is bottom-right aligned)")


def _get_block_size_n(device, head_dim, is_dropout, is_causal):
    """flash-attn's key-block size for its debug ``S_dmask`` layout (imported by flash-attn's own
    tests; flashlite has no ``S_dmask``). The sm80 table, without querying the device."""
    assert head_dim <= 256
    if head_dim <= 32:
        return 128
    if head_dim <= 64:
        return 128 if not is_dropout else 64
    if head_dim <= 96:
        return 64
    if head_dim <= 128:
        return 64 if not is_dropout else 32
    return 64


__all__ = [
    "flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache", "pattern_for",
]
