"""The CPU tile kernels on packed (varlen) batches (issue 16): the C++ work items.

tests/test_varlen.py holds every backend to the per-sequence float64 oracle; this file adds what
only the C++ kernels promise: the same bits for any thread count (the backward's whole-sequence
and split passes included), the very bits of ``flashlite.attention`` on each sequence alone, and
the binding's checks of the work items.
"""
from __future__ import annotations

import pytest
import torch

import flashlite
from flashlite import BlockSparse, Full, SlidingWindow
from flashlite import backend as backends
from flashlite.core.packed import Packed, packed_schedule
from flashlite.core.schedule import cdiv


def _packed(pattern, lens_q, lens_k):
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    packed = Packed(pattern, cu_q, cu_k)
    packed.validate(torch.empty(1, 2, sum(lens_q), 8), torch.empty(1, 2, sum(lens_k), 8))
    packed.check_values(sum(lens_k))
    return packed


def _cpu_packed_available():
    if flashlite.backends().get("cpu") != "available" or not backends.get("cpu").packed_tiles:
        pytest.skip("the cpu backend (flashlite._C) with packed work items is not available")


def _grad_of(out):
    return torch.ones_like(out) + torch.arange(out.numel(), dtype=torch.float32).view_as(out).remainder(7).to(out.dtype)


def _cpu_run(q, k, v, cu_q, cu_k, pattern, threads, **kw):
    """(out, lse, dq, dk, dv) of varlen_attention on the cpu backend with ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out, lse = flashlite.varlen_attention(*leaves, cu_q, cu_k, pattern, backend="cpu", return_lse=True, **kw)
        out.backward(_grad_of(out))
        return (out.detach(), lse.detach(), *(t.grad for t in leaves))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("pattern_name", ["causal", "window", "block_sparse"])
@pytest.mark.parametrize("lengths", [
    [300, 5, 7],                      # one sequence dominates: 2 threads split dK/dV and dQ, 1 thread whole sequences
    [65, 64, 1, 130, 0, 17, 128, 3],  # tile tails on both sides of the 64-row tiles, empty and one-token sequences
])
def test_cpu_packed_same_bits_for_any_thread_count(pattern_name, lengths):
    _cpu_packed_available()
    torch.manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), h, 32) for h in (4, 1, 1))
    cu_seq = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    if pattern_name == "block_sparse":
        nb = cdiv(max(lengths), 64)
        pattern = BlockSparse(torch.rand(len(lengths), 4, nb, nb) > 0.3, 64, causal=True)
    else:
        pattern = Full(True) if pattern_name == "causal" else SlidingWindow(70, 5)
    slopes = torch.rand(len(lengths), 4)
    one = _cpu_run(q, k, v, cu_seq, cu_seq, pattern, 1, alibi_slopes=slopes, softcap=3.0)
    two = _cpu_run(q, k, v, cu_seq, cu_seq, pattern, 2, alibi_slopes=slopes, softcap=3.0)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), one, two):
        assert torch.equal(a, b), f"{name} differs between 1 and 2 threads"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_packed_is_each_sequence_alone(dtype):
    """Many sequences (block 64, long ones too): the packed kernels give the very bits of
    flashlite.attention run on each sequence by itself (lengths > 4: no decode path there)."""
    _cpu_packed_available()
    torch.manual_seed(1)
    lengths = [200, 64, 65, 9, 130, 300, 17, 128, 63, 5] * 4
    q, k, v = (torch.randn(sum(lengths), h, 64).to(dtype) for h in (8, 2, 2))
    cu_seq = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    packed = _cpu_run(q, k, v, cu_seq, cu_seq, Full(True), torch.get_num_threads())
    bounds, grad = cu_seq.tolist(), _grad_of(packed[0])
    for s in range(len(lengths)):
        a, b = bounds[s], bounds[s + 1]
        leaves = [t[a:b].transpose(0, 1)[None].detach().clone().requires_grad_(True) for t in (q, k, v)]
        out, lse = flashlite.attention(*leaves, Full(True), backend="cpu", return_lse=True)
        out.backward(grad[a:b].transpose(0, 1)[None])
        alone = [out.detach(), lse.detach()] + [t.grad for t in leaves]
        for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), packed, alone):
            assert torch.equal(got[a:b], want[0].transpose(0, 1)), f"sequence {s}: {name} differs from it alone"


def test_cpu_packed_items_are_checked():
    _cpu_packed_available()
    from flashlite import _C

    q = torch.randn(1, 2, 10, 16)
    cu_seq = torch.tensor([0, 4, 10], dtype=torch.int32)
    sched = packed_schedule(_packed(Full(True), [4, 6], [4, 6]), 10, 10, 64, 64)
    args = dict(kv_tiles=sched.kv_tiles, kv_count=sched.kv_count, alibi_slopes=None, is_list=False, block_m=64,
                block_n=64, window_left=sched.window_left, window_right=sched.window_right, scale=0.25, softcap=0.0)
    _C.cpu_tile_forward(q, q, q, **args, q_items=sched.q_items, cu_seqlens_q=cu_seq, cu_seqlens_k=cu_seq)
    with pytest.raises(ValueError, match="q_items must list"):
        _C.cpu_tile_forward(q, q, q, **args, q_items=sched.q_items.flip(0).contiguous(), cu_seqlens_q=cu_seq,
                            cu_seqlens_k=cu_seq)
    with pytest.raises(ValueError, match="cu_seqlens_k must start at 0"):
        _C.cpu_tile_forward(q, q, q, **args, q_items=sched.q_items, cu_seqlens_q=cu_seq, cu_seqlens_k=cu_seq + 1)
    with pytest.raises(ValueError, match="together"):
        _C.cpu_tile_forward(q, q, q, **args, q_items=sched.q_items)
