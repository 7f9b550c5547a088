"""The mask front: every attention-mask form the faces accept, lowered in one place into a
flashlite pattern plus whatever is left dense.

``lower(q, k, ...)`` takes, in any combination (``q [B, Hq, Nq, D]`` and ``k [B, Hkv, Nk, D]``
give the sizes and the device; their values are never read):

* ``pattern``: a flashlite pattern (bottom-right aligned) every query is restricted to;
* ``attn_mask``: bool or float, broadcastable to ``[B, Hq, Nq, Nk]``. Bool ``True`` means
  *attend* (``true_means="attend"``: PyTorch's SDPA, transformers) or *hidden*
  (``true_means="masked"``: ``nn.MultiheadAttention``); a float mask is added to the scores;
* ``key_padding_mask``: ``[B, Nk]``, bool in the same convention or float (added);
* ``attn_bias``: a float added to the scores (position biases);
* ``is_causal``: PyTorch's *top-left* causal mask (query i sees keys ``j <= i``).

It returns :class:`Lowered`: ``(pattern, mask, bias, keys)`` - attend over the first ``keys``
keys with ``pattern``, and, where not None, a bool keep-mask ``mask`` (True = attend) and a float
``bias``, both broadcastable to ``[B, Hq, Nq, keys]``. With ``mask`` and ``bias`` None the call
runs on the kernels; otherwise on the slow path (``flashlite.reference.attention(..., mask=,
attn_bias=)``).

The steps:

1. a bool mask is turned into keep-form; a float mask holding only 0 and -inf (and needing no
   gradient) is a keep-mask too (eager only: it reads values);
2. a keep-mask that varies only along the keys (``[B|1, 1, 1, Nk]``) is key padding;
3. a keep-mask equal to the top-left causal mask is ``is_causal`` (eager only);
4. top-left causal becomes a pattern (:func:`top_left_causal`: the causal schedule over the first
   Nq keys, or a shifted band when Nq > Nk), is intersected with ``pattern``
   (:func:`causal_variant`), or - where no pattern expresses the intersection - a dense mask;
5. key padding becomes a ``TopK`` pattern over the kept keys (:func:`padded_pattern`) when nothing
   else is left dense; otherwise (or for block-sparse, or with ``dense=True``: the caller runs
   the slow path anyway) it joins the dense mask.

Tracing (``torch.compile``, export, a dispatch mode, CUDA-graph capture; ``flashlite.core.tracing``): no
value is read and no size depends on the data - step 1 keeps float masks as biases, step 3 is
skipped, and key padding becomes a ``TopK`` of fixed width ``Nk`` (indices ``arange(Nk)`` with
the padded keys set to -1) even when nothing is padded. Every choice then depends on shapes,
dtypes and flags only, so the lowering traces into one graph; the results are exact either way.

Base layer: imports torch and ``flashlite.core`` only.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .patterns import BlockSparse, Full, Pattern, SlidingWindow, TopK
from .tracing import values_readable

FULL = Full(causal=False)
CAUSAL = Full(causal=True)
_SHIFTED: Dict[Tuple[int, int], SlidingWindow] = {}
_TRUE_MEANS = ("attend", "masked")


class Lowered(NamedTuple):
    """What :func:`lower` returns: attend over ``k[:, :, :keys]`` with ``pattern``; ``mask`` (bool,
    True = attend) and ``bias`` (float, added) are what is left dense, or None."""

    pattern: Pattern
    mask: Optional[Tensor]
    bias: Optional[Tensor]
    keys: int

    @property
    def dense(self) -> bool:
        """True if something is left that only the slow path (an explicit mask) can serve."""
        return self.mask is not None or self.bias is not None


# ---------------------------------------------------------------------------------------------
# Causal masks as patterns
# ---------------------------------------------------------------------------------------------
def top_left_causal(seqlen_q: int, seqlen_k: int) -> Tuple[Pattern, int]:
    """PyTorch's top-left causal mask (query i sees keys ``j <= i``) as a flashlite pattern.

    Returns ``(pattern, keys)``: attend over the first ``keys`` keys with ``pattern`` (bottom-right
    aligned). ``Nq <= Nk``: no query sees a key after ``Nq - 1``, so it is the causal schedule over
    the first Nq keys; ``Nq > Nk``: ``j <= i = p(i) + (Nq - Nk)`` is the band
    ``SlidingWindow(Nk, Nq - Nk)`` over all keys. Patterns are shared objects.
    """
    if seqlen_q <= seqlen_k:
        return CAUSAL, seqlen_q
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
        return CAUSAL
    if isinstance(pattern, Full):
        return pattern
    if isinstance(pattern, SlidingWindow):
        return pattern if pattern.right == 0 else SlidingWindow(pattern.left, 0)
    if isinstance(pattern, BlockSparse):
        return pattern if pattern.causal else BlockSparse(pattern.layout, pattern.block_size, causal=True)
    if isinstance(pattern, TopK):
        return pattern if pattern.causal else TopK(pattern.indices, causal=True)
    return None


def _top_left_mask(seqlen_q: int, seqlen_k: int, device) -> Tensor:
    """Bool ``[1, 1, Nq, Nk]``: True where ``j <= i`` (top-left causal)."""
    return torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device).tril()[None, None]


def _with_top_left_causal(pattern: Pattern, seqlen_q: int, seqlen_k: int, dense: bool,
                          device) -> Tuple[Pattern, int, Optional[Tensor]]:
    """``pattern`` ∩ top-left causal -> (pattern, keys, extra keep-mask or None)."""
    if isinstance(pattern, Full) and (not pattern.causal or seqlen_q <= seqlen_k):
        # Full, or bottom-right causal with Nq <= Nk (which top-left causal lies inside).
        shifted, keys = top_left_causal(seqlen_q, seqlen_k)
        if keys < seqlen_k and dense:
            # The slow path keeps every key column (attention weights are [.., Nq, Nk]).
            return FULL, seqlen_k, _top_left_mask(seqlen_q, seqlen_k, device)
        return shifted, keys, None
    if isinstance(pattern, Full):  # bottom-right causal with Nq > Nk lies inside top-left causal
        return pattern, seqlen_k, None
    if seqlen_q == seqlen_k:  # top-left == bottom-right
        variant = causal_variant(pattern)
        if variant is not None:
            return variant, seqlen_k, None
    return pattern, seqlen_k, _top_left_mask(seqlen_q, seqlen_k, device)


def is_top_left_causal(mask: Tensor, seqlen_q: int, seqlen_k: int, masked_value) -> bool:
    """True if ``mask`` (2-D ``[Nq, Nk]``, or with leading 1s) is exactly the top-left causal mask,
    where ``masked_value`` marks a hidden entry (True for torch MHA's bool masks, False for keep-masks,
    -inf for float masks). Reads the mask's values (a host sync on a GPU)."""
    if mask.shape[-2:] != (seqlen_q, seqlen_k) or any(s != 1 for s in mask.shape[:-2]):
        return False
    mask = mask.reshape(seqlen_q, seqlen_k)
    keep = _top_left_mask(seqlen_q, seqlen_k, mask.device)[0, 0]
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, ~keep if masked_value is True else keep))
    if not mask.is_floating_point():
        return False
    return bool(torch.equal(torch.isneginf(mask), ~keep)) and bool((mask[keep] == 0).all())


