// The launchers of launch.h: check the arguments (validate.h), plan the launch (plan.h), and call
// the engine launchers (engine_launchers.h) for the dtype, then the split combine or the fp32
// conversion (utility_kernels.h). Host-only: the kernels live in the engine headers' instantiation files.
#include "cuda/launch.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cuda/device_props.h"
#include "cuda/engine_launchers.h"
#include "cuda/host_errors.h"
#include "cuda/plan.h"
#include "cuda/tiles.h"
#include "cuda/utility_kernels.h"
#include "cuda/validate.h"

namespace flashlite::cuda {
namespace detail {
namespace {

// Run f with a T* tag of the dtype: f((float*)nullptr) etc.
template <class F>
cudaError_t with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16:
      return f(static_cast<__half*>(nullptr));
    case DType::kBFloat16:
      return f(static_cast<__nv_bfloat16*>(nullptr));
    default:
      return f(static_cast<float*>(nullptr));
  }
}

// Head-dim template -> its instantiation file's launcher.
template <typename T>
cudaError_t mma_forward_dispatch(const ForwardArgs& args, int D, int block_m, int block_n, int64_t blocks,
                                 cudaStream_t stream) {
#define FL_D(d) \
  if (D == d) return mma_forward_hd<T, d>(args, block_m, block_n, blocks, stream);
  FLASHLITE_MMA_HEAD_DIMS(FL_D)
#undef FL_D
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t mma_backward_dispatch(const BackwardArgs& args, int D, int block_m, int block_n, size_t smem_limit,
                                  cudaStream_t stream) {
#define FL_D(d) \
  if (D == d) return mma_backward_hd<T, d>(args, block_m, block_n, smem_limit, stream);
  FLASHLITE_MMA_HEAD_DIMS(FL_D)
#undef FL_D
  return cudaErrorInvalidValue;
}

template <typename T>
constexpr bool is_16bit() {
  return !std::is_same<T, float>::value;
}

}  // namespace

// ---- tile engine -------------------------------------------------------------------------------
cudaError_t tile_forward_impl(const AttentionParams& p, void* workspace, cudaStream_t stream) {
  const char* who = "tile_forward";
  if (empty_problem(p)) return cudaSuccess;
  cudaError_t err = validate(p, who);
  if (err == cudaSuccess) err = validate_tiles(p, who);
  if (err != cudaSuccess) return err;
  if (!p.out) return fail(cudaErrorInvalidValue, "%s: out must be a device pointer", who);
  const DeviceInfo device = current_device_info();
  const ForwardPlan plan = plan_tile_forward(p, device);
  ForwardArgs args = forward_args(p);
  args.split = split_output(p, plan.splits, workspace);
  args.heads_per_block = plan.heads_per_block;
  const size_t smem_limit = device.smem_optin;
  return with_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    cudaError_t e = cudaSuccess;
    if constexpr (is_16bit<T>()) {
      if (plan.mma) {
        e = mma_forward_dispatch<T>(args, plan.D, plan.kernel_bm, p.block_n, plan.blocks, stream);
        if (e == cudaErrorInvalidValue)
          return fail(e, "%s: no tensor-core %skernel for head_dim template %d, tile (%d, %d)", who,
                      p.row_stats ? "head-statistics " : "", plan.D, plan.kernel_bm, p.block_n);
      } else {
        e = simt_tile_forward<T>(args, smem_limit, stream);
      }
    } else {
      e = simt_tile_forward<T>(args, smem_limit, stream);
    }
    if (e != cudaSuccess) return checked(e, "tile forward kernel launch");
    if (args.split.num_splits > 1) return combine_splits<T>(p, args.split, stream);
    return cudaSuccess;
  });
}

