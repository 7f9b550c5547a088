"""Top-k (gather engine) against the reference, forward and gradients, on every kernel backend that
runs here: per-query and shared indices, broadcast index heads, GQA, causal, empty slots, rows with
nothing selected, K = 1 and K >= Nk, one-query decode, int32/int64, head dims, dtypes, softcap and
ALiBi, the row/union kernel paths, determinism, plan sizes, and bad input."""
from __future__ import annotations

import pytest
import torch

import flashlite
from flashlite import TopK

from conftest import DEVICE, DTYPES, check_against_reference, kernel_backends, randn

BACKENDS = kernel_backends()


def qkv(B, Hq, Hkv, Nq, Nk, D, dtype=torch.float32):
    return randn(B, Hq, Nq, D, dtype=dtype), randn(B, Hkv, Nk, D, dtype=dtype), randn(B, Hkv, Nk, D, dtype=dtype)


def random_indices(shape_prefix, seqlen_k: int, width: int, empty: float = 0.0, dtype=torch.int64) -> torch.Tensor:
    """Distinct keys per row (``-1`` beyond Nk when width > Nk), a share ``empty`` of slots set to -1."""
    draws = torch.rand(*shape_prefix, max(seqlen_k, width), device=DEVICE)
    if width > seqlen_k:
        draws[..., seqlen_k:] = 2.0  # sorted last -> become -1
    order = draws.argsort(-1)[..., :width]
    order = torch.where(order < seqlen_k, order, torch.full_like(order, -1))
    if empty:
        order = torch.where(torch.rand(order.shape, device=DEVICE) < empty, torch.full_like(order, -1), order)
    return order.to(dtype)


@pytest.fixture(params=["auto", "row"])
def kernel_mode(request, monkeypatch):
    """Run the Triton kernels in their automatic mode and forced into the per-row path."""
    from flashlite.kernels import gather_launch

    monkeypatch.setattr(gather_launch, "FORCE_MODE", None if request.param == "auto" else request.param)
    return request.param


