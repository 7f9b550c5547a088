// The products every kernel computes, one instruction-set build:
//   gemm: the register-blocked micro-kernel C[x][y] (+)= Σ_k A(x, k)·B[k][y] (B, C rows contiguous
//         along y, A read as scalars), MR×2 vectors of accumulators: every tile-engine product;
//   axpy, dots, weighted_rows: the row kernels of the gather engine and the decode rows.
#pragma once

#ifndef FL_ISA
#error "include isa_kernels.h from an isa_*.cpp (FL_ISA, FL_LANES, FL_MR defined), not this header"
#endif

#include "simd.h"

namespace flashlite {
namespace cpu {
namespace FL_ISA {

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

// Panels of 4·L columns where the build has 32 vector registers (AVX-512): 6 rows × 4 vectors of
// accumulators, 4 of B and a broadcast (29 registers). Each step then does 24 FMAs for 10 loads
// instead of 16 for 10 (8 × 2): the loop issues fewer instructions per FMA, and the 64-wide tiles
// of the tile engine run at ~90 % of the FMA peak instead of ~85 % from L1 (bench_cpu_tile stages).
constexpr int kWideRows = MR >= 8 && L >= 16 ? 6 : 0;

template <int R>
inline void gemm_panel_wide(int X, int depth, const float* a, int64_t a_x, int64_t a_k, const float* b, int64_t b_k,
                            float* c, int64_t c_x, bool accumulate) {
  int x = 0;
  for (; x + R <= X; x += R) gemm_block<R, 4>(depth, a + x * a_x, a_x, a_k, b, b_k, c + x * c_x, c_x, accumulate);
  for (; x + 4 <= X; x += 4) gemm_block<4, 4>(depth, a + x * a_x, a_x, a_k, b, b_k, c + x * c_x, c_x, accumulate);
  for (; x + 2 <= X; x += 2) gemm_block<2, 4>(depth, a + x * a_x, a_x, a_k, b, b_k, c + x * c_x, c_x, accumulate);
  for (; x < X; ++x) gemm_block<1, 4>(depth, a + x * a_x, a_x, a_k, b, b_k, c + x * c_x, c_x, accumulate);
}

// The whole product for x < X, y < Y (Y a multiple of L), in panels of 4·L (kWideRows), then 2·L
// columns of B/C. Every C element is the same chain of FMAs over k, ascending, whatever the panel:
// the blocking never changes a result bit.
inline void gemm(int X, int Y, int depth, const float* a, int64_t a_x, int64_t a_k, const float* b, int64_t b_k,
                 float* c, int64_t c_x, bool accumulate) {
  int y = 0;
  if constexpr (kWideRows > 0)
    for (; y + 4 * L <= Y; y += 4 * L)
      gemm_panel_wide<kWideRows>(X, depth, a, a_x, a_k, b + y, b_k, c + y, c_x, accumulate);
  for (; y + 2 * L <= Y; y += 2 * L) gemm_panel<2>(X, depth, a, a_x, a_k, b + y, b_k, c + y, c_x, accumulate);
  if (y < Y) gemm_panel<1>(X, depth, a, a_x, a_k, b + y, b_k, c + y, c_x, accumulate);
}

inline void axpy(float alpha, const float* x, float* y, int n) {  // y += alpha·x, n a multiple of L
  const vf a = splat(alpha);
  for (int d = 0; d < n; d += L) store(y + d, load(y + d) + a * load(x + d));
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

}  // namespace FL_ISA
}  // namespace cpu
}  // namespace flashlite
