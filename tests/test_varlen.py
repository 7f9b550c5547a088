"""flashlite.varlen_attention: packed batches of sequences of different lengths (issue 16).

The oracle is independent of flashlite's packed path: the float64 reference run on each
sequence alone (its own pattern, positions and ALiBi), concatenated. Every backend is held to
the correctness rule (conftest) for out, lse and the three gradients.
"""
from __future__ import annotations

import pytest
import torch

import flashlite
from flashlite import BlockSparse, Full, SlidingWindow, TopK, reference
from flashlite import backend as backends
from flashlite.core.packed import Packed, packed_schedule
from flashlite.core.schedule import band_schedule, block_layout_schedule, cdiv

from conftest import DEVICE, DTYPES, assert_rule, kernel_backends, randn

# (query lengths, key lengths): empty sequences, one-token ones, Nq != Nk, a sequence with no key.
LENGTHS = {
    "self": ([5, 0, 17, 1, 33], [5, 0, 17, 1, 33]),
    "cross": ([5, 3, 17, 1, 30], [9, 0, 17, 40, 21]),
}
BACKENDS = ["reference"] + kernel_backends()


def cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def topk_indices(lens_q, lens_k, heads, top_k):
    """Local key positions per packed query ``[Tq, heads, K]``, with -1 slots and repeats."""
    rows = []
    for nq, nk in zip(lens_q, lens_k):
        rows.append(torch.randint(-1, max(nk, 1), (nq, heads, top_k), device=DEVICE).clamp(max=max(nk - 1, -1)))
    return torch.cat(rows).to(torch.int32)


def make_pattern(name, lens_q, lens_k, heads_q, heads_kv):
    """(packed pattern, per-sequence pattern maker)."""
    if name in ("full", "causal"):
        pattern = Full(causal=name == "causal")
        return pattern, lambda s, q0, q1: pattern
    if name in ("window", "window_wide"):
        pattern = SlidingWindow(6, 3) if name == "window" else SlidingWindow(40, 9)
        return pattern, lambda s, q0, q1: pattern
    if name.startswith("block_sparse"):
        bs = int(name[len("block_sparse"):] or 16)  # "block_sparse32": blocks of 32
        layout = torch.rand(len(lens_q), heads_q, cdiv(max(lens_q), bs), cdiv(max(lens_k), bs), device=DEVICE) > 0.4
        pattern = BlockSparse(layout, bs, causal=True)
        return pattern, lambda s, q0, q1: BlockSparse(
            layout[s:s + 1, :, :cdiv(q1 - q0, bs), :cdiv(lens_k[s], bs)], bs, causal=True)
    if name.startswith("topk"):
        ind = topk_indices(lens_q, lens_k, heads_kv, 5)
        causal = name == "topk_causal"
        return TopK(ind, causal=causal), lambda s, q0, q1: TopK(ind[q0:q1].permute(1, 0, 2)[None], causal=causal)
    raise AssertionError(name)


def per_sequence(q, k, v, cu_q, cu_k, pattern_of, compute_dtype, alibi_slopes=None, **kw):
    """The oracle: attention of each sequence alone, packed back. Returns (out, lse)."""
    outs, lses = [], []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for s in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[s], cq[s + 1], ck[s], ck[s + 1]
        if q1 == q0:
            continue
        qs = q[q0:q1].transpose(0, 1)[None]
        if k1 == k0:
            outs.append(q[q0:q1] * 0)
            lses.append(torch.full((q1 - q0, q.shape[1]), float("-inf"), dtype=torch.float64, device=q.device))
            continue
        ks, vs = k[k0:k1].transpose(0, 1)[None], v[k0:k1].transpose(0, 1)[None]
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[s]
        out, lse = reference.attention(qs, ks, vs, pattern_of(s, q0, q1), return_lse=True, compute_dtype=compute_dtype,
                                       alibi_slopes=slopes, **kw)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0].transpose(0, 1).double())
    return torch.cat(outs), torch.cat(lses)


def needs_packed_tiles(backend, pattern_name):
    if pattern_name.startswith("topk") or backend == "reference":
        return
    if not backends.get(backend).packed_tiles:
        pytest.skip(f"{backend}: no packed work items in its tile kernels yet")


