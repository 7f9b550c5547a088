"""Head statistics in the C++ CPU kernels (issue 18): what tests/test_stats.py (every backend that
declares ``stats``, against the float64 oracle) does not reach.

Packed batches through the backend (``dispatch.run(..., stats=)`` with a Packed pattern, against the
reference backend's per-sequence statistics, gradients of out and entropy included), the decode
rows with their split merge, ALiBi, bfloat16 and head_dim 256, every instruction-set build, the
same bits for any thread count, and the binding's checks of the new arguments.
"""
from __future__ import annotations

import pytest
import torch

import flashlite
from flashlite import BlockSparse, Full, SlidingWindow, TopK, dispatch
from flashlite.core.packed import Packed

from test_stats import NAMES, SINK, oracle

pytestmark = pytest.mark.skipif(flashlite.backends().get("cpu") != "available",
                                reason=f"cpu backend: {flashlite.backends().get('cpu')}")


def _ext():
    from flashlite.backend.native import load_extension
    return load_extension()


def _randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _stats_run(q, k, v, pattern, backend, grad_out, grad_entropy, **kw):
    """(out, lse, row_stats, dq, dk, dv) of dispatch.run(stats=SINK) and the backward of
    Σ out·grad_out + Σ entropy·grad_entropy."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    if isinstance(pattern, Packed):
        pattern.validate(q, k)
    scale = kw.pop("scale", q.shape[-1] ** -0.5)
    out, lse, row_stats = dispatch.run(*leaves, pattern, scale=scale, softcap=kw.pop("softcap", 0.0),
                                       alibi_slopes=kw.pop("alibi_slopes", None), backend=backend, stats=SINK)
    ((out.float() * grad_out).sum() + (row_stats[0] * grad_entropy).sum()).backward()
    return (out.detach(), lse.detach(), row_stats.detach()) + tuple(t.grad for t in leaves)


def _packed(pattern, lengths_q, lengths_k):
    cu_q = torch.tensor([0] + torch.tensor(lengths_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lengths_k).cumsum(0).tolist(), dtype=torch.int32)
    return Packed(pattern, cu_q, cu_k)


@pytest.mark.parametrize("pattern_name", ["causal", "window", "block_sparse"])
def test_packed_stats_and_gradients_match_the_reference_backend(pattern_name):
    """Local positions per sequence (mean_distance, sink_mass), empty and one-token sequences, a
    sequence with more queries than keys, tile tails; ALiBi per sequence and softcap."""
    lengths_q, lengths_k = [70, 0, 1, 9, 130, 3], [70, 4, 1, 5, 130, 3]
    if pattern_name == "block_sparse":
        pattern = BlockSparse(torch.rand(len(lengths_q), 4, 3, 3, generator=torch.Generator().manual_seed(3)) > 0.4,
                              64, causal=True)
    else:
        pattern = Full(True) if pattern_name == "causal" else SlidingWindow(20, 4)
    packed = _packed(pattern, lengths_q, lengths_k)
    q = _randn(1, 4, sum(lengths_q), 32)
    k, v = _randn(1, 2, sum(lengths_k), 32, scale=2.0, seed=1), _randn(1, 2, sum(lengths_k), 32, seed=2)
    kw = dict(alibi_slopes=torch.rand(len(lengths_q), 4, generator=torch.Generator().manual_seed(4)), softcap=4.0)
    grad_out, grad_entropy = _randn(*q.shape, seed=5), _randn(1, 4, sum(lengths_q), seed=6)
    got = _stats_run(q, k, v, packed, "cpu", grad_out, grad_entropy, **dict(kw))
    want = _stats_run(q, k, v, packed, "reference", grad_out, grad_entropy, **dict(kw))
    for name, a, b in zip(("out", "lse", "row_stats", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=name)
    assert torch.equal(got[2][4], want[2][4]), "keys is a count"


def test_packed_top_k_stats_fall_back_to_the_reference():
    """The gather kernels see packed key positions: the cpu backend declines statistics there."""
    ind = torch.randint(-1, 5, (12, 1, 3), generator=torch.Generator().manual_seed(0)).int()
    packed = _packed(TopK(ind, causal=False), [7, 5], [5, 5])
    q, k, v = _randn(1, 2, 12, 8), _randn(1, 1, 10, 8, seed=1), _randn(1, 1, 10, 8, seed=2)
    with pytest.raises(Exception, match="packed top-k"):
        dispatch.run(q, k, v, packed, scale=0.3, softcap=0.0, alibi_slopes=None, backend="cpu", stats=SINK)


def _check_against_oracle(q, k, v, pattern, sink_tokens=SINK, **kw):
    """attention_stats on the cpu backend vs the float64 oracle (out, lse, the five statistics and
    the gradients of out and entropy together), at a tolerance for the inputs' dtype."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, stats = flashlite.attention_stats(*leaves, pattern, sink_tokens=sink_tokens, backend="cpu", **kw)
    assert flashlite.last_backend() == "cpu"
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    kw64 = {key: (value.double() if torch.is_tensor(value) else value) for key, value in kw.items()}
    ref_out, ref_lse, ref_stats = oracle(*ref, pattern, torch.float64, sink_tokens=sink_tokens, **kw64)
    tol = dict(atol=2e-5, rtol=2e-5) if q.dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), ref_out.double(), **tol)
    torch.testing.assert_close(stats.lse.double(), ref_lse, atol=1e-4, rtol=1e-5)
    for name in NAMES:
        torch.testing.assert_close(getattr(stats, name).double(), ref_stats[name], atol=1e-4, rtol=1e-4, msg=name)
    grad_out, grad_entropy = _randn(*out.shape, seed=7), _randn(*stats.entropy.shape, seed=8)
    ((out.float() * grad_out).sum() + (stats.entropy * grad_entropy).sum()).backward()
    ((ref_out * grad_out.double()).sum() + (ref_stats["entropy"] * grad_entropy.double()).sum()).backward()
    for got, want, name in zip(leaves, ref, ("dq", "dk", "dv")):
        scale = float(want.grad.abs().max()) + 1.0
        torch.testing.assert_close(got.grad.double() / scale, want.grad / scale, **tol, msg=name)


