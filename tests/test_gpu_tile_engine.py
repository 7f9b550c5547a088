"""Tile engine on a CUDA device: bfloat16, larger shapes, long sequences, decode, CUDA graphs,
side streams and >2^31-element tensors. Skipped (with the reason) on machines without a GPU."""
from __future__ import annotations

import pytest
import torch

import flashlite
from flashlite import BlockSparse, Full, SlidingWindow
from flashlite.core.schedule import cdiv

from conftest import HAS_CUDA, check_against_reference, kernel_backends, randn, requires_cuda

pytestmark = requires_cuda
BACKENDS = [b for b in kernel_backends() if b in ("triton", "cuda")] if HAS_CUDA else ["triton"]
PATTERNS = {
    "full": lambda nq, nk: Full(False),
    "causal": lambda nq, nk: Full(True),
    "window": lambda nq, nk: SlidingWindow(256, 0),
    "block_sparse": lambda nq, nk: BlockSparse(torch.rand(1, 1, cdiv(nq, 64), cdiv(nk, 64), device="cuda") < 0.3, 64),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(2, 8, 2, 1000, 1000, 128), (1, 4, 4, 513, 2049, 64), (1, 4, 1, 1, 4097, 128),
                                   (1, 2, 2, 300, 300, 256), (1, 2, 1, 257, 257, 96), (1, 2, 2, 129, 255, 32)],
                         ids=str)
def test_patterns_on_gpu(backend, pattern, dtype, shape):
    B, Hq, Hkv, Nq, Nk, D = shape
    q, k, v = randn(B, Hq, Nq, D, dtype=dtype), randn(B, Hkv, Nk, D, dtype=dtype), randn(B, Hkv, Nk, D, dtype=dtype)
    check_against_reference(q, k, v, PATTERNS[pattern](Nq, Nk), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["causal", "window"])
def test_long_sequence_16k(backend, pattern):
    B, H, N, D = 1, 2, 16384, 128
    q, k, v = (randn(B, H, N, D, dtype=torch.bfloat16) for _ in range(3))
    check_against_reference(q, k, v, PATTERNS[pattern](N, N), backend, grads=(pattern == "window"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_64k_keys_gqa(backend):
    q = randn(2, 32, 1, 128, dtype=torch.bfloat16)
    k, v = randn(2, 4, 65536, 128, dtype=torch.bfloat16), randn(2, 4, 65536, 128, dtype=torch.bfloat16)
    check_against_reference(q, k, v, Full(True), backend, grads=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_and_side_stream(backend):
    q, k, v = (randn(2, 4, 300, 64, dtype=torch.float16) for _ in range(3))
    eager = flashlite.flash_attention(q, k, v, causal=True, backend=backend)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        side = flashlite.flash_attention(q, k, v, causal=True, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(side, eager, rtol=0, atol=0)
    graph = torch.cuda.CUDAGraph()
    flashlite.flash_attention(q, k, v, causal=True, backend=backend)  # warm-up outside capture
    with torch.cuda.graph(graph):
        captured = flashlite.flash_attention(q, k, v, causal=True, backend=backend)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)


@pytest.mark.large
@pytest.mark.parametrize("backend", BACKENDS)
def test_more_than_2_31_elements(backend):
    """q/k/v with > 2^31 elements and a sequence longer than 65,536: 64-bit offsets."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs >= 40 GiB of GPU memory")
    B, H, N, D = 1, 128, 131072, 128  # 2^31 elements per tensor
    q = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    out = flashlite.sliding_window_attention(q, k, v, 64, backend=backend)
    # Check the last head's tail against the reference on its own slice.
    sl = slice(N - 256, N)
    want = flashlite.reference.attention(q[:, -1:, sl].double(), k[:, -1:, N - 256 - 64:].double(),
                                         v[:, -1:, N - 256 - 64:].double(), SlidingWindow(64, 0),
                                         compute_dtype=torch.float64)
    assert torch.isfinite(out).all()
    assert (out[:, -1:, sl].double() - want).abs().max() < 2e-2