def check_varlen(backend, lens_q, lens_k, pattern_name, dtype, heads_q=4, heads_kv=2, head_dim=40, grads=True,
                 **kw):
    needs_packed_tiles(backend, pattern_name)
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    q = randn(sum(lens_q), heads_q, head_dim, dtype=dtype)
    k = randn(sum(lens_k), heads_kv, head_dim, dtype=dtype)
    v = randn(sum(lens_k), heads_kv, head_dim, dtype=dtype)
    pattern, pattern_of = make_pattern(pattern_name, lens_q, lens_k, heads_q, heads_kv)

    leaves = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    got, got_lse = flashlite.varlen_attention(*leaves, cu_q, cu_k, pattern, backend=backend, return_lse=True, **kw)
    assert flashlite.last_backend() == backend
    assert got.shape == q.shape and got_lse.shape == (q.shape[0], heads_q) and got_lse.dtype == torch.float32

    results = {}
    for label, compute in (("exact", torch.float64), ("lowp", None), ("f32", torch.float32)):
        cast = torch.float64 if label == "exact" else dtype
        ls = [t.detach().to(cast).requires_grad_(grads) for t in (q, k, v)]
        results[label] = (ls, *per_sequence(*ls, cu_q, cu_k, pattern_of, compute, **kw))
    (ex_l, exact, exact_lse), (lp_l, lowp, lowp_lse), (f_l, f32, f32_lse) = (results[x] for x in ("exact", "lowp", "f32"))
    assert_rule("out", got, lowp, exact, fallback=f32)
    assert_rule("lse", got_lse, lowp_lse, exact_lse, fallback=f32_lse)
    if grads:
        grad_out = torch.randn_like(exact)
        for out, ls in ((got, leaves), (exact, ex_l), (lowp, lp_l), (f32, f_l)):
            out.backward(grad_out.to(out.dtype))
        for name, g, lo, ex, fb in zip(("dq", "dk", "dv"), leaves, lp_l, ex_l, f_l):
            assert_rule(name, g.grad, lo.grad, ex.grad, fallback=fb.grad)


PATTERNS = ["full", "causal", "window", "block_sparse", "topk", "topk_causal"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern_name", PATTERNS)
@pytest.mark.parametrize("lengths", list(LENGTHS))
def test_varlen_patterns(backend, pattern_name, lengths):
    lens_q, lens_k = LENGTHS[lengths]
    check_varlen(backend, lens_q, lens_k, pattern_name, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [8, 72])
def test_varlen_dtypes_head_dims(backend, dtype, head_dim):
    if dtype == torch.float32 and head_dim == 8:
        pytest.skip("covered by test_varlen_patterns")
    check_varlen(backend, [70, 2, 0, 65], [70, 2, 0, 65], "causal", dtype, head_dim=head_dim)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_alibi_softcap_mqa(backend):
    lens = [9, 1, 40]
    slopes = torch.rand(len(lens), 4, device=DEVICE)  # per sequence
    check_varlen(backend, lens, lens, "causal", torch.float32, heads_q=4, heads_kv=1, alibi_slopes=slopes, softcap=2.0)
    check_varlen(backend, lens, [12, 5, 40], "window", torch.float32, heads_q=4, heads_kv=1,
                 alibi_slopes=slopes[0], scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_equals_padded_batch_for_equal_lengths(backend):
    """Two sequences of one length are an ordinary batch: the same numbers as attention()."""
    needs_packed_tiles(backend, "causal")
    q, k, v = (randn(2, 37, 4, 24) for _ in range(3))
    cu_seq = cu([37, 37])
    packed = flashlite.varlen_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seq, cu_seq,
                                        Full(True), backend=backend)
    batched = flashlite.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), Full(True),
                                  backend=backend)
    torch.testing.assert_close(packed, batched.transpose(1, 2).flatten(0, 1), rtol=1e-5, atol=1e-5)


# Sequences longer than a tile (the interpreter's tiles are 32 x 32; min(32, block_size) for block-sparse),
# so an item's key tiles split into interior and edge ones, with partial last tiles and a 1-token sequence.
LONG = ([100, 1, 75, 40], [120, 3, 60, 40])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern_name", ["causal", "window_wide", "block_sparse32", "block_sparse64"])
def test_varlen_sequences_longer_than_a_tile(backend, pattern_name):
    check_varlen(backend, *LONG, pattern_name, torch.float32, heads_q=2, heads_kv=1, head_dim=24)


