"""The Triton backend: flashlite.kernels on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from .base import Backend, Request, TileConfig

FORWARD_PARTS = 3  # ints and tensors of the gather ForwardPlan lead a plan's extras; the InversePlan follows


def _kernels():
    from flashlite import kernels  # imported lazily: Triton reads TRITON_INTERPRET at decoration

    return kernels


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class TritonBackend(Backend):
    name = "triton"
    devices = ("cuda", "cpu")
    packed_tiles = True  # the tile kernels' PACKED launches read the schedule's work items
    dropout = True  # the kernels' DROPOUT: flashlite.core.dropout's mask, regenerated in the backward
    stats = True  # the forward kernels' STATS (head statistics), the backward kernels' ENTROPY
    head_mask = ("tile", "gather")  # tile: the plan's zeroed counts; gather: the kernels' HEAD_MASK (row_keep)

    def available(self) -> Optional[str]:
        try:
            import triton  # noqa: F401
        except ImportError as exc:  # pragma: no cover - triton is a dependency
            return f"triton is not importable ({exc})"
        return None

    def why_not(self, req: Request) -> Optional[str]:
        reason = super().why_not(req)
        if reason:
            return reason
        if req.stats and req.packed and req.engine == "gather":
            # The gather plan holds packed rows in packed coordinates: no sequence starts for the
            # local distances and sinks.
            return "no head statistics for packed top-k in its kernels yet"
        if req.device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            return ("these tensors are on the CPU, where Triton runs only in its interpreter: set "
                    "TRITON_INTERPRET=1 in the environment before flashlite.kernels is imported")
        return None

    # -- plan ingredients -------------------------------------------------------------------------
    def tile_config(self, req: Request, device: torch.device) -> TileConfig:
        config = _kernels().tile_config(req.head_dim, req.dtype, device, req.block_size)
        return TileConfig(config.block_m, config.block_n, config.num_warps, config.num_stages)

    def prepare_gather(self, rows, key_offsets, key_slots, req, shape, causal):
        from flashlite.kernels import gather_launch as gl

        batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim = shape
        group = heads_q // heads_kv
        ints, tensors = gl.forward_plan(rows, seqlen_q, seqlen_k, causal, group, head_dim).parts()
        if key_offsets is not None:
            inverse = gl.inverse_plan(key_offsets, key_slots, rows.shape[-1], gl.backward_block_e(group))
            inverse_ints, inverse_tensors = inverse.parts()
            ints, tensors = ints + inverse_ints, tensors + inverse_tensors
        return ints, tensors

    # -- kernels ----------------------------------------------------------------------------------
    # ``stats`` = sink_tokens: (out, lse, row_stats) from the STATS forward kernels; ``entropy``:
    # attention_stats' backward terms [2, B, Hq, Nq] for the ENTROPY backward kernels.
    def forward(self, plan, q, k, v, scale, softcap, alibi_slopes, dropout=None, stats=None):
        with _on_device(q.device):
            return self._forward(plan, q, k, v, scale, softcap, alibi_slopes, dropout, stats)

    def backward(self, plan, grad_out, q, k, v, out, lse, scale, softcap, alibi_slopes, dropout=None, entropy=None):
        with _on_device(q.device):
            return self._backward(plan, grad_out, q, k, v, out, lse, scale, softcap, alibi_slopes, dropout, entropy)

    def _forward(self, plan, q, k, v, scale, softcap, alibi_slopes, dropout=None, stats=None):
        kernels = _kernels()
        if plan.engine == "tile":
            return kernels.tile_forward(q, k, v, plan.schedule, scale, softcap, alibi_slopes, config=plan.config,
                                        dropout=dropout, stats=stats)
        from flashlite.kernels import gather_launch as gl

        forward = gl.ForwardPlan.from_parts(plan.extra_ints[:FORWARD_PARTS], plan.extra[:FORWARD_PARTS])
        return gl.gather_forward(q, k, v, forward, plan.rows.shape[1], plan.causal, scale, softcap, alibi_slopes,
                                 dropout=dropout, stats=stats, row_keep=plan.row_keep)

    def _backward(self, plan, grad_out, q, k, v, out, lse, scale, softcap, alibi_slopes, dropout=None, entropy=None):
        kernels = _kernels()
        if plan.engine == "tile":
            return kernels.tile_backward(grad_out, q, k, v, out, lse, plan.schedule, scale, softcap, alibi_slopes,
                                         config=plan.config, dropout=dropout, entropy=entropy)
        from flashlite.kernels import gather_launch as gl

        forward = gl.ForwardPlan.from_parts(plan.extra_ints[:FORWARD_PARTS], plan.extra[:FORWARD_PARTS])
        inverse = gl.InversePlan.from_parts(plan.extra_ints[FORWARD_PARTS:], plan.extra[FORWARD_PARTS:])
        return gl.gather_backward(grad_out, q, k, v, out, lse, forward, inverse, plan.rows.shape[1], plan.causal,
                                  scale, softcap, alibi_slopes, dropout=dropout, entropy=entropy,
                                  row_keep=plan.row_keep)
