"""Tile engine (full, causal, sliding window, block-sparse) against the reference, forward and
gradients, on every kernel backend that runs here."""
from __future__ import annotations

import pytest
import torch

import flashlite
from flashlite import BlockSparse, Full, SlidingWindow
from flashlite.core.schedule import cdiv

from conftest import DEVICE, DTYPES, check_against_reference, kernel_backends, randn, sample_interpreter

BACKENDS = kernel_backends()

# (B, Hq, Hkv, Nq, Nk, D): odd lengths, Nq != Nk both ways, GQA/MQA, one-query decode.
SHAPES = [
    (1, 2, 2, 37, 37, 64),
    (2, 4, 2, 50, 77, 40),
    (1, 4, 1, 70, 33, 128),
    (1, 3, 3, 1, 90, 64),
]


def qkv(B, Hq, Hkv, Nq, Nk, D, dtype):
    return randn(B, Hq, Nq, D, dtype=dtype), randn(B, Hkv, Nk, D, dtype=dtype), randn(B, Hkv, Nk, D, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_full_and_causal(backend, dtype, shape, causal):
    check_against_reference(*qkv(*shape, dtype), Full(causal), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [(0, 0), (5, 0), (7, 3), (16, 16), (200, 0), (200, 200)], ids=str)
@pytest.mark.parametrize("shape", [(1, 2, 1, 45, 61, 64), (1, 2, 2, 61, 45, 40), (1, 2, 2, 1, 70, 64)], ids=str)
def test_sliding_window(backend, window, shape):
    check_against_reference(*qkv(*shape, torch.float32), SlidingWindow(*window), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
def test_block_sparse_random_layouts(backend, block_size, density):
    sample_interpreter(backend, (density, block_size) in {(0.5, 16), (1.0, 64), (0.1, 128)})
    B, Hq, Hkv, Nq, Nk, D = 2, 2, 1, 150, 100, 64
    layout = torch.rand(B, Hq, cdiv(Nq, block_size), cdiv(Nk, block_size), device=DEVICE) < density
    layout[0, 0, 0] = False  # a query block with no key block: zeros, lse -inf, no NaN
    check_against_reference(*qkv(B, Hq, Hkv, Nq, Nk, D, torch.float32), BlockSparse(layout, block_size), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("broadcast", ["batch", "heads", "both"])
def test_block_sparse_broadcast_and_causal(backend, broadcast):
    B, Hq, Nq, Nk, bs = 2, 4, 96, 128, 32
    lb = 1 if broadcast in ("batch", "both") else B
    lh = 1 if broadcast in ("heads", "both") else Hq
    layout = torch.rand(lb, lh, cdiv(Nq, bs), cdiv(Nk, bs), device=DEVICE) < 0.6
    q, k, v = qkv(B, Hq, 2, Nq, Nk, 40, torch.float16)
    check_against_reference(q, k, v, BlockSparse(layout, bs, causal=(broadcast == "both")), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views_from_bshd(backend):
    """[B, S, H, D] tensors transposed to [B, H, S, D] (no copy) give the contiguous result."""
    B, S, H, D = 2, 53, 4, 64
    base = [randn(B, S, H, D) for _ in range(3)]
    views = [t.transpose(1, 2) for t in base]
    assert not views[0].is_contiguous()
    out = check_against_reference(*views, Full(True), backend)
    contiguous = flashlite.attention(*[t.contiguous() for t in views], Full(True), backend=backend)
    torch.testing.assert_close(out, contiguous, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap,alibi", [(5.0, False), (None, True), (3.0, True)], ids=str)
def test_softcap_and_alibi(backend, softcap, alibi):
    B, Hq, Hkv, Nq, Nk, D = 2, 4, 2, 40, 56, 64
    q, k, v = qkv(B, Hq, Hkv, Nq, Nk, D, torch.float32)
    q = q * 3  # make the cap bite
    slopes = torch.rand(Hq, device=DEVICE) * 0.5 if alibi else None
    check_against_reference(q, k, v, Full(True), backend, softcap=softcap, alibi_slopes=slopes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_with_more_queries_than_keys_gives_empty_rows(backend):
    """Causal with Nq > Nk: the first Nq - Nk queries see no key -> zeros, lse -inf, finite grads."""
    q, k, v = qkv(1, 2, 2, 40, 16, 64, torch.float32)
    out = check_against_reference(q, k, v, Full(True), backend)
    assert out[:, :, : 40 - 16].abs().max() == 0


@pytest.mark.parametrize("head_dim", [40, 96, 128, 256])
def test_head_dims_triton(head_dim):
    check_against_reference(*qkv(1, 2, 1, 33, 47, head_dim, torch.float16), Full(True), "triton")


def test_alibi_per_batch_and_scale():
    q, k, v = qkv(2, 2, 2, 30, 30, 64, torch.float32)
    check_against_reference(q, k, v, Full(False), "triton", alibi_slopes=torch.rand(2, 2, device=DEVICE),
                            scale=0.3)
