"""The launch paths read nothing back from the device: once a call's plan exists, running its
kernels (forward and backward, every backend, every pattern) performs no host synchronization -
no ``.item()``, ``int()``, ``bool()``, ``.tolist()`` of tensor data, no copy to another device - so
calls are safe under CUDA-graph capture. Checked here on CPU tensors by a dispatch mode that fails
on the aten ops behind those calls (``_local_scalar_dense``, cross-device ``_to_copy``/``copy_``)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flashlite
from flashlite import BlockSparse, Full, SlidingWindow, TopK
from flashlite.backend.base import Request
from flashlite.dispatch.plan import plan_for

from conftest import DEVICE, kernel_backends, randn

SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}


class NoHostSync(TorchDispatchMode):
    """Fails on any op that reads tensor data back to the host or moves it across devices."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCS:
            raise AssertionError(f"host synchronization: {func}")
        if func in (torch.ops.aten._to_copy.default,) and "device" in kwargs and kwargs["device"] is not None:
            source = args[0].device
            if torch.device(kwargs["device"]) != source:
                raise AssertionError(f"copy across devices: {source} -> {kwargs['device']}")
        return func(*args, **kwargs)


def _patterns(B, Hkv, Nq, Nk):
    return {
        "causal": Full(True),
        "window": SlidingWindow(5, 2),
        "block_sparse": BlockSparse(torch.rand(1, 1, 3, 3, device=DEVICE) < 0.6, 16),
        "topk": TopK(torch.randint(-1, Nk, (B, Hkv, Nq, 6), device=DEVICE), causal=True),
        "topk_shared": TopK(torch.randint(-1, Nk, (B, 1, 6), device=DEVICE), causal=True),
    }


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("name", ["causal", "window", "block_sparse", "topk", "topk_shared"])
def test_kernels_run_without_host_sync_once_planned(backend, name):
    B, Hq, Hkv, Nq, Nk, D = 1, 4, 2, 37, 45, 16
    pattern = _patterns(B, Hkv, Nq, Nk)[name]
    q, k, v = randn(B, Hq, Nq, D), randn(B, Hkv, Nk, D), randn(B, Hkv, Nk, D)
    chosen = flashlite.backend.get(backend)
    req = Request(q.device.type, q.dtype, D, pattern.engine, pattern.name, requires_grad=True,
                  block_size=getattr(pattern, "block_size", None))
    plan = plan_for(pattern, q, k, chosen, req)  # planning may read values (validation), once
    slopes = torch.rand(Hq, device=DEVICE)
    with NoHostSync():
        out, lse = chosen.forward(plan, q, k, v, 0.25, 0.0, slopes)
        grads = chosen.backward(plan, torch.ones_like(out), q, k, v, out, lse, 0.25, 0.0, slopes)
    want, want_lse = flashlite.reference.attention(q, k, v, pattern, scale=0.25, alibi_slopes=slopes, return_lse=True)
    assert (out - want).abs().max() < 1e-4 and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("name", ["causal", "window", "block_sparse"])
def test_packed_kernels_run_without_host_sync_once_planned(backend, name):
    """Packed (varlen) tile launches too: the work items and cu_seqlens are read by the kernels, not
    the host."""
    from flashlite.core.packed import Packed

    chosen = flashlite.backend.get(backend)
    if not chosen.packed_tiles:
        pytest.skip(f"{backend}: no packed work items in its tile kernels yet")
    lens_q, lens_k, Hq, Hkv, D = [5, 0, 37, 1], [9, 3, 45, 1], 4, 2, 16
    cu_q, cu_k = (torch.tensor([0] + lens, device=DEVICE).cumsum(0).to(torch.int32) for lens in (lens_q, lens_k))
    inner = _patterns(1, Hkv, 37, 45)[name]
    if name == "block_sparse":
        inner = BlockSparse(torch.rand(len(lens_q), 1, 3, 3, device=DEVICE) < 0.6, 16, causal=True)
    q = randn(sum(lens_q), Hq, D).transpose(0, 1)[None]  # the [1, H, T, D] views varlen_attention passes
    k, v = (randn(sum(lens_k), Hkv, D).transpose(0, 1)[None] for _ in range(2))
    pattern = Packed(inner, cu_q, cu_k)
    pattern.validate(q, k)
    req = Request(q.device.type, q.dtype, D, pattern.engine, pattern.name, requires_grad=True,
                  block_size=pattern.block_size, packed=True)
    plan = plan_for(pattern, q, k, chosen, req)
    slopes = torch.rand(len(lens_q), Hq, device=DEVICE)
    with NoHostSync():
        out, lse = chosen.forward(plan, q, k, v, 0.25, 0.0, slopes)
        grads = chosen.backward(plan, torch.ones_like(out), q, k, v, out, lse, 0.25, 0.0, slopes)
    want = flashlite.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu_q, cu_k,
                                      inner, scale=0.25, alibi_slopes=slopes, backend="reference")
    assert (out[0].transpose(0, 1) - want).abs().max() < 1e-4 and all(torch.isfinite(g).all() for g in grads)


def test_the_detector_catches_a_sync():
    x = torch.ones(3)
    with pytest.raises(AssertionError, match="host synchronization"), NoHostSync():
        int(x.sum())
