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

``flash_attn_with_kvcache`` (contiguous and paged caches, in-place append, rotary, leftpad,
cache_batch_idx) runs on ``flashlite.paged_attention`` / ``flashlite.attention``; see its docstring.

Differences: ``block_table`` in ``flash_attn_varlen_func`` (varlen queries over a paged cache)
raises ``NotImplementedError`` until flashlite's varlen attention reads pages; a paged cache with
ALiBi in ``flash_attn_with_kvcache`` too (``flashlite.paged_attention`` has no ALiBi yet);
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


class CacheCapacityError(ValueError, RuntimeError):
    """``flash_attn_with_kvcache``: ``cache_seqlens`` (+ the new keys) beyond the cache's capacity.
    A ValueError, as flashlite's argument errors are, and a RuntimeError, as flash-attn's
    ``TORCH_CHECK`` raises it, so code written for either catches it."""
_PAGED_ISSUE = ("varlen attention over a paged KV cache is not built yet (flashlite.varlen_attention reads "
                "packed k/v); pass packed k/v without a block table, or padded queries to "
                "flash_attn_with_kvcache(block_table=...)")


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
    ``block_table`` (varlen queries over a paged cache) raises ``NotImplementedError``: not built
    yet (``flash_attn_with_kvcache`` takes a block table for padded queries).
    """
    _check_block_table(block_table)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                   window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def _int32_vector(t, name: str, batch: int, device) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor [batch={batch}], got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must have shape [batch={batch}], got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    return t


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool) -> Tensor:
    """flash-attn's rotary embedding of ``x [B, S, H, D]`` at ``positions`` (int64 ``[B, S]``), a new
    tensor: the first ``rotary_dim = 2·cos.shape[1]`` features rotate, the rest pass through.
    Interleaved pairs features (0, 1), (2, 3), ...; otherwise (GPT-NeoX) i with i + rotary_dim / 2.
    Computed in float32 and rounded once to x's dtype, as flash-attn's kernels do."""
    half = cos.shape[1]
    c = cos[positions].to(torch.float32).unsqueeze(2)  # [B, S, 1, rd/2]
    s = sin[positions].to(torch.float32).unsqueeze(2)
    rot = x[..., :2 * half].to(torch.float32)
    x1, x2 = (rot[..., 0::2], rot[..., 1::2]) if interleaved else (rot[..., :half], rot[..., half:])
    o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
    rot = torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., 2 * half:]), dim=-1)


def _pool_of_rows(cache: Tensor, page: int) -> Optional[Tensor]:
    """A contiguous cache ``[B_cache, S_cache, Hk, D]`` as a page pool ``[B_cache·S_cache / page, page,
    Hk, D]``: a view, or None where the strides do not allow one."""
    rows, length, heads, dim = cache.shape
    try:
        pool = cache.view(rows * length // page, page, heads, dim)
        pool.view(1, rows * length, heads, dim)  # what paged_attention's pool_view needs
    except RuntimeError:
        return None
    return pool


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
    """flash-attn's ``flash_attn_with_kvcache`` on flashlite (forward only, as flash-attn's).

    Args (flash-attn's):
        q: ``[B, Sq, H, D]``: each sequence's newest Sq queries.
        k_cache, v_cache: contiguous ``[B_cache, S_cache, Hk, D]``, or with ``block_table`` a page
            pool ``[num_blocks, page_block_size, Hk, D]`` (``H % Hk == 0``), q's dtype, contiguous
            last dimension. flash-attn's kernels need ``page_block_size % 256 == 0``; flashlite
            takes any page size (16 is the usual serving one).
        k, v: optional new keys/values ``[B, Sk_new, Hk, D]``, written **in place** into the cache
            at positions ``cache_seqlens[b] .. cache_seqlens[b] + Sk_new - 1`` (through the block
            table when paged) before attending; every other cache entry is left untouched.
            ``cache_seqlens`` is then required.
        rotary_cos, rotary_sin: optional ``[S_ro, rotary_dim / 2]`` (with k/v only). The new k is
            rotated at positions ``cache_seqlens[b] + j`` before it is written; q is rotated at
            ``cache_seqlens[b] + i`` when the attention is causal or local (a window side left
            bounded after flash-attn's clamping), else every query at ``cache_seqlens[b]``.
            ``rotary_interleaved``: pairs (0, 1), (2, 3), ... (True) or i and i + rotary_dim / 2
            (False, GPT-NeoX). Any even ``rotary_dim <= D`` (flash-attn: a multiple of 16);
            positions must lie below ``S_ro``.
        cache_seqlens: int or int32 ``[B]``: keys already in each cache row (None: the whole
            capacity, ``S_cache`` or ``max_blocks·page_block_size``).
        cache_batch_idx: int32 ``[B]``: the cache row each sequence uses (contiguous caches only).
        cache_leftpad: int32 ``[B]``: keys before it are ignored (contiguous caches only); the
            sequence's keys are ``[leftpad, cache_seqlens + Sk_new)`` and positions count from
            leftpad for causal / window / ALiBi (rotary positions stay absolute, as in flash-attn).
        block_table: int32 ``[B, max_blocks]``: the pages of each sequence, in logical order.
        softmax_scale, causal (bottom-right: query i at key position ``n_b - Sq + i`` with
            ``n_b`` the sequence's key count after the append), window_size (a side ``>= S_cache``,
            or ``max_blocks·page_block_size`` when paged, is unbounded), softcap: as in
            ``flash_attn_func``.
        alibi_slopes: ``[H]`` or ``[B, H]`` float, contiguous caches; a paged cache with ALiBi
            raises ``NotImplementedError`` (``flashlite.paged_attention`` has no ALiBi yet).
        num_splits: accepted and ignored (flashlite splits long caches itself).
        return_softmax_lse: also return lse ``[B, H, Sq]`` float32 (``+inf`` for a query that
            sees no key, whose output is zeros).

    How it runs. Paged caches go to ``flashlite.paged_attention`` with the block table as given.
    A contiguous cache goes there too, through a synthetic page table over the cache itself: the
    cache is viewed (never copied) as pages of ``g = gcd(S_cache, every cache_leftpad)`` keys (``g
    = S_cache`` without leftpad: one page per cache row), and sequence b's table lists the pages
    from ``(cache_batch_idx[b]·S_cache + cache_leftpad[b]) / g`` on. The rows differ in length, so
    one call with a [B, S_cache] mask would spend work on every row's unused capacity and varlen
    would need the valid keys copied back to back on every call; the page table costs B·S_cache/g
    int32s, and the paged plan lists only each query's visible keys, so the work is proportional
    to each row's own length. ``flashlite.attention`` per sequence, on a view of its valid keys
    (still proportional, one call per sequence), serves what paged_attention does not take:
    ALiBi, a sequence with fewer keys than queries (its first queries may see no key), and a
    cache whose batch and sequence dimensions cannot be merged into one view.

    Returns ``out [B, Sq, H, D]``, or ``(out, softmax_lse)`` with ``return_softmax_lse``. No
    gradient flows (flash-attn's has no backward either).
    """
    _check_tensor(q, "q", 4, "[batch, seqlen_q, heads, head_dim]")
    paged = block_table is not None
    cache_layout = "[num_blocks, page_block_size, heads_k, head_dim]" if paged else \
        "[batch_cache, seqlen_cache, heads_k, head_dim]"
    for t, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        _check_tensor(t, name, 4, cache_layout)
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t.stride(-1) != 1 and t.shape[-1] != 1:
            raise ValueError(f"{name} must have a contiguous last dimension, got strides {t.stride()}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    batch, seqlen_q, heads, head_dim = q.shape
    heads_k = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache head_dim {k_cache.shape[3]} does not match q head_dim {head_dim}")
    if heads_k == 0 or heads % heads_k:
        raise ValueError(f"q heads ({heads}) must be a multiple of k_cache heads ({heads_k}) (GQA/MQA)")
    device = q.device
    _int(num_splits, "num_splits")  # accepted and ignored
    return_softmax_lse = _bool(return_softmax_lse, "return_softmax_lse")
    rotary_interleaved = _bool(rotary_interleaved, "rotary_interleaved")

    if paged:
        if not isinstance(block_table, Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2:
            raise TypeError(f"block_table must be an int32 torch.Tensor [batch, max_blocks], got "
                            f"{getattr(block_table, 'dtype', type(block_table).__name__)} "
                            f"{tuple(getattr(block_table, 'shape', ()))}")
        if block_table.shape[0] != batch:
            raise ValueError(f"block_table must have shape [batch={batch}, max_blocks], got {tuple(block_table.shape)}")
        if block_table.device != device:
            raise ValueError(f"block_table is on {block_table.device} but q is on {device}")
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx is for contiguous caches; a paged cache (block_table) names its "
                             "pages in block_table (as in flash-attn)")
        if cache_leftpad is not None:
            raise ValueError("cache_leftpad is for contiguous caches; flash-attn does not take it with block_table "
                             "either")
        if alibi_slopes is not None:
            raise NotImplementedError("alibi_slopes with a paged KV cache (block_table): flashlite.paged_attention "
                                      "has no ALiBi yet; pass a contiguous cache for ALiBi")
        num_pages, page_size = k_cache.shape[0], k_cache.shape[1]
        capacity = block_table.shape[1] * page_size
    else:
        rows_cache, capacity = k_cache.shape[0], k_cache.shape[1]

    # The new keys/values.
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new keys and values to append), got only "
                         f"{'k' if v is None else 'v'}")
    seqlen_new = 0
    if k is not None:
        for t, name in ((k, "k"), (v, "v")):
            _check_tensor(t, name, 4, "[batch, seqlen_new, heads_k, head_dim]")
            if t.dtype != k_cache.dtype:
                raise TypeError(f"{name} must have the cache's dtype {k_cache.dtype}, got {t.dtype}")
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but q is on {device}")
        seqlen_new = k.shape[1]
        if k.shape != v.shape or k.shape[0] != batch or k.shape[2] != heads_k or k.shape[3] != head_dim:
            raise ValueError(f"k and v must have shape [batch={batch}, seqlen_new, heads_k={heads_k}, "
                             f"head_dim={head_dim}], got {tuple(k.shape)} and {tuple(v.shape)}")
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is required with new k/v: it says where they are appended")

    # Lengths (int64 on q's device).
    if cache_seqlens is None:
        lengths = torch.full((batch,), capacity, dtype=torch.int64, device=device)
    elif isinstance(cache_seqlens, Tensor):
        lengths = _int32_vector(cache_seqlens, "cache_seqlens", batch, device).long()
    else:
        lengths = torch.full((batch,), _int(cache_seqlens, "cache_seqlens"), dtype=torch.int64, device=device)
    if cache_batch_idx is not None:
        rows = _int32_vector(cache_batch_idx, "cache_batch_idx", batch, device).long()
    else:
        rows = torch.arange(batch, device=device)
        if not paged and batch > rows_cache:
            raise ValueError(f"k_cache has {rows_cache} rows for a batch of {batch}; pass cache_batch_idx or a "
                             f"cache with batch_cache >= batch")
    leftpad = None if cache_leftpad is None else \
        _int32_vector(cache_leftpad, "cache_leftpad", batch, device).long()

    # Rotary.
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin need the new k/v (flash-attn rotates only the appended keys)")
        for t, name in ((rotary_cos, "rotary_cos"), (rotary_sin, "rotary_sin")):
            _check_tensor(t, name, 2, "[seqlen_ro, rotary_dim / 2]")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but q is on {device}")
        if rotary_cos.shape != rotary_sin.shape:
            raise ValueError(f"rotary_cos and rotary_sin must have the same shape, got {tuple(rotary_cos.shape)} "
                             f"and {tuple(rotary_sin.shape)}")
        if not 0 < 2 * rotary_cos.shape[1] <= head_dim:
            raise ValueError(f"rotary_cos must be [seqlen_ro, rotary_dim / 2] with 0 < rotary_dim <= head_dim "
                             f"{head_dim}, got {tuple(rotary_cos.shape)}")

    pattern = pattern_for(causal, window_size, capacity)
    positional = isinstance(pattern, SlidingWindow) or pattern.causal  # flash-attn's Is_causal || Is_local
    softcap = _softcap(softcap)

    # Host-side checks on the values (one read of the small index tensors).
    host_lengths = lengths.tolist()
    host_rows = rows.tolist()
    host_leftpad = [0] * batch if leftpad is None else leftpad.tolist()
    totals = [n + seqlen_new for n in host_lengths]
    for b in range(batch):
        if host_lengths[b] < 0 or totals[b] > capacity:
            what = f"cache_seqlens[{b}] + seqlen_new = {totals[b]}" if seqlen_new else f"cache_seqlens[{b}] = {totals[b]}"
            raise CacheCapacityError(f"cache_seqlens out of range: {what}, the cache holds {capacity} keys per sequence"
                             + (" (block_table columns x page_block_size)" if paged else " (k_cache.shape[1])"))
        if not 0 <= host_leftpad[b] <= host_lengths[b]:
            raise ValueError(f"cache_leftpad[{b}] = {host_leftpad[b]} must lie in [0, cache_seqlens[{b}] = "
                             f"{host_lengths[b]}]")
        if not paged and not 0 <= host_rows[b] < rows_cache:
            raise ValueError(f"cache_batch_idx[{b}] = {host_rows[b]} is not a row of k_cache [0, {rows_cache})")
    if paged and batch:
        used = (torch.tensor(totals, device=device) + page_size - 1) // page_size
        table = block_table.long()
        bad = (torch.arange(block_table.shape[1], device=device)[None, :] < used[:, None]) & \
              ((table < 0) | (table >= num_pages))
        if bool(bad.any()):
            b, j = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"block_table[{b}, {j}] = {int(table[b, j])} is not a page id in [0, {num_pages})")
    if rotary_cos is not None and batch:
        last = max(n + max(seqlen_new, seqlen_q if positional else 1) for n in host_lengths) - 1
        if last >= rotary_cos.shape[0]:
            raise ValueError(f"rotary_cos/rotary_sin have {rotary_cos.shape[0]} positions; position {last} is needed "
                             f"(cache_seqlens + seqlen_new / seqlen_q)")

    with torch.no_grad():
        if rotary_cos is not None:
            steps_q = torch.arange(seqlen_q, device=device) if positional else \
                torch.zeros(seqlen_q, dtype=torch.int64, device=device)
            q = apply_rotary(q, rotary_cos, rotary_sin, lengths[:, None] + steps_q, rotary_interleaved)
            k = apply_rotary(k, rotary_cos, rotary_sin, lengths[:, None] + torch.arange(seqlen_new, device=device),
                             rotary_interleaved)
        if seqlen_new:
            position = lengths[:, None] + torch.arange(seqlen_new, device=device)  # [B, Sk_new]
            if paged:
                index = (torch.gather(block_table.long(), 1, position // page_size), position % page_size)
            else:
                index = (rows[:, None].expand(-1, seqlen_new), position)
            k_cache.index_put_(index, k)  # in place: exactly the new rows
            v_cache.index_put_(index, v)
        out, lse = _attend_cache(q, k_cache, v_cache, block_table, rows, host_rows, host_leftpad, totals, pattern,
                                 softmax_scale, softcap, alibi_slopes, capacity)
    lse = _flash_lse(lse)
    return (out, lse) if return_softmax_lse else out


def _attend_cache(q, k_cache, v_cache, block_table, rows, host_rows, host_leftpad, totals, pattern, scale, softcap,
                  alibi_slopes, capacity):
    """(out [B, Sq, H, D], lse [B, H, Sq] with -inf for no key) over keys [leftpad_b, totals_b) of each sequence."""
    batch, seqlen_q, heads, head_dim = q.shape
    device = q.device
    counts = [t - p for t, p in zip(totals, host_leftpad)]
    if batch == 0 or seqlen_q == 0:
        return q.new_zeros(q.shape), torch.full((batch, heads, seqlen_q), float("-inf"), device=device)
    pool = table = None
    if alibi_slopes is None and min(counts) >= seqlen_q:
        if block_table is not None:
            pool, table = (k_cache, v_cache), block_table
        else:
            page = capacity
            for p in host_leftpad:
                page = math.gcd(page, p)
            k_pool, v_pool = _pool_of_rows(k_cache, page), _pool_of_rows(v_cache, page)
            if k_pool is not None and v_pool is not None:
                pool = (k_pool, v_pool)
                start = (rows * capacity + torch.tensor(host_leftpad, device=device)) // page
                table = start[:, None] + torch.arange(capacity // page, device=device)
                table = table.clamp(max=k_pool.shape[0] - 1).to(torch.int32)  # entries past a row's keys: unread
    if pool is not None:
        seqlens = torch.tensor(counts, dtype=torch.int32, device=device)
        out, lse = api.paged_attention(q.transpose(1, 2), pool[0], pool[1], table, seqlens, pattern, scale=scale,
                                       softcap=softcap, return_lse=True)
        return out.transpose(1, 2), lse
    # One flashlite.attention per sequence, on its valid keys.
    outs, lses = [], []
    for b in range(batch):
        if block_table is not None:
            page_size = k_cache.shape[1]
            j = torch.arange(totals[b], device=device)
            index = (block_table[b].long()[j // page_size], j % page_size)
            keys, values = k_cache[index], v_cache[index]  # gathered: [n_b, Hk, D]
        else:
            keys = k_cache[host_rows[b], host_leftpad[b]:totals[b]]
            values = v_cache[host_rows[b], host_leftpad[b]:totals[b]]
        slopes = alibi_slopes
        if isinstance(alibi_slopes, Tensor) and alibi_slopes.dim() == 2:
            if alibi_slopes.shape[0] != batch:
                raise ValueError(f"alibi_slopes must have shape [{heads}] or [{batch}, {heads}], got "
                                 f"{tuple(alibi_slopes.shape)}")
            slopes = alibi_slopes[b]
        o, l = api.attention(q[b:b + 1].transpose(1, 2), keys[None].transpose(1, 2), values[None].transpose(1, 2),
                             pattern, scale=scale, softcap=softcap, alibi_slopes=slopes, return_lse=True)
        outs.append(o.transpose(1, 2))
        lses.append(l)
    return torch.cat(outs, 0), torch.cat(lses, 0)


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
