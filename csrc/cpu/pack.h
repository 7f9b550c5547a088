// Packing and storing, one instruction-set build: rows of q, k, v, dO read as float32
// (converted from float16/bfloat16 here, one tile or row at a time; float32 read in place where
// the layout allows), outputs written back in the tensor's dtype.
#pragma once

#ifndef FL_ISA
#error "include isa_kernels.h from an isa_*.cpp (FL_ISA, FL_LANES, FL_MR defined), not this header"
#endif

#include "simd.h"

namespace flashlite {
namespace cpu {
namespace FL_ISA {

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
        fill(row + D, Dp - D, 0.f);
      } else {
        fill(row, Dp, 0.f);
      }
      if (out_rows)  // whole vectors (Dp is a multiple of L; the row is zero past D)
        for (int d = 0; d < Dp; d += L) store(out_rows + r * Dp + d, load(row + d));
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

// δ_r = Σ_d dO[r][d]·O[r][d] for the query rows r = (b·Hq + h)·Nq + i in [begin, end) (the backward's
// softmax term, when the caller leaves it to the kernels: BackwardParams::out): vectors along d,
// then a fixed-order lane sum, so every thread count gives the same bits.
void backward_deltas(const AttentionParams& p, const BackwardParams& g, int64_t begin, int64_t end, float* delta,
                     Workspace& ws) {
  const int D = p.head_dim, Dp = round_up(D, L);
  float* rows = ws.floats(size_t(2 * Dp));
  for (int64_t r = begin; r < end; ++r) {
    const int i = static_cast<int>(r % p.seqlen_q);
    const int64_t bh = r / p.seqlen_q;
    const int b = static_cast<int>(bh / p.heads_q), h = static_cast<int>(bh % p.heads_q);
    const float* dout = vector_row(p.dtype, g.grad_out, offset(g.grad_out_strides, b, h, i), D, Dp, rows);
    const float* out = vector_row(p.dtype, g.out, offset(g.out_strides, b, h, i), D, Dp, rows + Dp);
    vf sum = {};
    for (int d = 0; d < Dp; d += L) sum += load(dout + d) * load(out + d);
    delta[r] = hsum(sum);
  }
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

}  // namespace FL_ISA
}  // namespace cpu
}  // namespace flashlite
