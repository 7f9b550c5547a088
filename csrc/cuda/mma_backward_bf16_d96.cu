// Tensor-core backward instantiations for __nv_bfloat16, head-dim template 96 (see mma_backward.cuh).
#include "cuda/dispatch.h"
#include "cuda/mma_backward.cuh"

namespace flashlite {
namespace cuda {
namespace detail {
template cudaError_t mma_backward_hd<__nv_bfloat16, 96>(const BackwardArgs&, int, int, size_t, cudaStream_t);
}  // namespace detail
}  // namespace cuda
}  // namespace flashlite
