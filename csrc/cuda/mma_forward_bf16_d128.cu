// Tensor-core forward instantiations for __nv_bfloat16, head-dim template 128 (see mma_forward.cuh).
#include "cuda/dispatch.h"
#include "cuda/mma_forward.cuh"

namespace flashlite {
namespace cuda {
namespace detail {
template cudaError_t mma_forward_hd<__nv_bfloat16, 128>(const ForwardArgs&, int, int, int64_t, cudaStream_t);
}  // namespace detail
}  // namespace cuda
}  // namespace flashlite
