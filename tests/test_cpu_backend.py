"""The C++ CPU backend ("cpu", flashlite._C) beyond the shared suite: bfloat16, odd head dims, every
instruction-set build of the kernels, the gather (top-k) path, determinism across thread counts,
auto-dispatch, and the fallback when the extension is missing. Every numeric check applies
the correctness rule of docs/design.md (conftest.check_against_reference)."""
from __future__ import annotations

import warnings

import pytest
import torch

import flashlite
from flashlite import BlockSparse, Full, SlidingWindow, TopK
from flashlite.core.schedule import cdiv

from conftest import check_against_reference

CPU = torch.device("cpu")
HAVE_CPU_BACKEND = flashlite.backends()["cpu"] == "available"
pytestmark = pytest.mark.skipif(not HAVE_CPU_BACKEND, reason=f"cpu backend: {flashlite.backends()['cpu']}")
LOW_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def cpu_randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=CPU).to(dtype)


def qkv(B, Hq, Hkv, Nq, Nk, D, dtype=torch.float32):
    return cpu_randn(B, Hq, Nq, D, dtype=dtype), cpu_randn(B, Hkv, Nk, D, dtype=dtype), cpu_randn(B, Hkv, Nk, D, dtype=dtype)


def distinct_indices(prefix, seqlen_k: int, width: int, empty: float = 0.0, dtype=torch.int64) -> torch.Tensor:
    """``width`` distinct keys per row (``-1`` past Nk), a share ``empty`` of the slots set to -1."""
    draws = torch.rand(*prefix, max(seqlen_k, width))
    draws[..., seqlen_k:] = 2.0
    order = draws.argsort(-1)[..., :width]
    order = torch.where(order < seqlen_k, order, torch.full_like(order, -1))
    if empty:
        order = torch.where(torch.rand(order.shape) < empty, torch.full_like(order, -1), order)
    return order.to(dtype)


@pytest.fixture
def ext():
    from flashlite import _C

    return _C


@pytest.fixture(params=["best", "other builds"])
def isa(request, ext):
    """Run on the best kernel build, then on every other build this CPU can run."""
    names = ext.cpu_isas()
    before = ext.cpu_isa()
    chosen = names if request.param == "other builds" else names[:1]
    yield chosen
    ext.cpu_set_isa(before)


# ----- tile engine ---------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["full", "causal", "window", "block_sparse"])
def test_bfloat16(pattern):
    B, Hq, Hkv, Nq, Nk, D = 2, 4, 2, 70, 93, 64
    made = {"full": Full(False), "causal": Full(True), "window": SlidingWindow(20, 5),
            "block_sparse": BlockSparse(torch.rand(1, Hq, cdiv(Nq, 32), cdiv(Nk, 32)) < 0.5, 32)}[pattern]
    check_against_reference(*qkv(B, Hq, Hkv, Nq, Nk, D, torch.bfloat16), made, "cpu")


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [8, 59, 256])
def test_head_dims(dtype, head_dim):
    check_against_reference(*qkv(1, 2, 1, 45, 77, head_dim, dtype), Full(True), "cpu")


def test_every_instruction_set_build(ext, isa):
    """Each runnable build (avx512 / avx2 / baseline on x86-64) on float16 with softcap and ALiBi, a
    head dim that is no multiple of the vector width, and a block-sparse schedule."""
    for name in isa:
        ext.cpu_set_isa(name)
        q, k, v = qkv(1, 4, 2, 50, 67, 40, torch.float16)
        check_against_reference(q * 2, k, v, Full(True), "cpu", softcap=4.0, alibi_slopes=torch.rand(4))
        layout = torch.rand(1, 1, cdiv(50, 16), cdiv(67, 16)) < 0.5
        check_against_reference(*qkv(1, 2, 2, 50, 67, 64), BlockSparse(layout, 16), "cpu")
        indices = distinct_indices((1, 2, 50), 67, 9, empty=0.2)
        check_against_reference(*qkv(1, 4, 2, 50, 67, 59, torch.bfloat16), TopK(indices, causal=True), "cpu")
        # float32 rows of whole vectors: addresses computed L/2 slots at a time, then a tail (K = 9)
        check_against_reference(*qkv(1, 4, 2, 50, 67, 64), TopK(indices, causal=True), "cpu")


def test_decode_and_long_band():
    """One query over many keys, and a window whose band crosses many tiles."""
    check_against_reference(*qkv(2, 4, 1, 1, 300, 64), Full(True), "cpu")
    check_against_reference(*qkv(1, 2, 2, 260, 260, 32), SlidingWindow(70, 10), "cpu")


