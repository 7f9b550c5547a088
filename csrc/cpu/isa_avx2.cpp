// The kernels for x86-64 with AVX2 + FMA (8-float vectors, 16 registers); picked at run time.
#include "prelude.h"

#if defined(__x86_64__) || defined(_M_X64)
#define FL_ISA avx2
#define FL_ISA_NAME "avx2"
#define FL_LANES 8
#define FL_MR 6
#define FL_TARGET "avx2,fma,f16c"
#include "isa_target.h"

namespace flashlite {
namespace cpu {
const KernelTable& kernels_avx2() { return avx2::table(); }
}  // namespace cpu
}  // namespace flashlite
#endif
