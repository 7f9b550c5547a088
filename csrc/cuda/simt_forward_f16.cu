// SIMT engine forward instantiations for __half (see simt.cuh).
#include "cuda/simt_launch.cuh"

namespace flashlite {
namespace cuda {
namespace detail {
FL_INSTANTIATE_SIMT_FORWARD(__half)
}  // namespace detail
}  // namespace cuda
}  // namespace flashlite
