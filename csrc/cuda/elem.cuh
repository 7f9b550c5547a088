// Element types of the kernels: float / __half / __nv_bfloat16 <-> float, and 16-bit pairs packed
// in one 32-bit register (MMA fragments, paired loads).
#pragma once

#include <type_traits>

#include "cuda/platform.cuh"

namespace flashlite::cuda::detail {

template <typename T>
struct Elem;

// Whether the head-statistics kernels (row_stats / entropy variants) of dtype T are instantiated:
// always, except in the compile tests (FLASHLITE_CUDA_FEW_INSTANTIATIONS: float16 only, for ptxas;
// the other dtypes' launches then fail with cudaErrorInvalidValue; see also simt_stats_kernels).
template <typename T>
constexpr bool stats_kernels() {
#if defined(FLASHLITE_CUDA_FEW_INSTANTIATIONS)
  return std::is_same<T, __half>::value;
#else
  return true;
#endif
}

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

}  // namespace flashlite::cuda::detail
