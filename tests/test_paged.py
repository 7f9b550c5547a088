"""flashlite.paged_attention and flashlite.PagedKVCache: paged KV caches (issue 17, items 1 and 2).

The oracle is independent of flashlite's paged pattern: each sequence's keys are gathered
contiguously here (a Python loop over its pages) and the float64 reference runs on them with the
sequence's own pattern (bottom-right alignment, so query i sits at cache_seqlens[b] − Nq + i).
Every backend is held to the correctness rule (conftest) for out and lse.

The cpu backend serves Full and SlidingWindow on its tile kernels (the block table read per key
tile; decode rows for Nq <= 4, the query-major tile beyond), TopK on the gather kernels; the
cases cover page sizes 16 to 256 and pages the 64-key tile does not divide (24, 48), split key
ranges (sequences over 1024 keys) and their thread-count independence.
"""
from __future__ import annotations

import pytest
import torch

import flashlite
from flashlite import BlockSparse, Full, SlidingWindow, TopK, reference
from flashlite.core.paged import Paged
from flashlite.paged_cache import PagePoolExhausted

from conftest import DEVICE, DTYPES, assert_rule, kernel_backends, randn

BACKENDS = ["reference"] + kernel_backends()
HQ, HKV, D = 4, 2, 16
# (page_size, Nq, key lengths): sequences shorter than one page, exactly one page, several pages.
CASES = {
    "ps16_decode": (16, 1, [37, 5, 64, 1, 16]),
    "ps32_prefill": (32, 4, [37, 4, 70, 32]),
    "ps64_prefill": (64, 3, [3, 130, 64]),
    # tile engine shapes (cpu): long rows split over threads, query-major prefill, tiles across pages
    "ps128_decode_split": (128, 1, [1100, 129, 7]),
    "ps256_prefill": (256, 6, [600, 6]),
    "ps48_decode": (48, 2, [200, 47, 97]),
    "ps24_prefill": (24, 7, [150, 30, 7]),
}
INTERPRETED = ("ps16_decode", "ps32_prefill")  # the cases the Triton interpreter runs (gather engine)
PATTERNS = ["full", "causal", "window", "topk", "topk_shared"]


def make_pool(num_pages, page_size, dtype, heads_kv=HKV, dim=D):
    shape = (num_pages, page_size, heads_kv, dim)
    return randn(*shape, dtype=dtype), randn(*shape, dtype=dtype)


