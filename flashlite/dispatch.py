"""Dispatch: custom ops (so ``torch.compile`` traces through) with autograd, over the backends.

Two ops, one per engine. Their tensor arguments carry the schedule / indices, their scalar
arguments the band, scale, softcap and the backend's name; the op looks the backend up and
runs its kernel. Each op has a fake implementation (shapes only) and a registered autograd
formula whose backward is itself an op.
"""
from __future__ import annotations

import threading
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from . import _backends
from .schedule import TileSchedule

_last = threading.local()


def last_backend() -> Optional[str]:
    """Name of the backend that served the most recent flashlite call in this thread."""
    return getattr(_last, "name", None)


def _record(name: str) -> None:
    _last.name = name


def _schedule_from(kv_tiles, kv_count, q_tiles, q_count, is_list, block_m, block_n, seqlen_q, seqlen_k,
                   window_left, window_right) -> TileSchedule:
    return TileSchedule("list" if is_list else "range", block_m, block_n, seqlen_q, seqlen_k,
                        window_left, window_right, kv_tiles, kv_count, q_tiles, q_count)


# ---------------------------------------------------------------------------------------------
# Tile engine op
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("flashlite::tile_attention", mutates_args=())
def tile_attention_op(
    q: Tensor, k: Tensor, v: Tensor, kv_tiles: Tensor, kv_count: Tensor, q_tiles: Tensor, q_count: Tensor,
    alibi_slopes: Optional[Tensor], is_list: bool, block_m: int, block_n: int, window_left: int,
    window_right: int, scale: float, softcap: float, backend: str,
) -> Tuple[Tensor, Tensor]:
    schedule = _schedule_from(kv_tiles, kv_count, q_tiles, q_count, is_list, block_m, block_n,
                              q.shape[2], k.shape[2], window_left, window_right)
    return _backends.get(backend).tile_forward(q, k, v, schedule, scale, softcap, alibi_slopes)


@tile_attention_op.register_fake
def _(q, k, v, kv_tiles, kv_count, q_tiles, q_count, alibi_slopes, is_list, block_m, block_n,
      window_left, window_right, scale, softcap, backend):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("flashlite::tile_attention_backward", mutates_args=())
def tile_attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kv_tiles: Tensor,
    kv_count: Tensor, q_tiles: Tensor, q_count: Tensor, alibi_slopes: Optional[Tensor], is_list: bool,
    block_m: int, block_n: int, window_left: int, window_right: int, scale: float, softcap: float,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    schedule = _schedule_from(kv_tiles, kv_count, q_tiles, q_count, is_list, block_m, block_n,
                              q.shape[2], k.shape[2], window_left, window_right)
    return _backends.get(backend).tile_backward(grad_out, q, k, v, out, lse, schedule, scale, softcap,
                                                alibi_slopes)


@tile_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, kv_tiles, kv_count, q_tiles, q_count, alibi_slopes, is_list, block_m,
      block_n, window_left, window_right, scale, softcap, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_TILE_SCALARS = ("is_list", "block_m", "block_n", "window_left", "window_right", "scale", "softcap", "backend")


def _tile_setup_context(ctx, inputs, output):
    q, k, v, kv_tiles, kv_count, q_tiles, q_count, alibi_slopes, *scalars = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], kv_tiles, kv_count, q_tiles, q_count, alibi_slopes)
    ctx.scalars = scalars


def _tile_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_tiles, kv_count, q_tiles, q_count, alibi_slopes = ctx.saved_tensors
    dq, dk, dv = tile_attention_backward_op(grad_out.contiguous(), q, k, v, out, lse, kv_tiles, kv_count,
                                            q_tiles, q_count, alibi_slopes, *ctx.scalars)
    return (dq, dk, dv) + (None,) * 13


tile_attention_op.register_autograd(_tile_backward, setup_context=_tile_setup_context)


