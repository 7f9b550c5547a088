"""The dispatch layer: choose a backend, get the call's plan, run it through the custom op.

``run`` is the whole path below the public functions: ``backend.select`` picks the backend
for (device, pattern, dtype, head_dim), ``plan.plan_for`` returns the plan (cached), and the
plan's backend runs - through ``ops.attention_op`` when autograd, ``torch.compile`` or a
dispatch mode needs the op, directly otherwise (an inference call in plain eager mode skips the
op machinery's Python, tens of µs, what a short decode step costs in all). The reference
backend is plain differentiable PyTorch and always runs directly.
"""
from __future__ import annotations

import threading
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backend as backends
from ..backend.base import Request
from ..core.packed import Packed
from ..core.patterns import Pattern
from .ops import attention_op, attention_stats_op
from ..core.tracing import tracing
from .plan import plan_for, with_heads

_last = threading.local()


def last_backend() -> Optional[str]:
    """Name of the backend that served the most recent flashlite call in this thread."""
    return getattr(_last, "name", None)


def _needs_op(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Tensor subclasses, compiling/tracing and torch-function modes go through the custom op."""
    return (type(k) is not Tensor or type(v) is not Tensor or tracing(q)
            or torch._C._is_torch_function_mode_enabled())


def _request(q: Tensor, pattern: Pattern, requires_grad: bool, deterministic: bool, dropout: bool,
             stats: bool = False, head_mask: bool = False) -> Request:
    return Request(device_type=q.device.type, dtype=q.dtype, head_dim=q.shape[-1], engine=pattern.engine,
                   pattern=pattern.name, requires_grad=requires_grad, deterministic=deterministic,
                   block_size=getattr(pattern, "block_size", None), packed=isinstance(pattern, Packed),
                   dropout=dropout, stats=stats, head_mask=head_mask)


def run(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, *, scale: float, softcap: float,
        alibi_slopes: Optional[Tensor], backend: Optional[str], deterministic: bool = True,
        dropout: Optional[Tuple[float, int]] = None, stats: Optional[int] = None,
        head_mask: Optional[Tensor] = None):
    """Attention over ``pattern`` on the chosen backend. Returns (out, lse), or (out, lse, row_stats)
    with ``stats=sink_tokens`` (head statistics, backends that declare ``stats``). ``dropout``:
    (p, seed) with p > 0, served by backends that declare ``dropout`` (reference, cpu, triton).
    ``head_mask``: bool ``[Hq]`` or ``[S, Hq]`` (S: the batch, or a packed / paged pattern's
    sequences), lowered into the plan (``plan.with_heads``): a False head visits nothing and gets
    out 0, lse −inf, statistics 0 and zero gradients; backends whose kernels cannot skip it decline."""
    requires_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    req = _request(q, pattern, requires_grad, deterministic, dropout is not None, stats is not None,
                   head_mask is not None)
    chosen = backends.select(req, backend)
    _last.name = chosen.name
    plan = plan_for(pattern, q, k, chosen, req)
    if head_mask is not None:
        plan = with_heads(plan, pattern, head_mask, q)
    extra = {"dropout": dropout} if dropout is not None else {}
    if stats is not None:
        extra["stats"] = stats
    if chosen.differentiable or not (requires_grad or _needs_op(q, k, v)):
        return chosen.forward(plan, q, k, v, scale, softcap, alibi_slopes, **extra)
    tensors, ints = plan.op_args()
    p, seed = dropout if dropout is not None else (0.0, 0)
    if stats is not None:
        return attention_stats_op(q, k, v, tensors, ints, alibi_slopes, [scale, softcap, p], seed, stats)
    return attention_op(q, k, v, tensors, ints, alibi_slopes, [scale, softcap, p], seed)


def run_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, pattern: Pattern, *,
                 scale: float, softcap: float, alibi_slopes: Optional[Tensor], backend: Optional[str],
                 deterministic: bool = True, dropout: Optional[Tuple[float, int]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one call whose softmax is normalized by ``lse`` and whose output was ``out``:
    the kernels' backward, callable on its own when (out, lse) were merged from several partial
    calls (context parallelism). Runs eagerly, outside autograd."""
    req = _request(q, pattern, True, deterministic, dropout is not None)
    chosen = backends.select(req, backend)
    _last.name = chosen.name
    plan = plan_for(pattern, q, k, chosen, req)
    extra = {"dropout": dropout} if dropout is not None else {}
    return chosen.backward(plan, grad_out.contiguous(), q, k, v, out, lse, scale, softcap, alibi_slopes, **extra)


__all__ = ["run", "run_backward", "last_backend"]
