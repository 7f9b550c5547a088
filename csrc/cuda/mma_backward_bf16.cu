// Tensor-core backward instantiations for __nv_bfloat16 (see mma_backward.cuh).
#include "cuda/dispatch.h"
#include "cuda/mma_backward.cuh"

namespace flashlite {
namespace cuda {
namespace detail {
template cudaError_t mma_backward_dispatch<__nv_bfloat16>(const BackwardArgs&, int, int, int, size_t, cudaStream_t);
}  // namespace detail
}  // namespace cuda
}  // namespace flashlite
