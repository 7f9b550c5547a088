"""flashlite.nn modules and flashlite.nn.functional.scaled_dot_product_attention.

Modules are checked against the reference by DESIGN.md's rule on every kernel backend that runs
here; the SDPA twin against ``torch.nn.functional.scaled_dot_product_attention`` (float64 =
exact, the inputs' dtype = the baseline of the rule).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flashlite
from flashlite import BlockSparse, Full, SlidingWindow, TopK
from flashlite.nn import (Attention, BlockSparseAttention, FlashAttention, SlidingWindowAttention,
                          TopKAttention)
from flashlite.nn import functional as FL
from flashlite.nn.functional import scaled_dot_product_attention as fl_sdpa

from conftest import DEVICE, DTYPES, assert_rule, kernel_backends, randn

BACKENDS = kernel_backends()


def qkv(B, Hq, Hkv, Nq, Nk, D, dtype=torch.float32):
    return randn(B, Hq, Nq, D, dtype=dtype), randn(B, Hkv, Nk, D, dtype=dtype), randn(B, Hkv, Nk, D, dtype=dtype)


def check_module(module, q, k, v, want_pattern, grads=True, **forward_kw):
    """The module's output and gradients against the reference over ``want_pattern`` (the rule)."""
    leaves = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    out = module(*leaves, **forward_kw)
    exact_leaves = [t.detach().double().requires_grad_(grads) for t in (q, k, v)]
    exact = flashlite.reference.attention(*exact_leaves, want_pattern, compute_dtype=torch.float64)
    low_leaves = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    low = flashlite.reference.attention(*low_leaves, want_pattern, compute_dtype=None)
    assert torch.isfinite(exact).all()
    assert_rule("out", out, low, exact)
    if grads:
        g = torch.randn_like(exact)
        for o, ls in ((out, leaves), (exact, exact_leaves), (low, low_leaves)):
            o.backward(g.to(o.dtype))
        for name, a, b, c in zip(("dq", "dk", "dv"), leaves, low_leaves, exact_leaves):
            assert_rule(name, a.grad, b.grad, c.grad)
    return out


# -- modules ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 2, 2, 37, 37, 64), (2, 4, 2, 19, 45, 40), (1, 2, 1, 1, 50, 128)], ids=str)
def test_flash_attention_module(backend, causal, shape):
    module = FlashAttention(causal=causal, backend=backend)
    check_module(module, *qkv(*shape), Full(causal))
    assert flashlite.last_backend() == backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window,causal,pattern", [(5, True, SlidingWindow(5, 0)), (4, False, SlidingWindow(4, 4)),
                                                   ((6, 2), False, SlidingWindow(6, 2))], ids=str)
def test_sliding_window_module(backend, window, causal, pattern):
    module = SlidingWindowAttention(window, causal=causal, backend=backend)
    check_module(module, *qkv(1, 2, 1, 33, 41, 64), pattern)
    assert flashlite.last_backend() == backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_sparse_module_layout_at_init_and_per_call(backend, dtype):
    bs, Nq, Nk = 16, 40, 50
    layout = torch.rand(1, 2, 3, 4, device=DEVICE) < 0.6
    layout[..., 0] = True
    q, k, v = qkv(1, 2, 2, Nq, Nk, 64, dtype)
    module = BlockSparseAttention(layout, block_size=bs, backend=backend)
    check_module(module, q, k, v, BlockSparse(layout, bs), grads=dtype == torch.float32)
    other = ~layout
    check_module(BlockSparseAttention(block_size=bs, backend=backend), q, k, v, BlockSparse(other, bs),
                 grads=False, layout=other)
    with pytest.raises(ValueError, match="layout"):
        BlockSparseAttention(block_size=bs)(q, k, v)


