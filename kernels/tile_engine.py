"""The tile engine: exact attention over a block schedule, forward and backward, in Triton.

One kernel family serves full, causal, sliding-window and block-sparse attention. A pattern
is a *schedule* (``flashlite.core.schedule.TileSchedule``): per query tile, the key tiles to visit
(forward); per key tile, the query tiles (backward). Inside a visited tile an element mask
applies the band ``p(i) − left ≤ j ≤ p(i) + right`` and the sequence end.

Notation (per query row i, key column j): ``s_ij`` the score after scale/softcap/ALiBi,
``m_i`` the running max, ``l_i`` the running sum of ``exp(s_ij − m_i)``, ``lse_i = m_i + log l_i``.
Scores are carried in base 2 (``s·log2(e)``, log2(e) folded into the score constants once per
program) so the hot loop uses ``exp2``; ``lse`` is natural at the interface. The stages shared
with the gather engine (scores, online softmax, softmax backward) are in ``attention_steps``.

Interior and edge tiles (as FlashAttention-2/3 and Triton's fused-attention tutorial): the element
mask is needed only where a band edge, the sequence end or the end of the queries crosses a tile.
A query tile with real rows r0 ≤ i ≤ r1 (r1 = min(r0 + BLOCK_M, Nq) − 1) sees key tile
[c0, c0 + BLOCK_N) whole when

    c0 ≥ p(r1) − left,    c0 + BLOCK_N − 1 ≤ p(r0) + right,    c0 + BLOCK_N ≤ Nk

(the band is monotone in i, so its first and last rows bound it). Those *interior* tiles form one
range of tile indices [lo, hi), which a schedule row (a range, or an ascending list) holds in one
run of slots [ta, tb). The forward walks that run with no element mask and no row masks on its
key loads, then the other (*edge*) slots with them. The backward kernels mask every tile: split
the same way (or with a per-tile branch) they need more registers than sm_90 has at the launch
configurations, and spill (measured by compiling for sm_90), which costs more than the mask.

Packed (variable-length) batches (constexpr PACKED; ``flashlite.core.packed``): the tensors are
``[1, H, T, D]`` views of S sequences back to back, and a program's tile index is a *work item*
t: ``ITEMS[t] = (s, tile)``, the tile local to sequence s, whose rows start at ``CU_Q[s]`` and keys
at ``CU_K[s]`` with lengths Nq, Nk. The kernel offsets its row pointers by those starts and runs
the tile loop unchanged with Nq, Nk (local positions, ``p(i) = i + Nk − Nq``, the interior/edge
split included); the schedule row is the item's. Without PACKED the item pointers are None
(constexpr) and that code is not compiled.

Attention dropout (constexpr DROPOUT; ``flashlite.core.dropout``): element (b, h, i, j) has index
e = ((b·Hq + h)·Nq + i)·Nk + j (packed: i, j, Nq, Nk of the [1, Hq, Tq, Tk] view, i.e. r0 + local
row, c0 + local key) and is kept iff ``tl.randint(seed, e)`` ≥ ⌊p·2^32⌋; Z = M / (1 − p). The
forward multiplies P by Z before P·V only (l and lse stay undropped); the backward regenerates Z:
dV = (P ⊙ Z)ᵀ·dO, dS = P ⊙ ((dO·Vᵀ) ⊙ Z − δ). Without DROPOUT the seed, bias and scale are None
(constexpr) and that code is not compiled.

Head statistics (constexpr STATS on the forward; flashlite.attention_stats): beside m and l the
forward carries, per row, t = Σ 2^(s − m)·(s − m), d = Σ 2^(s − m)·|p(i) − j|, z = Σ_{j < sink}
2^(s − m) (each rescaled by α with the softmax) and c, the visible keys; the finish writes entropy
= ln l − ln 2·t / l, max_prob = 1 / l, d / l, z / l and c (``attention_steps.online_softmax_stats_step``,
``store_stats``; local positions in a packed batch). The entropy's gradient (constexpr ENTROPY on
both backward kernels) adds −g·P ⊙ (s − E[s]) to dS: dS = P ⊙ (dP − (δ − shift) − g·s) with
shift = g·(lse − H) per row. Without them the kernels compile as before.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_steps import (LOG2E, aligned, capped_scores, dot, dropout_keep, dropout_rows, entropy_rows, log2_lse,
                              online_softmax_stats_step, online_softmax_step, program_tile, score_grad, score_scales,
                              scores, softmax_finish, store_stats)

SPAN_CHUNK = tl.constexpr(64)  # list-schedule slots read at once when locating the interior run
NO_TILE = tl.constexpr(2147483647)  # past every tile index


@triton.jit
def _load_rows(base, rows, stride_row, cols_d, row_limit, d_ok, MASK_ROWS: tl.constexpr, UPCAST: tl.constexpr):
    """Rows ``rows`` of a [N, D] slice: zeros past ``head_dim`` and (MASK_ROWS) past ``row_limit``;
    fp32 if UPCAST."""
    mask = d_ok[None, :]
    if MASK_ROWS:
        mask = (rows < row_limit)[:, None] & d_ok[None, :]
    block = tl.load(base + rows.to(tl.int64)[:, None] * stride_row + cols_d[None, :], mask=mask, other=0.0)
    if UPCAST:
        block = block.to(tl.float32)
    return block


@triton.jit
def _packed_item(ITEMS, CU_ROWS, CU_COLS, item):
    """Work item ``item`` of a packed launch, (s, tile) = ITEMS[item]: returns (tile, s, r0, Nr, c0, Nc)
    with r0 = CU_ROWS[s], Nr = CU_ROWS[s + 1] − r0 (the item's own rows) and c0, Nc from CU_COLS (the
    rows it attends to)."""
    seq = tl.load(ITEMS + 2 * item)
    tile = tl.load(ITEMS + 2 * item + 1)
    row0 = tl.load(CU_ROWS + seq)
    col0 = tl.load(CU_COLS + seq)
    return tile, seq, row0, tl.load(CU_ROWS + seq + 1) - row0, col0, tl.load(CU_COLS + seq + 1) - col0


@triton.jit
def _scheduled_tile(schedule_row, first_tile, t, IS_LIST: tl.constexpr):
    """The t-th tile of a schedule row: the t-th list entry, or the range's first tile + t."""
    tile = first_tile + t
    if IS_LIST:
        tile = tl.load(schedule_row + t)
    return tile


