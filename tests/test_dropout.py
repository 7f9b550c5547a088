"""Attention dropout (issue 16, item 2): the counter-based mask and its semantics.

The stream is Philox4x32-10 (flashlite.core.dropout): checked against the published known answer
and, element for element, against Triton's own ``tl.randint`` (the kernels' generator). Then the
semantics on the backends that serve dropout (the reference, the cpu backend's C++ kernels, the
Triton kernels): the same seed gives the same output, the mean over seeds is the undropped output,
the dropped share is p, the backward's formula equals autograd (float64) and finite differences.
"""
from __future__ import annotations

import math

import pytest
import torch

import flashlite
from flashlite import Full, SlidingWindow, TopK, reference
from flashlite.core import dropout as fd

from conftest import DEVICE, FULL_TESTS, randn, sample_interpreter


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
    """CPU tensors: the cpu backend's kernels (when built), else the reference; CUDA tensors: the
    cuda backend's kernels if it declares dropout, else Triton's. A backend without it, asked by
    name, says so."""
    from flashlite import backend as backends

    q, k, v = (randn(1, 2, 8, 8) for _ in range(3))
    flashlite.attention(q, k, v, dropout_p=0.1)
    available = {name for name, state in flashlite.backends().items() if state == "available"}
    if DEVICE.type == "cuda":
        assert flashlite.last_backend() == ("cuda" if "cuda" in available and backends.get("cuda").dropout
                                            else "triton")
    else:
        assert flashlite.last_backend() == ("cpu" if "cpu" in available else "reference")
    for name, state in flashlite.backends().items():
        if state == "available" and DEVICE.type in backends.get(name).devices and not backends.get(name).dropout:
            with pytest.raises(ValueError, match="no attention dropout in its kernels yet"):
                flashlite.attention(q, k, v, dropout_p=0.1, backend=name)
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


# =============================================================================================
# The cpu backend: dropout inside the C++ kernels (csrc/cpu/philox.h; tile engine forward, decode
# rows, both backward passes, whole heads, packed batches; gather engine). The kernels must draw
# the reference's mask: out, lse and the three gradients are checked against
# reference.attention(..., dropout_seed=draw_seed(the same generator state)) by the correctness
# rule (float64 truth, the inputs' dtype as baseline) - one element dropped or kept wrongly is an
# error of the order of the output itself, far past the rule's bound.
# =============================================================================================
import importlib  # noqa: E402

from flashlite import BlockSparse  # noqa: E402

from conftest import assert_rule  # noqa: E402

_CPU = flashlite.backends().get("cpu") == "available"
needs_cpu = pytest.mark.skipif(not _CPU, reason=f"cpu backend: {flashlite.backends().get('cpu')}")


def _cpu_randn(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen).to(dtype)


def _cpu_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (_cpu_randn(B, Hq, Nq, D, dtype=dtype, gen=g), _cpu_randn(B, Hkv, Nk, D, dtype=dtype, gen=g),
            _cpu_randn(B, Hkv, Nk, D, dtype=dtype, gen=g))


