"""flashlite.attention_map: pooled attention probabilities against a float64 materialized oracle
(reference scores -> softmax -> pooled per block) for every pattern, odd lengths, Nq != Nk, GQA,
blocks that do not divide the lengths and rows that see no key; chunked pass 2 equals one chunk;
bad input names the argument; and the selection scorer built on it."""
from __future__ import annotations

import importlib
import zlib

import pytest
import torch

import flashlite
from flashlite import reference, selection

from conftest import DEVICE, HAS_CUDA, kernel_backends, randn

amap = importlib.import_module("flashlite.maps")  # the module behind flashlite.attention_map

if HAS_CUDA:
    BACKENDS = ["reference"] + [name for name in kernel_backends() if name != "cpu"]
else:
    BACKENDS = ["reference"] + (["cpu"] if flashlite.backends().get("cpu") == "available" else [])


def oracle(q, k, pattern, block, **kw):
    """float64: the full probability matrix, pooled; and per query block the share of its rows that see a key."""
    bq, bk = block
    scores, _ = reference._masked_scores(q, k, k, pattern, torch.float64, kw.get("scale"), kw.get("softcap"),
                                         kw.get("alibi_slopes"), None, None)
    probs = reference.safe_softmax(scores)[0]
    batch, heads, seqlen_q, seqlen_k = probs.shape
    mq, mk = -(-seqlen_q // bq), -(-seqlen_k // bk)
    padded = torch.nn.functional.pad(probs, (0, mk * bk - seqlen_k, 0, mq * bq - seqlen_q))
    rows = (seqlen_q - torch.arange(mq, device=q.device) * bq).clamp(max=bq).double()
    pooled = padded.view(batch, heads, mq, bq, mk, bk).sum((3, 5)) / rows[:, None]
    sees = torch.isfinite(scores).any(-1).double()  # [B, Hq, Nq]
    sees = torch.nn.functional.pad(sees, (0, mq * bq - seqlen_q)).view(batch, heads, mq, bq).sum(-1) / rows
    return pooled, sees


def topk_indices(batch, heads_kv, seqlen_q, seqlen_k, width, shared=False):
    """Random rows with -1 slots, repeated keys, and (per query) one row of -1 only."""
    shape = (batch, heads_kv, width) if shared else (batch, heads_kv, seqlen_q, width)
    ind = torch.randint(-1, seqlen_k, shape, device=DEVICE)
    ind[..., 1] = ind[..., 0]  # a repeat: counts once
    if not shared:
        ind[:, :, 2] = -1
    return ind


# (name, B, Hq, Hkv, Nq, Nk, block, pattern builder, extras)
CASES = [
    ("full", 2, 4, 2, 37, 53, (8, 16), lambda b, hq, hkv, nq, nk: None, dict(softcap=5.0, alibi="h")),
    ("causal_nq_gt_nk", 1, 2, 1, 45, 30, (7, 9), lambda b, hq, hkv, nq, nk: flashlite.Full(causal=True),
     dict(alibi="bh")),
    ("window", 1, 4, 1, 50, 50, 16, lambda b, hq, hkv, nq, nk: flashlite.SlidingWindow(5, 3), dict(scale=0.3)),
    ("block_sparse", 2, 2, 2, 40, 70, (12, 10), lambda b, hq, hkv, nq, nk: flashlite.BlockSparse(
        _layout(b, hq, nq, nk), 16, causal=True), {}),
    ("topk_causal", 1, 4, 2, 33, 41, (5, 6), lambda b, hq, hkv, nq, nk: flashlite.TopK(
        topk_indices(b, hkv, nq, nk, 9), causal=True), dict(softcap=3.0, alibi="h")),
    ("topk_shared", 2, 2, 1, 19, 64, (64, 64), lambda b, hq, hkv, nq, nk: flashlite.TopK(
        topk_indices(b, 1, nq, nk, 12, shared=True)), {}),
]


def _layout(batch, heads, seqlen_q, seqlen_k):
    layout = torch.rand(batch, heads, -(-seqlen_q // 16), -(-seqlen_k // 16), device=DEVICE) < 0.5
    layout[:, :, 1] = False  # a query block that sees no key
    return layout


def _inputs(case, dtype=torch.float32):
    _, batch, heads_q, heads_kv, seqlen_q, seqlen_k, block, build, extras = case
    q = randn(batch, heads_q, seqlen_q, 16, dtype=dtype)
    k = randn(batch, heads_kv, seqlen_k, 16, dtype=dtype)
    kw = {key: value for key, value in extras.items() if key != "alibi"}
    if "alibi" in extras:
        shape = (heads_q,) if extras["alibi"] == "h" else (batch, heads_q)
        kw["alibi_slopes"] = torch.rand(shape, device=DEVICE) * 0.5
    block = (block, block) if isinstance(block, int) else block
    return q, k, build(batch, heads_q, heads_kv, seqlen_q, seqlen_k), block, kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_float64_oracle(case, backend):
    torch.manual_seed(zlib.crc32(case[0].encode()))
    q, k, pattern, block, kw = _inputs(case)
    got = flashlite.attention_map(q, k, pattern, block=case[6], backend=backend, **kw)
    want, sees = oracle(q, k, pattern, block, **kw)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert float((got.double() - want).abs().max()) < 2e-6
    # A row of the map sums to the share of its block's rows that see a key.
    assert float((got.double().sum(-1) - sees).abs().max()) < 2e-6
    if case[0] in ("causal_nq_gt_nk", "block_sparse", "topk_causal"):
        assert bool((sees < 1).any())  # the case does have rows that see no key


def test_low_precision():
    case = CASES[0]
    q, k, pattern, block, kw = _inputs(case, dtype=torch.float16)
    got = flashlite.attention_map(q, k, pattern, block=block, backend=BACKENDS[-1], **kw)
    want, sees = oracle(q, k, pattern, block, **kw)
    assert float((got.double() - want).abs().max()) < 1e-3
    assert float((got.double().sum(-1) - sees).abs().max()) < 1e-3


@pytest.mark.parametrize("chunk", [1, 1200, 8000])  # one row; rows inside a block; whole blocks per chunk
def test_chunks_agree(monkeypatch, chunk):
    results = {}
    for size in (1 << 22, chunk):
        monkeypatch.setattr(amap, "CHUNK_ELEMENTS", size)
        torch.manual_seed(1)
        for case in CASES[1:5]:  # dense rows (banded, block-sparse) and gathered rows (top-k)
            q, k, pattern, block, kw = _inputs(case)
            results.setdefault(case[0], []).append(
                flashlite.attention_map(q, k, pattern, block=block, backend="reference", **kw))
    for name, (whole, chunked) in results.items():
        torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0, msg=name)


def test_empty_and_no_grad():
    q = randn(1, 2, 0, 8)
    k = randn(1, 2, 10, 8)
    assert flashlite.attention_map(q, k, block=4).shape == (1, 2, 0, 3)
    out = flashlite.attention_map(randn(1, 2, 5, 8), randn(1, 2, 0, 8), block=(4, 4))
    assert out.shape == (1, 2, 2, 0)
    q = randn(1, 2, 9, 8, requires_grad=True)
    out = flashlite.attention_map(q, randn(1, 2, 9, 8), flashlite.Full(causal=True), block=4)
    assert not out.requires_grad and torch.allclose(out.sum(-1), torch.ones_like(out[..., 0]))


@pytest.mark.parametrize("block", [0, -4, (8,), (8, 0), (8, 8, 8), 2.5, True, "64", (8, True), None])
def test_bad_block(block):
    q, k = randn(1, 2, 8, 8), randn(1, 2, 8, 8)
    with pytest.raises((TypeError, ValueError), match="^block must be a positive int or a"):
        flashlite.attention_map(q, k, block=block)


def test_bad_input_names_the_argument():
    q, k = randn(1, 4, 8, 8), randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="^q must be 4-D"):
        flashlite.attention_map(q[0], k)
    with pytest.raises(ValueError, match="head_dim"):
        flashlite.attention_map(q, randn(1, 2, 8, 4))
    with pytest.raises(TypeError, match="^pattern must be"):
        flashlite.attention_map(q, k, "causal")
    with pytest.raises(ValueError, match="^alibi_slopes must have shape"):
        flashlite.attention_map(q, k, alibi_slopes=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="^softcap"):
        flashlite.attention_map(q, k, softcap=-1.0)
    with pytest.raises(ValueError, match="^indices must lie in"):
        flashlite.attention_map(q, k, flashlite.TopK(torch.full((1, 2, 8, 2), 8, device=DEVICE)))
    with pytest.raises(ValueError, match="^layout must have shape"):
        flashlite.attention_map(q, k, flashlite.BlockSparse(torch.ones(1, 1, 2, 2, dtype=torch.bool, device=DEVICE), 16))


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[4]], ids=["full", "block_sparse", "topk_causal"])
def test_head_mask(monkeypatch, case):
    """head_mask: masked heads' maps are zeros and the kept heads' the unmasked call's; pass 1 is one
    attention call with the mask (the plan's skip), pass 2 recomputes only the (batch row, KV head)
    pairs with a kept head."""
    torch.manual_seed(3)
    q, k, pattern, block, kw = _inputs(case)
    batch, heads_q, heads_kv = q.shape[0], q.shape[1], k.shape[1]
    group = heads_q // heads_kv
    backend = BACKENDS[-1]
    plain = flashlite.attention_map(q, k, pattern, block=block, backend=backend, **kw)
    keep = torch.ones(batch, heads_q, dtype=torch.bool, device=DEVICE)
    keep[0, :group] = False  # batch row 0: its first KV head's whole group
    keep[-1, -1] = False  # the last row: one head of a group that keeps the others (when group > 1)
    pass1, pass2 = [], []
    real_attention, real_dense, real_topk = amap.attention, amap._dense_rows, amap._topk_rows
    monkeypatch.setattr(amap, "attention", lambda *a, **kw: pass1.append(kw["head_mask"]) or real_attention(*a, **kw))
    monkeypatch.setattr(amap, "_dense_rows", lambda qf, *a: pass2.append(qf.shape[:2]) or real_dense(qf, *a))
    monkeypatch.setattr(amap, "_topk_rows", lambda qf, *a: pass2.append(qf.shape[:2]) or real_topk(qf, *a))
    for mask in (keep, keep[-1]):  # [B, Hq] and [Hq]
        pass1.clear(), pass2.clear()
        got = flashlite.attention_map(q, k, pattern, block=block, backend=backend, head_mask=mask, **kw)
        rows = mask.expand(batch, heads_q)
        assert not got[~rows].any()
        torch.testing.assert_close(got[rows], plain[rows], atol=1e-6, rtol=0)
        assert len(pass1) == 1 and pass1[0] is mask
        pairs = int(rows.view(batch, heads_kv, group).any(-1).sum())
        assert pass2 and set(pass2) == {(pairs, 1)}
    with pytest.raises(TypeError, match="^head_mask must be a bool tensor"):
        flashlite.attention_map(q, k, pattern, block=block, head_mask=torch.ones(heads_q, device=DEVICE))
    with pytest.raises(ValueError, match="^head_mask must have shape"):
        flashlite.attention_map(q, k, pattern, block=block, head_mask=keep[:, :1])