# ---------------------------------------------------------------------------------------------
# Gather engine op (top-k)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("flashlite::gather_attention", mutates_args=())
def gather_attention_op(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, alibi_slopes: Optional[Tensor], causal: bool,
    scale: float, softcap: float, backend: str,
) -> Tuple[Tensor, Tensor]:
    return _backends.get(backend).gather_forward(q, k, v, indices, causal, scale, softcap, alibi_slopes)


@gather_attention_op.register_fake
def _(q, k, v, indices, alibi_slopes, causal, scale, softcap, backend):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("flashlite::gather_attention_backward", mutates_args=())
def gather_attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, indices: Tensor,
    alibi_slopes: Optional[Tensor], causal: bool, scale: float, softcap: float, backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    return _backends.get(backend).gather_backward(grad_out, q, k, v, out, lse, indices, causal, scale,
                                                  softcap, alibi_slopes)


@gather_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, indices, alibi_slopes, causal, scale, softcap, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _gather_setup_context(ctx, inputs, output):
    q, k, v, indices, alibi_slopes, *scalars = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], indices, alibi_slopes)
    ctx.scalars = scalars


def _gather_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, indices, alibi_slopes = ctx.saved_tensors
    dq, dk, dv = gather_attention_backward_op(grad_out.contiguous(), q, k, v, out, lse, indices, alibi_slopes,
                                              *ctx.scalars)
    return (dq, dk, dv) + (None,) * 6


gather_attention_op.register_autograd(_gather_backward, setup_context=_gather_setup_context)


# ---------------------------------------------------------------------------------------------
# Entry used by flashlite.api
# ---------------------------------------------------------------------------------------------
def _plain_eager(*tensors: Tensor) -> bool:
    """True when a call needs nothing from the custom op: plain tensors, no torch.compile / export
    tracing, no dispatch or function mode (fake, functional, meta tracing). Such a call without
    autograd runs the backend directly, which saves the op machinery's Python (tens of µs, what a
    decode step over a short cache costs in all)."""
    return (all(type(t) is Tensor for t in tensors) and not torch.compiler.is_compiling()
            and _current_dispatch_mode() is None and not torch._C._is_torch_function_mode_enabled())


def run(q: Tensor, k: Tensor, v: Tensor, pattern, *, scale: float, softcap: Optional[float],
        alibi_slopes: Optional[Tensor], backend: Optional[str]) -> Tuple[Tensor, Tensor]:
    """Pick a backend for (device, pattern, dtype) and run it. Returns (out, lse)."""
    from . import reference

    req = _backends.Request(
        device_type=q.device.type, dtype=q.dtype, head_dim=q.shape[-1], engine=pattern.engine,
        pattern=pattern.name, requires_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
        has_alibi=alibi_slopes is not None, has_softcap=bool(softcap),
        block_size=getattr(pattern, "block_size", None),
    )
    chosen = _backends.select(req, backend)
    _record(chosen.name)
    if chosen.name == "reference":
        return reference.attention(q, k, v, pattern, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes,
                                   return_lse=True)
    softcap_value = float(softcap or 0.0)
    direct = not req.requires_grad and _plain_eager(q, k, v)
    if pattern.engine == "gather":
        if direct:
            return _backends.get(chosen.name).gather_forward(q, k, v, pattern.indices, pattern.causal, scale,
                                                             softcap_value, alibi_slopes)
        return gather_attention_op(q, k, v, pattern.indices, alibi_slopes, pattern.causal, scale, softcap_value,
                                   chosen.name)
    sizes = chosen.tile_config(req)
    sched = pattern.schedule(q.shape[2], k.shape[2], sizes.block_m, sizes.block_n, q.device)
    if direct:
        return _backends.get(chosen.name).tile_forward(q, k, v, sched, scale, softcap_value, alibi_slopes)
    return tile_attention_op(q, k, v, sched.kv_tiles, sched.kv_count, sched.q_tiles, sched.q_count, alibi_slopes,
                             sched.is_list, sched.block_m, sched.block_n, sched.window_left, sched.window_right,
                             scale, softcap_value, chosen.name)


def available_backends() -> List[str]:
    return [name for name, state in _backends.report().items() if state == "available"]