def _cpu_dropout_run(q, k, v, pattern, p, gen_seed, grad_out, **kw):
    """flashlite on the cpu backend: (out, lse, dq, dk, dv)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = flashlite.attention(*leaves, pattern, backend="cpu", return_lse=True, dropout_p=p,
                                   generator=_generator(gen_seed), **kw)
    assert flashlite.last_backend() == "cpu"
    grads = torch.autograd.grad(out, leaves, grad_out)
    return (out.detach(), lse.detach()) + tuple(grads)


def _reference_run(q, k, v, pattern, p, seed, grad_out, compute, **kw):
    leaves = [t.detach().clone().to(compute if compute is not None else t.dtype).requires_grad_() for t in (q, k, v)]
    out, lse = reference.attention(*leaves, pattern, return_lse=True, compute_dtype=compute, dropout_p=p,
                                   dropout_seed=seed, **kw)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return (out.detach(), lse.detach()) + tuple(grads)


def _check_cpu_dropout(q, k, v, pattern, p=0.3, gen_seed=5, **kw):
    """The correctness rule for out, lse, dq, dk, dv of the cpu backend with dropout."""
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=torch.Generator().manual_seed(99)).to(q.dtype)
    got = _cpu_dropout_run(q, k, v, pattern, p, gen_seed, grad_out, **kw)
    seed = fd.draw_seed(_generator(gen_seed))
    exact = _reference_run(q, k, v, pattern, p, seed, grad_out, torch.float64, **kw)
    lowp = _reference_run(q, k, v, pattern, p, seed, grad_out, None, **kw)
    f32 = _reference_run(q, k, v, pattern, p, seed, grad_out, torch.float32, **kw)
    for name, g, lo, ex, fb in zip(("out", "lse", "dq", "dk", "dv"), got, lowp, exact, f32):
        assert_rule(name, g, lo, ex, fallback=fb)
    # Not the undropped result: dropout really ran.
    plain = flashlite.attention(q, k, v, pattern, backend="cpu", **kw)
    assert not torch.equal(plain, got[0])
    return got


def _topk(B, H, Nq, Nk, K, shared=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, H, K) if shared else (B, H, Nq, K)
    return torch.randint(-1, Nk, shape, generator=g)  # -1 slots and repeats included


_LAYOUT = (torch.rand(1, 4, 5, 6, generator=torch.Generator().manual_seed(3)) < 0.6)
_LAYOUT[..., 0] = True

_CPU_PATTERNS = {
    "full": lambda: Full(False),
    "causal": lambda: Full(True),
    "window": lambda: SlidingWindow(23, 4),
    "block_sparse": lambda: BlockSparse(_LAYOUT, 32),
    "topk": lambda: TopK(_topk(2, 2, 150, 170, 24)),
    "topk_causal": lambda: TopK(_topk(2, 2, 150, 170, 24, seed=1), causal=True),
    "topk_shared": lambda: TopK(_topk(2, 2, 150, 170, 24, shared=True, seed=2)),
}


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(_CPU_PATTERNS))
def test_cpu_kernels_draw_the_reference_mask(name, dtype):
    """out, lse and the gradients of the cpu backend = the reference's with the same seed (GQA 4:2)."""
    Nq, Nk = (150, 170) if name != "block_sparse" else (160, 192)
    seed = list(_CPU_PATTERNS).index(name)
    q, k, v = _cpu_qkv(2 if name != "block_sparse" else 1, 4, 2, Nq, Nk, 40, dtype, seed=seed)
    _check_cpu_dropout(q, k, v, _CPU_PATTERNS[name](), softcap=(8.0 if name == "window" else None))


@needs_cpu
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_dropout_both_backward_paths(threads):
    """B·Hkv = 1: with 1 thread the backward runs whole heads, with 2 key tiles then query tiles."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v = _cpu_qkv(1, 3, 1, 140, 200, 32, torch.float32, seed=4)
        _check_cpu_dropout(q, k, v, Full(True), p=0.2)
        _check_cpu_dropout(q, k, v, TopK(_topk(1, 1, 140, 200, 16, seed=5), causal=True), p=0.2)
    finally:
        torch.set_num_threads(old)


@needs_cpu
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_cpu_dropout_decode_rows(rows):
    """Nq <= 4 runs the decode kernel (keys along the lanes; 1100 keys: split in two and merged)."""
    q, k, v = _cpu_qkv(2, 4, 2, rows, 1100, 64, torch.float32, seed=rows)
    _check_cpu_dropout(q, k, v, Full(True), p=0.25)
    q, k, v = _cpu_qkv(1, 2, 2, rows, 77, 24, torch.bfloat16, seed=rows)
    _check_cpu_dropout(q, k, v, SlidingWindow(30, 0), p=0.25)


@needs_cpu
@pytest.mark.parametrize("pattern", [Full(True), SlidingWindow(20, 3)], ids=repr)
def test_cpu_varlen_dropout_is_the_packed_matrix_mask(pattern):
    """A packed batch on the cpu kernels (work items) = the reference backend's packed batch (whose
    mask indexes the [1, Hq, Tq, Tk] matrix), forward and gradients, float32."""
    lens = [37, 0, 90, 5, 130]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    T = int(cu[-1])
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(T, h, 32, generator=g) for h in (4, 2, 2))
    grad_out = torch.randn(T, 4, 32, generator=g)
    results = {}
    for backend in ("cpu", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = flashlite.varlen_attention(*leaves, cu, cu, pattern, dropout_p=0.3, generator=_generator(8),
                                              backend=backend, return_lse=True)
        assert flashlite.last_backend() == backend
        results[backend] = (out, lse) + torch.autograd.grad(out, leaves, grad_out)
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), results["cpu"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5, msg=name)
    plain = flashlite.varlen_attention(q, k, v, cu, cu, pattern, backend="cpu")
    assert not torch.equal(plain, results["cpu"][0])


@needs_cpu
def test_cpu_topk_dropout_is_the_dense_mask_at_the_listed_keys():
    """Top-k counts the key position a slot names: a top-k list that names every key (in a shuffled
    order) gives the dense pattern's output, mask included."""
    q, k, v = _cpu_qkv(1, 2, 2, 40, 48, 16, torch.float32, seed=8)
    order = torch.stack([torch.randperm(48, generator=torch.Generator().manual_seed(i)) for i in range(40)])
    dense = flashlite.attention(q, k, v, Full(False), backend="cpu", dropout_p=0.4, generator=_generator(1))
    topk = flashlite.attention(q, k, v, TopK(order.view(1, 1, 40, 48).expand(1, 2, 40, 48)), backend="cpu",
                               dropout_p=0.4, generator=_generator(1))
    torch.testing.assert_close(topk, dense, rtol=1e-5, atol=1e-6)


