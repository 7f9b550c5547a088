// The kernels for x86-64 with AVX2 + FMA (8-float vectors, 16 registers); picked at run time.
#include "prelude.h"

#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#define FL_ISA avx2
#define FL_ISA_NAME "avx2"
#define FL_LANES 8
#define FL_MR 6
#include "engine.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace flashlite {
namespace cpu {
const KernelTable& kernels_avx2() { return avx2::table(); }
}  // namespace cpu
}  // namespace flashlite
#endif
