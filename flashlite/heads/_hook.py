"""The one place the attention call sites consult for ``flashlite.heads``.

The call sites - ``flashlite.nn`` modules (``Attention._run``), ``flashlite.nn.functional.serve``
(which ``MultiheadAttention`` and the transformers integration call with ``layer=``) and the
transformers packed path - ask :func:`engaged` first; only when it says yes does the call go
through here. Engaged means: a recorder is active (``heads.record``), importance gates are being
collected (``heads.importance``), or the layer carries a head mask (``module.head_mask``, set by
``heads.prune``, or a per-call ``head_mask=``).

Here a recorded call runs :func:`flashlite.attention_stats` instead of ``flashlite.attention``
(the same kernel pass, plus running sums) and hands the per-query statistics to the recorder with
the layer (the module) as its identity; a head mask becomes ``head_mask=`` of the kernel call
(bool: the masked heads do no work; float: multiplies each head's output).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# The active Recorder (heads.record) and the active importance Gates (heads.importance), or None.
_recorder = None
_gates = None


def engaged(layer, head_mask: Optional[Tensor] = None) -> bool:
    """True if a call of ``layer`` must go through this module (cheap: two globals and an attribute)."""
    return (_recorder is not None or _gates is not None or head_mask is not None
            or getattr(layer, "head_mask", None) is not None)


def layer_mask(layer, q: Tensor, head_mask: Optional[Tensor] = None) -> Optional[Tensor]:
    """The head mask of this call: ``head_mask`` (per call) or the layer's ``head_mask`` attribute,
    times the layer's importance gate while ``heads.importance`` runs; on q's device."""
    mask = head_mask if head_mask is not None else getattr(layer, "head_mask", None)
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"head_mask of {type(layer).__name__} must be a bool or float tensor [Hq] or [B, Hq], "
                            f"got {type(mask).__name__}")
        mask = mask.to(q.device)
    if _gates is not None:
        gate = _gates.gate(layer, q)
        if gate is not None:
            mask = gate if mask is None else gate * mask.to(gate.dtype)
    return mask


def _recorder_for(layer):
    return _recorder if _recorder is not None and _recorder.owns(layer) else None


def attend(layer, q: Tensor, k: Tensor, v: Tensor, pattern, *, head_mask: Optional[Tensor] = None,
           return_lse: bool = False, dropout_p: float = 0.0, scale=None, softcap=None, alibi_slopes=None,
           backend=None):
    """``flashlite.attention`` for one call of ``layer`` (kernel path): with the layer's head mask,
    and recorded when a recorder owns the layer. Returns what ``attention`` returns."""
    import flashlite as fl

    mask = layer_mask(layer, q, head_mask)
    kw = dict(scale=scale, softcap=softcap, alibi_slopes=alibi_slopes, backend=backend)
    recorder = _recorder_for(layer)
    if recorder is None:
        return fl.attention(q, k, v, pattern, head_mask=mask, return_lse=return_lse, dropout_p=dropout_p, **kw)
    out, stats = fl.attention_stats(q, k, v, pattern, sink_tokens=recorder.sink_tokens, head_mask=mask, **kw)
    lse = stats.lse
    if dropout_p:  # statistics are the undropped softmax's; the output keeps the layer's dropout
        out, lse = fl.attention(q, k, v, pattern, head_mask=mask, return_lse=True, dropout_p=dropout_p, **kw)

    def pooled(block):
        return _masked_map(q, k, pattern, mask, block, kw)

    recorder.add(layer, stats, out, pooled, k.shape[2])
    return (out, lse) if return_lse else out


def _masked_map(q: Tensor, k: Tensor, pattern, mask: Optional[Tensor], block, kw) -> Tensor:
    """``flashlite.attention_map`` of this call: a bool head mask goes with it (a masked head's map
    is zeros, its tiles never visited); a float mask (a gate on the output) does not change the maps."""
    import flashlite as fl

    bool_mask = mask if mask is not None and mask.dtype == torch.bool else None
    return fl.attention_map(q, k, pattern, block=block, head_mask=bool_mask, **kw)


def mask_weights(layer, q: Tensor, weights: Optional[Tensor], head_mask: Optional[Tensor] = None) -> Optional[Tensor]:
    """The slow path's attention weights ``[B, Hq, Nq, Nk]`` with a bool head mask applied: a
    masked head's weights are zeros (as its output is). A float mask (a gate) leaves them."""
    if weights is None:
        return None
    mask = layer_mask(layer, q, head_mask)
    if mask is None or mask.dtype != torch.bool:
        return weights
    return torch.where(_broadcast(mask, weights), weights, weights.new_zeros(()))


