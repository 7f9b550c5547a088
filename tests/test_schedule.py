"""Block schedules: exactly the tiles a pattern touches, transposed correctly, never more;
and the kernel visits exactly the scheduled tiles."""
from __future__ import annotations

import pytest
import torch

from flashlite import BlockSparse, Full, SlidingWindow
from flashlite.core.schedule import cdiv, compress_layout, expand_layout

from conftest import DEVICE, randn


def touched_tiles(mask: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """Brute force: [.., Mq, Mk] bool, True where a (query tile, key tile) holds a visible element."""
    nq, nk = mask.shape[-2:]
    padded = torch.zeros(*mask.shape[:-2], cdiv(nq, block_m) * block_m, cdiv(nk, block_n) * block_n, dtype=torch.bool)
    padded[..., :nq, :nk] = mask
    tiles = padded.unflatten(-1, (-1, block_n)).unflatten(-3, (-1, block_m))
    return tiles.any(-1).any(-2)


def scheduled_tiles(tiles, count, num_cols, is_list):
    """Dense [.., rows, num_cols] bool from a schedule's (tiles, count)."""
    if is_list:
        return expand_layout(count, tiles, num_cols)
    col = torch.arange(num_cols)
    first = tiles[..., :1]
    return (col >= first) & (col < first + count[..., None])


def assert_schedule_exact(pattern, nq, nk, bm, bn, batch=1, heads=1):
    sched = pattern.schedule(nq, nk, bm, bn)
    mask = pattern.dense_mask(batch, heads, heads, nq, nk, "cpu")
    want = touched_tiles(mask, bm, bn)
    fwd = scheduled_tiles(sched.kv_tiles, sched.kv_count, sched.num_kv_tiles, sched.is_list)
    bwd = scheduled_tiles(sched.q_tiles, sched.q_count, sched.num_q_tiles, sched.is_list)
    want, fwd = torch.broadcast_tensors(want, fwd)
    assert torch.equal(fwd, want), f"forward schedule of {pattern} differs from the tiles it touches"
    assert torch.equal(bwd.expand_as(want.transpose(-1, -2)), want.transpose(-1, -2)), "backward schedule is not the transpose"
    assert torch.equal(sched.kv_count.expand(want.shape[:-1]), want.sum(-1, dtype=torch.int32))


@pytest.mark.parametrize("nq,nk", [(1, 1), (1, 300), (37, 37), (100, 61), (61, 100), (257, 129)])
@pytest.mark.parametrize("bm,bn", [(16, 16), (32, 64), (128, 64)])
@pytest.mark.parametrize("pattern", [Full(False), Full(True), SlidingWindow(0), SlidingWindow(5, 9),
                                     SlidingWindow(40), SlidingWindow(1000, 1000), SlidingWindow(0, 17)], ids=repr)
def test_band_schedules_are_exact(pattern, nq, nk, bm, bn):
    assert_schedule_exact(pattern, nq, nk, bm, bn)


@pytest.mark.parametrize("block_size,bm,bn", [(16, 16, 16), (64, 32, 64), (128, 64, 32), (128, 128, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_schedules_are_exact(block_size, bm, bn, causal):
    nq, nk = 300, 200
    layout = torch.rand(2, 3, cdiv(nq, block_size), cdiv(nk, block_size)) < 0.4
    assert_schedule_exact(BlockSparse(layout, block_size, causal=causal), nq, nk, bm, bn, batch=2, heads=3)


def test_window_over_long_sequence_visits_few_tiles():
    """Window 128 over 8192 keys with 64-wide tiles: at most 3 key tiles per query tile, not 128."""
    sched = SlidingWindow(128).schedule(8192, 8192, 64, 64)
    assert int(sched.kv_count.max()) == 3
    assert int(Full(False).schedule(8192, 8192, 64, 64).kv_count.min()) == 128
    causal = Full(True).schedule(8192, 8192, 64, 64)
    assert float(causal.kv_count.float().mean()) == pytest.approx((128 + 1) / 2)


def test_block_sparse_visits_only_marked_tiles():
    layout = torch.rand(1, 1, 128, 128) < 0.1
    sched = BlockSparse(layout, 64).schedule(8192, 8192, 64, 64)
    assert torch.equal(sched.kv_count[0, 0], layout[0, 0].sum(-1, dtype=torch.int32))
    assert sched.density() == pytest.approx(float(layout.float().mean()))


def test_compressed_round_trip():
    layout = torch.rand(2, 3, 7, 9) < 0.3
    lists, counts = compress_layout(layout)
    assert torch.equal(expand_layout(counts, lists, 9), layout)
    pattern = BlockSparse.from_compressed(counts, lists, 32, 9)
    assert torch.equal(pattern.layout, layout)
    counts2, lists2 = BlockSparse(layout, 32).to_compressed()
    assert torch.equal(counts2, counts) and torch.equal(lists2, lists)


def test_from_compressed_rejects_out_of_range():
    counts = torch.tensor([[[1, 2]]], dtype=torch.int32)
    lists = torch.tensor([[[0, -1], [1, 5]]], dtype=torch.int32)
    with pytest.raises(ValueError, match="kv_indices"):
        BlockSparse.from_compressed(counts, lists, 32, 3)


@pytest.mark.parametrize("pattern_factory", [lambda: Full(True), lambda: SlidingWindow(40, 7),
                                             lambda: BlockSparse(torch.rand(1, 2, 8, 6) < 0.3, 32)],
                         ids=["causal", "window", "block_sparse"])
def test_triton_kernel_visits_exactly_the_scheduled_tiles(pattern_factory):
    """The forward kernel counts the key tiles each program visits; it must equal the schedule."""
    from flashlite import kernels

    pattern = pattern_factory()
    B, H, Nq, Nk, D = 1, 2, 250, 180, 16
    q, k, v = randn(B, H, Nq, D), randn(B, H, Nk, D), randn(B, H, Nk, D)
    sched = pattern.schedule(Nq, Nk, 32, 32, DEVICE)
    counter = torch.full((B * H * sched.num_q_tiles,), -1, dtype=torch.int32, device=DEVICE)
    kernels.tile_forward(q, k, v, sched, D ** -0.5, tile_counter=counter)
    expected = sched.kv_count.expand(B, H, -1).reshape(-1)
    assert torch.equal(counter.cpu(), expected.cpu())
    full_tiles = sched.num_q_tiles * sched.num_kv_tiles * B * H
    assert int(counter.sum()) < full_tiles


def test_keys_per_query_counts_each_pattern():
    from flashlite import TopK

    indices = torch.tensor([[[[0, 3, -1], [1, -1, -1]], [[2, 4, 5], [-1, -1, -1]]]])  # [1, 2 kv heads, 2, 3]
    assert TopK(indices).keys_per_query(2, 6).tolist() == [[[2, 1], [3, 0]]]
    assert TopK(indices, causal=True).keys_per_query(2, 6).tolist() == [[[2, 1], [2, 0]]]  # p = (4, 5): drops 5
    assert Full(True).keys_per_query(3, 5).tolist() == [[[3, 4, 5]]]
    assert SlidingWindow(1, 1).keys_per_query(4, 4).tolist() == [[[2, 3, 3, 2]]]
