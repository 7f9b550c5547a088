// flashlite._C: the cuda_* functions (registered by csrc/bindings.cpp when built with CUDA).
//
// Each function checks its tensors (device, dtype, shapes, contiguous last dim), converts them to
// flashlite::AttentionParams / BackwardParams (common/torch_params.h), allocates outputs and
// workspaces with torch, and calls the torch-free launchers of csrc/cuda/launch.h on the current
// CUDA stream of q's device. Launch failures raise RuntimeError with the launcher's reason.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <tuple>

#include "common/torch_params.h"
#include "cuda/launch.h"

namespace {

using at::Tensor;
using c10::optional;
namespace fc = flashlite::cuda;

void check_launch(cudaError_t err, const char* function) {
  if (err == cudaSuccess) {
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const char* reason = fc::last_error_message();
  TORCH_CHECK(false, "flashlite.", function, ": ", (reason && reason[0]) ? reason : cudaGetErrorString(err), " [",
              cudaGetErrorName(err), "]");
}

void check_cuda_inputs(const Tensor& q, const Tensor& k, const Tensor& v) {
  TORCH_CHECK_VALUE(q.is_cuda(), "flashlite: cuda_* functions need CUDA tensors; q is on ", q.device());
  flashlite::check_qkv(q, k, v, c10::DeviceType::CUDA);
}

// out / grad_out like q, lse [B, Hq, Nq], all on q's device.
void check_saved(const Tensor& grad_out, const Tensor& out, const Tensor& lse, const Tensor& q) {
  TORCH_CHECK_VALUE(grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
                    "flashlite: grad_out, out and lse must be on q's device ", q.device());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
                   "flashlite: grad_out and out must have q's dtype ", q.scalar_type());
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() && lse.dim() == 3 &&
                        lse.sizes() == q.sizes().slice(0, 3),
                    "flashlite: grad_out and out must be shaped like q ", q.sizes(), " and lse [B, Hq, Nq]");
}

void check_indices_device(const Tensor& indices, const Tensor& q) {
  TORCH_CHECK_VALUE(indices.device() == q.device(), "flashlite: indices is on ", indices.device(),
                    " but q is on ", q.device());
}