# (B, Hq, Hkv, Nq, Nk, D, K): odd lengths, Nq != Nk both ways, GQA/MQA, one-query decode.
SHAPES = [
    (1, 2, 2, 37, 45, 64, 9),
    (2, 4, 2, 23, 61, 40, 16),
    (1, 4, 1, 30, 19, 128, 7),
    (2, 3, 3, 1, 70, 64, 20),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_per_query_indices(backend, dtype, shape, causal):
    B, Hq, Hkv, Nq, Nk, D, K = shape
    indices = random_indices((B, Hkv, Nq), Nk, K, empty=0.2)
    check_against_reference(*qkv(B, Hq, Hkv, Nq, Nk, D, dtype), TopK(indices, causal), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_row_mode(backend, causal, kernel_mode):
    """The per-row kernel path (one query position per program), GQA and a broadcast index head."""
    B, Hq, Hkv, Nq, Nk, D, K = 1, 4, 2, 9, 33, 64, 11
    indices = random_indices((B, 1, Nq), Nk, K, empty=0.2)
    check_against_reference(*qkv(B, Hq, Hkv, Nq, Nk, D), TopK(indices, causal), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("index_heads,dtype", [(1, torch.float16), (2, torch.float32)], ids=str)
def test_shared_indices(backend, causal, index_heads, dtype):
    """[B, Hkv|1, K]: the same keys for every query (each key selected by many queries: the dK/dV
    reduction adds several pieces per key)."""
    B, Hq, Hkv, Nq, Nk, D, K = 2, 4, 2, 50, 40, 64, 12
    indices = random_indices((B, index_heads), Nk, K, empty=0.2)
    check_against_reference(*qkv(B, Hq, Hkv, Nq, Nk, D, dtype), TopK(indices, causal), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_index_heads_gqa(backend):
    """Indices [B, 1, Nq, K] shared by all KV heads, with 2 query heads per KV head."""
    B, Hq, Hkv, Nq, Nk, D, K = 2, 6, 3, 21, 40, 64, 8
    indices = random_indices((B, 1, Nq), Nk, K)
    check_against_reference(*qkv(B, Hq, Hkv, Nq, Nk, D), TopK(indices, True), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("width", [1, 41, 55], ids=lambda w: f"K={w}")
def test_k_one_and_k_at_least_nk(backend, width, kernel_mode):
    """K = 1; K = Nk (every key, permuted); K > Nk (padded with -1). Full coverage equals full attention."""
    B, Hq, Hkv, Nq, Nk, D = 1, 2, 1, 13, 41, 40
    q, k, v = qkv(B, Hq, Hkv, Nq, Nk, D)
    indices = random_indices((B, Hkv, Nq), Nk, width)
    out = check_against_reference(q, k, v, TopK(indices, False), backend)
    if width >= Nk:
        full = flashlite.attention(q, k, v, backend="reference")
        torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_with_nothing_selected(backend, kernel_mode):
    """All-empty rows and causally excluded rows give zeros, lse = -inf, finite gradients."""
    B, Hq, Hkv, Nq, Nk, D, K = 1, 2, 2, 12, 8, 64, 5
    indices = random_indices((B, Hkv, Nq), Nk, K)
    indices[0, 0, 3] = -1
    indices[0, 1, :2] = -1
    q, k, v = qkv(B, Hq, Hkv, Nq, Nk, D)
    out = check_against_reference(q, k, v, TopK(indices, causal=True), backend)  # Nq > Nk: early rows see none
    _, lse = flashlite.attention(q, k, v, TopK(indices, causal=True), backend=backend, return_lse=True)
    assert out[0, 0, 3].abs().max() == 0 and torch.isneginf(lse[0, 0, 3])
    assert out[0, :, : Nq - Nk].abs().max() == 0  # p(i) < 0: no key at all


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_step(backend, kernel_mode):
    """Nq = 1 with a long cache: p(0) = Nk - 1 sees every listed key."""
    B, Hq, Hkv, Nk, D, K = 2, 8, 2, 300, 128, 24
    indices = random_indices((B, Hkv, 1), Nk, K, dtype=torch.int32)
    check_against_reference(*qkv(B, Hq, Hkv, 1, Nk, D, torch.float16), TopK(indices, causal=True), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("shared", [False, True])
def test_index_dtypes(backend, index_dtype, shared):
    B, Hq, Hkv, Nq, Nk, D, K = 1, 2, 2, 19, 27, 64, 6
    prefix = (B, Hkv) if shared else (B, Hkv, Nq)
    indices = random_indices(prefix, Nk, K, empty=0.1, dtype=index_dtype)
    check_against_reference(*qkv(B, Hq, Hkv, Nq, Nk, D), TopK(indices, causal=True), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim", [40, 64, 128])
def test_head_dims(backend, head_dim):
    B, Hq, Hkv, Nq, Nk, D, K = 1, 2, 1, 17, 33, 64, 10
    indices = random_indices((B, Hkv, Nq), Nk, K)
    check_against_reference(*qkv(B, Hq, Hkv, Nq, Nk, head_dim, torch.float16), TopK(indices, False), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap,alibi", [(5.0, False), (None, True), (3.0, True)], ids=str)
def test_softcap_and_alibi(backend, softcap, alibi):
    B, Hq, Hkv, Nq, Nk, D, K = 2, 4, 2, 20, 36, 64, 9
    q, k, v = qkv(B, Hq, Hkv, Nq, Nk, D)
    indices = random_indices((B, Hkv, Nq), Nk, K, empty=0.1)
    slopes = torch.rand(B, Hq, device=DEVICE) * 0.5 if alibi else None
    check_against_reference(q * 3, k, v, TopK(indices, True), backend, softcap=softcap, alibi_slopes=slopes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views(backend):
    """[B, S, H, D] views transposed to [B, H, S, D] and a non-contiguous index view."""
    B, S, H, D, K = 1, 29, 2, 64, 7
    q, k, v = (randn(B, S, H, D).transpose(1, 2) for _ in range(3))
    indices = random_indices((B, S, H), S, K).transpose(1, 2)
    assert not indices.is_contiguous()
    out = check_against_reference(q, k, v, TopK(indices, True), backend)
    again = flashlite.topk_attention(q.contiguous(), k.contiguous(), v.contiguous(), indices.contiguous(),
                                     causal=True, backend=backend)
    torch.testing.assert_close(out, again, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_attention_function_and_duplicates_across_rows(backend):
    """flashlite.topk_attention; rows sharing most keys (a sliding band) like the selection helpers make."""
    B, Hq, Hkv, Nq, Nk, D, K = 1, 2, 1, 48, 48, 64, 10
    pos = torch.arange(Nq, device=DEVICE)[:, None] - torch.arange(K, device=DEVICE)[None, :]
    indices = torch.where(pos >= 0, pos, torch.full_like(pos, -1)).expand(B, Hkv, Nq, K)
    q, k, v = qkv(B, Hq, Hkv, Nq, Nk, D)
    out = flashlite.topk_attention(q, k, v, indices, causal=True, backend=backend)
    window = flashlite.sliding_window_attention(q, k, v, K - 1, backend="reference")
    torch.testing.assert_close(out, window, atol=2e-6, rtol=1e-5)


def test_backward_is_deterministic():
    """Same inputs -> bitwise the same gradients (no atomics anywhere)."""
    B, Hq, Hkv, Nq, Nk, D, K = 1, 4, 2, 40, 30, 64, 12
    q, k, v = qkv(B, Hq, Hkv, Nq, Nk, D)
    indices = random_indices((B, Hkv), Nk, K)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        flashlite.topk_attention(*leaves, indices, causal=True, backend="triton").sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_plans_are_linear_in_selections():
    """The index plans hold O(Nq·K) entries, never Nq × Nk: random rows (little sharing) take the row
    path, whose plan is the index tensor itself; the inverse lists hold one entry per selection."""
    from flashlite.kernels import gather_launch

    from flashlite.core.gather_rows import canonical_rows, key_index

    Nq = Nk = 2048
    K = 8
    rows = canonical_rows(random_indices((1, 1, Nq), Nk, K), Nq, Nk, True)
    plan = gather_launch.forward_plan(rows, Nq, Nk, True, 1, 64)
    assert plan.mode == "row" and plan.lists is rows and plan.member is None
    inverse = gather_launch.inverse_plan(*key_index(rows, Nq, Nk, True), K, 64)
    assert inverse.entry_query.numel() <= Nq * K and inverse.key_id.numel() <= Nk
    forced = gather_launch.forward_plan(rows, Nq, Nk, True, 1, 64, "union")
    assert forced.member.numel() <= Nq * min(Nk, forced.block_q * K)


def test_union_plan_dedupes_overlapping_rows():
    """A band of width K (like marks + window): a tile of 64 rows needs only 64 + K - 1 keys, and the
    automatic choice takes the union path."""
    from flashlite.kernels import gather_launch

    Nq, K = 256, 16
    pos = torch.arange(Nq, device=DEVICE)[:, None] - torch.arange(K, device=DEVICE)[None, :]
    from flashlite.core.gather_rows import canonical_rows

    indices = torch.where(pos >= 0, pos, torch.full_like(pos, -1))[None, None]
    plan = gather_launch.forward_plan(canonical_rows(indices, Nq, Nq, True), Nq, Nq, True, 1, 64)
    assert plan.mode == "union" and plan.block_q == 64
    assert int(plan.counts.max()) == 64 + K - 1
    assert plan.member.numel() == Nq * (64 + K - 1)


@pytest.mark.parametrize("make,error,match", [
    (lambda Nk: torch.full((1, 2, 5, 3), Nk, dtype=torch.long), ValueError, r"indices must lie in \[-1, Nk\)"),
    (lambda Nk: torch.full((1, 2, 5, 3), -2, dtype=torch.long), ValueError, r"indices must lie in \[-1, Nk\)"),
    (lambda Nk: torch.zeros(1, 2, 5, 3), TypeError, "int32 or int64"),
    (lambda Nk: torch.zeros(1, 2, 5, dtype=torch.int16), TypeError, "int32 or int64"),
    (lambda Nk: torch.zeros(1, 2, 4, 3, dtype=torch.long), ValueError, "indices must have shape"),
    (lambda Nk: torch.zeros(1, 3, 5, 3, dtype=torch.long), ValueError, "indices must have shape"),
    (lambda Nk: torch.zeros(2, 2, 3, dtype=torch.long), ValueError, "indices must have shape"),
    (lambda Nk: torch.zeros(5, 3, dtype=torch.long), ValueError, "indices must have shape"),
    (lambda Nk: torch.zeros(1, 2, 5, 0, dtype=torch.long), ValueError, "indices must have shape"),
    (lambda Nk: [[0, 1]], TypeError, "indices must be an int32/int64 torch.Tensor"),
])
def test_bad_indices(make, error, match):
    q, k, v = qkv(1, 2, 2, 5, 9, 32)
    with pytest.raises(error, match=match):
        indices = make(9)
        if isinstance(indices, torch.Tensor):
            indices = indices.to(DEVICE)
        flashlite.topk_attention(q, k, v, indices)


def test_index_range_revalidated_after_in_place_change():
    """The (min, max) check is cached per indices tensor and version: a valid call first, then an
    in-place write of an out-of-range index (to a view: same version counter) must still raise."""
    q, k, v = qkv(1, 2, 2, 5, 9, 32)
    indices = torch.randint(0, 9, (1, 2, 5, 3), device=DEVICE)
    flashlite.topk_attention(q, k, v, indices)
    indices[0, 1, 4, 2:] = 9
    with pytest.raises(ValueError, match=r"indices must lie in \[-1, Nk\)"):
        flashlite.topk_attention(q, k, v, indices)
    indices[0, 1, 4, 2:] = -1
    flashlite.topk_attention(q, k, v, indices)


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_backward_kv_in_column_steps(monkeypatch, softcap):
    """The dK/dV kernel takes head_dim 40 in steps of 16 columns (a partial last step), as it takes
    wider heads in steps on a GPU: the gradients still follow the rule."""
    from flashlite.kernels import gather_launch

    monkeypatch.setattr(gather_launch, "KV_COLUMNS_INTERPRETED", 16)
    B, Hq, Hkv, Nq, Nk, D, K = 1, 4, 2, 21, 37, 40, 9
    indices = random_indices((B, Hkv, Nq), Nk, K, empty=0.2)
    q, k, v = qkv(B, Hq, Hkv, Nq, Nk, D)
    check_against_reference(q * 3, k, v, TopK(indices, True), "triton", softcap=softcap)