def make_table(lengths, page_size, num_pages, extra=2, seed=0):
    """Shuffled pages; unused entries hold garbage (-1 and out-of-range ids) that must never be read."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_pages, generator=gen).tolist()
    width = max(-(-n // page_size) for n in lengths) + extra
    table = torch.empty(len(lengths), width, dtype=torch.int32)
    table[:, 0::2], table[:, 1::2] = -1, num_pages + 7
    used = 0
    for b, n in enumerate(lengths):
        pages = -(-n // page_size)
        table[b, :pages] = torch.tensor(perm[used:used + pages], dtype=torch.int32)
        used += pages
    assert used <= num_pages
    return table.to(DEVICE), torch.tensor(lengths, dtype=torch.int32, device=DEVICE)


def gather(cache, table, b, length, page_size):
    """Sequence b's keys ``[1, Hkv, L, D]``, page by page (the oracle's own gather)."""
    parts = [cache[int(table[b, j // page_size])][j % page_size] for j in range(length)]
    return torch.stack(parts, 0).transpose(0, 1).unsqueeze(0)


def make_pattern(name, lengths, nq, heads_kv=HKV, top_k=6, seed=1):
    """(paged pattern, per-sequence pattern maker)."""
    if name in ("full", "causal"):
        pattern = Full(causal=name == "causal")
        return pattern, lambda b: pattern
    if name == "window":
        pattern = SlidingWindow(9, 2)
        return pattern, lambda b: pattern
    gen = torch.Generator().manual_seed(seed)
    shape = (len(lengths), heads_kv, nq, top_k) if name == "topk" else (len(lengths), 1, top_k)
    ind = torch.stack([torch.randint(-1, n, shape[1:], generator=gen) for n in lengths]).to(torch.int32).to(DEVICE)
    pattern = TopK(ind, causal=name == "topk")
    return pattern, lambda b: TopK(ind[b:b + 1], causal=pattern.causal)


def oracle(q, k_cache, v_cache, table, lengths, page_size, per_sequence, compute_dtype):
    outs, lses = [], []
    for b, n in enumerate(lengths):
        k = gather(k_cache, table, b, n, page_size)
        v = gather(v_cache, table, b, n, page_size)
        qb = q[b:b + 1]
        if compute_dtype == torch.float64:
            qb, k, v = qb.double(), k.double(), v.double()
        out, lse = reference.attention(qb, k, v, per_sequence(b), return_lse=True, compute_dtype=compute_dtype)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def check(q, k_cache, v_cache, table, seqlens, pattern, per_sequence, backend):
    lengths, page_size = seqlens.tolist(), k_cache.shape[1]
    out, lse = flashlite.paged_attention(q, k_cache, v_cache, table, seqlens, pattern, backend=backend,
                                         return_lse=True)
    assert flashlite.last_backend() == backend
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert not torch.isnan(out).any()
    exact = oracle(q, k_cache, v_cache, table, lengths, page_size, per_sequence, torch.float64)
    lowp = oracle(q, k_cache, v_cache, table, lengths, page_size, per_sequence, None)
    f32 = oracle(q, k_cache, v_cache, table, lengths, page_size, per_sequence, torch.float32)
    assert_rule("out", out, lowp[0], exact[0], fallback=f32[0])
    assert_rule("lse", lse, lowp[1], exact[1], fallback=f32[1])
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", PATTERNS)
def test_against_oracle(backend, dtype, case, name):
    if backend == "triton" and DEVICE.type == "cpu" and (dtype != torch.float32 or case not in INTERPRETED):
        pytest.skip("the Triton interpreter is slow: one dtype and two page sizes under it")
    page_size, nq, lengths = CASES[case]
    torch.manual_seed(hash((case, name)) % 1000)
    num_pages = sum(-(-n // page_size) for n in lengths) + 3
    k_cache, v_cache = make_pool(num_pages, page_size, dtype)
    table, seqlens = make_table(lengths, page_size, num_pages)
    q = randn(len(lengths), HQ, nq, D, dtype=dtype)
    pattern, per_sequence = make_pattern(name, lengths, nq)
    check(q, k_cache, v_cache, table, seqlens, pattern, per_sequence, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mqa_softcap_scale_and_plan_reuse(backend):
    page_size, nq, lengths = 16, 2, [20, 2, 33]
    k_cache, v_cache = make_pool(12, page_size, torch.float32, heads_kv=1)
    table, seqlens = make_table(lengths, page_size, 12)
    q = randn(3, HQ, nq, D)
    kw = dict(scale=0.3, softcap=5.0, backend=backend)
    out = flashlite.paged_attention(q, k_cache, v_cache, table, seqlens, Full(causal=True), **kw)
    again = flashlite.paged_attention(q, k_cache, v_cache, table, seqlens, Full(causal=True), **kw)
    assert torch.equal(out, again)
    for b, n in enumerate(lengths):
        k, v = gather(k_cache, table, b, n, page_size), gather(v_cache, table, b, n, page_size)
        want = reference.attention(q[b:b + 1].double(), k.double(), v.double(), Full(causal=True), scale=0.3,
                                   softcap=5.0, compute_dtype=torch.float64)
        torch.testing.assert_close(out[b:b + 1].double(), want, atol=2e-5, rtol=0)


def test_physical_rows_skip_pages_outside_the_window():
    """The plan's rows name only slots inside some query's window: the other pages are never read."""
    page_size, lengths = 16, [200, 70]
    table, seqlens = make_table(lengths, page_size, 40)
    pattern = Paged(SlidingWindow(20, 0), table, seqlens, page_size, 2)
    rows = pattern.gather_indices()
    pages = set((rows[rows >= 0] // page_size).tolist())
    want = set()
    for b, n in enumerate(lengths):
        for j in range(n - 2 - 20, n):
            want.add(int(table[b, j // page_size]))
    assert pages == want
    assert rows.shape == (1, 1, 4, 21)  # left + 1 keys per query


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("nq", [1, 6])
def test_window_never_reads_pages_outside(backend, nq):
    """Pages wholly outside every query's window hold NaN: any read of them would show. (Nq = 6 on
    the cpu backend: the query-major tile kernel; Nq = 1: the decode rows.)"""
    if backend == "triton" and nq > 1:
        pytest.skip("the Triton interpreter is slow: the gather engine's rows are the same for any Nq")
    page_size, lengths = 16, [100, 50]
    k_cache, v_cache = make_pool(20, page_size, torch.float32)
    table, seqlens = make_table(lengths, page_size, 20)
    q = randn(2, HQ, nq, D)
    want = flashlite.paged_attention(q, k_cache, v_cache, table, seqlens, SlidingWindow(10), backend="reference")
    inside = {int(table[b, j // page_size]) for b, n in enumerate(lengths) for j in range(n - nq - 10, n)}
    for page in range(20):
        if page not in inside:
            k_cache[page], v_cache[page] = float("nan"), float("nan")
    got = flashlite.paged_attention(q, k_cache, v_cache, table, seqlens, SlidingWindow(10), backend=backend)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("reference", "cpu")])
@pytest.mark.parametrize("nq", [1, 5])
@pytest.mark.parametrize("name", ["causal", "window"])
def test_alibi_at_logical_positions(backend, nq, name):
    """ALiBi on the tile plan and the reference: −slope·|p(i) − j| with logical positions, per-head
    slopes [Hq] and per-sequence [B, Hq]."""
    if backend == "cpu" and not flashlite.backend.get("cpu").paged_tiles:
        pytest.skip("this build's cpu tile kernels take no block table (the gather plan rejects ALiBi)")
    page_size, lengths = 16, [70, 9, 300]
    num_pages = sum(-(-n // page_size) for n in lengths) + 2
    k_cache, v_cache = make_pool(num_pages, page_size, torch.float32)
    table, seqlens = make_table(lengths, page_size, num_pages)
    q = randn(len(lengths), HQ, nq, D)
    pattern, per_sequence = make_pattern(name, lengths, nq)
    for slopes in (torch.rand(HQ, device=DEVICE), torch.rand(len(lengths), HQ, device=DEVICE)):
        out = flashlite.paged_attention(q, k_cache, v_cache, table, seqlens, pattern, alibi_slopes=slopes,
                                        backend=backend)
        assert flashlite.last_backend() == backend
        for b, n in enumerate(lengths):
            k, v = gather(k_cache, table, b, n, page_size), gather(v_cache, table, b, n, page_size)
            row = slopes if slopes.dim() == 1 else slopes[b]
            want = reference.attention(q[b:b + 1].double(), k.double(), v.double(), per_sequence(b),
                                       alibi_slopes=row.double(), compute_dtype=torch.float64)
            torch.testing.assert_close(out[b:b + 1].double(), want, atol=2e-5, rtol=0)


@pytest.mark.skipif("cpu" not in BACKENDS or not getattr(flashlite.backend.get("cpu"), "paged_tiles", False),
                    reason="the cpu backend is not built, or built before its tile kernels took a block table")
@pytest.mark.parametrize("nq", [1, 5])
def test_cpu_tiles_same_bits_for_any_thread_count(nq):
    """The split of long rows (decode) and the work items depend on the sizes only: 1, 2 and 3
    threads give the same bits. Also: the cpu backend runs the tile plan (not gather rows)."""
    page_size, lengths = 32, [2100, 40, 1300]
    num_pages = sum(-(-n // page_size) for n in lengths) + 2
    k_cache, v_cache = make_pool(num_pages, page_size, torch.float32)
    table, seqlens = make_table(lengths, page_size, num_pages)
    q = randn(len(lengths), HQ, nq, D)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(flashlite.paged_attention(q, k_cache, v_cache, table, seqlens, Full(causal=True),
                                                     backend="cpu", return_lse=True))
    finally:
        torch.set_num_threads(threads)
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])
    plans = [value for _, value in flashlite.dispatch.plan.CACHE.entries.values()
             if getattr(value, "schedule", None) is not None and value.schedule.block_table is not None]
    assert plans and plans[-1].engine == "tile" and plans[-1].schedule.kv_tiles.shape[0] == len(lengths)


def test_forward_only_and_empty():
    k_cache, v_cache = make_pool(4, 16, torch.float32)
    table, seqlens = make_table([5], 16, 4)
    q = randn(1, HQ, 1, D, requires_grad=True)
    out = flashlite.paged_attention(q, k_cache, v_cache, table, seqlens)
    assert not out.requires_grad
    empty = flashlite.paged_attention(q[:, :, :0], k_cache, v_cache, table, seqlens, return_lse=True)
    assert empty[0].shape == (1, HQ, 0, D) and empty[1].shape == (1, HQ, 0)


def test_bad_arguments_name_the_argument():
    k_cache, v_cache = make_pool(6, 16, torch.float32)
    table, seqlens = make_table([20, 3], 16, 6)
    q = randn(2, HQ, 1, D)
    run = flashlite.paged_attention

    def raises(match, *args, error=(ValueError, TypeError), **kw):
        with pytest.raises(error, match=match):
            run(*args, **kw)

    raises("block_table", q, k_cache, v_cache, table.long(), seqlens)
    raises("block_table", q, k_cache, v_cache, table[:1], seqlens)
    raises("cache_seqlens", q, k_cache, v_cache, table, seqlens.long())
    raises("cache_seqlens", q, k_cache, v_cache, table, seqlens[:1])
    raises("k_cache", q, k_cache.half(), v_cache, table, seqlens)
    raises("v_cache", q, k_cache, v_cache[:, :8], table, seqlens)
    raises("k_cache", q, k_cache[..., :8], v_cache[..., :8], table, seqlens)
    raises("q", q[0], k_cache, v_cache, table, seqlens)
    ind = torch.zeros(2, 1, 1, dtype=torch.int32, device=DEVICE)
    raises("alibi_slopes", q, k_cache, v_cache, table, seqlens, TopK(ind), alibi_slopes=torch.ones(HQ, device=DEVICE))
    raises("alibi_slopes", q, k_cache, v_cache, table, seqlens, alibi_slopes=torch.ones(3, HQ, device=DEVICE))
    raises("alibi_slopes", q, k_cache, v_cache, table, seqlens, alibi_slopes=torch.ones(HQ, device=DEVICE),
           backend="triton")  # gather rows: physical slots
    raises("pattern", q, k_cache, v_cache, table, seqlens, BlockSparse(torch.ones(1, 1, 1, 1, dtype=torch.bool), 16))
    # Values: checked when the plan is built (every backend).
    for backend in BACKENDS:
        raises("cache_seqlens", q[:, :, :1].expand(2, HQ, 4, D), k_cache, v_cache, table, seqlens, backend=backend)
        bad = table.clone()
        bad[0, 1] = 6  # a page the sequence uses (20 keys: pages 0 and 1)
        raises(r"block_table\[0, 1\]", q, k_cache, v_cache, bad, seqlens, backend=backend)
        bad[0, 1] = -1
        raises(r"block_table\[0, 1\]", q, k_cache, v_cache, bad, seqlens, backend=backend)
        raises("block_table is too narrow", q, k_cache, v_cache, table[:, :1].contiguous(), seqlens, backend=backend)
        ind = torch.tensor([[[3]], [[3]]], dtype=torch.int32, device=DEVICE)  # sequence 1 has 3 keys
        raises("indices", q, k_cache, v_cache, table, seqlens, TopK(ind), backend=backend)
    raises("indices", q, k_cache, v_cache, table, seqlens, TopK(torch.zeros(2, 3, 1, 2, dtype=torch.int32)))


# -- the pool ----------------------------------------------------------------------------------------------

def contiguous_oracle(q, ks, vs, pattern):
    """Each sequence's appended keys concatenated (what the pool must have stored)."""
    outs = [reference.attention(q[b:b + 1].double(), ks[b].double(), vs[b].double(), pattern,
                                compute_dtype=torch.float64) for b in range(len(ks))]
    return torch.cat(outs)


