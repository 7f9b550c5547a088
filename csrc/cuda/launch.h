// Host launchers of flashlite's CUDA kernels (torch-free; implemented by dispatch.cpp). The binding
// (bindings_cuda.cpp) fills AttentionParams / BackwardParams from tensors and calls these on the
// current stream of the tensors' device.
//
// What they support (the Python side should reject anything else before calling):
//   dtypes     float16, bfloat16 (tensor cores) and float32 (CUDA cores, fp32 math, no TF32).
//   head_dim   1..256, any value. float16/bfloat16 tile kernels are instantiated for 32/64/96/128/256
//              and run other sizes on the next one with masked columns. Rows whose base pointer,
//              strides or head_dim are not 16-byte multiples still work (element loads, slower).
//   layouts    q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D] with any element strides, last dim contiguous;
//              Hq % Hkv == 0; lse float32 [B,Hq,Nq] contiguous; 64-bit offsets throughout.
//   patterns   tile engine: any TileSchedule (range or list) built at tile_config()'s tile sizes
//              (full, causal, sliding window, block-sparse with block_size 16/32/64/128, band
//              intersected); gather engine: top-k indices [B, Hkv|1, Nq, K] or [B, Hkv|1, K]
//              int64, -1 = empty, causal option. softcap and ALiBi ([Hq] or [B,Hq]) everywhere.
//   tiles      float16/bfloat16 with block_m >= 64: tensor-core kernels, (block_m, block_n) in
//              {(128,64), (64,64)} for head_dim <= 64, {(128,32), (128,64), (64,64), (64,32)} for
//              head_dim <= 128, (64,32) for head_dim <= 256 (csrc/cuda/tiles.h FLASHLITE_MMA_TILES).
//              block_m == 16 (float32, block-sparse block_size 16/32, or a device with too little
//              shared memory): SIMT kernels, block_n 16 or 32. Other tile sizes -> cudaErrorInvalidValue.
//   decode     Nq <= 64 in one query tile: the query heads of a GQA group share a block, and few
//              blocks split the keys across blocks (Flash-Decoding) when a workspace is given.
//   backward   tile engine: deterministic by default (dK/dV per key tile, dQ in a second pass);
//              deterministic=false + workspace: dQ by fp32 atomics (float16/bfloat16 MMA path only).
//              Top-k: deterministic needs the call plan's key -> slot inverse index
//              (BackwardParams::key_offsets/key_slots, AttentionParams::index_heads; common/params.h);
//              deterministic=false + workspace scatters dK/dV with fp32 atomics. Indices arrive
//              canonical (the valid entries of a row are distinct keys).
// Errors: a launcher returns the CUDA error (cudaErrorInvalidValue for unsupported arguments);
// last_error_message() then says what went wrong.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "common/params.h"

namespace flashlite::cuda {

// Tile sizes for the tile engine on CUDA device `device` (its shared memory decides). block_size 0 =
// no block-sparse constraint; else block_m and block_n divide block_size (16/32/64/128).
void tile_config(int head_dim, DType dtype, int block_size, int device, int* block_m, int* block_n);
// The same for the current device.
void tile_config(int head_dim, DType dtype, int block_size, int* block_m, int* block_n);

cudaError_t tile_forward(const AttentionParams&, cudaStream_t);
cudaError_t tile_backward(const AttentionParams&, const BackwardParams&, void* workspace, cudaStream_t);
// fp32 dQ accumulator for deterministic=false (0 when the path does not use it).
size_t tile_backward_workspace_bytes(const AttentionParams&);
cudaError_t gather_forward(const AttentionParams&, cudaStream_t);
cudaError_t gather_backward(const AttentionParams&, const BackwardParams&, void* workspace, cudaStream_t);
// fp32 dK and dV accumulators for deterministic=false.
size_t gather_backward_workspace_bytes(const AttentionParams&);

// ---- extensions beyond the fixed ABI (used by bindings_cuda.cpp) ------------------------------
// Forward with a workspace for split-key partials (Flash-Decoding); workspace_bytes is 0 when the
// call does not split (then workspace may be nullptr). The 2-argument forms never split.
size_t tile_forward_workspace_bytes(const AttentionParams&);
cudaError_t tile_forward(const AttentionParams&, void* workspace, cudaStream_t);
size_t gather_forward_workspace_bytes(const AttentionParams&);
cudaError_t gather_forward(const AttentionParams&, void* workspace, cudaStream_t);

// Human-readable reason of the last failed launcher call on this thread ("" if none).
const char* last_error_message();

}  // namespace flashlite::cuda
