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
                          dropout_seed: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv); ``saved`` is ``[q, k, v, out, lse]``."""
    q, k, v, out, lse = saved
    run = Plan.from_op_args(plan, plan_ints, q.shape[2], k.shape[2])
    return run.backend.backward(run, grad_out, q, k, v, out, lse, scale_softcap[0], scale_softcap[1], alibi_slopes,
                                **_dropout(scale_softcap, dropout_seed))


@attention_backward_op.register_fake
def _(grad_out, saved, plan, plan_ints, alibi_slopes, scale_softcap, dropout_seed):
    q, k, v = saved[:3]
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, plan, plan_ints, alibi_slopes, scale_softcap, dropout_seed = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], alibi_slopes, *plan)
    ctx.plan_ints, ctx.scale_softcap, ctx.dropout_seed = plan_ints, scale_softcap, dropout_seed


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, alibi_slopes, *plan = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(grad_out.contiguous(), [q, k, v, out, lse], plan, ctx.plan_ints,
                                       alibi_slopes, ctx.scale_softcap, ctx.dropout_seed)
    return dq, dk, dv, [None] * len(plan), None, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)

__all__ = ["attention_op", "attention_backward_op"]