# Decode (at most 4 query rows) runs a row kernel with the keys along the vector lanes, one work
# item per KV head when the group shares its schedule rows, else per head; 5 rows is the tile kernel.
def decode_pattern(name: str, Hq: int, Nq: int, Nk: int):
    blocks = (cdiv(Nq, 16), cdiv(Nk, 16))
    if name == "block_sparse_shared":  # one layout for every head: the group shares each key tile
        layout = torch.rand(1, 1, *blocks) < 0.5
        layout[..., -1] = True
        return BlockSparse(layout, 16)
    if name == "block_sparse_per_head":  # a layout per head; head 1 sees no key at all
        layout = torch.rand(1, Hq, *blocks) < 0.5
        layout[:, 1] = False
        return BlockSparse(layout, 16)
    return {"full": Full(False), "causal": Full(True), "window": SlidingWindow(5, 0),
            "window_both_sides": SlidingWindow(40, 3)}[name]


@pytest.mark.parametrize("rows", [1, 3, 4, 5])
@pytest.mark.parametrize("pattern", ["full", "causal", "window", "window_both_sides", "block_sparse_shared",
                                     "block_sparse_per_head"])
@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 64), (torch.float16, 40), (torch.bfloat16, 128)], ids=str)
def test_decode_rows(ext, isa, rows, pattern, dtype, head_dim):
    B, Hq, Hkv, Nk = 1, 8, 2, 133
    made = decode_pattern(pattern, Hq, rows, Nk)
    for name in isa:
        ext.cpu_set_isa(name)
        check_against_reference(*qkv(B, Hq, Hkv, rows, Nk, head_dim, dtype), made, "cpu")


@pytest.mark.parametrize("softcap,alibi", [(4.0, False), (None, True), (3.0, True)], ids=str)
def test_decode_rows_softcap_alibi_mqa(softcap, alibi):
    q, k, v = qkv(1, 6, 1, 3, 130, 64)
    slopes = torch.rand(6) * 0.5 if alibi else None
    check_against_reference(q * 3, k, v, Full(True), "cpu", softcap=softcap, alibi_slopes=slopes)


def test_decode_rows_with_more_queries_than_keys():
    """Causal, 3 queries over 2 keys: the first query sees no key (zeros, lse -inf)."""
    out = check_against_reference(*qkv(1, 4, 2, 3, 2, 64), Full(True), "cpu")
    assert out[:, :, 0].abs().max() == 0


@pytest.mark.parametrize("pattern", ["causal", "window_both_sides", "block_sparse_shared", "block_sparse_per_head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_split_keys(pattern, dtype):
    """A long cache is split into ~512-key pieces merged in order (2500 keys: 4 pieces of uneven
    tile counts, 5000: 9, some left empty by a layout); the same bits for 1, 2 and 3 threads."""
    threads = torch.get_num_threads()
    for Nk in (2500, 5000):
        q, k, v = qkv(1, 4, 1, 2, Nk, 64, dtype)
        made = decode_pattern(pattern, 4, 2, Nk)
        if pattern == "window_both_sides":
            made = SlidingWindow(1500, 3)  # spans both pieces
        results = []
        try:
            for count in (1, 2, 3):
                torch.set_num_threads(count)
                results.append(check_against_reference(q, k, v, made, "cpu", grads=count == 1))
        finally:
            torch.set_num_threads(threads)
        assert all(torch.equal(results[0], other) for other in results[1:])


def test_cpu_tile_table_holds_for_every_head_dim_and_dtype(ext):
    """The backend reads the C++ tile rule once per block size into a table (so torch.compile plans
    without calling the extension); the rule must not depend on head_dim or dtype."""
    from flashlite import backend
    from flashlite.backend.base import Request

    cpu = backend.get("cpu")
    for dtype in LOW_DTYPES:
        for head_dim in (1, 8, 40, 59, 64, 128, 256):
            for block_size in (0, 16, 32, 64, 128):
                req = Request("cpu", dtype, head_dim, "tile", "block_sparse", block_size=block_size or None)
                config = cpu.tile_config(req, torch.device("cpu"))
                assert (config.block_m, config.block_n) == tuple(ext.cpu_tile_config(head_dim, dtype, block_size))


def test_set_isa_rejects_unknown(ext):
    with pytest.raises(ValueError, match="not one of"):
        ext.cpu_set_isa("sse9000")


# ----- gather engine (top-k) -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 2, 33, 50, 64, 8), (1, 3, 1, 17, 40, 59, 5), (1, 2, 2, 1, 64, 40, 20),
                                   (1, 2, 1, 40, 16, 64, 6)],
                         ids=str)