@pytest.mark.parametrize("backend", ["reference", "cpu"] if "cpu" in BACKENDS else ["reference"])
def test_pool_append_attend_free_reuse(backend):
    cache = flashlite.PagedKVCache(10, 16, HKV, D, dtype=torch.float32, device=DEVICE)
    assert cache.pages_free == 10
    ids = [cache.new_sequence() for _ in range(3)]
    history = {s: (torch.zeros(1, HKV, 0, D, device=DEVICE),) * 2 for s in ids}

    def append(seq_ids, n):
        k, v = randn(len(seq_ids), HKV, n, D), randn(len(seq_ids), HKV, n, D)
        cache.append(seq_ids, k, v)
        for r, s in enumerate(seq_ids):
            hk, hv = history[s]
            history[s] = (torch.cat([hk, k[r:r + 1]], 2), torch.cat([hv, v[r:r + 1]], 2))

    def attend(seq_ids, pattern):
        q = randn(len(seq_ids), HQ, 1, D)
        got = cache.attend(q, seq_ids, pattern, backend=backend)
        want = contiguous_oracle(q, [history[s][0] for s in seq_ids], [history[s][1] for s in seq_ids], pattern)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)

    append(ids, 5)           # each shorter than one page
    append(ids[:2], 20)      # crossing page boundaries
    append([ids[0]], 17)
    assert cache.seqlens(ids).tolist() == [42, 25, 5]
    assert cache.pages_free == 10 - (3 + 2 + 1)
    table = cache.block_table(ids)
    assert table.dtype == torch.int32 and (table[2, 1:] == -1).all()
    for pattern in (Full(), Full(causal=True), SlidingWindow(7)):
        attend(ids, pattern)
    attend([ids[2], ids[0]], Full(causal=True))  # any order, any subset

    # Stable tables: the same tensors, unchanged versions when nothing changed (the plan is reused).
    seqlens = cache.seqlens(ids)
    versions = (table._version, seqlens._version)
    assert cache.block_table(ids) is table and cache.seqlens(ids) is seqlens
    attend(ids, Full())
    assert (table._version, seqlens._version) == versions
    append([ids[1]], 1)  # a step: rewritten in place
    assert cache.block_table(ids) is table and cache.seqlens(ids).tolist() == [42, 26, 5]

    freed = set(cache.block_table([ids[0]])[0, :3].tolist())
    cache.free(ids[0])
    assert cache.pages_free == 4 + 3
    with pytest.raises(ValueError, match="seq_ids"):
        cache.block_table([ids[0]])
    new = cache.new_sequence()
    history[new] = (torch.zeros(1, HKV, 0, D, device=DEVICE),) * 2
    append([new], 40)
    assert set(cache.block_table([new])[0, :3].tolist()) == freed  # freed pages are reused
    attend([ids[1], new, ids[2]], Full(causal=True))