cudaError_t tile_backward_impl(const AttentionParams& p, const BackwardParams& g, void* workspace,
                               cudaStream_t stream) {
  const char* who = "tile_backward";
  if (empty_problem(p)) return cudaSuccess;
  cudaError_t err = validate(p, who);
  if (err == cudaSuccess) err = validate_tiles(p, who);
  if (err == cudaSuccess) err = validate_backward(g, who);
  if (err != cudaSuccess) return err;
  if (!p.backward_schedule.tiles || !p.backward_schedule.count)
    return fail(cudaErrorInvalidValue, "%s: the backward schedule (q_tiles, q_count) is missing", who);
  BackwardArgs args = backward_args(p, g);
  const size_t smem_limit = current_device_info().smem_optin;
  return with_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    if constexpr (is_16bit<T>()) {
      if (uses_mma(p)) {
        const int D = mma_head_dim(p.head_dim);
        const bool atomic_dq = !g.deterministic && workspace != nullptr;
        if (atomic_dq) {
          args.dq_accum = static_cast<float*>(workspace);
          cudaError_t e = zero_async(workspace, tile_backward_workspace_bytes(p), stream);
          if (e != cudaSuccess) return checked(e, "cudaMemsetAsync(dq accumulator)");
        }
        cudaError_t e = mma_backward_dispatch<T>(args, D, p.block_m, p.block_n, smem_limit, stream);
        if (e != cudaSuccess) return checked(e, "tile backward kernel launch");
        if (atomic_dq)
          return accum_to_tensor<T>(args.dq_accum, g.dq, g.dq_strides, p.batch, p.heads_q, p.seqlen_q, p.head_dim,
                                    stream);
        return cudaSuccess;
      }
    }
    return checked(simt_tile_backward<T>(args, smem_limit, stream), "tile backward (SIMT) kernel launch");
  });
}

// ---- gather engine (top-k) ------------------------------------------------------------------------
cudaError_t gather_forward_impl(const AttentionParams& p_in, void* workspace, cudaStream_t stream) {
  const char* who = "gather_forward";
  if (empty_problem(p_in)) return cudaSuccess;
  cudaError_t err = validate(p_in, who);
  if (err != cudaSuccess) return err;
  if (!p_in.out) return fail(cudaErrorInvalidValue, "%s: out must be a device pointer", who);
  if (!p_in.indices && p_in.top_k > 0) return fail(cudaErrorInvalidValue, "%s: indices must be a device pointer", who);
  const AttentionParams p = gather_view(p_in);
  const DeviceInfo device = current_device_info();
  const ForwardPlan plan = plan_gather_forward(p, device);
  ForwardArgs args = forward_args(p);
  args.split = split_output(p, plan.splits, workspace);
  const size_t smem_limit = device.smem_optin;
  return with_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    const cudaError_t e = simt_gather_forward<T>(args, smem_limit, stream);
    if (e != cudaSuccess) return checked(e, "gather forward kernel launch");
    if (args.split.num_splits > 1) return combine_splits<T>(p, args.split, stream);
    return cudaSuccess;
  });
}

