// The CPU kernels, written once and compiled per instruction set: this header assembles one
// build and its KernelTable.
//
// Included by isa_*.cpp after prelude.h and inside a target region (isa_target.h; the default
// build has none), with FL_ISA (namespace and name), FL_LANES (floats per vector register) and
// FL_MR (micro-kernel rows) defined. Only functions of namespace flashlite::cpu::FL_ISA are
// defined by it and its parts, so no code compiled for one instruction set is shared with
// another build. The parts, in include order:
//   simd.h           vector types and primitives, 2^x, tanh, lane reductions
//   philox.h         Philox4x32-10 over the lanes (attention dropout's random words)
//   gemm.h           the micro-kernel (gemm) and the row kernels (axpy, dots, weighted_rows)
//   pack.h           float32 packing / conversion of rows and tiles, output stores
//   prefetch.h       software prefetch helpers (always_inline: see there)
//   tile_engine.h    tile engine: forward, decode rows, backward (dK/dV, dQ)
//   gather_engine.h  gather engine (top-k): forward, backward rows pass and keys pass
#pragma once

#include "simd.h"
#include "philox.h"
#include "gemm.h"
#include "pack.h"
#include "prefetch.h"
#include "tile_engine.h"
#include "gather_engine.h"

namespace flashlite {
namespace cpu {
namespace FL_ISA {

const KernelTable& table() {
  static const KernelTable kernels = {
      FL_ISA_NAME, L, &tile_forward, &tile_forward_rows, &tile_forward_rows_merge, &tile_backward_pack, &tile_backward_kv, &tile_backward_head, &tile_backward_q, &gather_forward, &gather_backward_rows,
      &gather_backward_keys, &dropout_words, &backward_deltas,
  };
  return kernels;
}

}  // namespace FL_ISA
}  // namespace cpu
}  // namespace flashlite
