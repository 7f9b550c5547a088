// PTX wrappers (sm_80+): cp.async global -> shared copies, ldmatrix, mma.sync m16n8k16 with f32
// accumulators; under FL_EMULATED the same functions emulated by their fragment layouts.
#pragma once

#include "cuda/platform.cuh"

namespace flashlite::cuda::detail {

// ---------------------------------------------------------------------------------------------
// cp.async (sm_80+): global -> shared without registers. `src_bytes` 0 zero-fills the target.
// ---------------------------------------------------------------------------------------------
#if FL_EMULATED
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  ::flashlite_emu::cp_async(smem, gmem, 16, valid);
}
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool valid) {
  ::flashlite_emu::cp_async(smem, gmem, 4, valid);
}
__device__ __forceinline__ void cp_async_commit() { ::flashlite_emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  ::flashlite_emu::cp_async_wait(N);
}
#else
__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Wait until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif

// ---------------------------------------------------------------------------------------------
// ldmatrix / mma.sync m16n8k16 (f32 accumulate)
//
// Fragment layouts (lane = 4*group + quad, group = lane/4, quad = lane%4):
//   A 16x16 (row-major): a0 = (row g,   k 2q..2q+1)   a1 = (row g+8, k 2q..2q+1)
//                        a2 = (row g,   k 2q+8..+9)   a3 = (row g+8, k 2q+8..+9)
//   B 16x8  (k x n):     b0 = (k 2q..2q+1, n g)       b1 = (k 2q+8..+9, n g)
//   C 16x8  (f32):       c0,c1 = (row g, n 2q..2q+1)  c2,c3 = (row g+8, n 2q..2q+1)
// ---------------------------------------------------------------------------------------------
#if FL_EMULATED
// Each lane posts its row address; lane t then takes, from matrix q (rows posted by lanes
// 8q..8q+7), the pair (row t/4, cols 2(t%4), 2(t%4)+1), or with .trans (rows 2(t%4), 2(t%4)+1, col t/4).
inline void emulated_ldmatrix(uint32_t (&r)[4], const void* smem, bool trans) {
  using namespace ::flashlite_emu;
  const int t = lane_id();
  check_smem(smem, 16, "ldmatrix row");
  const void* mine = smem;
  std::memcpy(lane_slot(t), &mine, sizeof(mine));
  syncwarp();
  for (int q = 0; q < 4; ++q) {
    uint16_t pair[2];
    for (int e = 0; e < 2; ++e) {
      const int row = trans ? 2 * (t % 4) + e : t / 4;
      const int col = trans ? t / 4 : 2 * (t % 4) + e;
      const uint16_t* base;
      std::memcpy(&base, lane_slot(8 * q + row), sizeof(base));
      pair[e] = base[col];
    }
    r[q] = static_cast<uint32_t>(pair[0]) | (static_cast<uint32_t>(pair[1]) << 16);
  }
  syncwarp();
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { emulated_ldmatrix(r, smem, false); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  emulated_ldmatrix(r, smem, true);
}

// D = A·B + C over the warp: lanes post their fragments, then each computes its 4 outputs.
template <typename T>
inline void emulated_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  using namespace ::flashlite_emu;
  struct Frag {
    uint32_t a[4], b[2];
  };
  const int t = lane_id();
  Frag mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  std::memcpy(lane_slot(t), &mine, sizeof(mine));
  syncwarp();
  auto half_of = [](uint32_t bits, int e) {
    const uint16_t h = static_cast<uint16_t>(e ? bits >> 16 : bits & 0xFFFF);
    T x;
    std::memcpy(&x, &h, sizeof(h));
    return static_cast<float>(x);
  };
  auto frag = [&](int lane) {
    Frag f;
    std::memcpy(&f, lane_slot(lane), sizeof(f));
    return f;
  };
  // A[row][k]: lane 4·(row%8) + (k%8)/2, register (row>=8) + 2·(k>=8), element k%2
  auto A = [&](int row, int k) {
    return half_of(frag(4 * (row % 8) + (k % 8) / 2).a[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k % 2);
  };
  // B[k][n]: lane 4·n + (k%8)/2, register k>=8, element k%2
  auto B = [&](int k, int n) { return half_of(frag(4 * n + (k % 8) / 2).b[k >= 8 ? 1 : 0], k % 2); };
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = t / 4 + (e >= 2 ? 8 : 0), col = 2 * (t % 4) + (e & 1);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    out[e] = d[e] + acc;
  }
  syncwarp();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emulated_mma<T>(d, a, b0, b1);
}
#else
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

}  // namespace flashlite::cuda::detail
