// Host launchers of the SIMT engine (simt.cuh), templated on the element type; instantiated in
// simt_f32.cu / simt_f16.cu / simt_bf16.cu.
#pragma once

#include "cuda/dispatch.h"
#include "cuda/simt.cuh"

namespace flashlite {
namespace cuda {
namespace detail {

// Run CALL with constexpr DC = the columns-per-lane template of head_dim (2, 4 or 8).
// FLASHLITE_CUDA_FEW_INSTANTIATIONS (compile tests only): DC = 8 serves every head_dim.
#if defined(FLASHLITE_CUDA_FEW_INSTANTIATIONS)
#define FL_SIMT_DC_SWITCH(head_dim, CALL) \
  switch (0) {                            \
    default: { constexpr int DC = 8; CALL; } \
  }
#else
#define FL_SIMT_DC_SWITCH(head_dim, CALL)        \
  switch (simt_cols_per_lane(head_dim)) {        \
    case 2: { constexpr int DC = 2; CALL; }      \
    case 4: { constexpr int DC = 4; CALL; }      \
    default: { constexpr int DC = 8; CALL; }     \
  }
#endif

template <typename T, class Rows>
cudaError_t simt_forward_launch(const ForwardArgs& args, int64_t blocks, cudaStream_t stream) {
  if (blocks == 0) return cudaSuccess;
  const size_t smem = simt_forward_smem(sizeof(T), args.p.head_dim, args.kv_stages);
  const dim3 grid(static_cast<unsigned>(blocks), args.split.num_splits);
  FL_SIMT_DC_SWITCH(args.p.head_dim,
                    return launch_with_smem(simt_forward_kernel<T, DC, Rows>, grid, kSimtThreads, smem, stream, args))
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t simt_tile_forward(ForwardArgs args, size_t smem_limit, cudaStream_t stream) {
  args.kv_stages = simt_forward_smem(sizeof(T), args.p.head_dim, 2) <= smem_limit ? 2 : 1;
  return simt_forward_launch<T, TileRows>(args, TileRows::num_blocks(args.p), stream);
}

template <typename T>
cudaError_t simt_gather_forward(ForwardArgs args, size_t smem_limit, cudaStream_t stream) {
  args.kv_stages = simt_forward_smem(sizeof(T), args.p.head_dim, 2) <= smem_limit ? 2 : 1;
  return simt_forward_launch<T, GatherRows>(args, GatherRows::num_blocks(args.p), stream);
}

template <typename T, class Rows>
cudaError_t simt_rows_backward_launch(BackwardArgs args, size_t smem_limit, cudaStream_t stream) {
  const int64_t blocks = Rows::num_blocks(args.p);
  if (blocks == 0) return cudaSuccess;
  args.kv_stages = simt_rows_backward_smem(sizeof(T), args.p.head_dim, 2) <= smem_limit ? 2 : 1;
  const size_t smem = simt_rows_backward_smem(sizeof(T), args.p.head_dim, args.kv_stages);
  const dim3 grid(static_cast<unsigned>(blocks));
  FL_SIMT_DC_SWITCH(args.p.head_dim, return launch_with_smem(simt_backward_rows_kernel<T, DC, Rows>, grid,
                                                             kSimtThreads, smem, stream, args))
  return cudaErrorInvalidValue;
}

// Tile engine backward: dK/dV per key tile, then dQ per query tile (both deterministic).
template <typename T>
cudaError_t simt_tile_backward(BackwardArgs args, size_t smem_limit, cudaStream_t stream) {
  const AttentionParams& p = args.p;
  const int64_t kv_blocks = static_cast<int64_t>((p.seqlen_k + p.block_n - 1) / p.block_n) * p.batch * p.heads_kv;
  if (kv_blocks > 0) {
    const size_t smem = simt_dkdv_smem(sizeof(T), p.head_dim);
    cudaError_t err = cudaSuccess;
    FL_SIMT_DC_SWITCH(p.head_dim, err = launch_with_smem(simt_dkdv_kernel<T, DC>, dim3(static_cast<unsigned>(kv_blocks)),
                                                         kSimtThreads, smem, stream, args);
                      break)
    if (err != cudaSuccess) return err;
  }
  args.dk_accum = args.dv_accum = nullptr;
  return simt_rows_backward_launch<T, TileRows>(args, smem_limit, stream);
}

// Top-k backward: dQ per row block, plus dK/dV either scattered with atomics from the same kernel
// (args.dk_accum set) or, deterministic, per key over the CSR of selecting rows.
template <typename T>
cudaError_t simt_gather_backward(BackwardArgs args, size_t smem_limit, cudaStream_t stream) {
  const cudaError_t err = simt_rows_backward_launch<T, GatherRows>(args, smem_limit, stream);
  if (err != cudaSuccess || args.dk_accum != nullptr) return err;
  const AttentionParams& p = args.p;
  const int64_t blocks = static_cast<int64_t>((p.seqlen_k + kSimtWarps - 1) / kSimtWarps) * p.batch * p.heads_kv;
  if (blocks == 0) return cudaSuccess;
  FL_SIMT_DC_SWITCH(p.head_dim, return launch_with_smem(gather_key_grads_kernel<T, DC>,
                                                        dim3(static_cast<unsigned>(blocks)), kSimtThreads, 0,
                                                        stream, args))
  return cudaErrorInvalidValue;
}

#define FL_INSTANTIATE_SIMT_FORWARD(T)                                             \
  template cudaError_t simt_tile_forward<T>(ForwardArgs, size_t, cudaStream_t);   \
  template cudaError_t simt_gather_forward<T>(ForwardArgs, size_t, cudaStream_t);
#define FL_INSTANTIATE_SIMT_BACKWARD(T)                                              \
  template cudaError_t simt_tile_backward<T>(BackwardArgs, size_t, cudaStream_t);   \
  template cudaError_t simt_gather_backward<T>(BackwardArgs, size_t, cudaStream_t);

}  // namespace detail
}  // namespace cuda
}  // namespace flashlite
