"""The tile engine: exact attention over a block schedule, forward and backward, in Triton.

One kernel family serves full, causal, sliding-window and block-sparse attention. A pattern
is a *schedule* (``flashlite.schedule.TileSchedule``): per query tile, the key tiles to visit
(forward); per key tile, the query tiles (backward). Inside a visited tile an element mask
applies the band ``p(i) − left ≤ j ≤ p(i) + right`` and the sequence end.

Notation (per query row i, key column j): ``s_ij`` the score after scale/softcap/ALiBi,
``m_i`` the running max, ``l_i`` the running sum of ``exp(s_ij − m_i)``, ``lse_i = m_i + log l_i``.
Scores are carried in base 2 (``s·log2(e)``) so the hot loop uses ``exp2``. The stages shared
with the gather engine (scores, online softmax, softmax backward) are in ``attention_steps``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_steps import LOG2E, dot, online_softmax_step, score_grad, scores, softmax_finish


@triton.jit
def _load_rows(base, rows, stride_row, cols_d, row_limit, d_ok, UPCAST: tl.constexpr):
    """Rows ``rows`` of a [N, D] slice (zeros past ``row_limit`` and ``head_dim``); fp32 if UPCAST."""
    mask = (rows < row_limit)[:, None] & d_ok[None, :]
    block = tl.load(base + rows.to(tl.int64)[:, None] * stride_row + cols_d[None, :], mask=mask, other=0.0)
    if UPCAST:
        block = block.to(tl.float32)
    return block


@triton.jit
def _scheduled_tile(schedule_row, first_tile, t, IS_LIST: tl.constexpr):
    """The t-th tile of a schedule row: the t-th list entry, or the range's first tile + t."""
    tile = first_tile + t
    if IS_LIST:
        tile = tl.load(schedule_row + t)
    return tile


@triton.jit
def _visible(query_pos, key_index, seqlen_k, window_left, window_right, MASK_BAND: tl.constexpr):
    """Element mask of a tile: inside the sequence and, for band patterns, inside the band."""
    visible = key_index[None, :] < seqlen_k
    if MASK_BAND:
        visible = visible & (key_index[None, :] >= query_pos[:, None] - window_left)
        visible = visible & (key_index[None, :] <= query_pos[:, None] + window_right)
    return visible


@triton.jit
def tile_forward_kernel(
    Q, K, V, OUT, LSE, KV_TILES, KV_COUNT, ALIBI, TILE_COUNTER,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    stride_tiles_b, stride_tiles_h, stride_tiles_m, stride_count_b, stride_count_h, stride_alibi_b,
    heads_q, group, seqlen_q, seqlen_k, head_dim, window_left, window_right, scale, softcap,
    IS_LIST: tl.constexpr, MASK_BAND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    COUNT_TILES: tl.constexpr, UPCAST: tl.constexpr, IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    q_tile = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // heads_q
    head = batch_head % heads_q
    kv_head = head // group

    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    tile_cols = tl.arange(0, BLOCK_N)
    row_ok = rows < seqlen_q
    d_ok = cols_d < head_dim
    query_pos = rows + (seqlen_k - seqlen_q)  # p(i), bottom-right alignment

    q = _load_rows(Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh, rows, stride_qn, cols_d,
                   seqlen_q, d_ok, UPCAST)
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + batch * stride_alibi_b + head)

    schedule_row = KV_TILES + batch * stride_tiles_b + head * stride_tiles_h + q_tile * stride_tiles_m
    tile_count = tl.load(KV_COUNT + batch * stride_count_b + head * stride_count_h + q_tile)
    first_tile = tl.load(schedule_row)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    visited = 0
    for t in range(0, tile_count):
        key_index = _scheduled_tile(schedule_row, first_tile, t, IS_LIST) * BLOCK_N + tile_cols
        k_tile = _load_rows(k_base, key_index, stride_kn, cols_d, seqlen_k, d_ok, UPCAST)
        v_tile = _load_rows(v_base, key_index, stride_vn, cols_d, seqlen_k, d_ok, UPCAST)
        s = scores(q, k_tile, query_pos, key_index, slope, scale, softcap, HAS_SOFTCAP, HAS_ALIBI, IEEE_DOT)
        visible = _visible(query_pos, key_index, seqlen_k, window_left, window_right, MASK_BAND)
        s = tl.where(visible, s * LOG2E, float("-inf"))
        # Online softmax update (base 2): m, l, acc over this tile's keys.
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v_tile, IEEE_DOT)
        visited += 1

    # Finish: out = acc / l, lse = (m + log2 l)·ln 2; rows that saw no key give 0 and −inf.
    out, lse = softmax_finish(m_i, l_i, acc)
    o_ptrs = (OUT + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
              + rows.to(tl.int64)[:, None] * stride_on + cols_d[None, :])
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + batch_head.to(tl.int64) * seqlen_q + rows, lse, mask=row_ok)
    if COUNT_TILES:
        tl.store(TILE_COUNTER + batch_head * tl.num_programs(0) + q_tile, visited)


