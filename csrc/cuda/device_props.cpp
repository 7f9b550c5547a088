// Device properties, cached per device (device_props.h).
#include "cuda/device_props.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <mutex>

namespace flashlite::cuda::detail {
namespace {

constexpr int kMaxDevices = 128;

DeviceInfo assumed_device() {
  DeviceInfo assumed;
  if (const char* spec = std::getenv("FLASHLITE_CUDA_ASSUME_DEVICE")) {
    long sms = 0, smem = 0;
    if (std::sscanf(spec, "%ld:%ld", &sms, &smem) == 2 && sms > 0 && smem > 0) {
      assumed.sms = static_cast<int>(sms);
      assumed.smem_optin = static_cast<size_t>(smem);
    }
  }
  return assumed;
}

}  // namespace

DeviceInfo device_info(int dev) {
  static std::mutex mu;
  static DeviceInfo cache[kMaxDevices];
  static bool known[kMaxDevices] = {};
  if (dev < 0 || dev >= kMaxDevices) return DeviceInfo{};
  std::lock_guard<std::mutex> lock(mu);
  if (!known[dev]) {
    int sms = 0, smem = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
      cudaGetLastError();  // clear
      int count = 0;
      const bool none = cudaGetDeviceCount(&count) != cudaSuccess || count == 0;
      cudaGetLastError();
      return none ? assumed_device() : DeviceInfo{};
    }
    cache[dev].sms = std::max(sms, 1);
    cache[dev].smem_optin = static_cast<size_t>(std::max(smem, 48 * 1024));
    known[dev] = true;
  }
  return cache[dev];
}

DeviceInfo current_device_info() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();  // clear
    return assumed_device();
  }
  return device_info(dev);
}

}  // namespace flashlite::cuda::detail