def test_attention_module_pattern_override_and_lse():
    q, k, v = qkv(2, 2, 2, 9, 14, 32)
    module = Attention(SlidingWindow(2, 1), scale=0.3, softcap=5.0)
    out, lse = module(q, k, v, return_lse=True)
    want, want_lse = flashlite.reference.attention(q, k, v, SlidingWindow(2, 1), scale=0.3, softcap=5.0,
                                                   return_lse=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    indices = torch.randint(-1, 14, (2, 2, 9, 4), device=DEVICE)
    indices = torch.where(indices.sort(-1).values.diff(dim=-1, prepend=indices.new_full((2, 2, 9, 1), -2)) == 0,
                          -1, indices.sort(-1).values)
    check_module(Attention(scale=None), q, k, v, TopK(indices), grads=False, pattern=TopK(indices))
    with pytest.raises(TypeError, match="pattern"):
        Attention("causal")
    assert "SlidingWindow" in repr(module)


def test_topk_module_with_given_indices():
    q, k, v = qkv(1, 4, 2, 12, 30, 64)
    indices = torch.stack([torch.randperm(30, device=DEVICE)[:6] for _ in range(2 * 12)]).view(1, 2, 12, 6)
    module = TopKAttention(causal=True)
    check_module(module, q, k, v, TopK(indices, causal=True), indices=indices)
    shared = torch.tensor([[[0, 3, 7, 29, -1]]], device=DEVICE)
    check_module(TopKAttention(causal=False), q, k, v, TopK(shared), grads=False, indices=shared)
    with pytest.raises(ValueError, match="window"):
        TopKAttention(window=-1)


def test_topk_module_selects_through_flashlite_selection():
    pytest.importorskip("flashlite.selection")
    q, k, v = qkv(1, 2, 2, 16, 16, 32)
    marks = torch.tensor([[5, 9]], device=DEVICE)
    module = TopKAttention(window=3, sinks=1)
    indices = module.select(q, k, marks=marks)
    visible = TopK(indices, causal=True).dense_mask(1, 2, 2, 16, 16, DEVICE)
    pos = torch.arange(16, device=DEVICE)
    want = (pos[None, :] <= pos[:, None]) & ((pos[None, :] == 0) | (pos[None, :] == 5) | (pos[None, :] == 9)
                                             | (pos[None, :] > pos[:, None] - 3))
    assert torch.equal(visible[0, 0], want)
    check_module(module, q, k, v, TopK(indices, causal=True), marks=marks)
    auto = TopKAttention(k=4, sinks=1)
    picked = auto.select(q, k)
    assert bool((picked >= 0).sum(-1).le(4).all())
    check_module(auto, q, k, v, TopK(picked, causal=True), grads=False)


# -- scaled_dot_product_attention ------------------------------------------------------------------------------
def check_sdpa(q, k, v, **kw):
    """Ours vs PyTorch's SDPA by the rule (float64 PyTorch = exact)."""
    def cast(x):
        return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    exact = F.scaled_dot_product_attention(cast(q), cast(k), cast(v), **{n: cast(x) for n, x in kw.items()})
    low = F.scaled_dot_product_attention(q, k, v, **kw)
    got = fl_sdpa(q, k, v, **kw)
    assert torch.isfinite(exact).all()
    assert got.shape == low.shape and got.dtype == low.dtype
    assert_rule("sdpa", got, low, exact)
    return got


@pytest.fixture
def no_dense(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the dense slow path ran")

    monkeypatch.setattr(FL, "dense_attention", boom)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nq,nk", [(17, 17), (9, 23), (23, 9), (1, 30)], ids=str)
def test_sdpa_causal_top_left_alignment(no_dense, dtype, nq, nk):
    """PyTorch's is_causal aligns to the top-left; served by a pattern, never a dense mask."""
    check_sdpa(*qkv(2, 3, 3, nq, nk, 40, dtype), is_causal=True)


@pytest.mark.parametrize("nq,nk", [(9, 23), (23, 9)], ids=str)
def test_sdpa_causal_on_triton(monkeypatch, no_dense, nq, nk):
    monkeypatch.setenv("FLASHLITE_BACKEND", "triton")
    check_sdpa(*qkv(1, 2, 2, nq, nk, 32), is_causal=True)
    assert flashlite.last_backend() == "triton"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sdpa_plain_and_gqa(no_dense, dtype):
    check_sdpa(*qkv(2, 4, 4, 13, 21, 64, dtype))
    check_sdpa(*qkv(2, 6, 2, 13, 21, 64, dtype), enable_gqa=True)
    check_sdpa(*qkv(1, 4, 1, 8, 8, 32, dtype), enable_gqa=True, is_causal=True, scale=0.2)
    with pytest.raises(ValueError, match="enable_gqa"):
        fl_sdpa(*qkv(1, 4, 2, 5, 5, 16, dtype))


@pytest.mark.parametrize("kind", ["bool", "bool_broadcast", "float", "float_inf", "bool_empty_row"])
def test_sdpa_masks(kind):
    q, k, v = qkv(2, 3, 3, 11, 16, 32)
    if kind == "bool":
        mask = torch.rand(2, 3, 11, 16, device=DEVICE) > 0.3
        mask[..., 0] = True
    elif kind == "bool_broadcast":
        mask = torch.rand(11, 16, device=DEVICE) > 0.5
        mask[:, 3] = True
    elif kind == "float":
        mask = randn(2, 1, 11, 16)
    elif kind == "float_inf":
        mask = torch.zeros(1, 3, 11, 16, device=DEVICE)
        mask[..., 5:9] = float("-inf")
    else:
        mask = torch.rand(2, 3, 11, 16, device=DEVICE) > 0.3
        mask[0, 1, 4] = False  # a query with no key: zeros (PyTorch >= 2.5 agrees)
    got = check_sdpa(q, k, v, attn_mask=mask)
    if kind == "bool_empty_row":
        assert bool((got[0, 1, 4] == 0).all())


def test_sdpa_shapes_dropout_and_fallbacks():
    # 3-D inputs (no batch dim), 5-D inputs (two batch dims), value head_dim != key head_dim, float64.
    q, k, v = randn(3, 7, 16), randn(3, 9, 16), randn(3, 9, 16)
    check_sdpa(q, k, v, is_causal=True)
    check_sdpa(randn(2, 2, 3, 5, 16), randn(2, 2, 3, 6, 16), randn(2, 2, 3, 6, 16))
    check_sdpa(randn(1, 2, 5, 16), randn(1, 2, 6, 16), randn(1, 2, 6, 24), is_causal=True)
    q64 = randn(1, 2, 5, 16).double()
    torch.testing.assert_close(fl_sdpa(q64, q64, q64), F.scaled_dot_product_attention(q64, q64, q64))
    with pytest.raises(ValueError, match="is_causal"):
        fl_sdpa(q, k, v, attn_mask=torch.ones(7, 9, dtype=torch.bool), is_causal=True)
    # Dropout: the mean over many draws approaches the dropout-free output.
    q, k, v = qkv(1, 1, 1, 4, 6, 8)
    plain = fl_sdpa(q, k, v)
    draws = torch.stack([fl_sdpa(q, k, v, dropout_p=0.5) for _ in range(400)])
    assert not torch.equal(draws[0], draws[1])
    assert (draws.mean(0) - plain).abs().max() < 0.25
    assert bool((fl_sdpa(q, k, v, dropout_p=1.0) == 0).all())


def test_sdpa_monkeypatch_into_a_model(monkeypatch):
    """Patched in for torch's function, a module using F.scaled_dot_product_attention runs flashlite."""
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True, device=DEVICE).eval()
    x = randn(2, 10, 32)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(10, device=DEVICE)
    with torch.no_grad():
        want, _ = mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    calls = []

    def counting(*a, **kw):
        calls.append(1)
        return fl_sdpa(*a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            got, _ = mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert calls, "torch's MHA did not call the patched function"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_padding_becomes_topk_indices():
    """A key padding mask on a band pattern is served as top-k indices, no dense mask."""
    keep = torch.tensor([[True, False, True, True, False, True], [False, False, True, True, True, True]])
    shared = FL.padded_pattern(Full(causal=True), keep, 4)
    assert isinstance(shared, TopK) and shared.causal and shared.indices.shape == (2, 1, 4)
    window = FL.padded_pattern(SlidingWindow(2, 1), keep, 4)
    for pattern, base in ((shared, Full(causal=True)), (window, SlidingWindow(2, 1))):
        want = base.dense_mask(2, 1, 1, 4, 6, "cpu") & keep[:, None, None, :]
        assert torch.equal(pattern.dense_mask(2, 1, 1, 4, 6, "cpu"), want)
    assert FL.padded_pattern(BlockSparse(torch.ones(1, 1, 1, 1, dtype=torch.bool), 16), keep, 4) is None
