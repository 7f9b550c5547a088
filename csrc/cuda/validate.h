// Checks of the launchers' arguments (each failure says what is wrong, through host_errors.h) and
// the kernel arguments built from checked parameters (score transform, row alignment flags).
#pragma once

#include <cuda_runtime.h>

#include "common/params.h"
#include "cuda/kernel_args.cuh"

namespace flashlite::cuda::detail {

int elem_bytes(DType d);
const char* dtype_name(DType d);

// float16/bfloat16 with block_m > 16: the tensor-core kernels (else SIMT).
bool uses_mma(const AttentionParams& p);
// No query row anywhere: nothing to launch.
bool empty_problem(const AttentionParams& p);

// Sizes, heads and pointers every launcher needs. `who` names the launcher in the message.
cudaError_t validate(const AttentionParams& p, const char* who);
// The tile engine's schedule and tile shape (one of tile_config()'s).
cudaError_t validate_tiles(const AttentionParams& p, const char* who);
cudaError_t validate_backward(const BackwardParams& g, const char* who);

// Kernel arguments: the parameters, their score transform and whether every row of the operands is
// 16-byte (cp.async 16B) / 4-byte (SIMT cp.async 4B) aligned.
ForwardArgs forward_args(const AttentionParams& p);
BackwardArgs backward_args(const AttentionParams& p, const BackwardParams& g);

}  // namespace flashlite::cuda::detail