def test_topk_per_query(dtype, causal, shape):
    B, Hq, Hkv, Nq, Nk, D, K = shape
    indices = distinct_indices((B, Hkv, Nq), Nk, K, empty=0.25)
    check_against_reference(*qkv(B, Hq, Hkv, Nq, Nk, D, dtype), TopK(indices, causal), "cpu")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("index_heads", ["per_kv_head", "broadcast"])
def test_topk_shared_indices(causal, index_heads):
    B, Hq, Hkv, Nq, Nk, D, K = 2, 4, 2, 29, 41, 64, 12
    indices = distinct_indices((B, Hkv if index_heads == "per_kv_head" else 1), Nk, K, empty=0.2)
    check_against_reference(*qkv(B, Hq, Hkv, Nq, Nk, D), TopK(indices, causal), "cpu")


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_topk_empty_rows_k1_and_index_dtypes(index_dtype):
    """K = 1, rows whose only slot is -1 or (causal) after p(i): zeros, lse -inf, finite grads."""
    B, Hq, Hkv, Nq, Nk, D = 1, 2, 1, 24, 24, 32
    indices = distinct_indices((B, Hkv, Nq), Nk, 1, dtype=index_dtype)
    indices[:, :, :5] = -1
    q, k, v = qkv(B, Hq, Hkv, Nq, Nk, D)
    out = check_against_reference(q, k, v, TopK(indices, causal=True), "cpu")
    _, lse = flashlite.topk_attention(q, k, v, indices, causal=True, backend="cpu", return_lse=True)
    empty = torch.isneginf(lse)
    assert empty[:, :, :5].all() and empty.sum() >= 5 * Hq
    assert out[empty].abs().max() == 0


def test_topk_all_slots_selected_and_softcap_alibi():
    """K = Nk (every key, in a shuffled order) equals full attention; softcap and ALiBi on the gather path."""
    B, Hq, Hkv, Nq, Nk, D = 1, 4, 2, 20, 31, 64
    indices = distinct_indices((B, Hkv, Nq), Nk, Nk)
    q, k, v = qkv(B, Hq, Hkv, Nq, Nk, D)
    got = flashlite.topk_attention(q, k, v, indices, backend="cpu")
    want = flashlite.attention(q, k, v, Full(False), backend="cpu")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    check_against_reference(q * 3, k, v, TopK(indices[..., :9], causal=True), "cpu", softcap=5.0,
                            alibi_slopes=torch.rand(B, Hq))


def test_topk_strided_inputs():
    """[B, S, H, D] views and a non-contiguous index tensor."""
    B, S, H, D, K = 2, 37, 2, 64, 6
    q, k, v = (cpu_randn(B, S, H, D).transpose(1, 2) for _ in range(3))
    indices = distinct_indices((B, S, H), S, K).transpose(1, 2)
    assert not indices.is_contiguous() and not q.is_contiguous()
    check_against_reference(q, k, v, TopK(indices, causal=True), "cpu")


# ----- odd shapes (what `make sanitize` runs under AddressSanitizer + UBSan) --------------------
@pytest.mark.parametrize("case", ["tails", "gqa_d1", "d256", "empty_rows", "empty_seqs", "blocks_tail"])
def test_odd_shapes(case):
    """Tails of every tile and vector (Nq, Nk, D not multiples of anything), head dims 1 and 256,
    GQA/MQA, queries that see no key, empty sequences and batches, a block-sparse layout with a
    partial last block: forward and gradients by the correctness rule."""
    if case == "tails":
        check_against_reference(*qkv(1, 3, 1, 67, 131, 17), SlidingWindow(70, 3), "cpu")
    elif case == "gqa_d1":
        check_against_reference(*qkv(2, 4, 2, 5, 3, 1), Full(False), "cpu")
    elif case == "d256":
        check_against_reference(*qkv(1, 2, 1, 65, 66, 256, torch.bfloat16), Full(True), "cpu", softcap=20.0)
    elif case == "empty_rows":  # Nq > Nk under causal: the first Nq - Nk queries see nothing
        q, k, v = qkv(1, 2, 1, 70, 9, 40)
        out = check_against_reference(q, k, v, Full(True), "cpu")
        assert out[:, :, :61].abs().max() == 0
    elif case == "empty_seqs":
        for shape in ((1, 2, 1, 0, 9, 16), (1, 2, 1, 9, 0, 16), (0, 2, 1, 9, 9, 16)):
            q, k, v = (t.requires_grad_() for t in qkv(*shape))
            out, lse = flashlite.attention(q, k, v, Full(False), backend="cpu", return_lse=True)
            assert out.shape == q.shape and not out.isnan().any() and (lse.numel() == 0 or lse.isneginf().all())
            out.sum().backward()
            assert all(t.grad is not None and not t.grad.isnan().any() for t in (q, k, v))
    elif case == "blocks_tail":
        layout = torch.rand(1, 2, cdiv(50, 16), cdiv(75, 16)) < 0.5
        layout[..., -1, -1] = True
        check_against_reference(*qkv(1, 2, 2, 50, 75, 24), BlockSparse(layout, 16), "cpu")


