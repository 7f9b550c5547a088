// Error reporting of the host launchers (host_errors.h) and launch.h's last_error_message().
#include "cuda/host_errors.h"

#include <cstdarg>
#include <cstdio>
#include <string>

#include "cuda/launch.h"

namespace flashlite::cuda {
namespace detail {
namespace {
thread_local std::string g_error;
}  // namespace

cudaError_t fail(cudaError_t code, const char* fmt, ...) {
  char buf[640];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  g_error = buf;
  if (code != cudaSuccess) {
    g_error += " (";
    g_error += cudaGetErrorString(code);
    g_error += ")";
  }
  return code;
}

cudaError_t checked(cudaError_t code, const char* step) {
  if (code == cudaSuccess) return code;
  return fail(code, "flashlite CUDA: %s failed", step);
}

}  // namespace detail

const char* last_error_message() { return detail::g_error.c_str(); }

}  // namespace flashlite::cuda
