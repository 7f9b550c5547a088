// Rows of the [B, H, N, D] tensors in global memory: addresses, paired stores, and copies of row
// blocks into shared tiles (cp.async when 16-byte aligned, else plain loads).
#pragma once

#include <cstdint>

#include "common/params.h"
#include "cuda/elem.cuh"
#include "cuda/ptx.cuh"

namespace flashlite::cuda::detail {

__device__ __forceinline__ int64_t row_id(const AttentionParams& p, int b, int h, int i) {
  return (static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q + i;
}

template <typename T>
__device__ __forceinline__ const T* row_ptr(const void* base, const Strides3& s, int b, int h, int64_t n) {
  return static_cast<const T*>(base) + b * s.batch + h * s.head + n * s.row;
}

template <typename T>
__device__ __forceinline__ T* row_ptr_mut(void* base, const Strides3& s, int b, int h, int64_t n) {
  return static_cast<T*>(base) + b * s.batch + h * s.head + n * s.row;
}

// Store two adjacent output columns (col, col+1) of a row, bounds-checked against head_dim.
template <typename T>
__device__ __forceinline__ void store_pair(T* row, int col, int head_dim, float x0, float x1, bool aligned) {
  if (col + 1 < head_dim && aligned) {
    *reinterpret_cast<uint32_t*>(row + col) = Elem<T>::pack(x0, x1);
  } else {
    if (col < head_dim) row[col] = Elem<T>::from_float(x0);
    if (col + 1 < head_dim) row[col + 1] = Elem<T>::from_float(x1);
  }
}

// Copy ROWS rows x D columns (D a multiple of 8) into a shared tile of pitch `pitch`, 16 bytes per
// thread-step. row_src(r) gives the global row or nullptr (zero-filled). Columns >= head_dim are
// zero-filled. aligned: cp.async (asynchronous, caller commits); else plain loads (synchronous).
template <typename T, int ROWS, int D, int THREADS, typename RowSrc>
__device__ __forceinline__ void load_rows_16(T* tile, int pitch, RowSrc row_src, int head_dim, bool aligned,
                                             const void* any_valid_ptr) {
  constexpr int kChunks = D / 8;
  for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += THREADS) {
    const int r = idx / kChunks;
    const int col = (idx % kChunks) * 8;
    const T* src = row_src(r);
    T* dst = tile + r * pitch + col;
    if (aligned) {
      const bool ok = src != nullptr && col < head_dim;
      cp_async_16(dst, ok ? static_cast<const void*>(src + col) : any_valid_ptr, ok);
    } else {
      uint4 tmp = make_uint4(0u, 0u, 0u, 0u);
      T* t = reinterpret_cast<T*>(&tmp);
      if (src != nullptr) {
#pragma unroll
        for (int e = 0; e < 8; ++e)
          if (col + e < head_dim) t[e] = src[col + e];
      }
      *reinterpret_cast<uint4*>(dst) = tmp;
    }
  }
}

// load_rows_16 of rows first .. first + ROWS − 1 of head h (batch b) of a [B, H, N, D] tensor
// (q, k, v, dO); rows >= n are zero-filled. base, first and n are taken by reference, as the
// kernels' row lambdas captured them, so each is still read where a row is decided (the kernels
// compile to the same code as with the lambdas inline).
template <typename T, int ROWS, int D, int THREADS, typename Index>
__device__ __forceinline__ void load_head_rows(T* tile, int pitch, const void* const& base, const Strides3& strides,
                                               int b, int h, const Index& first, const int& n, int head_dim,
                                               bool aligned) {
  auto row = [&](int r) -> const T* {
    return first + r < n ? row_ptr<T>(base, strides, b, h, first + r) : nullptr;
  };
  load_rows_16<T, ROWS, D, THREADS>(tile, pitch, row, head_dim, aligned, base);
}

}  // namespace flashlite::cuda::detail
