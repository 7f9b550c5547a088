// SIMD primitives of one instruction-set build: the vector types (FL_LANES floats), loads and
// stores, selects, fixed-order lane reductions (deterministic), 2^x and tanh, and small index
// helpers. Part of isa_kernels.h: compiled inside the build's target region.
#pragma once

#ifndef FL_ISA
#error "include isa_kernels.h from an isa_*.cpp (FL_ISA, FL_LANES, FL_MR defined), not this header"
#endif

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
// x − 0 is x exactly (−0 stays −0), so the compiler drops the subtraction and a splat of a value
// in memory is one broadcast load. (0 + x is not x for x = −0: it kept a scalar add on the FMA
// ports before every broadcast of the micro-kernel.)
inline vf splat(float x) { return x - vf{}; }
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

inline void fill(float* x, int n, float value) {
  for (int i = 0; i < n; ++i) x[i] = value;
}

}  // namespace FL_ISA
}  // namespace cpu
}  // namespace flashlite
