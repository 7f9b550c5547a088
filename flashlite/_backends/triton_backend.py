"""The Triton backend: flashlite.kernels on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
from __future__ import annotations

import os
from typing import Optional

from .base import Backend, Request, TileSizes


def _kernels():
    from flashlite import kernels  # imported lazily: Triton reads TRITON_INTERPRET at decoration

    return kernels


class TritonBackend(Backend):
    name = "triton"
    devices = ("cuda", "cpu")

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
        if req.device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            return "CPU tensors need TRITON_INTERPRET=1 (set before flashlite.kernels is imported)"
        if req.engine == "gather" and not hasattr(_kernels(), "gather_forward"):
            return "no gather (top-k) kernel yet"
        return None

    def tile_config(self, req: Request) -> TileSizes:
        import torch

        config = _kernels().tile_config(req.head_dim, req.dtype, torch.device(req.device_type), req.block_size)
        return TileSizes(config.block_m, config.block_n)

    def _config(self, q, schedule):
        config = _kernels().tile_config(q.shape[-1], q.dtype, q.device)
        return config if (config.block_m, config.block_n) == (schedule.block_m, schedule.block_n) else None

    def tile_forward(self, q, k, v, schedule, scale, softcap, alibi_slopes):
        return _kernels().tile_forward(q, k, v, schedule, scale, softcap, alibi_slopes,
                                       config=self._config(q, schedule))

    def tile_backward(self, grad_out, q, k, v, out, lse, schedule, scale, softcap, alibi_slopes):
        return _kernels().tile_backward(grad_out, q, k, v, out, lse, schedule, scale, softcap, alibi_slopes,
                                        config=self._config(q, schedule))

    def gather_forward(self, q, k, v, indices, causal, scale, softcap, alibi_slopes):
        return _kernels().gather_forward(q, k, v, indices, causal, scale, softcap, alibi_slopes)

    def gather_backward(self, grad_out, q, k, v, out, lse, indices, causal, scale, softcap, alibi_slopes):
        return _kernels().gather_backward(grad_out, q, k, v, out, lse, indices, causal, scale, softcap,
                                          alibi_slopes)
