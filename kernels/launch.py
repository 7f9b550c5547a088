"""Host-side launchers: allocate outputs, pick tile sizes, pass strides, launch the grid."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton

from . import tile_engine


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


# GPU launch configurations per (float32?, head-dim bucket), measured on sm_90a by
# tests/test_triton_budget.py (registers, spills, shared memory: tests/budgets/triton.json):
#   forward: TileConfig(block_m, block_n, warps, stages), the plan's tile (the schedule's);
#   dK/dV: (SUB_M, warps, stages), each scheduled query tile taken SUB_M rows at a time;
#   dQ: (SUB_N, warps, stages), each scheduled key tile taken SUB_N keys at a time.
# float32 dots run as tf32x3 on tensor cores (attention_steps.FP32_PRECISION): IEEE dots on FMA
# units spilled kilobytes per thread at every tile size.
GPU_TILES = {
    # 16-bit; d <= 64: 2 stages (3 spilled the block-sparse forward); dK/dV and dQ on 8 warps.
    (False, 64): (TileConfig(128, 64, 4, 2), (128, 8, 2), (64, 8, 2)),
    # d <= 128: the backward in 32-row / 32-key steps (whole tiles spilled with softcap).
    (False, 128): (TileConfig(128, 64, 8, 2), (32, 8, 2), (32, 8, 2)),
    (False, 256): (TileConfig(64, 32, 4, 2), (32, 4, 1), (32, 8, 2)),
    (True, 64): (TileConfig(32, 32, 4, 2), (16, 4, 2), (16, 4, 2)),
    (True, 128): (TileConfig(32, 32, 8, 2), (16, 8, 2), (16, 8, 2)),
    (True, 256): (TileConfig(16, 16, 4, 1), (16, 4, 1), (16, 4, 1)),
}


# The STATS forward and ENTROPY backward keep more values live (the statistics' running sums, the
# entropy's terms): where the launch above spilled with them on sm_90a (tests/triton_budget.py),
# (warps, stages) of the forward, dK/dV and dQ kernels with them; None keeps the launch above.
STATS_LAUNCH = {
    (False, 64): ((8, 2), None, None),
    (False, 128): (None, None, None),
    (False, 256): ((8, 2), (8, 1), None),
    (True, 64): (None, None, None),
    (True, 128): ((8, 1), None, (8, 1)),
    (True, 256): (None, None, None),
}


def stats_launch(kernel: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """num_warps/num_stages of a STATS (kernel 0, the forward) or ENTROPY (1: dK/dV, 2: dQ) launch on a
    GPU where ``STATS_LAUNCH`` changes them; {} otherwise."""
    if device.type != "cuda":
        return {}
    bucket = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    change = STATS_LAUNCH[(dtype == torch.float32, bucket)][kernel]
    return {} if change is None else dict(num_warps=change[0], num_stages=change[1])


def _gpu_tiles(head_dim: int, dtype: torch.dtype):
    bucket = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    return GPU_TILES[(dtype == torch.float32, bucket)]


def tile_config(head_dim: int, dtype: torch.dtype, device: torch.device,
                block_size: Optional[int] = None) -> TileConfig:
    """Tile sizes per (device, dtype, head_dim) (``GPU_TILES``). Block-sparse layouts need tiles
    dividing their block. float32 tiles are smaller than 16-bit ones: twice the bytes per element
    and three tensor-core products per dot (tf32x3)."""
    if device.type != "cuda":  # interpreter: fewer, larger numpy ops are faster
        config = TileConfig(32, 32)
    else:
        config = _gpu_tiles(head_dim, dtype)[0]
    if block_size is not None:
        config = TileConfig(min(config.block_m, block_size), min(config.block_n, block_size),
                            config.num_warps, config.num_stages)
    return config


MAX_GRID_X = 2 ** 31 - 1  # CUDA's limit on gridDim.x
MAX_GRID_YZ = 65535  # ... on gridDim.y and gridDim.z


def program_grid(tiles: int, rows: int, max_x: Optional[int] = None) -> Tuple[int, int, int]:
    """The launch grid of ``tiles`` × ``rows`` programs (rows: batch × heads, or KV-head replicas),
    within CUDA's limits: one axis when tiles·rows fits in gridDim.x (2^31 − 1), else the same
    numbering folded over axes 1 and 2 with fewer than gridDim.y·gridDim.z programs to spare (they
    repeat the last row's work). Kernels read it back with ``attention_steps.program_tile``
    (tile-fastest numbering, as the former (tiles, rows) grid)."""
    max_x = MAX_GRID_X if max_x is None else max_x
    total = int(tiles) * int(rows)
    if total <= max_x:
        return total, 1, 1
    folds = -(-total // max_x)  # y·z
    z = -(-folds // MAX_GRID_YZ)
    if z > MAX_GRID_YZ:
        raise ValueError(f"{tiles} x {rows} programs exceed CUDA's grid limits ({max_x} x {MAX_GRID_YZ}²)")
    y = -(-folds // z)
    return -(-total // (y * z)), y, z


def tile_grid(num_tiles: int, batch: int, heads: int) -> Tuple[int, int, int]:
    """Grid of a tile-engine launch: one program per (tile, batch × head); the forward and dQ
    kernels take query tiles and query heads, dK/dV key tiles and KV heads."""
    return program_grid(num_tiles, batch * heads)


def row_align(head_dim: int, *tensors: torch.Tensor) -> int:
    """The largest power of two up to 16 dividing ``head_dim`` and every batch, head and row stride of
    ``tensors``: the kernels' ``ALIGN``, a hint that lets row loads vectorize (16-byte loads and
    cp.async) when Triton's own specialization (strides divisible by 16) does not hold, e.g. at
    head_dim 40, 72 or 200."""
    align = 16
    for value in (head_dim, *(stride for t in tensors for stride in t.stride()[:3])):
        while value % align:
            align //= 2
    return align


def _poison(*tensors: torch.Tensor) -> None:
    """Under FLASHLITE_POISON=1 (the tests), outputs start as NaN so an unwritten element shows."""
    if os.environ.get("FLASHLITE_POISON") == "1":
        for t in tensors:
            t.fill_(float("nan"))


ROW_DOT_SHARE = 16  # row_dot converts at most 1/16 of a tensor (or 2^18 elements) to float32 at once


def row_dot(grad_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """δ_i = Σ_d dO_id · O_id, the softmax-backward row term: float32 ``[B, H, N]``, contiguous.

    Computed over slices of the sequence so the float32 copies stay a small share of the inputs
    (a whole-tensor product would build three full-size float32 temporaries)."""
    batch, heads, seqlen, head_dim = out.shape
    delta = torch.empty((batch, heads, seqlen), device=out.device, dtype=torch.float32)
    chunk = max(1 << 18, out.numel() // ROW_DOT_SHARE)
    step = max(1, chunk // max(1, batch * heads * head_dim))
    for start in range(0, seqlen, step):
        rows = min(step, seqlen - start)
        torch.linalg.vecdot(grad_out.narrow(2, start, rows).float(), out.narrow(2, start, rows).float(),
                            out=delta.narrow(2, start, rows))
    return delta


def softcap_mode(q: torch.Tensor, softcap) -> int:
    """The kernels' HAS_SOFTCAP: 0 none; 1 tanh from exp2 (exact: float32, and the interpreter, which
    runs no inline PTX); 2 tanh.approx.f32 (16-bit inputs on a GPU, whose rounding dominates its error)."""
    if not softcap:
        return 0
    return 2 if q.device.type == "cuda" and q.dtype != torch.float32 else 1


def _flags(q: torch.Tensor, schedule, softcap: float, alibi_slopes) -> dict:
    interpreted = q.device.type != "cuda"
    return dict(
        IS_LIST=schedule.is_list,
        MASK_BAND=schedule.bounded,
        HAS_SOFTCAP=softcap_mode(q, softcap),
        HAS_ALIBI=alibi_slopes is not None,
        UPCAST=interpreted,  # Triton's interpreter gets bf16 tl.dot wrong; fp32 math there
        IEEE_DOT=q.dtype == torch.float32 and not interpreted,  # no TF32 for fp32 inputs
        BLOCK_M=schedule.block_m,
        BLOCK_N=schedule.block_n,
        BLOCK_D=max(triton.next_power_of_2(q.shape[-1]), 16),
    )


def _schedule_args(tiles: torch.Tensor, count: torch.Tensor, batch: int, heads: int):
    tiles = tiles.expand(batch, heads, -1, -1)
    count = count.expand(batch, heads, -1)
    return tiles, count, (tiles.stride(0), tiles.stride(1), tiles.stride(2), count.stride(0), count.stride(1))


def _packed_args(schedule, items) -> tuple:
    """(ITEMS, CU_Q, CU_K, flags) of a launch: a packed schedule's work items (``items``: its
    q_items or k_items, int32 [n, 2]) and cu_seqlens with PACKED=True; otherwise None (constexpr:
    the kernels compile without them)."""
    if not schedule.is_packed:
        return (None, None, None), {}
    return (items, schedule.cu_seqlens_q, schedule.cu_seqlens_k), dict(PACKED=True)


def dropout_args(dropout: Optional[Tuple[float, int]]) -> dict:
    """The kernels' dropout arguments for ``dropout`` = (p, seed) (``flashlite.core.dropout``):
    DROPOUT=True, the seed, ``bias`` = ⌊p·2^32⌋ − 2^31 (the threshold as an int32: the kernels
    compare words with their top bit flipped, ``attention_steps.dropout_keep``) and 1 / (1 − p).
    None (or p = 0): {} - the kernels compile without dropout."""
    if dropout is None or not dropout[0]:
        return {}
    from flashlite.core.dropout import threshold

    p, seed = dropout
    return dict(DROPOUT=True, dropout_seed=int(seed), dropout_bias=threshold(p) - 2 ** 31,
                dropout_scale=1.0 / (1.0 - float(p)))


MAX_SINK = 2 ** 31 - 1  # sink_tokens past every key (an int32 in the kernels)


def stats_args(stats: Optional[int], lse: torch.Tensor) -> Tuple[Optional[torch.Tensor], dict]:
    """(row_stats, the forward kernels' arguments) for ``stats`` = sink_tokens (head statistics,
    flashlite.attention_stats): row_stats float32 ``[5, *lse.shape]`` (planes in
    flashlite.reference.STAT_NAMES order) and STATS=True with its pointer, plane stride and
    sink_tokens. None: (None, {}) - the kernels compile without statistics."""
    if stats is None:
        return None, {}
    row_stats = torch.empty((5,) + tuple(lse.shape), device=lse.device, dtype=torch.float32)
    _poison(row_stats)
    return row_stats, dict(STATS=True, ROW_STATS=row_stats, stats_plane=lse.numel(),
                           sink_tokens=min(int(stats), MAX_SINK))


def entropy_args(entropy: Optional[torch.Tensor], lse: torch.Tensor) -> dict:
    """The backward kernels' arguments for attention_stats' ``entropy`` terms (float32 ``[2, *lse.shape]``:
    g and g·(lse − H)): ENTROPY=True, the terms (contiguous) and their plane stride; None: {}."""
    if entropy is None:
        return {}
    terms = entropy.to(device=lse.device, dtype=torch.float32).contiguous()
    if tuple(terms.shape) != (2,) + tuple(lse.shape):
        raise ValueError(f"entropy terms must have shape {(2,) + tuple(lse.shape)}, got {tuple(terms.shape)}")
    return dict(ENTROPY=True, ENTROPY_TERMS=terms, entropy_plane=lse.numel())


def _alibi_args(alibi_slopes, fallback: torch.Tensor):
    if alibi_slopes is None:
        return fallback, 0
    return alibi_slopes, (alibi_slopes.stride(0) if alibi_slopes.dim() == 2 else 0)


def tile_forward(q, k, v, schedule, scale: float, softcap: float = 0.0, alibi_slopes=None,
                 tile_counter: Optional[torch.Tensor] = None, config: Optional[TileConfig] = None,
                 dropout: Optional[Tuple[float, int]] = None, stats: Optional[int] = None):
    """Forward over ``schedule``. Returns (out like q, lse float32 [B, Hq, Nq]). ``dropout``: (p, seed)
    of attention dropout (``flashlite.core.dropout``), or None. ``stats`` = sink_tokens: also the
    head statistics, (out, lse, row_stats float32 [5, B, Hq, Nq]) (``stats_args``).

    ``tile_counter`` (int32, ``B·Hq·num_q_tiles``), if given, receives how many key tiles each
    program visited: the evidence that tiles outside the pattern are skipped.
    A packed schedule (``schedule.is_packed``: q, k, v the ``[1, H, T, D]`` views of a packed
    batch) launches one program per forward work item and head.
    """
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads_q, seqlen_q), device=q.device, dtype=torch.float32)
    _poison(out, lse)
    row_stats, stat_flags = stats_args(stats, lse)
    tiles, count, sched_strides = _schedule_args(schedule.kv_tiles, schedule.kv_count, batch, heads_q)
    alibi, alibi_stride = _alibi_args(alibi_slopes, lse)
    items, packed = _packed_args(schedule, schedule.q_items)
    grid = tile_grid(schedule.num_q_tiles, batch, heads_q)
    launch = {} if config is None or q.device.type != "cuda" else dict(num_warps=config.num_warps,
                                                                        num_stages=config.num_stages)
    if stats is not None and launch:
        launch.update(stats_launch(0, head_dim, q.dtype, q.device))
    tile_engine.tile_forward_kernel[grid](
        q, k, v, out, lse, tiles, count, alibi, tile_counter if tile_counter is not None else count, *items,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        *sched_strides, alibi_stride,
        heads_q, heads_q // heads_kv, seqlen_q, seqlen_k, head_dim,
        schedule.window_left, schedule.window_right, float(scale), float(softcap or 0.0),
        schedule.num_q_tiles, batch * heads_q, COUNT_TILES=tile_counter is not None,
        ALIGN=row_align(head_dim, q, k, v, out), **_flags(q, schedule, softcap, alibi_slopes), **packed,
        **dropout_args(dropout), **stat_flags, **launch,
    )
    return (out, lse) if row_stats is None else (out, lse, row_stats)


def backward_launches(block_m: int, block_n: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                      config: Optional[TileConfig]) -> Tuple[dict, dict]:
    """Launch options of the dK/dV and dQ kernels at the plan's tile (block_m × block_n, the
    schedule's): the backward's own sub-tiles (dK/dV takes each query tile SUB_M rows at a time,
    dQ each key tile SUB_N keys at a time) and warps/stages (``GPU_TILES``), so the backward needs
    no tile size of its own in the plan."""
    if config is None or device.type != "cuda":
        return dict(SUB_M=block_m), dict(SUB_N=block_n)
    _, (sub_m, kv_warps, kv_stages), (sub_n, q_warps, q_stages) = _gpu_tiles(head_dim, dtype)
    return (dict(SUB_M=min(sub_m, block_m), num_warps=kv_warps, num_stages=kv_stages),
            dict(SUB_N=min(sub_n, block_n), num_warps=q_warps, num_stages=q_stages))


def tile_backward(grad_out, q, k, v, out, lse, schedule, scale: float, softcap: float = 0.0,
                  alibi_slopes=None, config: Optional[TileConfig] = None, dropout: Optional[Tuple[float, int]] = None,
                  entropy: Optional[torch.Tensor] = None):
    """Backward over ``schedule``: dK/dV per key tile (transposed schedule), dQ per query tile (per
    backward / forward work item when packed). δ = row_dot(dO, O) needs nothing packed: a row is a row
    (with dropout too: δ = rowsum(dO ⊙ out) of the dropped output). ``entropy``: attention_stats'
    terms float32 [2, B, Hq, Nq] (``entropy_args``), the entropy's gradient joins dS."""
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k = k.shape[1], k.shape[2]
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    delta = row_dot(grad_out, out)
    lse = lse.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _poison(dq, dk, dv)
    flags = dict(_flags(q, schedule, softcap, alibi_slopes), ALIGN=row_align(head_dim, q, k, v, grad_out, dq, dk, dv),
                 **dropout_args(dropout), **entropy_args(entropy, lse))
    alibi, alibi_stride = _alibi_args(alibi_slopes, lse)
    kv_launch, q_launch = backward_launches(schedule.block_m, schedule.block_n, head_dim, q.dtype, q.device, config)
    if entropy is not None and config is not None:
        kv_launch.update(stats_launch(1, head_dim, q.dtype, q.device))
        q_launch.update(stats_launch(2, head_dim, q.dtype, q.device))
    common = (float(scale), float(softcap or 0.0))

    q_tiles, q_count, q_strides = _schedule_args(schedule.q_tiles, schedule.q_count, batch, heads_q)
    items, packed = _packed_args(schedule, schedule.k_items)
    tile_engine.tile_backward_kv_kernel[tile_grid(schedule.num_kv_tiles, batch, heads_kv)](
        q, k, v, grad_out, lse, delta, dk, dv, q_tiles, q_count, alibi, *items,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3],
        *dk.stride()[:3], *dv.stride()[:3], *q_strides, alibi_stride,
        heads_kv, heads_q // heads_kv, seqlen_q, seqlen_k, head_dim,
        schedule.window_left, schedule.window_right, *common, schedule.num_kv_tiles, batch * heads_kv,
        **flags, **packed, **kv_launch,
    )
    kv_tiles, kv_count, kv_strides = _schedule_args(schedule.kv_tiles, schedule.kv_count, batch, heads_q)
    items, packed = _packed_args(schedule, schedule.q_items)
    tile_engine.tile_backward_q_kernel[tile_grid(schedule.num_q_tiles, batch, heads_q)](
        q, k, v, grad_out, lse, delta, dq, kv_tiles, kv_count, alibi, *items,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3],
        *dq.stride()[:3], *kv_strides, alibi_stride,
        heads_q, heads_q // heads_kv, seqlen_q, seqlen_k, head_dim,
        schedule.window_left, schedule.window_right, *common, schedule.num_q_tiles, batch * heads_q,
        **flags, **packed, **q_launch,
    )
    return dq, dk, dv