@needs_cpu
def test_cpu_dropout_same_bits_for_any_thread_count():
    cases = [
        (_cpu_qkv(2, 4, 2, 130, 150, 40, torch.float32, seed=1), Full(True)),
        (_cpu_qkv(1, 4, 1, 130, 150, 40, torch.bfloat16, seed=2), SlidingWindow(40, 2)),
        (_cpu_qkv(2, 4, 2, 3, 1200, 64, torch.float32, seed=3), Full(True)),
        (_cpu_qkv(2, 4, 2, 70, 90, 32, torch.float32, seed=4), TopK(_topk(2, 2, 70, 90, 12), causal=True)),
    ]
    old = torch.get_num_threads()
    try:
        for (q, k, v), pattern in cases:
            grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(0)).to(q.dtype)
            runs = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                runs.append(_cpu_dropout_run(q, k, v, pattern, 0.35, 12, grad_out))
            for a, b in zip(*runs):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(old)


@needs_cpu
def test_cpu_dropout_words_past_2_32():
    """The kernels' Philox (every build this CPU runs) = flashlite.core.dropout.philox_words, at
    counters from 0 across 2^32 (the second counter word) up to 2^63. A call whose matrix has more
    than 2^32 elements is too large to run here; the kernels form e = ((b·Hq + h)·Nq + i)·Nk + j in
    64 bits (AttentionParams::dropout_index), so these words are the ones such a call draws."""
    ext = importlib.import_module("flashlite._C")
    active = ext.cpu_isa()
    try:
        for isa in ext.cpu_isas():
            ext.cpu_set_isa(isa)
            for seed in (0, 12345, 2 ** 40 + 7, 2 ** 62 - 1):
                for start in (0, 2 ** 32 - 37, 2 ** 33 + 5, 2 ** 63 - 101):
                    want = fd.philox_words(seed, torch.arange(start, start + 77, dtype=torch.int64))
                    assert torch.equal(ext.cpu_dropout_words(seed, start, 77), want), (isa, seed, start)
    finally:
        ext.cpu_set_isa(active)
    assert int(ext.cpu_dropout_words(0, 0, 1)[0]) == 0x6627E8D5  # Random123's known answer


@needs_cpu
def test_cpu_dropout_counters_past_2_32_through_a_kernel():
    """The counter's high word through a real call (the top-k forward): Hq = 4 heads of one query
    over Nk = 2^31 − 1 keys (k, v a single row expanded with stride 0, so nothing of that size is
    allocated) - element (0, h, 0, j) has e = h·Nk + j, past 2^32 for h >= 2. The top-k rows name a
    few keys each; the expected output is the softmax over them with philox_words' mask."""
    Nk, D, K, p = 2 ** 31 - 1, 8, 6, 0.5
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 1, D, generator=g)
    k = torch.randn(1, 1, 1, D, generator=g).expand(1, 1, Nk, D)
    v = torch.randn(1, 1, 1, D, generator=g).expand(1, 1, Nk, D)
    keys = torch.tensor([3, 2 ** 30, 2 ** 31 - 40, 2 ** 31 - 9, 2 ** 31 - 2, 77])
    indices = keys.view(1, 1, 1, K)  # [B, Hi = Hkv = 1, Nq, K]
    out = flashlite.attention(q, k, v, TopK(indices), backend="cpu", dropout_p=p, generator=_generator(3))
    seed = fd.draw_seed(_generator(3))
    heads = torch.arange(4).view(4, 1)
    kept = fd.philox_words(seed, heads * Nk + keys.view(1, K)) >= fd.threshold(p)  # [4, K]
    assert bool((heads * Nk + keys.view(1, K) >= 2 ** 32).any())
    scores = (q[0, :, 0] @ k[0, 0, keys].T) * D ** -0.5  # [4, K]
    want = (torch.softmax(scores.double(), -1) * kept / (1 - p)) @ v[0, 0, keys].double()
    torch.testing.assert_close(out[0, :, 0].double(), want, rtol=1e-5, atol=1e-6)


