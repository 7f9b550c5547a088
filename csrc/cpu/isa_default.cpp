// The kernels for the compiler's baseline target (SSE2 on x86-64, NEON on aarch64): 4-float vectors.
#include "prelude.h"

#define FL_ISA baseline
#define FL_ISA_NAME "default"
#define FL_LANES 4
#if defined(__aarch64__)
#define FL_MR 8  // 32 vector registers
#else
#define FL_MR 6  // 16 vector registers
#endif
#include "isa_kernels.h"

namespace flashlite {
namespace cpu {
const KernelTable& kernels_default() { return baseline::table(); }
}  // namespace cpu
}  // namespace flashlite
