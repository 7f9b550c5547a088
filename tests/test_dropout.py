"""Attention dropout (issue 16, item 2): the counter-based mask and its semantics.

The stream is Philox4x32-10 (flashlite.core.dropout): checked against the published known answer
and, element for element, against Triton's own ``tl.randint`` (the kernels' generator). Then the
semantics on the backends that serve dropout (the reference so far): the same seed gives the same
output, the mean over seeds is the undropped output, the dropped share is p, the backward's
formula equals autograd (float64) and finite differences.
"""
from __future__ import annotations

import math

import pytest
import torch

import flashlite
from flashlite import Full, SlidingWindow, TopK, reference
from flashlite.core import dropout as fd

from conftest import DEVICE, randn


def test_philox_known_answer():
    # Random123's known answer for philox4x32-10 at counter 0, key 0 (word 0).
    assert int(fd.philox_words(0, torch.tensor([0]))) == 0x6627E8D5


def test_philox_matches_triton_randint():
    import triton
    import triton.language as tl

    @triton.jit
    def words(out_ptr, seed, base, N: tl.constexpr):
        index = base + tl.arange(0, N).to(tl.int64)
        tl.store(out_ptr + tl.arange(0, N), tl.randint(seed, index).to(tl.int64) & 0xFFFFFFFF)

    if DEVICE.type == "cpu":
        import os
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton needs its interpreter for CPU tensors")
    for seed in (0, 12345, 2 ** 40 + 7, 2 ** 62 - 1):
        base = 2 ** 33 + 5  # counters past 2^32 use the second counter word
        got = torch.empty(64, dtype=torch.int64, device=DEVICE)
        words[(1,)](got, seed, base, 64)
        assert torch.equal(got.cpu(), fd.philox_words(seed, torch.arange(base, base + 64)))


def test_keep_mask_blocks_and_rate():
    full = fd.keep_mask(7, 0.3, (2, 3, 40, 50))
    block = fd.keep_mask(7, 0.3, (2, 3, 40, 50), rows=(5, 17), cols=(20, 50))
    assert torch.equal(block, full[:, :, 5:17, 20:50])
    dropped = 1 - full.float().mean().item()
    sigma = math.sqrt(0.3 * 0.7 / full.numel())
    assert abs(dropped - 0.3) < 5 * sigma
    assert fd.threshold(0.0) == 0 and fd.threshold(0.5) == 2 ** 31


def _generator(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("pattern", [Full(False), Full(True), SlidingWindow(5, 2)], ids=repr)
def test_same_seed_same_output_and_grads(pattern):
    q, k, v = (randn(2, 4, 33, 16, requires_grad=True) for _ in range(3))
    outs = []
    for _ in range(2):
        out = flashlite.attention(q, k, v, pattern, dropout_p=0.4, generator=_generator(3))
        dq, = torch.autograd.grad(out.sum(), q)
        outs.append((out, dq))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    other = flashlite.attention(q, k, v, pattern, dropout_p=0.4, generator=_generator(4))
    assert not torch.equal(other, outs[0][0])
    plain = flashlite.attention(q, k, v, pattern)
    assert not torch.equal(plain, outs[0][0])


def test_mean_over_seeds_is_the_undropped_output():
    q, k, v = (randn(1, 2, 12, 8) for _ in range(3))
    p, runs = 0.25, 300
    plain = flashlite.attention(q, k, v, Full(True))
    g = _generator(11)
    draws = torch.stack([flashlite.attention(q, k, v, Full(True), dropout_p=p, generator=g) for _ in range(runs)])
    # each output element is a sum of kept, scaled terms: its spread over seeds bounds the mean's error
    stderr = draws.std(0) / math.sqrt(runs)
    assert bool(((draws.mean(0) - plain).abs() <= 5 * stderr + 1e-6).all())


def test_backward_formula_equals_autograd_float64():
    """reference.attention_backward (the formula the kernels implement) = autograd of the dropped forward."""
    q, k, v = (randn(2, 4, 21, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    k2, v2 = k[:, :2].detach().requires_grad_(), v[:, :2].detach().requires_grad_()  # GQA
    for kk, vv in ((k, v), (k2, v2)):
        kw = dict(dropout_p=0.3, dropout_seed=99, compute_dtype=torch.float64, softcap=3.0)
        out, lse = reference.attention(q, kk, vv, Full(True), return_lse=True, **kw)
        grad_out = torch.randn_like(out)
        want = torch.autograd.grad(out, (q, kk, vv), grad_out)
        got = reference.attention_backward(grad_out, q, kk, vv, out.detach(), lse, Full(True), **kw)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)  # lse is float32


def test_gradient_matches_finite_differences():
    q, k, v = (randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return reference.attention(q, k, v, Full(True), dropout_p=0.3, dropout_seed=5, compute_dtype=torch.float64)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_api_gradients_are_the_formula():
    q, k, v = (randn(2, 4, 17, 8, requires_grad=True) for _ in range(3))
    g = _generator(21)
    seed = fd.draw_seed(_generator(21))
    out, lse = flashlite.attention(q, k, v, Full(True), dropout_p=0.2, generator=g, return_lse=True)
    want_out = reference.attention(q, k, v, Full(True), dropout_p=0.2, dropout_seed=seed)
    torch.testing.assert_close(out, want_out)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want = reference.attention_backward(grad_out, q, k, v, out.detach(), lse, Full(True), dropout_p=0.2,
                                        dropout_seed=seed)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_varlen_dropout_is_the_packed_matrix_mask():
    """A packed batch's mask indexes the [1, Hq, Tq, Tk] matrix: the same numbers as one attention()
    call over the block-diagonal pattern of the same matrix."""
    lens = [7, 0, 12]
    cu = torch.tensor([0, 7, 7, 19], dtype=torch.int32, device=DEVICE)
    q, k, v = (randn(19, 2, 8) for _ in range(3))
    got = flashlite.varlen_attention(q, k, v, cu, cu, Full(True), dropout_p=0.3, generator=_generator(8))
    seed = fd.draw_seed(_generator(8))
    view = [t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)]
    block_diagonal = torch.zeros(19, 19, dtype=torch.bool, device=DEVICE)
    start = 0
    for n in lens:
        block_diagonal[start:start + n, start:start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        start += n
    want = reference.attention(*view, mask=block_diagonal, dropout_p=0.3, dropout_seed=seed)
    torch.testing.assert_close(got, want[0].transpose(0, 1), rtol=1e-5, atol=1e-6)


def test_dropout_routes_to_a_backend_that_has_it():
    q, k, v = (randn(1, 2, 8, 8) for _ in range(3))
    flashlite.attention(q, k, v, dropout_p=0.1)
    assert flashlite.last_backend() == "reference"
    if "cpu" in flashlite.backends() and flashlite.backends()["cpu"] == "available":
        with pytest.raises(ValueError, match="no attention dropout in its kernels yet"):
            flashlite.attention(q, k, v, dropout_p=0.1, backend="cpu")
    flashlite.attention(q, k, v, TopK(torch.zeros(1, 2, 8, 1, dtype=torch.long)), dropout_p=0.1)


@pytest.mark.parametrize("bad, error, words", [
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p must be"),
    (dict(dropout_p=True), ValueError, "dropout_p must be"),
    (dict(dropout_p=0.1, generator=3), TypeError, "generator must be a torch.Generator"),
])
def test_bad_dropout_arguments(bad, error, words):
    q, k, v = (randn(1, 2, 8, 8) for _ in range(3))
    with pytest.raises(error, match=words):
        flashlite.attention(q, k, v, **bad)
