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
from flashlite.core import masks
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


# -- the mask front (flashlite.core.masks.lower) -------------------------------------------------------------
B_, HQ, HKV = 2, 4, 2


def _band(pattern, nq, nk):
    return pattern.dense_mask(B_, HQ, HKV, nq, nk, DEVICE).expand(B_, HQ, nq, nk)


def _tril(nq, nk):
    return torch.ones(nq, nk, dtype=torch.bool, device=DEVICE).tril()


def _left_padding(nk):
    keep = torch.ones(B_, nk, dtype=torch.bool, device=DEVICE)
    keep[1, :3] = False  # left padding
    keep[0, nk - 2] = False  # a hole
    return keep


def _topk_indices(nq, nk, width=5):
    return torch.stack([torch.randperm(nk, device=DEVICE)[:width] for _ in range(B_ * HKV * nq)]).view(B_, HKV, nq, width)


def mask_form(form, nq, nk):
    """-> (kwargs for lower, expected keep [B, Hq, Nq, Nk], expected bias or None, runs on the kernels?)."""
    full = torch.ones(B_, HQ, nq, nk, dtype=torch.bool, device=DEVICE)
    if form == "none":
        return {}, full, None, True
    if form == "bool":  # arbitrary, per batch and head
        mask = torch.rand(B_, HQ, nq, nk, device=DEVICE) > 0.4
        mask[..., 0] = True
        return {"attn_mask": mask}, mask, None, False
    if form == "bool_broadcast":  # [Nq, Nk]
        mask = torch.rand(nq, nk, device=DEVICE) > 0.4
        return {"attn_mask": mask}, full & mask, None, False
    if form == "bool_empty_rows":  # some queries see no key: zeros
        mask = torch.rand(B_, HQ, nq, nk, device=DEVICE) > 0.4
        mask[0, 1, 2] = False
        mask[1, :, 0] = False
        return {"attn_mask": mask}, mask, None, False
    if form == "bool_keys":  # [B, 1, 1, Nk]: key padding in disguise -> top-k indices
        keep = _left_padding(nk)
        return {"attn_mask": keep[:, None, None, :]}, full & keep[:, None, None, :], None, True
    if form == "bool_keys_shared":  # [Nk]
        keep = torch.rand(nk, device=DEVICE) > 0.3
        keep[1] = True
        return {"attn_mask": keep}, full & keep, None, True
    if form == "float":
        bias = randn(B_, 1, nq, nk)
        return {"attn_mask": bias}, full, bias.expand(B_, HQ, nq, nk), False
    if form == "float_inf":  # only 0 / -inf: a keep-mask
        mask = torch.zeros(1, HQ, nq, nk, device=DEVICE)
        mask[..., 1:nk // 2] = float("-inf")
        return {"attn_mask": mask}, full & (mask == 0), None, False
    if form == "float_inf_keys":  # only 0 / -inf along the keys: key padding
        keep = _left_padding(nk)
        mask = torch.zeros(B_, 1, 1, nk, device=DEVICE).masked_fill(~keep[:, None, None, :], float("-inf"))
        return {"attn_mask": mask}, full & keep[:, None, None, :], None, True
    if form == "float_zero_grad":  # a learned bias that happens to be 0: stays a bias (it needs a gradient)
        bias = torch.zeros(1, 1, nq, nk, device=DEVICE, requires_grad=True)
        return {"attn_mask": bias}, full, bias.expand(B_, HQ, nq, nk), False
    if form == "key_padding":
        keep = _left_padding(nk)
        return {"key_padding_mask": keep}, full & keep[:, None, None, :], None, True
    if form == "key_padding_float":  # -inf and a soft penalty: a bias
        kpm = torch.zeros(B_, nk, device=DEVICE)
        kpm[0, -2:] = float("-inf")
        kpm[1, 1] = -1.5
        return {"key_padding_mask": kpm}, full, kpm[:, None, None, :].expand(B_, HQ, nq, nk), False
    if form == "masked_convention":  # nn.MultiheadAttention: bool True = hidden
        hidden = torch.rand(nq, nk, device=DEVICE) < 0.3
        hidden[:, 0] = False
        pad = ~_left_padding(nk)
        return ({"attn_mask": hidden, "key_padding_mask": pad, "true_means": "masked"},
                full & ~hidden & ~pad[:, None, None, :], None, False)
    if form == "masked_key_padding":
        pad = ~_left_padding(nk)
        return {"key_padding_mask": pad, "true_means": "masked"}, full & ~pad[:, None, None, :], None, True
    if form == "is_causal":  # top-left, any Nq / Nk
        return {"is_causal": True}, full & _tril(nq, nk), None, True
    if form == "causal_bool_mask":  # recognised: the causal schedule, no mask
        return {"attn_mask": _tril(nq, nk)}, full & _tril(nq, nk), None, True
    if form == "causal_float_mask":
        mask = torch.zeros(nq, nk, device=DEVICE).masked_fill(~_tril(nq, nk), float("-inf"))
        return {"attn_mask": mask}, full & _tril(nq, nk), None, True
    if form == "causal_padding":
        keep = _left_padding(nk)
        return ({"is_causal": True, "key_padding_mask": keep}, full & _tril(nq, nk) & keep[:, None, None, :],
                None, True)
    if form == "causal_and_bias":
        bias = randn(1, HQ, nq, nk)
        return {"is_causal": True, "attn_bias": bias}, full & _tril(nq, nk), bias.expand(B_, HQ, nq, nk), False
    if form == "window_padding":
        keep, window = _left_padding(nk), SlidingWindow(2, 1)
        return {"pattern": window, "key_padding_mask": keep}, _band(window, nq, nk) & keep[:, None, None, :], None, True
    if form == "window_is_causal":  # pattern ∩ top-left causal: a pattern when Nq == Nk, else a mask
        window = SlidingWindow(3, 2)
        return {"pattern": window, "is_causal": True}, _band(window, nq, nk) & _tril(nq, nk), None, nq == nk
    if form == "topk_padding":
        pattern, keep = TopK(_topk_indices(nq, nk), causal=True), _left_padding(nk)
        return {"pattern": pattern, "key_padding_mask": keep}, _band(pattern, nq, nk) & keep[:, None, None, :], None, True
    if form == "block_sparse_padding":  # no index form: the padding joins a dense mask
        layout = torch.rand(1, 1, -(-nq // 16), -(-nk // 16), device=DEVICE) < 0.7
        layout[..., 0] = True
        pattern, keep = BlockSparse(layout, 16), _left_padding(nk)
        return ({"pattern": pattern, "key_padding_mask": keep}, _band(pattern, nq, nk) & keep[:, None, None, :],
                None, False)
    raise AssertionError(form)


FORMS = ["none", "bool", "bool_broadcast", "bool_empty_rows", "bool_keys", "bool_keys_shared", "float", "float_inf",
         "float_inf_keys", "float_zero_grad", "key_padding", "key_padding_float", "masked_convention",
         "masked_key_padding", "is_causal", "causal_bool_mask", "causal_float_mask", "causal_padding",
         "causal_and_bias", "window_padding", "window_is_causal", "topk_padding", "block_sparse_padding"]


def visible_of(lowered, nq, nk):
    """What a lowered call attends: the pattern over the first ``keys`` keys & the dense mask."""
    pattern, mask, bias, keys = lowered
    seen = torch.zeros(B_, HQ, nq, nk, dtype=torch.bool, device=DEVICE)
    seen[..., :keys] = pattern.dense_mask(B_, HQ, HKV, nq, keys, DEVICE)
    if mask is not None:
        seen[..., :keys] &= mask
    return seen


@pytest.mark.parametrize("nq,nk", [(7, 7), (5, 11), (11, 6)], ids=str)
@pytest.mark.parametrize("form", FORMS)
def test_mask_front_lowers_every_form(form, nq, nk):
    """Every mask form: the lowered call attends exactly the expected keys (pattern & what is left
    dense), forms with a pattern equivalent take no dense mask, and the output and gradients match
    PyTorch's SDPA with the explicit mask (float64 = exact) by the rule."""
    if form == "window_is_causal" and nq > nk:
        pytest.skip("the window's band is empty for the first queries: SDPA's NaN rows")
    kwargs, want_keep, want_bias, on_kernels = mask_form(form, nq, nk)
    q, k, v = qkv(B_, HQ, HKV, nq, nk, 16)
    lowered = masks.lower(q, k, **kwargs)
    assert torch.equal(visible_of(lowered, nq, nk), want_keep), form
    assert lowered.dense != on_kernels, f"{form}: {'a dense mask is left' if lowered.dense else 'no dense mask'}"
    if want_bias is None:
        assert lowered.bias is None
    else:
        assert torch.equal(lowered.bias.expand(B_, HQ, nq, lowered.keys), want_bias[..., :lowered.keys])

    # Numbers: ours (through serve) against SDPA with the explicit mask.
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, _ = FL.serve(*leaves, lowered)
    explicit = want_keep if want_bias is None else want_bias.detach().masked_fill(~want_keep, float("-inf"))
    results = {}
    for name, dtype in (("exact", torch.float64), ("low", torch.float32)):
        ls = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        m = explicit if explicit.dtype == torch.bool else explicit.to(dtype)
        results[name] = (F.scaled_dot_product_attention(*ls, attn_mask=m, enable_gqa=True), ls)
    (exact, exact_ls), (low, low_ls) = results["exact"], results["low"]
    assert torch.isfinite(exact).all()
    assert_rule("out", out, low, exact)
    g = torch.randn_like(exact)
    for o in (out, exact, low):
        o.backward(g.to(o.dtype))
    for name, a, b, c in zip(("dq", "dk", "dv"), leaves, low_ls, exact_ls):
        assert_rule(name, a.grad, b.grad, c.grad)
    if form == "bool_empty_rows":
        assert bool((out[0, 1, 2] == 0).all()) and bool((out[1, :, 0] == 0).all())


def test_mask_front_gives_bias_gradients():
    """A float mask that needs a gradient stays a bias, and receives SDPA's gradient."""
    q, k, v = qkv(1, 2, 2, 6, 9, 16)
    bias = torch.zeros(1, 2, 6, 9, device=DEVICE, requires_grad=True)
    out = fl_sdpa(q, k, v, attn_mask=bias)
    bias64 = bias.detach().double().requires_grad_(True)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=bias64)
    g = torch.randn_like(want)
    out.backward(g.float())
    want.backward(g)
    torch.testing.assert_close(bias.grad, bias64.grad.float(), atol=1e-5, rtol=1e-4)


def test_mask_front_shapes_and_errors():
    q, k = randn(2, 2, 5, 8), randn(2, 2, 9, 8)
    low = masks.lower(q, k)
    assert low == (masks.FULL, None, None, 9)
    # top-left causal: Nq <= Nk slices the keys no query sees; Nq > Nk is a shifted band
    assert masks.lower(q, k, is_causal=True)[::3] == (masks.CAUSAL, 5)
    band = masks.lower(k, q, is_causal=True).pattern
    assert isinstance(band, SlidingWindow) and (band.left, band.right) == (5, 4)
    # the slow path keeps every key column (attention weights are [.., Nq, Nk])
    dense = masks.lower(q, k, is_causal=True, dense=True)
    assert dense.keys == 9 and torch.equal(dense.mask[0, 0], _tril(5, 9))
    # key padding: top-k of the most kept keys (eager); nothing padded: the pattern itself
    keep = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    assert masks.lower(q, k, key_padding_mask=keep).pattern is masks.FULL
    keep[0, :4] = False
    keep[1, 7] = False
    padded = masks.lower(q, k, key_padding_mask=keep).pattern
    assert isinstance(padded, TopK) and padded.indices.shape == (2, 1, 8)
    with pytest.raises(ValueError, match="key_padding_mask"):
        masks.lower(q, k, key_padding_mask=keep[:, :5])
    with pytest.raises(TypeError, match="attn_mask"):
        masks.lower(q, k, attn_mask=torch.ones(5, 9, dtype=torch.int64))
    with pytest.raises(ValueError, match="true_means"):
        masks.lower(q, k, true_means="keep")


def test_mask_front_reads_no_values_while_tracing(monkeypatch):
    """Tracing: key padding becomes top-k of fixed width Nk (nothing read from the mask, even when
    nothing is padded), float masks stay biases, causal masks stay masks - all exact."""
    monkeypatch.setattr(masks, "values_readable", lambda t: False)
    q, k, v = qkv(2, 4, 2, 6, 10, 16)
    keep = _left_padding(10)
    for pattern in (None, Full(causal=True), SlidingWindow(3, 0)):
        for kpm in (keep, torch.ones_like(keep)):
            low = masks.lower(q, k, pattern=pattern, key_padding_mask=kpm)
            assert isinstance(low.pattern, TopK) and not low.dense
            base = Full() if pattern is None else pattern
            if pattern is None or isinstance(pattern, Full):
                assert low.pattern.indices.shape == (2, 1, 10)
            want = base.dense_mask(2, 4, 2, 6, 10, DEVICE) & kpm[:, None, None, :]
            assert torch.equal(low.pattern.dense_mask(2, 4, 2, 6, 10, DEVICE).expand(2, 4, 6, 10), want.expand(2, 4, 6, 10))
            torch.testing.assert_close(FL.serve(q, k, v, low)[0],
                                       flashlite.reference.attention(q, k, v, base, mask=kpm[:, None, None, :]),
                                       atol=1e-5, rtol=1e-5)
    inf_mask = torch.zeros(6, 10, device=DEVICE).masked_fill(~_tril(6, 10), float("-inf"))
    assert masks.lower(q, k, attn_mask=inf_mask).bias is inf_mask
    assert masks.lower(q, k, attn_mask=_tril(6, 10)).mask is not None


# -- the slow path ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=str)
def test_dropout_without_weights_equals_dropped_probabilities(heads):
    """The slow path's dropout (two reference calls, ``out_m·exp(lse_m − lse)/(1 − p)``) equals the
    dropped-out probabilities applied to v, for the same draw - output and gradients."""
    hq, hkv = heads
    p = 0.3
    q, k, v = qkv(2, hq, hkv, 7, 9, 16)
    keep = torch.rand(2, 1, 7, 9, device=DEVICE) > 0.2
    keep[0, 0, 3] = False  # a row with no key
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    torch.manual_seed(5)
    out, weights = FL.dense_attention(*leaves, keep=keep, dropout_p=p, scale=0.4)
    assert weights is None
    torch.manual_seed(5)
    kept = FL._dropped_keys((2, hq, 7, 9), p, DEVICE)
    ls = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    kr, vr = (t.repeat_interleave(hq // hkv, 1) for t in ls[1:])
    scores = (ls[0] @ kr.transpose(-1, -2) * 0.4).masked_fill(~keep, float("-inf"))
    probs = torch.nan_to_num(scores.softmax(-1))
    want = (probs * kept / (1 - p)) @ vr
    assert bool((out[0, :, 3] == 0).all())
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(want)
    out.backward(g.float())
    want.backward(g)
    for a, b in zip(leaves, ls):
        assert torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-4, rtol=1e-4)
    assert bool((FL.dense_attention(q, k, v, dropout_p=1.0)[0] == 0).all())


def test_weights_from_the_reference():
    """need_weights: the reference's probabilities (pattern & mask & bias), and out = weights @ v."""
    q, k, v = qkv(2, 2, 2, 5, 8, 16)
    keep = torch.rand(2, 2, 5, 8, device=DEVICE) > 0.3
    bias = randn(1, 2, 5, 8)
    out, weights = FL.dense_attention(q, k, v, Full(causal=True), keep=keep, bias=bias, softcap=3.0, need_weights=True)
    scores = q.double() @ k.double().transpose(-1, -2) / 4.0
    scores = 3.0 * torch.tanh(scores / 3.0) + bias.double()
    visible = keep & Full(causal=True).dense_mask(2, 2, 2, 5, 8, DEVICE)
    want = torch.nan_to_num(scores.masked_fill(~visible, float("-inf")).softmax(-1))
    torch.testing.assert_close(weights.double(), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, weights @ v, atol=1e-5, rtol=1e-5)
    ref = flashlite.reference.attention(q, k, v, Full(causal=True), mask=keep, attn_bias=bias, softcap=3.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
