"""The bool head mask as part of the plan (issue 18, flashlite.core.head_mask).

A masked head does no work: the tile engine's plan zeroes its schedule counts (the Triton forward's
debug tile counter shows it visits 0 tiles while every kept head visits what the unmasked call
visits), the gather kernels skip its rows. Poisoned inputs show it: a masked head's q and dO are
NaN, so any read of them would reach its zeros or the kept heads' dK/dV. Kept heads give the same
bits as the unmasked call (dK/dV: the unmasked call with a zero gradient on the masked heads).
"""
from __future__ import annotations

import pytest
import torch

import flashlite
from flashlite import Full, TopK, dispatch
from flashlite import backend as backends
from flashlite.backend.base import Backend, Request
from flashlite.dispatch.plan import plan_for, with_heads

from conftest import DEVICE, HAS_CUDA, kernel_backends, make_pattern, randn, sample_interpreter

BACKENDS = ["reference"] + kernel_backends()
MASK = [[True, False, True, False], [False, False, True, True]]  # batch row 1: group 0 (GQA 2) all masked


def poisoned(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``t`` ``[B, Hq, N, D]`` with the masked heads' rows NaN (a leaf)."""
    return torch.where(keep[:, :, None, None], t, float("nan")).detach().requires_grad_()


def run_both(backend, pattern, q, k, v, keep, mask, poison=True, **kw):
    """(masked call's out, lse, grads; unmasked call's) with the gradient of the masked heads 0 in the
    unmasked call and NaN (poisoned) in the masked one."""
    grad = randn(*q.shape)
    leaves = [poisoned(q, keep) if poison else q.detach().clone().requires_grad_(),
              k.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()]
    out, lse = flashlite.attention(*leaves, pattern, head_mask=mask, backend=backend, return_lse=True, **kw)
    assert dispatch.last_backend() == backend
    out_grad = torch.where(keep[:, :, None, None], grad, float("nan") if poison else 0.0)
    grads = torch.autograd.grad(out, leaves, out_grad)
    plain = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = flashlite.attention(*plain, pattern, backend=backend, return_lse=True, **kw)
    ref_grads = torch.autograd.grad(ref, plain, grad * keep[:, :, None, None])
    return (out, lse, grads), (ref, ref_lse, ref_grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern_name", ["causal", "window", "block_sparse", "topk"])
@pytest.mark.parametrize("heads_kv", [4, 2])
@pytest.mark.parametrize("per_batch", [False, True])
def test_masked_heads_do_nothing_kept_heads_same_bits(backend, pattern_name, heads_kv, per_batch):
    """One call: masked heads out 0, lse −inf, dq 0; kept heads' out, lse, dq and every dK/dV equal to
    the unmasked call's, bitwise on the kernels (whose inputs on masked heads are NaN)."""
    sample_interpreter(backend, pattern_name in ("causal", "topk") and heads_kv == 2 and per_batch)
    batch, heads_q, seqlen_q, seqlen_k, head_dim = 2, 4, 37, 45, 24
    mask = torch.tensor(MASK, device=DEVICE)
    if not per_batch:
        mask = mask[0]
    keep = mask.expand(batch, heads_q)
    pattern = make_pattern(pattern_name, batch, heads_q, heads_kv, seqlen_q, seqlen_k)
    q, k, v = randn(batch, heads_q, seqlen_q, head_dim), randn(batch, heads_kv, seqlen_k, head_dim), \
        randn(batch, heads_kv, seqlen_k, head_dim)
    exact = backend != "reference"  # the oracle's dense math reads every head (finite inputs, close)
    (out, lse, grads), (ref, ref_lse, ref_grads) = run_both(backend, pattern, q, k, v, keep, mask, poison=exact)
    assert not out[~keep].any() and torch.isneginf(lse[~keep]).all()
    assert not grads[0][~keep].any(), "a masked head got a gradient"
    check = torch.equal if exact else (lambda a, b: torch.allclose(a, b, atol=1e-5, rtol=1e-5))
    assert check(out[keep], ref[keep]) and check(lse[keep], ref_lse[keep])
    assert check(grads[0][keep], ref_grads[0][keep])
    for name, got, want in zip("kv", grads[1:], ref_grads[1:]):
        assert check(got, want), f"d{name} differs from the unmasked call's"


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_and_entropy_gradient_of_masked_heads_are_zero(backend):
    sample_interpreter(backend, False)
    q, k, v = randn(1, 4, 20, 16, requires_grad=True), randn(1, 2, 20, 16), randn(1, 2, 20, 16)
    mask = torch.tensor([True, False, False, True], device=DEVICE)
    out, stats = flashlite.attention_stats(q, k, v, Full(causal=True), head_mask=mask, backend=backend)
    plain_out, plain = flashlite.attention_stats(q, k, v, Full(causal=True), backend=backend)
    for name in ("entropy", "max_prob", "mean_distance", "sink_mass", "keys"):
        assert not getattr(stats, name)[:, ~mask].any(), name
        torch.testing.assert_close(getattr(stats, name)[:, mask], getattr(plain, name)[:, mask], rtol=0, atol=0)
    (dq,) = torch.autograd.grad(stats.entropy.sum() + out.sum(), q)
    assert not dq[:, ~mask].any()


@pytest.mark.parametrize("engine_pattern", ["causal", "block_sparse", "topk"])
def test_plan_masks_the_schedule_or_the_rows(engine_pattern):
    """The plan carries the mask: tile engine, the masked heads' forward and backward counts are 0 and
    the kept heads' equal the unmasked plan's; gather engine, row_keep marks the rows that run."""
    backend = backends.get("cpu" if "cpu" in kernel_backends() else "triton")
    batch, heads_q, heads_kv, seqlen = 2, 4, 2, 70
    q, k = randn(batch, heads_q, seqlen, 16), randn(batch, heads_kv, seqlen, 16)
    pattern = make_pattern(engine_pattern, batch, heads_q, heads_kv, seqlen, seqlen)
    mask = torch.tensor(MASK, device=DEVICE)
    req = dispatch._request(q, pattern, True, True, False, head_mask=True)
    plain = plan_for(pattern, q, k, backend, req)
    masked = with_heads(plain, pattern, mask, q)
    if pattern.engine == "tile":
        for name in ("kv_count", "q_count"):
            want = getattr(plain.schedule, name).expand(batch, heads_q, -1)
            got = getattr(masked.schedule, name)
            assert torch.equal(got[mask], want[mask]) and not got[~mask].any(), name
        assert masked.row_keep is None
    else:
        assert torch.equal(masked.row_keep.bool(), mask[:, :, None].expand(batch, heads_q, seqlen))
    tensors, ints = masked.op_args()  # it crosses the custom op whole
    again = type(masked).from_op_args(tensors, ints, seqlen, seqlen)
    if pattern.engine == "gather":
        assert torch.equal(again.row_keep, masked.row_keep)


@pytest.mark.parametrize("engine", ["triton", "cpu"])
@pytest.mark.parametrize("seqlen_q", [70, 3])  # query-major tiles; the CPU decode rows (a KV group per item)
def test_tile_counter_masked_heads_visit_no_tile(engine, seqlen_q):
    """The forward's tile counter (Triton: per program; cpu: per (b, h, query tile)) on the masked
    plan: 0 tiles for every masked head, exactly the unmasked plan's count for every kept head."""
    if engine == "cpu" and "cpu" not in kernel_backends():
        pytest.skip("no cpu backend here")
    if engine == "triton" and seqlen_q != 70:
        pytest.skip("the Triton kernel has no decode path of its own")
    batch, heads_q, heads_kv, seqlen = 2, 4, 2, 70
    device = torch.device("cpu") if engine == "cpu" else DEVICE
    q = randn(batch, heads_q, seqlen_q, 16).to(device)
    k, v = randn(batch, heads_kv, seqlen, 16).to(device), randn(batch, heads_kv, seqlen, 16).to(device)
    mask = torch.tensor(MASK, device=device)
    pattern = Full(causal=True)
    backend = backends.get(engine)
    plan = plan_for(pattern, q, k, backend, dispatch._request(q, pattern, False, True, False, head_mask=True))
    counters = []
    for schedule in (plan.schedule, with_heads(plan, pattern, mask, q).schedule):
        counter = torch.zeros(batch * heads_q * schedule.num_q_tiles, dtype=torch.int32, device=device)
        if engine == "triton":
            from flashlite import kernels

            kernels.tile_forward(q, k, v, schedule, 16 ** -0.5, tile_counter=counter)
        else:
            backend._ext.cpu_tile_forward(
                q, k, v, kv_tiles=schedule.kv_tiles, kv_count=schedule.kv_count, alibi_slopes=None,
                is_list=schedule.is_list, block_m=schedule.block_m, block_n=schedule.block_n,
                window_left=schedule.window_left, window_right=schedule.window_right, scale=16 ** -0.5, softcap=0.0,
                tile_counter=counter)
        counters.append(counter.view(batch, heads_q, -1))
    plain, masked = counters
    assert not masked[~mask].any(), "a masked head visited a tile"
    assert torch.equal(masked[mask], plain[mask]) and int(plain[mask].sum()) > 0


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gqa_decode_runs_kept_heads_of_a_group_together(backend):
    """CPU decode (one query row, a long key range split in pieces): a group's kept heads run as one
    item, each row to its own count; kept heads give the unmasked call's bits."""
    if backend not in BACKENDS:
        pytest.skip("no cpu backend here")
    q, k, v = randn(2, 8, 1, 64), randn(2, 2, 1300, 64), randn(2, 2, 1300, 64)
    mask = torch.tensor([[True, False, True, False, False, False, False, False],
                         [False, True, True, True, True, True, False, True]], device=DEVICE)
    qp = torch.where(mask[:, :, None, None], q, float("nan"))
    out, lse = flashlite.attention(qp, k, v, Full(causal=True), head_mask=mask, backend=backend, return_lse=True)
    ref, ref_lse = flashlite.attention(q, k, v, Full(causal=True), backend=backend, return_lse=True)
    assert not out[~mask].any() and torch.isneginf(lse[~mask]).all()
    assert torch.equal(out[mask], ref[mask]) and torch.equal(lse[mask], ref_lse[mask])


@pytest.mark.parametrize("threads", [1, 3])  # whole KV heads per work item; key tiles, then query tiles
def test_cpu_backward_with_packed_query_tiles(threads):
    """CPU tile backward over several key tiles (its query tiles packed once by a first pass, which
    skips a masked head's): masked heads' dq 0, everything else the unmasked call's bits, for both
    ways the backward splits its work (q and dO of masked heads NaN)."""
    if "cpu" not in kernel_backends():
        pytest.skip("no cpu backend here")
    q, k, v = randn(2, 4, 150, 32), randn(2, 2, 290, 32), randn(2, 2, 290, 32)
    mask = torch.tensor(MASK, device=DEVICE)
    keep = mask.expand(2, 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        (out, lse, grads), (ref, ref_lse, ref_grads) = run_both("cpu", Full(causal=True), q, k, v, keep, mask)
    finally:
        torch.set_num_threads(before)
    assert not out[~keep].any() and torch.isneginf(lse[~keep]).all() and not grads[0][~keep].any()
    assert torch.equal(out[keep], ref[keep]) and torch.equal(grads[0][keep], ref_grads[0][keep])
    assert torch.equal(grads[1], ref_grads[1]) and torch.equal(grads[2], ref_grads[2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern_name", ["causal", "topk"])
def test_varlen_head_mask_per_sequence(backend, pattern_name):
    """varlen_attention: a bool mask per sequence ``[S, Hq]`` (one call, masked (sequence, head)
    rows 0 with lse −inf and no gradient) and a float gate."""
    sample_interpreter(backend, pattern_name == "causal")
    lengths_q, lengths_k, heads_q, heads_kv, dim = [5, 0, 19, 33], [9, 4, 19, 40], 4, 2, 16
    cu_q = torch.tensor([0] + list(torch.tensor(lengths_q).cumsum(0)), dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0] + list(torch.tensor(lengths_k).cumsum(0)), dtype=torch.int32, device=DEVICE)
    tq, tk = sum(lengths_q), sum(lengths_k)
    pattern = Full(causal=True) if pattern_name == "causal" else TopK(
        torch.randint(-1, 4, (tq, heads_kv, 3), device=DEVICE), causal=True)
    mask = torch.tensor([[True, False, True, True], [False] * 4, [False, True, False, True], [True] * 4],
                        device=DEVICE)
    sequence = torch.repeat_interleave(torch.arange(4, device=DEVICE), torch.tensor(lengths_q, device=DEVICE))
    keep = mask[sequence]
    q = randn(tq, heads_q, dim, requires_grad=True)
    k, v = randn(tk, heads_kv, dim, requires_grad=True), randn(tk, heads_kv, dim, requires_grad=True)
    kw = dict(pattern=pattern, backend=backend, return_lse=True)
    out, lse = flashlite.varlen_attention(q, k, v, cu_q, cu_k, head_mask=mask, **kw)
    ref, ref_lse = flashlite.varlen_attention(q, k, v, cu_q, cu_k, **kw)
    assert not out[~keep].any() and torch.isneginf(lse[~keep]).all()
    exact = backend != "reference"
    check = torch.equal if exact else (lambda a, b: torch.allclose(a, b, atol=1e-5, rtol=1e-5))
    assert check(out[keep], ref[keep]) and check(lse[keep], ref_lse[keep])
    grad = randn(*out.shape) * keep[:, :, None]
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), grad)
    assert not dq[~keep].any() and check(dq, rq) and check(dk, rk) and check(dv, rv)
    gate = torch.rand(4, heads_q, device=DEVICE)
    gated = flashlite.varlen_attention(q, k, v, cu_q, cu_k, head_mask=gate, pattern=pattern, backend=backend)
    torch.testing.assert_close(gated, ref * gate[sequence][:, :, None])


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_head_mask(backend):
    """paged_attention: bool ``[B, Hq]`` (masked rows 0, lse −inf, kept rows the unmasked bits) and a gate."""
    sample_interpreter(backend, False)
    page_size, heads_q, heads_kv, dim, nq = 16, 4, 2, 16, 2
    lengths = [37, 20, 5]
    num_pages = sum(-(-n // page_size) for n in lengths) + 1
    k_cache, v_cache = randn(num_pages, page_size, heads_kv, dim), randn(num_pages, page_size, heads_kv, dim)
    perm = torch.randperm(num_pages).tolist()
    table = torch.full((3, 3), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lengths):
        pages = -(-n // page_size)
        table[b, :pages] = torch.tensor(perm[used:used + pages], dtype=torch.int32)
        used += pages
    table, seqlens = table.to(DEVICE), torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    mask = torch.tensor([[True, False, True, True], [False] * 4, [False, True, True, False]], device=DEVICE)
    q = randn(3, heads_q, nq, dim)
    kw = dict(pattern=Full(causal=True), backend=backend, return_lse=True)
    out, lse = flashlite.paged_attention(torch.where(mask[:, :, None, None], q, float("nan")), k_cache, v_cache,
                                         table, seqlens, head_mask=mask, **kw)
    ref, ref_lse = flashlite.paged_attention(q, k_cache, v_cache, table, seqlens, **kw)
    assert not out[~mask].any() and torch.isneginf(lse[~mask]).all()
    assert torch.equal(out[mask], ref[mask]) and torch.equal(lse[mask], ref_lse[mask])
    gate = torch.rand(heads_q, device=DEVICE)
    gated = flashlite.paged_attention(q, k_cache, v_cache, table, seqlens, head_mask=gate, pattern=Full(causal=True),
                                      backend=backend)
    torch.testing.assert_close(gated, ref * gate[None, :, None, None])


@pytest.mark.skipif("cpu" not in kernel_backends() or not getattr(backends.get("cpu"), "paged_tiles", False),
                    reason="needs the cpu backend's paged tile plan")
def test_paged_decode_tile_counter_masked_heads_visit_no_tile():
    """Paged decode on the CPU tile plan (one work item per batch row spanning every head, long rows
    split into pieces): the kernels' tile counter is 0 for each masked (sequence, head) and the
    unmasked plan's count for each kept one; kept heads give the unmasked call's bits, masked heads
    0 and −inf, and ``paged_attention(head_mask=)`` is this masked call."""
    from flashlite.core.paged import Paged, pool_view

    page_size, heads_q, heads_kv, dim = 16, 8, 2, 32
    lengths = [1300, 37, 700]  # rows 0 and 2 split their keys over several items
    num_pages = sum(-(-n // page_size) for n in lengths) + 3
    k_cache, v_cache = torch.randn(2, num_pages, page_size, heads_kv, dim).unbind(0)
    table = torch.full((3, -(-max(lengths) // page_size)), -1, dtype=torch.int32)
    pages = torch.randperm(num_pages).tolist()
    for b, n in enumerate(lengths):
        table[b, :-(-n // page_size)] = torch.tensor([pages.pop() for _ in range(-(-n // page_size))])
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    # row 0: KV group 0 all masked, group 1 partly; row 1: every head masked; row 2: one head masked
    mask = torch.tensor([[False] * 4 + [True, False, True, True], [False] * 8, [True] * 7 + [False]])
    q = torch.randn(3, heads_q, 1, dim)
    tiled = Paged(Full(causal=True), table, seqlens, page_size, 1, tiles=True)
    pool_k, pool_v = (pool_view(t, "cache").expand(3, -1, -1, -1) for t in (k_cache, v_cache))
    cpu = backends.get("cpu")
    plan = plan_for(tiled, q, pool_k, cpu, dispatch._request(q, tiled, False, True, False, head_mask=True))
    runs = []
    poisoned_q = torch.where(mask[:, :, None, None], q, float("nan"))
    for schedule, query in ((plan.schedule, q), (with_heads(plan, tiled, mask, q).schedule, poisoned_q)):
        counter = torch.zeros(3 * heads_q * schedule.num_q_tiles, dtype=torch.int32)
        out, lse = cpu._ext.cpu_tile_forward(
            query, pool_k, pool_v, kv_tiles=schedule.kv_tiles, kv_count=schedule.kv_count, alibi_slopes=None,
            is_list=schedule.is_list, block_m=schedule.block_m, block_n=schedule.block_n,
            window_left=schedule.window_left, window_right=schedule.window_right, scale=dim ** -0.5, softcap=0.0,
            **cpu._paged(schedule), tile_counter=counter)
        runs.append((out, lse, counter.view(3, heads_q)))
    (plain, plain_lse, plain_tiles), (out, lse, tiles) = runs
    assert not tiles[~mask].any(), "a masked head visited a key tile"
    assert torch.equal(tiles[mask], plain_tiles[mask]) and int(plain_tiles[mask].min()) > 0
    assert torch.equal(plain_tiles[0], torch.full((heads_q,), -(-lengths[0] // schedule.block_n), dtype=torch.int32))
    assert not out[~mask].any() and torch.isneginf(lse[~mask]).all()
    assert torch.equal(out[mask], plain[mask]) and torch.equal(lse[mask], plain_lse[mask])
    api, api_lse = flashlite.paged_attention(poisoned_q, k_cache, v_cache, table, seqlens, Full(causal=True),
                                             head_mask=mask, backend="cpu", return_lse=True)
    assert torch.equal(api, out) and torch.equal(api_lse, lse)


def test_a_backend_without_the_skip_declines():
    """A backend whose gather kernels cannot skip masked heads says so (another serves the call)."""

    class TileOnly(Backend):
        name = "tile_only"
        devices = ("cpu", "cuda")

    req = Request(device_type=DEVICE.type, dtype=torch.float32, head_dim=16, engine="gather", pattern="topk",
                  head_mask=True)
    assert "head_mask" in TileOnly().why_not(req)
    assert TileOnly().why_not(Request(**{**req.__dict__, "engine": "tile", "pattern": "causal"})) is None
    assert TileOnly().why_not(Request(**{**req.__dict__, "head_mask": False})) is None


@pytest.mark.skipif(not HAS_CUDA, reason="the CUDA backend runs on a GPU")
def test_cuda_serves_tile_masks_and_declines_gather_masks():
    if "cuda" not in kernel_backends():
        pytest.skip("no cuda backend built")
    q, k, v = randn(1, 4, 40, 64, dtype=torch.float16), randn(1, 2, 40, 64, dtype=torch.float16), \
        randn(1, 2, 40, 64, dtype=torch.float16)
    mask = torch.tensor([True, False, False, True], device=DEVICE)
    out = flashlite.attention(q, k, v, Full(causal=True), head_mask=mask)
    assert dispatch.last_backend() == "cuda"
    ref = flashlite.attention(q, k, v, Full(causal=True))
    assert not out[:, ~mask].any() and torch.equal(out[:, mask], ref[:, mask])
    indices = torch.randint(0, 40, (1, 2, 40, 8), device=DEVICE)
    flashlite.attention(q, k, v, TopK(indices), head_mask=mask)
    assert dispatch.last_backend() == "triton"
    with pytest.raises(Exception, match="head_mask"):
        flashlite.attention(q, k, v, TopK(indices), head_mask=mask, backend="cuda")


@pytest.mark.parametrize("pattern_name", ["causal", "topk"])
def test_bool_head_mask_compiles_fullgraph(pattern_name):
    """Lowering the mask into the plan reads no value: torch.compile(fullgraph=True) traces a masked
    call, forward and backward, with the eager call's numbers."""
    backend = "cpu" if "cpu" in kernel_backends() else "triton"
    torch._dynamo.reset()
    q, k, v = randn(2, 4, 19, 16), randn(2, 2, 19, 16), randn(2, 2, 19, 16)
    pattern = make_pattern(pattern_name, 2, 4, 2, 19, 19)
    mask = torch.tensor(MASK, device=DEVICE)

    def call(q, k, v, mask):
        return flashlite.attention(q, k, v, pattern, head_mask=mask, backend=backend)

    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    leaves = [[t.clone().requires_grad_() for t in (q, k, v)] for _ in range(2)]
    got, want = compiled(*leaves[0], mask), call(*leaves[1], mask)
    assert torch.equal(got, want) and not got[~mask].any()
    got.sum().backward()
    want.sum().backward()
    for a, b in zip(*leaves):
        assert torch.equal(a.grad, b.grad)