@pytest.mark.parametrize("case", ["decode_split", "alibi_full", "bf16_window", "head_dim_256", "sinks_past_keys"])
def test_cpu_stats_cases(case):
    kw, sink = {}, SINK
    if case == "decode_split":  # 3 query rows, 1500 keys: decode rows, the keys split in pieces and merged
        q, k, v = _randn(1, 4, 3, 64), _randn(1, 2, 1500, 64, scale=2.0, seed=1), _randn(1, 2, 1500, 64, seed=2)
        pattern = SlidingWindow(1200, 0)
    elif case == "alibi_full":
        q, k, v = _randn(2, 4, 70, 24), _randn(2, 1, 75, 24, scale=2.0, seed=1), _randn(2, 1, 75, 24, seed=2)
        pattern, kw = Full(), dict(alibi_slopes=torch.rand(2, 4), softcap=6.0)
    elif case == "bf16_window":
        q, k, v = (_randn(1, 2, 90, 32, dtype=torch.bfloat16, seed=s) for s in range(3))
        pattern = SlidingWindow(40, 3)
    elif case == "head_dim_256":
        q, k, v = (_randn(1, 2, 40, 256, seed=s) for s in range(3))
        pattern = Full(True)
    else:  # more sink tokens than keys; top-k with a shared list
        q, k, v = _randn(1, 2, 20, 16), _randn(1, 2, 6, 16, seed=1), _randn(1, 2, 6, 16, seed=2)
        pattern, sink = TopK(torch.tensor([[[0, 2, 5, -1]]]), causal=False), 10
    _check_against_oracle(q, k, v, pattern, sink_tokens=sink, **kw)


def test_every_isa_build_gives_the_statistics():
    ext = _ext()
    active = ext.cpu_isa()
    q, k, v = _randn(1, 2, 37, 20), _randn(1, 1, 45, 20, scale=2.0, seed=1), _randn(1, 1, 45, 20, seed=2)
    try:
        for isa in ext.cpu_isas():
            ext.cpu_set_isa(isa)
            _check_against_oracle(q, k, v, Full(True))
            _check_against_oracle(q[:, :, :2], k, v, Full(True))  # decode rows
    finally:
        ext.cpu_set_isa(active)