Tensor workspace(size_t bytes, const Tensor& like) {
  if (bytes == 0) return Tensor();
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

void* data_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

py::tuple cuda_tile_config(int64_t head_dim, py::object dtype, int64_t block_size) {
  const at::ScalarType type = torch::python::detail::py_object_to_dtype(dtype);
  int block_m = 0, block_n = 0;
  fc::tile_config(static_cast<int>(head_dim), flashlite::dtype_of(type), static_cast<int>(block_size), &block_m,
                  &block_n);
  return py::make_tuple(block_m, block_n);
}

std::tuple<Tensor, Tensor> cuda_tile_forward(Tensor q, Tensor k, Tensor v, const Tensor& kv_tiles,
                                             const Tensor& kv_count, const optional<Tensor>& alibi_slopes,
                                             bool is_list, int64_t block_m, int64_t block_n, int64_t window_left,
                                             int64_t window_right, double scale, double softcap) {
  flashlite::make_last_dims_contiguous({&q, &k, &v});
  check_cuda_inputs(q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  flashlite::ForwardCall call = flashlite::prepare_forward(q, k, v, alibi_slopes, scale, softcap);
  flashlite::set_tile_schedule(call.params, q, block_m, block_n, window_left, window_right, kv_tiles, kv_count,
                               is_list, "cuda_tile_config");
  const Tensor ws = workspace(fc::tile_forward_workspace_bytes(call.params), q);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(fc::tile_forward(call.params, data_or_null(ws), stream), "cuda_tile_forward");
  return {call.out, call.lse};
}

std::tuple<Tensor, Tensor, Tensor> cuda_tile_backward(
    Tensor grad_out, Tensor q, Tensor k, Tensor v, const Tensor& out, const Tensor& lse, const Tensor& kv_tiles,
    const Tensor& kv_count, const Tensor& q_tiles, const Tensor& q_count, const optional<Tensor>& alibi_slopes,
    bool is_list, int64_t block_m, int64_t block_n, int64_t window_left, int64_t window_right, double scale,
    double softcap, bool deterministic) {
  flashlite::make_last_dims_contiguous({&q, &k, &v, &grad_out});
  check_cuda_inputs(q, k, v);
  check_saved(grad_out, out, lse, q);
  const c10::cuda::CUDAGuard guard(q.device());
  flashlite::BackwardCall call =
      flashlite::prepare_backward(grad_out, q, k, v, out, lse, alibi_slopes, scale, softcap, deterministic);
  flashlite::set_tile_schedule(call.params, q, block_m, block_n, window_left, window_right, kv_tiles, kv_count,
                               is_list, "cuda_tile_config");
  flashlite::set_backward_schedule(call.params, q, k, q_tiles, q_count, is_list);
  const Tensor ws = deterministic ? Tensor() : workspace(fc::tile_backward_workspace_bytes(call.params), q);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(fc::tile_backward(call.params, call.grads, data_or_null(ws), stream), "cuda_tile_backward");
  return {call.dq, call.dk, call.dv};
}

std::tuple<Tensor, Tensor> cuda_gather_forward(Tensor q, Tensor k, Tensor v, const Tensor& indices,
                                               const optional<Tensor>& alibi_slopes, bool causal, double scale,
                                               double softcap) {
  flashlite::make_last_dims_contiguous({&q, &k, &v});
  check_cuda_inputs(q, k, v);
  check_indices_device(indices, q);
  const c10::cuda::CUDAGuard guard(q.device());
  flashlite::ForwardCall call = flashlite::prepare_forward(q, k, v, alibi_slopes, scale, softcap);
  flashlite::set_indices(call.params, indices, causal);
  const Tensor ws = workspace(fc::gather_forward_workspace_bytes(call.params), q);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(fc::gather_forward(call.params, data_or_null(ws), stream), "cuda_gather_forward");
  return {call.out, call.lse};
}

// For the deterministic top-k backward: per (batch, index head, key j) the query rows i that
// select j (ignoring -1 and, with causal, j > p(i)), ascending, as CSR (offsets int64
// [B·Hi·Nk + 1], rows int32). Built with a stable sort, so it is the same on every call.
std::pair<Tensor, Tensor> key_rows_csr(const Tensor& indices, int64_t seqlen_q, int64_t seqlen_k, bool causal) {
  Tensor idx = indices;
  // A head dim broadcast by stride 0 is one list for every KV head (as the kernels read it).
  if (idx.size(1) > 1 && idx.stride(1) == 0) idx = idx.narrow(1, 0, 1);
  if (idx.dim() == 3) idx = idx.unsqueeze(2).expand({idx.size(0), idx.size(1), seqlen_q, idx.size(2)});
  const int64_t batch = idx.size(0), index_heads = idx.size(1), top_k = idx.size(3);
  Tensor valid = idx >= 0;
  if (causal) {
    const Tensor pos = at::arange(seqlen_q, idx.options()).add_(seqlen_k - seqlen_q).view({1, 1, seqlen_q, 1});
    valid = valid & (idx <= pos);
  }
  const int64_t sentinel = batch * index_heads * seqlen_k;  // sorts after every real key
  const Tensor segment = at::arange(batch * index_heads, idx.options()).mul_(seqlen_k).view({batch, index_heads, 1, 1});
  const Tensor key = at::where(valid, segment + idx, at::full({}, sentinel, idx.options())).reshape({-1});
  // Stable: equal keys keep their flat order, i.e. ascending query i.
  const auto sorted = at::sort(key, c10::optional<bool>(true), 0, false);
  // offsets[s] = #keys < s (no host sync, so CUDA-graph safe).
  const Tensor offsets = at::searchsorted(std::get<0>(sorted), at::arange(sentinel + 1, idx.options()));
  // flat index = ((b·Hi + hi)·Nq + i)·K + slot  ->  i
  const Tensor rows = std::get<1>(sorted).div(top_k, "floor").remainder(seqlen_q).to(at::kInt).contiguous();
  return {offsets.contiguous(), rows};
}

std::tuple<Tensor, Tensor, Tensor> cuda_gather_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v,
                                                        const Tensor& out, const Tensor& lse, const Tensor& indices,
                                                        const optional<Tensor>& alibi_slopes, bool causal,
                                                        double scale, double softcap, bool deterministic) {
  flashlite::make_last_dims_contiguous({&q, &k, &v, &grad_out});
  check_cuda_inputs(q, k, v);
  check_saved(grad_out, out, lse, q);
  check_indices_device(indices, q);
  const c10::cuda::CUDAGuard guard(q.device());
  flashlite::BackwardCall call =
      flashlite::prepare_backward(grad_out, q, k, v, out, lse, alibi_slopes, scale, softcap, deterministic);
  flashlite::set_indices(call.params, indices, causal);
  Tensor ws, offsets, rows;
  if (deterministic) {
    std::tie(offsets, rows) = key_rows_csr(indices, q.size(2), k.size(2), causal);
    call.grads.key_offsets = offsets.data_ptr<int64_t>();
    call.grads.key_rows = rows.data_ptr<int32_t>();
  } else {
    ws = workspace(fc::gather_backward_workspace_bytes(call.params), q);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(fc::gather_backward(call.params, call.grads, data_or_null(ws), stream), "cuda_gather_backward");
  return {call.dq, call.dk, call.dv};
}

}  // namespace

void flashlite_register_cuda(pybind11::module_& m) {
  m.def("cuda_tile_config", &cuda_tile_config, py::arg("head_dim"), py::arg("dtype"), py::arg("block_size"),
        "(block_m, block_n) of the CUDA tile engine on the current device; block_size 0 = no block-sparse "
        "constraint");
  m.def("cuda_tile_forward", &cuda_tile_forward, "CUDA tile engine forward -> (out, lse)");
  m.def("cuda_tile_backward", &cuda_tile_backward, "CUDA tile engine backward -> (dq, dk, dv)");
  m.def("cuda_gather_forward", &cuda_gather_forward, "CUDA gather (top-k) forward -> (out, lse)");
  m.def("cuda_gather_backward", &cuda_gather_backward, "CUDA gather (top-k) backward -> (dq, dk, dv)");
}