@needs_cpu
def test_nn_dropout_runs_on_the_kernels():
    """The drop-ins route training dropout through flashlite's dropout_p (no slow path): sdpa gives
    flashlite.attention's output for the same default-generator state, and MultiheadAttention in
    training mode (need_weights=False) runs on the cpu backend."""
    from flashlite.nn import MultiheadAttention
    from flashlite.nn.functional import scaled_dot_product_attention as fl_sdpa

    q, k, v = _cpu_qkv(2, 4, 4, 33, 33, 16, torch.float32, seed=9)
    torch.manual_seed(0)
    got = fl_sdpa(q, k, v, dropout_p=0.3, is_causal=True)
    assert flashlite.last_backend() == "cpu"
    torch.manual_seed(0)
    want = flashlite.attention(q, k, v, Full(True), dropout_p=0.3)
    assert torch.equal(got, want)
    mha = MultiheadAttention(32, 4, dropout=0.2, batch_first=True).train()
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(1))
    a, _ = mha(x, x, x, need_weights=False)
    assert flashlite.last_backend() == "cpu"
    b, _ = mha(x, x, x, need_weights=False)
    assert not torch.equal(a, b)  # a fresh seed per call
    a.sum().backward()
    assert mha.in_proj_weight.grad is not None


# =============================================================================================
# The triton backend: dropout inside the Triton kernels (kernels/: constexpr DROPOUT in the tile
# engine's forward, dK/dV and dQ kernels and in every gather mode - row, shared, union - and its
# dK/dV pieces). On CPU tensors they run in Triton's interpreter. out, lse and the three gradients
# are held to the correctness rule against reference.attention(..., dropout_seed=draw_seed(the
# same generator state)): one element dropped or kept wrongly is an error of the order of the
# output itself, far past the rule's bound.
# =============================================================================================
import os  # noqa: E402
import zlib  # noqa: E402

from flashlite import BlockSparse  # noqa: E402,F811

from conftest import assert_rule  # noqa: E402,F811

_TRITON = flashlite.backends().get("triton") == "available" and (
    DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(not _TRITON, reason=f"triton backend: {flashlite.backends().get('triton')}")


def _tr_qkv(B, Hq, Hkv, Nq, Nk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g).to(dtype).to(DEVICE)
                 for shape in ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D)))


