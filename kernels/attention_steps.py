"""Triton stages shared by the tile engine (``tile_engine``) and the gather engine (``gather_engine``).

Notation as in ``tile_engine``: ``s_ij`` the score after scale/softcap/ALiBi, ``m_i`` the running
max, ``l_i`` the running sum, ``lse_i = m_i + log l_i``. Inside the kernels scores are carried in
base 2 (``s·log2(e)``, the log2 units): ``log2(e)`` is folded into the score constants once per
program (``score_scales``), so the hot loop multiplies once and calls ``exp2``. ``lse`` stays in
natural units at the interface (``softmax_finish`` converts; the backward takes ``lse·log2(e)``).

Under Triton's interpreter every nested ``@triton.jit`` call costs about 0.1 ms (the interpreter
patches ``triton.language`` again on each call), so the helpers that run once per block of keys
call ``tl.dot`` directly rather than ``dot``.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# float32 inputs (IEEE_DOT): tensor-core products split in three TF32 terms, about float32's
# accuracy; "ieee" runs on FMA units and needs more registers than sm_90 has at any useful tile.
FP32_PRECISION = tl.constexpr("tf32x3")


@triton.jit
def program_tile(num_tiles, num_rows):
    """(tile, row) of this program in a launch over ``num_tiles`` × ``num_rows`` programs laid out by
    ``launch.program_grid``: numbered tile-fastest over axis 0, then 1, then 2 (one axis unless the
    count exceeds CUDA's 2^31 − 1 programs per axis); the few spare programs of a folded grid repeat
    the last row's work (the same values to the same addresses)."""
    flat = ((tl.program_id(2).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0)
            + tl.program_id(0))
    tile = (flat % num_tiles).to(tl.int32)
    row = tl.minimum(flat // num_tiles, num_rows - 1).to(tl.int32)
    return tile, row


@triton.jit
def aligned(a, b, c, ALIGN: tl.constexpr):
    """a, b, c (a tensor's batch, head and row strides, or head_dim) as multiples of ALIGN elements,
    which the host checked (``launch.row_align``): with head_dim not a multiple of 16 (40, 72, 200)
    and strides to match, row loads still become 16-byte vectors and cp.async. Written (x // ALIGN)·
    ALIGN, exact for such x, so Triton's divisibility analysis sees it (``tl.multiple_of`` does not
    reach scalar kernel arguments). ALIGN = 16 needs nothing: Triton marks ints divisible by 16 itself."""
    if ALIGN > 1 and ALIGN < 16:
        a = a // ALIGN * ALIGN
        b = b // ALIGN * ALIGN
        c = c // ALIGN * ALIGN
    return a, b, c


@triton.jit
def dot(a, b, IEEE_DOT: tl.constexpr):
    """a·b with fp32 accumulation; fp32 inputs use IEEE (not TF32) products."""
    if IEEE_DOT:
        return tl.dot(a, b, input_precision=FP32_PRECISION)
    return tl.dot(a, b)


@triton.jit
def score_scales(scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """The score constants in log2 units, once per program: (qk_scale, cap2), cap2 = softcap·log2(e).

        no softcap:             s·log2(e) = q·kᵀ · qk_scale,          qk_scale = scale·log2(e)
        HAS_SOFTCAP = 1 (exp2): s·log2(e) = cap2·tanh(x),  x = q·kᵀ·scale / softcap, with
                                tanh(x) = 1 − 2 / (2^(2x·log2(e)) + 1),  qk_scale = 2·scale·log2(e) / softcap
        HAS_SOFTCAP = 2 (fast): s·log2(e) = cap2·tanh.approx(q·kᵀ · qk_scale),  qk_scale = scale / softcap
    """
    if HAS_SOFTCAP == 2:
        return scale / softcap, softcap * LOG2E
    if HAS_SOFTCAP:
        return 2.0 * scale * LOG2E / softcap, softcap * LOG2E
    return scale * LOG2E, softcap * LOG2E


@triton.jit
def tanh_approx(x):
    """tanh.approx.f32: one MUFU instruction (max relative error about 2^-11), for 16-bit inputs on
    a GPU; the interpreter and float32 use the exact exp2 form (``softcap_scores``)."""
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def softcap_scores(x, cap2, HAS_SOFTCAP: tl.constexpr):
    """cap2·tanh of the scores x already multiplied by ``score_scales``' qk_scale (see there); x
    unchanged without softcap. tanh is evaluated once per score; the backward takes 1 − tanh² from
    the capped score it recomputes (``score_grad``)."""
    if HAS_SOFTCAP == 2:
        x = cap2 * tanh_approx(x)
    elif HAS_SOFTCAP:
        # tanh(x) = 1 − 2 / (2^(2x·log2 e) + 1): exact at ±inf, no libdevice needed.
        x = cap2 * (1.0 - 2.0 / (tl.exp2(x) + 1.0))
    return x


@triton.jit
def capped_scores(q, k_tile, qk_scale, cap2, HAS_SOFTCAP: tl.constexpr, IEEE_DOT: tl.constexpr):
    """softcap·tanh(q·kᵀ·scale / softcap) in log2 units (fp32): the scores before ALiBi
    (constants from ``score_scales``)."""
    if IEEE_DOT:
        s = tl.dot(q, tl.trans(k_tile), input_precision=FP32_PRECISION) * qk_scale
    else:
        s = tl.dot(q, tl.trans(k_tile)) * qk_scale
    return softcap_scores(s, cap2, HAS_SOFTCAP)


@triton.jit
def scores(q, k_tile, query_pos, key_index, slope2, qk_scale, cap2,
           HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, IEEE_DOT: tl.constexpr):
    """s·log2(e) = (softcap·tanh(q·kᵀ·scale / softcap) − slope·|p(i) − j|)·log2(e)   (fp32; slope2 =
    slope·log2(e), a scalar or a column [rows, 1])."""
    s = capped_scores(q, k_tile, qk_scale, cap2, HAS_SOFTCAP, IEEE_DOT)
    if HAS_ALIBI:
        s = s - slope2 * tl.abs(query_pos[:, None] - key_index[None, :]).to(tl.float32)
    return s


@triton.jit
def online_softmax_step(m_i, l_i, acc, s, v_tile, IEEE_DOT: tl.constexpr, DROPOUT: tl.constexpr = False, z=0.0):
    """One block of keys of the online softmax (base 2), s in log2 units (−inf = not visible):

        m' = max(m, max_j s_ij);   α = 2^(m − m');   p_ij = 2^(s_ij − m')
        l' = α·l + Σ_j p_ij;       acc' = α·acc + p·V     (DROPOUT: acc' = α·acc + (p ⊙ Z)·V, l undropped)

    A row that has seen no visible key yet keeps m = −inf; using 0 in its place keeps
    2^(−inf − 0) = 0 instead of NaN. Returns (m', l', acc')."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = p * z
    if IEEE_DOT:
        acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=FP32_PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile)
    return m_new, l_i, acc


@triton.jit
def online_softmax_stats_step(m_i, l_i, acc, st_t, st_d, st_z, st_c, s, v_tile, distance, sink, visible_keys,
                              IEEE_DOT: tl.constexpr, DROPOUT: tl.constexpr = False, z=0.0):
    """``online_softmax_step`` plus the running sums of the head statistics (STATS kernels), rescaled
    with it (log2 units; p_ij = 2^(s_ij − m'), masked entries s = −inf, p = 0):

        t' = α·(t + (m − m')·l) + Σ_j p_ij·(s_ij − m')   (t = Σ 2^(s − m)·(s − m); 0 while l = 0)
        d' = α·d + Σ_j p_ij·distance_ij                  (distance = |p(i) − j|)
        z' = α·z + Σ_j p_ij·[sink_ij]                    (sink: j < sink_tokens)
        c' = c + visible_keys                            (#{j : s_ij > −inf}, counted by the caller)

    P is undropped (DROPOUT multiplies only what reaches acc). Returns (m', l', acc', t', d', z', c')."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    shifted = s - m_use[:, None]
    p = tl.exp2(shifted)
    # First tile (m = −inf, l = 0): (m − m')·l would be NaN; masked entries: p = 0 but s − m' = −inf.
    st_t = alpha * (st_t + tl.where(l_i > 0.0, m_i - m_use, 0.0) * l_i) + tl.sum(p * tl.where(p > 0.0, shifted, 0.0),
                                                                                  1)
    st_d = alpha * st_d + tl.sum(p * distance, 1)
    st_z = alpha * st_z + tl.sum(tl.where(sink, p, 0.0), 1)
    st_c += visible_keys
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = p * z
    if IEEE_DOT:
        acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=FP32_PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile)
    return m_new, l_i, acc, st_t, st_d, st_z, st_c


@triton.jit
def store_stats(ROW_STATS, index, plane, mask, l_i, st_t, st_d, st_z, st_c):
    """The head statistics of rows ``index`` (int64 offsets into one plane of ``[5, ...]``, ``plane``
    elements apart) from the final running sums (l = Σ 2^(s − m) at the final max m):

        entropy = ln l − ln 2·t / l,  max_prob = 1 / l,  mean_distance = d / l,  sink_mass = z / l,  keys = c

    and 0 in every plane for a row that saw no key (l = 0)."""
    has_keys = l_i > 0.0
    safe = tl.where(has_keys, l_i, 1.0)
    inv = 1.0 / safe
    ptrs = ROW_STATS + index
    tl.store(ptrs, tl.where(has_keys, (tl.log2(safe) - st_t * inv) * LN2, 0.0), mask=mask)
    ptrs += plane
    tl.store(ptrs, tl.where(has_keys, inv, 0.0), mask=mask)
    ptrs += plane
    tl.store(ptrs, tl.where(has_keys, st_d * inv, 0.0), mask=mask)
    ptrs += plane
    tl.store(ptrs, tl.where(has_keys, st_z * inv, 0.0), mask=mask)
    ptrs += plane
    tl.store(ptrs, tl.where(has_keys, st_c, 0.0), mask=mask)


@triton.jit
def entropy_rows(ENTROPY_TERMS, index, plane, mask, delta):
    """(g·ln 2, δ − shift) of rows ``index`` from attention_stats' backward terms ``[2, ...]`` (g, the
    gradient reaching the entropy; shift = g·(lse − H)): the entropy's own term of dS,

        dS = P ⊙ (dP − (δ − shift) − g·s) = P ⊙ (dP − g·ln 2·s₂ − (δ − shift)),  s₂ = s·log2(e),

    enters as dP − g2·s₂ (s₂ before the element mask: finite where P = 0) and δ − shift."""
    ptrs = ENTROPY_TERMS + index
    g2 = tl.load(ptrs, mask=mask, other=0.0) * LN2
    shift = tl.load(ptrs + plane, mask=mask, other=0.0)
    return g2, delta - shift


@triton.jit
def dropout_rows(head_row, rows, seqlen_q, seqlen_k, key0):
    """e − j of row i = ``rows`` of flattened head ``head_row`` = b·Hq + h (int64): the element
    index of flashlite.core.dropout, e = ((b·Hq + h)·Nq + i)·Nk + j, less the key (key0 + local j
    added by ``dropout_keep``'s caller; a packed batch counts i, j, Nq, Nk in its [1, Hq, Tq, Tk] view)."""
    return (head_row.to(tl.int64) * seqlen_q + rows) * seqlen_k + key0


@triton.jit
def dropout_keep(seed, bias, scale, e):
    """Z = M / (1 − p) at element indices ``e`` (int64, any shape): M_e = 1 iff the uint32 word
    r(e) = tl.randint(seed, e) ≥ threshold = ⌊p·2^32⌋. Compared as int32 with the top bit of both
    sides flipped (r ⊕ 2^31 ≥ threshold − 2^31 = ``bias``, the same order), so ``bias`` is an int32
    for every p. ``scale`` = 1 / (1 − p)."""
    word = tl.randint(seed, e).to(tl.int32, bitcast=True) ^ (-2147483648)
    return tl.where(word >= bias, scale, 0.0)


@triton.jit
def softmax_finish(m_i, l_i, acc):
    """out = acc / l, lse = (m + log2 l)·ln 2 (natural units); a row that saw no key gets 0 and −inf."""
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * LN2, float("-inf"))
    return out, lse


@triton.jit
def log2_lse(lse):
    """lse·log2(e) for p = 2^(s·log2 e − lse·log2 e); a row with no key (lse = −inf) gets +inf, so p = 0."""
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def score_grad(p, dp, delta, sc, scale, cap2, HAS_SOFTCAP: tl.constexpr):
    """dS/d(q·kᵀ): softmax backward ds = p ⊙ (dp − δ) with δ_i = Σ_d dO_id·O_id, then the
    softcap chain (1 − tanh²) and the scale."""
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        # sc: the capped scores in log2 units without ALiBi (it has no q/k gradient): sc / cap2 = tanh(...).
        tanh = sc * (1.0 / cap2)
        ds = ds * (1.0 - tanh * tanh)
    return ds * scale
