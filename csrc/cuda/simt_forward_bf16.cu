// SIMT engine forward instantiations for __nv_bfloat16 (see simt.cuh).
#include "cuda/simt_launch.cuh"

namespace flashlite {
namespace cuda {
namespace detail {
FL_INSTANTIATE_SIMT_FORWARD(__nv_bfloat16)
}  // namespace detail
}  // namespace cuda
}  // namespace flashlite