cudaError_t gather_backward_impl(const AttentionParams& p_in, const BackwardParams& g, void* workspace,
                                 cudaStream_t stream) {
  const char* who = "gather_backward";
  if (empty_problem(p_in)) return cudaSuccess;
  cudaError_t err = validate(p_in, who);
  if (err == cudaSuccess) err = validate_backward(g, who);
  if (err != cudaSuccess) return err;
  const AttentionParams p = gather_view(p_in);
  BackwardArgs args = backward_args(p, g);
  const bool atomic = !g.deterministic && workspace != nullptr;
  if (!atomic && (!g.key_offsets || !g.key_slots))
    return fail(cudaErrorInvalidValue,
                "%s: the deterministic top-k backward needs BackwardParams::key_offsets/key_slots (the plan's "
                "key -> slot inverse index); pass deterministic=false with a workspace for the atomic path",
                who);
  if (!atomic && p.index_heads != 1 && p.index_heads != p.heads_kv)
    return fail(cudaErrorInvalidValue, "%s: index_heads=%d must be 1 or heads_kv=%d", who, p.index_heads,
                p.heads_kv);
  const size_t kv_elems = static_cast<size_t>(p.batch) * p.heads_kv * p.seqlen_k * p.head_dim;
  if (atomic) {
    args.dk_accum = static_cast<float*>(workspace);
    args.dv_accum = args.dk_accum + kv_elems;
    const cudaError_t e = zero_async(workspace, 2 * kv_elems * sizeof(float), stream);
    if (e != cudaSuccess) return checked(e, "cudaMemsetAsync(dk/dv accumulators)");
  }
  const size_t smem_limit = current_device_info().smem_optin;
  return with_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    cudaError_t e = simt_gather_backward<T>(args, smem_limit, stream);
    if (e != cudaSuccess) return checked(e, "gather backward kernel launch");
    if (!atomic) return cudaSuccess;
    e = accum_to_tensor<T>(args.dk_accum, g.dk, g.dk_strides, p.batch, p.heads_kv, p.seqlen_k, p.head_dim, stream);
    if (e != cudaSuccess) return e;
    return accum_to_tensor<T>(args.dv_accum, g.dv, g.dv_strides, p.batch, p.heads_kv, p.seqlen_k, p.head_dim,
                              stream);
  });
}

}  // namespace detail

// ---- the ABI ---------------------------------------------------------------------------------------
void tile_config(int head_dim, DType dtype, int block_size, int device, int* block_m, int* block_n) {
  detail::tile_config_for(detail::device_info(device), head_dim, dtype, block_size, block_m, block_n);
}

void tile_config(int head_dim, DType dtype, int block_size, int* block_m, int* block_n) {
  detail::tile_config_for(detail::current_device_info(), head_dim, dtype, block_size, block_m, block_n);
}

cudaError_t tile_forward(const AttentionParams& p, cudaStream_t stream) {
  return detail::tile_forward_impl(p, nullptr, stream);
}

cudaError_t tile_forward(const AttentionParams& p, void* workspace, cudaStream_t stream) {
  return detail::tile_forward_impl(p, workspace, stream);
}

size_t tile_forward_workspace_bytes(const AttentionParams& p) {
  if (detail::empty_problem(p) || p.heads_kv <= 0 || p.block_m <= 0 || p.block_n <= 0) return 0;
  return detail::split_bytes(p, detail::plan_tile_forward(p, detail::current_device_info()).splits);
}

cudaError_t tile_backward(const AttentionParams& p, const BackwardParams& g, void* workspace, cudaStream_t stream) {
  return detail::tile_backward_impl(p, g, workspace, stream);
}

size_t tile_backward_workspace_bytes(const AttentionParams& p) {
  if (!detail::uses_mma(p)) return 0;
  return static_cast<size_t>(p.batch) * p.heads_q * p.seqlen_q * p.head_dim * sizeof(float);
}

cudaError_t gather_forward(const AttentionParams& p, cudaStream_t stream) {
  return detail::gather_forward_impl(p, nullptr, stream);
}

cudaError_t gather_forward(const AttentionParams& p, void* workspace, cudaStream_t stream) {
  return detail::gather_forward_impl(p, workspace, stream);
}

size_t gather_forward_workspace_bytes(const AttentionParams& p) {
  if (detail::empty_problem(p) || p.heads_kv <= 0) return 0;
  return detail::split_bytes(p, detail::plan_gather_forward(p, detail::current_device_info()).splits);
}

cudaError_t gather_backward(const AttentionParams& p, const BackwardParams& g, void* workspace,
                            cudaStream_t stream) {
  return detail::gather_backward_impl(p, g, workspace, stream);
}

size_t gather_backward_workspace_bytes(const AttentionParams& p) {
  return 2 * static_cast<size_t>(p.batch) * p.heads_kv * p.seqlen_k * p.head_dim * sizeof(float);
}

}  // namespace flashlite::cuda
