// Internal: the per-dtype kernel launchers that launch.cu calls. Each is defined in a header
// (mma_forward.cuh, mma_backward.cuh, simt_launch.cuh) and explicitly instantiated per dtype (and
// head-dim group) in its own .cu file, so the instantiations compile in parallel.
#pragma once

#include "cuda/common.cuh"

namespace flashlite {
namespace cuda {
namespace detail {

// Tensor-core tile engine (T = __half / __nv_bfloat16), one function per head-dim template D
// (FLASHLITE_MMA_HEAD_DIMS). cudaErrorInvalidValue: tile shape not instantiated.
#define FLASHLITE_MMA_HEAD_DIMS(X) X(32) X(64) X(96) X(128) X(256)
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

}  // namespace detail
}  // namespace cuda
}  // namespace flashlite