def _tr_run(q, k, v, pattern, p, gen_seed, grad_out, **kw):
    """flashlite on the triton backend: (out, lse, dq, dk, dv)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = flashlite.attention(*leaves, pattern, backend="triton", return_lse=True, dropout_p=p,
                                   generator=_generator(gen_seed), **kw)
    assert flashlite.last_backend() == "triton"
    return (out.detach(), lse.detach()) + tuple(torch.autograd.grad(out, leaves, grad_out))


def _tr_reference(q, k, v, pattern, p, seed, grad_out, compute, **kw):
    leaves = [t.detach().clone().to(compute or t.dtype).requires_grad_() for t in (q, k, v)]
    out, lse = reference.attention(*leaves, pattern, return_lse=True, compute_dtype=compute, dropout_p=p,
                                   dropout_seed=seed, **kw)
    return (out.detach(), lse.detach()) + tuple(torch.autograd.grad(out, leaves, grad_out.to(out.dtype)))


def _tr_check(q, k, v, pattern, p=0.3, gen_seed=5, **kw):
    """The correctness rule for out, lse, dq, dk, dv of the triton backend with dropout."""
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=torch.Generator().manual_seed(99))
    grad_out = grad_out.to(q.dtype).to(DEVICE)
    got = _tr_run(q, k, v, pattern, p, gen_seed, grad_out, **kw)
    seed = fd.draw_seed(_generator(gen_seed))
    exact = _tr_reference(q, k, v, pattern, p, seed, grad_out, torch.float64, **kw)
    lowp = _tr_reference(q, k, v, pattern, p, seed, grad_out, None, **kw)
    f32 = _tr_reference(q, k, v, pattern, p, seed, grad_out, torch.float32, **kw)
    for name, g, lo, ex, fb in zip(("out", "lse", "dq", "dk", "dv"), got, lowp, exact, f32):
        assert_rule(name, g, lo, ex, fallback=fb)
    plain = flashlite.attention(q, k, v, pattern, backend="triton", **kw)
    assert not torch.equal(plain, got[0])  # dropout really ran
    return got


def _tr_topk(B, H, Nq, Nk, K, shared=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, Nk, (B, H, K) if shared else (B, H, Nq, K), generator=g).to(DEVICE)


_TR_LAYOUT = torch.rand(1, 4, 3, 3, generator=torch.Generator().manual_seed(3)) < 0.6
_TR_LAYOUT[..., 0] = True

# (pattern, Nq, Nk, gather FORCE_MODE); GQA 4:2 throughout.
_TR_CASES = {
    "full": (lambda: Full(False), 45, 53, None),
    "causal": (lambda: Full(True), 45, 53, None),
    "window": (lambda: SlidingWindow(11, 3), 45, 53, None),
    "block_sparse": (lambda: BlockSparse(_TR_LAYOUT.to(DEVICE), 32), 96, 96, None),
    "topk_row": (lambda: TopK(_tr_topk(1, 2, 45, 53, 9)), 45, 53, "row"),
    "topk_union": (lambda: TopK(_tr_topk(1, 2, 45, 53, 9, seed=4)), 45, 53, "union"),
    "topk_causal": (lambda: TopK(_tr_topk(1, 2, 45, 53, 9, seed=1), causal=True), 45, 53, None),
    "topk_shared": (lambda: TopK(_tr_topk(1, 2, 45, 53, 9, shared=True, seed=2)), 45, 53, None),
}


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(_TR_CASES))
def test_triton_kernels_draw_the_reference_mask(name, dtype, monkeypatch):
    """out, lse and the gradients of the triton backend = the reference's with the same seed."""
    from flashlite.kernels import gather_launch

    sample_interpreter("triton", dtype == torch.float32 or name in ("causal", "topk_causal"))  # masks: dtype-free
    make, Nq, Nk, mode = _TR_CASES[name]
    monkeypatch.setattr(gather_launch, "FORCE_MODE", mode)
    q, k, v = _tr_qkv(1, 4, 2, Nq, Nk, 16, dtype, seed=zlib.crc32(name.encode()) % 1000)
    _tr_check(q, k, v, make(), softcap=(8.0 if name == "window" else None))


@needs_triton
@pytest.mark.parametrize("p", [0.1, 0.75])
def test_triton_dropout_thresholds_either_side_of_2_31(p):
    """p >= 0.5 puts the threshold at or above 2^31 (the kernels' int32 bias turns non-negative)."""
    sample_interpreter("triton", p > 0.5)  # p < 0.5 is what every other dropout test runs
    q, k, v = _tr_qkv(2, 2, 1, 33, 40, 16, torch.float32, seed=7)
    _tr_check(q, k, v, Full(True), p=p)
    _tr_check(q, k, v, TopK(_tr_topk(2, 1, 33, 40, 8, seed=3), causal=True), p=p)


@needs_triton
def test_triton_dropout_same_seed_same_bits():
    q, k, v = _tr_qkv(1, 4, 2, 40, 47, 16, torch.float32, seed=2)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    patterns = (Full(True), TopK(_tr_topk(1, 2, 40, 47, 8, seed=6), causal=True))
    for pattern in patterns if FULL_TESTS or DEVICE.type == "cuda" else patterns[1:]:
        first = _tr_run(q, k, v, pattern, 0.35, 12, grad_out)
        again = _tr_run(q, k, v, pattern, 0.35, 12, grad_out)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
        other = _tr_run(q, k, v, pattern, 0.35, 13, grad_out)
        assert not torch.equal(other[0], first[0])


