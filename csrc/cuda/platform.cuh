// The CUDA platform of the kernels: CUDA headers, or the CPU emulation (emulation.h) when built
// with g++ -DFLASHLITE_CUDA_EMULATION (FL_EMULATED), and the block's dynamic shared memory.
//
// Torch-free: compiles with nvcc alone (tests/test_cuda_compile.py checks that for sm_80/sm_90a).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#if defined(FLASHLITE_CUDA_EMULATION) && !defined(__CUDACC__)
#include "cuda/emulation.h"  // CPU emulation of the kernels (logic checks without a GPU)
#define FL_EMULATED 1
#else
#define FL_EMULATED 0
#endif

// The block's dynamic shared memory as `unsigned char* name` (16-byte aligned).
#if FL_EMULATED
#define FL_DYNAMIC_SMEM(name) unsigned char* const name = ::flashlite_emu::dynamic_smem()
#else
#define FL_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