# ---------------------------------------------------------------------------------------------
# Key padding as top-k indices
# ---------------------------------------------------------------------------------------------
def _shared_key_indices(key_keep: Tensor) -> Tensor:
    """Bool ``[B, Nk]`` -> int32 ``[B, 1, K]``: each row's kept key positions, ``-1`` elsewhere.

    Eager: ascending, ``K`` = the most keys a row keeps (reads the mask). Tracing: ``K = Nk``,
    ``arange(Nk)`` with the padded keys set to -1 (no size from the data; the plan sorts rows)."""
    seqlen_k = key_keep.shape[-1]
    positions = torch.arange(seqlen_k, device=key_keep.device, dtype=torch.int32)
    if not values_readable(key_keep):
        return torch.where(key_keep, positions, torch.full_like(positions, -1)).unsqueeze(1)
    width = max(int(key_keep.sum(-1).max()), 1)
    # Kept keys keep their position, the rest sort to the end as Nk; then take the first K.
    keyed = torch.where(key_keep, positions, torch.full_like(positions, seqlen_k))
    ordered = keyed.sort(dim=-1).values[:, :width]
    ordered = torch.where(ordered >= seqlen_k, torch.full_like(ordered, -1), ordered)
    return ordered.unsqueeze(1).contiguous()


