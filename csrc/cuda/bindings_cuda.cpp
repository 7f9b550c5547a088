// flashlite._C: the cuda_* functions (registered by csrc/bindings.cpp when built with CUDA).
//
// Each function checks its tensors (device, dtype, shapes, contiguous last dim), converts them to
// flashlite::AttentionParams / BackwardParams (common/torch_params.h), allocates outputs and
// workspaces with torch, and calls the torch-free launchers of csrc/cuda/launch.h on the current
// CUDA stream of q's device (under a device guard for q's device). Launch failures raise
// RuntimeError with the launcher's reason. Every argument has a name (keyword calls work; the
// positional order is the one below); the contract of each is docs/native_abi.md.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <limits>
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

// Head statistics (docs/native_abi.md): row_stats, when given, is the forward's output buffer of the
// five statistics, float32 [5, B, Hq, Nq] contiguous on q's device; sink_tokens >= 0 the leading
// keys of sink_mass. None: nothing is computed (the plain kernels run).
void set_row_stats(flashlite::AttentionParams& p, const Tensor& q, const optional<Tensor>& row_stats,
                   int64_t sink_tokens, const char* fn) {
  if (!row_stats.has_value() || !row_stats->defined()) return;
  const Tensor& t = *row_stats;
  TORCH_CHECK_VALUE(t.device() == q.device() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 4 &&
                        t.size(0) == 5 && t.size(1) == q.size(0) && t.size(2) == q.size(1) && t.size(3) == q.size(2),
                    "flashlite: ", fn, ": row_stats must be a float32 contiguous tensor [5, B, Hq, Nq] = [5, ",
                    q.size(0), ", ", q.size(1), ", ", q.size(2), "] on q's device ", q.device(), ", got ",
                    t.scalar_type(), " ", t.sizes(), t.is_contiguous() ? "" : " non-contiguous", " on ", t.device());
  TORCH_CHECK_VALUE(sink_tokens >= 0 && sink_tokens <= std::numeric_limits<int32_t>::max(), "flashlite: ", fn,
                    ": sink_tokens must be in [0, 2^31), got ", sink_tokens);
  flashlite::poison({t});
  p.row_stats = t.data_ptr<float>();
  p.sink_tokens = static_cast<int32_t>(sink_tokens);
}

