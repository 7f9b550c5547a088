"""The CUDA C++ backend ("cuda", csrc/cuda/) against the reference on a GPU: every pattern x shapes x
dtypes, forward and gradients, by DESIGN.md's correctness rule (conftest.check_against_reference),
plus the paths the suite would not reach otherwise (decode packing and split keys, the atomic
backward, alignment fallbacks, errors) and compute-sanitizer runs. Skipped without a CUDA device.

On a GPU machine the "cuda" backend must be built: test_cuda_backend_is_available fails (with the
reason) if it is not, the others skip.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import flashlite
from flashlite import BlockSparse, Full, SlidingWindow, TopK
from flashlite.core.gather_rows import canonical_rows, key_index
from flashlite.core.schedule import cdiv

from conftest import HAS_CUDA, check_against_reference, randn, requires_cuda

pytestmark = requires_cuda


def _cuda_state() -> str:
    return flashlite.backends().get("cuda", "not registered") if HAS_CUDA else "no CUDA device"


# Without a device the module-level mark says "needs a CUDA device"; with one, a missing build skips
# the kernel tests (test_cuda_backend_is_available reports it as a failure).
needs_backend = pytest.mark.skipif(HAS_CUDA and _cuda_state() != "available", reason=f"cuda backend: {_cuda_state()}")


def _ext():
    from flashlite import _C

    return _C


def qkv(B, Hq, Hkv, Nq, Nk, D, dtype, scale=1.0):
    return (randn(B, Hq, Nq, D, dtype=dtype, scale=scale), randn(B, Hkv, Nk, D, dtype=dtype, scale=scale),
            randn(B, Hkv, Nk, D, dtype=dtype))


def topk_indices(B, Hi, Nq, Nk, K, *, shared=False, empty_slots=True):
    """Distinct random key indices per row, some slots -1."""
    K = min(K, Nk)
    rows = 1 if shared else Nq
    idx = torch.rand(B, Hi, rows, Nk, device="cuda").argsort(-1)[..., :K]
    if empty_slots and K > 1:
        idx[..., -1] = -1
    return idx[:, :, 0] if shared else idx


def test_cuda_backend_is_available():
    assert _cuda_state() == "available", f"flashlite's cuda backend is not available on a GPU machine: {_cuda_state()}"


# (B, Hq, Hkv, Nq, Nk, D): odd lengths, Nq != Nk both ways, GQA/MQA, every head-dim template and
# padded ones (40 -> 64, 80 -> 96, 160 -> 256, 59/8: unaligned rows -> element loads).
SHAPES = [
    (2, 8, 2, 1000, 1000, 128),
    (1, 4, 4, 513, 2049, 64),
    (1, 2, 2, 300, 300, 256),
    (1, 2, 1, 257, 257, 96),
    (1, 2, 2, 129, 255, 32),
    (2, 4, 1, 70, 33, 40),
    (1, 3, 3, 97, 129, 59),
    (1, 2, 1, 17, 1025, 160),
    (1, 2, 2, 33, 47, 8),
]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
PATTERNS = {
    "full": lambda nq, nk, B, Hq, Hkv: Full(False),
    "causal": lambda nq, nk, B, Hq, Hkv: Full(True),
    "window": lambda nq, nk, B, Hq, Hkv: SlidingWindow(64, 0),
    "window2": lambda nq, nk, B, Hq, Hkv: SlidingWindow(17, 9),
    "block_sparse": lambda nq, nk, B, Hq, Hkv: BlockSparse(
        torch.rand(1, Hq, cdiv(nq, 64), cdiv(nk, 64), device="cuda") < 0.4, 64),
    "topk": lambda nq, nk, B, Hq, Hkv: TopK(topk_indices(B, Hkv, nq, nk, 40), causal=False),
    "topk_causal": lambda nq, nk, B, Hq, Hkv: TopK(topk_indices(B, Hkv, nq, nk, 40), causal=True),
}


@needs_backend
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_patterns(pattern, dtype, shape):
    B, Hq, Hkv, Nq, Nk, D = shape
    q, k, v = qkv(B, Hq, Hkv, Nq, Nk, D, dtype)
    check_against_reference(q, k, v, PATTERNS[pattern](Nq, Nk, B, Hq, Hkv), "cuda")


@needs_backend
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_block_sizes(block_size, dtype, causal):
    """16/32 run the SIMT kernels, 64/128 the tensor-core ones; per-head layouts, an empty query block."""
    B, Hq, Hkv, Nq, Nk, D = 2, 4, 2, 300, 277, 64
    layout = torch.rand(B, Hq, cdiv(Nq, block_size), cdiv(Nk, block_size), device="cuda") < 0.5
    layout[0, 0, 0] = False
    check_against_reference(*qkv(B, Hq, Hkv, Nq, Nk, D, dtype), BlockSparse(layout, block_size, causal=causal), "cuda")


@needs_backend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("nq", [1, 3, 16])
def test_decode_gqa_packing_and_split_keys(dtype, nq):
    """Few queries, long keys: heads of a GQA group share a block, keys split across blocks."""
    q, k, v = qkv(2, 16, 2, nq, 5000, 128, dtype)
    check_against_reference(q, k, v, Full(True), "cuda")
    check_against_reference(q, k, v, SlidingWindow(700, 0), "cuda")
    check_against_reference(q, k, v, Full(False), "cuda", softcap=30.0, alibi_slopes=torch.rand(16, device="cuda"))


@needs_backend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_decode_64k_keys(dtype):
    q = randn(2, 32, 1, 128, dtype=dtype)
    k, v = randn(2, 4, 65536, 128, dtype=dtype), randn(2, 4, 65536, 128, dtype=dtype)
    check_against_reference(q, k, v, Full(True), "cuda", grads=False)


@needs_backend
def test_decode_64k_keys_head_dim_256_and_topk():
    q = randn(1, 8, 1, 256, dtype=torch.bfloat16)
    k, v = randn(1, 2, 65536, 256, dtype=torch.bfloat16), randn(1, 2, 65536, 256, dtype=torch.bfloat16)
    check_against_reference(q, k, v, Full(True), "cuda", grads=False)
    check_against_reference(q, k, v, TopK(topk_indices(1, 2, 1, 65536, 2048), causal=True), "cuda", grads=False)


@needs_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4), (32, 1)])
def test_topk_layouts(dtype, shared, heads):
    """Per-query and shared index lists, per-KV-head and broadcast (Hkv|1) lists, GQA up to 32."""
    Hq, Hkv = heads
    B, Nq, Nk, D = 2, 77, 300, 64
    for index_heads in (Hkv, 1):
        idx = topk_indices(B, index_heads, Nq, Nk, 50, shared=shared)
        check_against_reference(*qkv(B, Hq, Hkv, Nq, Nk, D, dtype), TopK(idx, causal=True), "cuda")


@needs_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap,alibi", [(5.0, None), (None, "head"), (3.0, "batch")], ids=str)
@pytest.mark.parametrize("pattern", ["causal", "window2", "topk_causal"])
def test_softcap_and_alibi(dtype, softcap, alibi, pattern):
    B, Hq, Hkv, Nq, Nk, D = 2, 4, 2, 150, 170, 64
    q, k, v = qkv(B, Hq, Hkv, Nq, Nk, D, dtype, scale=2.0)
    slopes = None if alibi is None else torch.rand(*((Hq,) if alibi == "head" else (B, Hq)), device="cuda") * 0.3
    check_against_reference(q, k, v, PATTERNS[pattern](Nq, Nk, B, Hq, Hkv), "cuda", softcap=softcap,
                            alibi_slopes=slopes)


@needs_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", ["causal", "block_sparse", "topk"])
def test_strided_and_misaligned_views(dtype, pattern):
    """[B, S, H, D] transposed views (16B-aligned rows) and views into padded buffers (rows not
    16-byte aligned -> the element-load path) give the contiguous result."""
    B, S, H, D = 2, 130, 4, 64
    views = [randn(B, S, H, D, dtype=dtype).transpose(1, 2) for _ in range(3)]
    pat = PATTERNS[pattern](S, S, B, H, H)
    out = check_against_reference(*views, pat, "cuda")
    dense = flashlite.attention(*[t.contiguous() for t in views], pat, backend="cuda")
    torch.testing.assert_close(out, dense, rtol=0, atol=0)
    padded = [randn(B, H, S + 3, D + 5, dtype=dtype)[:, :, 1:S + 1, 2:D + 2] for _ in range(3)]
    check_against_reference(*padded, pat, "cuda")


@needs_backend
@pytest.mark.parametrize("pattern", ["full", "causal", "window", "block_sparse", "topk_causal"])
def test_backward_is_bitwise_deterministic(pattern):
    B, Hq, Hkv, N, D = 2, 8, 2, 513, 64
    q, k, v = (t.requires_grad_() for t in qkv(B, Hq, Hkv, N, N, D, torch.float16))
    pat = PATTERNS[pattern](N, N, B, Hq, Hkv)
    grads = []
    for _ in range(2):
        out = flashlite.attention(q, k, v, pat, backend="cuda")
        grads.append(torch.autograd.grad(out.float().square().sum(), (q, k, v)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@needs_backend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_atomic_backward_matches_deterministic(dtype, head_dim):
    """deterministic=False: dQ by fp32 atomics (tile engine), dK/dV scattered by atomics (top-k)."""
    C = _ext()
    B, Hq, Hkv, Nq, Nk = 1, 4, 2, 200, 300
    q, k, v = qkv(B, Hq, Hkv, Nq, Nk, head_dim, dtype)
    scale = head_dim ** -0.5
    block_m, block_n = C.cuda_tile_config(head_dim, dtype, 0, q.device.index)
    sched = Full(True).schedule(Nq, Nk, block_m, block_n, q.device)
    out, lse = C.cuda_tile_forward(q, k, v, sched.kv_tiles, sched.kv_count, None, sched.is_list, block_m, block_n,
                                   sched.window_left, sched.window_right, scale, 0.0)
    grad = torch.randn_like(out)
    args = (grad, q, k, v, out, lse, sched.kv_tiles, sched.kv_count, sched.q_tiles, sched.q_count, None,
            sched.is_list, block_m, block_n, sched.window_left, sched.window_right, scale, 0.0)
    exact, atomic = C.cuda_tile_backward(*args, True), C.cuda_tile_backward(*args, False)
    tol = dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(exact, atomic):
        torch.testing.assert_close(b.float(), a.float(), **tol)

    idx = canonical_rows(topk_indices(B, Hkv, Nq, Nk, 64), Nq, Nk, True)
    key_offsets, key_slots = key_index(idx, Nq, Nk, True)
    out, lse = C.cuda_gather_forward(q, k, v, indices=idx, alibi_slopes=None, causal=True, scale=scale, softcap=0.0)
    kw = dict(indices=idx, key_offsets=key_offsets, key_slots=key_slots, alibi_slopes=None, causal=True, scale=scale,
              softcap=0.0)
    exact = C.cuda_gather_backward(grad, q, k, v, out, lse, deterministic=True, **kw)
    atomic = C.cuda_gather_backward(grad, q, k, v, out, lse, deterministic=False, **kw)
    for a, b in zip(exact, atomic):
        torch.testing.assert_close(b.float(), a.float(), **tol)


@needs_backend
def test_empty_rows_and_no_keys():
    """Causal with Nq > Nk and a window that leaves rows empty: out 0, lse -inf, finite grads."""
    for dtype in DTYPES:
        q, k, v = qkv(1, 2, 2, 200, 64, 64, dtype)
        for pat in (Full(True), SlidingWindow(0, 0), TopK(topk_indices(1, 2, 200, 64, 8), causal=True)):
            out = check_against_reference(q, k, v, pat, "cuda")
            _, lse = flashlite.attention(q, k, v, pat, backend="cuda", return_lse=True)
            empty = torch.isneginf(lse)
            assert empty.any() and out[empty].abs().max() == 0


@needs_backend
def test_errors_name_the_argument():
    C = _ext()
    q, k, v = qkv(1, 2, 2, 16, 16, 64, torch.float16)
    sched = Full(False).schedule(16, 16, 128, 64, q.device)
    common = (sched.kv_tiles, sched.kv_count, None, False, 128, 64, 32, 32, 0.125, 0.0)
    with pytest.raises(ValueError, match="CUDA"):
        C.cuda_tile_forward(q.cpu(), k.cpu(), v.cpu(), *common)
    with pytest.raises(ValueError, match="same"):
        C.cuda_tile_forward(q, k.cpu(), v, *common)
    with pytest.raises(TypeError, match="dtype"):
        C.cuda_tile_forward(q, k.float(), v, *common)
    with pytest.raises(RuntimeError, match="tile"):  # not a tile shape of the CUDA kernels
        bad = Full(False).schedule(16, 16, 32, 32, q.device)
        C.cuda_tile_forward(q, k, v, bad.kv_tiles, bad.kv_count, None, False, 32, 32, 32, 32, 0.125, 0.0)
    with pytest.raises(ValueError, match="indices"):
        C.cuda_gather_forward(q, k, v, torch.zeros(1, 2, 16, 4, dtype=torch.int64), None, False, 0.125, 0.0)
    # the top-k backward's inverse index: its arguments are checked by name
    idx = canonical_rows(topk_indices(1, 2, 16, 16, 4), 16, 16, False)
    key_offsets, key_slots = key_index(idx, 16, 16, False)
    out, lse = C.cuda_gather_forward(q, k, v, idx, None, False, 0.125, 0.0)
    kw = dict(indices=idx, alibi_slopes=None, causal=False, scale=0.125, softcap=0.0, deterministic=True)
    with pytest.raises(ValueError, match="key_offsets"):
        C.cuda_gather_backward(out, q, k, v, out, lse, key_offsets=key_offsets[:-1], key_slots=key_slots, **kw)
    with pytest.raises(ValueError, match="key_slots"):
        C.cuda_gather_backward(out, q, k, v, out, lse, key_offsets=key_offsets, key_slots=key_slots.int(), **kw)
    with pytest.raises(ValueError, match="device"):
        C.cuda_tile_config(64, torch.float16, 0, torch.cuda.device_count())


@needs_backend
def test_tile_config_is_per_device():
    """cuda_tile_config(..., device) answers for that device, whatever the current device is."""
    C = _ext()
    for device in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(device)
        for d in (64, 128, 256):
            bm, bn = C.cuda_tile_config(d, torch.bfloat16, 0, device)
            assert (bm, bn) in {(128, 64), (128, 32), (64, 64), (64, 32)}, (props.name, d, bm, bn)
    if torch.cuda.device_count() < 2:
        pytest.skip("one device: the cross-device part needs two")
    q, k, v = qkv(1, 4, 2, 64, 300, 64, torch.float16)  # on cuda:0
    expect = flashlite.attention(q, k, v, Full(True), backend="cuda")
    with torch.cuda.device(0):  # current device 0, tensors on cuda:1: the binding guards their device
        got = flashlite.attention(q.to("cuda:1"), k.to("cuda:1"), v.to("cuda:1"), Full(True), backend="cuda")
    torch.testing.assert_close(got.cpu(), expect.cpu(), rtol=2e-3, atol=2e-3)  # tiles may differ per device


SANITIZER_SCRIPT = textwrap.dedent("""
    import torch, flashlite
    from flashlite import Full, SlidingWindow, BlockSparse, TopK
    torch.manual_seed(0)
    for dtype, D in ((torch.float16, 64), (torch.bfloat16, 256), (torch.float32, 40)):
        for (Nq, Nk, Hq, Hkv) in ((37, 70, 4, 2), (1, 300, 8, 2)):
            q = torch.randn(1, Hq, Nq, D, device="cuda", dtype=dtype, requires_grad=True)
            k = torch.randn(1, Hkv, Nk, D, device="cuda", dtype=dtype, requires_grad=True)
            v = torch.randn(1, Hkv, Nk, D, device="cuda", dtype=dtype, requires_grad=True)
            idx = torch.rand(1, Hkv, Nq, Nk, device="cuda").argsort(-1)[..., :9]
            layout = torch.rand(1, Hq, -(-Nq // 16), -(-Nk // 16), device="cuda") < 0.5
            for pat in (Full(True), SlidingWindow(5, 3), BlockSparse(layout, 16), TopK(idx, causal=True)):
                out = flashlite.attention(q, k, v, pat, backend="cuda")
                out.float().sum().backward()
    torch.cuda.synchronize()
    print("SANITIZER-RUN-OK")
""")


@needs_backend
@pytest.mark.skipif(os.environ.get("FLASHLITE_SANITIZER") != "1",
                    reason="compute-sanitizer runs take minutes: set FLASHLITE_SANITIZER=1")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer(tool, tmp_path):
    """memcheck (out-of-bounds/misaligned), racecheck (shared-memory hazards), synccheck (barriers)
    over every engine, dtype family and a decode shape."""
    sanitizer = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    script = tmp_path / "sanitize.py"
    script.write_text(SANITIZER_SCRIPT)
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    result = subprocess.run([sanitizer, f"--tool={tool}", "--error-exitcode=3", sys.executable, str(script)],
                            capture_output=True, text=True, timeout=900, env=env)
    log = result.stdout[-6000:] + result.stderr[-6000:]
    assert result.returncode == 0 and "SANITIZER-RUN-OK" in result.stdout, log
