"""Failure classes that bit flash-attn, SDPA, FlexAttention and xformers, applied to every kernel
backend that runs here and every pattern. Each test checks the output *and* the gradients
against the reference (the correctness rule of docs/design.md) unless it says why not."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashlite
from flashlite import BlockSparse, Full, SlidingWindow, TopK
from flashlite.core.schedule import cdiv

from conftest import DEVICE, FULL_TESTS, HAS_CUDA, check_against_reference, kernel_backends, sample_interpreter

BACKENDS = kernel_backends()


def make_pattern(name: str, batch: int, heads_q: int, heads_kv: int, nq: int, nk: int, empty_rows: bool = False):
    """One pattern of each kind for the given sizes; ``empty_rows`` makes some queries see nothing."""
    if name == "full":
        return Full(False)
    if name == "causal":
        return Full(True)
    if name == "window":
        return SlidingWindow(3, 2) if not empty_rows else SlidingWindow(0, 0)
    if name == "block_sparse":
        bs = 16
        layout = torch.rand(1, heads_q, cdiv(nq, bs), cdiv(nk, bs), device=DEVICE) < 0.5
        if empty_rows:
            layout[..., 0, :] = False
        return BlockSparse(layout, bs)
    if name == "topk":
        width = min(5, nk)
        scores = torch.rand(batch, heads_kv, nq, nk, device=DEVICE)
        indices = scores.topk(width, dim=-1).indices
        if empty_rows:
            indices[:, :, 0] = -1
        return TopK(indices, causal=True)
    raise ValueError(name)


PATTERNS = ["full", "causal", "window", "block_sparse", "topk"]


def padded_view(batch, heads, seqlen, head_dim, dtype=torch.float32, extra_rows=7, extra_dim=5):
    """A [B, H, N, D] view into a NaN-filled buffer that is larger in N and D: any read beyond
    the logical extent brings a NaN into the result."""
    buf = torch.full((batch, heads, seqlen + extra_rows, head_dim + extra_dim), float("nan"), device=DEVICE)
    view = buf[:, :, :seqlen, :head_dim]
    view.copy_(torch.randn(batch, heads, seqlen, head_dim, device=DEVICE))
    return buf.to(dtype)[:, :, :seqlen, :head_dim]


# (Nq, Nk, D): the tail lengths {1, 2, 3, 17, 97, 127, 129, 1025} x head dims {8, 40, 59, 64, 80, 96, 128, 256},
# paired so each length and each head dim appears (the full product is for the GPU run).
ODD_SIZES = [(1, 1, 8), (2, 3, 40), (3, 17, 59), (17, 2, 64), (97, 129, 80), (127, 97, 96), (129, 127, 128),
             (17, 1025, 256)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("sizes", ODD_SIZES, ids=str)
def test_no_out_of_bounds_reads_on_tails(backend, pattern, sizes):
    # The interpreter samples: every small size, and one of the four large ones per pattern.
    large = ODD_SIZES[4:]
    sample_interpreter(backend, sizes not in large or large.index(sizes) == (PATTERNS.index(pattern) + 2) % len(large))
    nq, nk, d = sizes
    q, k, v = padded_view(1, 2, nq, d), padded_view(1, 1, nk, d), padded_view(1, 1, nk, d)
    out = check_against_reference(q, k, v, make_pattern(pattern, 1, 2, 1, nq, nk), backend)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_rows_that_see_no_key(backend, pattern):
    """Output 0, lse −inf, gradients finite and equal to the reference's."""
    nq, nk = 40, 24 if pattern != "causal" else 24
    q, k, v = (torch.randn(1, 2, n, 32, device=DEVICE) for n in (nq, nk, nk))
    pat = make_pattern(pattern, 1, 2, 2, nq, nk, empty_rows=True)
    out = check_against_reference(q, k, v, pat, backend)
    _, lse = flashlite.attention(q, k, v, pat, backend=backend, return_lse=True)
    empty = torch.isneginf(lse)
    if pattern != "full":
        assert empty.any(), "the test pattern should leave some rows empty"
    assert out[empty].abs().max() == 0 if empty.any() else True


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_strided_inputs(backend, pattern):
    """[B, S, H, D] transposed views, ::2 slices along the sequence, expand()ed K/V for GQA."""
    sample_interpreter(backend, pattern in ("causal", "topk"))  # the tile and the gather launchers' strides
    B, S, H, D = 2, 66, 4, 40
    q = torch.randn(B, S, H, D, device=DEVICE).transpose(1, 2)
    k_base = torch.randn(B, 2 * S, 1, D, device=DEVICE).transpose(1, 2)[:, :, ::2]
    v_base = torch.randn(B, 2 * S, 1, D, device=DEVICE).transpose(1, 2)[:, :, ::2]
    k, v = k_base.expand(B, 2, S, D), v_base.expand(B, 2, S, D)
    pat = make_pattern(pattern, B, H, 2, S, S)
    out = check_against_reference(q, k, v, pat, backend)
    dense = flashlite.attention(q.contiguous(), k.contiguous(), v.contiguous(), pat, backend=backend)
    torch.testing.assert_close(out, dense, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nq,nk", [(20, 50), (50, 50), (50, 20), (1, 50)])
def test_alignment_when_nq_differs_from_nk(backend, nq, nk):
    """Causal and windows align bottom-right for Nq <, =, > Nk and Nq = 1; window (Nk−1, 0) is causal;
    the number of keys each row attends equals the pattern's."""
    q, k, v = (torch.randn(1, 2, n, 32, device=DEVICE) for n in (nq, nk, nk))
    for pattern in (Full(True), SlidingWindow(4, 0), SlidingWindow(2, 3)):
        check_against_reference(q, k, v, pattern, backend)
    causal = flashlite.attention(q, k, v, Full(True), backend=backend)
    window = flashlite.attention(q, k, v, SlidingWindow(nk - 1, 0), backend=backend)
    torch.testing.assert_close(window, causal, rtol=0, atol=1e-6)
    counts = SlidingWindow(4, 0).keys_per_query(nq, nk)[0, 0]
    pos = torch.arange(nq) + nk - nq
    expected = (torch.clamp(pos, max=nk - 1) - torch.clamp(pos - 4, min=0) + 1).clamp(min=0)
    assert torch.equal(counts, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("magnitude", [10.0, 100.0, 1000.0])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_large_magnitudes(backend, magnitude, softcap):
    """float16 inputs scaled up to its limit: finite everywhere, output and lse by the rule.

    Gradients: at these scales softmax saturates and the exact dq/dk are ~0, while the
    FlashAttention backward forms ds = p·(dp − δ) with δ = Σ dO·O from the stored output, so dp and
    δ (each ~|dO|·|V|) cancel in float32 arithmetic. The float16 PyTorch baseline overflows, so
    the bound here is that cancellation: eps32·√D·|dO|·|V|·max(|Q|, |K|)·scale, plus the rule's
    float32 baseline. A wrong gradient is orders of magnitude beyond it.
    """
    dtype, head_dim = torch.float16, 64
    q, k, v = (torch.randn(1, 2, n, head_dim, device=DEVICE) for n in (33, 45, 45))
    q, k = (q * magnitude).to(dtype), (k * magnitude).to(dtype)
    v = (v * min(magnitude, 100.0)).to(dtype)
    out = check_against_reference(q, k, v, Full(True), backend, grads=False, softcap=softcap)
    assert torch.isfinite(out).all()

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    exact_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    f32_leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    f16_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn(q.shape, device=DEVICE, dtype=torch.float64)
    flashlite.attention(*leaves, Full(True), backend=backend, softcap=softcap).backward(grad_out.to(dtype))
    for inputs, compute, cast in ((exact_leaves, torch.float64, torch.float64), (f32_leaves, torch.float32, torch.float32),
                                  (f16_leaves, None, dtype)):
        flashlite.reference.attention(*inputs, Full(True), softcap=softcap,
                                      compute_dtype=compute).backward(grad_out.to(cast))
    scale = head_dim ** -0.5
    top = lambda t: float(t.detach().abs().max())  # noqa: E731
    cancellation = (torch.finfo(torch.float32).eps * head_dim ** 0.5 * top(grad_out) * top(v)
                    * max(top(q), top(k)) * scale)
    for name, got, exact, f32, f16 in zip(("dq", "dk", "dv"), leaves, exact_leaves, f32_leaves, f16_leaves):
        assert torch.isfinite(got.grad).all(), f"{name} not finite"
        err = (got.grad.double() - exact.grad).abs().max().item()
        base = (f16.grad.double() - exact.grad).abs().max().item()
        if not base < float("inf"):  # PyTorch's float16 math overflowed: the float32 bound above
            rounded = (f32.grad.to(dtype).double() - exact.grad).abs().max().item()
            one_unit = torch.finfo(dtype).eps * top(exact.grad)  # one rounding at the result's scale
            base = max(rounded, one_unit) + cancellation / 2
        assert err <= 2 * base + 1e-5, f"{name}: error {err:.3g} > 2·{base:.3g} + 1e-5"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_the_named_backend_actually_runs(backend, pattern):
    """No silent fallback: the backend asked for is the one recorded."""
    q, k, v = (torch.randn(1, 2, 30, 32, device=DEVICE) for _ in range(3))
    flashlite.attention(q, k, v, make_pattern(pattern, 1, 2, 2, 30, 30), backend=backend)
    assert flashlite.last_backend() == backend


@pytest.mark.skipif(not HAS_CUDA, reason="bitwise determinism of the backward is checked on a GPU")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_backward_is_deterministic(backend, pattern):
    q, k, v = (torch.randn(2, 4, 513, 64, device=DEVICE, dtype=torch.float16, requires_grad=True) for _ in range(3))
    pat = make_pattern(pattern, 2, 4, 4, 513, 513)
    grads = []
    for _ in range(2):
        out = flashlite.attention(q, k, v, pat, backend=backend)
        grads.append(torch.autograd.grad(out.float().square().sum(), (q, k, v)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU-path memory test")
@pytest.mark.parametrize("pattern", ["window", "topk"])
def test_sparse_cpu_path_memory_is_linear(pattern):
    """The native CPU backend never builds an Nq×Nk mask: its largest allocation grows ~linearly."""
    if flashlite.backends()["cpu"] != "available":
        pytest.skip("the C++ CPU backend is not built here")
    peaks = []
    for n in (2048, 8192):
        q, k, v = (torch.randn(1, 1, n, 16) for _ in range(3))
        pat = SlidingWindow(16) if pattern == "window" else TopK(torch.randint(0, n, (1, 1, n, 4)), causal=False)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            flashlite.attention(q, k, v, pat, backend="cpu")
        peaks.append(max(e.cpu_memory_usage for e in prof.key_averages()))
    assert peaks[1] <= 4 * peaks[0] * 1.5, f"largest allocation grew from {peaks[0]} to {peaks[1]} bytes for 4x N"
    assert peaks[1] < 8192 * 8192, "an Nq x Nk buffer was allocated"


@settings(max_examples=25 if FULL_TESTS or HAS_CUDA else 10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pattern=st.sampled_from(PATTERNS),
    nq=st.integers(1, 70), nk=st.integers(1, 70), head_dim=st.sampled_from([8, 16, 40, 64]),
    group=st.sampled_from([1, 2]), dtype=st.sampled_from([torch.float32, torch.float16]),
    backend=st.sampled_from(BACKENDS), seed=st.integers(0, 2**31 - 1),
)
def test_property_random_shapes(pattern, nq, nk, head_dim, group, dtype, backend, seed):
    torch.manual_seed(seed)
    heads_kv = 1
    q = torch.randn(1, heads_kv * group, nq, head_dim, device=DEVICE).to(dtype)
    k, v = (torch.randn(1, heads_kv, nk, head_dim, device=DEVICE).to(dtype) for _ in range(2))
    check_against_reference(q, k, v, make_pattern(pattern, 1, heads_kv * group, heads_kv, nq, nk), backend)
