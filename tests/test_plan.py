"""The plan: one per call shape, built once and reused; canonical top-k rows (a row is a set) and
the one inverse key index every backend reads; the custom ops' short signatures; the package's
import cost and lazy subpackages."""
from __future__ import annotations

import gc
import subprocess
import sys
import weakref

import pytest
import torch

import flashlite
from flashlite import BlockSparse, Full, SlidingWindow, TopK
from flashlite.backend.base import Request
from flashlite.core.gather_rows import canonical_rows, key_index
from flashlite.dispatch import plan as plans

from conftest import DEVICE, DTYPES, check_against_reference, kernel_backends, randn

BACKENDS = kernel_backends()


def _plan(pattern, q, k, backend="reference", requires_grad=False):
    chosen = flashlite.backend.get(backend)
    req = Request(q.device.type, q.dtype, q.shape[-1], pattern.engine, pattern.name, requires_grad=requires_grad,
                  block_size=getattr(pattern, "block_size", None))
    return plans.plan_for(pattern, q, k, chosen, req)


def test_a_plan_is_built_once_per_pattern_value_and_tensor_version():
    q, k = randn(1, 2, 100, 16), randn(1, 2, 100, 16)
    assert _plan(Full(True), q, k, "triton") is _plan(Full(True), q, k, "triton")  # a new Full each call
    assert _plan(Full(True), q, k, "triton") is not _plan(Full(False), q, k, "triton")
    assert _plan(SlidingWindow(8), q, k, "triton") is not _plan(SlidingWindow(9), q, k, "triton")
    layout = torch.rand(1, 1, 4, 4, device=DEVICE) < 0.5
    first = _plan(BlockSparse(layout, 32), q, k, "triton")
    assert _plan(BlockSparse(layout, 32), q, k, "triton") is first  # same layout tensor, new pattern object
    layout[0, 0, 0, 0] = ~layout[0, 0, 0, 0]  # modified in place: a new version, a new plan
    second = _plan(BlockSparse(layout, 32), q, k, "triton")
    assert second is not first
    assert torch.equal(second.schedule.kv_count.flatten().cpu(),
                       BlockSparse(layout, 32).schedule(100, 100, 32, 32).kv_count.flatten().cpu())
    assert _plan(Full(True), q, randn(1, 2, 101, 16), "triton") is not _plan(Full(True), q, k, "triton")


def test_the_cache_is_bounded_holds_patterns_weakly_and_marks_no_tensor():
    q, k = randn(1, 1, 16, 8), randn(1, 1, 16, 8)
    indices = torch.randint(0, 16, (1, 1, 16, 4), device=DEVICE)
    plan = _plan(TopK(indices), q, k, "triton")
    assert _plan(TopK(indices), q, k, "triton") is plan
    assert not hasattr(indices, "__dict__") or not indices.__dict__  # nothing stuck on the user's tensor
    alive = weakref.ref(indices)
    del indices
    gc.collect()
    assert alive() is None  # the cache did not keep the user's index tensor alive
    for n in range(plans.CACHE_SIZE + 10):
        _plan(SlidingWindow(n), q, k, "triton")
    assert len(plans.CACHE.entries) <= plans.CACHE_SIZE


def test_plan_crosses_the_op_and_comes_back_equal():
    q, k = randn(2, 4, 33, 16), randn(2, 2, 40, 16)
    indices = torch.randint(-1, 40, (2, 2, 33, 5), device=DEVICE)
    for pattern in (Full(True), SlidingWindow(7, 3), BlockSparse(torch.rand(1, 4, 3, 3, device=DEVICE) < 0.6, 16),
                    TopK(indices, causal=True)):
        plan = _plan(pattern, q, k, "triton", requires_grad=True)
        tensors, ints = plan.op_args()
        again = plans.Plan.from_op_args(tensors, ints, q.shape[2], k.shape[2])
        assert again.op_args()[1] == ints and all(a is b for a, b in zip(again.op_args()[0], tensors))
        assert again.backend is plan.backend and again.engine == plan.engine


