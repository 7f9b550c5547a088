// The kernels for x86-64 with AVX-512 (F/BW/DQ/VL; 16-float vectors, 32 registers); picked at run time.
#include "prelude.h"

#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
#endif

#define FL_ISA avx512
#define FL_ISA_NAME "avx512"
#define FL_LANES 16
#define FL_MR 8
#include "engine.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace flashlite {
namespace cpu {
const KernelTable& kernels_avx512() { return avx512::table(); }
}  // namespace cpu
}  // namespace flashlite
#endif
