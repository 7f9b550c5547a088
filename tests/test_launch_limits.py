"""Triton launch grids within CUDA's limits for extreme shapes (issue 15 item 1).

gridDim.x <= 2^31 − 1, gridDim.y and gridDim.z <= 65535. Every Triton launch used to put
batch × heads on axis 1, so a decode step at batch 4096 × 32 heads was an invalid launch. The
launchers now compute their grids with ``launch.tile_grid`` and ``gather_launch.gather_grid`` /
``backward_kv_grid`` / ``reduce_grid`` (all over ``launch.program_grid``). These tests evaluate
those functions at extreme shapes, record the grids the real launchers pass for such shapes (fake
CUDA tensors, nothing runs), and run the kernels in the interpreter with the axis-0 limit lowered
so the split-grid path (rows over axis 1) is exercised against the reference.
"""
from __future__ import annotations

import pytest
import torch

from flashlite import Full, SlidingWindow, TopK
from flashlite.kernels import gather_launch, launch

from conftest import check_against_reference, randn
from triton_aot import record_launches

MAX_X, MAX_YZ = 2 ** 31 - 1, 65535
GPU = torch.device("cuda")


def within_limits(grid, tiles, rows):
    """The grid fits CUDA's limits and numbers tiles × rows programs with fewer than gridDim.y·gridDim.z
    to spare."""
    x, y, z = tuple(grid) + (1,) * (3 - len(grid))
    assert 1 <= x <= MAX_X and 1 <= y <= MAX_YZ and 1 <= z <= MAX_YZ, grid
    total = tiles * rows
    assert total <= x * y * z < total + y * z, (grid, tiles, rows)


# (batch, heads_q, heads_kv, seqlen): decode at 4096 × 32, B·H = 10^6, N = 10^6, and both at once.
EXTREME = [(4096, 32, 8, 1), (4096, 32, 32, 4096), (1000, 1000, 1000, 1), (1, 1, 1, 10 ** 6),
           (1000, 1000, 250, 10 ** 6), (1, 65536, 65536, 512)]