def after_dense(layer, q: Tensor, k: Tensor, out: Tensor, pattern, *, keep=None, bias=None, scale=None,
                softcap=None, head_mask: Optional[Tensor] = None) -> Tensor:
    """The slow path (an explicit mask, ``flashlite.nn.functional.dense_attention``) for one call
    of ``layer``: the head mask multiplies the output; a recorder gets the statistics of the
    materialized probabilities (the slow path is O(Nq·Nk) already)."""
    mask = layer_mask(layer, q, head_mask)
    if mask is not None:
        out = out * _broadcast(mask, out).to(out.dtype)
    recorder = _recorder_for(layer)
    if recorder is not None:
        from ..nn.functional import _probabilities
        from . import stats_from_probabilities

        with torch.no_grad():
            probs = _probabilities(q.detach(), k.detach(), pattern, torch.float32, mask=keep, attn_bias=bias,
                                   scale=scale, softcap=softcap)
            if mask is not None and mask.dtype == torch.bool:  # a masked head: zeros (no data), as on the kernels
                probs = torch.where(_broadcast(mask, probs), probs, probs.new_zeros(()))
            stats = stats_from_probabilities(probs, sink_tokens=recorder.sink_tokens)

        def pooled(block):
            return _pool(probs, block)

        recorder.add(layer, stats, out, pooled, k.shape[2])
    return out


def packed_mask(layer, q: Tensor) -> Optional[Tensor]:
    """Packed sequences (``varlen_attention``; ``q`` ``[1, Hq, T, D]``): the layer's head mask as
    ``varlen_attention``'s ``head_mask`` ``[Hq]`` (bool: a masked head does no work; float: a gate
    on its output), or None. The call is not recorded (counted as skipped)."""
    mask = layer_mask(layer, q)
    if mask is not None and mask.dim() == 2 and mask.shape[0] == 1:
        mask = mask[0]  # the packed row's mask: every sequence's
    recorder = _recorder_for(layer)
    if recorder is not None:
        recorder.skip(layer, "packed sequences (varlen) are not recorded")
    return mask


def _broadcast(mask: Tensor, like: Tensor) -> Tensor:
    """``[Hq]`` or ``[B, Hq]`` -> broadcastable to ``like [B, Hq, N, ...]``."""
    mask = mask if mask.dim() == 2 else mask.unsqueeze(0)
    return mask.reshape(mask.shape + (1,) * (like.dim() - 2))


def _pool(probs: Tensor, block) -> Tensor:
    """``[B, H, Nq, Nk]`` probabilities -> ``attention_map``'s pooled form (mean over the block's
    query rows of the mass on each key block)."""
    block_q, block_k = block
    batch, heads, seqlen_q, seqlen_k = probs.shape
    rows_q, cols_k = -(-seqlen_q // block_q), -(-seqlen_k // block_k)
    padded = probs.new_zeros(batch, heads, rows_q * block_q, cols_k * block_k)
    padded[..., :seqlen_q, :seqlen_k] = probs
    mass = padded.view(batch, heads, rows_q, block_q, cols_k, block_k).sum(dim=(3, 5))
    counts = (seqlen_q - torch.arange(rows_q, device=probs.device) * block_q).clamp(max=block_q)
    return mass / counts.to(mass.dtype)[:, None]
