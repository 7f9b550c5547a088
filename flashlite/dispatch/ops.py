"""The custom ops (so ``torch.compile`` traces through flashlite) and their autograd.

One forward op and one backward op serve both engines. Each carries the plan as a list of
tensors and a short list of ints (``Plan.op_args``), plus the call's floats (scale, softcap,
dropout_p), the dropout seed and the ALiBi slopes, and hands the rebuilt plan to its backend. Each has a fake implementation
(shapes only), and the forward's autograd formula calls the backward op.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .plan import Plan


@torch.library.custom_op("flashlite::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, plan: List[Tensor], plan_ints: List[int],
                 alibi_slopes: Optional[Tensor], scale_softcap: List[float], dropout_seed: int) -> Tuple[Tensor, Tensor]:
    """(out, lse) of the plan's backend. ``scale_softcap`` = [scale, softcap, dropout_p]."""
    run = Plan.from_op_args(plan, plan_ints, q.shape[2], k.shape[2])
    return run.backend.forward(run, q, k, v, scale_softcap[0], scale_softcap[1], alibi_slopes,
                               **_dropout(scale_softcap, dropout_seed))


def _dropout(scale_softcap: List[float], seed: int) -> dict:
    """The backends' ``dropout=(p, seed)`` keyword, only when dropout is on."""
    p = scale_softcap[2] if len(scale_softcap) > 2 else 0.0
    return {"dropout": (p, seed)} if p else {}


@attention_op.register_fake
def _(q, k, v, plan, plan_ints, alibi_slopes, scale_softcap, dropout_seed):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("flashlite::attention_backward", mutates_args=())
def attention_backward_op(grad_out: Tensor, saved: List[Tensor], plan: List[Tensor], plan_ints: List[int],
                          alibi_slopes: Optional[Tensor], scale_softcap: List[float],
                          dropout_seed: int, entropy_terms: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv); ``saved`` is ``[q, k, v, out, lse]``; ``entropy_terms`` (attention_stats' backward)
    is float32 ``[2, B, Hq, Nq]``: the entropy's gradient g and g·(lse − H)."""
    q, k, v, out, lse = saved
    run = Plan.from_op_args(plan, plan_ints, q.shape[2], k.shape[2])
    extra = _dropout(scale_softcap, dropout_seed)
    if entropy_terms is not None:
        extra["entropy"] = entropy_terms
    return run.backend.backward(run, grad_out, q, k, v, out, lse, scale_softcap[0], scale_softcap[1], alibi_slopes,
                                **extra)


@attention_backward_op.register_fake
def _(grad_out, saved, plan, plan_ints, alibi_slopes, scale_softcap, dropout_seed, entropy_terms=None):
    q, k, v = saved[:3]
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, plan, plan_ints, alibi_slopes, scale_softcap, dropout_seed = inputs[:8]
    entropy = output[2][0] if len(output) > 2 else None
    ctx.save_for_backward(q, k, v, output[0], output[1], alibi_slopes, entropy, *plan)
    ctx.plan_ints, ctx.scale_softcap, ctx.dropout_seed = plan_ints, scale_softcap, dropout_seed
    ctx.set_materialize_grads(False)  # an unused output (lse, the statistics) sends None, not zeros


def _gradients(ctx, grad_out, grad_entropy):
    q, k, v, out, lse, alibi_slopes, entropy, *plan = ctx.saved_tensors
    terms = None if grad_entropy is None else entropy_terms(grad_entropy, lse, entropy)
    if grad_out is None:
        if terms is None:
            return None, None, None, plan
        grad_out = torch.zeros_like(out)
    dq, dk, dv = attention_backward_op(grad_out.contiguous(), [q, k, v, out, lse], plan, ctx.plan_ints,
                                       alibi_slopes, ctx.scale_softcap, ctx.dropout_seed, terms)
    return dq, dk, dv, plan


def _backward(ctx, grad_out, grad_lse):
    dq, dk, dv, plan = _gradients(ctx, grad_out, None)
    return dq, dk, dv, [None] * len(plan), None, None, None, None


def _stats_backward(ctx, grad_out, grad_lse, grad_stats):
    """Only the entropy plane of the statistics carries a gradient."""
    dq, dk, dv, plan = _gradients(ctx, grad_out, None if grad_stats is None else grad_stats[0])
    return dq, dk, dv, [None] * len(plan), None, None, None, None, None


def entropy_terms(grad_entropy: Tensor, lse: Tensor, entropy: Tensor) -> Tensor:
    """``[2, B, Hq, Nq]`` float32: g (the gradient reaching the entropy) and ``g·(lse − H)`` = g·E[s]
    (0 on rows with no key), what the backward kernels add to dS: ``−g·P·(s − E[s])``."""
    grad = grad_entropy.to(torch.float32)
    mean_score = torch.where(torch.isfinite(lse), lse - entropy, 0)
    return torch.stack((grad, grad * mean_score)).contiguous()


@torch.library.custom_op("flashlite::attention_stats", mutates_args=())
def attention_stats_op(q: Tensor, k: Tensor, v: Tensor, plan: List[Tensor], plan_ints: List[int],
                       alibi_slopes: Optional[Tensor], scale_softcap: List[float], dropout_seed: int,
                       sink_tokens: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(out, lse, row_stats ``[5, B, Hq, Nq]``) of the plan's backend (one pass)."""
    run = Plan.from_op_args(plan, plan_ints, q.shape[2], k.shape[2])
    return run.backend.forward(run, q, k, v, scale_softcap[0], scale_softcap[1], alibi_slopes,
                               stats=sink_tokens, **_dropout(scale_softcap, dropout_seed))


@attention_stats_op.register_fake
def _(q, k, v, plan, plan_ints, alibi_slopes, scale_softcap, dropout_seed, sink_tokens):
    rows = q.shape[:3]
    return (torch.empty_like(q), q.new_empty(rows, dtype=torch.float32),
            q.new_empty((5,) + tuple(rows), dtype=torch.float32))


attention_stats_op.register_autograd(_stats_backward, setup_context=_setup_context)
attention_op.register_autograd(_backward, setup_context=_setup_context)

__all__ = ["attention_op", "attention_backward_op", "attention_stats_op", "entropy_terms"]
