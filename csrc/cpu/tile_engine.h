// The tile engine (full, causal, sliding window, block-sparse: one loop over a block schedule),
// forward, decode rows and backward, one instruction-set build.
//
// A tile computation keeps everything in float32, query-major along the vector dimension:
//   q̃ᵀ [Dp][BM]  the query tile transposed and pre-scaled (scale·log2e; scale alone with softcap),
//   Sᵀ [BN][BM]  scores of key c (row) against query r: the softmax's per-query max and sum are
//                element-wise vector operations down the rows,
//   Oᵀ [Dp][BM]  the output accumulator.
// One register-blocked micro-kernel (gemm.h) computes every product (forward and backward).
// Scores are carried in base 2 (s·log2e) so the softmax uses 2^x; lse is returned in natural units.
//
// Head statistics (AttentionParams::row_stats, a compile-time flag of each forward: the plain
// kernels do not change) are running sums beside the online softmax, per query row, in log2 units
// (s₂ = s·log2e, m the running max, l = Σ 2^(s₂ − m)):
//   t = Σ 2^(s₂ − m)·(s₂ − m),  d = Σ 2^(s₂ − m)·|p(i) − j|,  z = Σ_{j < sink_tokens} 2^(s₂ − m),
//   c = the number of visible keys.
// When m becomes m' (α = 2^(m − m')):  t ← α·(t + (m − m')·l),  d ← α·d,  z ← α·z  (nothing to carry
// while m = −inf: l = 0 and the (m − m')·l term would be NaN). A masked key (s₂ = −inf) adds
// nothing to t (its P = 0 would multiply −inf). At the end, l > 0: entropy = ln l − ln2·t/l,
// max_prob = 1/l, mean_distance = d/l, sink_mass = z/l, keys = c; no visible key: all 0.
// The backward with the entropy's gradient (BackwardParams::entropy; g, shift = g·(lse − H)):
// dS = P ⊙ (dP − (δ − shift) − g·s), the packed tiles carry δ − shift and g·ln2 (s = ln2·s₂).
#pragma once

#ifndef FL_ISA
#error "include isa_kernels.h from an isa_*.cpp (FL_ISA, FL_LANES, FL_MR defined), not this header"
#endif

#include "simd.h"
#include "philox.h"
#include "gemm.h"
#include "pack.h"

