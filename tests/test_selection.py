"""flashlite.selection: marks -> indices (against a set-based construction), automatic top-k by score
(against a brute-force top-k over the full score matrix), block-level selection, combining marks
with the selector, and bad input."""
from __future__ import annotations

import pytest
import torch

import flashlite
from flashlite import selection

from conftest import DEVICE, check_against_reference, kernel_backends, randn


def rows_as_sets(indices: torch.Tensor):
    """[..., K] -> nested lists of sets without -1; also checks ascending, distinct, -1 last."""
    flat = indices.reshape(-1, indices.shape[-1]).tolist()
    out = []
    for row in flat:
        valid = [x for x in row if x >= 0]
        assert row[: len(valid)] == valid and all(x == -1 for x in row[len(valid):]), row
        assert valid == sorted(set(valid)), row
        out.append(set(valid))
    return out


def expected_marks(marks_per_row, seq_len, window, sinks, causal, num_queries):
    rows = []
    for marks in marks_per_row:
        for i in range(num_queries):
            p = i + seq_len - num_queries
            keep = set(marks) | set(range(min(sinks, seq_len))) | {j for j in range(p - window + 1, p + 1) if j >= 0}
            if causal:
                keep = {j for j in keep if j <= p}
            rows.append(keep)
    return rows