def test_pool_exhausted_is_atomic():
    cache = flashlite.PagedKVCache(4, 16, HKV, D, dtype=torch.float16, device=DEVICE)
    a, b = cache.new_sequence(), cache.new_sequence()
    cache.append([a, b], randn(2, HKV, 20, D, dtype=torch.float16), randn(2, HKV, 20, D, dtype=torch.float16))
    assert cache.pages_free == 0
    cache.append([a], randn(1, HKV, 12, D, dtype=torch.float16), randn(1, HKV, 12, D, dtype=torch.float16))  # fits
    table, seqlens = cache.block_table([a, b]), cache.seqlens([a, b])
    before = [t.clone() for t in (cache.k_cache, cache.v_cache, table, seqlens)]
    with pytest.raises(PagePoolExhausted, match="nothing was written"):
        # a's page is full; b would fit in its own page, a would need a new one: neither is written.
        cache.append([b, a], randn(2, HKV, 1, D, dtype=torch.float16), randn(2, HKV, 1, D, dtype=torch.float16))
    after = (cache.k_cache, cache.v_cache, cache.block_table([a, b]), cache.seqlens([a, b]))
    for x, y in zip(before, after):
        assert torch.equal(x.view(torch.uint8) if x.is_floating_point() else x,
                           y.view(torch.uint8) if y.is_floating_point() else y)
    assert cache.pages_free == 0 and cache.seqlens([a, b]).tolist() == [32, 20]
    cache.free(a)
    cache.append([b], randn(1, HKV, 1, D, dtype=torch.float16), randn(1, HKV, 1, D, dtype=torch.float16))
    assert cache.seqlens([b]).tolist() == [21]