@triton.jit
def _interior_span(schedule_row, first_tile, count, lo, hi, IS_LIST: tl.constexpr):
    """The slots [ta, tb) of a schedule row that hold the interior tiles (index in [lo, hi)): a
    range starts at ``first_tile``; a list is ascending, so ta, tb count its entries below lo, hi."""
    if IS_LIST:
        ta = 0
        tb = 0
        for start in range(0, count, SPAN_CHUNK):
            slots = start + tl.arange(0, SPAN_CHUNK)
            tiles = tl.load(schedule_row + slots, mask=slots < count, other=NO_TILE)
            ta += tl.sum((tiles < lo).to(tl.int32), 0)
            tb += tl.sum((tiles < hi).to(tl.int32), 0)
    else:
        ta = lo - first_tile
        tb = hi - first_tile
    ta = tl.minimum(tl.maximum(ta, 0), count)
    tb = tl.minimum(tl.maximum(tb, ta), count)
    return ta, tb


@triton.jit
def _interior_key_tiles(q_tile, seqlen_q, seqlen_k, window_left, window_right,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles [lo, hi) that every real row of query tile ``q_tile`` sees whole, with r0, r1 its
    first and last real rows:

        lo = ⌈max(p(r1) − left, 0) / BLOCK_N⌉,    hi = ⌊min(p(r0) + right + 1, Nk) / BLOCK_N⌋
    """
    first_row = q_tile * BLOCK_M
    last_row = tl.minimum(first_row + BLOCK_M, seqlen_q) - 1
    lo_key = tl.maximum(last_row + (seqlen_k - seqlen_q) - window_left, 0)
    hi_key = tl.maximum(tl.minimum(first_row + (seqlen_k - seqlen_q) + window_right + 1, seqlen_k), 0)
    return (lo_key + BLOCK_N - 1) // BLOCK_N, hi_key // BLOCK_N


@triton.jit
def _visible(query_pos, key_index, seqlen_k, window_left, window_right, MASK_BAND: tl.constexpr):
    """Element mask: inside the sequence and, for band patterns, inside the band."""
    visible = key_index[None, :] < seqlen_k
    if MASK_BAND:
        visible = visible & (key_index[None, :] >= query_pos[:, None] - window_left)
        visible = visible & (key_index[None, :] <= query_pos[:, None] + window_right)
    return visible


@triton.jit
def _forward_tile(m_i, l_i, acc, q, k_base, v_base, key_index, query_pos, stride_kn, stride_vn, cols_d, d_ok,
                  seqlen_k, window_left, window_right, slope2, qk_scale, cap2, EDGE: tl.constexpr,
                  MASK_BAND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                  UPCAST: tl.constexpr, IEEE_DOT: tl.constexpr, DROPOUT: tl.constexpr, seed, bias, dscale, drop_rows):
    """One key tile of the forward pass (EDGE: with the element mask and masked key rows):

        s_ij = (softcap·tanh(q_i·k_jᵀ·scale / softcap) − slope·|p(i) − j|)·log2(e),  edge: −inf where not visible
        m' = max(m, max_j s_ij);   α = 2^(m − m');   l' = α·l + Σ_j 2^(s_ij − m');   acc' = α·acc + 2^(s − m')·V
        DROPOUT: acc' = α·acc + (2^(s − m') ⊙ Z)·V,  Z_ij at e = drop_rows_i + j
    """
    k_tile = _load_rows(k_base, key_index, stride_kn, cols_d, seqlen_k, d_ok, EDGE, UPCAST)
    v_tile = _load_rows(v_base, key_index, stride_vn, cols_d, seqlen_k, d_ok, EDGE, UPCAST)
    s = scores(q, k_tile, query_pos, key_index, slope2, qk_scale, cap2, HAS_SOFTCAP, HAS_ALIBI, IEEE_DOT)
    if EDGE:
        s = tl.where(_visible(query_pos, key_index, seqlen_k, window_left, window_right, MASK_BAND), s, float("-inf"))
    z = 0.0
    if DROPOUT:
        z = dropout_keep(seed, bias, dscale, drop_rows[:, None] + key_index[None, :])
    return online_softmax_step(m_i, l_i, acc, s, v_tile, IEEE_DOT, DROPOUT, z)


@triton.jit
def _forward_tile_stats(m_i, l_i, acc, st_t, st_d, st_z, st_c, q, k_base, v_base, first_key, query_pos, stride_kn,
                        stride_vn, cols_d, d_ok, seqlen_k, window_left, window_right, slope2, qk_scale, cap2,
                        sink_tokens, BLOCK_N: tl.constexpr, EDGE: tl.constexpr, MASK_BAND: tl.constexpr,
                        HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr,
                        IEEE_DOT: tl.constexpr, DROPOUT: tl.constexpr, seed, bias, dscale, drop_rows):
    """``_forward_tile`` with the head statistics' running sums (STATS; ``online_softmax_stats_step``):
    distance |p(i) − j| and the sink keys j < sink_tokens at local positions; the tile's keys are
    first_key .. first_key + BLOCK_N − 1."""
    key_index = first_key + tl.arange(0, BLOCK_N)
    k_tile = _load_rows(k_base, key_index, stride_kn, cols_d, seqlen_k, d_ok, EDGE, UPCAST)
    v_tile = _load_rows(v_base, key_index, stride_vn, cols_d, seqlen_k, d_ok, EDGE, UPCAST)
    s = scores(q, k_tile, query_pos, key_index, slope2, qk_scale, cap2, HAS_SOFTCAP, HAS_ALIBI, IEEE_DOT)
    if EDGE:
        s = tl.where(_visible(query_pos, key_index, seqlen_k, window_left, window_right, MASK_BAND), s, float("-inf"))
    z = 0.0
    if DROPOUT:
        z = dropout_keep(seed, bias, dscale, drop_rows[:, None] + key_index[None, :])
    distance = tl.abs(query_pos[:, None] - key_index[None, :]).to(tl.float32)
    # Visible keys of each row in this tile, counted from the band (no Nq×BLOCK_N reduction: that
    # one more spilled on sm_90 at 128×64): [c0, c0 + BLOCK_N) ∩ [p(i) − left, p(i) + right] ∩ [0, Nk).
    last_key = tl.minimum(first_key + BLOCK_N, seqlen_k)  # exclusive
    lo = tl.zeros_like(query_pos) + first_key
    hi = tl.zeros_like(query_pos) + last_key
    if MASK_BAND:
        lo = tl.maximum(lo, query_pos - window_left)
        hi = tl.minimum(hi, query_pos + window_right + 1)
    visible_keys = tl.maximum(hi - lo, 0).to(tl.float32)
    return online_softmax_stats_step(m_i, l_i, acc, st_t, st_d, st_z, st_c, s, v_tile, distance,
                                     (key_index < sink_tokens)[None, :], visible_keys, IEEE_DOT, DROPOUT, z)


@triton.jit
def tile_forward_kernel(
    Q, K, V, OUT, LSE, KV_TILES, KV_COUNT, ALIBI, TILE_COUNTER, ITEMS, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    stride_tiles_b, stride_tiles_h, stride_tiles_m, stride_count_b, stride_count_h, stride_alibi_b,
    heads_q, group, seqlen_q, seqlen_k, head_dim, window_left, window_right, scale, softcap, num_tiles, num_rows,
    IS_LIST: tl.constexpr, MASK_BAND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    COUNT_TILES: tl.constexpr, UPCAST: tl.constexpr, IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
    PACKED: tl.constexpr = False, DROPOUT: tl.constexpr = False, dropout_seed=None, dropout_bias=None,
    dropout_scale=None, STATS: tl.constexpr = False, ROW_STATS=None, stats_plane=None, sink_tokens=None,
):
    """out, lse for one query tile (PACKED: one forward work item) over its scheduled key tiles.

    COUNT_TILES (debug): 1 stores the key tiles each program visited in ``TILE_COUNTER[program]``;
    2 also stores its edge (element-masked) tiles in ``TILE_COUNTER[programs + program]``.
    STATS: also the head statistics into ``ROW_STATS`` (float32 ``[5, B, Hq, Nq]``, planes
    ``stats_plane`` elements apart; ``attention_steps.store_stats``), from running sums beside the
    online softmax; without STATS the pointer and ints are None (constexpr) and that code is not compiled."""
    q_tile, batch_head = program_tile(num_tiles, num_rows)
    stride_qb, stride_qh, stride_qn = aligned(stride_qb, stride_qh, stride_qn, ALIGN)
    stride_kb, stride_kh, stride_kn = aligned(stride_kb, stride_kh, stride_kn, ALIGN)
    stride_vb, stride_vh, stride_vn = aligned(stride_vb, stride_vh, stride_vn, ALIGN)
    stride_ob, stride_oh, stride_on = aligned(stride_ob, stride_oh, stride_on, ALIGN)
    head_dim, _, _ = aligned(head_dim, head_dim, head_dim, ALIGN)
    batch = batch_head // heads_q
    head = batch_head % heads_q
    kv_head = head // group
    item = q_tile
    lse_stride = seqlen_q  # lse: [B, Hq, packed length]
    total_k = seqlen_k  # the dropout index counts keys of the whole (packed) matrix
    row0 = 0
    key0 = 0
    if PACKED:
        # Item (s, m): query tile m of sequence s, rows from r0 = cu_q[s], keys from c0 = cu_k[s];
        # Nq, Nk its lengths from here on; ALiBi slopes row s.
        q_tile, seq, row0, seqlen_q, key0, seqlen_k = _packed_item(ITEMS, CU_Q, CU_K, item)
        Q += row0.to(tl.int64) * stride_qn
        OUT += row0.to(tl.int64) * stride_on
        K += key0.to(tl.int64) * stride_kn
        V += key0.to(tl.int64) * stride_vn
        LSE += row0
        ALIBI += seq * stride_alibi_b
        if STATS:
            ROW_STATS += row0

    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    tile_cols = tl.arange(0, BLOCK_N)
    row_ok = rows < seqlen_q
    d_ok = cols_d < head_dim
    query_pos = rows + (seqlen_k - seqlen_q)  # p(i), bottom-right alignment

    q = _load_rows(Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh, rows, stride_qn, cols_d,
                   seqlen_q, d_ok, True, UPCAST)
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    qk_scale, cap2 = score_scales(scale, softcap, HAS_SOFTCAP)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + batch * stride_alibi_b + head) * LOG2E

    drop_rows = 0
    if DROPOUT:
        # e − j = ((b·Hq + h)·Nq + r0 + i)·Nk + c0   (packed: Nq, Nk the packed lengths)
        drop_rows = dropout_rows(batch_head, row0 + rows, lse_stride, total_k, key0)

    schedule_row = KV_TILES + batch * stride_tiles_b + head * stride_tiles_h + item * stride_tiles_m
    tile_count = tl.load(KV_COUNT + batch * stride_count_b + head * stride_count_h + item)
    first_tile = tl.load(schedule_row)
    # Interior key tiles [lo, hi): inside every real row's band and before Nk; slots [ta, tb).
    lo, hi = _interior_key_tiles(q_tile, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N)
    ta, tb = _interior_span(schedule_row, first_tile, tile_count, lo, hi, IS_LIST)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if STATS:  # running sums of the head statistics (log2 units): t, d, z, c of online_softmax_stats_step
        st_t = tl.zeros([BLOCK_M], dtype=tl.float32)
        st_d = tl.zeros([BLOCK_M], dtype=tl.float32)
        st_z = tl.zeros([BLOCK_M], dtype=tl.float32)
        st_c = tl.zeros([BLOCK_M], dtype=tl.float32)
    interior = 0
    edges = 0
    # Interior tiles: scores, online softmax (base 2), no element mask.
    for t in range(ta, tb):
        key_index = _scheduled_tile(schedule_row, first_tile, t, IS_LIST) * BLOCK_N + tile_cols
        if STATS:
            m_i, l_i, acc, st_t, st_d, st_z, st_c = _forward_tile_stats(
                m_i, l_i, acc, st_t, st_d, st_z, st_c, q, k_base, v_base,
                _scheduled_tile(schedule_row, first_tile, t, IS_LIST) * BLOCK_N, query_pos, stride_kn, stride_vn,
                cols_d, d_ok, seqlen_k, window_left, window_right, slope2, qk_scale, cap2, sink_tokens, BLOCK_N,
                False, MASK_BAND, HAS_SOFTCAP, HAS_ALIBI, UPCAST, IEEE_DOT, DROPOUT, dropout_seed, dropout_bias,
                dropout_scale, drop_rows)
        else:
            m_i, l_i, acc = _forward_tile(m_i, l_i, acc, q, k_base, v_base, key_index, query_pos, stride_kn,
                                          stride_vn, cols_d, d_ok, seqlen_k, window_left, window_right, slope2,
                                          qk_scale, cap2, False, MASK_BAND, HAS_SOFTCAP, HAS_ALIBI, UPCAST, IEEE_DOT,
                                          DROPOUT, dropout_seed, dropout_bias, dropout_scale, drop_rows)
        interior += 1
    # Edge tiles (slots 0..ta−1 and tb..count−1: band edges, the last partial key tile): the same,
    # s_ij = −inf where j ≥ Nk or j is outside p(i) − left ≤ j ≤ p(i) + right.
    for e in range(0, tile_count - (tb - ta)):
        t = tl.where(e < ta, e, e + (tb - ta))
        key_index = _scheduled_tile(schedule_row, first_tile, t, IS_LIST) * BLOCK_N + tile_cols
        if STATS:
            m_i, l_i, acc, st_t, st_d, st_z, st_c = _forward_tile_stats(
                m_i, l_i, acc, st_t, st_d, st_z, st_c, q, k_base, v_base,
                _scheduled_tile(schedule_row, first_tile, t, IS_LIST) * BLOCK_N, query_pos, stride_kn, stride_vn,
                cols_d, d_ok, seqlen_k, window_left, window_right, slope2, qk_scale, cap2, sink_tokens, BLOCK_N,
                True, MASK_BAND, HAS_SOFTCAP, HAS_ALIBI, UPCAST, IEEE_DOT, DROPOUT, dropout_seed, dropout_bias,
                dropout_scale, drop_rows)
        else:
            m_i, l_i, acc = _forward_tile(m_i, l_i, acc, q, k_base, v_base, key_index, query_pos, stride_kn,
                                          stride_vn, cols_d, d_ok, seqlen_k, window_left, window_right, slope2,
                                          qk_scale, cap2, True, MASK_BAND, HAS_SOFTCAP, HAS_ALIBI, UPCAST, IEEE_DOT,
                                          DROPOUT, dropout_seed, dropout_bias, dropout_scale, drop_rows)
        edges += 1

    # Finish: out = acc / l, lse = (m + log2 l)·ln 2; rows that saw no key give 0 and −inf.
    out, lse = softmax_finish(m_i, l_i, acc)
    o_ptrs = (OUT + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
              + rows.to(tl.int64)[:, None] * stride_on + cols_d[None, :])
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + batch_head.to(tl.int64) * lse_stride + rows, lse, mask=row_ok)
    if STATS:
        store_stats(ROW_STATS, batch_head.to(tl.int64) * lse_stride + rows, stats_plane, row_ok, l_i, st_t, st_d, st_z,
                    st_c)
    if COUNT_TILES:
        program = batch_head * num_tiles + item
        tl.store(TILE_COUNTER + program, interior + edges)
        if COUNT_TILES == 2:
            tl.store(TILE_COUNTER + num_tiles * num_rows + program, edges)


@triton.jit
def _recompute_probs(q, k_tile, lse2, query_pos, key_index, seqlen_k, window_left, window_right, slope2, qk_scale,
                     cap2, MASK_BAND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                     IEEE_DOT: tl.constexpr):
    """p_ij = 2^(s_ij·log2 e − lse_i·log2 e) from the saved lse (lse2 from ``log2_lse``: +inf for a row
    with no key, so p = 0 there; 0 where (i, j) is not visible), and sc, the capped scores in log2
    units without ALiBi, for the softcap chain rule."""
    sc = capped_scores(q, k_tile, qk_scale, cap2, HAS_SOFTCAP, IEEE_DOT)
    s = sc
    if HAS_ALIBI:
        s = sc - slope2 * tl.abs(query_pos[:, None] - key_index[None, :]).to(tl.float32)
    s = tl.where(_visible(query_pos, key_index, seqlen_k, window_left, window_right, MASK_BAND), s, float("-inf"))
    return tl.exp2(s - lse2[:, None]), sc


@triton.jit
def tile_backward_kv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, Q_TILES, Q_COUNT, ALIBI, ITEMS, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_tiles_b, stride_tiles_h, stride_tiles_n, stride_count_b, stride_count_h, stride_alibi_b,
    heads_kv, group, seqlen_q, seqlen_k, head_dim, window_left, window_right, scale, softcap, num_tiles, num_rows,
    IS_LIST: tl.constexpr, MASK_BAND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
    SUB_M: tl.constexpr, PACKED: tl.constexpr = False, DROPOUT: tl.constexpr = False, dropout_seed=None,
    dropout_bias=None, dropout_scale=None, ENTROPY: tl.constexpr = False, ENTROPY_TERMS=None, entropy_plane=None,
):
    """dK, dV for one key tile of one KV head, over the query tiles of the transposed schedule
    and every query head of the GQA group (so no atomics: each program owns its dK/dV rows).
    Each scheduled query tile is taken ``SUB_M`` rows at a time (the backward's own, smaller query
    tile: fewer registers for p and dS, the same schedule).

        dV_j = Σ_i p_ij · dO_i          dK_j = Σ_i ds_ij · q_i

    ENTROPY (attention_stats' backward): ``ENTROPY_TERMS`` float32 ``[2, B, Hq, Nq]`` (g, shift; planes
    ``entropy_plane`` apart) add the entropy's term, ds = p ⊙ (dP − (δ − shift) − g·s)
    (``attention_steps.entropy_rows``); without it they are None and that code is not compiled.
    """
    kv_tile, batch_head = program_tile(num_tiles, num_rows)
    stride_qb, stride_qh, stride_qn = aligned(stride_qb, stride_qh, stride_qn, ALIGN)
    stride_kb, stride_kh, stride_kn = aligned(stride_kb, stride_kh, stride_kn, ALIGN)
    stride_vb, stride_vh, stride_vn = aligned(stride_vb, stride_vh, stride_vn, ALIGN)
    stride_dob, stride_doh, stride_don = aligned(stride_dob, stride_doh, stride_don, ALIGN)
    stride_dkb, stride_dkh, stride_dkn = aligned(stride_dkb, stride_dkh, stride_dkn, ALIGN)
    stride_dvb, stride_dvh, stride_dvn = aligned(stride_dvb, stride_dvh, stride_dvn, ALIGN)
    head_dim, _, _ = aligned(head_dim, head_dim, head_dim, ALIGN)
    batch = batch_head // heads_kv
    kv_head = batch_head % heads_kv
    item = kv_tile
    lse_stride = seqlen_q  # lse, δ: [B, Hq, packed length]
    total_k = seqlen_k  # the dropout index counts keys of the whole (packed) matrix
    row0 = 0
    key0 = 0
    if PACKED:
        # Item (s, n): key tile n of sequence s, keys from c0 = cu_k[s], query rows from r0 = cu_q[s];
        # Nk, Nq its lengths from here on; ALiBi slopes row s.
        kv_tile, seq, key0, seqlen_k, row0, seqlen_q = _packed_item(ITEMS, CU_K, CU_Q, item)
        K += key0.to(tl.int64) * stride_kn
        V += key0.to(tl.int64) * stride_vn
        DK += key0.to(tl.int64) * stride_dkn
        DV += key0.to(tl.int64) * stride_dvn
        Q += row0.to(tl.int64) * stride_qn
        DO += row0.to(tl.int64) * stride_don
        LSE += row0
        DELTA += row0
        ALIBI += seq * stride_alibi_b
        if ENTROPY:
            ENTROPY_TERMS += row0

    key_index = kv_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_d = tl.arange(0, BLOCK_D)
    tile_rows = tl.arange(0, SUB_M)
    d_ok = cols_d < head_dim
    kv_mask = (key_index < seqlen_k)[:, None] & d_ok[None, :]
    key_rows = key_index.to(tl.int64)[:, None]
    k_tile = _load_rows(K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh, key_index, stride_kn,
                        cols_d, seqlen_k, d_ok, True, UPCAST)
    v_tile = _load_rows(V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh, key_index, stride_vn,
                        cols_d, seqlen_k, d_ok, True, UPCAST)
    qk_scale, cap2 = score_scales(scale, softcap, HAS_SOFTCAP)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for g in range(0, group):
        head = kv_head * group + g
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(ALIBI + batch * stride_alibi_b + head) * LOG2E
        schedule_row = Q_TILES + batch * stride_tiles_b + head * stride_tiles_h + item * stride_tiles_n
        tile_count = tl.load(Q_COUNT + batch * stride_count_b + head * stride_count_h + item)
        first_tile = tl.load(schedule_row)
        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        do_base = DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
        row_base = (batch.to(tl.int64) * heads_kv * group + head) * lse_stride
        for step in range(0, tile_count * (BLOCK_M // SUB_M)):
            t = step // (BLOCK_M // SUB_M)
            rows = (_scheduled_tile(schedule_row, first_tile, t, IS_LIST) * BLOCK_M
                    + (step % (BLOCK_M // SUB_M)) * SUB_M + tile_rows)
            row_ok = rows < seqlen_q
            q = _load_rows(q_base, rows, stride_qn, cols_d, seqlen_q, d_ok, True, UPCAST)
            do = _load_rows(do_base, rows, stride_don, cols_d, seqlen_q, d_ok, True, UPCAST)
            lse2 = log2_lse(tl.load(LSE + row_base + rows, mask=row_ok, other=float("-inf")))
            delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
            if ENTROPY:
                g2, delta = entropy_rows(ENTROPY_TERMS, row_base + rows, entropy_plane, row_ok, delta)
            p, sc = _recompute_probs(q, k_tile, lse2, rows + (seqlen_k - seqlen_q), key_index, seqlen_k,
                                     window_left, window_right, slope2, qk_scale, cap2, MASK_BAND, HAS_SOFTCAP,
                                     HAS_ALIBI, IEEE_DOT)
            # dV += pᵀ·dO ;  dP = dO·Vᵀ ;  dS = p ⊙ (dP − δ)·(1 − tanh²)·scale ;  dK += dSᵀ·Q
            # DROPOUT (Z at e = ((b·Hq + h)·Nq + r0 + i)·Nk + c0 + j): dV += (p ⊙ Z)ᵀ·dO ;  dP = (dO·Vᵀ) ⊙ Z
            kept = p
            if DROPOUT:
                z = dropout_keep(dropout_seed, dropout_bias, dropout_scale,
                                 dropout_rows(batch * heads_kv * group + head, row0 + rows, lse_stride, total_k,
                                              key0)[:, None] + key_index[None, :])
                kept = p * z
            dv += dot(tl.trans(kept.to(do.dtype)), do, IEEE_DOT)
            dp = dot(do, tl.trans(v_tile), IEEE_DOT)
            if DROPOUT:
                dp = dp * z
            if ENTROPY:  # dP − g·s (s·log2 e with ALiBi, before the element mask: finite where p = 0)
                s2 = sc
                if HAS_ALIBI:
                    s2 = sc - slope2 * tl.abs((rows + (seqlen_k - seqlen_q))[:, None] - key_index[None, :]).to(
                        tl.float32)
                dp = dp - g2[:, None] * s2
            ds = score_grad(p, dp, delta, sc, scale, cap2, HAS_SOFTCAP)
            dk += dot(tl.trans(ds.to(q.dtype)), q, IEEE_DOT)

    dk_ptrs = (DK + batch.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh
               + key_rows * stride_dkn + cols_d[None, :])
    dv_ptrs = (DV + batch.to(tl.int64) * stride_dvb + kv_head.to(tl.int64) * stride_dvh
               + key_rows * stride_dvn + cols_d[None, :])
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def tile_backward_q_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_TILES, KV_COUNT, ALIBI, ITEMS, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_tiles_b, stride_tiles_h, stride_tiles_m, stride_count_b, stride_count_h, stride_alibi_b,
    heads_q, group, seqlen_q, seqlen_k, head_dim, window_left, window_right, scale, softcap, num_tiles, num_rows,
    IS_LIST: tl.constexpr, MASK_BAND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
    SUB_N: tl.constexpr, PACKED: tl.constexpr = False, DROPOUT: tl.constexpr = False, dropout_seed=None,
    dropout_bias=None, dropout_scale=None, ENTROPY: tl.constexpr = False, ENTROPY_TERMS=None, entropy_plane=None,
):
    """dQ for one query tile over the forward schedule (a separate pass: deterministic), each
    scheduled key tile taken ``SUB_N`` keys at a time (the backward's own, smaller key tile).

        dQ_i = Σ_j ds_ij · k_j

    ENTROPY: the entropy's term in ds, as in ``tile_backward_kv_kernel``.
    """
    q_tile, batch_head = program_tile(num_tiles, num_rows)
    stride_qb, stride_qh, stride_qn = aligned(stride_qb, stride_qh, stride_qn, ALIGN)
    stride_kb, stride_kh, stride_kn = aligned(stride_kb, stride_kh, stride_kn, ALIGN)
    stride_vb, stride_vh, stride_vn = aligned(stride_vb, stride_vh, stride_vn, ALIGN)
    stride_dob, stride_doh, stride_don = aligned(stride_dob, stride_doh, stride_don, ALIGN)
    stride_dqb, stride_dqh, stride_dqn = aligned(stride_dqb, stride_dqh, stride_dqn, ALIGN)
    head_dim, _, _ = aligned(head_dim, head_dim, head_dim, ALIGN)
    batch = batch_head // heads_q
    head = batch_head % heads_q
    kv_head = head // group
    item = q_tile
    lse_stride = seqlen_q  # lse, δ: [B, Hq, packed length]
    total_k = seqlen_k  # the dropout index counts keys of the whole (packed) matrix
    row0 = 0
    key0 = 0
    if PACKED:
        # Item (s, m) as in the forward: rows from cu_q[s], keys from cu_k[s], local Nq, Nk.
        q_tile, seq, row0, seqlen_q, key0, seqlen_k = _packed_item(ITEMS, CU_Q, CU_K, item)
        Q += row0.to(tl.int64) * stride_qn
        DO += row0.to(tl.int64) * stride_don
        DQ += row0.to(tl.int64) * stride_dqn
        K += key0.to(tl.int64) * stride_kn
        V += key0.to(tl.int64) * stride_vn
        LSE += row0
        DELTA += row0
        ALIBI += seq * stride_alibi_b
        if ENTROPY:
            ENTROPY_TERMS += row0

    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    tile_cols = tl.arange(0, SUB_N)
    row_ok = rows < seqlen_q
    d_ok = cols_d < head_dim
    qd_mask = row_ok[:, None] & d_ok[None, :]
    query_pos = rows + (seqlen_k - seqlen_q)
    row_offsets = rows.to(tl.int64)[:, None]
    q = _load_rows(Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh, rows, stride_qn, cols_d,
                   seqlen_q, d_ok, True, UPCAST)
    do = _load_rows(DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh, rows, stride_don,
                    cols_d, seqlen_q, d_ok, True, UPCAST)
    lse2 = log2_lse(tl.load(LSE + batch_head.to(tl.int64) * lse_stride + rows, mask=row_ok, other=float("-inf")))
    delta = tl.load(DELTA + batch_head.to(tl.int64) * lse_stride + rows, mask=row_ok, other=0.0)
    if ENTROPY:
        g2, delta = entropy_rows(ENTROPY_TERMS, batch_head.to(tl.int64) * lse_stride + rows, entropy_plane, row_ok,
                                 delta)
    qk_scale, cap2 = score_scales(scale, softcap, HAS_SOFTCAP)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + batch * stride_alibi_b + head) * LOG2E
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

    drop_rows = 0
    if DROPOUT:
        # e − j = ((b·Hq + h)·Nq + r0 + i)·Nk + c0   (packed: Nq, Nk the packed lengths)
        drop_rows = dropout_rows(batch_head, row0 + rows, lse_stride, total_k, key0)

    schedule_row = KV_TILES + batch * stride_tiles_b + head * stride_tiles_h + item * stride_tiles_m
    tile_count = tl.load(KV_COUNT + batch * stride_count_b + head * stride_count_h + item)
    first_tile = tl.load(schedule_row)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for step in range(0, tile_count * (BLOCK_N // SUB_N)):
        t = step // (BLOCK_N // SUB_N)
        key_index = (_scheduled_tile(schedule_row, first_tile, t, IS_LIST) * BLOCK_N
                     + (step % (BLOCK_N // SUB_N)) * SUB_N + tile_cols)
        k_tile = _load_rows(k_base, key_index, stride_kn, cols_d, seqlen_k, d_ok, True, UPCAST)
        v_tile = _load_rows(v_base, key_index, stride_vn, cols_d, seqlen_k, d_ok, True, UPCAST)
        p, sc = _recompute_probs(q, k_tile, lse2, query_pos, key_index, seqlen_k, window_left, window_right, slope2,
                                 qk_scale, cap2, MASK_BAND, HAS_SOFTCAP, HAS_ALIBI, IEEE_DOT)
        # dP = dO·Vᵀ (DROPOUT: ⊙ Z) ;  dS = p ⊙ (dP − δ)·(1 − tanh²)·scale ;  dQ += dS·K
        dp = dot(do, tl.trans(v_tile), IEEE_DOT)
        if DROPOUT:
            dp = dp * dropout_keep(dropout_seed, dropout_bias, dropout_scale, drop_rows[:, None] + key_index[None, :])
        if ENTROPY:  # dP − g·s (s·log2 e with ALiBi, before the element mask)
            s2 = sc
            if HAS_ALIBI:
                s2 = sc - slope2 * tl.abs(query_pos[:, None] - key_index[None, :]).to(tl.float32)
            dp = dp - g2[:, None] * s2
        ds = score_grad(p, dp, delta, sc, scale, cap2, HAS_SOFTCAP)
        dq += dot(ds.to(k_tile.dtype), k_tile, IEEE_DOT)

    tl.store(DQ + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh + row_offsets * stride_dqn
             + cols_d[None, :], dq.to(DQ.dtype.element_ty), mask=qd_mask)
