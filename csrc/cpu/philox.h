// Philox4x32-10 (Salmon et al. 2011), word 0: the random word of attention dropout
// (flashlite/core/dropout.py). For a 64-bit seed and a 64-bit counter e:
//   key = (seed mod 2^32, seed div 2^32),  counter = (e mod 2^32, e div 2^32, 0, 0),
//   10 rounds of  (c0, c1, c2, c3) <- (hi(B·c2) ^ c1 ^ k0, lo(B·c2), hi(A·c0) ^ c3 ^ k1, lo(A·c0)),
//   (k0, k1) += (0x9E3779B9, 0xBB67AE85);  the word is c0.
// The same function as Triton's tl.randint(seed, e) and flashlite.core.dropout.philox_words.
//
// Two parts, so that no instruction-set build's code leaks into shared code (prelude.h):
//   the scalar function, included by prelude.h before any target region (no FL_ISA yet);
//   the vector function over the L lanes of one build (namespace flashlite::cpu::FL_ISA), included
//   again by isa_kernels.h inside the build's target region. Hence no #pragma once.

#ifndef FLASHLITE_CPU_PHILOX_SCALAR
#define FLASHLITE_CPU_PHILOX_SCALAR

#include <cstdint>

namespace flashlite {
namespace cpu {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u, kPhiloxRoundB = 0xCD9E8D57u;  // multipliers
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;      // Weyl key increments
constexpr int kPhiloxRounds = 10;

// Word 0 of Philox4x32-10 at `counter` under `seed` (scalar; the kernels use the vector form).
inline uint32_t philox_word(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint64_t pb = uint64_t(kPhiloxRoundB) * c2, pa = uint64_t(kPhiloxRoundA) * c0;
    c0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    c1 = static_cast<uint32_t>(pb);
    c2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c3 = static_cast<uint32_t>(pa);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

}  // namespace cpu
}  // namespace flashlite

#endif  // FLASHLITE_CPU_PHILOX_SCALAR

#if defined(FL_ISA) && !defined(FLASHLITE_CPU_PHILOX_VECTOR)
#define FLASHLITE_CPU_PHILOX_VECTOR

// The wide vectors below are passed between always_inline functions only: no ABI is involved.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace flashlite {
namespace cpu {
namespace FL_ISA {

typedef uint32_t vu32 __attribute__((vector_size(L * sizeof(uint32_t))));
typedef uint64_t vu64w __attribute__((vector_size(L * sizeof(uint64_t))));  // L 64-bit lanes (wide)

// The L counters base + lane·stride.
FL_ALWAYS_INLINE vu64w counters(uint64_t base, uint64_t stride) {
  vu64w e;
  for (int l = 0; l < L; ++l) e[l] = base + uint64_t(l) * stride;
  return e;
}

// The rounds run on 64-bit lanes, one 32-bit word per lane in its low half: a widening multiply
// (32 x 32 -> 64 bits: vpmuludq) reads only the low halves, so its product is lo in place and
// hi one shift away, and whatever the xors leave in the high halves is never read. Per round and
// L words: 2 multiplies, 2 shifts, 2 three-way xors on 2L 32-bit lanes' worth of registers.
//
// a·(low half of x) per 64-bit lane. In the x86 AVX2 and AVX-512 builds (told apart by their lane
// count: a target region defines no __AVX2__) one vpmuludq per register; elsewhere the generic
// product of the masked lanes.
FL_ALWAYS_INLINE vu64w mul_low(vu64w x, uint32_t a) {
#if (defined(__x86_64__) || defined(_M_X64)) && (FL_LANES == 16 || FL_LANES == 8)
#if FL_LANES == 16
  typedef __m512i native;
  // (the maskz_ form: GCC's unmasked AVX-512 intrinsic starts from an "undefined" register and
  // draws -Wmaybe-uninitialized false positives)
#define FL_MUL_EPU32(x, y) _mm512_maskz_mul_epu32(0xFF, x, y)
  const native av = _mm512_set1_epi64(a);
#else
  typedef __m256i native;
#define FL_MUL_EPU32(x, y) _mm256_mul_epu32(x, y)
  const native av = _mm256_set1_epi64x(a);
#endif
  constexpr int parts = sizeof(vu64w) / sizeof(native);
  native in[parts], out[parts];
  std::memcpy(in, &x, sizeof x);
  for (int i = 0; i < parts; ++i) out[i] = FL_MUL_EPU32(in[i], av);
#undef FL_MUL_EPU32
  vu64w product;
  std::memcpy(&product, out, sizeof product);
  return product;
#else
  return (x & 0xFFFFFFFFull) * uint64_t(a);
#endif
}

// Word 0 of Philox4x32-10 at L counters (lane l: e[l]) under `seed`.
FL_ALWAYS_INLINE vu32 philox_words(vu64w e, uint64_t seed) {
  // c0 = e's low word (its high word rides along unread), c1 = e's high word.
  vu64w c0 = e, c1 = e >> 32;
  uint64_t k0 = static_cast<uint32_t>(seed), k1 = seed >> 32;
  // Round 1 with c2 = c3 = 0: hi(B·0) = lo(B·0) = 0.
  vu64w pa = mul_low(c0, kPhiloxRoundA), pb;
  vu64w c2 = (pa >> 32) ^ k1, c3 = pa;
  c0 = c1 ^ k0;
  c1 = vu64w{};
#pragma GCC unroll 8
  for (int r = 1; r < kPhiloxRounds - 1; ++r) {
    k0 = (k0 + kPhiloxKeyA) & 0xFFFFFFFFull;
    k1 = (k1 + kPhiloxKeyB) & 0xFFFFFFFFull;
    pb = mul_low(c2, kPhiloxRoundB);
    pa = mul_low(c0, kPhiloxRoundA);
    c0 = (pb >> 32) ^ c1 ^ k0;
    c1 = pb;
    c2 = (pa >> 32) ^ c3 ^ k1;
    c3 = pa;
  }
  // Round 10: only c0 is wanted (its low words).
  k0 = (k0 + kPhiloxKeyA) & 0xFFFFFFFFull;
  pb = mul_low(c2, kPhiloxRoundB);
  return __builtin_convertvector((pb >> 32) ^ c1 ^ k0, vu32);
}

// The dropout factor of L elements (counters e): dropout_scale where kept, 0 where dropped.
FL_ALWAYS_INLINE vf dropout_factors(const AttentionParams& p, vu64w e) {
  const vu32 words = philox_words(e, p.dropout_seed);
  const vi kept = reinterpret_cast<vi>(words >= (vu32{} + p.dropout_threshold));
  return select(kept, splat(p.dropout_scale), splat(0.f));
}

// Debug / test entry (KernelTable::dropout_words): out[t] = word at counter start + t, t < count.
inline void dropout_words(uint64_t seed, uint64_t start, int64_t count, uint32_t* out) {
  for (int64_t t0 = 0; t0 < count; t0 += L) {
    const vu32 words = philox_words(counters(start + uint64_t(t0), 1), seed);
    for (int l = 0; l < L && t0 + l < count; ++l) out[t0 + l] = words[l];
  }
}

}  // namespace FL_ISA
}  // namespace cpu
}  // namespace flashlite

#endif  // FLASHLITE_CPU_PHILOX_VECTOR
