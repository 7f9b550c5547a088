// SIMT engine backward instantiations for __half (see simt.cuh).
#include "cuda/simt_launch.cuh"

namespace flashlite {
namespace cuda {
namespace detail {
FL_INSTANTIATE_SIMT_BACKWARD(__half)
}  // namespace detail
}  // namespace cuda
}  // namespace flashlite