@needs_triton
@pytest.mark.parametrize("kind", ["causal", "topk"])
def test_triton_varlen_dropout_is_the_packed_matrix_mask(kind):
    """A packed batch on the Triton kernels (tile work items with packed row/key indices; top-k in
    packed coordinates) = the reference backend's packed batch (whose mask indexes the
    [1, Hq, Tq, Tk] matrix), forward and gradients, float32."""
    lens = [37, 0, 50, 5]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEVICE)
    T = int(cu[-1])
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(T, h, 16, generator=g).to(DEVICE) for h in (4, 2, 2))
    grad_out = torch.randn(T, 4, 16, generator=g).to(DEVICE)
    if kind == "causal":
        pattern = Full(True)
    else:  # local key positions per packed query row, [Tq, Hkv, K]
        length = torch.tensor(sum(([n] * n for n in lens), []))  # Nk_s of each packed row
        draws = torch.rand(T, 2, 7, generator=g) * (length.view(T, 1, 1) + 1)
        pattern = TopK((draws.long() - 1).to(DEVICE), causal=True)
    results = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = flashlite.varlen_attention(*leaves, cu, cu, pattern, dropout_p=0.3, generator=_generator(8),
                                              backend=backend, return_lse=True)
        assert flashlite.last_backend() == backend
        results[backend] = (out, lse) + torch.autograd.grad(out, leaves, grad_out)
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5, msg=name)
    plain = flashlite.varlen_attention(q, k, v, cu, cu, pattern, backend="triton")
    assert not torch.equal(plain, results["triton"][0])


@needs_triton
def test_triton_topk_dropout_is_the_dense_mask_at_the_listed_keys():
    """Top-k counts the key position a slot names: a top-k list naming every key (shuffled) gives
    the dense pattern's output, mask included."""
    q, k, v = _tr_qkv(1, 2, 2, 24, 32, 16, torch.float32, seed=8)
    order = torch.stack([torch.randperm(32, generator=torch.Generator().manual_seed(i)) for i in range(24)])
    dense = flashlite.attention(q, k, v, Full(False), backend="triton", dropout_p=0.4, generator=_generator(1))
    topk = flashlite.attention(q, k, v, TopK(order.view(1, 1, 24, 32).expand(1, 2, 24, 32).to(DEVICE)),
                               backend="triton", dropout_p=0.4, generator=_generator(1))
    torch.testing.assert_close(topk, dense, rtol=1e-5, atol=1e-6)


@needs_triton
def test_triton_dropout_counters_past_2_32():
    """The counter's high word through a real call (the gather forward): Hq = 4 heads of one query
    over Nk = 2^31 − 1 keys (k, v one row expanded with stride 0) - element (0, h, 0, j) has
    e = h·Nk + j, past 2^32 for h >= 2; the expected output is the softmax over the listed keys
    with philox_words' mask."""
    Nk, D, K, p = 2 ** 31 - 1, 16, 6, 0.5
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 1, D, generator=g).to(DEVICE)
    k = torch.randn(1, 1, 1, D, generator=g).to(DEVICE).expand(1, 1, Nk, D)
    v = torch.randn(1, 1, 1, D, generator=g).to(DEVICE).expand(1, 1, Nk, D)
    keys = torch.tensor([3, 2 ** 30, 2 ** 31 - 40, 2 ** 31 - 9, 2 ** 31 - 2, 77])
    out = flashlite.attention(q, k, v, TopK(keys.view(1, 1, 1, K).to(DEVICE)), backend="triton", dropout_p=p,
                              generator=_generator(3))
    seed = fd.draw_seed(_generator(3))
    heads = torch.arange(4).view(4, 1)
    kept = fd.philox_words(seed, heads * Nk + keys.view(1, K)) >= fd.threshold(p)
    assert bool((heads * Nk + keys.view(1, K) >= 2 ** 32).any())
    scores = (q[0, :, 0].cpu() @ k[0, 0, :1].cpu().T).expand(4, K) * D ** -0.5
    want = (torch.softmax(scores.double(), -1) * kept / (1 - p)) @ v[0, 0, :1].cpu().double().expand(K, D)
    torch.testing.assert_close(out[0, :, 0].cpu().double(), want, rtol=1e-5, atol=1e-6)