def test_pool_bad_arguments():
    cache = flashlite.PagedKVCache(4, 16, HKV, D, dtype=torch.float32, device=DEVICE)
    s = cache.new_sequence()
    k = randn(1, HKV, 3, D)
    with pytest.raises(ValueError, match="k must have shape"):
        cache.append([s], k[:, :1], k[:, :1])
    with pytest.raises(TypeError, match="dtype"):
        cache.append([s], k.half(), k.half())
    with pytest.raises(ValueError, match="seq_ids"):
        cache.append([s + 1], k, k)
    with pytest.raises(ValueError, match="seq_ids must not repeat"):
        cache.append([s, s], randn(2, HKV, 3, D), randn(2, HKV, 3, D))
    with pytest.raises(TypeError, match="seq_ids"):
        cache.seqlens(s)
    with pytest.raises(ValueError, match="page_size"):
        flashlite.PagedKVCache(4, 0, HKV, D)
    assert cache.pages_free == 4 and cache.seqlens([s]).tolist() == [0]


@pytest.mark.parametrize("backend", [b for b in kernel_backends() if b != "triton"])  # the reference runs no op
def test_through_the_custom_op(backend):
    """Under a torch-function mode the call crosses the custom op (the plan as op_args, rebuilt by
    Plan.from_op_args, paged schedule included): the same result as the direct call."""
    from torch.overrides import TorchFunctionMode

    class Passthrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    page_size, lengths = 16, [37, 5, 64]
    k_cache, v_cache = make_pool(8, page_size, torch.float32)
    table, seqlens = make_table(lengths, page_size, 8)
    q = randn(3, HQ, 2, D)
    want = flashlite.paged_attention(q, k_cache, v_cache, table, seqlens, Full(causal=True), backend=backend)
    with Passthrough():
        got = flashlite.paged_attention(q, k_cache, v_cache, table, seqlens, Full(causal=True), backend=backend)
    assert torch.equal(got, want)