def test_custom_ops_take_few_parameters():
    """The ops carry the plan as a tensor list and an int list: at most 8 parameters each."""
    for op in (torch.ops.flashlite.attention.default, torch.ops.flashlite.attention_backward.default):
        assert len(op._schema.arguments) <= 8, op._schema


def test_canonical_rows_are_sorted_sets():
    rows = torch.tensor([[[[5, 2, 5, -1, 2, 7], [3, 3, 3, 3, 3, 3]]]])  # [1, 1, Nq=2, K=6], Nk = 8
    got = canonical_rows(rows, 2, 8, causal=False)
    assert got.tolist() == [[[[2, -1, 5, -1, 7, -1], [3, -1, -1, -1, -1, -1]]]]  # repeats -> -1, the rest ascending
    # causal: p(i) = i + 6 -> query 0 sees keys <= 6, so 7 goes
    got = canonical_rows(rows, 2, 8, causal=True)
    assert sorted(got[0, 0, 0].tolist()) == [-1, -1, -1, -1, 2, 5]
    shared = torch.tensor([[[4, 1, 4, -1]]])  # [B, Hi, K]: causal stays a kernel flag
    assert canonical_rows(shared, 3, 8, causal=True).tolist() == [[[1, 4, -1, -1]]]


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_key_index_inverts_the_rows(shared, causal):
    B, Hi, Nq, Nk, K = 2, 3, 11, 13, 5
    shape = (B, Hi, K) if shared else (B, Hi, Nq, K)
    rows = canonical_rows(torch.randint(-1, Nk, shape), Nq, Nk, causal)
    offsets, slots = key_index(rows, Nq, Nk, causal)
    assert offsets.shape == (B * Hi * Nk + 1,) and offsets.dtype == slots.dtype == torch.int64
    expected = {}
    full = rows.unsqueeze(2).expand(B, Hi, Nq, K) if shared else rows
    for b in range(B):
        for h in range(Hi):
            for i in range(Nq):
                for t in range(K):
                    j = int(full[b, h, i, t])
                    if j >= 0 and not (causal and j > i + Nk - Nq):
                        expected.setdefault((b * Hi + h) * Nk + j, []).append(i * K + t)
    for key in range(B * Hi * Nk):
        got = slots[offsets[key]:offsets[key + 1]].tolist()
        assert got == expected.get(key, []), key


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_repeated_keys_count_once_on_every_backend(backend, dtype, causal):
    """The README's own example draws indices with torch.randint, which repeats keys in most rows:
    every backend must count a repeated key once (a row is a set), forward and backward."""
    B, Hq, Hkv, Nq, Nk, D, K = 1, 4, 2, 33, 40, 16, 12
    indices = torch.randint(0, 8, (B, Hkv, Nq, K), device=DEVICE)  # 12 draws of 8 keys: repeats certain
    q, k, v = randn(B, Hq, Nq, D, dtype=dtype), randn(B, Hkv, Nk, D, dtype=dtype), randn(B, Hkv, Nk, D, dtype=dtype)
    out = check_against_reference(q, k, v, TopK(indices, causal), backend)
    unique = torch.stack([torch.stack([torch.cat([r.unique(), r.new_full((K - r.unique().numel(),), -1)])
                                       for r in head]) for head in indices[0]])[None]
    once = flashlite.attention(q, k, v, TopK(unique, causal), backend="reference")
    assert (out.float() - once.float()).abs().max() < 1e-2  # and the reference itself counts once
    twice = flashlite.reference.attention(q.float(), k.float(), v.float(), None,
                                          mask=TopK(unique, causal).dense_mask(B, Hq, Hkv, Nq, Nk, DEVICE))
    assert (once.float() - twice).abs().max() < 1e-2


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_costs_little_over_torch():
    """`import flashlite` stays within 0.3 s of `import torch` (cumulative times from -X importtime):
    no torch._dynamo, no triton, no faces at import (the C++ extension does load: ~0.1 s)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import flashlite"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    cumulative = {}
    for line in result.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            cumulative[parts[2].strip()] = int(parts[1])
    over_torch = (cumulative["flashlite"] - cumulative.get("torch", 0)) / 1e6
    assert over_torch <= 0.3, f"import flashlite costs {over_torch:.2f} s beyond torch"
    loaded = _python("import sys, flashlite; print(' '.join(sorted(sys.modules)))").split()
    for heavy in ("torch._dynamo", "triton", "flashlite.nn", "transformers"):
        assert heavy not in loaded, f"import flashlite loads {heavy}"


def test_subpackages_are_reachable_after_a_bare_import():
    out = _python("import flashlite; print(flashlite.selection.__name__, flashlite.nn.MultiheadAttention.__name__, "
                  "flashlite.SelectiveKVCache.__name__, flashlite.swap.__name__, "
                  "flashlite.integrations.transformers.__name__, flashlite.reference.__name__)")
    assert out.split() == ["flashlite.selection", "MultiheadAttention", "SelectiveKVCache", "swap",
                           "flashlite.integrations.transformers", "flashlite.reference"]


def test_transformers_register_works_after_a_bare_import():
    """The README's wording, exactly: `import flashlite` then `flashlite.integrations.transformers.register()`."""
    pytest.importorskip("transformers")
    out = _python("import flashlite; print(*flashlite.integrations.transformers.register())")
    assert out.split() == ["fl_attention", "fl_topk"]


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("pattern", [Full(True), SlidingWindow(6, 2), "topk"], ids=["causal", "window", "topk"])
def test_backward_on_its_own_matches_autograd(backend, pattern):
    """dispatch.run_backward (the kernels' backward given out and lse, what context parallelism
    calls with merged partial results) gives autograd's gradients, on every backend."""
    from flashlite import dispatch

    B, Hq, Hkv, Nq, Nk, D = 1, 4, 2, 21, 29, 16
    if pattern == "topk":
        pattern = TopK(torch.randint(-1, Nk, (B, Hkv, Nq, 5), device=DEVICE), causal=True)
    q, k, v = (randn(B, h, n, D, requires_grad=True) for h, n in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk)))
    slopes = torch.rand(Hq, device=DEVICE)
    kw = dict(scale=0.3, softcap=5.0, alibi_slopes=slopes)
    out, lse = flashlite.attention(q, k, v, pattern, return_lse=True, backend=backend, **kw)
    grad_out = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v), grad_out)
    got = dispatch.run_backward(grad_out, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), pattern,
                                backend=backend, **kw)
    assert flashlite.last_backend() == backend
    for name, a, b in zip("qkv", got, want):
        assert (a - b).abs().max() < 1e-4, f"d{name}"


def test_auto_selection_routes_cuda_top_k_and_small_blocks_to_triton(monkeypatch):
    """The CUDA backend serves top-k and 16/32 blocks only with SIMT code: auto picks Triton there,
    and names the reason when asked; backend="cuda" still takes it. (Registry-level: no GPU needed.)"""
    from flashlite import backend as registry
    from flashlite.backend.native import CudaBackend

    fake_cuda = CudaBackend.__new__(CudaBackend)
    monkeypatch.setattr(CudaBackend, "available", lambda self: None)
    monkeypatch.setitem(registry._REGISTRY, "cuda", fake_cuda)
    monkeypatch.setattr(registry, "_native_loaded", True)
    topk = Request("cuda", torch.float16, 64, "gather", "topk")
    small = Request("cuda", torch.bfloat16, 64, "tile", "block_sparse", block_size=32)
    dense = Request("cuda", torch.bfloat16, 64, "tile", "causal")
    assert registry.select(topk).name == "triton" and registry.select(small).name == "triton"
    assert registry.select(dense) is fake_cuda
    assert registry.select(topk, "cuda") is fake_cuda
    assert registry.select(Request("cuda", torch.float32, 64, "tile", "block_sparse", block_size=32)) is fake_cuda