@pytest.mark.parametrize("shape", EXTREME, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", [64, 256])
def test_tile_grids_within_limits(shape, dtype, head_dim):
    batch, heads_q, heads_kv, seqlen = shape
    config = launch.tile_config(head_dim, dtype, GPU)
    for block in (config.block_m, config.block_n, 16):
        tiles = -(-seqlen // block)
        within_limits(launch.tile_grid(tiles, batch, heads_q), tiles, batch * heads_q)
        within_limits(launch.tile_grid(tiles, batch, heads_kv), tiles, batch * heads_kv)


@pytest.mark.parametrize("shape", EXTREME, ids=str)
@pytest.mark.parametrize("top_k", [1, 2048])
def test_gather_grids_within_limits(shape, top_k):
    batch, heads_q, heads_kv, seqlen = shape
    group = heads_q // heads_kv
    for head_dim, dtype in ((64, torch.float16), (256, torch.float16), (256, torch.float32)):
        block_q = gather_launch.forward_block_q(head_dim, group, GPU, dtype)
        for tiles in (seqlen, -(-seqlen // block_q)):  # row mode: one program per query; shared/union: per tile
            within_limits(gather_launch.gather_grid(tiles, batch, heads_kv), tiles, batch * heads_kv)
    entries = batch * heads_kv * seqlen * top_k  # every (query, key) selection of per-query indices
    block_e = gather_launch.backward_block_e(group)
    for replicas in (1, heads_kv):
        within_limits(gather_launch.backward_kv_grid(entries, block_e, replicas), -(-entries // block_e), replicas)
        keys = min(entries, batch * heads_kv * seqlen)
        within_limits(gather_launch.reduce_grid(keys, 16, replicas), -(-keys // 16), replicas)


def test_program_grid_folds_only_when_needed():
    assert launch.program_grid(3, 5) == (15, 1, 1)
    assert launch.program_grid(7813, 10 ** 6) == (-(-7813 * 10 ** 6 // 4), 4, 1)
    assert launch.program_grid(3, 4, max_x=7) == (6, 2, 1)
    assert launch.program_grid(3, 3, max_x=7) == (5, 2, 1)  # one program to spare
    assert launch.program_grid(10, 10 ** 6, max_x=10) == (10, 62500, 16)  # folded over y and z
    assert launch.program_grid(0, 4) == (0, 1, 1)  # nothing to launch
    with pytest.raises(ValueError, match="grid limits"):
        launch.program_grid(MAX_X, MAX_YZ ** 2 + 1)


@pytest.mark.parametrize("shape", [(4096, 32, 8, 1), (1000, 1000, 1000, 1), (1, 1, 1, 10 ** 6)], ids=str)
def test_launchers_pass_grids_within_limits(shape):
    """The grids the launchers really pass (forward and backward, tile and gather engines), for
    decode at batch 4096 × 32 heads, B·H = 10^6 and N = 10^6, on fake CUDA tensors."""
    batch, heads_q, heads_kv, seqlen = shape
    dtype, head_dim, top_k = torch.bfloat16, 128, 64
    config = launch.tile_config(head_dim, dtype, GPU)
    schedule = Full(True).schedule(seqlen, seqlen, config.block_m, config.block_n)
    group = heads_q // heads_kv

    def run():
        q = torch.empty(batch, heads_q, seqlen, head_dim, dtype=dtype, device=GPU)
        k = torch.empty(batch, heads_kv, seqlen, head_dim, dtype=dtype, device=GPU)
        out, lse = launch.tile_forward(q, k, k, schedule, 0.1, config=config)
        launch.tile_backward(out, q, k, k, out, lse, schedule, 0.1, config=config)
        rows = torch.empty(batch, heads_kv, seqlen, top_k, dtype=torch.int64, device=GPU)
        plan = gather_launch.forward_plan(rows, seqlen, seqlen, True, group, head_dim, mode="row")
        out, lse = gather_launch.gather_forward(q, k, k, plan, heads_kv, True, 0.1)
        entries, i32, i64 = batch * heads_kv * seqlen * top_k, dict(dtype=torch.int32, device=GPU), \
            dict(dtype=torch.int64, device=GPU)
        keys = batch * heads_kv * seqlen
        inverse = gather_launch.InversePlan(
            16, entries, torch.empty(entries, **i32), torch.empty(entries, **i64), torch.empty(entries, **i32),
            torch.empty(entries // 16 + 1, **i64), torch.empty(keys, **i64), torch.empty(keys, **i64),
            torch.empty(keys, **i32))
        gather_launch.gather_backward(out, q, k, k, out, lse, plan, inverse, heads_kv, True, 0.1)

    launches = record_launches(run)
    assert {x.kernel for x in launches} == {"tile_forward_kernel", "tile_backward_kv_kernel", "tile_backward_q_kernel",
                                            "gather_forward_kernel", "gather_backward_q_kernel",
                                            "gather_backward_kv_kernel", "gather_reduce_kv_kernel"}
    for x in launches:
        names = {"tile_backward_kv_kernel": ("num_tiles", "num_rows"), "gather_backward_kv_kernel":
                 ("num_chunks", "replicas"), "gather_reduce_kv_kernel": ("num_blocks", "replicas")}
        tiles_name, rows_name = names.get(x.kernel, ("num_tiles", "num_rows"))
        tiles, rows = (x.ints[n] for n in (tiles_name, rows_name))
        within_limits(x.grid, tiles, rows)


@pytest.mark.parametrize("lengths,heads_q,heads_kv", [
    ([1] * 10 ** 6, 65536, 8),  # 10^6 one-token sequences x 65536 heads: the forward grid folds
    ([10 ** 6 - 999 * 1000] + [1000] * 999, 32, 8),  # one long sequence and many short ones
], ids=["1e6x1-65536heads", "long+999x1000"])
def test_packed_launchers_pass_grids_within_limits(lengths, heads_q, heads_kv):
    """Packed (varlen) launches: one program per work item and head (q_items for the forward and
    dQ kernels, k_items for dK/dV), PACKED set, grids within CUDA's limits."""
    from flashlite.core.packed import Packed, packed_schedule

    dtype, head_dim, total = torch.bfloat16, 128, sum(lengths)
    config = launch.tile_config(head_dim, dtype, GPU)
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    schedule = packed_schedule(Packed(Full(True), cu_seqlens, cu_seqlens), total, total, config.block_m,
                               config.block_n)

    def run():
        q = torch.empty(1, heads_q, total, head_dim, dtype=dtype, device=GPU)
        k = torch.empty(1, heads_kv, total, head_dim, dtype=dtype, device=GPU)
        out, lse = launch.tile_forward(q, k, k, schedule, 0.1, config=config)
        launch.tile_backward(out, q, k, k, out, lse, schedule, 0.1, config=config)

    launches = record_launches(run)
    items = {"tile_forward_kernel": (schedule.q_items.shape[0], heads_q),
             "tile_backward_q_kernel": (schedule.q_items.shape[0], heads_q),
             "tile_backward_kv_kernel": (schedule.k_items.shape[0], heads_kv)}
    assert sorted(x.kernel for x in launches) == sorted(items)
    for x in launches:
        assert x.constexprs["PACKED"] is True
        assert (x.ints["num_tiles"], x.ints["num_rows"]) == items[x.kernel]
        within_limits(x.grid, *items[x.kernel])
    if len(lengths) == 10 ** 6:
        assert next(x for x in launches if x.kernel == "tile_forward_kernel").grid[1] > 1  # folded


@pytest.mark.parametrize("engine", ["tile", "gather"])
def test_split_grid_runs_correctly(monkeypatch, engine):
    """With gridDim.x lowered to 7, tiles × rows programs no longer fit on axis 0: the numbering folds
    over axis 1 (a spare program repeats the last row's work); results still follow the rule."""
    monkeypatch.setattr(launch, "MAX_GRID_X", 7)
    B, Hq, Hkv, N, D = 1, 3, 3, 70 if engine == "tile" else 9, 16
    q, k, v = randn(B, Hq, N, D), randn(B, Hkv, N, D), randn(B, Hkv, N, D)
    if engine == "tile":
        grid = launch.tile_grid(-(-N // 32), B, Hq)
        assert grid[1] > 1 and grid[0] * grid[1] > 3 * B * Hq  # folded, with a spare program
        check_against_reference(q, k, v, SlidingWindow(20, 3), "triton")
    else:
        monkeypatch.setattr(gather_launch, "FORCE_MODE", "row")  # one program per query: 27 programs
        indices = torch.randint(0, N, (B, Hkv, N, 4), device=q.device)
        check_against_reference(q, k, v, TopK(indices, causal=True), "triton")


def test_packed_split_grid_runs_correctly(monkeypatch):
    """Packed launches with gridDim.x lowered to 7: items × heads programs fold over axis 1 (spare
    programs repeat the last row's work); the same out and gradients as the unfolded launch."""
    import flashlite
    from flashlite import SlidingWindow

    lengths = [20, 45, 5, 33]
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
    q, k, v = randn(sum(lengths), 3, 16), randn(sum(lengths), 3, 16), randn(sum(lengths), 3, 16)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = flashlite.varlen_attention(*leaves, cu_seqlens, cu_seqlens, SlidingWindow(20, 3), backend="triton")
        out.backward(torch.ones_like(out))
        return [out.detach()] + [t.grad for t in leaves]

    want = run()
    monkeypatch.setattr(launch, "MAX_GRID_X", 7)
    items = sum(-(-n // 32) for n in lengths)
    assert launch.tile_grid(items, 1, 3)[1] > 1
    for name, got, w in zip(("out", "dq", "dk", "dv"), run(), want):
        assert torch.equal(got, w), name
