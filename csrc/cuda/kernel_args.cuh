// The kernels' launch arguments (filled on the host, passed by value as __grid_constant__):
// the parameters, the score transform, split-key partial outputs, alignment and staging choices.
#pragma once

#include <cstdint>

#include "common/params.h"
#include "cuda/score.cuh"

namespace flashlite::cuda::detail {

struct SplitOutput {
  int32_t num_splits = 1;   // > 1: each block covers a slice of the key tiles and writes partials
  float* out = nullptr;     // [num_splits, rows, head_dim], rows = B·Hq·Nq (row id (b·Hq + h)·Nq + i)
  float* lse = nullptr;     // [num_splits, rows]
  int64_t rows = 0;
};

struct ForwardArgs {
  AttentionParams p;
  ScoreMath math;
  SplitOutput split;
  int32_t heads_per_block = 0;  // MMA decode packing: > 0 = block rows are (head, query) pairs
  int32_t kv_stages = 2;        // SIMT engine: 1 or 2 shared-memory stages for K/V
  bool aligned16 = false;       // rows 16-byte aligned: cp.async 16B copies
  bool aligned4 = false;        // rows 4-byte aligned: cp.async 4B copies (SIMT engine)
};

struct BackwardArgs {
  AttentionParams p;
  BackwardParams g;
  ScoreMath math;
  float* dq_accum = nullptr;  // fp32 [B, Hq, Nq, head_dim] when dQ is accumulated with atomics
  float* dk_accum = nullptr;  // fp32 [B, Hkv, Nk, head_dim] (top-k scatter)
  float* dv_accum = nullptr;
  int32_t kv_stages = 2;      // 1 or 2 shared-memory stages for the streamed operand
  bool aligned16 = false;
  bool aligned4 = false;
};

}  // namespace flashlite::cuda::detail
