// SIMT engine backward instantiations for float (see simt.cuh).
#include "cuda/simt_launch.cuh"

namespace flashlite {
namespace cuda {
namespace detail {
FL_INSTANTIATE_SIMT_BACKWARD(float)
}  // namespace detail
}  // namespace cuda
}  // namespace flashlite
