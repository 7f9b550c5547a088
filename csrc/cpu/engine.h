// The CPU kernels, written once and compiled per instruction set.
//
// Included by isa_*.cpp after prelude.h and inside a target region, with FL_ISA (namespace and
// name), FL_LANES (floats per vector register) and FL_MR (micro-kernel rows) defined. Only
// functions of namespace flashlite::cpu::FL_ISA are defined here, so no code compiled for one
// instruction set is shared with another build.
//
// A tile computation keeps everything in float32, query-major along the vector dimension:
//   q̃ᵀ [Dp][BM]  the query tile transposed and pre-scaled (scale·log2e; scale alone with softcap),
//   Sᵀ [BN][BM]  scores of key c (row) against query r: the softmax's per-query max and sum are
//                element-wise vector operations down the rows,
//   Oᵀ [Dp][BM]  the output accumulator.
// One register-blocked micro-kernel computes every product (forward and backward):
//   C[x][y] (+)= Σ_k A(x, k)·B[k][y], with B and C rows contiguous along y and A read as scalars.
// Scores are carried in base 2 (s·log2e) so the softmax uses 2^x; lse is returned in natural units.

namespace flashlite {
namespace cpu {
namespace FL_ISA {

#define FL_ALWAYS_INLINE inline __attribute__((always_inline))
constexpr int L = FL_LANES;
constexpr int MR = FL_MR;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_inff();

typedef float vf __attribute__((vector_size(L * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(L * sizeof(int32_t))));
typedef int64_t vi64 __attribute__((vector_size(L * sizeof(float))));  // L/2 64-bit lanes
typedef uint64_t vu64 __attribute__((vector_size(L * sizeof(float))));
typedef float vfh __attribute__((vector_size(L / 2 * sizeof(float))));
typedef int32_t vih __attribute__((vector_size(L / 2 * sizeof(int32_t))));
constexpr int L64 = L / 2;
typedef float vf_unaligned __attribute__((vector_size(L * sizeof(float)), aligned(4), may_alias));

inline vf load(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vf_unaligned*>(p) = x; }
inline vf splat(float x) { return vf{} + x; }
inline vf select(vi mask, vf a, vf b) { return mask ? a : b; }
inline vf vmax(vf a, vf b) { return select(a > b, a, b); }
inline vi splat_int(int x) { return vi{} + x; }
inline vi iota() {
  vi v;
  for (int i = 0; i < L; ++i) v[i] = i;
  return v;
}
inline float hsum(vf x) {  // fixed order: deterministic
  float s = 0.f;
  for (int i = 0; i < L; ++i) s += x[i];
  return s;
}
inline float hmax(vf x) {
  float m = x[0];
  for (int i = 1; i < L; ++i) m = x[i] > m ? x[i] : m;
  return m;
}
inline int imin(int a, int b) { return a < b ? a : b; }
inline int round_up(int n, int to) { return (n + to - 1) / to * to; }
inline int64_t offset(const Strides3& s, int b, int h, int64_t i) { return b * s.batch + h * s.head + i * s.row; }

// 2^x: x = n + f with n = round(x), |f| <= 1/2; 2^f by Cephes' exp2f polynomial (relative error
// about 2e-7), 2^n by writing the exponent bits. x < -126 (and -inf) gives exactly 0.
inline vf exp2v(vf x) {
  const vf lo = splat(-126.f), hi = splat(127.f);
  const vf xc = select(x < lo, lo, select(x > hi, hi, x));
  const vf magic = splat(12582912.f);  // 1.5·2^23: (x + magic) − magic rounds x to an integer
  const vf n = (xc + magic) - magic;
  const vf f = xc - n;
  vf poly = splat(1.535336188319500e-4f);
  poly = poly * f + 1.339887440266574e-3f;
  poly = poly * f + 9.618437357674640e-3f;
  poly = poly * f + 5.550332471162809e-2f;
  poly = poly * f + 2.402264791363012e-1f;
  poly = poly * f + 6.931472028550421e-1f;
  poly = poly * f + 1.f;
  const vi exponent = (__builtin_convertvector(n, vi) + 127) << 23;
  return select(x < lo, splat(0.f), poly * (vf)exponent);
}

// tanh(y): odd Taylor polynomial for |y| < 1/4 (error < 1e-9), else 1 − 2/(e^{2y} + 1).
inline vf tanhv(vf y) {
  const vf y2 = y * y;
  vf small = splat(62.f / 2835.f);
  small = small * y2 - 17.f / 315.f;
  small = small * y2 + 2.f / 15.f;
  small = small * y2 - 1.f / 3.f;
  small = small * y2 * y + y;
  const vf large = 1.f - 2.f / (exp2v(y * (2.f * kLog2e)) + 1.f);
  return select(select(y < 0.f, -y, y) < 0.25f, small, large);
}

// ---------------------------------------------------------------------------------------------
// Micro-kernel: C[x][y] (+)= Σ_k A(x, k)·B[k][y] for x < R, y < NV·L, A(x, k) = a[x·a_x + k·a_k].
// R×NV accumulator vectors stay in registers; each step loads NV vectors of B and broadcasts R
// scalars of A.
template <int R, int NV>
inline void gemm_block(int depth, const float* a, int64_t a_x, int64_t a_k, const float* b, int64_t b_k, float* c,
                       int64_t c_x, bool accumulate) {
  vf acc[R][NV];
#pragma GCC unroll 16
  for (int x = 0; x < R; ++x)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[x][v] = accumulate ? load(c + x * c_x + v * L) : vf{};
  for (int k = 0; k < depth; ++k) {
    vf bk[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bk[v] = load(b + k * b_k + v * L);
#pragma GCC unroll 16
    for (int x = 0; x < R; ++x) {
      const vf ax = splat(a[x * a_x + k * a_k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[x][v] += ax * bk[v];
    }
  }
#pragma GCC unroll 16
  for (int x = 0; x < R; ++x)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(c + x * c_x + v * L, acc[x][v]);
}

template <int NV>
inline void gemm_panel(int X, int depth, const float* a, int64_t a_x, int64_t a_k, const float* b, int64_t b_k,
                       float* c, int64_t c_x, bool accumulate) {
  int x = 0;
  for (; x + MR <= X; x += MR) gemm_block<MR, NV>(depth, a + x * a_x, a_x, a_k, b, b_k, c + x * c_x, c_x, accumulate);
  for (; x + 4 <= X; x += 4) gemm_block<4, NV>(depth, a + x * a_x, a_x, a_k, b, b_k, c + x * c_x, c_x, accumulate);
  for (; x + 2 <= X; x += 2) gemm_block<2, NV>(depth, a + x * a_x, a_x, a_k, b, b_k, c + x * c_x, c_x, accumulate);
  for (; x < X; ++x) gemm_block<1, NV>(depth, a + x * a_x, a_x, a_k, b, b_k, c + x * c_x, c_x, accumulate);
}

// The whole product for x < X, y < Y (Y a multiple of L), in panels of 2·L columns of B/C.
inline void gemm(int X, int Y, int depth, const float* a, int64_t a_x, int64_t a_k, const float* b, int64_t b_k,
                 float* c, int64_t c_x, bool accumulate) {
  int y = 0;
  for (; y + 2 * L <= Y; y += 2 * L) gemm_panel<2>(X, depth, a, a_x, a_k, b + y, b_k, c + y, c_x, accumulate);
  if (y < Y) gemm_panel<1>(X, depth, a, a_x, a_k, b + y, b_k, c + y, c_x, accumulate);
}

inline void axpy(float alpha, const float* x, float* y, int n) {  // y += alpha·x, n a multiple of L
  const vf a = splat(alpha);
  for (int d = 0; d < n; d += L) store(y + d, load(y + d) + a * load(x + d));
}

// Lane sums of L vectors at once: out[t] = Σ_l acc[t][l], by a fixed pairwise tree (deterministic).
// One step merges two vectors holding keys in blocks of W lanes into one with blocks of W/2:
// out = (lower halves of each block of a, then of b) + (upper halves likewise).
template <int W, int... J>
inline vf merge_halves(vf a, vf b, std::integer_sequence<int, J...>) {
#define FL_LANE(j, up) (((j) < L / 2 ? 0 : L) + ((j) % (L / 2)) / (W / 2) * W + ((j) % (L / 2)) % (W / 2) + (up))
#if defined(__clang__)
  return __builtin_shufflevector(a, b, FL_LANE(J, 0)...) + __builtin_shufflevector(a, b, FL_LANE(J, W / 2)...);
#else
  return __builtin_shuffle(a, b, vi{FL_LANE(J, 0)...}) + __builtin_shuffle(a, b, vi{FL_LANE(J, W / 2)...});
#endif
#undef FL_LANE
}
template <int W>
inline vf reduce_lanes(vf* acc, int count) {
#pragma GCC unroll 16
  for (int i = 0; i < count / 2; ++i)
    acc[i] = merge_halves<W>(acc[2 * i], acc[2 * i + 1], std::make_integer_sequence<int, L>());
  if constexpr (W > 2) {
    return reduce_lanes<W / 2>(acc, count / 2);
  } else {
    return acc[0];
  }
}

// out[t] = x · rows[t] for t < L (rows of Dp floats; Dp a multiple of L).
FL_ALWAYS_INLINE vf dots(const float* x, const float* const* rows, int Dp) {
  vf acc[L];
#pragma GCC unroll 16
  for (int t = 0; t < L; ++t) {
    const float* row = rows[t];
    vf sum = load(x) * load(row);
    for (int d = L; d < Dp; d += L) sum += load(x + d) * load(row + d);
    acc[t] = sum;
  }
  if constexpr (L == 1) {
    return acc[0];
  } else {
    return reduce_lanes<L>(acc, L);
  }
}

// y[0:Dp] += Σ_t w[t]·rows[t] for t < count: NC vectors of y stay in registers over all rows.
template <int NC>
inline void weighted_rows_block(const float* w, const float* const* rows, int count, int d0, float* y) {
  vf acc[NC];
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) acc[c] = load(y + d0 + c * L);
  for (int t = 0; t < count; ++t) {
    const vf wt = splat(w[t]);
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) acc[c] += wt * load(rows[t] + d0 + c * L);
  }
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) store(y + d0 + c * L, acc[c]);
}
inline void weighted_rows(const float* w, const float* const* rows, int count, int Dp, float* y) {
  int d = 0;
  for (; d + 4 * L <= Dp; d += 4 * L) weighted_rows_block<4>(w, rows, count, d, y);
  for (; d < Dp; d += L) weighted_rows_block<1>(w, rows, count, d, y);
}
inline void fill(float* x, int n, float value) {
  for (int i = 0; i < n; ++i) x[i] = value;
}

// ---------------------------------------------------------------------------------------------
// Packing (conversion to float32 happens here, one tile at a time).

// The factor folded into packed queries: scores come out in log2 units without softcap, or
// scaled natural units for the softcap's tanh.
inline float query_factor(const AttentionParams& p) { return p.softcap != 0.f ? p.scale : p.scale * kLog2e; }

// Rows i0 .. i0+rows of a [B, H, N, D] tensor: transposed and scaled into out_t[d][r] (column
// stride ld_t), and/or row-major unscaled into out_rows[r][d] (stride Dp, zero past D). Rows
// rows ≤ r < Y are zero.
inline void pack_rows(DType dtype, const void* base, const Strides3& s, int b, int h, int i0, int rows, int Y, int D,
                      int Dp, float factor, float* out_t, int ld_t, float* out_rows, float* tmp) {
  // L rows at a time through tmp [L][Dp] (Y is a multiple of L): each column of out_t then gets
  // one vector store instead of L single floats in L different cache lines.
  for (int r0 = 0; r0 < Y; r0 += L) {
    for (int x = 0; x < L; ++x) {
      const int r = r0 + x;
      float* row = tmp + x * Dp;
      if (r < rows) {
        load_row(dtype, base, offset(s, b, h, i0 + r), D, row);
      } else {
        fill(row, D, 0.f);
      }
      if (out_rows) {
        for (int d = 0; d < D; ++d) out_rows[r * Dp + d] = row[d];
        fill(out_rows + r * Dp + D, Dp - D, 0.f);
      }
    }
    if (out_t)
      for (int d = 0; d < D; ++d) {
        vf column;
        for (int x = 0; x < L; ++x) column[x] = tmp[x * Dp + d];
        store(out_t + d * ld_t + r0, column * factor);
      }
  }
}

struct RowsView {
  const float* data;
  int64_t ld;
};

// Rows j0 .. j0+n of k or v for (b, kv head) as float32 rows: the tensor itself when it is
// float32 (and, if `vector_rows`, its rows can be read as whole vectors), else converted into
// buf [n][Dp], zero past D.
inline RowsView kv_rows(DType dtype, const void* base, const Strides3& s, int b, int h, int j0, int n, int D, int Dp,
                        bool vector_rows, float* buf) {
  if (dtype == DType::kFloat32 && (!vector_rows || D == Dp))
    return {static_cast<const float*>(base) + offset(s, b, h, j0), s.row};
  for (int c = 0; c < n; ++c) {
    load_row(dtype, base, offset(s, b, h, j0 + c), D, buf + c * Dp);
    fill(buf + c * Dp + D, Dp - D, 0.f);
  }
  return {buf, Dp};
}

// One row as float32 vectors (length Dp): in place if float32 with D == Dp, else copied to buf.
inline const float* vector_row(DType dtype, const void* base, int64_t off, int D, int Dp, float* buf) {
  if (dtype == DType::kFloat32 && D == Dp) return static_cast<const float*>(base) + off;
  load_row(dtype, base, off, D, buf);
  fill(buf + D, Dp - D, 0.f);
  return buf;
}

inline void store_transposed(DType dtype, void* base, const Strides3& s, int b, int h, int i0, int rows, int D,
                             const float* src_t, int ld_t, const float* row_scale, float* tmp) {
  for (int r = 0; r < rows; ++r) {
    const float f = row_scale ? row_scale[r] : 1.f;
    for (int d = 0; d < D; ++d) tmp[d] = src_t[d * ld_t + r] * f;
    store_row(dtype, base, offset(s, b, h, i0 + r), D, tmp);
  }
}

inline void store_rows(DType dtype, void* base, const Strides3& s, int b, int h, int i0, int rows, int D,
                       const float* src, int ld) {
  for (int r = 0; r < rows; ++r) store_row(dtype, base, offset(s, b, h, i0 + r), D, src + r * ld);
}

// One query row q̃ = q·factor as Dp floats (zero past D).
inline void pack_query_row(const AttentionParams& p, const void* base, const Strides3& strides, int b, int h, int i,
                           float factor, float* out) {
  const int D = p.head_dim, Dp = round_up(D, L);
  if (p.dtype == DType::kFloat32 && D % L == 0) {  // whole vectors: no copy call, no second pass
    const float* row = static_cast<const float*>(base) + offset(strides, b, h, i);
    for (int d = 0; d < D; d += L) store(out + d, load(row + d) * factor);
    return;
  }
  load_row(p.dtype, base, offset(strides, b, h, i), D, out);
  if (factor != 1.f)
    for (int d = 0; d < D; ++d) out[d] *= factor;
  fill(out + D, Dp - D, 0.f);
}

// Row i of a [B, H, N, D] output = acc[0:D]·factor (acc is Dp floats, scaled in place).
inline void store_scaled_row(const AttentionParams& p, void* base, const Strides3& strides, int b, int h, int i,
                             float* acc, float factor) {
  const int D = p.head_dim;
  if (p.dtype == DType::kFloat32 && D % L == 0) {  // whole vectors: no copy call
    float* row = static_cast<float*>(base) + offset(strides, b, h, i);
    for (int d = 0; d < D; d += L) store(row + d, load(acc + d) * factor);
    return;
  }
  for (int d = 0; d < D; ++d) acc[d] *= factor;
  store_row(p.dtype, base, offset(strides, b, h, i), D, acc);
}

// ---------------------------------------------------------------------------------------------
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

// Scores of one tile, in place on Sᵀ[c][r] (keys j0 + c, c < nk; queries i0 + r, r < Y), from
// x = q̃·k:
//   softcap:  t = tanh(x/cap),  s = log2e·(cap·t − slope·|p(i) − j|),  chain[c][r] = 1 − t²
//   no cap:   s = x − log2e·slope·|p(i) − j|
//   outside the band p(i) − left ≤ j ≤ p(i) + right:  s = −inf
// A tile wholly inside the band skips the mask.
inline void score_tile(const AttentionParams& p, float slope, int i0, int rows, int Y, int j0, int nk, float* st,
                       float* chain, int ld) {
  const float cap = p.softcap;
  const int pos0 = i0 + p.seqlen_k - p.seqlen_q;
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

// ---------------------------------------------------------------------------------------------
// Tile engine, forward: query tile m of (b, h) over the key tiles of its schedule row.
void tile_forward(const AttentionParams& p, int b, int h, int m, Workspace& ws) {
  const int BM = p.block_m, BN = p.block_n, D = p.head_dim, Dp = round_up(D, L);
  const int i0 = m * BM, rows = imin(BM, p.seqlen_q - i0), Y = round_up(rows, L);
  const int kv_head = h / p.group();
  float* qt = ws.floats(size_t(2 * Dp * BM + BN * BM + 2 * BN * Dp + 3 * BM + L * Dp));
  float* ot = qt + Dp * BM;
  float* st = ot + Dp * BM;
  float* kbuf = st + BN * BM;
  float* vbuf = kbuf + BN * Dp;
  float* row_max = vbuf + BN * Dp;
  float* row_sum = row_max + BM;
  float* alpha = row_sum + BM;
  float* tmp = alpha + BM;

  pack_rows(p.dtype, p.q, p.q_strides, b, h, i0, rows, Y, D, Dp, query_factor(p), qt, BM, nullptr, tmp);
  fill(ot, D * BM, 0.f);
  fill(row_max, BM, -kInf);
  fill(row_sum, BM, 0.f);
  const float slope = p.alibi(b, h);
  const ScheduleView& schedule = p.forward_schedule;
  const int count = schedule.num_tiles(b, h, m);
  for (int t = 0; t < count; ++t) {
    const int j0 = schedule.tile(b, h, m, t) * BN, nk = imin(BN, p.seqlen_k - j0);
    const RowsView k = kv_rows(p.dtype, p.k, p.k_strides, b, kv_head, j0, nk, D, Dp, false, kbuf);
    const RowsView v = kv_rows(p.dtype, p.v, p.v_strides, b, kv_head, j0, nk, D, Dp, false, vbuf);
    // Sᵀ[c][r] = Σ_d k[j0 + c][d]·q̃[i0 + r][d]
    gemm(nk, Y, D, k.data, k.ld, 1, qt, BM, st, BM, false);
    score_tile(p, slope, i0, rows, Y, j0, nk, st, nullptr, BM);
    // Online softmax, per query r (vectors along r):
    //   m' = max(m, max_c s[c][r]),  α = 2^(m − m'),  P[c][r] = 2^(s[c][r] − m'),  l' = α·l + Σ_c P[c][r]
    // A row with no visible key so far keeps m = −inf; 0 stands in for it so 2^(−inf − 0) = 0.
    for (int y = 0; y < Y; y += L) {
      const vf m_old = load(row_max + y);
      vf m_new = m_old;
      for (int c = 0; c < nk; ++c) m_new = vmax(m_new, load(st + c * BM + y));
      const vf m_use = select(m_new == -kInf, splat(0.f), m_new);
      vf sum = {};
      for (int c = 0; c < nk; ++c) {
        const vf prob = exp2v(load(st + c * BM + y) - m_use);
        store(st + c * BM + y, prob);
        sum += prob;
      }
      const vf a = exp2v(m_old - m_use);
      store(alpha + y, a);
      store(row_sum + y, load(row_sum + y) * a + sum);
      store(row_max + y, m_new);
    }
    // Oᵀ[d][r] = α[r]·Oᵀ[d][r] + Σ_c v[j0 + c][d]·P[c][r]
    for (int d = 0; d < D; ++d)
      for (int y = 0; y < Y; y += L) store(ot + d * BM + y, load(ot + d * BM + y) * load(alpha + y));
    gemm(D, Y, nk, v.data, 1, v.ld, st, BM, ot, BM, true);
  }
  // out = Oᵀ / l,  lse = ln2·(m + log2 l); a row that saw no key (l = 0) gives 0 and −inf.
  float* lse = p.lse + (int64_t(b) * p.heads_q + h) * p.seqlen_q + i0;
  for (int r = 0; r < rows; ++r) {
    const float l = row_sum[r];
    lse[r] = l > 0.f ? (row_max[r] + log2f(l)) * kLn2 : -kInf;
    alpha[r] = l > 0.f ? 1.f / l : 0.f;
  }
  store_transposed(p.dtype, p.out, p.out_strides, b, h, i0, rows, D, ot, BM, alpha, tmp);
}

// Tile engine, forward, for a few query rows (decode): query tile m of heads h_first ..
// h_first + heads − 1 (one KV head's group sharing a schedule row) over key tiles
// [tile_begin, tile_end) of that row, one query row at a time with the keys along the vector
// lanes: the query-major kernel above would fill 1 of its L lanes per row. Each key tile is
// loaded once for all rows. Per row r and key tile (keys j0 + c, c < nk), in log2 units:
//   s_c = score(q̃_r·k_c) (−inf outside the band),  m' = max(m, max_c s_c),  α = 2^(m − m'),
//   P_c = 2^(s_c − m'),  l' = α·l + Σ_c P_c,  acc' = α·acc + Σ_c P_c·v_c
// The state of row r is a record of row_record_floats floats, [acc (Dp) | m | l | pad]. With
// `partials`, the records are left there (a split of the keys, merged by
// tile_forward_rows_merge); without, out_r = acc / l and lse_r = ln2·(m + log2 l) are written (a
// row that saw no key: 0 and −inf).
inline int row_record_floats(const AttentionParams& p) { return decode_record_floats(p.head_dim, L); }

inline void finish_row(const AttentionParams& p, int b, int h, int i, float* record, float row_max, float row_sum) {
  p.lse[(int64_t(b) * p.heads_q + h) * p.seqlen_q + i] = row_sum > 0.f ? (row_max + log2f(row_sum)) * kLn2 : -kInf;
  store_scaled_row(p, p.out, p.out_strides, b, h, i, record, row_sum > 0.f ? 1.f / row_sum : 0.f);
}

void tile_forward_rows(const AttentionParams& p, int b, int h_first, int heads, int m, int tile_begin, int tile_end,
                       float* partials, Workspace& ws) {
  const int BM = p.block_m, BN = p.block_n, BNp = round_up(BN, L), D = p.head_dim, Dp = round_up(D, L);
  const int i0 = m * BM, rows = imin(BM, p.seqlen_q - i0), R = heads * rows, W = row_record_floats(p);
  const int kv_head = h_first / p.group();
  float* q_rows = ws.floats(size_t(R * (Dp + W) + 2 * BNp * Dp + BNp + Dp));
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
  }
  const float cap = p.softcap;
  const ScheduleView& schedule = p.forward_schedule;
  for (int t = tile_begin; t < tile_end; ++t) {
    const int j0 = schedule.tile(b, h_first, m, t) * BN, nk = imin(BN, p.seqlen_k - j0), nkp = round_up(nk, L);
    const RowsView k = kv_rows(p.dtype, p.k, p.k_strides, b, kv_head, j0, nk, D, Dp, true, kbuf);
    const RowsView v = kv_rows(p.dtype, p.v, p.v_strides, b, kv_head, j0, nk, D, Dp, true, vbuf);
    for (int c = 0; c < nkp; ++c) {
      keys[c] = c < nk ? k.data + c * k.ld : zero;
      values[c] = c < nk ? v.data + c * v.ld : zero;
    }
    for (int r = 0; r < R; ++r) {
      const int h = h_first + r / rows, pos = i0 + r % rows + p.seqlen_k - p.seqlen_q;
      const float slope = p.alibi(b, h), slope_units = cap != 0.f ? slope : slope * kLog2e;
      vf tile_max = splat(-kInf);
      for (int c0 = 0; c0 < nkp; c0 += L) {
        const vi dist = splat_int(pos - j0 - c0) - iota();  // p(i) − j for keys j0 + c0 + lane
        const vf x = dots(q_rows + r * Dp, keys + c0, Dp);
        const vf sc = select(in_band(p, dist) & (iota() < nk - c0), score_lanes(x, dist, cap, slope_units, nullptr),
                             splat(-kInf));
        store(s + c0, sc);
        tile_max = vmax(tile_max, sc);
      }
      float* record = records + r * W;
      const float m_old = record[Dp], m_new = fmaxf(m_old, hmax(tile_max));
      if (m_new == -kInf) continue;  // nothing visible yet
      vf sum = {};
      for (int c0 = 0; c0 < nkp; c0 += L) {
        const vf prob = exp2v(load(s + c0) - m_new);
        store(s + c0, prob);
        sum += prob;
      }
      const float alpha = m_old == -kInf ? 0.f : exp2f(m_old - m_new);
      record[Dp + 1] = record[Dp + 1] * alpha + hsum(sum);
      record[Dp] = m_new;
      if (alpha != 1.f)
        for (int d = 0; d < Dp; d += L) store(record + d, load(record + d) * alpha);
      weighted_rows(s, values, nk, Dp, record);
    }
  }
  if (partials) return;
  for (int r = 0; r < R; ++r) {
    float* record = records + r * W;
    finish_row(p, b, h_first + r / rows, i0 + r % rows, record, record[Dp], record[Dp + 1]);
  }
}

// Merge of a decode split: row r's records of the `splits` key ranges (records of split s at
// partials + (s·R + r)·W), in split order:
//   M = max_s m_s,  w_s = 2^(m_s − M),  l = Σ_s w_s·l_s,  out = Σ_s w_s·acc_s / l,  lse = ln2·(M + log2 l)
void tile_forward_rows_merge(const AttentionParams& p, int b, int h_first, int heads, int m, int splits,
                             const float* partials, Workspace& ws) {
  const int Dp = round_up(p.head_dim, L), i0 = m * p.block_m, rows = imin(p.block_m, p.seqlen_q - i0);
  const int R = heads * rows, W = row_record_floats(p);
  float* merged = ws.floats(size_t(Dp));
  for (int r = 0; r < R; ++r) {
    float top = -kInf;
    for (int sp = 0; sp < splits; ++sp) top = fmaxf(top, partials[(sp * R + r) * W + Dp]);
    fill(merged, Dp, 0.f);
    float sum = 0.f;
    if (top != -kInf) {
      for (int sp = 0; sp < splits; ++sp) {
        const float* record = partials + (sp * R + r) * W;
        if (record[Dp] == -kInf) continue;  // this split saw no key of the row
        const float weight = exp2f(record[Dp] - top);
        sum += weight * record[Dp + 1];
        axpy(weight, record, merged, Dp);
      }
    }
    finish_row(p, b, h_first + r / rows, i0 + r % rows, merged, top, sum);
  }
}

// Backward helpers: a query tile's lse in log2 units (+inf for a row with no key, so that every
// P = 2^(s − lse) is 0) and its δ = Σ_d dO·O; padded rows get +inf and 0.
inline void pack_row_stats(const AttentionParams& p, const BackwardParams& g, int b, int h, int i0, int rows, int Y,
                           float* lse2, float* delta) {
  const int64_t base = (int64_t(b) * p.heads_q + h) * p.seqlen_q + i0;
  for (int r = 0; r < Y; ++r) {
    const float lse = r < rows ? p.lse[base + r] : -kInf;
    lse2[r] = lse == -kInf ? kInf : lse * kLog2e;
    delta[r] = r < rows ? g.delta[base + r] : 0.f;
  }
}

// P, then dS in place of dPᵀ:  P[c][r] = 2^(s[c][r] − lse_r),  dS = P ⊙ (dP − δ_r) ⊙ chain · scale
// (chain = 1 − tanh² with softcap, else 1).
inline void probs_and_score_grads(const AttentionParams& p, int nk, int Y, float* st, float* dpt, const float* chain,
                                  const float* lse2, const float* delta, int ld, bool grads) {
  const vf scale = splat(p.scale);
  for (int c = 0; c < nk; ++c) {
    for (int y = 0; y < Y; y += L) {
      const vf prob = exp2v(load(st + c * ld + y) - load(lse2 + y));
      store(st + c * ld + y, prob);
      if (grads) {
        vf ds = prob * (load(dpt + c * ld + y) - load(delta + y)) * scale;
        if (chain) ds *= load(chain + c * ld + y);
        store(dpt + c * ld + y, ds);
      }
    }
  }
}

// Tile engine, backward for key tile n of (b, kv head): over every query head of the GQA group
// and the query tiles of the transposed schedule (no atomics: this item owns these dK/dV rows).
//   dV_j = Σ_i P_ij·dO_i,   dP_ij = dO_i·v_j,   dS_ij = P_ij (dP_ij − δ_i)·chain·scale,   dK_j = Σ_i dS_ij·q_i
void tile_backward_kv(const AttentionParams& p, const BackwardParams& g, int b, int kv_head, int n, Workspace& ws) {
  const int BM = p.block_m, BN = p.block_n, D = p.head_dim, Dp = round_up(D, L), group = p.group();
  const int j0 = n * BN, nk = imin(BN, p.seqlen_k - j0);
  float* qt = ws.floats(size_t(4 * Dp * BM + 3 * BN * BM + 4 * BN * Dp + 2 * BM + L * Dp));
  float* q_rows = qt + Dp * BM;
  float* do_t = q_rows + BM * Dp;
  float* do_rows = do_t + Dp * BM;
  float* st = do_rows + BM * Dp;
  float* dpt = st + BN * BM;
  float* chain = dpt + BN * BM;
  float* kbuf = chain + BN * BM;
  float* vbuf = kbuf + BN * Dp;
  float* dk = vbuf + BN * Dp;
  float* dv = dk + BN * Dp;
  float* lse2 = dv + BN * Dp;
  float* delta = lse2 + BM;
  float* tmp = delta + BM;

  const RowsView k = kv_rows(p.dtype, p.k, p.k_strides, b, kv_head, j0, nk, D, Dp, false, kbuf);
  const RowsView v = kv_rows(p.dtype, p.v, p.v_strides, b, kv_head, j0, nk, D, Dp, false, vbuf);
  fill(dk, BN * Dp, 0.f);
  fill(dv, BN * Dp, 0.f);
  const ScheduleView& schedule = p.backward_schedule;
  for (int gi = 0; gi < group; ++gi) {
    const int h = kv_head * group + gi;
    const float slope = p.alibi(b, h);
    const int count = schedule.num_tiles(b, h, n);
    for (int t = 0; t < count; ++t) {
      const int i0 = schedule.tile(b, h, n, t) * BM, rows = imin(BM, p.seqlen_q - i0), Y = round_up(rows, L);
      pack_rows(p.dtype, p.q, p.q_strides, b, h, i0, rows, Y, D, Dp, query_factor(p), qt, BM, q_rows, tmp);
      pack_rows(p.dtype, g.grad_out, g.grad_out_strides, b, h, i0, rows, Y, D, Dp, 1.f, do_t, BM, do_rows, tmp);
      pack_row_stats(p, g, b, h, i0, rows, Y, lse2, delta);
      gemm(nk, Y, D, k.data, k.ld, 1, qt, BM, st, BM, false);  // Sᵀ = K·q̃ᵀ
      score_tile(p, slope, i0, rows, Y, j0, nk, st, p.softcap != 0.f ? chain : nullptr, BM);
      gemm(nk, Y, D, v.data, v.ld, 1, do_t, BM, dpt, BM, false);  // dPᵀ = V·dOᵀ
      probs_and_score_grads(p, nk, Y, st, dpt, p.softcap != 0.f ? chain : nullptr, lse2, delta, BM, true);
      gemm(nk, Dp, rows, st, BM, 1, do_rows, Dp, dv, Dp, true);   // dV += Pᵀ·dO
      gemm(nk, Dp, rows, dpt, BM, 1, q_rows, Dp, dk, Dp, true);   // dK += dSᵀ·Q
    }
  }
  store_rows(p.dtype, g.dk, g.dk_strides, b, kv_head, j0, nk, D, dk, Dp);
  store_rows(p.dtype, g.dv, g.dv_strides, b, kv_head, j0, nk, D, dv, Dp);
}

// Tile engine, backward for query tile m of (b, h) over the forward schedule (a separate pass,
// so dQ needs no atomics either):  dQ_i = Σ_j dS_ij·k_j
void tile_backward_q(const AttentionParams& p, const BackwardParams& g, int b, int h, int m, Workspace& ws) {
  const int BM = p.block_m, BN = p.block_n, D = p.head_dim, Dp = round_up(D, L);
  const int i0 = m * BM, rows = imin(BM, p.seqlen_q - i0), Y = round_up(rows, L);
  const int kv_head = h / p.group();
  float* qt = ws.floats(size_t(2 * Dp * BM + 3 * BN * BM + 2 * BN * Dp + BM * Dp + 2 * BM + L * Dp));
  float* do_t = qt + Dp * BM;
  float* st = do_t + Dp * BM;
  float* dpt = st + BN * BM;
  float* chain = dpt + BN * BM;
  float* kbuf = chain + BN * BM;
  float* vbuf = kbuf + BN * Dp;
  float* dq = vbuf + BN * Dp;
  float* lse2 = dq + BM * Dp;
  float* delta = lse2 + BM;
  float* tmp = delta + BM;

  pack_rows(p.dtype, p.q, p.q_strides, b, h, i0, rows, Y, D, Dp, query_factor(p), qt, BM, nullptr, tmp);
  pack_rows(p.dtype, g.grad_out, g.grad_out_strides, b, h, i0, rows, Y, D, Dp, 1.f, do_t, BM, nullptr, tmp);
  pack_row_stats(p, g, b, h, i0, rows, Y, lse2, delta);
  fill(dq, BM * Dp, 0.f);
  const float slope = p.alibi(b, h);
  const ScheduleView& schedule = p.forward_schedule;
  const int count = schedule.num_tiles(b, h, m);
  for (int t = 0; t < count; ++t) {
    const int j0 = schedule.tile(b, h, m, t) * BN, nk = imin(BN, p.seqlen_k - j0);
    const RowsView k = kv_rows(p.dtype, p.k, p.k_strides, b, kv_head, j0, nk, D, Dp, true, kbuf);
    const RowsView v = kv_rows(p.dtype, p.v, p.v_strides, b, kv_head, j0, nk, D, Dp, false, vbuf);
    gemm(nk, Y, D, k.data, k.ld, 1, qt, BM, st, BM, false);  // Sᵀ = K·q̃ᵀ
    score_tile(p, slope, i0, rows, Y, j0, nk, st, p.softcap != 0.f ? chain : nullptr, BM);
    gemm(nk, Y, D, v.data, v.ld, 1, do_t, BM, dpt, BM, false);  // dPᵀ = V·dOᵀ
    probs_and_score_grads(p, nk, Y, st, dpt, p.softcap != 0.f ? chain : nullptr, lse2, delta, BM, true);
    gemm(rows, Dp, nk, dpt, 1, BM, k.data, k.ld, dq, Dp, true);  // dQ += dS·K
  }
  store_rows(p.dtype, g.dq, g.dq_strides, b, h, i0, rows, D, dq, Dp);
}

// ---------------------------------------------------------------------------------------------
// Gather engine (top-k): each query row attends the keys its index list names.

// The score of one (row, slot) pair from x = q̃·k (see score_tile), in log2 units.
inline float gather_score(const AttentionParams& p, float x, float slope, int64_t dist, float* chain) {
  const float distance = static_cast<float>(dist < 0 ? -dist : dist);
  if (p.softcap != 0.f) {
    const float t = tanhf(x / p.softcap);
    *chain = 1.f - t * t;
    return kLog2e * (p.softcap * t - slope * distance);
  }
  *chain = 1.f;
  return x - kLog2e * slope * distance;
}

inline const int64_t* gather_row_indices(const AttentionParams& p, int b, int kv_head, int i) {
  return p.indices + b * p.indices_stride_b + kv_head * p.indices_stride_h + int64_t(i) * p.indices_stride_n;
}

// Per-row gather state: for each slot t < Kp (K rounded up to L) the float32 key and value rows
// (a zero row for an empty slot, a slot past K, or with causal a key after p(i)), the score
// s[t] (log2 units; −inf where empty), bias[t] (0, or −inf where empty) and the softcap chain.
struct GatherRow {
  const float** keys;
  const float** values;
  float* s;
  float* bias;
  float* chain;
  float* key_buf;    // [Kp][Dp] when k/v need converting
  float* value_buf;  // [Kp][Dp]
  const float* zero;  // [Dp] zeros
};

inline size_t gather_row_floats(const AttentionParams& p) {
  const int Dp = round_up(p.head_dim, L), Kp = round_up(p.top_k, L);
  return size_t(3 * Kp + 2 * Kp * Dp + Dp);
}
inline GatherRow gather_row_alloc(const AttentionParams& p, Workspace& ws, float* floats) {
  const int Dp = round_up(p.head_dim, L), Kp = round_up(p.top_k, L);
  GatherRow row;
  const float** pointers = ws.pointers(size_t(2 * Kp));
  row.keys = pointers;
  row.values = pointers + Kp;
  row.s = floats;
  row.bias = row.s + Kp;
  row.chain = row.bias + Kp;
  row.key_buf = row.chain + Kp;
  row.value_buf = row.key_buf + Kp * Dp;
  float* zero = row.value_buf + Kp * Dp;
  fill(zero, Dp, 0.f);
  row.zero = zero;
  return row;
}

// Scores of query row i (qv: the packed query q̃, Dp floats):  s_t = score(q̃·k_{idx_t}).
// Returns the row's maximum score (−inf if no slot is valid).
inline float gather_row_scores(const AttentionParams& p, int b, int kv_head, int i, const float* qv, float slope,
                               GatherRow& row) {
  const int D = p.head_dim, Dp = round_up(D, L), K = p.top_k, Kp = round_up(K, L);
  const int64_t* idx = gather_row_indices(p, b, kv_head, i);
  const int64_t pos = int64_t(i) + p.seqlen_k - p.seqlen_q;
  const int64_t last = p.causal ? pos : int64_t(p.seqlen_k) - 1;
  const bool direct = p.dtype == DType::kFloat32 && D == Dp;
  const float* k_base = static_cast<const float*>(p.k) + offset(p.k_strides, b, kv_head, 0);
  const float* v_base = static_cast<const float*>(p.v) + offset(p.v_strides, b, kv_head, 0);
  if (direct) {  // branch-free: valid iff 0 <= j <= last, i.e. j < limit as unsigned numbers
    const int64_t k_row = p.k_strides.row, v_row = p.v_strides.row;
    const uint64_t limit = last < 0 ? 0 : static_cast<uint64_t>(last) + 1;
    int t = 0;
    if constexpr (L64 > 1) {  // L64 slots per step, addresses as 64-bit lanes (was ~40 % of the row's instructions)
      const vu64 limit_v = vu64{} + limit;
      const vi64 k_addr = vi64{} + reinterpret_cast<int64_t>(k_base), v_addr = vi64{} + reinterpret_cast<int64_t>(v_base);
      const vi64 zero_addr = vi64{} + reinterpret_cast<int64_t>(row.zero);
      const vi64 k_step = vi64{} + k_row * int64_t(sizeof(float)), v_step = vi64{} + v_row * int64_t(sizeof(float));
      for (; t + L64 <= K; t += L64) {
        vi64 j;
        std::memcpy(&j, idx + t, sizeof j);
        const vi64 ok = reinterpret_cast<vi64>(reinterpret_cast<vu64>(j) < limit_v);  // −1 where valid
        const vi64 keys = ok ? k_addr + j * k_step : zero_addr;
        const vi64 values = ok ? v_addr + j * v_step : zero_addr;
        std::memcpy(row.keys + t, &keys, sizeof keys);
        std::memcpy(row.values + t, &values, sizeof values);
        const vfh bias = __builtin_convertvector(ok, vih) ? vfh{} : vfh{} - kInf;
        std::memcpy(row.bias + t, &bias, sizeof bias);
      }
    }
    for (; t < K; ++t) {
      const int64_t j = idx[t];
      const bool ok = static_cast<uint64_t>(j) < limit;
      const int64_t jj = ok ? j : 0;
      row.keys[t] = ok ? k_base + jj * k_row : row.zero;
      row.values[t] = ok ? v_base + jj * v_row : row.zero;
      row.bias[t] = ok ? 0.f : -kInf;
    }
  } else {
    for (int t = 0; t < K; ++t) {
      const int64_t j = idx[t];
      if (j < 0 || j > last) {
        row.keys[t] = row.values[t] = row.zero;
        row.bias[t] = -kInf;
        continue;
      }
      row.keys[t] = vector_row(p.dtype, p.k, offset(p.k_strides, b, kv_head, j), D, Dp, row.key_buf + t * Dp);
      row.values[t] = vector_row(p.dtype, p.v, offset(p.v_strides, b, kv_head, j), D, Dp, row.value_buf + t * Dp);
      row.bias[t] = 0.f;
    }
  }
  for (int t = K; t < Kp; ++t) {
    row.keys[t] = row.values[t] = row.zero;
    row.bias[t] = -kInf;
  }
  vf row_max = splat(-kInf);
  for (int t0 = 0; t0 < Kp; t0 += L) {
    const vf x = dots(qv, row.keys + t0, Dp);
    if (p.softcap == 0.f && slope == 0.f) {  // s = q̃·k (already log2 units)
      const vf s = x + load(row.bias + t0);
      store(row.s + t0, s);
      row_max = vmax(row_max, s);
      continue;
    }
    for (int t = t0; t < t0 + L; ++t) {
      row.chain[t] = 0.f;
      row.s[t] = row.bias[t] == 0.f ? gather_score(p, x[t - t0], slope, pos - idx[t], row.chain + t) : -kInf;
    }
    row_max = vmax(row_max, load(row.s + t0));
  }
  return hmax(row_max);
}

// Prefetch what row i streams through: its index list, its query row and (for writing) its
// output row. They are read in order, but the hardware prefetchers lose track of these streams
// among the scattered key/value loads; fetching them a few rows ahead removes most of the stalls
// (top-k 64 of 8192 keys, float32: 26 -> 17 ms on one core). The scattered key/value rows
// themselves are better left to the hardware: prefetching a whole row's 2·K rows ahead evicts
// the current row's from L1 and was slower.
// always_inline: a function whose only effect is __builtin_prefetch is "const" to GCC's IPA,
// and its calls are deleted as dead code unless it is inlined first.
constexpr int kStreamAhead = 4;
template <int kForWrite>
FL_ALWAYS_INLINE void prefetch_row(const AttentionParams& p, const void* base, const Strides3& strides, int b, int h,
                                   int i) {
  const int elem = p.dtype == DType::kFloat32 ? 4 : 2;
  const char* row = static_cast<const char*>(base) + offset(strides, b, h, i) * elem;
  for (int byte = 0; byte < p.head_dim * elem; byte += 64) __builtin_prefetch(row + byte, kForWrite);
}
FL_ALWAYS_INLINE void prefetch_indices(const AttentionParams& p, int b, int kv_head, int i) {
  const char* indices = reinterpret_cast<const char*>(gather_row_indices(p, b, kv_head, i));
  for (int byte = 0; byte < p.top_k * int(sizeof(int64_t)); byte += 64) __builtin_prefetch(indices + byte);
}
FL_ALWAYS_INLINE void gather_prefetch_streams(const AttentionParams& p, int b, int h, int kv_head, int i) {
  if (i >= p.seqlen_q) return;
  prefetch_indices(p, b, kv_head, i);
  prefetch_row<0>(p, p.q, p.q_strides, b, h, i);
  prefetch_row<1>(p, p.out, p.out_strides, b, h, i);
}
// The backward's rows pass streams through the index list, q, dO and dq of each row.
FL_ALWAYS_INLINE void gather_prefetch_backward_streams(const AttentionParams& p, const BackwardParams& g, int b, int h,
                                                      int kv_head, int i) {
  if (i >= p.seqlen_q) return;
  prefetch_indices(p, b, kv_head, i);
  prefetch_row<0>(p, p.q, p.q_strides, b, h, i);
  prefetch_row<0>(p, g.grad_out, g.grad_out_strides, b, h, i);
  prefetch_row<1>(p, g.dq, g.dq_strides, b, h, i);
}

// Forward of rows [row_begin, row_end) of (b, h):
//   s_t = score(q_i·k_{idx_t}),  m = max_t s_t,  P_t = 2^(s_t − m),  l = Σ_t P_t,
//   out_i = Σ_t P_t·v_{idx_t} / l,  lse_i = ln2·(m + log2 l)   (no valid slot: 0 and −inf)
void gather_forward(const AttentionParams& p, int b, int h, int row_begin, int row_end, Workspace& ws) {
  const int D = p.head_dim, Dp = round_up(D, L), K = p.top_k, Kp = round_up(K, L);
  const int kv_head = h / p.group();
  float* qv = ws.floats(size_t(2 * Dp) + gather_row_floats(p));
  float* acc = qv + Dp;
  GatherRow row = gather_row_alloc(p, ws, acc + Dp);
  const float slope = p.alibi(b, h), factor = query_factor(p);
  float* lse = p.lse + (int64_t(b) * p.heads_q + h) * p.seqlen_q;
  for (int i = row_begin; i < row_end; ++i) {
    gather_prefetch_streams(p, b, h, kv_head, i + kStreamAhead);
    pack_query_row(p, p.q, p.q_strides, b, h, i, factor, qv);
    const float row_max = gather_row_scores(p, b, kv_head, i, qv, slope, row);
    fill(acc, Dp, 0.f);
    if (row_max == -kInf) {
      lse[i] = -kInf;
      store_scaled_row(p, p.out, p.out_strides, b, h, i, acc, 1.f);
      continue;
    }
    vf sum = {};
    for (int t = 0; t < Kp; t += L) {
      const vf prob = exp2v(load(row.s + t) - row_max);
      store(row.s + t, prob);
      sum += prob;
    }
    const float l = hsum(sum);
    weighted_rows(row.s, row.values, K, Dp, acc);
    store_scaled_row(p, p.out, p.out_strides, b, h, i, acc, 1.f / l);
    lse[i] = (row_max + log2f(l)) * kLn2;
  }
}

// Backward, per row:  P_t = 2^(s_t − lse_i),  dS_t = P_t (dO_i·v_t − δ_i)·chain·scale,
// dq_i = Σ_t dS_t·k_t; P and dS are kept for the key pass.
void gather_backward_rows(const AttentionParams& p, const BackwardParams& g, const GatherGrads& gg, int b, int h,
                          int row_begin, int row_end, Workspace& ws) {
  const int D = p.head_dim, Dp = round_up(D, L), K = p.top_k, Kp = round_up(K, L);
  const int kv_head = h / p.group();
  float* qv = ws.floats(size_t(3 * Dp + Kp) + gather_row_floats(p));
  float* dov = qv + Dp;
  float* dq = dov + Dp;
  float* ds = dq + Dp;
  GatherRow row = gather_row_alloc(p, ws, ds + Kp);
  const float slope = p.alibi(b, h), factor = query_factor(p);
  const int64_t row_base = (int64_t(b) * p.heads_q + h) * p.seqlen_q;
  for (int i = row_begin; i < row_end; ++i) {
    gather_prefetch_backward_streams(p, g, b, h, kv_head, i + kStreamAhead);
    float* probs = gg.probs + (row_base + i) * K;
    float* grads = gg.score_grads + (row_base + i) * K;
    fill(dq, Dp, 0.f);
    const float lse = p.lse[row_base + i];
    if (lse == -kInf) {  // no valid slot: nothing flows back
      fill(probs, K, 0.f);
      fill(grads, K, 0.f);
      store_row(p.dtype, g.dq, offset(g.dq_strides, b, h, i), D, dq);
      continue;
    }
    pack_query_row(p, p.q, p.q_strides, b, h, i, factor, qv);
    pack_query_row(p, g.grad_out, g.grad_out_strides, b, h, i, 1.f, dov);
    gather_row_scores(p, b, kv_head, i, qv, slope, row);
    const float lse2 = lse * kLog2e, delta = g.delta[row_base + i];
    for (int t0 = 0; t0 < Kp; t0 += L) {
      const vf dp = dots(dov, row.values + t0, Dp);  // dP_t = dO_i·v_t
      for (int t = t0; t < t0 + L; ++t) {
        const float prob = row.s[t] == -kInf ? 0.f : exp2f(row.s[t] - lse2);
        ds[t] = prob == 0.f ? 0.f : prob * (dp[t - t0] - delta) * (p.softcap != 0.f ? row.chain[t] : 1.f) * p.scale;
        if (t < K) {
          probs[t] = prob;
          grads[t] = ds[t];
        }
      }
    }
    weighted_rows(ds, row.keys, K, Dp, dq);
    store_row(p.dtype, g.dq, offset(g.dq_strides, b, h, i), D, dq);
  }
}

// Backward, per key j of (b, kv head), over the (head, row, slot) entries that selected it in
// ascending order:  dk_j = Σ dS·q_i,  dv_j = Σ P·dO_i
constexpr int kEntriesAhead = 8;  // 4: -15 %, 8 and 16: -20 % of the backward (top-k 64 of 8192, 1 thread)
void gather_backward_keys(const AttentionParams& p, const BackwardParams& g, const GatherGrads& gg, int b, int kv_head,
                          int key_begin, int key_end, Workspace& ws) {
  const int D = p.head_dim, Dp = round_up(D, L), K = p.top_k, group = p.group();
  float* dk = ws.floats(size_t(4 * Dp));
  float* dv = dk + Dp;
  float* qbuf = dv + Dp;
  float* dobuf = qbuf + Dp;
  const int64_t block = int64_t(b) * p.heads_kv + kv_head;
  const int64_t* offsets = gg.key_offsets + block * (int64_t(p.seqlen_k) + 1);
  const int64_t* entries = gg.key_entries + block * gg.entries_stride;
  // Each entry reads a q row, a dO row and one P and one dS, all at scattered places that the
  // hardware cannot predict but the entry list names: they are prefetched kEntriesAhead entries
  // early (the list runs on across keys).
  const int64_t last_entry = offsets[key_end];
  auto locate = [&](int64_t entry, int& h, int& i) {
    const int64_t head_row = entry / K;
    i = static_cast<int>(head_row % p.seqlen_q);
    h = kv_head * group + static_cast<int>(head_row / p.seqlen_q);
    return ((int64_t(b) * p.heads_q + h) * p.seqlen_q + i) * K + entry % K;
  };
  for (int j = key_begin; j < key_end; ++j) {
    fill(dk, Dp, 0.f);
    fill(dv, Dp, 0.f);
    for (int64_t e = offsets[j]; e < offsets[j + 1]; ++e) {
      if (e + kEntriesAhead < last_entry) {
        int ah, ai;
        const int64_t ahead = locate(entries[e + kEntriesAhead], ah, ai);
        prefetch_row<0>(p, p.q, p.q_strides, b, ah, ai);
        prefetch_row<0>(p, g.grad_out, g.grad_out_strides, b, ah, ai);
        __builtin_prefetch(gg.score_grads + ahead);
        __builtin_prefetch(gg.probs + ahead);
      }
      int h, i;
      const int64_t at = locate(entries[e], h, i);
      axpy(gg.score_grads[at], vector_row(p.dtype, p.q, offset(p.q_strides, b, h, i), D, Dp, qbuf), dk, Dp);
      axpy(gg.probs[at], vector_row(p.dtype, g.grad_out, offset(g.grad_out_strides, b, h, i), D, Dp, dobuf), dv, Dp);
    }
    store_row(p.dtype, g.dk, offset(g.dk_strides, b, kv_head, j), D, dk);
    store_row(p.dtype, g.dv, offset(g.dv_strides, b, kv_head, j), D, dv);
  }
}

const KernelTable& table() {
  static const KernelTable kernels = {
      FL_ISA_NAME, L, &tile_forward, &tile_forward_rows, &tile_forward_rows_merge, &tile_backward_kv, &tile_backward_q, &gather_forward, &gather_backward_rows,
      &gather_backward_keys,
  };
  return kernels;
}

}  // namespace FL_ISA
}  // namespace cpu
}  // namespace flashlite
