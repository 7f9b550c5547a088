"""The reference as a backend: plain PyTorch (float32 math), differentiable by autograd.

It runs everywhere and serves every pattern, at O(Nq·Nk) memory. The dispatcher calls it
directly (no custom op), so autograd differentiates it as ordinary PyTorch code.
"""
from __future__ import annotations

from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"
    devices = ("cpu", "cuda", "mps", "xpu", "meta")
    deterministic_backward = True