def _window_key_indices(key_keep: Tensor, seqlen_q: int, left: int, right: int) -> Tensor:
    """Bool ``[B, Nk]`` and a band -> int32 ``[B, 1, Nq, W]``: for query i the keys
    ``p(i) - left .. p(i) + right`` that exist and are kept, ``-1`` elsewhere (W from the band)."""
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
    (None where that has no index form: block-sparse). No value is read while tracing."""
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
# The front
# ---------------------------------------------------------------------------------------------
def _keep_form(mask: Optional[Tensor], name: str, true_means: str,
               read_values: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """A mask -> (bool keep-mask, float bias); one of them None (both for no mask)."""
    if mask is None:
        return None, None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool or float tensor or None, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return (~mask if true_means == "masked" else mask), None
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or float tensor, got {mask.dtype}")
    if read_values and not mask.requires_grad:
        is_zero = mask == 0
        if bool((is_zero | torch.isneginf(mask)).all()):  # only 0 / -inf: a keep-mask
            return is_zero, None
    return None, mask


def _both(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else a if b is None else a & b


def _sum(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else a if b is None else a + b


def _key_padding_in(keep: Tensor, batch: int, seqlen_k: int) -> Optional[Tensor]:
    """A keep-mask that varies only along the keys, as ``[B, Nk]`` (else None)."""
    if keep.dim() > 4 or keep.shape[-1] != seqlen_k:
        return None
    shape = (1,) * (4 - keep.dim()) + tuple(keep.shape)
    if shape[1] != 1 or shape[2] != 1 or shape[0] not in (1, batch):
        return None
    return keep.reshape(shape[0], seqlen_k).expand(batch, seqlen_k)


def _cut(t: Optional[Tensor], keys: int) -> Optional[Tensor]:
    return t if t is None or t.shape[-1] == 1 else t[..., :keys]


def lower(q: Tensor, k: Tensor, *, pattern: Optional[Pattern] = None, attn_mask: Optional[Tensor] = None,
          key_padding_mask: Optional[Tensor] = None, attn_bias: Optional[Tensor] = None, is_causal: bool = False,
          true_means: str = "attend", dense: bool = False) -> Lowered:
    """Lower every mask form to a pattern plus what is left dense (see the module docstring).

    Args:
        q, k: ``[B, Hq, Nq, D]``, ``[B, Hkv, Nk, D]`` (only their sizes and device are used).
        pattern: a flashlite pattern (bottom-right aligned), None = full.
        attn_mask: bool or float, broadcastable to ``[B, Hq, Nq, Nk]``.
        key_padding_mask: ``[B, Nk]`` bool or float.
        attn_bias: float, broadcastable to ``[B, Hq, Nq, Nk]``, added to the scores.
        is_causal: PyTorch's top-left causal mask, on top of everything else.
        true_means: what a bool ``True`` means in ``attn_mask`` / ``key_padding_mask``:
            ``"attend"`` (SDPA, transformers) or ``"masked"`` (``nn.MultiheadAttention``).
        dense: the caller runs the slow path anyway (attention weights, dropout): key padding and
            causal masks go into the dense mask instead of becoming index patterns, and every key
            column is kept (``keys == Nk``).

    Returns :class:`Lowered` ``(pattern, mask, bias, keys)``.
    """
    if true_means not in _TRUE_MEANS:
        raise ValueError(f"true_means must be one of {_TRUE_MEANS}, got {true_means!r}")
    if pattern is not None and not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a flashlite pattern or None, got {type(pattern).__name__}")
    batch, seqlen_q, seqlen_k = q.shape[0], q.shape[2], k.shape[2]
    read_values = not dense and values_readable(q)
    pattern = FULL if pattern is None else pattern

    keep, bias = _keep_form(attn_mask, "attn_mask", true_means, read_values)
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, seqlen_k):
        raise ValueError(f"key_padding_mask must have shape ({batch}, {seqlen_k}) [batch, keys], "
                         f"got {tuple(key_padding_mask.shape)}")
    key_keep, key_bias = _keep_form(key_padding_mask, "key_padding_mask", true_means, read_values)
    if key_bias is not None:
        bias = _sum(bias, key_bias[:, None, None, :])
    if attn_bias is not None:
        if not isinstance(attn_bias, Tensor) or not attn_bias.is_floating_point():
            raise TypeError("attn_bias must be a float tensor or None")
        bias = _sum(bias, attn_bias)

    if keep is not None:
        padding = _key_padding_in(keep, batch, seqlen_k)
        if padding is not None:
            key_keep, keep = _both(key_keep, padding), None
        elif not is_causal and read_values and is_top_left_causal(keep, seqlen_q, seqlen_k, False):
            is_causal, keep = True, None

    keys = seqlen_k
    if is_causal:
        pattern, keys, causal_keep = _with_top_left_causal(pattern, seqlen_q, seqlen_k, dense, q.device)
        keep = _both(keep, causal_keep)
        if keys < seqlen_k:
            keep, bias = _cut(keep, keys), _cut(bias, keys)
            key_keep = key_keep[:, :keys] if key_keep is not None else None

    if key_keep is not None:
        if keep is None and bias is None and not dense:
            if read_values and bool(key_keep.all()):
                return Lowered(pattern, None, None, keys)
            restricted = padded_pattern(pattern, key_keep, seqlen_q)
            if restricted is not None:
                return Lowered(restricted, None, None, keys)
        keep = _both(keep, key_keep[:, None, None, :])
    return Lowered(pattern, keep, bias, keys)


__all__ = ["Lowered", "lower", "top_left_causal", "causal_variant", "is_top_left_causal",
           "padded_pattern"]
