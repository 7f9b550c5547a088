// Error reporting of the host launchers: a failed call records why (per thread), and the binding
// reads it with last_error_message() (launch.h).
#pragma once

#include <cuda_runtime.h>

namespace flashlite::cuda::detail {

// Records the printf-style reason (plus the CUDA error's text unless code is cudaSuccess); returns code.
cudaError_t fail(cudaError_t code, const char* fmt, ...);

// A kernel launch result: on failure, name the step and the CUDA error.
cudaError_t checked(cudaError_t code, const char* step);

}  // namespace flashlite::cuda::detail
