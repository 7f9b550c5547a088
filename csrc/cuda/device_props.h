// Device properties the planner needs (SM count, opt-in shared memory per block), queried once per
// device. Without a device, FLASHLITE_CUDA_ASSUME_DEVICE="<SMs>:<opt-in shared memory bytes>"
// stands in, so the compile tests exercise the planning on a CPU-only machine.
#pragma once

#include <cstddef>

namespace flashlite::cuda::detail {

struct DeviceInfo {
  int sms = 1;
  size_t smem_optin = 48 * 1024;
};

// Properties of CUDA device `device`; the assumed device where no device is visible, the
// smallest defaults (1 SM, 48 KiB) for an index that cannot be queried.
DeviceInfo device_info(int device);
// Properties of the current device (the launchers run there: the binding guards q's device).
DeviceInfo current_device_info();

}  // namespace flashlite::cuda::detail
