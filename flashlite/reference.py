"""The oracle: plain PyTorch attention with an explicit boolean mask.

``out = softmax(s) @ v`` with ``s = softcap·tanh(q·kᵀ·scale / softcap) − slope·|p(i) − j| + bias``
where masked-out entries are −inf. A row with no visible key returns zeros and lse = −inf.
Math runs in ``compute_dtype`` (float32 by default, float64 for the tests' ground truth, or the
inputs' own dtype for the "same computation in the kernel's dtype" baseline of the correctness
rule). Memory is O(Nq·Nk): it is the oracle, not a kernel.
"""
from __future__ import annotations

from typing import Optional

import torch

from .core.patterns import Pattern


def alibi_bias(alibi_slopes: torch.Tensor, batch: int, heads_q: int, seqlen_q: int, seqlen_k: int,
               dtype: torch.dtype) -> torch.Tensor:
    """``−slope·|p(i) − j|`` as ``[B|1, Hq, Nq, Nk]``; slopes are ``[Hq]`` or ``[B, Hq]``."""
    device = alibi_slopes.device
    pos = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    dist = (pos - torch.arange(seqlen_k, device=device)[None, :]).abs().to(dtype)
    slopes = alibi_slopes.to(dtype)
    slopes = slopes.view(1, heads_q, 1, 1) if slopes.dim() == 1 else slopes.view(batch, heads_q, 1, 1)
    return -slopes * dist


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Optional[Pattern] = None, *,
    scale: Optional[float] = None, softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None, attn_bias: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None, return_lse: bool = False,
    compute_dtype: Optional[torch.dtype] = torch.float32, dropout_p: float = 0.0, dropout_seed: int = 0,
    dropout_block: Optional[tuple] = None,
):
    """Reference attention. ``q [B,Hq,Nq,D]``, ``k/v [B,Hkv,Nk,D]``.

    ``mask`` (bool, broadcastable to ``[B,Hq,Nq,Nk]``) is combined with the pattern's mask;
    ``attn_bias`` (float, same broadcast) is added to the scores. ``compute_dtype=None`` computes
    in the inputs' dtype. ``dropout_p``/``dropout_seed``: inverted dropout of the probabilities with
    flashlite's counter-based mask (``flashlite.core.dropout``; ``dropout_block`` = (total shape,
    (row0, row1), (col0, col1)) when these rows/keys are a block of a larger (packed) matrix);
    the lse is the undropped one. Returns ``out`` in q's dtype (and lse ``[B,Hq,Nq]`` float32).
    """
    dtype = compute_dtype or q.dtype
    scores, vc = _masked_scores(q, k, v, pattern, dtype, scale, softcap, alibi_slopes, attn_bias, mask)

    # Rows with no visible key give p = 0, out = 0, lse = -inf.
    probs, row_max, row_sum = safe_softmax(scores)
    if dropout_p:
        probs = probs * dropout_scale(q, scores, dropout_p, dropout_seed, dropout_block)
    out = torch.matmul(probs, vc).to(q.dtype)
    if not return_lse:
        return out
    lse = (row_max + torch.log(row_sum)).squeeze(-1).to(torch.float32)
    return out, lse


STAT_NAMES = ("entropy", "max_prob", "mean_distance", "sink_mass", "keys")


def attention_stats(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Optional[Pattern] = None, *, sink_tokens: int = 4,
    scale: Optional[float] = None, softcap: Optional[float] = None, alibi_slopes: Optional[torch.Tensor] = None,
    compute_dtype: Optional[torch.dtype] = torch.float32, dropout_p: float = 0.0, dropout_seed: int = 0,
    dropout_block: Optional[tuple] = None, mask: Optional[torch.Tensor] = None,
):
    """``(out, lse, row_stats)``: ``attention`` (``mask`` as there) plus the head statistics of the materialized
    probabilities ``P = softmax(s)`` (undropped). ``row_stats`` is float32 ``[5, B, Hq, Nq]``, planes
    in ``STAT_NAMES`` order: entropy ``−Σ P·log P = lse − Σ P·s``, max ``P``, ``Σ P·|p(i) − j|``,
    ``Σ_{j < sink_tokens} P``, the number of visible keys; all 0 for a query that sees no key.
    The entropy plane is differentiable (to q and k); the others are detached."""
    dtype = compute_dtype or q.dtype
    scores, vc = _masked_scores(q, k, v, pattern, dtype, scale, softcap, alibi_slopes, None, mask)
    probs, row_max, row_sum = safe_softmax(scores)
    kept = probs * dropout_scale(q, scores, dropout_p, dropout_seed, dropout_block) if dropout_p else probs
    out = torch.matmul(kept, vc).to(q.dtype)
    # log P = s − lse on visible keys; both made finite elsewhere (rows with no key: row_max = 0,
    # sum 1) so that no NaN reaches autograd.
    seen = row_sum > 0
    lse = row_max + torch.log(torch.where(seen, row_sum, torch.ones_like(row_sum)))
    visible = torch.isfinite(scores)
    log_probs = torch.where(visible, scores, 0) - lse
    entropy = -(probs * log_probs).sum(-1)
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    pos = torch.arange(seqlen_q, device=q.device)[:, None] + (seqlen_k - seqlen_q)
    distance = (pos - torch.arange(seqlen_k, device=q.device)[None, :]).abs().to(dtype)
    p = probs.detach()
    others = (p.amax(-1), (p * distance).sum(-1), p[..., :sink_tokens].sum(-1), visible.sum(-1).to(dtype))
    row_stats = torch.stack((entropy,) + others).to(torch.float32)
    lse = torch.where(seen, lse.detach(), float("-inf")).squeeze(-1).to(torch.float32)
    return out, lse, row_stats