def _packed_kernel_inputs(pattern, lens_q, lens_k, heads_q, heads_kv, head_dim, block_m, block_n):
    q = randn(1, heads_q, sum(lens_q), head_dim)
    k, v = randn(1, heads_kv, sum(lens_k), head_dim), randn(1, heads_kv, sum(lens_k), head_dim)
    schedule = packed_schedule(_packed(pattern, lens_q, lens_k, heads_q, heads_kv), sum(lens_q), sum(lens_k),
                               block_m, block_n)
    return q, k, v, schedule


def test_packed_backward_sub_tiles(monkeypatch):
    """The backward's own tiles in packed launches (as on a GPU: dK/dV takes each query tile SUB_M rows
    at a time, dQ each key tile SUB_N keys at a time), halved here: rows and keys of a sub-tile past
    the sequence's end belong to the next sequence and must not count."""
    from flashlite import kernels

    monkeypatch.setattr(kernels.launch, "backward_launches",
                        lambda bm, bn, *args: (dict(SUB_M=bm // 4), dict(SUB_N=bn // 2)))
    check_varlen("triton", *LONG, "window_wide", torch.float16, heads_q=2, heads_kv=1, head_dim=24)
    check_varlen("triton", *LONG, "block_sparse32", torch.float32, heads_q=2, heads_kv=1, head_dim=24)


@pytest.mark.parametrize("pattern_name,blocks", [("causal", (32, 32)), ("causal", (16, 32)), ("full", (32, 16)),
                                                 ("window_wide", (16, 16)), ("block_sparse32", (32, 16))])
def test_packed_interior_tiles_skip_the_mask(monkeypatch, pattern_name, blocks):
    """Packed forward items split their key tiles into interior and edge ones by their own sequence's
    lengths: the debug counter (COUNT_TILES=2) sees exactly the edge tiles of each sequence's own rule
    (rows and keys local, real rows only), and out/lse equal the per-sequence oracle."""
    from flashlite import kernels
    from flashlite.kernels import tile_engine
    from test_tile_edges import _CountEdges

    lens_q, lens_k = LONG
    heads = 2
    pattern, pattern_of = make_pattern(pattern_name, lens_q, lens_k, heads, heads)
    q, k, v, schedule = _packed_kernel_inputs(pattern, lens_q, lens_k, heads, heads, 16, *blocks)
    items = schedule.num_q_tiles
    counter = torch.full((2 * heads * items,), -1, dtype=torch.int32, device=DEVICE)
    counting = _CountEdges(tile_engine.tile_forward_kernel)
    for module in (tile_engine, kernels.launch):
        if hasattr(module, "tile_forward_kernel"):
            monkeypatch.setattr(module, "tile_forward_kernel", counting)
    out, lse = kernels.tile_forward(q, k, v, schedule, 16 ** -0.5, tile_counter=counter)
    visited, edges = counter[:heads * items].cpu(), counter[heads * items:].cpu()
    assert torch.equal(visited, schedule.kv_count.cpu().expand(1, heads, -1).reshape(-1))

    bm, bn = blocks
    left, right = schedule.window_left, schedule.window_right
    want = []
    tiles, count = schedule.kv_tiles.cpu().expand(1, heads, -1, -1), schedule.kv_count.cpu().expand(1, heads, -1)
    for h in range(heads):
        for t, (s, m) in enumerate(schedule.q_items.tolist()):
            nq, nk = lens_q[s], lens_k[s]
            rows = torch.arange(m * bm, min((m + 1) * bm, nq))[:, None] + (nk - nq)
            cols = torch.arange(0, -(-nk // bn) * bn)[None, :]
            visible = (cols < nk) & (cols >= rows - left) & (cols <= rows + right)
            scheduled = [int(tiles[0, h, t, 0]) + i if not schedule.is_list else int(tiles[0, h, t, i])
                         for i in range(int(count[0, h, t]))]
            want.append(sum(not bool(visible[:, n * bn:(n + 1) * bn].all()) for n in scheduled))
    assert torch.equal(edges, torch.tensor(want, dtype=torch.int32))
    assert int((visited - edges).sum()) > 0, "no interior tile skipped the mask"

    cu_q, cu_k = cu(lens_q), cu(lens_k)
    exact, exact_lse = per_sequence(q[0].transpose(0, 1).double(), k[0].transpose(0, 1).double(),
                                    v[0].transpose(0, 1).double(), cu_q, cu_k, pattern_of, torch.float64,
                                    scale=16 ** -0.5)
    lowp, lowp_lse = per_sequence(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu_q, cu_k,
                                  pattern_of, None, scale=16 ** -0.5)
    assert_rule("out", out[0].transpose(0, 1), lowp, exact)
    assert_rule("lse", lse[0].transpose(0, 1), lowp_lse, exact_lse)


# -- the plan: work items ----------------------------------------------------------------------------

def _packed(pattern, lens_q, lens_k, heads_q=4, heads_kv=2):
    total_q, total_k = sum(lens_q), sum(lens_k)
    packed = Packed(pattern, cu(lens_q), cu(lens_k))
    packed.validate(torch.empty(1, heads_q, total_q, 8, device=DEVICE),
                    torch.empty(1, heads_kv, total_k, 8, device=DEVICE))
    packed.check_values(total_k)
    return packed


@pytest.mark.parametrize("pattern_name", ["full", "causal", "window", "block_sparse"])
@pytest.mark.parametrize("tiles", [(16, 16), (16, 8)])
def test_packed_schedule_is_the_sequences_schedules(pattern_name, tiles):
    """Item by item, the packed schedule is each sequence's own schedule (local tile numbers)."""
    lens_q, lens_k = [5, 0, 33, 1, 40], [9, 0, 17, 40, 41]
    block_m, block_n = tiles
    pattern, pattern_of = make_pattern(pattern_name, lens_q, lens_k, 4, 2)
    sched = packed_schedule(_packed(pattern, lens_q, lens_k), sum(lens_q), sum(lens_k), block_m, block_n)
    assert sched.is_packed and sched.num_q_tiles == sum(cdiv(n, block_m) for n in lens_q)
    assert sched.num_kv_tiles == sum(cdiv(n, block_n) for n in lens_k)
    fwd = bwd = 0
    cq = cu(lens_q).tolist()
    for s, (nq, nk) in enumerate(zip(lens_q, lens_k)):
        own = pattern_of(s, cq[s], cq[s + 1])
        if isinstance(own, BlockSparse):
            want = block_layout_schedule(own.layout, own.block_size, nq, nk, block_m, block_n, None, 0)
        else:
            want = band_schedule(nq, nk, block_m, block_n, *own.band(), DEVICE)
        for m in range(cdiv(nq, block_m)):
            assert sched.q_items[fwd].tolist() == [s, m]
            count = want.kv_count[..., m].flatten()
            assert sched.kv_count[0, :, fwd].tolist() == count.expand(sched.kv_count.shape[1]).tolist()
            for h in range(sched.kv_count.shape[1]):
                c = int(sched.kv_count[0, h, fwd])
                wh = min(h, want.kv_tiles.shape[1] - 1)
                assert sched.kv_tiles[0, h, fwd, :c if pattern_name == "block_sparse" else 1].tolist() == \
                    want.kv_tiles[0, wh, m, :c if pattern_name == "block_sparse" else 1].tolist() or c == 0
            fwd += 1
        for n in range(cdiv(nk, block_n)):
            assert sched.k_items[bwd].tolist() == [s, n]
            for h in range(sched.q_count.shape[1]):
                wh = min(h, want.q_count.shape[1] - 1)
                c = int(want.q_count[0, wh, n])
                assert int(sched.q_count[0, h, bwd]) == c
                width = c if pattern_name == "block_sparse" else 1
                assert c == 0 or sched.q_tiles[0, h, bwd, :width].tolist() == want.q_tiles[0, wh, n, :width].tolist()
            bwd += 1


def test_packed_work_is_the_sum_of_sequences():
    """1 x 2048 + 31 x 128 tokens: as many items as the sequences' own tiles, never the padded box."""
    lens = [2048] + [128] * 31
    sched = packed_schedule(_packed(Full(True), lens, lens), sum(lens), sum(lens), 64, 64)
    assert sched.num_q_tiles == 32 + 31 * 2
    padded_pairs = len(lens) * (2048 // 64) ** 2
    visited = int(sched.kv_count.sum())
    assert visited == (32 * 33) // 2 + 31 * 3
    assert visited < padded_pairs / 20


def test_packed_topk_rows_in_packed_coordinates():
    lens_q, lens_k = [2, 3], [4, 2]
    ind = torch.tensor([[0, 3, -1], [3, 3, 1], [0, 1, -1], [1, -1, 0], [1, 1, 0]], dtype=torch.int32,
                       device=DEVICE)[:, None]
    rows = _packed(TopK(ind, causal=True), lens_q, lens_k).gather_indices()
    # sequence 0: p(i) = i + 2 (key 3 is after p(0)); sequence 1 starts at key 4, p(i) = i - 1 (its first query sees no key)
    want = [[0, -1, -1], [3, 3, 1], [-1, -1, -1], [-1, -1, 4], [5, 5, 4]]
    assert rows[0, 0].tolist() == want


# -- errors name the argument ------------------------------------------------------------------------

def _qkv(tq=10, tk=10):
    return randn(tq, 2, 8), randn(tk, 2, 8), randn(tk, 2, 8)


@pytest.mark.parametrize("cu_q, cu_k, error, words", [
    (torch.tensor([0, 4, 10]), torch.tensor([0, 4, 10], dtype=torch.int32), TypeError, "cu_seqlens_q must have dtype"),
    (torch.tensor([[0, 10]], dtype=torch.int32), torch.tensor([0, 10], dtype=torch.int32), ValueError, "cu_seqlens_q must be 1-D"),
    (torch.tensor([1, 4, 10], dtype=torch.int32), torch.tensor([0, 4, 10], dtype=torch.int32), ValueError, "cu_seqlens_q must start at 0"),
    (torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 4, 10], dtype=torch.int32), ValueError, "cu_seqlens_q must end at"),
    (torch.tensor([0, 6, 4, 10], dtype=torch.int32), torch.tensor([0, 4, 5, 10], dtype=torch.int32), ValueError, "non-decreasing"),
    (torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 10], dtype=torch.int32), ValueError, "same number of sequences"),
    (torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 4, 11], dtype=torch.int32), ValueError, "cu_seqlens_k must end at"),
])
def test_bad_cu_seqlens(cu_q, cu_k, error, words):
    q, k, v = _qkv()
    with pytest.raises(error, match=words):
        flashlite.varlen_attention(q, k, v, cu_q.to(DEVICE), cu_k.to(DEVICE))


