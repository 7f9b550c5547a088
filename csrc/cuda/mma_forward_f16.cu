// Tensor-core forward instantiations for __half (see mma_forward.cuh).
#include "cuda/dispatch.h"
#include "cuda/mma_forward.cuh"

namespace flashlite {
namespace cuda {
namespace detail {
template cudaError_t mma_forward_dispatch<__half>(const ForwardArgs&, int, int, int, int64_t, cudaStream_t);
}  // namespace detail
}  // namespace cuda
}  // namespace flashlite
