"""The reference as a backend: the oracle's plain PyTorch (float32 math), differentiable by autograd.

It runs everywhere and serves every pattern at O(Nq·Nk) memory. Its plan is the pattern itself
(the dense mask); being plain PyTorch it needs no custom op: autograd differentiates it.
"""
from __future__ import annotations

from .. import reference
from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"
    devices = ("cpu", "cuda", "mps", "xpu", "meta")
    engines = ("tile", "gather")
    differentiable = True

    def forward(self, plan, q, k, v, scale, softcap, alibi_slopes):
        return reference.attention(q, k, v, plan.pattern, scale=scale, softcap=softcap or None,
                                   alibi_slopes=alibi_slopes, return_lse=True)

    def backward(self, plan, grad_out, q, k, v, out, lse, scale, softcap, alibi_slopes):
        return reference.attention_backward(grad_out, q, k, v, out, lse, plan.pattern, scale=scale,
                                            softcap=softcap or None, alibi_slopes=alibi_slopes)
