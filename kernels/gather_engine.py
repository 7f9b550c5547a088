"""The gather engine: exact attention where each query sees only a listed set of keys (top-k).

Forward and dQ run one program per (query tile, batch × KV head). A program's rows are the
``BLOCK_Q`` query positions of its tile times the ``GROUP_PAD`` query heads of one KV head
(row ``r`` is query ``t·BLOCK_Q + r // GROUP_PAD``, head ``kv_head·group + r % GROUP_PAD``), so
every gathered key is loaded once for all query heads that share it (GQA). The program walks
a *key list* in chunks of ``BLOCK_K``:

* row mode   (``BLOCK_Q = 1``): the list is the query's own index row ``indices[b, h, i, :]``;
* shared mode: one list ``indices[b, h, :]`` for every query (list stride 0 across tiles);
* union mode: the sorted union of the tile's index rows, plus a membership mask
  ``MEMBER[b, h, i, u]`` (1 where query i selected union key u), so a tile whose rows share most
  keys (marks, sinks, an overlapping window) gathers each key once.

A key is visible to a row when its slot is filled (index ≥ 0), the row is a real row, the
membership bit is set (union mode) and, if causal, ``j ≤ p(i) = i + Nk − Nq``.

dK/dV use no atomics. The host sorts every (query, key) selection by key (then query) into one
*entry* list; a program takes ``BLOCK_E`` consecutive entries (× the group's heads), gathers the
selecting queries' q/dO rows and the selected keys' k/v rows, and sums each run of equal keys
(a *piece*) with a one-hot matrix product; a second kernel adds a key's pieces in order. Every
sum has a fixed order, so the backward is bitwise deterministic (on a GPU too), and every program
does the same amount of work however unevenly keys are selected (sinks selected by all queries).

Notation as in ``tile_engine``: ``s_ij`` score, ``m_i`` running max, ``l_i`` running sum,
``lse_i = m_i + log l_i``; scores carried in base 2 in the hot loop (``exp2``, log2(e) folded into
the score constants once per program; lse natural at the interface). The stages shared
with the tile engine (scores, online softmax, softmax backward) are in ``attention_steps``.

Attention dropout (constexpr DROPOUT; ``flashlite.core.dropout``): j is the key position a slot
names, so (query i, key j) has the dense matrix's index e = ((b·Hq + h)·Nq + i)·Nk + j (a packed
batch's rows arrive in packed coordinates: its [1, Hq, Tq, Tk] view) and Z = M / (1 − p) as in the
tile engine: the forward uses P ⊙ Z for P·V only; dQ and the dK/dV pieces take dP ⊙ Z and P ⊙ Z.
Without DROPOUT the seed, bias and scale are None (constexpr) and that code is not compiled.

Head statistics (constexpr STATS on the forward, ENTROPY on dQ and the dK/dV pieces) as in the
tile engine: running sums beside the online softmax over the gathered keys (distance |p(i) − j|
and sinks j < sink_tokens at the key positions the slots name), and the entropy's term
dS = P ⊙ (dP − (δ − shift) − g·s) in the backward.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_steps import (LOG2E, aligned, capped_scores, dot, dropout_keep, dropout_rows, entropy_rows,
                              log2_lse, online_softmax_stats_step, online_softmax_step, program_tile, score_grad,
                              score_scales, scores, softcap_scores, softmax_finish, store_stats)


@triton.jit
def _program_rows(tile, kv_head, group, seqlen_q, seqlen_k, BLOCK_Q: tl.constexpr, GROUP_PAD: tl.constexpr):
    """The rows of a forward/dQ program: row r is query tile·BLOCK_Q + r // GROUP_PAD of head
    kv_head·group + r % GROUP_PAD; padding rows (past Nq or the group) are not ok. Returns
    (query, head, row_ok, query_pos) with query_pos = p(i) = i + Nk − Nq (bottom-right alignment)."""
    r = tl.arange(0, BLOCK_Q * GROUP_PAD)
    query = tile * BLOCK_Q + r // GROUP_PAD
    head = kv_head * group + r % GROUP_PAD
    row_ok = (query < seqlen_q) & (r % GROUP_PAD < group)
    query_pos = query + (seqlen_k - seqlen_q)
    return query, head, row_ok, query_pos


@triton.jit
def _kept_rows(KEEP, batch, head, query, row_ok, stride_keep_b, stride_keep_h, stride_keep_n,
               HEAD_MASK: tl.constexpr):
    """The rows that run: ``row_ok``, and with HEAD_MASK only where the head mask's
    ``KEEP[b, h, i]`` (uint8, flashlite.core.head_mask.row_keep) is set."""
    if HEAD_MASK:
        at = batch.to(tl.int64) * stride_keep_b + head.to(tl.int64) * stride_keep_h + query.to(tl.int64) * stride_keep_n
        row_ok = row_ok & (tl.load(KEEP + at, mask=row_ok, other=0) != 0)
    return row_ok


@triton.jit
def _gather_keys(list_base, stride_list_s, start, count, k_base, v_base, stride_kn, stride_vn, cols_d, d_ok,
                 member_rows, row_ok, query_pos, CAUSAL: tl.constexpr, HAS_MEMBER: tl.constexpr,
                 UPCAST: tl.constexpr, BLOCK_K: tl.constexpr):
    """One chunk of the key list: j = list[slot] for slots start .. start + BLOCK_K − 1, the rows
    k_j, v_j (an empty slot, j = −1, gives index 0 and zero rows), and which (row, key) pairs are
    visible: filled slot, real row, selected by this row (union mode), j ≤ p(i) (causal).
    Returns (key, k_tile, v_tile, visible)."""
    slots = start + tl.arange(0, BLOCK_K)
    slot_ok = slots < count
    key = tl.load(list_base + slots.to(tl.int64) * stride_list_s, mask=slot_ok, other=-1).to(tl.int32)
    key_ok = key >= 0
    key = tl.where(key_ok, key, 0)
    kv_mask = key_ok[:, None] & d_ok[None, :]
    k_tile = tl.load(k_base + key.to(tl.int64)[:, None] * stride_kn + cols_d[None, :], mask=kv_mask, other=0.0)
    v_tile = tl.load(v_base + key.to(tl.int64)[:, None] * stride_vn + cols_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k_tile = k_tile.to(tl.float32)
        v_tile = v_tile.to(tl.float32)
    visible = row_ok[:, None] & key_ok[None, :]
    if CAUSAL:
        visible = visible & (key[None, :] <= query_pos[:, None])
    if HAS_MEMBER:
        bit = tl.load(member_rows[:, None] + slots[None, :], mask=row_ok[:, None] & slot_ok[None, :], other=0)
        visible = visible & (bit != 0)
    return key, k_tile, v_tile, visible


@triton.jit
def gather_forward_kernel(
    Q, K, V, OUT, LSE, LIST, COUNT, MEMBER, ALIBI,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    stride_list_b, stride_list_h, stride_list_t, stride_list_s,
    stride_count_b, stride_count_h, stride_count_t,
    stride_member_b, stride_member_h, stride_member_row, stride_alibi_b,
    heads_q, heads_kv, group, seqlen_q, seqlen_k, head_dim, scale, softcap, num_tiles, num_rows,
    CAUSAL: tl.constexpr, HAS_MEMBER: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, IEEE_DOT: tl.constexpr,
    BLOCK_Q: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr, DROPOUT: tl.constexpr = False, dropout_seed=None, dropout_bias=None, dropout_scale=None,
    STATS: tl.constexpr = False, ROW_STATS=None, stats_plane=None, sink_tokens=None,
    HEAD_MASK: tl.constexpr = False, KEEP=None, stride_keep_b=0, stride_keep_h=0, stride_keep_n=0,
):
    """out, lse (STATS: and the head statistics into ``ROW_STATS`` ``[5, B, Hq, Nq]``) of one program's rows.
    HEAD_MASK: only the rows with ``KEEP[b, h, i] != 0`` run (``_kept_rows``)."""
    tile, batch_kv = program_tile(num_tiles, num_rows)
    stride_qb, stride_qh, stride_qn = aligned(stride_qb, stride_qh, stride_qn, ALIGN)
    stride_kb, stride_kh, stride_kn = aligned(stride_kb, stride_kh, stride_kn, ALIGN)
    stride_vb, stride_vh, stride_vn = aligned(stride_vb, stride_vh, stride_vn, ALIGN)
    stride_ob, stride_oh, stride_on = aligned(stride_ob, stride_oh, stride_on, ALIGN)
    head_dim, _, _ = aligned(head_dim, head_dim, head_dim, ALIGN)
    batch = batch_kv // heads_kv
    kv_head = batch_kv % heads_kv

    # Rows: (query position, head of the group); padding rows are masked everywhere, masked heads'
    # rows (run_ok false) everywhere but in the stores of their zeros.
    query, head, row_ok, query_pos = _program_rows(tile, kv_head, group, seqlen_q, seqlen_k, BLOCK_Q, GROUP_PAD)
    run_ok = _kept_rows(KEEP, batch, head, query, row_ok, stride_keep_b, stride_keep_h, stride_keep_n, HEAD_MASK)
    cols_d = tl.arange(0, BLOCK_D)
    d_ok = cols_d < head_dim
    qd_mask = row_ok[:, None] & d_ok[None, :]
    row_q = batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + query.to(tl.int64) * stride_qn
    q = tl.load(Q + row_q[:, None] + cols_d[None, :], mask=run_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qk_scale, cap2 = score_scales(scale, softcap, HAS_SOFTCAP)
    slope2 = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + batch * stride_alibi_b + head, mask=row_ok, other=0.0) * LOG2E

    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    list_base = (LIST + batch.to(tl.int64) * stride_list_b + kv_head.to(tl.int64) * stride_list_h
                 + tile.to(tl.int64) * stride_list_t)
    count = tl.load(COUNT + batch * stride_count_b + kv_head * stride_count_h + tile * stride_count_t)
    if HEAD_MASK:  # no row runs: no key is gathered
        count = tl.where(tl.max(run_ok.to(tl.int32), 0) > 0, count, 0)
    member_rows = (MEMBER + batch.to(tl.int64) * stride_member_b + kv_head.to(tl.int64) * stride_member_h
                   + query.to(tl.int64) * stride_member_row)

    drop_rows = 0
    if DROPOUT:
        drop_rows = dropout_rows(batch * heads_q + head, query, seqlen_q, seqlen_k, 0)  # e − j
    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, BLOCK_D], dtype=tl.float32)
    if STATS:  # running sums of the head statistics (attention_steps.online_softmax_stats_step)
        st_t = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
        st_d = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
        st_z = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
        st_c = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    for start in range(0, count, BLOCK_K):
        # Gather: j = list[slot] for the chunk's slots, k_j, v_j rows, and which (i, j) are visible.
        key, k_tile, v_tile, visible = _gather_keys(list_base, stride_list_s, start, count, k_base, v_base, stride_kn,
                                                    stride_vn, cols_d, d_ok, member_rows, run_ok, query_pos, CAUSAL,
                                                    HAS_MEMBER, UPCAST, BLOCK_K)
        # s_ij = (softcap·tanh(q_i·k_j·scale / softcap) − slope·|p(i) − j|)·log2(e)   (−inf: not visible)
        s = scores(q, k_tile, query_pos, key, slope2[:, None], qk_scale, cap2, HAS_SOFTCAP, HAS_ALIBI, IEEE_DOT)
        s = tl.where(visible, s, float("-inf"))
        # Online softmax (base 2): m, l, acc over this chunk's keys (DROPOUT: acc takes (p ⊙ Z)·V,
        # Z at e = ((b·Hq + h)·Nq + i)·Nk + j).
        z = 0.0
        if DROPOUT:
            z = dropout_keep(dropout_seed, dropout_bias, dropout_scale, drop_rows[:, None] + key[None, :])
        if STATS:
            distance = tl.abs(query_pos[:, None] - key[None, :]).to(tl.float32)
            m_i, l_i, acc, st_t, st_d, st_z, st_c = online_softmax_stats_step(
                m_i, l_i, acc, st_t, st_d, st_z, st_c, s, v_tile, distance, (key < sink_tokens)[None, :],
                tl.sum(visible.to(tl.float32), 1), IEEE_DOT, DROPOUT, z)
        else:
            m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v_tile, IEEE_DOT, DROPOUT, z)

    # out = acc / l, lse = (m + log2 l)·ln 2; a row that saw no key gets 0 and −inf.
    out, lse = softmax_finish(m_i, l_i, acc)
    row_o = batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + query.to(tl.int64) * stride_on
    tl.store(OUT + row_o[:, None] + cols_d[None, :], out.to(OUT.dtype.element_ty), mask=qd_mask)
    tl.store(LSE + (batch.to(tl.int64) * heads_q + head) * seqlen_q + query, lse, mask=row_ok)
    if STATS:
        store_stats(ROW_STATS, (batch.to(tl.int64) * heads_q + head) * seqlen_q + query, stats_plane, row_ok, l_i,
                    st_t, st_d, st_z, st_c)


@triton.jit
def gather_backward_q_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, LIST, COUNT, MEMBER, ALIBI,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_list_b, stride_list_h, stride_list_t, stride_list_s,
    stride_count_b, stride_count_h, stride_count_t,
    stride_member_b, stride_member_h, stride_member_row, stride_alibi_b,
    heads_q, heads_kv, group, seqlen_q, seqlen_k, head_dim, scale, softcap, num_tiles, num_rows,
    CAUSAL: tl.constexpr, HAS_MEMBER: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, IEEE_DOT: tl.constexpr,
    BLOCK_Q: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ALIGN: tl.constexpr, DROPOUT: tl.constexpr = False, dropout_seed=None, dropout_bias=None, dropout_scale=None,
    ENTROPY: tl.constexpr = False, ENTROPY_TERMS=None, entropy_plane=None,
    HEAD_MASK: tl.constexpr = False, KEEP=None, stride_keep_b=0, stride_keep_h=0, stride_keep_n=0,
):
    """dQ_i = Σ_j ds_ij · k_j over the forward's key lists (each row has one owner: no atomics).
    ENTROPY: ds = p ⊙ (dP − (δ − shift) − g·s) with (g, shift) from ``ENTROPY_TERMS`` ``[2, B, Hq, Nq]``.
    HEAD_MASK: a masked row reads nothing and stores dQ = 0."""
    tile, batch_kv = program_tile(num_tiles, num_rows)
    stride_qb, stride_qh, stride_qn = aligned(stride_qb, stride_qh, stride_qn, ALIGN)
    stride_kb, stride_kh, stride_kn = aligned(stride_kb, stride_kh, stride_kn, ALIGN)
    stride_vb, stride_vh, stride_vn = aligned(stride_vb, stride_vh, stride_vn, ALIGN)
    stride_dob, stride_doh, stride_don = aligned(stride_dob, stride_doh, stride_don, ALIGN)
    stride_dqb, stride_dqh, stride_dqn = aligned(stride_dqb, stride_dqh, stride_dqn, ALIGN)
    head_dim, _, _ = aligned(head_dim, head_dim, head_dim, ALIGN)
    batch = batch_kv // heads_kv
    kv_head = batch_kv % heads_kv

    query, head, row_ok, query_pos = _program_rows(tile, kv_head, group, seqlen_q, seqlen_k, BLOCK_Q, GROUP_PAD)
    run_ok = _kept_rows(KEEP, batch, head, query, row_ok, stride_keep_b, stride_keep_h, stride_keep_n, HEAD_MASK)
    cols_d = tl.arange(0, BLOCK_D)
    d_ok = cols_d < head_dim
    qd_mask = row_ok[:, None] & d_ok[None, :]
    run_mask = run_ok[:, None] & d_ok[None, :]
    row_q = batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + query.to(tl.int64) * stride_qn
    row_do = batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh + query.to(tl.int64) * stride_don
    q = tl.load(Q + row_q[:, None] + cols_d[None, :], mask=run_mask, other=0.0)
    do = tl.load(DO + row_do[:, None] + cols_d[None, :], mask=run_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    stat_rows = (batch.to(tl.int64) * heads_q + head) * seqlen_q + query
    # lse·log2(e); a row with no key gets +inf: p = 2^(s − inf) = 0
    lse2 = log2_lse(tl.load(LSE + stat_rows, mask=run_ok, other=float("-inf")))
    delta = tl.load(DELTA + stat_rows, mask=run_ok, other=0.0)
    if ENTROPY:
        g2, delta = entropy_rows(ENTROPY_TERMS, stat_rows, entropy_plane, run_ok, delta)
    qk_scale, cap2 = score_scales(scale, softcap, HAS_SOFTCAP)
    slope2 = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + batch * stride_alibi_b + head, mask=row_ok, other=0.0) * LOG2E

    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    list_base = (LIST + batch.to(tl.int64) * stride_list_b + kv_head.to(tl.int64) * stride_list_h
                 + tile.to(tl.int64) * stride_list_t)
    count = tl.load(COUNT + batch * stride_count_b + kv_head * stride_count_h + tile * stride_count_t)
    if HEAD_MASK:  # no row runs: no key is gathered
        count = tl.where(tl.max(run_ok.to(tl.int32), 0) > 0, count, 0)
    member_rows = (MEMBER + batch.to(tl.int64) * stride_member_b + kv_head.to(tl.int64) * stride_member_h
                   + query.to(tl.int64) * stride_member_row)

    drop_rows = 0
    if DROPOUT:
        drop_rows = dropout_rows(batch * heads_q + head, query, seqlen_q, seqlen_k, 0)  # e − j
    dq = tl.zeros([BLOCK_Q * GROUP_PAD, BLOCK_D], dtype=tl.float32)
    for start in range(0, count, BLOCK_K):
        key, k_tile, v_tile, visible = _gather_keys(list_base, stride_list_s, start, count, k_base, v_base, stride_kn,
                                                    stride_vn, cols_d, d_ok, member_rows, run_ok, query_pos, CAUSAL,
                                                    HAS_MEMBER, UPCAST, BLOCK_K)
        # s_ij·log2(e) as in the forward (sc: after softcap, before ALiBi);  p_ij = 2^(s_ij·log2 e − lse_i·log2 e)
        sc = capped_scores(q, k_tile, qk_scale, cap2, HAS_SOFTCAP, IEEE_DOT)
        s = sc
        if HAS_ALIBI:
            s = sc - slope2[:, None] * tl.abs(query_pos[:, None] - key[None, :]).to(tl.float32)
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
        # dP = dO·Vᵀ (DROPOUT: ⊙ Z) ;  dS = p ⊙ (dP − δ) · (1 − tanh²) · scale ;  dQ += dS·K
        dp = dot(do, tl.trans(v_tile), IEEE_DOT)
        if DROPOUT:
            dp = dp * dropout_keep(dropout_seed, dropout_bias, dropout_scale, drop_rows[:, None] + key[None, :])
        if ENTROPY:
            dp = dp - g2[:, None] * s  # s before the visibility mask: finite where p = 0
        ds = score_grad(p, dp, delta, sc, scale, cap2, HAS_SOFTCAP)
        dq += dot(ds.to(k_tile.dtype), k_tile, IEEE_DOT)

    row_dq = batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh + query.to(tl.int64) * stride_dqn
    tl.store(DQ + row_dq[:, None] + cols_d[None, :], dq.to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def gather_backward_kv_kernel(
    Q, K, V, DO, LSE, DELTA, DK_PART, DV_PART, ENTRY_QUERY, ENTRY_KEY, ENTRY_PIECE, CHUNK_PIECE, ALIBI,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don, stride_alibi_b,
    heads_q, heads_kv, index_heads, group, num_entries, num_pieces, seqlen_q, seqlen_k, head_dim, scale, softcap,
    num_chunks, replicas,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, PIECE_PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_DC: tl.constexpr, ALIGN: tl.constexpr,
    DROPOUT: tl.constexpr = False, dropout_seed=None, dropout_bias=None, dropout_scale=None,
    ENTROPY: tl.constexpr = False, ENTROPY_TERMS=None, entropy_plane=None,
    HEAD_MASK: tl.constexpr = False, KEEP=None, stride_keep_b=0, stride_keep_h=0, stride_keep_n=0,
):
    """Partial dK/dV of the pieces of one chunk of ``BLOCK_E`` entries, for one KV-head replica
    (ENTROPY: ds takes the entropy's term, dp − g·s and δ − shift):

        dV_j += Σ_(i,g) p_gij · dO_gi        dK_j += Σ_(i,g) ds_gij · q_gi
        (DROPOUT: p_gij · Z_gij in dV and dp ⊙ Z in ds)

    over the chunk's entries (query i selected key j) and the group's heads g. Entry keys are
    flattened ``(batch · index_heads + index_head) · Nk + j``; ``ENTRY_PIECE`` is the entry's
    piece relative to the chunk's first piece ``CHUNK_PIECE[chunk]``. Head dims are taken
    ``BLOCK_DC`` columns at a time (the rows of q, dO, k, v never sit in registers whole)."""
    chunk, replica = program_tile(num_chunks, replicas)  # replica: KV heads sharing one index head
    stride_qb, stride_qh, stride_qn = aligned(stride_qb, stride_qh, stride_qn, ALIGN)
    stride_kb, stride_kh, stride_kn = aligned(stride_kb, stride_kh, stride_kn, ALIGN)
    stride_vb, stride_vh, stride_vn = aligned(stride_vb, stride_vh, stride_vn, ALIGN)
    stride_dob, stride_doh, stride_don = aligned(stride_dob, stride_doh, stride_don, ALIGN)
    head_dim, _, _ = aligned(head_dim, head_dim, head_dim, ALIGN)

    # Rows: (entry e, head g of the group), entry-major.
    r = tl.arange(0, BLOCK_E * GROUP_PAD)
    entry = chunk.to(tl.int64) * BLOCK_E + r // GROUP_PAD
    row_ok = (entry < num_entries) & (r % GROUP_PAD < group)
    flat_key = tl.load(ENTRY_KEY + entry, mask=row_ok, other=0)
    query = tl.load(ENTRY_QUERY + entry, mask=row_ok, other=0)
    piece = tl.load(ENTRY_PIECE + entry, mask=row_ok, other=-1)
    key = (flat_key % seqlen_k).to(tl.int32)
    batch = flat_key // seqlen_k // index_heads
    kv_head = (flat_key // seqlen_k % index_heads) * (heads_kv // index_heads) + replica
    head = kv_head * group + r % GROUP_PAD
    # HEAD_MASK: a masked head's (entry, g) row reads nothing and adds nothing (p = ds = 0)
    row_ok = _kept_rows(KEEP, batch, head, query, row_ok, stride_keep_b, stride_keep_h, stride_keep_n, HEAD_MASK)

    # Gather q_gi, dO_gi (selecting queries) and k_j, v_j (selected keys), BLOCK_DC columns at a
    # time in fp32: first the row dot products q·k and dO·v, then the per-piece sums.
    row_q = batch * stride_qb + head.to(tl.int64) * stride_qh + query.to(tl.int64) * stride_qn
    row_do = batch * stride_dob + head.to(tl.int64) * stride_doh + query.to(tl.int64) * stride_don
    row_k = batch * stride_kb + kv_head * stride_kh + key.to(tl.int64) * stride_kn
    row_v = batch * stride_vb + kv_head * stride_vh + key.to(tl.int64) * stride_vn
    qk = tl.zeros([BLOCK_E * GROUP_PAD], dtype=tl.float32)
    dp = tl.zeros([BLOCK_E * GROUP_PAD], dtype=tl.float32)
    for c in range(0, head_dim, BLOCK_DC):
        cols = c + tl.arange(0, BLOCK_DC)
        mask = row_ok[:, None] & (cols < head_dim)[None, :]
        q = tl.load(Q + row_q[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        k_rows = tl.load(K + row_k[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        qk += tl.sum(q * k_rows, 1)
        do = tl.load(DO + row_do[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        v_rows = tl.load(V + row_v[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dp += tl.sum(do * v_rows, 1)
    stat_rows = (batch * heads_q + head) * seqlen_q + query
    lse = tl.load(LSE + stat_rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + stat_rows, mask=row_ok, other=0.0)

    # s·log2 e = (softcap·tanh(q·k·scale / softcap) − slope·|p(i) − j|)·log2 e ;  p = 2^(s·log2 e − lse·log2 e)
    qk_scale, cap2 = score_scales(scale, softcap, HAS_SOFTCAP)
    sc = softcap_scores(qk * qk_scale, cap2, HAS_SOFTCAP)  # cap2·tanh, as in capped_scores
    s = sc
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + batch * stride_alibi_b + head, mask=row_ok, other=0.0) * LOG2E
        s = sc - slope2 * tl.abs(query + (seqlen_k - seqlen_q) - key).to(tl.float32)
    p = tl.where(row_ok, tl.exp2(s - lse * LOG2E), 0.0)
    # dp = dO·v ;  ds = p (dp − δ) (1 − tanh²) · scale   (tanh = sc / cap2)
    # DROPOUT: Z at e = ((b·Hq + h)·Nq + i)·Nk + j;  dp ⊙ Z here, p ⊙ Z for dV
    if DROPOUT:
        z = dropout_keep(dropout_seed, dropout_bias, dropout_scale,
                         dropout_rows(batch * heads_q + head, query, seqlen_q, seqlen_k, 0) + key)
        dp = dp * z
    if ENTROPY:
        g2, delta = entropy_rows(ENTROPY_TERMS, stat_rows, entropy_plane, row_ok, delta)
        dp = dp - g2 * s
    ds = p * (dp - delta)
    if HAS_SOFTCAP:
        tanh = sc * (1.0 / cap2)
        ds = ds * (1.0 - tanh * tanh)
    ds = ds * scale
    if DROPOUT:
        p = p * z

    # Sum the rows of each piece: one-hot [pieces, rows] @ per-row terms [rows, BLOCK_DC].
    slots = tl.arange(0, BLOCK_E)
    one_hot = tl.where((piece[None, :] == slots[:, None]) & row_ok[None, :], 1.0, 0.0)
    first = tl.load(CHUNK_PIECE + chunk)
    last = tl.load(CHUNK_PIECE + chunk + 1)
    part_rows = (replica.to(tl.int64) * num_pieces + first + slots)[:, None] * head_dim
    for c in range(0, head_dim, BLOCK_DC):
        cols = c + tl.arange(0, BLOCK_DC)
        mask = row_ok[:, None] & (cols < head_dim)[None, :]
        q = tl.load(Q + row_q[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        do = tl.load(DO + row_do[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dk = tl.dot(one_hot, ds[:, None] * q, input_precision=PIECE_PRECISION)
        dv = tl.dot(one_hot, p[:, None] * do, input_precision=PIECE_PRECISION)
        part_mask = (first + slots < last)[:, None] & (cols < head_dim)[None, :]
        tl.store(DK_PART + part_rows + cols[None, :], dk, mask=part_mask)
        tl.store(DV_PART + part_rows + cols[None, :], dv, mask=part_mask)


@triton.jit
def gather_reduce_kv_kernel(
    DK, DV, DK_PART, DV_PART, KEY_ID, KEY_PIECE_START, KEY_PIECE_COUNT,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    heads_kv, index_heads, num_keys, num_pieces, seqlen_k, head_dim, num_blocks, replicas,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
):
    """dK_j = Σ_pieces partial_j (in piece order: deterministic) for ``BLOCK_R`` selected keys."""
    block, replica = program_tile(num_blocks, replicas)
    stride_dkb, stride_dkh, stride_dkn = aligned(stride_dkb, stride_dkh, stride_dkn, ALIGN)
    stride_dvb, stride_dvh, stride_dvn = aligned(stride_dvb, stride_dvh, stride_dvn, ALIGN)
    head_dim, _, _ = aligned(head_dim, head_dim, head_dim, ALIGN)
    slot = block.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    slot_ok = slot < num_keys
    key_id = tl.load(KEY_ID + slot, mask=slot_ok, other=0)  # (batch · index_heads + index_head) · Nk + j
    first = tl.load(KEY_PIECE_START + slot, mask=slot_ok, other=0)
    count = tl.load(KEY_PIECE_COUNT + slot, mask=slot_ok, other=0)
    key = key_id % seqlen_k
    batch = key_id // seqlen_k // index_heads
    kv_head = (key_id // seqlen_k % index_heads) * (heads_kv // index_heads) + replica
    cols_d = tl.arange(0, BLOCK_D)
    d_ok = cols_d < head_dim
    dk = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for n in range(0, tl.max(count, 0)):
        use = (n < count)[:, None] & d_ok[None, :]
        part = (replica.to(tl.int64) * num_pieces + first + n)[:, None] * head_dim + cols_d[None, :]
        dk += tl.load(DK_PART + part, mask=use, other=0.0)
        dv += tl.load(DV_PART + part, mask=use, other=0.0)
    out_mask = slot_ok[:, None] & d_ok[None, :]
    row_dk = batch * stride_dkb + kv_head * stride_dkh + key * stride_dkn
    row_dv = batch * stride_dvb + kv_head * stride_dvh + key * stride_dvn
    tl.store(DK + row_dk[:, None] + cols_d[None, :], dk.to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + row_dv[:, None] + cols_d[None, :], dv.to(DV.dtype.element_ty), mask=out_mask)