def _masked_scores(q, k, v, pattern, dtype, scale, softcap, alibi_slopes, attn_bias, mask):
    """``s = softcap·tanh(q·kᵀ·scale / softcap) − slope·|p(i) − j| + bias``, −inf where not visible,
    ``[B, Hq, Nq, Nk]`` in ``dtype``; and v in ``dtype`` with its heads repeated for GQA."""
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    group = heads_q // heads_kv
    qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
    if group > 1:
        kc, vc = kc.repeat_interleave(group, dim=1), vc.repeat_interleave(group, dim=1)

    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, batch, heads_q, seqlen_q, seqlen_k, dtype)
    if attn_bias is not None:
        scores = scores + attn_bias.to(dtype)

    visible = torch.ones(1, 1, seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if pattern is not None:
        visible = visible & pattern.dense_mask(batch, heads_q, heads_kv, seqlen_q, seqlen_k, q.device)
    if mask is not None:
        visible = visible & mask.to(q.device)
    return scores.masked_fill(~visible, float("-inf")), vc


def attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, pattern: Optional[Pattern] = None, *, scale: Optional[float] = None,
    softcap: Optional[float] = None, alibi_slopes: Optional[torch.Tensor] = None,
    compute_dtype: Optional[torch.dtype] = torch.float32, dropout_p: float = 0.0, dropout_seed: int = 0,
    dropout_block: Optional[tuple] = None, entropy_terms: Optional[torch.Tensor] = None,
):
    """(dq, dk, dv) of attention whose softmax is normalized by the given ``lse`` and whose output
    was ``out`` - the kernels' backward contract, also when (out, lse) were merged from several
    partial calls (context parallelism): with ``P = exp(s − lse)``, ``δ_i = Σ_d dO_id·O_id``,
    ``dV = Pᵀ·dO``, ``dS = P ⊙ (dO·Vᵀ − δ)``, and dS carried back through the scores.

    ``entropy_terms`` (float32 ``[2, B, Hq, Nq]``: ``g_i`` = the gradient reaching entropy ``H_i``
    and ``shift_i = g_i·(lse_i − H_i)``, 0 where lse is −inf) adds the entropy's own term
    ``g_i·∂H_i/∂s_ij = −g_i·P_ij·(s_ij − E_i[s])``: ``dS = P ⊙ (dO·Vᵀ − (δ − shift) − g·s)``."""
    dtype = compute_dtype or q.dtype
    heads_q, heads_kv = q.shape[1], k.shape[1]
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k)]
    with torch.enable_grad():
        scores, vc = _masked_scores(*leaves, v.detach(), pattern, dtype, scale, softcap, alibi_slopes, None, None)
        finite = torch.isfinite(lse).unsqueeze(-1)
        probs = torch.where(finite, torch.exp(scores - torch.where(finite, lse.unsqueeze(-1).to(dtype), 0)), 0)
        grad = grad_out.to(dtype)
        delta = (grad * out.to(dtype)).sum(-1, keepdim=True)
        # With dropout (keep mask M, Z = M / (1 − p)): out = (P ⊙ Z)·V, so dV = (P ⊙ Z)ᵀ·dO and
        # dS = P ⊙ ((dO·Vᵀ) ⊙ Z − δ), δ = rowsum(dO ⊙ out) as without it.
        scaled = dropout_scale(q, scores, dropout_p, dropout_seed, dropout_block) if dropout_p else None
        grad_probs = torch.matmul(grad, vc.transpose(-1, -2))
        if scaled is not None:
            grad_probs = grad_probs * scaled
        if entropy_terms is not None:
            gate, shift = (t.unsqueeze(-1).to(dtype) for t in entropy_terms)
            grad_probs = grad_probs + shift - gate * torch.where(torch.isfinite(scores), scores, 0)
        grad_scores = probs * (grad_probs - delta)
        dq, dk = torch.autograd.grad(scores, leaves, grad_scores)
    kept = probs.detach() if scaled is None else probs.detach() * scaled
    dv = torch.matmul(kept.transpose(-1, -2), grad)
    if heads_q != heads_kv:  # GQA: each KV head gathers its group's query heads
        dv = dv.unflatten(1, (heads_kv, heads_q // heads_kv)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def dropout_scale(q: torch.Tensor, scores: torch.Tensor, p: float, seed: int, block: Optional[tuple]) -> torch.Tensor:
    """``M / (1 − p)`` over ``scores`` ``[B, Hq, Nq, Nk]`` (M: the keep mask of flashlite.core.dropout)."""
    from .core.dropout import keep_mask

    if block is None:
        mask = keep_mask(seed, p, tuple(scores.shape), scores.device)
    else:
        shape, rows, cols = block
        mask = keep_mask(seed, p, shape, scores.device, rows, cols)
    return mask.to(scores.dtype) / (1.0 - p)


def safe_softmax(scores: torch.Tensor):
    """Softmax over the last dim that tolerates rows with no visible key (all -inf): they give p = 0.
    Returns ``(probs, row_max, row_sum)``, with ``lse = row_max + log(row_sum)`` (-inf for such rows)."""
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    row_sum = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    return probs, row_max, row_sum

