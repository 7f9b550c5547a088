// Scalar float16/bfloat16 <-> float32 conversions, branch-free so loops over them vectorize
// (float16 after Maratyszcza's FP16 library: exact, round-to-nearest-even, inf/nan kept).
#pragma once

#include <cstdint>
#include <cstring>

#include "../common/params.h"

namespace flashlite {
namespace cpu {

inline float bits_to_float(uint32_t bits) {
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
inline uint32_t float_to_bits(float value) {
  uint32_t out;
  std::memcpy(&out, &value, sizeof out);
  return out;
}

inline float half_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normal and inf/nan: shift the exponent/mantissa into place, rebias by 2^-112.
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // Subnormal: the mantissa as the low bits of 0.5's float, minus 0.5.
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized);
  return bits_to_float(sign | magnitude);
}

inline uint16_t float_to_half(float f) {
  float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

inline float bf16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t bits = float_to_bits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);  // round to nearest even
}

// dst[0:n] = float(src[offset : offset + n]) for a tensor of `dtype`.
inline void load_row(DType dtype, const void* base, int64_t offset, int n, float* dst) {
  if (dtype == DType::kFloat32) {
    std::memcpy(dst, static_cast<const float*>(base) + offset, sizeof(float) * n);
  } else if (dtype == DType::kFloat16) {
    const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
    for (int i = 0; i < n; ++i) dst[i] = half_to_float(src[i]);
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
    for (int i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
  }
}

// base[offset : offset + n] = src[0:n] rounded to `dtype`.
inline void store_row(DType dtype, void* base, int64_t offset, int n, const float* src) {
  if (dtype == DType::kFloat32) {
    std::memcpy(static_cast<float*>(base) + offset, src, sizeof(float) * n);
  } else if (dtype == DType::kFloat16) {
    uint16_t* dst = static_cast<uint16_t*>(base) + offset;
    for (int i = 0; i < n; ++i) dst[i] = float_to_half(src[i]);
  } else {
    uint16_t* dst = static_cast<uint16_t*>(base) + offset;
    for (int i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
  }
}

}  // namespace cpu
}  // namespace flashlite
