// The two small kernels besides the engines, and zeroing of accumulators (host launchers):
// merging split-key partials into out/lse, and fp32 accumulators -> a tensor of the output dtype.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "common/params.h"
#include "cuda/kernel_args.cuh"

namespace flashlite::cuda::detail {

// out, lse of every row from the split partials: lse = log Σ_s exp(lse_s), out = Σ_s exp(lse_s − lse)·out_s.
template <typename T>
cudaError_t combine_splits(const AttentionParams& p, const SplitOutput& split, cudaStream_t stream);

// dst [batch, heads, seqlen, head_dim] (strided, dtype T) = src (fp32, contiguous rows).
template <typename T>
cudaError_t accum_to_tensor(const float* src, void* dst, const Strides3& st, int batch, int heads, int seqlen,
                            int head_dim, cudaStream_t stream);

// cudaMemsetAsync to 0 (a plain memset in the CPU emulation, where "device" memory is host memory).
cudaError_t zero_async(void* ptr, size_t bytes, cudaStream_t stream);

}  // namespace flashlite::cuda::detail
