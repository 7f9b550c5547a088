// SIMT engine forward instantiations for float (see simt.cuh).
#include "cuda/simt_launch.cuh"

namespace flashlite {
namespace cuda {
namespace detail {
FL_INSTANTIATE_SIMT_FORWARD(float)
}  // namespace detail
}  // namespace cuda
}  // namespace flashlite