@pytest.mark.parametrize("case", ["causal", "packed", "decode", "topk"])
def test_same_bits_for_any_thread_count(case):
    """1 and 3 threads: out, lse, statistics and the gradients are the same bits (3 threads move
    the plain backward from whole heads to key tiles + query tiles, the packed one likewise)."""
    kw = {}
    if case == "packed":
        lengths = [300, 5, 7]
        pattern = _packed(Full(True), lengths, lengths)
        q, k, v = _randn(1, 4, 312, 32), _randn(1, 1, 312, 32, seed=1), _randn(1, 1, 312, 32, seed=2)
        kw = dict(alibi_slopes=torch.rand(3, 4), softcap=3.0)
    elif case == "decode":
        q, k, v = _randn(2, 4, 2, 32), _randn(2, 2, 1100, 32, seed=1), _randn(2, 2, 1100, 32, seed=2)
        pattern = Full(True)
    elif case == "topk":
        q, k, v = _randn(1, 4, 40, 16), _randn(1, 2, 50, 16, seed=1), _randn(1, 2, 50, 16, seed=2)
        pattern = TopK(torch.randint(-1, 50, (1, 2, 40, 8), generator=torch.Generator().manual_seed(0)), causal=True)
    else:
        q, k, v = _randn(1, 3, 150, 32), _randn(1, 3, 150, 32, seed=1), _randn(1, 3, 150, 32, seed=2)
        pattern = Full(True)
    grad_out, grad_entropy = _randn(*q.shape, seed=3), _randn(*q.shape[:3], seed=4)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            runs.append(_stats_run(q, k, v, pattern, "cpu", grad_out, grad_entropy, **dict(kw)))
    finally:
        torch.set_num_threads(before)
    for name, a, b in zip(("out", "lse", "row_stats", "dq", "dk", "dv"), *runs):
        assert torch.equal(a, b), f"{name} differs between 1 and 3 threads"


def test_plain_calls_are_unchanged_and_arguments_are_checked():
    """Without stats/entropy the kernels give the bits they gave before (the flags are compile-time
    paths, the plain ones untouched); a stats forward's out and lse are the plain forward's; the
    binding names a malformed row_stats / entropy."""
    q, k, v = _randn(1, 2, 50, 16), _randn(1, 2, 50, 16, seed=1), _randn(1, 2, 50, 16, seed=2)
    plain_out, plain_lse = flashlite.attention(q, k, v, Full(True), backend="cpu", return_lse=True)
    out, stats = flashlite.attention_stats(q, k, v, Full(True), backend="cpu")
    assert torch.equal(out, plain_out) and torch.equal(stats.lse, plain_lse)
    ext = _ext()
    plan = dispatch.plan.plan_for(Full(True), q, k, flashlite.backend.get("cpu"),
                                  dispatch._request(q, Full(True), False, True, False, True))
    s = plan.schedule
    schedule_args = dict(kv_tiles=s.kv_tiles, kv_count=s.kv_count, alibi_slopes=None, is_list=s.is_list,
                         block_m=s.block_m, block_n=s.block_n, window_left=s.window_left,
                         window_right=s.window_right, scale=0.25, softcap=0.0)
    with pytest.raises(ValueError, match="row_stats"):
        ext.cpu_tile_forward(q, k, v, **schedule_args, row_stats=torch.empty(4, 1, 2, 50))
    with pytest.raises(ValueError, match="sink_tokens"):
        ext.cpu_tile_forward(q, k, v, **schedule_args, row_stats=torch.empty(5, 1, 2, 50), sink_tokens=-1)
    out, lse = ext.cpu_tile_forward(q, k, v, **schedule_args)
    with pytest.raises(ValueError, match="entropy"):
        ext.cpu_tile_backward(torch.ones_like(out), q, k, v, out, lse, q_tiles=s.q_tiles, q_count=s.q_count,
                              deterministic=True, entropy=torch.zeros(2, 1, 2, 49), **schedule_args)
    # zero entropy terms: the plain backward's gradients
    args = dict(q_tiles=s.q_tiles, q_count=s.q_count, deterministic=True, **schedule_args)
    grad = _randn(*out.shape, seed=9)
    plain = ext.cpu_tile_backward(grad, q, k, v, out, lse, **args)
    zero = ext.cpu_tile_backward(grad, q, k, v, out, lse, entropy=torch.zeros(2, 1, 2, 50), **args)
    for a, b in zip(plain, zero):
        assert torch.equal(a, b)
