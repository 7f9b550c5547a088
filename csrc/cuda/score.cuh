// Scores: the transform of a raw dot product into the softmax input (scale, softcap, ALiBi, log2
// units), the visible key range of a query row (band), and lse in log2 units.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/params.h"
#include "cuda/platform.cuh"

namespace flashlite::cuda::detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

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

// Head statistics (AttentionParams::row_stats) of row `rid` (the lse index) from the running sums
// of the forward kernels (l, t in log2 units, d, z relative to the final max; c the visible keys):
// entropy = ln l − ln2·t/l, max_prob = 1/l, mean_distance = d/l, sink_mass = z/l, keys = c; a row
// with no visible key (l = 0) gets 0 in all five. Planes B·Hq·Nq apart.
__device__ __forceinline__ void write_row_stats(const AttentionParams& p, int64_t rid, float l, float t, float d,
                                                float z, float c) {
  const int64_t plane = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
  float* out = p.row_stats + rid;
  const bool seen = l > 0.f;
  const float inv = seen ? 1.f / l : 0.f;
  out[0] = seen ? logf(l) - kLn2 * t * inv : 0.f;
  out[plane] = inv;
  out[2 * plane] = d * inv;
  out[3 * plane] = z * inv;
  out[4 * plane] = seen ? c : 0.f;
}

}  // namespace flashlite::cuda::detail