namespace flashlite {
namespace cpu {
namespace FL_ISA {

// Scores of L (query, key) pairs from x = q̃·k and dist = p(i) − j (the formulas of score_tile);
// slope_units = slope with softcap, slope·log2e without. chain (if given) gets 1 − tanh².
inline vf score_lanes(vf x, vi dist, float cap, float slope_units, float* chain) {
  vf s = x;
  if (cap != 0.f) {
    const vf t = tanhv(x * (1.f / cap));
    s = t * cap;
    if (chain) store(chain, 1.f - t * t);
  }
  if (slope_units != 0.f) {
    const vf d = __builtin_convertvector(dist, vf);
    s -= slope_units * select(d < 0.f, -d, d);
  }
  return cap != 0.f ? s * kLog2e : s;
}
inline vi in_band(const AttentionParams& p, vi dist) { return (dist <= p.window_left) & (dist >= -p.window_right); }
inline vf vabs(vf x) { return select(x < 0.f, -x, x); }

// The five statistics of row `row` (the lse index (b·Hq + h)·Nq + i) from the running sums above
// (t in log2 units).
inline void write_row_stats(const AttentionParams& p, int64_t row, float l, float t, float d, float z, float c) {
  const int64_t plane = int64_t(p.batch) * p.heads_q * p.seqlen_q;
  float* out = p.row_stats + row;
  const bool seen = l > 0.f;
  const float inv = seen ? 1.f / l : 0.f;
  out[0] = seen ? logf(l) - kLn2 * t * inv : 0.f;
  out[plane] = inv;
  out[2 * plane] = d * inv;
  out[3 * plane] = z * inv;
  out[4 * plane] = seen ? c : 0.f;
}

// Scores of one tile, in place on Sᵀ[c][r] (keys j0 + c, c < nk; queries i0 + r, r < Y; positions
// local to the segment, p(i) = i + shift), from x = q̃·k:
//   softcap:  t = tanh(x/cap),  s = log2e·(cap·t − slope·|p(i) − j|),  chain[c][r] = 1 − t²
//   no cap:   s = x − log2e·slope·|p(i) − j|
//   outside the band p(i) − left ≤ j ≤ p(i) + right:  s = −inf
// A tile wholly inside the band skips the mask.
inline void score_tile(const AttentionParams& p, float slope, int shift, int i0, int rows, int Y, int j0, int nk,
                       float* st, float* chain, int ld) {
  const float cap = p.softcap;
  const int pos0 = i0 + shift;
  const bool masked = j0 < pos0 + rows - 1 - p.window_left || j0 + nk - 1 > pos0 + p.window_right;
  if (cap == 0.f && slope == 0.f && !masked) return;
  const float slope_units = cap != 0.f ? slope : slope * kLog2e;
  const vi row_pos = iota() + pos0;
  for (int c = 0; c < nk; ++c) {
    float* s_row = st + c * ld;
    for (int y = 0; y < Y; y += L) {
      const vi dist = row_pos + (y - (j0 + c));  // p(i) − j
      vf s = score_lanes(load(s_row + y), dist, cap, slope_units, chain ? chain + c * ld + y : nullptr);
      if (masked) s = select(in_band(p, dist), s, splat(-kInf));
      store(s_row + y, s);
    }
  }
}

// Attention dropout on a tile of probabilities Pᵀ[c][r] (keys c < nk, query lanes r < Y): each
// times its factor Z = M/(1 − p) (philox.h), element (c, r) having the counter base + r·Nk + c
// (base = p.dropout_index of the tile's first query and key). Called only when p.dropout.
inline void dropout_tile(const AttentionParams& p, uint64_t base, int nk, int Y, float* st, int ld) {
  const uint64_t Nk = uint64_t(p.seqlen_k);
  for (int y = 0; y < Y; y += L) {
    const vu64w lanes = counters(base + uint64_t(y) * Nk, Nk);
    for (int c = 0; c < nk; ++c)
      store(st + c * ld + y, load(st + c * ld + y) * dropout_factors(p, lanes + uint64_t(c)));
  }
}

// Keys j0 .. j0+n of segment sg (local positions) of k or v for kv head h, as float32 rows
// (kv_rows): the contiguous rows sg.k0 + j0 .. of a plain or packed batch; in a paged cache
// (p.paged) the slots of the block table. A tile inside one page is contiguous slots, read like
// contiguous rows; a tile across pages is copied page run by page run into buf [n][Dp].
inline RowsView tile_kv_rows(const AttentionParams& p, const void* base, const Strides3& s, const Segment& sg, int h,
                             int j0, int n, bool vector_rows, float* buf) {
  const int D = p.head_dim, Dp = round_up(D, L);
  const PagedKeys& pages = p.paged;
  if (!pages.active()) return kv_rows(p.dtype, base, s, sg.b, h, sg.k0 + j0, n, D, Dp, vector_rows, buf);
  if (n <= pages.page_size - j0 % pages.page_size)
    return kv_rows(p.dtype, base, s, sg.b, h, pages.slot(sg.b, j0), n, D, Dp, vector_rows, buf);
  for (int c = 0; c < n; ++c) {
    load_row(p.dtype, base, offset(s, sg.b, h, pages.slot(sg.b, j0 + c)), D, buf + c * Dp);
    fill(buf + c * Dp + D, Dp - D, 0.f);
  }
  return {buf, Dp};
}

// The same keys as one pointer per row (rows[c], Dp floats each, readable as whole vectors): in
// place where float32 allows, else converted into buf [n][Dp]; page run by page run in a paged
// cache, so a tile across pages costs no copy either.
inline void tile_kv_pointers(const AttentionParams& p, const void* base, const Strides3& s, const Segment& sg, int h,
                             int j0, int n, float* buf, const float** rows) {
  const int D = p.head_dim, Dp = round_up(D, L);
  const PagedKeys& pages = p.paged;
  for (int c = 0; c < n;) {
    const int j = j0 + c;
    const int run = pages.active() ? imin(n - c, pages.page_size - j % pages.page_size) : n;
    const int row = pages.active() ? pages.slot(sg.b, j) : sg.k0 + j;
    const RowsView r = kv_rows(p.dtype, base, s, sg.b, h, row, run, D, Dp, true, buf + c * Dp);
    for (int i = 0; i < run; ++i) rows[c + i] = r.data + i * r.ld;
    c += run;
  }
}

// ---------------------------------------------------------------------------------------------
// Tile engine, forward: query tile m of (segment, h) over the key tiles of its schedule row.
// Stats: also the head statistics (row_stats) from running sums beside the softmax (see the top).
// AttentionParams::tile_counter (debug): `tiles` more key tiles visited by (b, h) at schedule row
// `row` (atomic: a decode split's pieces run on different threads).
inline void count_tiles(const AttentionParams& p, int b, int h, int row, int tiles) {
  if (p.tile_counter == nullptr || tiles == 0) return;
  const int64_t rows = p.packed.active() ? p.packed.num_q_items : (p.seqlen_q + p.block_m - 1) / p.block_m;
  __atomic_fetch_add(p.tile_counter + (int64_t(b) * p.heads_q + h) * rows + row, tiles, __ATOMIC_RELAXED);
}

template <bool Stats>
void tile_forward_of(const AttentionParams& p, const Segment& sg, int h, int m, Workspace& ws) {
  const int BM = p.block_m, BN = p.block_n, D = p.head_dim, Dp = round_up(D, L), b = sg.b;
  const int i0 = m * BM, rows = imin(BM, sg.nq - i0), Y = round_up(rows, L);
  const int kv_head = h / p.group();
  float* qt = ws.floats(size_t(2 * Dp * BM + BN * BM + 2 * BN * Dp + (Stats ? 7 : 3) * BM + L * Dp));
  float* ot = qt + Dp * BM;
  float* st = ot + Dp * BM;
  float* kbuf = st + BN * BM;
  float* vbuf = kbuf + BN * Dp;
  float* row_max = vbuf + BN * Dp;
  float* row_sum = row_max + BM;
  float* alpha = row_sum + BM;
  float* tmp = alpha + BM;
  float* stat_t = tmp + L * Dp;  // Stats: t, d, z, c per row (BM each)
  float* stat_d = stat_t + BM;
  float* stat_z = stat_d + BM;
  float* stat_c = stat_z + BM;

  pack_rows(p.dtype, p.q, p.q_strides, b, h, sg.q0 + i0, rows, Y, D, Dp, query_factor(p), qt, BM, nullptr, tmp);
  fill(ot, D * BM, 0.f);
  fill(row_max, BM, -kInf);
  fill(row_sum, BM, 0.f);
  if constexpr (Stats) fill(stat_t, 4 * BM, 0.f);
  const int pos0 = i0 + sg.shift();
  const float slope = p.alibi(sg.seq, h);
  const ScheduleView& schedule = p.forward_schedule;
  const int row = sg.q_row0 + m, count = schedule.num_tiles(b, h, row);
  int visited = 0;  // tile_counter (debug)
  for (int t = 0; t < count; ++t) {
    // The tile's keys that some row of the query tile sees, p(i0) − left .. p(i0 + rows − 1) + right:
    // the others would get P = 0, and a paged cache's pages wholly outside every window stay unread.
    const int tile0 = schedule.tile(b, h, row, t) * BN;
    const int j0 = static_cast<int>(std::max<int64_t>(tile0, int64_t(pos0) - p.window_left));
    const int nk = static_cast<int>(std::min<int64_t>(imin(tile0 + BN, sg.nk), int64_t(pos0) + rows + p.window_right) - j0);
    if (nk <= 0) continue;
    ++visited;
    const RowsView k = tile_kv_rows(p, p.k, p.k_strides, sg, kv_head, j0, nk, false, kbuf);
    const RowsView v = tile_kv_rows(p, p.v, p.v_strides, sg, kv_head, j0, nk, false, vbuf);
    // Sᵀ[c][r] = Σ_d k[j0 + c][d]·q̃[i0 + r][d]
    gemm(nk, Y, D, k.data, k.ld, 1, qt, BM, st, BM, false);
    score_tile(p, slope, sg.shift(), i0, rows, Y, j0, nk, st, nullptr, BM);
    // Online softmax, per query r (vectors along r):
    //   m' = max(m, max_c s[c][r]),  α = 2^(m − m'),  P[c][r] = 2^(s[c][r] − m'),  l' = α·l + Σ_c P[c][r]
    // A row with no visible key so far keeps m = −inf; 0 stands in for it so 2^(−inf − 0) = 0.
    for (int y = 0; y < Y; y += L) {
      const vf m_old = load(row_max + y);
      vf m_new = m_old;
      for (int c = 0; c < nk; ++c) m_new = vmax(m_new, load(st + c * BM + y));
      const vf m_use = select(m_new == -kInf, splat(0.f), m_new);
      vf sum = {};
      if constexpr (Stats) {
        vf t_sum = {}, d_sum = {}, z_sum = {}, c_sum = {};
        vf dist = __builtin_convertvector(iota() + (pos0 + y - j0), vf);  // p(i) − j of key j0 + c, c = 0
        for (int c = 0; c < nk; ++c) {
          const vf x = load(st + c * BM + y) - m_use;
          const vf prob = exp2v(x);
          store(st + c * BM + y, prob);
          sum += prob;
          const vi seen = x != -kInf;
          t_sum += select(seen, prob * x, splat(0.f));
          c_sum += select(seen, splat(1.f), splat(0.f));
          d_sum += prob * vabs(dist);
          dist -= 1.f;
        }
        for (int c = 0; c < imin(nk, p.sink_tokens - j0); ++c) z_sum += load(st + c * BM + y);
        const vf l_old = load(row_sum + y), a = exp2v(m_old - m_use);
        const vf carried = select(m_old == -kInf, splat(0.f), load(stat_t + y) + (m_old - m_use) * l_old);
        store(stat_t + y, a * carried + t_sum);
        store(stat_d + y, a * load(stat_d + y) + d_sum);
        store(stat_z + y, a * load(stat_z + y) + z_sum);
        store(stat_c + y, load(stat_c + y) + c_sum);
      } else {
        for (int c = 0; c < nk; ++c) {
          const vf prob = exp2v(load(st + c * BM + y) - m_use);
          store(st + c * BM + y, prob);
          sum += prob;
        }
      }
      const vf a = exp2v(m_old - m_use);
      store(alpha + y, a);
      store(row_sum + y, load(row_sum + y) * a + sum);
      store(row_max + y, m_new);
    }
    // Dropout (the sums above stay undropped: lse is the undropped softmax's):  P[c][r] *= Z[c][r]
    if (p.dropout) dropout_tile(p, p.dropout_index(b, h, sg.q0 + i0, sg.k0 + j0), nk, Y, st, BM);
    // Oᵀ[d][r] = α[r]·Oᵀ[d][r] + Σ_c v[j0 + c][d]·P[c][r]
    for (int d = 0; d < D; ++d)
      for (int y = 0; y < Y; y += L) store(ot + d * BM + y, load(ot + d * BM + y) * load(alpha + y));
    gemm(D, Y, nk, v.data, 1, v.ld, st, BM, ot, BM, true);
  }
  count_tiles(p, b, h, row, visited);
  // out = Oᵀ / l,  lse = ln2·(m + log2 l); a row that saw no key (l = 0) gives 0 and −inf.
  const int64_t row0 = (int64_t(b) * p.heads_q + h) * p.seqlen_q + sg.q0 + i0;
  float* lse = p.lse + row0;
  for (int r = 0; r < rows; ++r) {
    const float l = row_sum[r];
    lse[r] = l > 0.f ? (row_max[r] + log2f(l)) * kLn2 : -kInf;
    alpha[r] = l > 0.f ? 1.f / l : 0.f;
    if constexpr (Stats) write_row_stats(p, row0 + r, l, stat_t[r], stat_d[r], stat_z[r], stat_c[r]);
  }
  store_transposed(p.dtype, p.out, p.out_strides, b, h, sg.q0 + i0, rows, D, ot, BM, alpha, tmp);
}
void tile_forward(const AttentionParams& p, const Segment& sg, int h, int m, Workspace& ws) {
  if (p.row_stats)
    tile_forward_of<true>(p, sg, h, m, ws);
  else
    tile_forward_of<false>(p, sg, h, m, ws);
}

// Tile engine, forward, for a few query rows (decode): query tile m of batch row b's heads
// h_first .. h_first + heads − 1 (one head, or the whole groups of one or more KV heads, sharing
// a schedule row) over key tiles [tile_begin, tile_end) of that row, one query row at a time with
// the keys along the vector lanes: the query-major kernel above would fill 1 of its L lanes per
// row. Each key tile is loaded once per KV head for all its rows, the KV heads of an item one
// after the other inside each tile (in a paged cache, page by page through the block table: a
// page's slots hold every KV head's rows side by side, so an item of all heads reads it once). Per row r and key tile (keys j0 + c, c < nk), in log2 units:
//   s_c = score(q̃_r·k_c) (−inf outside the band),  m' = max(m, max_c s_c),  α = 2^(m − m'),
//   P_c = 2^(s_c − m'),  l' = α·l + Σ_c P_c,  acc' = α·acc + Σ_c P_c·v_c
// The state of row r is a record of row_record_floats floats, [acc (Dp) | m | l | t | d | z | c |
// pad] (t, d, z, c: the head statistics' running sums, kept with Stats only). With
// `partials`, the records are left there (a split of the keys, merged by
// tile_forward_rows_merge); without, out_r = acc / l and lse_r = ln2·(m + log2 l) are written (a
// row that saw no key: 0 and −inf).
inline int row_record_floats(const AttentionParams& p) { return decode_record_floats(p.head_dim, L); }

// stats: the row's t, d, z, c (Stats only).
template <bool Stats>
inline void finish_row(const AttentionParams& p, int b, int h, int i, float* record, float row_max, float row_sum,
                       const float* stats) {
  const int64_t row = (int64_t(b) * p.heads_q + h) * p.seqlen_q + i;
  p.lse[row] = row_sum > 0.f ? (row_max + log2f(row_sum)) * kLn2 : -kInf;
  store_scaled_row(p, p.out, p.out_strides, b, h, i, record, row_sum > 0.f ? 1.f / row_sum : 0.f);
  if constexpr (Stats) write_row_stats(p, row, row_sum, stats[0], stats[1], stats[2], stats[3]);
}

template <bool Stats>
void tile_forward_rows_of(const AttentionParams& p, int b, int h_first, int heads, int m, int tile_begin,
                          int tile_end, float* partials, Workspace& ws) {
  const int BM = p.block_m, BN = p.block_n, BNp = round_up(BN, L), D = p.head_dim, Dp = round_up(D, L);
  const int i0 = m * BM, rows = imin(BM, p.seqlen_q - i0), R = heads * rows, W = row_record_floats(p);
  const int group_rows = imin(heads, p.group()) * rows;  // the rows of one KV head in this item
  const Segment sg = batch_segment(p, b);
  const int pos0 = i0 + sg.shift();
  float* q_rows = ws.floats(size_t(R * (Dp + W) + 2 * BNp * Dp + BNp + Dp + 2 * R + heads));
  float* records = partials ? partials : q_rows + R * Dp;
  float* kbuf = q_rows + R * (Dp + W);
  float* vbuf = kbuf + BNp * Dp;
  float* s = vbuf + BNp * Dp;
  float* zero = s + BNp;
  const float** keys = ws.pointers(size_t(2 * BNp));
  const float** values = keys + BNp;
  fill(zero, Dp, 0.f);
  for (int r = 0; r < R; ++r) {
    pack_query_row(p, p.q, p.q_strides, b, h_first + r / rows, i0 + r % rows, query_factor(p), q_rows + r * Dp);
    float* record = records + r * W;
    fill(record, Dp, 0.f);
    record[Dp] = -kInf;    // m
    record[Dp + 1] = 0.f;  // l
    if constexpr (Stats) fill(record + Dp + 2, 4, 0.f);  // t, d, z, c
  }
  const float cap = p.softcap;
  const ScheduleView& schedule = p.forward_schedule;
  // Rows' own tile counts (a masked head's is 0) and each KV head's longest: a KV head whose rows
  // are all past their counts (all its heads masked) has its keys never read.
  int* row_tiles = reinterpret_cast<int*>(s + BNp + Dp);
  int* kv_tiles = row_tiles + R;
  int* visited = kv_tiles + R;  // per head of the item: tile_counter (debug)
  std::fill(visited, visited + heads, 0);
  for (int r = 0; r < R; ++r) {
    row_tiles[r] = schedule.num_tiles(b, h_first + r / rows, m);
    kv_tiles[r / group_rows] = r % group_rows == 0 ? row_tiles[r] : std::max(kv_tiles[r / group_rows], row_tiles[r]);
  }
  for (int t = tile_begin; t < tile_end; ++t) {
    const int j0 = schedule.tile(b, h_first, m, t) * BN, nk = imin(BN, sg.nk - j0), nkp = round_up(nk, L);
    // Only keys c in [first, last) are loaded: those some row sees (p(i0) − left .. p(i0 + rows − 1) +
    // right); the rest point at a zero row (masked: P = 0), so pages wholly outside every window
    // stay unread and the lanes keep their keys.
    const int first = static_cast<int>(std::clamp<int64_t>(int64_t(pos0) - p.window_left - j0, 0, nk));
    const int last = static_cast<int>(std::clamp<int64_t>(int64_t(pos0) + rows + p.window_right - j0, first, nk));
    for (int c = 0; c < nkp; ++c)
      if (c < first || c >= last) keys[c] = values[c] = zero;
    for (int r = 0; r < R; ++r) {
      if (r % group_rows == 0) {  // the next KV head's keys, unless none of its rows visits this tile
        if (t >= kv_tiles[r / group_rows]) {
          r += group_rows - 1;
          continue;
        }
        const int kv_head = (h_first + r / rows) / p.group();
        tile_kv_pointers(p, p.k, p.k_strides, sg, kv_head, j0 + first, last - first, kbuf, keys + first);
        tile_kv_pointers(p, p.v, p.v_strides, sg, kv_head, j0 + first, last - first, vbuf, values + first);
      }
      if (t >= row_tiles[r]) continue;  // past this row's schedule (a masked head: no tile at all)
      if (r % rows == 0) ++visited[r / rows];  // tile_counter (debug): once per head
      const int h = h_first + r / rows, pos = i0 + r % rows + sg.shift();
      const float slope = p.alibi(b, h), slope_units = cap != 0.f ? slope : slope * kLog2e;
      vf tile_max = splat(-kInf), c_sum = {};
      for (int c0 = 0; c0 < nkp; c0 += L) {
        const vi dist = splat_int(pos - j0 - c0) - iota();  // p(i) − j for keys j0 + c0 + lane
        const vf x = dots(q_rows + r * Dp, keys + c0, Dp);
        const vi visible = in_band(p, dist) & (iota() < nk - c0);
        const vf sc = select(visible, score_lanes(x, dist, cap, slope_units, nullptr), splat(-kInf));
        store(s + c0, sc);
        tile_max = vmax(tile_max, sc);
        if constexpr (Stats) c_sum += select(sc != -kInf, splat(1.f), splat(0.f));
      }
      float* record = records + r * W;
      const float m_old = record[Dp], m_new = fmaxf(m_old, hmax(tile_max));
      if (m_new == -kInf) continue;  // nothing visible yet
      vf sum = {};
      if constexpr (Stats) {
        vf t_sum = {}, d_sum = {};
        for (int c0 = 0; c0 < nkp; c0 += L) {
          const vf x = load(s + c0) - m_new;
          const vf prob = exp2v(x);
          store(s + c0, prob);
          sum += prob;
          t_sum += select(x != -kInf, prob * x, splat(0.f));
          d_sum += prob * vabs(__builtin_convertvector(splat_int(pos - j0 - c0) - iota(), vf));
        }
        float z = 0.f;
        for (int c = 0; c < imin(nk, p.sink_tokens - j0); ++c) z += s[c];
        const float l_old = record[Dp + 1], a = m_old == -kInf ? 0.f : exp2f(m_old - m_new);
        float* st = record + Dp + 2;
        st[0] = (m_old == -kInf ? 0.f : a * (st[0] + (m_old - m_new) * l_old)) + hsum(t_sum);
        st[1] = a * st[1] + hsum(d_sum);
        st[2] = a * st[2] + z;
        st[3] += hsum(c_sum);
      } else {
        for (int c0 = 0; c0 < nkp; c0 += L) {
          const vf prob = exp2v(load(s + c0) - m_new);
          store(s + c0, prob);
          sum += prob;
        }
      }
      if (p.dropout) {  // P_c *= Z_c after the (undropped) sum; keys along the lanes: consecutive counters
        const uint64_t base = p.dropout_index(b, h, i0 + r % rows, j0);
        for (int c0 = 0; c0 < nkp; c0 += L)
          store(s + c0, load(s + c0) * dropout_factors(p, counters(base + uint64_t(c0), 1)));
      }
      const float alpha = m_old == -kInf ? 0.f : exp2f(m_old - m_new);
      record[Dp + 1] = record[Dp + 1] * alpha + hsum(sum);
      record[Dp] = m_new;
      if (alpha != 1.f)
        for (int d = 0; d < Dp; d += L) store(record + d, load(record + d) * alpha);
      weighted_rows(s, values, nk, Dp, record);
    }
  }
  for (int head = 0; head < heads; ++head) count_tiles(p, b, h_first + head, m, visited[head]);
  if (partials) return;
  for (int r = 0; r < R; ++r) {
    float* record = records + r * W;
    finish_row<Stats>(p, b, h_first + r / rows, i0 + r % rows, record, record[Dp], record[Dp + 1], record + Dp + 2);
  }
}
void tile_forward_rows(const AttentionParams& p, int b, int h_first, int heads, int m, int tile_begin, int tile_end,
                       float* partials, Workspace& ws) {
  if (p.row_stats)
    tile_forward_rows_of<true>(p, b, h_first, heads, m, tile_begin, tile_end, partials, ws);
  else
    tile_forward_rows_of<false>(p, b, h_first, heads, m, tile_begin, tile_end, partials, ws);
}

// Merge of a decode split: row r's records of the `splits` key ranges (records of split s at
// partials + (s·R + r)·W), in split order:
//   M = max_s m_s,  w_s = 2^(m_s − M),  l = Σ_s w_s·l_s,  out = Σ_s w_s·acc_s / l,  lse = ln2·(M + log2 l)
// and with Stats  t = Σ_s w_s·(t_s + (m_s − M)·l_s),  d = Σ_s w_s·d_s,  z = Σ_s w_s·z_s,  c = Σ_s c_s.
template <bool Stats>
void tile_forward_rows_merge_of(const AttentionParams& p, int b, int h_first, int heads, int m, int splits,
                                const float* partials, Workspace& ws) {
  const int Dp = round_up(p.head_dim, L), i0 = m * p.block_m, rows = imin(p.block_m, p.seqlen_q - i0);
  const int R = heads * rows, W = row_record_floats(p);
  float* merged = ws.floats(size_t(Dp));
  for (int r = 0; r < R; ++r) {
    float top = -kInf;
    for (int sp = 0; sp < splits; ++sp) top = fmaxf(top, partials[(sp * R + r) * W + Dp]);
    fill(merged, Dp, 0.f);
    float sum = 0.f, stats[4] = {0.f, 0.f, 0.f, 0.f};
    if (top != -kInf) {
      for (int sp = 0; sp < splits; ++sp) {
        const float* record = partials + (sp * R + r) * W;
        if (record[Dp] == -kInf) continue;  // this split saw no key of the row
        const float weight = exp2f(record[Dp] - top);
        sum += weight * record[Dp + 1];
        axpy(weight, record, merged, Dp);
        if constexpr (Stats) {
          const float* st = record + Dp + 2;
          stats[0] += weight * (st[0] + (record[Dp] - top) * record[Dp + 1]);
          stats[1] += weight * st[1];
          stats[2] += weight * st[2];
          stats[3] += st[3];
        }
      }
    }
    finish_row<Stats>(p, b, h_first + r / rows, i0 + r % rows, merged, top, sum, stats);
  }
}
void tile_forward_rows_merge(const AttentionParams& p, int b, int h_first, int heads, int m, int splits,
                             const float* partials, Workspace& ws) {
  if (p.row_stats)
    tile_forward_rows_merge_of<true>(p, b, h_first, heads, m, splits, partials, ws);
  else
    tile_forward_rows_merge_of<false>(p, b, h_first, heads, m, splits, partials, ws);
}

// Backward helpers: a query tile's lse in log2 units (+inf for a row with no key, so that every
// P = 2^(s − lse) is 0) and its δ = Σ_d dO·O; padded rows get +inf and 0. With the entropy's
// gradient (g.entropy: g, shift), δ − shift in place of δ and g·ln2 in `gl` (else 0). i0: the
// tensors' row.
inline void pack_row_stats(const AttentionParams& p, const BackwardParams& g, int b, int h, int i0, int rows, int Y,
                           float* lse2, float* delta, float* gl) {
  const int64_t base = (int64_t(b) * p.heads_q + h) * p.seqlen_q + i0;
  const int64_t plane = int64_t(p.batch) * p.heads_q * p.seqlen_q;
  for (int r = 0; r < Y; ++r) {
    const float lse = r < rows ? p.lse[base + r] : -kInf;
    lse2[r] = lse == -kInf ? kInf : lse * kLog2e;
    delta[r] = r < rows ? g.delta[base + r] : 0.f;
    gl[r] = 0.f;
    if (g.entropy && r < rows) {
      delta[r] -= g.entropy[plane + base + r];
      gl[r] = g.entropy[base + r] * kLn2;
    }
  }
}

// A query tile of the backward packed once for every key tile that visits it (the driver's first
// pass, tile_backward_pack): q̃ᵀ [Dp][BM], q rows [BM][Dp], dOᵀ [Dp][BM], dO rows [BM][Dp], lse in
// log2 units [BM], δ [BM] (δ − shift with the entropy's gradient), g·ln2 [BM] (0 without); rows
// past the tile's end are zero (+inf lse). Without a packed buffer
// (too large, see driver.cpp) each work item packs the tiles it visits itself, into the same layout.
inline int64_t packed_tile_floats(const AttentionParams& p) { return backward_tile_floats(p.head_dim, p.block_m, L); }
struct PackedTile {
  float *qt, *q_rows, *do_t, *do_rows, *lse2, *delta, *gl;
};
inline PackedTile packed_tile(const AttentionParams& p, float* base) {
  const int BM = p.block_m, Dp = round_up(p.head_dim, L);
  PackedTile t;
  t.qt = base;
  t.q_rows = t.qt + Dp * BM;
  t.do_t = t.q_rows + BM * Dp;
  t.do_rows = t.do_t + Dp * BM;
  t.lse2 = t.do_rows + BM * Dp;
  t.delta = t.lse2 + BM;
  t.gl = t.delta + BM;
  return t;
}
inline void pack_query_tile(const AttentionParams& p, const BackwardParams& g, const Segment& sg, int h, int m,
                            const PackedTile& t, float* tmp) {
  const int BM = p.block_m, D = p.head_dim, Dp = round_up(D, L), b = sg.b;
  const int i0 = sg.q0 + m * BM, rows = imin(BM, sg.nq - m * BM), Y = round_up(rows, L);
  pack_rows(p.dtype, p.q, p.q_strides, b, h, i0, rows, Y, D, Dp, query_factor(p), t.qt, BM, t.q_rows, tmp);
  pack_rows(p.dtype, g.grad_out, g.grad_out_strides, b, h, i0, rows, Y, D, Dp, 1.f, t.do_t, BM, t.do_rows, tmp);
  pack_row_stats(p, g, b, h, i0, rows, Y, t.lse2, t.delta, t.gl);
}

// Query tile m of (segment, h) in the driver's buffer of packed tiles (work.h forward_rows).
inline PackedTile driver_tile(const AttentionParams& p, const float* packed, const Segment& sg, int h, int m) {
  const int64_t row = (int64_t(sg.b) * p.heads_q + h) * forward_rows(p) + sg.q_row0 + m;
  return packed_tile(p, const_cast<float*>(packed) + row * packed_tile_floats(p));
}

// The driver's first backward pass: query tile m of (segment, h) into dst (packed_tile_floats(p) floats).
void tile_backward_pack(const AttentionParams& p, const BackwardParams& g, const Segment& sg, int h, int m, float* dst,
                        Workspace& ws) {
  float* tmp = ws.floats(size_t(L * round_up(p.head_dim, L)));
  pack_query_tile(p, g, sg, h, m, packed_tile(p, dst), tmp);
}

// P, then dS in place of dPᵀ:  P[c][r] = 2^(s[c][r] − lse_r),  dS = P ⊙ (dP − δ_r) ⊙ chain · scale
// (chain = 1 − tanh² with softcap, else 1). With dropout (Z = M/(1 − p), element (c, r) at counter
// drop_base + r·Nk + c, as dropout_tile): st gets P ⊙ Z (for dV = (P ⊙ Z)ᵀ·dO) and
// dS = P ⊙ (dP ⊙ Z − δ_r) ⊙ chain · scale. With the entropy's gradient (Entropy; δ_r holds
// δ − shift, gl_r = g·ln2): dS = P ⊙ (dP − δ_r − gl_r·s[c][r]) ⊙ chain · scale, a masked s (−inf,
// P = 0) counting as 0.
template <bool Dropout, bool Entropy>
inline void probs_and_score_grads_of(const AttentionParams& p, int nk, int Y, float* st, float* dpt, const float* chain,
                                     const float* lse2, const float* delta, const float* gl, int ld, bool grads,
                                     uint64_t drop_base) {
  const vf scale = splat(p.scale);
  const uint64_t Nk = uint64_t(p.seqlen_k);
  vu64w lanes{};  // lane r: r·Nk
  if constexpr (Dropout) lanes = counters(0, Nk);
  for (int c = 0; c < nk; ++c) {
    for (int y = 0; y < Y; y += L) {
      const vf score = load(st + c * ld + y);
      const vf prob = exp2v(score - load(lse2 + y));
      vf dp = load(dpt + c * ld + y);
      if constexpr (Dropout) {
        const vf z = dropout_factors(p, lanes + (drop_base + uint64_t(y) * Nk + uint64_t(c)));
        store(st + c * ld + y, prob * z);
        dp *= z;
      } else {
        store(st + c * ld + y, prob);
      }
      if (grads) {
        vf inner = dp - load(delta + y);
        if constexpr (Entropy) inner -= load(gl + y) * select(score == -kInf, splat(0.f), score);
        vf ds = prob * inner * scale;
        if (chain) ds *= load(chain + c * ld + y);
        store(dpt + c * ld + y, ds);
      }
    }
  }
}
// entropy: BackwardParams::entropy is set (the tile's gl holds g·ln2).
inline void probs_and_score_grads(const AttentionParams& p, int nk, int Y, float* st, float* dpt, const float* chain,
                                  const PackedTile& tile, bool entropy, int ld, bool grads, uint64_t drop_base) {
  const float *lse2 = tile.lse2, *delta = tile.delta, *gl = tile.gl;
  if (entropy) {
    if (p.dropout)
      probs_and_score_grads_of<true, true>(p, nk, Y, st, dpt, chain, lse2, delta, gl, ld, grads, drop_base);
    else
      probs_and_score_grads_of<false, true>(p, nk, Y, st, dpt, chain, lse2, delta, gl, ld, grads, drop_base);
  } else {
    if (p.dropout)
      probs_and_score_grads_of<true, false>(p, nk, Y, st, dpt, chain, lse2, delta, gl, ld, grads, drop_base);
    else
      probs_and_score_grads_of<false, false>(p, nk, Y, st, dpt, chain, lse2, delta, gl, ld, grads, drop_base);
  }
}

// Tile engine, backward for key tile n of (segment, kv head): over every query head of the GQA
// group and the query tiles of the transposed schedule (no atomics: this item owns these dK/dV rows).
//   dV_j = Σ_i P_ij·dO_i,   dP_ij = dO_i·v_j,   dS_ij = P_ij (dP_ij − δ_i)·chain·scale,   dK_j = Σ_i dS_ij·q_i
void tile_backward_kv(const AttentionParams& p, const BackwardParams& g, const Segment& sg, int kv_head, int n,
                      const float* packed, Workspace& ws) {
  const int BM = p.block_m, BN = p.block_n, D = p.head_dim, Dp = round_up(D, L), group = p.group(), b = sg.b;
  const int j0 = n * BN, nk = imin(BN, sg.nk - j0);
  const int64_t tile_floats = packed_tile_floats(p);
  float* own = ws.floats(size_t(tile_floats + 3 * BN * BM + 4 * BN * Dp + L * Dp));
  float* st = own + tile_floats;
  float* dpt = st + BN * BM;
  float* chain = dpt + BN * BM;
  float* kbuf = chain + BN * BM;
  float* vbuf = kbuf + BN * Dp;
  float* dk = vbuf + BN * Dp;
  float* dv = dk + BN * Dp;
  float* tmp = dv + BN * Dp;

  const RowsView k = kv_rows(p.dtype, p.k, p.k_strides, b, kv_head, sg.k0 + j0, nk, D, Dp, false, kbuf);
  const RowsView v = kv_rows(p.dtype, p.v, p.v_strides, b, kv_head, sg.k0 + j0, nk, D, Dp, false, vbuf);
  fill(dk, BN * Dp, 0.f);
  fill(dv, BN * Dp, 0.f);
  const ScheduleView& schedule = p.backward_schedule;
  const int row = sg.k_row0 + n;
  for (int gi = 0; gi < group; ++gi) {
    const int h = kv_head * group + gi;
    const float slope = p.alibi(sg.seq, h);
    const int count = schedule.num_tiles(b, h, row);
    for (int t = 0; t < count; ++t) {
      const int m = schedule.tile(b, h, row, t);
      const int i0 = m * BM, rows = imin(BM, sg.nq - i0), Y = round_up(rows, L);
      PackedTile tile;
      if (packed) {  // packed once by the driver's first pass
        tile = driver_tile(p, packed, sg, h, m);
      } else {
        tile = packed_tile(p, own);
        pack_query_tile(p, g, sg, h, m, tile, tmp);
      }
      gemm(nk, Y, D, k.data, k.ld, 1, tile.qt, BM, st, BM, false);  // Sᵀ = K·q̃ᵀ
      score_tile(p, slope, sg.shift(), i0, rows, Y, j0, nk, st, p.softcap != 0.f ? chain : nullptr, BM);
      gemm(nk, Y, D, v.data, v.ld, 1, tile.do_t, BM, dpt, BM, false);  // dPᵀ = V·dOᵀ
      probs_and_score_grads(p, nk, Y, st, dpt, p.softcap != 0.f ? chain : nullptr, tile, g.entropy != nullptr, BM,
                            true, p.dropout_index(b, h, sg.q0 + i0, sg.k0 + j0));
      gemm(nk, Dp, rows, st, BM, 1, tile.do_rows, Dp, dv, Dp, true);   // dV += Pᵀ·dO
      gemm(nk, Dp, rows, dpt, BM, 1, tile.q_rows, Dp, dk, Dp, true);   // dK += dSᵀ·Q
    }
  }
  store_rows(p.dtype, g.dk, g.dk_strides, b, kv_head, sg.k0 + j0, nk, D, dk, Dp);
  store_rows(p.dtype, g.dv, g.dv_strides, b, kv_head, sg.k0 + j0, nk, D, dv, Dp);
}

// Tile engine, backward of a whole (segment, kv head) in one work item: for each key tile n, ascending,
// over the query tiles of its transposed schedule (every query head of the group): dK_n, dV_n as
// tile_backward_kv, and dQ_m += dS·K_n into this item's buffer of the group's dQ rows — 5 products
// per tile pair instead of the 7 of tile_backward_kv + tile_backward_q (which recomputes S and dP).
// Each dQ_m receives its key tiles in ascending order, as tile_backward_q takes them from the
// (ascending) forward schedule, through the same products on the same inputs: the two ways give the
// same bits, so the driver may pick either.
void tile_backward_head(const AttentionParams& p, const BackwardParams& g, const Segment& sg, int kv_head,
                        const float* packed, Workspace& ws) {
  const int BM = p.block_m, BN = p.block_n, D = p.head_dim, Dp = round_up(D, L), group = p.group(), b = sg.b;
  const int num_m = (sg.nq + BM - 1) / BM, num_n = (sg.nk + BN - 1) / BN;
  const int64_t tile_floats = packed_tile_floats(p), dq_floats = int64_t(group) * num_m * BM * Dp;
  float* own = ws.floats(size_t(tile_floats + dq_floats + 3 * BN * BM + 4 * BN * Dp + L * Dp));
  float* dq_all = own + tile_floats;
  float* st = dq_all + dq_floats;
  float* dpt = st + BN * BM;
  float* chain = dpt + BN * BM;
  float* kbuf = chain + BN * BM;
  float* vbuf = kbuf + BN * Dp;
  float* dk = vbuf + BN * Dp;
  float* dv = dk + BN * Dp;
  float* tmp = dv + BN * Dp;

  fill(dq_all, dq_floats, 0.f);
  const ScheduleView& schedule = p.backward_schedule;
  for (int n = 0; n < num_n; ++n) {
    const int j0 = n * BN, nk = imin(BN, sg.nk - j0), row = sg.k_row0 + n;
    const RowsView k = kv_rows(p.dtype, p.k, p.k_strides, b, kv_head, sg.k0 + j0, nk, D, Dp, true, kbuf);
    const RowsView v = kv_rows(p.dtype, p.v, p.v_strides, b, kv_head, sg.k0 + j0, nk, D, Dp, false, vbuf);
    fill(dk, BN * Dp, 0.f);
    fill(dv, BN * Dp, 0.f);
    for (int gi = 0; gi < group; ++gi) {
      const int h = kv_head * group + gi;
      const float slope = p.alibi(sg.seq, h);
      const int count = schedule.num_tiles(b, h, row);
      for (int t = 0; t < count; ++t) {
        const int m = schedule.tile(b, h, row, t);
        const int i0 = m * BM, rows = imin(BM, sg.nq - i0), Y = round_up(rows, L);
        PackedTile tile;
        if (packed) {
          tile = driver_tile(p, packed, sg, h, m);
        } else {
          tile = packed_tile(p, own);
          pack_query_tile(p, g, sg, h, m, tile, tmp);
        }
        gemm(nk, Y, D, k.data, k.ld, 1, tile.qt, BM, st, BM, false);  // Sᵀ = K·q̃ᵀ
        score_tile(p, slope, sg.shift(), i0, rows, Y, j0, nk, st, p.softcap != 0.f ? chain : nullptr, BM);
        gemm(nk, Y, D, v.data, v.ld, 1, tile.do_t, BM, dpt, BM, false);  // dPᵀ = V·dOᵀ
        probs_and_score_grads(p, nk, Y, st, dpt, p.softcap != 0.f ? chain : nullptr, tile, g.entropy != nullptr, BM,
                              true, p.dropout_index(b, h, sg.q0 + i0, sg.k0 + j0));
        gemm(nk, Dp, rows, st, BM, 1, tile.do_rows, Dp, dv, Dp, true);   // dV += Pᵀ·dO
        gemm(nk, Dp, rows, dpt, BM, 1, tile.q_rows, Dp, dk, Dp, true);   // dK += dSᵀ·Q
        gemm(rows, Dp, nk, dpt, 1, BM, k.data, k.ld, dq_all + (int64_t(gi) * num_m + m) * BM * Dp, Dp,
             true);  // dQ += dS·K
      }
    }
    store_rows(p.dtype, g.dk, g.dk_strides, b, kv_head, sg.k0 + j0, nk, D, dk, Dp);
    store_rows(p.dtype, g.dv, g.dv_strides, b, kv_head, sg.k0 + j0, nk, D, dv, Dp);
  }
  for (int gi = 0; gi < group; ++gi)
    for (int m = 0; m < num_m; ++m) {
      const int i0 = m * BM, rows = imin(BM, sg.nq - i0);
      store_rows(p.dtype, g.dq, g.dq_strides, b, kv_head * group + gi, sg.q0 + i0, rows, D,
                 dq_all + (int64_t(gi) * num_m + m) * BM * Dp, Dp);
    }
}

// Tile engine, backward for query tile m of (segment, h) over the forward schedule (a separate pass,
// so dQ needs no atomics either):  dQ_i = Σ_j dS_ij·k_j
void tile_backward_q(const AttentionParams& p, const BackwardParams& g, const Segment& sg, int h, int m,
                     const float* packed, Workspace& ws) {
  const int BM = p.block_m, BN = p.block_n, D = p.head_dim, Dp = round_up(D, L), b = sg.b;
  const int i0 = m * BM, rows = imin(BM, sg.nq - i0), Y = round_up(rows, L);
  const int kv_head = h / p.group();
  const int64_t tile_floats = packed_tile_floats(p);
  float* own = ws.floats(size_t(tile_floats + 3 * BN * BM + 2 * BN * Dp + BM * Dp + L * Dp));
  float* st = own + tile_floats;
  float* dpt = st + BN * BM;
  float* chain = dpt + BN * BM;
  float* kbuf = chain + BN * BM;
  float* vbuf = kbuf + BN * Dp;
  float* dq = vbuf + BN * Dp;
  float* tmp = dq + BM * Dp;

  PackedTile tile;
  if (packed) {
    tile = driver_tile(p, packed, sg, h, m);
  } else {
    tile = packed_tile(p, own);
    pack_query_tile(p, g, sg, h, m, tile, tmp);
  }
  fill(dq, BM * Dp, 0.f);
  const float slope = p.alibi(sg.seq, h);
  const ScheduleView& schedule = p.forward_schedule;
  const int row = sg.q_row0 + m, count = schedule.num_tiles(b, h, row);
  for (int t = 0; t < count; ++t) {
    const int j0 = schedule.tile(b, h, row, t) * BN, nk = imin(BN, sg.nk - j0);
    const RowsView k = kv_rows(p.dtype, p.k, p.k_strides, b, kv_head, sg.k0 + j0, nk, D, Dp, true, kbuf);
    const RowsView v = kv_rows(p.dtype, p.v, p.v_strides, b, kv_head, sg.k0 + j0, nk, D, Dp, false, vbuf);
    gemm(nk, Y, D, k.data, k.ld, 1, tile.qt, BM, st, BM, false);  // Sᵀ = K·q̃ᵀ
    score_tile(p, slope, sg.shift(), i0, rows, Y, j0, nk, st, p.softcap != 0.f ? chain : nullptr, BM);
    gemm(nk, Y, D, v.data, v.ld, 1, tile.do_t, BM, dpt, BM, false);  // dPᵀ = V·dOᵀ
    probs_and_score_grads(p, nk, Y, st, dpt, p.softcap != 0.f ? chain : nullptr, tile, g.entropy != nullptr, BM, true,
                          p.dropout_index(b, h, sg.q0 + i0, sg.k0 + j0));
    gemm(rows, Dp, nk, dpt, 1, BM, k.data, k.ld, dq, Dp, true);  // dQ += dS·K
  }
  store_rows(p.dtype, g.dq, g.dq_strides, b, h, sg.q0 + i0, rows, D, dq, Dp);
}

}  // namespace FL_ISA
}  // namespace cpu
}  // namespace flashlite