// The entropy's gradient terms of a backward (docs/native_abi.md): [2, B, Hq, Nq] (g and
// g·(lse − H)) on q's device, converted to float32 contiguous (kept alive in `keep`).
void set_entropy(flashlite::BackwardParams& g, const Tensor& q, const optional<Tensor>& entropy, Tensor& keep,
                 const char* fn) {
  if (!entropy.has_value() || !entropy->defined()) return;
  const Tensor& t = *entropy;
  TORCH_CHECK_VALUE(t.device() == q.device() && t.is_floating_point() && t.dim() == 4 && t.size(0) == 2 &&
                        t.size(1) == q.size(0) && t.size(2) == q.size(1) && t.size(3) == q.size(2),
                    "flashlite: ", fn, ": entropy must be a floating tensor [2, B, Hq, Nq] = [2, ", q.size(0), ", ",
                    q.size(1), ", ", q.size(2), "] (the entropy's gradient g and g*(lse - H)) on q's device ",
                    q.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
  keep = t.to(at::kFloat).contiguous();
  g.entropy = keep.data_ptr<float>();
}

Tensor workspace(size_t bytes, const Tensor& like) {
  if (bytes == 0) return Tensor();
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

void* data_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// (block_m, block_n) for CUDA device `device` (an index: the device of the tensors the schedule is
// for; its shared memory decides the tensor-core shape), not the current device.
py::tuple cuda_tile_config(int64_t head_dim, py::object dtype, int64_t block_size, int64_t device) {
  const at::ScalarType type = torch::python::detail::py_object_to_dtype(dtype);
  const int64_t count = static_cast<int64_t>(c10::cuda::device_count());
  TORCH_CHECK_VALUE(device >= 0 && device < count, "flashlite.cuda_tile_config: device must be a CUDA device index in [0, ",
                    count, "), got ", device);
  int block_m = 0, block_n = 0;
  fc::tile_config(static_cast<int>(head_dim), flashlite::dtype_of(type), static_cast<int>(block_size),
                  static_cast<int>(device), &block_m, &block_n);
  return py::make_tuple(block_m, block_n);
}

std::tuple<Tensor, Tensor> cuda_tile_forward(Tensor q, Tensor k, Tensor v, const Tensor& kv_tiles,
                                             const Tensor& kv_count, const optional<Tensor>& alibi_slopes,
                                             bool is_list, int64_t block_m, int64_t block_n, int64_t window_left,
                                             int64_t window_right, double scale, double softcap,
                                             const optional<Tensor>& row_stats, int64_t sink_tokens) {
  flashlite::make_last_dims_contiguous({&q, &k, &v});
  check_cuda_inputs(q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  flashlite::ForwardCall call = flashlite::prepare_forward(q, k, v, alibi_slopes, scale, softcap);
  flashlite::set_tile_schedule(call.params, q, block_m, block_n, window_left, window_right, kv_tiles, kv_count,
                               is_list, "cuda_tile_config");
  set_row_stats(call.params, q, row_stats, sink_tokens, "cuda_tile_forward");
  const Tensor ws = workspace(fc::tile_forward_workspace_bytes(call.params), q);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(fc::tile_forward(call.params, data_or_null(ws), stream), "cuda_tile_forward");
  return {call.out, call.lse};
}

std::tuple<Tensor, Tensor, Tensor> cuda_tile_backward(
    Tensor grad_out, Tensor q, Tensor k, Tensor v, const Tensor& out, const Tensor& lse, const Tensor& kv_tiles,
    const Tensor& kv_count, const Tensor& q_tiles, const Tensor& q_count, const optional<Tensor>& alibi_slopes,
    bool is_list, int64_t block_m, int64_t block_n, int64_t window_left, int64_t window_right, double scale,
    double softcap, bool deterministic, const optional<Tensor>& entropy) {
  flashlite::make_last_dims_contiguous({&q, &k, &v, &grad_out});
  check_cuda_inputs(q, k, v);
  check_saved(grad_out, out, lse, q);
  const c10::cuda::CUDAGuard guard(q.device());
  flashlite::BackwardCall call =
      flashlite::prepare_backward(grad_out, q, k, v, out, lse, alibi_slopes, scale, softcap, deterministic);
  flashlite::set_tile_schedule(call.params, q, block_m, block_n, window_left, window_right, kv_tiles, kv_count,
                               is_list, "cuda_tile_config");
  flashlite::set_backward_schedule(call.params, q, k, q_tiles, q_count, is_list);
  Tensor entropy_terms;
  set_entropy(call.grads, q, entropy, entropy_terms, "cuda_tile_backward");
  const Tensor ws = deterministic ? Tensor() : workspace(fc::tile_backward_workspace_bytes(call.params), q);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(fc::tile_backward(call.params, call.grads, data_or_null(ws), stream), "cuda_tile_backward");
  return {call.dq, call.dk, call.dv};
}

std::tuple<Tensor, Tensor> cuda_gather_forward(Tensor q, Tensor k, Tensor v, const Tensor& indices,
                                               const optional<Tensor>& alibi_slopes, bool causal, double scale,
                                               double softcap, const optional<Tensor>& row_stats,
                                               int64_t sink_tokens) {
  flashlite::make_last_dims_contiguous({&q, &k, &v});
  check_cuda_inputs(q, k, v);
  check_indices_device(indices, q);
  const c10::cuda::CUDAGuard guard(q.device());
  flashlite::ForwardCall call = flashlite::prepare_forward(q, k, v, alibi_slopes, scale, softcap);
  flashlite::set_indices(call.params, indices, causal);
  set_row_stats(call.params, q, row_stats, sink_tokens, "cuda_gather_forward");
  const Tensor ws = workspace(fc::gather_forward_workspace_bytes(call.params), q);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(fc::gather_forward(call.params, data_or_null(ws), stream), "cuda_gather_forward");
  return {call.out, call.lse};
}

// key_offsets / key_slots: the key -> slot index of `indices` the call plan built (torch_params.h
// set_key_index; docs/native_abi.md). The deterministic path walks it; the atomic one ignores it.
std::tuple<Tensor, Tensor, Tensor> cuda_gather_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v,
                                                        const Tensor& out, const Tensor& lse, const Tensor& indices,
                                                        const Tensor& key_offsets, const Tensor& key_slots,
                                                        const optional<Tensor>& alibi_slopes, bool causal,
                                                        double scale, double softcap, bool deterministic,
                                                        const optional<Tensor>& entropy) {
  flashlite::make_last_dims_contiguous({&q, &k, &v, &grad_out});
  check_cuda_inputs(q, k, v);
  check_saved(grad_out, out, lse, q);
  check_indices_device(indices, q);
  const c10::cuda::CUDAGuard guard(q.device());
  flashlite::BackwardCall call =
      flashlite::prepare_backward(grad_out, q, k, v, out, lse, alibi_slopes, scale, softcap, deterministic);
  flashlite::set_indices(call.params, indices, causal);
  flashlite::set_key_index(call.grads, call.params, key_offsets, key_slots, q);
  Tensor entropy_terms;
  set_entropy(call.grads, q, entropy, entropy_terms, "cuda_gather_backward");
  const Tensor ws = deterministic ? Tensor() : workspace(fc::gather_backward_workspace_bytes(call.params), q);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(fc::gather_backward(call.params, call.grads, data_or_null(ws), stream), "cuda_gather_backward");
  return {call.dq, call.dk, call.dv};
}

}  // namespace

void flashlite_register_cuda(pybind11::module_& m) {
  m.def("cuda_tile_config", &cuda_tile_config, py::arg("head_dim"), py::arg("dtype"), py::arg("block_size"),
        py::arg("device"),
        "(block_m, block_n) of the CUDA tile engine on CUDA device `device` (an index); block_size 0 = no "
        "block-sparse constraint");
  m.def("cuda_tile_forward", &cuda_tile_forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("kv_tiles"),
        py::arg("kv_count"), py::arg("alibi_slopes"), py::arg("is_list"), py::arg("block_m"), py::arg("block_n"),
        py::arg("window_left"), py::arg("window_right"), py::arg("scale"), py::arg("softcap"),
        py::arg("row_stats") = py::none(), py::arg("sink_tokens") = 0,
        "CUDA tile engine forward -> (out, lse); row_stats (float32 [5, B, Hq, Nq], None = off) / sink_tokens: "
        "filled with the head statistics (docs/native_abi.md)");
  m.def("cuda_tile_backward", &cuda_tile_backward, py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("kv_tiles"), py::arg("kv_count"), py::arg("q_tiles"),
        py::arg("q_count"), py::arg("alibi_slopes"), py::arg("is_list"), py::arg("block_m"), py::arg("block_n"),
        py::arg("window_left"), py::arg("window_right"), py::arg("scale"), py::arg("softcap"),
        py::arg("deterministic"), py::arg("entropy") = py::none(),
        "CUDA tile engine backward -> (dq, dk, dv); entropy (float32 [2, B, Hq, Nq]: g, g*(lse - H); None = "
        "off): the entropy's gradient (docs/native_abi.md)");
  m.def("cuda_gather_forward", &cuda_gather_forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("indices"),
        py::arg("alibi_slopes"), py::arg("causal"), py::arg("scale"), py::arg("softcap"),
        py::arg("row_stats") = py::none(), py::arg("sink_tokens") = 0,
        "CUDA gather (top-k) forward -> (out, lse); row_stats / sink_tokens: the head statistics "
        "(docs/native_abi.md)");
  m.def("cuda_gather_backward", &cuda_gather_backward, py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("indices"), py::arg("key_offsets"), py::arg("key_slots"),
        py::arg("alibi_slopes"), py::arg("causal"), py::arg("scale"), py::arg("softcap"), py::arg("deterministic"),
        py::arg("entropy") = py::none(),
        "CUDA gather (top-k) backward -> (dq, dk, dv); key_offsets/key_slots: the key -> slot index of indices; "
        "entropy: the entropy's gradient terms (docs/native_abi.md)");
}
