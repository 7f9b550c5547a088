// The kernels for x86-64 with AVX-512 (F/BW/DQ/VL; 16-float vectors, 32 registers); picked at run time.
#include "prelude.h"

#if defined(__x86_64__) || defined(_M_X64)
#define FL_ISA avx512
#define FL_ISA_NAME "avx512"
#define FL_LANES 16
#define FL_MR 8
#define FL_TARGET "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"
#include "isa_target.h"

namespace flashlite {
namespace cpu {
const KernelTable& kernels_avx512() { return avx512::table(); }
}  // namespace cpu
}  // namespace flashlite
#endif