@triton.jit
def _recompute_probs(q, k_tile, lse, query_pos, key_index, slope, scale, softcap, seqlen_k,
                     window_left, window_right, MASK_BAND: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     HAS_ALIBI: tl.constexpr, IEEE_DOT: tl.constexpr):
    """p_ij = exp(s_ij − lse_i) from the saved lse; also tanh(raw/cap) for the softcap chain rule.
    Rows with lse = −inf (no key) get p = 0."""
    s = scores(q, k_tile, query_pos, key_index, slope, scale, softcap, HAS_SOFTCAP, HAS_ALIBI, IEEE_DOT)
    visible = _visible(query_pos, key_index, seqlen_k, window_left, window_right, MASK_BAND)
    lse_use = tl.where(lse == float("-inf"), float("inf"), lse)
    p = tl.exp2((tl.where(visible, s, float("-inf")) - lse_use[:, None]) * LOG2E)
    return p, s


@triton.jit
def tile_backward_kv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, Q_TILES, Q_COUNT, ALIBI,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_tiles_b, stride_tiles_h, stride_tiles_n, stride_count_b, stride_count_h, stride_alibi_b,
    heads_kv, group, seqlen_q, seqlen_k, head_dim, window_left, window_right, scale, softcap,
    IS_LIST: tl.constexpr, MASK_BAND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV for one key tile of one KV head, over the query tiles of the transposed schedule
    and every query head of the GQA group (so no atomics: each program owns its dK/dV rows).

        dV_j = Σ_i p_ij · dO_i          dK_j = Σ_i ds_ij · q_i
    """
    kv_tile = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // heads_kv
    kv_head = batch_head % heads_kv

    key_index = kv_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_d = tl.arange(0, BLOCK_D)
    tile_rows = tl.arange(0, BLOCK_M)
    d_ok = cols_d < head_dim
    kv_mask = (key_index < seqlen_k)[:, None] & d_ok[None, :]
    key_rows = key_index.to(tl.int64)[:, None]
    k_tile = _load_rows(K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh, key_index, stride_kn,
                        cols_d, seqlen_k, d_ok, UPCAST)
    v_tile = _load_rows(V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh, key_index, stride_vn,
                        cols_d, seqlen_k, d_ok, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for g in range(0, group):
        head = kv_head * group + g
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(ALIBI + batch * stride_alibi_b + head)
        schedule_row = Q_TILES + batch * stride_tiles_b + head * stride_tiles_h + kv_tile * stride_tiles_n
        tile_count = tl.load(Q_COUNT + batch * stride_count_b + head * stride_count_h + kv_tile)
        first_tile = tl.load(schedule_row)
        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        do_base = DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
        row_base = (batch.to(tl.int64) * heads_kv * group + head) * seqlen_q
        for t in range(0, tile_count):
            rows = _scheduled_tile(schedule_row, first_tile, t, IS_LIST) * BLOCK_M + tile_rows
            row_ok = rows < seqlen_q
            q = _load_rows(q_base, rows, stride_qn, cols_d, seqlen_q, d_ok, UPCAST)
            do = _load_rows(do_base, rows, stride_don, cols_d, seqlen_q, d_ok, UPCAST)
            lse = tl.load(LSE + row_base + rows, mask=row_ok, other=float("-inf"))
            delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
            query_pos = rows + (seqlen_k - seqlen_q)
            p, s = _recompute_probs(q, k_tile, lse, query_pos, key_index, slope, scale, softcap, seqlen_k,
                                    window_left, window_right, MASK_BAND, HAS_SOFTCAP, HAS_ALIBI, IEEE_DOT)
            # dV += pᵀ·dO ;  dP = dO·Vᵀ ;  dS = p ⊙ (dP − δ) ;  dK += dSᵀ·Q
            dv += dot(tl.trans(p.to(do.dtype)), do, IEEE_DOT)
            dp = dot(do, tl.trans(v_tile), IEEE_DOT)
            if HAS_ALIBI:
                s = s + slope * tl.abs(query_pos[:, None] - key_index[None, :]).to(tl.float32)
            ds = score_grad(p, dp, delta, s, scale, softcap, HAS_SOFTCAP)
            dk += dot(tl.trans(ds.to(q.dtype)), q, IEEE_DOT)

    dk_ptrs = (DK + batch.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh
               + key_rows * stride_dkn + cols_d[None, :])
    dv_ptrs = (DV + batch.to(tl.int64) * stride_dvb + kv_head.to(tl.int64) * stride_dvh
               + key_rows * stride_dvn + cols_d[None, :])
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def tile_backward_q_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_TILES, KV_COUNT, ALIBI,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_tiles_b, stride_tiles_h, stride_tiles_m, stride_count_b, stride_count_h, stride_alibi_b,
    heads_q, group, seqlen_q, seqlen_k, head_dim, window_left, window_right, scale, softcap,
    IS_LIST: tl.constexpr, MASK_BAND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ for one query tile over the forward schedule (a separate pass: deterministic).

        dQ_i = Σ_j ds_ij · k_j
    """
    q_tile = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // heads_q
    head = batch_head % heads_q
    kv_head = head // group

    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    tile_cols = tl.arange(0, BLOCK_N)
    row_ok = rows < seqlen_q
    d_ok = cols_d < head_dim
    qd_mask = row_ok[:, None] & d_ok[None, :]
    query_pos = rows + (seqlen_k - seqlen_q)
    row_offsets = rows.to(tl.int64)[:, None]
    q = _load_rows(Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh, rows, stride_qn, cols_d,
                   seqlen_q, d_ok, UPCAST)
    do = _load_rows(DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh, rows, stride_don,
                    cols_d, seqlen_q, d_ok, UPCAST)
    lse = tl.load(LSE + batch_head.to(tl.int64) * seqlen_q + rows, mask=row_ok, other=float("-inf"))
    delta = tl.load(DELTA + batch_head.to(tl.int64) * seqlen_q + rows, mask=row_ok, other=0.0)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + batch * stride_alibi_b + head)
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

    schedule_row = KV_TILES + batch * stride_tiles_b + head * stride_tiles_h + q_tile * stride_tiles_m
    tile_count = tl.load(KV_COUNT + batch * stride_count_b + head * stride_count_h + q_tile)
    first_tile = tl.load(schedule_row)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for t in range(0, tile_count):
        key_index = _scheduled_tile(schedule_row, first_tile, t, IS_LIST) * BLOCK_N + tile_cols
        k_tile = _load_rows(k_base, key_index, stride_kn, cols_d, seqlen_k, d_ok, UPCAST)
        v_tile = _load_rows(v_base, key_index, stride_vn, cols_d, seqlen_k, d_ok, UPCAST)
        p, s = _recompute_probs(q, k_tile, lse, query_pos, key_index, slope, scale, softcap, seqlen_k,
                                window_left, window_right, MASK_BAND, HAS_SOFTCAP, HAS_ALIBI, IEEE_DOT)
        # dP = dO·Vᵀ ;  dS = p ⊙ (dP − δ) ;  dQ += dS·K
        dp = dot(do, tl.trans(v_tile), IEEE_DOT)
        if HAS_ALIBI:
            s = s + slope * tl.abs(query_pos[:, None] - key_index[None, :]).to(tl.float32)
        ds = score_grad(p, dp, delta, s, scale, softcap, HAS_SOFTCAP)
        dq += dot(ds.to(k_tile.dtype), k_tile, IEEE_DOT)

    tl.store(DQ + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh + row_offsets * stride_dqn
             + cols_d[None, :], dq.to(DQ.dtype.element_ty), mask=qd_mask)
