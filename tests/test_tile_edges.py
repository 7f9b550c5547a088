"""Interior vs edge tiles of the Triton tile engine (STYLE.md; issue 14 item 5).

The kernels walk the key tiles that every real row of a query tile sees whole (inside the band,
before Nk) without the element mask, and the rest (band edges, the last partial key tile, and in
dK/dV the last partial query tile) with it. These tests run the kernels at several tile sizes on
band and block-sparse schedules (Nq != Nk both ways, odd lengths, windows smaller than a tile)
against the float64 reference by the correctness rule, and count the masked tiles with the
forward kernel's debug counter (COUNT_TILES=2) against the rule computed here from the band.
"""
from __future__ import annotations

import pytest
import torch

from flashlite import BlockSparse, Full, SlidingWindow, kernels, reference
from flashlite.kernels import tile_engine

from conftest import DEVICE, assert_rule, randn

# (Nq, Nk, pattern, (block_m, block_n), dtype)
CASES = [
    (37, 77, Full(False), (16, 32), torch.float16),
    (67, 67, Full(True), (32, 16), torch.float32),
    (50, 83, Full(True), (16, 16), torch.float16),
    (83, 50, Full(True), (32, 32), torch.float32),  # the first 33 queries see no key
    (70, 70, SlidingWindow(5, 0), (32, 32), torch.float16),  # window smaller than a tile
    (45, 61, SlidingWindow(3, 2), (16, 32), torch.float32),
    (61, 45, SlidingWindow(20, 7), (16, 16), torch.float16),
    (99, 99, SlidingWindow(40, 40), (32, 16), torch.float32),
    (1, 70, SlidingWindow(0, 0), (16, 16), torch.float32),  # decode: one query, one key
    (90, 75, "block_sparse_causal", (16, 16), torch.float16),
    (70, 90, "block_sparse", (32, 16), torch.float32),
]


