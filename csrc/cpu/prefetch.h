// Software prefetch helpers, one instruction-set build. A function whose only effect is
// __builtin_prefetch is "const" to GCC's IPA, and its calls are deleted as dead code unless it
// is inlined first: every helper here (and any caller that only prefetches) is always_inline.
// Check the disassembly after adding one.
#pragma once

#ifndef FL_ISA
#error "include isa_kernels.h from an isa_*.cpp (FL_ISA, FL_LANES, FL_MR defined), not this header"
#endif
#include "simd.h"

namespace flashlite {
namespace cpu {
namespace FL_ISA {

template <int kForWrite>
FL_ALWAYS_INLINE void prefetch_row(const AttentionParams& p, const void* base, const Strides3& strides, int b, int h,
                                   int i) {
  const int elem = p.dtype == DType::kFloat32 ? 4 : 2;
  const char* row = static_cast<const char*>(base) + offset(strides, b, h, i) * elem;
  for (int byte = 0; byte < p.head_dim * elem; byte += 64) __builtin_prefetch(row + byte, kForWrite);
}

}  // namespace FL_ISA
}  // namespace cpu
}  // namespace flashlite
