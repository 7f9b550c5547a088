// Internal: the per-dtype launchers of the kernel engines that dispatch.cpp calls. Each is defined
// in an engine header (mma_forward.cuh, mma_backward.cuh, simt_tile.cuh, simt_gather.cuh) and
// explicitly instantiated in the generated mma_*.cu / simt_*.cu files (tools/generate_instantiations.py),
// so the instantiations compile in parallel. Host-only: includes no device code.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/kernel_args.cuh"
#include "cuda/tiles.h"

namespace flashlite::cuda::detail {

// Tensor-core tile engine (T = __half / __nv_bfloat16), one function per head-dim template D
// (FLASHLITE_MMA_HEAD_DIMS, tiles.h). cudaErrorInvalidValue: tile shape not instantiated.
template <typename T, int D>
cudaError_t mma_forward_hd(const ForwardArgs& args, int block_m, int block_n, int64_t blocks, cudaStream_t stream);
template <typename T, int D>
cudaError_t mma_backward_hd(const BackwardArgs& args, int block_m, int block_n, size_t smem_limit,
                            cudaStream_t stream);

// SIMT engine (T = float / __half / __nv_bfloat16).
template <typename T>
cudaError_t simt_tile_forward(ForwardArgs args, size_t smem_limit, cudaStream_t stream);
template <typename T>
cudaError_t simt_gather_forward(ForwardArgs args, size_t smem_limit, cudaStream_t stream);
template <typename T>
cudaError_t simt_tile_backward(BackwardArgs args, size_t smem_limit, cudaStream_t stream);
template <typename T>
cudaError_t simt_gather_backward(BackwardArgs args, size_t smem_limit, cudaStream_t stream);

}  // namespace flashlite::cuda::detail
