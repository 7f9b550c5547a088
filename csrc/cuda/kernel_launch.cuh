// Kernel launch with dynamic shared memory (opting in above 48 KiB), or the emulation's launch.
#pragma once

#include <cstddef>

#include "cuda/platform.cuh"

namespace flashlite::cuda::detail {

template <typename Kernel, typename Args>
cudaError_t launch_with_smem(Kernel kernel, dim3 grid, int threads, size_t smem, cudaStream_t stream,
                             const Args& args) {
#if FL_EMULATED
  (void)stream;
  return ::flashlite_emu::launch(kernel, grid, threads, smem, args);
#else
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, threads, smem, stream>>>(args);
  return cudaGetLastError();
#endif
}

}  // namespace flashlite::cuda::detail
