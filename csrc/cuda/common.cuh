// Device helpers shared by the CUDA kernels of flashlite: element types, PTX wrappers (cp.async,
// ldmatrix, mma.sync), warp reductions, the score transform and the internal launch arguments.
//
// Torch-free: compiles with nvcc alone (tests/test_cuda_compile.py checks that for sm_80/sm_90a).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#if defined(FLASHLITE_CUDA_EMULATION) && !defined(__CUDACC__)
#include "cuda/emulation.h"  // CPU emulation of the kernels (logic checks without a GPU)
#define FL_EMULATED 1
#else
#define FL_EMULATED 0
#endif

// The block's dynamic shared memory as `unsigned char* name` (16-byte aligned).
#if FL_EMULATED
#define FL_DYNAMIC_SMEM(name) unsigned char* const name = ::flashlite_emu::dynamic_smem()
#else
#define FL_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/params.h"

namespace flashlite {
namespace cuda {
namespace detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};

template <>
struct Elem<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  // Two floats -> one 32-bit register holding (lo, hi) as f16 (lo in the low half).
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t bits) {
    return __half22float2(*reinterpret_cast<const __half2*>(&bits));
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t bits) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&bits));
  }
};

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

// ---------------------------------------------------------------------------------------------
// Warp reductions
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Over the 4 lanes of a quad (the lanes that share an MMA accumulator row).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---------------------------------------------------------------------------------------------
// Scores
// ---------------------------------------------------------------------------------------------
// What turns a raw dot product q·k into the softmax input, per (row, key):
//   x = raw·scale;  x = softcap·tanh(x / softcap) (if softcap);  x -= slope·|p(i) − j| (ALiBi)
// and, for the exp2-based softmax, x2 = x·log2(e).
struct ScoreMath {
  float scale;        // softmax scale
  float scale_log2;   // scale·log2(e): the fast path (no softcap, no ALiBi) is one multiply
  float softcap;      // 0 = off
  bool has_alibi;

  __device__ __forceinline__ bool plain() const { return softcap == 0.f && !has_alibi; }

  // Natural-units score after softcap and ALiBi; also returns tanh (for the softcap chain rule).
  __device__ __forceinline__ float natural(float raw, float slope, int64_t pos, int64_t key, float* tanh_out) const {
    float x = raw * scale;
    float t = 0.f;
    if (softcap != 0.f) {
      t = tanhf(x / softcap);
      x = softcap * t;
    }
    if (has_alibi) x -= slope * fabsf(static_cast<float>(pos - key));
    if (tanh_out) *tanh_out = t;
    return x;
  }

  // log2-units score.
  __device__ __forceinline__ float log2_units(float raw, float slope, int64_t pos, int64_t key) const {
    if (plain()) return raw * scale_log2;
    return natural(raw, slope, pos, key, nullptr) * kLog2e;
  }

  // d(score)/d(raw·scale) factor of the softcap: 1 − tanh² (1 without softcap).
  __device__ __forceinline__ float cap_grad(float raw) const {
    if (softcap == 0.f) return 1.f;
    const float t = tanhf(raw * scale / softcap);
    return 1.f - t * t;
  }
};

inline ScoreMath make_score_math(const AttentionParams& p) {
  ScoreMath m;
  m.scale = p.scale;
  m.scale_log2 = p.scale * kLog2e;
  m.softcap = p.softcap;
  m.has_alibi = p.alibi_slopes != nullptr;
  return m;
}

// Per-row visible key range [lo, hi] of the band, clipped to [0, Nk − 1]; empty when lo > hi.
// (64-bit: p(i) ± window may leave the int32 range for unbounded sides.)
struct KeyRange {
  int32_t lo, hi;
};

__device__ __forceinline__ KeyRange band_range(const AttentionParams& p, int64_t pos) {
  int64_t lo = pos - p.window_left;
  int64_t hi = pos + p.window_right;
  lo = lo < 0 ? 0 : lo;
  hi = hi > p.seqlen_k - 1 ? p.seqlen_k - 1 : hi;
  KeyRange r;
  r.lo = static_cast<int32_t>(lo > p.seqlen_k ? p.seqlen_k : lo);
  r.hi = static_cast<int32_t>(hi < -1 ? -1 : hi);
  return r;
}

// lse in log2 units for p = exp2(x2 − lse2); an empty row (lse = −inf) gets +inf so p = 0.
__device__ __forceinline__ float lse_log2(float lse) {
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

// ---------------------------------------------------------------------------------------------
// Internal launch arguments (host side fills them; passed by value to the kernels)
// ---------------------------------------------------------------------------------------------
struct SplitOutput {
  int32_t num_splits = 1;   // > 1: each block covers a slice of the key tiles and writes partials
  float* out = nullptr;     // [num_splits, rows, head_dim], rows = B·Hq·Nq (row id (b·Hq + h)·Nq + i)
  float* lse = nullptr;     // [num_splits, rows]
  int64_t rows = 0;
};

struct ForwardArgs {
  AttentionParams p;
  ScoreMath math;
  SplitOutput split;
  int32_t heads_per_block = 0;  // MMA decode packing: > 0 = block rows are (head, query) pairs
  int32_t kv_stages = 2;        // SIMT engine: 1 or 2 shared-memory stages for K/V
  bool aligned16 = false;       // rows 16-byte aligned: cp.async 16B copies
  bool aligned4 = false;        // rows 4-byte aligned: cp.async 4B copies (SIMT engine)
};

struct BackwardArgs {
  AttentionParams p;
  BackwardParams g;
  ScoreMath math;
  float* dq_accum = nullptr;  // fp32 [B, Hq, Nq, head_dim] when dQ is accumulated with atomics
  float* dk_accum = nullptr;  // fp32 [B, Hkv, Nk, head_dim] (top-k scatter)
  float* dv_accum = nullptr;
  int32_t kv_stages = 2;      // 1 or 2 shared-memory stages for the streamed operand
  bool aligned16 = false;
  bool aligned4 = false;
};

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

// Launch with `smem` bytes of dynamic shared memory (opting in above 48 KiB); returns the launch error.
template <typename Kernel, typename Args>
cudaError_t launch_with_smem(Kernel kernel, dim3 grid, int threads, size_t smem, cudaStream_t stream,
                             const Args& args) {
#if FL_EMULATED
  (void)stream;
  return ::flashlite_emu::launch(kernel, grid, threads, smem, args);
#else
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, threads, smem, stream>>>(args);
  return cudaGetLastError();
#endif
}

// cudaMemsetAsync (a plain memset in the CPU emulation, where "device" memory is host memory).
inline cudaError_t memset_async(void* ptr, int value, size_t bytes, cudaStream_t stream) {
#if FL_EMULATED
  (void)stream;
  std::memset(ptr, value, bytes);
  return cudaSuccess;
#else
  return cudaMemsetAsync(ptr, value, bytes, stream);
#endif
}

}  // namespace detail
}  // namespace cuda
}  // namespace flashlite