@pytest.mark.parametrize("causal", [False, True])
def test_topk_repeated_keys_and_empty_slots(causal):
    """Rows listing keys several times (counted once), -1 slots, rows with nothing valid, K > Nk."""
    B, Hq, Hkv, Nq, Nk, D, K = 2, 4, 2, 21, 13, 20, 19
    indices = torch.randint(-1, Nk, (B, Hkv, Nq, K))
    indices[:, :, 3] = -1  # a row with no key
    indices[:, :, 4] = 5  # one key, listed K times
    out = check_against_reference(*qkv(B, Hq, Hkv, Nq, Nk, D), TopK(indices, causal), "cpu")
    assert out[:, :, 3].abs().max() == 0


# ----- determinism, dispatch, fallback -------------------------------------------------------
@pytest.mark.parametrize("pattern", ["causal", "topk", "block_sparse_softcap", "window_bf16"])
def test_backward_is_deterministic_across_thread_counts(pattern):
    """1, 2 and 3 threads give the same bits. For the tile engine this also compares its two
    backward schemes: one thread runs whole heads (tile_backward_head), 2 and 3 threads on one KV
    head run key tiles then query tiles (csrc/cpu/driver.cpp)."""
    B, Hq, Hkv, Nq, Nk, D = 1, 4, 1, 130, 140, 64
    dtype = torch.bfloat16 if pattern == "window_bf16" else torch.float32
    q, k, v = qkv(B, Hq, Hkv, Nq, Nk, D, dtype)
    kw = {}
    if pattern == "causal":
        made = Full(True)
    elif pattern == "topk":
        made = TopK(distinct_indices((B, Hkv, Nq), Nk, 16))
    elif pattern == "block_sparse_softcap":
        layout = torch.rand(1, Hq, cdiv(Nq, 32), cdiv(Nk, 32)) < 0.5
        layout[..., 0] = True
        made, kw = BlockSparse(layout, 32), {"softcap": 10.0}
    else:
        made = SlidingWindow(40, 7)
    grad = torch.randn(B, Hq, Nq, D).to(dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            flashlite.attention(*leaves, made, backend="cpu", **kw).backward(grad)
            results.append([t.grad for t in leaves])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_auto_dispatch_picks_cpu_for_cpu_tensors():
    q, k, v = qkv(1, 2, 2, 16, 16, 32)
    flashlite.attention(q, k, v, Full(True))
    assert flashlite.last_backend() == "cpu"
    flashlite.topk_attention(q, k, v, distinct_indices((1, 2, 16), 16, 4))
    assert flashlite.last_backend() == "cpu"


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    """Without flashlite._C: one warning saying how to build it, backends() gives the reason,
    and CPU tensors run on the reference."""
    import sys

    from flashlite import backend as _backends
    from flashlite.backend import native

    monkeypatch.setitem(sys.modules, "flashlite._C", None)  # makes `import flashlite._C` fail
    monkeypatch.setattr(native, "missing_reason", None)
    monkeypatch.setattr(_backends, "_native_loaded", False)
    registry = {name: b for name, b in _backends._REGISTRY.items() if name not in ("cpu", "cuda")}
    monkeypatch.setattr(_backends, "_REGISTRY", registry)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _backends.report()
        _backends.report()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "pip install --no-build-isolation" in messages[0]
    report = flashlite.backends()
    assert "flashlite._C" in report["cpu"] and "pip install" in report["cpu"]
    q, k, v = qkv(1, 2, 2, 8, 8, 16)
    flashlite.attention(q, k, v, Full(True))
    assert flashlite.last_backend() == "reference"