def _pattern(spec, seqlen_q, seqlen_k):
    if not isinstance(spec, str):
        return spec
    bs = 32
    layout = torch.rand(1, 2, -(-seqlen_q // bs), -(-seqlen_k // bs), device=DEVICE) < 0.7
    return BlockSparse(layout, bs, causal=spec.endswith("causal"))


def _case_id(case):
    nq, nk, spec, blocks, dtype = case
    return f"{nq}x{nk}-{spec}-{blocks[0]}x{blocks[1]}-{str(dtype)[6:]}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernels_match_reference_at_tile_edges(case):
    """out, lse, dq, dk, dv of the tile kernels (called directly, at the given tile size) against
    the float64 reference, by the correctness rule."""
    seqlen_q, seqlen_k, spec, (block_m, block_n), dtype = case
    pattern = _pattern(spec, seqlen_q, seqlen_k)
    check_tile_kernels(pattern, seqlen_q, seqlen_k, block_m, block_n, dtype)


@pytest.mark.parametrize("softcap,alibi", [(4.0, True), (2.5, False)], ids=["softcap+alibi", "softcap"])
def test_folded_log2e_with_softcap_and_alibi(softcap, alibi):
    """log2(e) folded into the softcap and ALiBi constants: the results still follow the rule."""
    check_tile_kernels(SlidingWindow(17, 5), 53, 71, 16, 16, torch.float32, softcap=softcap, alibi=alibi, q_scale=3.0)


@pytest.mark.parametrize("spec,blocks", [(Full(True), (32, 32)), ("block_sparse_causal", (32, 16))],
                         ids=["causal", "block_sparse_causal"])
def test_backward_sub_tiles(monkeypatch, spec, blocks):
    """The backward's own tiles: dK/dV takes each scheduled query tile SUB_M rows at a time and dQ
    each key tile SUB_N keys at a time (as on a GPU); halved here, the gradients still follow the rule."""
    monkeypatch.setattr(kernels.launch, "backward_launches",
                        lambda bm, bn, *args: (dict(SUB_M=bm // 2), dict(SUB_N=bn // 2)))
    check_tile_kernels(_pattern(spec, 75, 90), 75, 90, *blocks, torch.float16)


def check_tile_kernels(pattern, seqlen_q, seqlen_k, block_m, block_n, dtype, softcap=None, alibi=False, q_scale=1.0):
    B, Hq, Hkv, D = 1, 2, 1, 32
    q = randn(B, Hq, seqlen_q, D, dtype=dtype, scale=q_scale)
    k, v = randn(B, Hkv, seqlen_k, D, dtype=dtype), randn(B, Hkv, seqlen_k, D, dtype=dtype)
    slopes = torch.rand(Hq, device=DEVICE) * 0.5 if alibi else None
    scale = D ** -0.5
    schedule = pattern.schedule(seqlen_q, seqlen_k, block_m, block_n, DEVICE)
    out, lse = kernels.tile_forward(q, k, v, schedule, scale, softcap or 0.0, slopes)
    grad_out = torch.randn(B, Hq, seqlen_q, D, device=DEVICE, dtype=torch.float64)
    grads = kernels.tile_backward(grad_out.to(dtype), q, k, v, out, lse, schedule, scale, softcap or 0.0, slopes)

    kw = {"scale": scale, "softcap": softcap, "alibi_slopes": slopes, "return_lse": True}
    runs = {}
    for name, compute in (("exact", torch.float64), ("lowp", None), ("f32", torch.float32)):
        leaves = [t.detach().to(torch.float64 if compute == torch.float64 else t.dtype).requires_grad_(True)
                  for t in (q, k, v)]
        ref_out, ref_lse = reference.attention(*leaves, pattern, compute_dtype=compute, **kw)
        ref_out.backward(grad_out.to(ref_out.dtype))
        runs[name] = (ref_out, ref_lse, *[t.grad for t in leaves])
    assert not torch.isnan(out).any()
    for index, (name, got) in enumerate(zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads))):
        assert_rule(name, got, runs["lowp"][index], runs["exact"][index], fallback=runs["f32"][index])


class _CountEdges:
    """Stands in for ``tile_forward_kernel`` so the launcher's tile counter also receives the edge
    (element-masked) tiles per program: COUNT_TILES=2, counter of 2 × programs entries."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            kwargs["COUNT_TILES"] = 2 if kwargs.get("COUNT_TILES") else kwargs.get("COUNT_TILES", False)
            return self.kernel[grid](*args, **kwargs)
        return launch


def expected_edges(schedule, heads):
    """Per program (head-major, then query tile): the scheduled key tiles in which some real query
    row does not see some key (outside the band, or past Nk): the ones that need the element mask."""
    bm, bn, nq, nk = schedule.block_m, schedule.block_n, schedule.seqlen_q, schedule.seqlen_k
    rows = torch.arange(nq)[:, None]
    cols = torch.arange(schedule.num_kv_tiles * bn)[None, :]
    pos = rows + (nk - nq)
    visible = (cols < nk) & (cols >= pos - schedule.window_left) & (cols <= pos + schedule.window_right)
    edges = []
    tiles = schedule.kv_tiles.cpu().expand(1, heads, -1, -1)
    count = schedule.kv_count.cpu().expand(1, heads, -1)
    for h in range(heads):
        for m in range(schedule.num_q_tiles):
            scheduled = [int(tiles[0, h, m, 0]) + t if not schedule.is_list else int(tiles[0, h, m, t])
                         for t in range(int(count[0, h, m]))]
            block = visible[m * bm:(m + 1) * bm]
            edges.append(sum(not bool(block[:, n * bn:(n + 1) * bn].all()) for n in scheduled))
    return torch.tensor(edges, dtype=torch.int32)


@pytest.mark.parametrize("spec,nq,nk,blocks", [
    (Full(True), 250, 250, (32, 32)),
    (Full(True), 130, 200, (32, 16)),
    (Full(False), 100, 77, (16, 32)),
    (SlidingWindow(120, 20), 190, 170, (32, 32)),
    (SlidingWindow(5, 0), 100, 100, (32, 32)),
    ("block_sparse_causal", 160, 150, (16, 32)),
], ids=["causal", "causal-nq<nk", "full-odd", "window", "window<tile", "block_sparse_causal"])
def test_interior_tiles_skip_the_mask(monkeypatch, spec, nq, nk, blocks):
    """The forward kernel masks exactly the edge tiles of the rule, and visits every scheduled tile."""
    pattern = _pattern(spec, nq, nk)
    B, H, D = 1, 2, 16
    q, k, v = randn(B, H, nq, D), randn(B, H, nk, D), randn(B, H, nk, D)
    schedule = pattern.schedule(nq, nk, *blocks, DEVICE)
    programs = B * H * schedule.num_q_tiles
    counter = torch.full((2 * programs,), -1, dtype=torch.int32, device=DEVICE)
    counting = _CountEdges(tile_engine.tile_forward_kernel)
    for module in (tile_engine, kernels.launch):  # wherever the launcher looks the kernel up
        if hasattr(module, "tile_forward_kernel"):
            monkeypatch.setattr(module, "tile_forward_kernel", counting)
    kernels.tile_forward(q, k, v, schedule, D ** -0.5, tile_counter=counter)
    visited, edges = counter[:programs].cpu(), counter[programs:].cpu()
    assert torch.equal(visited, schedule.kv_count.cpu().expand(B, H, -1).reshape(-1))
    assert torch.equal(edges, expected_edges(schedule, H))
    interior = int((visited - edges).sum())
    if not isinstance(spec, SlidingWindow) or spec.band()[0] > 2 * blocks[1]:
        assert interior > 0, "no interior tile skipped the mask"
    print(f"{spec}: {interior} interior, {int(edges.sum())} edge tiles")