def test_dense_mask_rows_match_full_mask():
    torch.manual_seed(2)
    layout = torch.rand(1, 2, 3, 4) < 0.5
    patterns = [flashlite.Full(causal=True), flashlite.SlidingWindow(3, 2), flashlite.BlockSparse(layout, 16, True),
                flashlite.TopK(torch.randint(-1, 60, (1, 2, 40, 5)), causal=True)]
    for pattern in patterns:
        full = pattern.dense_mask(1, 4, 2, 40, 60, "cpu")
        for rows in ((0, 40), (5, 21), (16, 17), (39, 40), (7, 7)):
            part = pattern.dense_mask(1, 4, 2, 40, 60, "cpu", rows=rows)
            assert torch.equal(part, full[..., rows[0]:rows[1], :]), (pattern, rows)
    with pytest.raises(ValueError, match="^rows must be"):
        flashlite.Full().dense_mask(1, 1, 1, 4, 4, "cpu", rows=(3, 5))


# ---------------------------------------------------------------------------------------------
# The selection scorer
# ---------------------------------------------------------------------------------------------
def test_topk_blocks_by_attention_finds_planted_keys():
    torch.manual_seed(3)
    batch, heads_q, heads_kv, seqlen, dim, bs = 1, 2, 1, 80, 16, 16
    q = randn(batch, heads_q, seqlen, dim) * 0.1
    k = randn(batch, heads_kv, seqlen, dim) * 0.1
    direction = randn(dim)
    q += direction
    k[:, :, 34:38] += 4 * direction  # planted keys in key block 2
    picked = selection.topk_blocks_by_attention(q, k, 1, bs, local=False)
    assert picked.shape == (batch, heads_q, 5, 1) and picked.dtype == torch.int64
    assert bool((picked == 2).all())

    # Causal: blocks before the planted keys cannot see them; ranking equals the oracle's order.
    picked = selection.topk_blocks_by_attention(q, k, 2, bs, causal=True, local=False)
    assert bool((picked[:, :, 2:] == 2).any(-1).all())
    pooled, _ = oracle(q, k, flashlite.Full(causal=True), (bs, bs))
    for a in range(5):
        allowed = min(a, 4) + 1
        best = pooled[0, 0, a, :allowed].topk(min(2, allowed)).indices.sort().values.tolist()
        got = [x for x in picked[0, 0, a].tolist() if x >= 0]
        assert got == best, (a, got, best)
    pattern = selection.blocks_to_pattern(picked, bs, seqlen, causal=True)
    out = flashlite.attention(q, k, k, pattern, backend="reference")
    assert out.shape == q.shape

    # local / keep_blocks follow topk_blocks_by_score's conventions.
    picked = selection.topk_blocks_by_attention(q, k, 1, bs, causal=True, keep_blocks=[0])
    cheap = selection.topk_blocks_by_score(q, k, 1, bs, causal=True, keep_blocks=[0])
    assert picked.shape[:3] == cheap.shape[:3]
    for a in range(5):
        row = set(picked[0, 0, a].tolist()) - {-1}
        assert {0, a} <= row and max(row) <= a
    with pytest.raises(ValueError, match="^block_size must be one of"):
        selection.topk_blocks_by_attention(q, k, 1, 48)
    with pytest.raises(ValueError, match="^k_blocks must be"):
        selection.topk_blocks_by_attention(q, k, 0, bs)