@pytest.mark.parametrize("seq_len,window,sinks,causal,num_queries", [
    (40, 5, 2, True, None), (40, 5, 2, False, None), (33, 0, 0, True, None), (25, 8, 30, True, None),
    (60, 100, 3, True, None), (50, 6, 4, True, 1), (50, 6, 4, False, 7),
])
def test_from_marks_matches_sets(seq_len, window, sinks, causal, num_queries):
    marks = [[3, 17, 3, 0, seq_len - 1], [seq_len // 2]]
    got = selection.from_marks(marks, seq_len, window=window, sinks=sinks, causal=causal, num_queries=num_queries)
    nq = num_queries or seq_len
    assert got.shape[:3] == (2, 1, nq) and got.dtype == torch.int64
    want = expected_marks([sorted(set(m)) for m in marks], seq_len, window, sinks, causal, nq)
    assert rows_as_sets(got) == want
    assert got.shape[-1] == max(1, max(len(s) for s in want))  # width = the largest row


def test_from_marks_input_forms_agree():
    seq_len = 30
    positions = [[2, 9, 21], [5]]
    as_bool = torch.zeros(2, seq_len, dtype=torch.bool)
    as_bool[0, [2, 9, 21]] = True
    as_bool[1, 5] = True
    as_int = torch.tensor([[21, 2, 9], [5, -1, -1]])
    results = [selection.from_marks(m, seq_len, window=4, sinks=1) for m in (positions, as_bool, as_int)]
    for other in results[1:]:
        assert torch.equal(results[0], other)
    one_row = selection.from_marks([2, 9, 21], seq_len, window=4, sinks=1, batch=2, dtype=torch.int32)
    assert one_row.dtype == torch.int32 and one_row.shape[0] == 2
    assert torch.equal(one_row[0].long(), results[0][0])
    none = selection.from_marks(None, seq_len, window=3, sinks=2, batch=3)
    assert rows_as_sets(none) == expected_marks([[]] * 3, seq_len, 3, 2, True, seq_len)


def test_from_marks_feeds_topk_attention():
    """Indices from marks run through the kernels and match the reference (per-query, broadcast head)."""
    B, Hq, Hkv, N, D = 2, 4, 2, 45, 64
    q, k, v = randn(B, Hq, N, D), randn(B, Hkv, N, D), randn(B, Hkv, N, D)
    indices = selection.from_marks([[5, 33, 40], [1]], N, window=8, sinks=2)
    for backend in kernel_backends():
        check_against_reference(q, k, v, flashlite.TopK(indices, causal=True), backend)


@pytest.mark.parametrize("bad,error,match", [
    ([[1, 50]], ValueError, r"marks must be positions in \[0, seq_len\)"),
    ([-3], ValueError, r"marks must be positions in \[0, seq_len\)"),
    ([1.5], TypeError, "int positions"),
    ("3,4", TypeError, "marks must be None, a tensor"),
    (torch.ones(2, 60, dtype=torch.bool), ValueError, "N <= seq_len"),
    (torch.ones(2, 3), TypeError, "bool or integer tensor"),
    (torch.ones(3, dtype=torch.long), ValueError, r"\[B, N\]"),
])
def test_from_marks_bad_input(bad, error, match):
    with pytest.raises(error, match=match):
        selection.from_marks(bad, 40, window=2)


def test_from_marks_bad_options():
    with pytest.raises(ValueError, match="window"):
        selection.from_marks([1], 10, window=-1)
    with pytest.raises(ValueError, match="seq_len"):
        selection.from_marks([1], 0)
    with pytest.raises(TypeError, match="dtype"):
        selection.from_marks([1], 10, dtype=torch.float32)
    with pytest.raises(ValueError, match="batch rows"):
        selection.from_marks([[1], [2]], 10, batch=3)


# ---------------------------------------------------------------------------------------------
# topk_by_score against brute force
# ---------------------------------------------------------------------------------------------
def brute_force_topk(q, k, k_top, causal, group_reduce="mean", exclude=None):
    """Per KV head, the k_top best keys of the full score matrix (as sets per row)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scores = torch.einsum("bhgqd,bhkd->bhgqk", q.double().view(B, Hkv, Hq // Hkv, Nq, D), k.double()) * D ** -0.5
    scores = scores.mean(2) if group_reduce == "mean" else scores.amax(2)
    if causal:
        pos = torch.arange(Nq)[:, None] + Nk - Nq
        scores = scores.masked_fill(torch.arange(Nk)[None, :] > pos, float("-inf"))
    if exclude is not None:
        scores = scores.masked_fill(exclude, float("-inf"))
    vals, idx = scores.topk(min(k_top, Nk), dim=-1)
    return [{j for j, s in zip(r_i, r_v) if s != float("-inf")}
            for r_i, r_v in zip(idx.reshape(-1, idx.shape[-1]).tolist(), vals.reshape(-1, vals.shape[-1]).tolist())]


@pytest.mark.parametrize("shape,k_top,block_size,causal,group_reduce", [
    ((2, 4, 2, 37, 53, 16), 5, 8, False, "mean"),
    ((1, 6, 2, 40, 40, 32), 7, 16, True, "max"),
    ((1, 2, 2, 20, 90, 16), 12, 1024, True, "mean"),
    ((1, 2, 1, 9, 6, 16), 10, 4, False, "mean"),  # k_top > Nk: -1 padding
    ((1, 2, 1, 30, 12, 16), 4, 5, True, "mean"),  # Nq > Nk causal: early rows have no key
])
def test_topk_by_score_matches_brute_force(shape, k_top, block_size, causal, group_reduce, monkeypatch):
    monkeypatch.setattr(selection, "CHUNK_ELEMENTS", 256)  # force query chunking too
    B, Hq, Hkv, Nq, Nk, D = shape
    q = torch.randn(B, Hq, Nq, D, dtype=torch.float64)
    k = torch.randn(B, Hkv, Nk, D, dtype=torch.float64)
    got = selection.topk_by_score(q, k, k_top, block_size=block_size, causal=causal, group_reduce=group_reduce)
    assert got.shape == (B, Hkv, Nq, min(k_top, Nk)) or got.shape[-1] <= k_top
    assert rows_as_sets(got) == brute_force_topk(q, k, k_top, causal, group_reduce)


def test_topk_by_score_never_holds_the_full_score_matrix(monkeypatch):
    """Every score block is at most about CHUNK_ELEMENTS, far below Nq × Nk."""
    sizes = []
    real_matmul = torch.matmul

    def spy(a, b, *args, **kw):
        out = real_matmul(a, b, *args, **kw)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(selection, "CHUNK_ELEMENTS", 4096)
    monkeypatch.setattr(torch, "matmul", spy)
    q, k = torch.randn(1, 2, 300, 16), torch.randn(1, 2, 400, 16)
    selection.topk_by_score(q, k, 8, block_size=64)
    assert sizes and max(sizes) <= 4096 < 300 * 400


def test_topk_by_score_keeps_marks_and_fills_the_rest():
    """A person's marks are always kept; the selector fills the remaining slots with the best others."""
    B, Hq, Hkv, N, D, k_top = 1, 2, 1, 48, 16, 10
    q = torch.randn(B, Hq, N, D, dtype=torch.float64)
    k = torch.randn(B, Hkv, N, D, dtype=torch.float64)
    keep = selection.from_marks([[2, 30]], N, window=3, sinks=1)
    got = selection.topk_by_score(q, k, k_top, block_size=16, causal=True, keep=keep)
    kept_rows = rows_as_sets(keep)
    got_rows = rows_as_sets(got)
    exclude = flashlite.TopK(keep, causal=True).dense_mask(B, Hkv, Hkv, N, N, "cpu")
    best = brute_force_topk(q, k, N, True, exclude=exclude)  # ranking of the non-kept keys
    scores = torch.einsum("bhqd,bhkd->bhqk", q.view(B, Hkv, Hq, N, D).mean(2), k)[0, 0]
    for i, (row, kept) in enumerate(zip(got_rows, kept_rows)):
        assert kept <= row
        filled = row - kept
        assert len(row) == min(max(k_top, len(kept)), i + 1)
        others = sorted(best[i], key=lambda j: -float(scores[i, j]))
        assert filled == set(others[: len(filled)])


def test_topk_by_score_query_blocks():
    """query_block: rows of a block share the keys ranked by the block's best row."""
    B, H, N, D, k_top, qb = 1, 1, 40, 16, 6, 8
    q = torch.randn(B, H, N, D, dtype=torch.float64)
    k = torch.randn(B, H, N, D, dtype=torch.float64)
    got = selection.topk_by_score(q, k, k_top, block_size=16, query_block=qb)
    scores = (q @ k.transpose(-1, -2))[0, 0].view(N // qb, qb, N).amax(1)
    want = scores.topk(k_top, -1).indices.sort(-1).values.repeat_interleave(qb, 0)
    assert torch.equal(got[0, 0], want)
    keep = selection.from_marks([[1]], N, window=1)
    with_keep = selection.topk_by_score(q, k, k_top, block_size=16, query_block=qb, keep=keep)
    for row, kept in zip(rows_as_sets(with_keep), rows_as_sets(keep)):
        assert kept <= row and len(row) == k_top


def test_topk_by_score_indices_run_through_kernels():
    B, Hq, Hkv, N, D = 1, 4, 2, 45, 64
    q, k, v = randn(B, Hq, N, D), randn(B, Hkv, N, D), randn(B, Hkv, N, D)
    indices = selection.topk_by_score(q, k, 9, block_size=16, causal=True, dtype=torch.int32)
    for backend in kernel_backends():
        check_against_reference(q, k, v, flashlite.TopK(indices, causal=True), backend)


def test_topk_by_score_bad_input():
    q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="k_top"):
        selection.topk_by_score(q, k, 0)
    with pytest.raises(ValueError, match="group_reduce"):
        selection.topk_by_score(q, k, 2, group_reduce="sum")
    with pytest.raises(ValueError, match="q must be"):
        selection.topk_by_score(q[0], k, 2)
    with pytest.raises(ValueError, match="multiple of k heads"):
        selection.topk_by_score(torch.randn(1, 3, 8, 16), k, 2)
    with pytest.raises(ValueError, match="keep must lie"):
        selection.topk_by_score(q, k, 2, keep=torch.full((1, 1, 8, 2), 9))
    with pytest.raises(TypeError, match="keep must be"):
        selection.topk_by_score(q, k, 2, keep=torch.zeros(1, 1, 8, 2))


# ---------------------------------------------------------------------------------------------
# Block-level selection
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("summary", ["mean", "max"])
@pytest.mark.parametrize("causal", [False, True])
def test_topk_blocks_matches_brute_force(summary, causal):
    B, Hq, Hkv, Nq, Nk, D, bs, kb = 1, 4, 2, 100, 130, 16, 16, 3
    q = torch.randn(B, Hq, Nq, D, dtype=torch.float64)
    k = torch.randn(B, Hkv, Nk, D, dtype=torch.float64)
    got = selection.topk_blocks_by_score(q, k, kb, bs, summary=summary, causal=causal, local=False)
    mq, mk = -(-Nq // bs), -(-Nk // bs)
    kk = k.repeat_interleave(Hq // Hkv, 1)
    for a in range(mq):
        q_mean = q[:, :, a * bs:(a + 1) * bs].mean(2)
        last = min((a + 1) * bs, Nq) - 1 + Nk - Nq
        scores = []
        for b in range(mk):
            block = kk[:, :, b * bs:(b + 1) * bs]
            summ = block.mean(2) if summary == "mean" else block.amax(2)
            s = (q_mean * summ).sum(-1) * D ** -0.5
            if causal and b * bs > last:
                s = torch.full_like(s, float("-inf"))
            scores.append(s)
        scores = torch.stack(scores, -1)  # [B, Hq, mk]
        vals, idx = scores.topk(kb, -1)
        for h in range(Hq):
            want = {j for j, s in zip(idx[0, h].tolist(), vals[0, h].tolist()) if s != float("-inf")}
            assert rows_as_sets(got[0, h, a:a + 1]) == [want]


def test_blocks_to_pattern_local_and_keep():
    """Local diagonal blocks and keep_blocks are always in; the pattern runs and matches the reference."""
    B, Hq, Hkv, N, D, bs = 1, 2, 1, 96, 64, 16
    q, k, v = randn(B, Hq, N, D), randn(B, Hkv, N, D), randn(B, Hkv, N, D)
    blocks = selection.topk_blocks_by_score(q, k, 2, bs, causal=True, keep_blocks=[0])
    for a, row in enumerate(rows_as_sets(blocks[0, 0])):
        assert {0, a} <= row and all(b <= a for b in row)
    pattern = selection.blocks_to_pattern(blocks, bs, N, causal=True)
    assert isinstance(pattern, flashlite.BlockSparse) and pattern.layout.shape == (B, Hq, N // bs, N // bs)
    layout = torch.zeros(B, Hq, N // bs, N // bs, dtype=torch.bool)
    for h in range(Hq):
        for a, row in enumerate(rows_as_sets(blocks[0, h])):
            layout[0, h, a, list(row)] = True
    assert torch.equal(pattern.layout.cpu(), layout)
    check_against_reference(q, k, v, pattern, kernel_backends()[0])


def test_merge_is_a_rowwise_union():
    a = torch.tensor([[[[0, 3, -1], [2, -1, -1]]]])
    b = torch.tensor([[[3, 5]]])  # shared by every query
    got = selection.merge(a, b)
    assert rows_as_sets(got) == [{0, 3, 5}, {2, 3, 5}]
    with pytest.raises(TypeError, match="first must be"):
        selection.merge(a.float(), b)