def test_bad_varlen_arguments():
    q, k, v = _qkv()
    c = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"q must be 3-D \[total_tokens"):
        flashlite.varlen_attention(q[None], k, v, c, c)
    with pytest.raises(ValueError, match="max_seqlen_q=5 but the longest sequence has 6"):
        flashlite.varlen_attention(q, k, v, c, c, max_seqlen_q=5)
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \[2\] or \[2, 2\]"):
        flashlite.varlen_attention(q, k, v, c, c, alibi_slopes=torch.ones(3, 2, device=DEVICE))
    bad = torch.full((10, 1, 2), 5, dtype=torch.int32, device=DEVICE)  # sequence 0 has 4 keys
    with pytest.raises(ValueError, match=r"indices must lie in \[-1, Nk_s\)"):
        flashlite.varlen_attention(q, k, v, c, c, TopK(bad))
    with pytest.raises(ValueError, match=r"indices must have shape \[Tq=10"):
        flashlite.varlen_attention(q, k, v, c, c, TopK(bad[:9]))
    q40, k40, v40 = _qkv(40, 40)
    c40 = torch.tensor([0, 4, 40], dtype=torch.int32, device=DEVICE)
    small = torch.ones(2, 2, 1, 1, dtype=torch.bool, device=DEVICE)  # 36 rows need 3 blocks of 16
    with pytest.raises(ValueError, match="layout covers"):
        flashlite.varlen_attention(q40, k40, v40, c40, c40, BlockSparse(small, 16))
    with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\)"):
        flashlite.varlen_attention(q, k, v, c, c, dropout_p=1.0)
