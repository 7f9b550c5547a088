// Tensor-core fragment helpers: A/B fragments of 16x16 blocks of shared tiles (ldmatrix), the
// FA2 reuse of f32 accumulators as A fragments, and C += A·B over a 16-column B fragment pair.
#pragma once

#include "cuda/elem.cuh"
#include "cuda/ptx.cuh"

namespace flashlite::cuda::detail {

// Fragment loads from a shared tile with row pitch `pitch` (elements, a multiple of 8).
// A fragment of the 16x16 block at (row0, col0) of a row-major [rows][k] tile.
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int pitch, int row0, int col0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4(a, tile + (row0 + (lane & 15)) * pitch + col0 + (lane >> 4) * 8);
}

// B fragments of two n-blocks (n0, n0+8) x k-block k0 from an [n][k] tile (k contiguous),
// e.g. K for S = Q·Kᵀ. b[0], b[1]: n-block n0; b[2], b[3]: n-block n0+8.
template <typename T>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const T* tile, int pitch, int n0, int k0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4(b, tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * pitch + k0 + ((lane >> 3) & 1) * 8);
}

// The same from a [k][n] tile (n contiguous), e.g. V for O = P·V (ldmatrix .trans).
template <typename T>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const T* tile, int pitch, int k0, int n0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4_trans(b, tile + (k0 + (lane & 7) + (((lane >> 3) & 1) << 3)) * pitch + n0 + (lane >> 4) * 8);
}

// A fragment of k-block kb built from f32 accumulators c[n-block][4] (the FA2 register reuse:
// the C layout of n-blocks 2kb, 2kb+1 is the A layout of k-block kb).
template <typename T, int NB>
__device__ __forceinline__ void accum_to_a(uint32_t (&a)[4], const float (&c)[NB][4], int kb) {
  a[0] = Elem<T>::pack(c[2 * kb][0], c[2 * kb][1]);
  a[1] = Elem<T>::pack(c[2 * kb][2], c[2 * kb][3]);
  a[2] = Elem<T>::pack(c[2 * kb + 1][0], c[2 * kb + 1][1]);
  a[3] = Elem<T>::pack(c[2 * kb + 1][2], c[2 * kb + 1][3]);
}

// C += A·B over the 16 columns of a B fragment pair b (load_b_nk / load_b_kn): the two 16x8
// MMAs into n-blocks 2·n2 and 2·n2 + 1 of the accumulators c[n-block][4].
template <typename T, int NB>
__device__ __forceinline__ void mma_16x16(float (&c)[NB][4], int n2, const uint32_t (&a)[4], const uint32_t (&b)[4]) {
  mma_16816<T>(c[2 * n2], a, b[0], b[1]);
  mma_16816<T>(c[2 * n2 + 1], a, b[2], b[3]);
}

}  // namespace flashlite::cuda::detail
