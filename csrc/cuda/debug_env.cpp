// Environment switches (debug_env.h).
#include "cuda/debug_env.h"

#include <cstdio>
#include <cstdlib>
#include <utility>

namespace flashlite::cuda::detail {
namespace {
bool env_flag(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] == '1';
}
}  // namespace

bool simt_only() {
  static const bool flag = env_flag("FLASHLITE_CUDA_SIMT_ONLY");
  return flag;
}

bool no_decode() {
  static const bool flag = env_flag("FLASHLITE_CUDA_NO_DECODE");
  return flag;
}

bool wide_slots() {
  static const bool flag = env_flag("FLASHLITE_CUDA_WIDE_SLOTS");
  return flag;
}

bool preferred_tiles(int* block_m, int* block_n) {
  static const std::pair<int, int> preferred = [] {
    int m = 0, n = 0;
    const char* spec = std::getenv("FLASHLITE_CUDA_TILES");
    if (spec == nullptr || std::sscanf(spec, "%dx%d", &m, &n) != 2) m = n = 0;
    return std::make_pair(m, n);
  }();
  *block_m = preferred.first;
  *block_n = preferred.second;
  return preferred.first > 0;
}

}  // namespace flashlite::cuda::detail
