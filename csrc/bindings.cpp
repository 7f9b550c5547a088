// flashlite._C: the Python face of the C++ kernels. The contract of every argument (layouts,
// schedules, the top-k backward's key -> slot index, who builds what) is docs/native_abi.md. The
// cpu_* functions are always built; the cuda_* ones are registered by csrc/cuda/bindings_cuda.cpp
// when the extension is built with CUDA (FLASHLITE_WITH_CUDA).
//
// Each function checks and converts its tensors into flashlite::AttentionParams (the shared steps
// are common/torch_params.h), allocates the outputs, and calls the torch-free kernels with the GIL
// released. Every argument has a name (keyword calls work; the positional order is the one below).
#include <torch/extension.h>

#include <limits>
#include <tuple>

#include "common/torch_params.h"
#include "cpu/gather_rows.h"
#include "cpu/kernels.h"
#include "cpu/peak.h"

#ifdef FLASHLITE_WITH_CUDA
void flashlite_register_cuda(pybind11::module_& m);
#endif

namespace {

using at::Tensor;
using c10::optional;

// The kernels' thread count: torch's (torch.set_num_threads applies to flashlite too).
int threads() { return at::get_num_threads(); }

py::tuple cpu_tile_config(int64_t head_dim, py::object dtype, int64_t block_size) {
  const at::ScalarType type = torch::python::detail::py_object_to_dtype(dtype);
  int block_m = 0, block_n = 0;
  flashlite::cpu::tile_config(static_cast<int>(head_dim), flashlite::dtype_of(type), static_cast<int>(block_size),
                              &block_m, &block_n);
  return py::make_tuple(block_m, block_n);
}

// Attention dropout (docs/native_abi.md): dropout_p in [0, 1) (0 = off) and the seed of the call's
// counter-based mask (flashlite/core/dropout.py): threshold floor(p·2^32) (the same double
// product as flashlite.core.dropout.threshold), scale 1/(1 − p).
void set_dropout(flashlite::AttentionParams& p, double dropout_p, int64_t dropout_seed, const char* fn) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "flashlite: ", fn, ": dropout_p must be in [0, 1), got ",
                    dropout_p);
  if (dropout_p == 0.0) return;
  p.dropout = true;
  const double words = dropout_p * 4294967296.0;
  p.dropout_threshold = words >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(words);
  p.dropout_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  p.dropout_seed = static_cast<uint64_t>(dropout_seed);
}

// Head statistics (docs/native_abi.md): row_stats, when given, is the forward's output buffer of
// the five statistics, float32 [5, B, Hq, Nq] contiguous on the CPU (a packed batch: [5, 1, Hq,
// Tq]); sink_tokens >= 0 the leading keys of sink_mass. None: nothing is computed.
void set_row_stats(flashlite::AttentionParams& p, const Tensor& q, const optional<Tensor>& row_stats,
                   int64_t sink_tokens, const char* fn) {
  if (!row_stats.has_value() || !row_stats->defined()) return;
  const Tensor& t = *row_stats;
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 4 &&
                        t.size(0) == 5 && t.size(1) == q.size(0) && t.size(2) == q.size(1) && t.size(3) == q.size(2),
                    "flashlite: ", fn, ": row_stats must be a float32 contiguous CPU tensor [5, B, Hq, Nq] = [5, ",
                    q.size(0), ", ", q.size(1), ", ", q.size(2), "], got ", t.scalar_type(), " ", t.sizes(),
                    t.is_contiguous() ? "" : " non-contiguous", " on ", t.device());
  TORCH_CHECK_VALUE(sink_tokens >= 0 && sink_tokens <= std::numeric_limits<int32_t>::max(), "flashlite: ", fn,
                    ": sink_tokens must be in [0, 2^31), got ", sink_tokens);
  flashlite::poison({t});
  p.row_stats = t.data_ptr<float>();
  p.sink_tokens = static_cast<int32_t>(sink_tokens);
}

// The entropy's gradient terms of a backward (docs/native_abi.md): float32 [2, B, Hq, Nq] (g and
// g·(lse − H)) on the CPU, converted to float32 contiguous (the result is kept alive in `keep`).
void set_entropy(flashlite::BackwardParams& g, const Tensor& q, const optional<Tensor>& entropy, Tensor& keep,
                 const char* fn) {
  if (!entropy.has_value() || !entropy->defined()) return;
  const Tensor& t = *entropy;
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.is_floating_point() && t.dim() == 4 && t.size(0) == 2 &&
                        t.size(1) == q.size(0) && t.size(2) == q.size(1) && t.size(3) == q.size(2),
                    "flashlite: ", fn, ": entropy must be a floating CPU tensor [2, B, Hq, Nq] = [2, ", q.size(0), ", ",
                    q.size(1), ", ", q.size(2), "] (the entropy's gradient g and g*(lse - H)), got ", t.scalar_type(),
                    " ", t.sizes(), " on ", t.device());
  keep = t.to(at::kFloat).contiguous();
  g.entropy = keep.data_ptr<float>();
}

// grad_out/out like q and lse [B, Hq, Nq] (sizes and grad_out's dtype).
void check_saved(const Tensor& grad_out, const Tensor& out, const Tensor& lse, const Tensor& q) {
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type() &&
                        out.sizes() == q.sizes() && lse.sizes() == q.sizes().slice(0, 3),
                    "flashlite: grad_out/out must be like q and lse [B, Hq, Nq]");
}

// Tile engine. q_items / k_items / cu_seqlens_q / cu_seqlens_k (all None: a plain batch): a packed
// batch's work items over [1, H, T, D] views (torch_params.h set_packed_items; docs/native_abi.md).
// block_table / cache_seqlens / page_size (forward; None: contiguous keys): k, v are a page pool
// viewed as [B, Hkv, num_pages·page_size, D], each batch row's keys read through its table row
// (set_paged_keys); the schedule has one row set per batch row (its own length).
std::tuple<Tensor, Tensor> cpu_tile_forward(Tensor q, Tensor k, Tensor v, const Tensor& kv_tiles,
                                            const Tensor& kv_count, const optional<Tensor>& alibi_slopes, bool is_list,
                                            int64_t block_m, int64_t block_n, int64_t window_left,
                                            int64_t window_right, double scale, double softcap,
                                            const optional<Tensor>& q_items, const optional<Tensor>& k_items,
                                            const optional<Tensor>& cu_seqlens_q,
                                            const optional<Tensor>& cu_seqlens_k, double dropout_p,
                                            int64_t dropout_seed, const optional<Tensor>& row_stats,
                                            int64_t sink_tokens, const optional<Tensor>& block_table,
                                            const optional<Tensor>& cache_seqlens, int64_t page_size,
                                            const optional<Tensor>& tile_counter) {
  flashlite::make_last_dims_contiguous({&q, &k, &v});
  flashlite::check_qkv(q, k, v, c10::DeviceType::CPU);
  flashlite::ForwardCall call = flashlite::prepare_forward(q, k, v, alibi_slopes, scale, softcap,
                                                           flashlite::packed_sequences(cu_seqlens_q));
  const bool packed = flashlite::set_packed_items(call.params, q, k, q_items, k_items, cu_seqlens_q, cu_seqlens_k,
                                                  block_m, block_n, "cpu_tile_forward");
  flashlite::set_paged_keys(call.params, q, k, block_table, cache_seqlens, page_size, "cpu_tile_forward");
  flashlite::set_tile_schedule(call.params, q, block_m, block_n, window_left, window_right, kv_tiles, kv_count,
                               is_list, "cpu_tile_config", packed ? call.params.packed.num_q_items : -1);
  set_dropout(call.params, dropout_p, dropout_seed, "cpu_tile_forward");
  set_row_stats(call.params, q, row_stats, sink_tokens, "cpu_tile_forward");
  if (tile_counter.has_value() && tile_counter->defined()) {  // debug: key tiles per (b, h, schedule row)
    const int64_t rows = packed ? call.params.packed.num_q_items : (q.size(2) + block_m - 1) / block_m;
    TORCH_CHECK_VALUE(tile_counter->scalar_type() == at::kInt && tile_counter->is_contiguous() &&
                          tile_counter->device() == q.device() && tile_counter->numel() == q.size(0) * q.size(1) * rows,
                      "flashlite: cpu_tile_forward: tile_counter must be a contiguous int32 tensor of B*Hq*rows = ",
                      q.size(0) * q.size(1) * rows, " elements on q's device (rows: the forward schedule's), got ",
                      tile_counter->scalar_type(), " ", tile_counter->sizes());
    call.params.tile_counter = tile_counter->data_ptr<int32_t>();
  }
  {
    py::gil_scoped_release no_gil;
    flashlite::cpu::tile_forward(call.params, threads());
  }
  return {call.out, call.lse};
}

std::tuple<Tensor, Tensor, Tensor> cpu_tile_backward(
    Tensor grad_out, Tensor q, Tensor k, Tensor v, const Tensor& out, const Tensor& lse, const Tensor& kv_tiles,
    const Tensor& kv_count, const Tensor& q_tiles, const Tensor& q_count, const optional<Tensor>& alibi_slopes,
    bool is_list, int64_t block_m, int64_t block_n, int64_t window_left, int64_t window_right, double scale,
    double softcap, bool deterministic, const optional<Tensor>& q_items, const optional<Tensor>& k_items,
    const optional<Tensor>& cu_seqlens_q, const optional<Tensor>& cu_seqlens_k, double dropout_p,
    int64_t dropout_seed, const optional<Tensor>& entropy) {
  flashlite::make_last_dims_contiguous({&q, &k, &v, &grad_out});
  flashlite::check_qkv(q, k, v, c10::DeviceType::CPU);
  check_saved(grad_out, out, lse, q);
  flashlite::BackwardCall call = flashlite::prepare_backward(grad_out, q, k, v, out, lse, alibi_slopes, scale, softcap,
                                                             deterministic, flashlite::packed_sequences(cu_seqlens_q),
                                                             /*kernel_delta=*/true);
  const bool packed = flashlite::set_packed_items(call.params, q, k, q_items, k_items, cu_seqlens_q, cu_seqlens_k,
                                                  block_m, block_n, "cpu_tile_backward");
  TORCH_CHECK_VALUE(!packed || call.params.packed.k_items != nullptr,
                    "flashlite: cpu_tile_backward: a packed batch needs k_items (the backward's work items)");
  flashlite::set_tile_schedule(call.params, q, block_m, block_n, window_left, window_right, kv_tiles, kv_count,
                               is_list, "cpu_tile_config", packed ? call.params.packed.num_q_items : -1);
  flashlite::set_backward_schedule(call.params, q, k, q_tiles, q_count, is_list,
                                   packed ? call.params.packed.num_k_items : -1);
  set_dropout(call.params, dropout_p, dropout_seed, "cpu_tile_backward");
  Tensor entropy_terms;
  set_entropy(call.grads, q, entropy, entropy_terms, "cpu_tile_backward");
  {
    py::gil_scoped_release no_gil;
    flashlite::cpu::tile_backward(call.params, call.grads, threads());
  }
  return {call.dq, call.dk, call.dv};
}

std::tuple<Tensor, Tensor> cpu_gather_forward(Tensor q, Tensor k, Tensor v, const Tensor& indices,
                                              const optional<Tensor>& alibi_slopes, bool causal, double scale,
                                              double softcap, double dropout_p, int64_t dropout_seed,
                                              const optional<Tensor>& row_stats, int64_t sink_tokens,
                                              const optional<Tensor>& row_keep) {
  flashlite::make_last_dims_contiguous({&q, &k, &v});
  flashlite::check_qkv(q, k, v, c10::DeviceType::CPU);
  flashlite::ForwardCall call = flashlite::prepare_forward(q, k, v, alibi_slopes, scale, softcap);
  flashlite::set_indices(call.params, indices, causal);
  set_dropout(call.params, dropout_p, dropout_seed, "cpu_gather_forward");
  set_row_stats(call.params, q, row_stats, sink_tokens, "cpu_gather_forward");
  flashlite::set_row_keep(call.params, row_keep, q, "cpu_gather_forward");
  {
    py::gil_scoped_release no_gil;
    flashlite::cpu::gather_forward(call.params, threads());
  }
  return {call.out, call.lse};
}

// key_offsets / key_slots: the key -> slot index of `indices` (torch_params.h set_key_index).
std::tuple<Tensor, Tensor, Tensor> cpu_gather_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v,
                                                       const Tensor& out, const Tensor& lse, const Tensor& indices,
                                                       const Tensor& key_offsets, const Tensor& key_slots,
                                                       const optional<Tensor>& alibi_slopes, bool causal,
                                                       double scale, double softcap, bool deterministic,
                                                       double dropout_p, int64_t dropout_seed,
                                                       const optional<Tensor>& entropy,
                                                       const optional<Tensor>& row_keep) {
  flashlite::make_last_dims_contiguous({&q, &k, &v, &grad_out});
  flashlite::check_qkv(q, k, v, c10::DeviceType::CPU);
  check_saved(grad_out, out, lse, q);
  flashlite::BackwardCall call =
      flashlite::prepare_backward(grad_out, q, k, v, out, lse, alibi_slopes, scale, softcap, deterministic, -1,
                                  /*kernel_delta=*/true);
  flashlite::set_indices(call.params, indices, causal);
  flashlite::set_key_index(call.grads, call.params, key_offsets, key_slots, q);
  set_dropout(call.params, dropout_p, dropout_seed, "cpu_gather_backward");
  Tensor entropy_terms;
  set_entropy(call.grads, q, entropy, entropy_terms, "cpu_gather_backward");
  flashlite::set_row_keep(call.params, row_keep, q, "cpu_gather_backward");
  {
    py::gil_scoped_release no_gil;
    flashlite::cpu::gather_backward(call.params, call.grads, threads());
  }
  return {call.dq, call.dk, call.dv};
}

// The top-k plan's index tensors (cpu/gather_rows.h): the same elements as
// flashlite/core/gather_rows.py's canonical_rows / key_index. `what` names the tensor argument.
void check_rows_argument(const Tensor& t, const char* fn, const char* what, int64_t seqlen_q, int64_t seqlen_k) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "flashlite: ", fn, ": ", what, " must be a CPU tensor, got one on ",
                    t.device());
  TORCH_CHECK_VALUE(t.dim() == 3 || t.dim() == 4, "flashlite: ", fn, ": ", what,
                    " must be 3-D [B, Hi, K] (a shared list) or 4-D [B, Hi, Nq, K], got ", t.dim(), "-D ",
                    t.sizes());
  TORCH_CHECK_VALUE(seqlen_q >= 0 && seqlen_k >= 0, "flashlite: ", fn, ": seqlen_q and seqlen_k must be >= 0, got ",
                    seqlen_q, " and ", seqlen_k);
  TORCH_CHECK_VALUE(t.dim() == 3 || t.size(2) == seqlen_q, "flashlite: ", fn, ": ", what,
                    " [B, Hi, Nq, K] must have Nq = seqlen_q = ", seqlen_q, ", got ", t.sizes());
}

Tensor cpu_canonical_rows(const Tensor& indices, int64_t seqlen_q, int64_t seqlen_k, bool causal) {
  check_rows_argument(indices, "cpu_canonical_rows", "indices", seqlen_q, seqlen_k);
  const at::ScalarType type = indices.scalar_type();
  TORCH_CHECK_VALUE(type == at::kInt || type == at::kLong,
                    "flashlite: cpu_canonical_rows: indices must be int32 or int64, got ", type);
  const Tensor in = indices.contiguous();
  Tensor rows = at::empty(in.sizes(), in.options().dtype(at::kLong));
  const bool per_query = in.dim() == 4;
  const int64_t blocks = in.size(0) * in.size(1), top_k = in.size(-1);
  {
    py::gil_scoped_release no_gil;
    if (type == at::kInt)
      flashlite::cpu::canonical_rows(in.data_ptr<int32_t>(), blocks, seqlen_q, seqlen_k, top_k, per_query, causal,
                                     rows.data_ptr<int64_t>(), threads());
    else
      flashlite::cpu::canonical_rows(in.data_ptr<int64_t>(), blocks, seqlen_q, seqlen_k, top_k, per_query, causal,
                                     rows.data_ptr<int64_t>(), threads());
  }
  return rows;
}

std::tuple<Tensor, Tensor> cpu_key_index(const Tensor& rows, int64_t seqlen_q, int64_t seqlen_k, bool causal) {
  check_rows_argument(rows, "cpu_key_index", "rows", seqlen_q, seqlen_k);
  TORCH_CHECK_VALUE(rows.scalar_type() == at::kLong && rows.is_contiguous(),
                    "flashlite: cpu_key_index: rows must be int64 and contiguous (canonical rows, as cpu_canonical_rows "
                    "returns them), got ", rows.scalar_type(), rows.is_contiguous() ? "" : " non-contiguous");
  const int64_t blocks = rows.size(0) * rows.size(1), top_k = rows.size(-1);
  Tensor key_offsets = at::empty({blocks * seqlen_k + 1}, rows.options());
  Tensor key_slots = at::empty({blocks * seqlen_q * top_k}, rows.options());
  {
    py::gil_scoped_release no_gil;
    flashlite::cpu::key_index(rows.data_ptr<int64_t>(), blocks, seqlen_q, seqlen_k, top_k, rows.dim() == 4, causal,
                              key_offsets.data_ptr<int64_t>(), key_slots.data_ptr<int64_t>(), threads());
  }
  return {key_offsets, key_slots};
}

// The dropout words the kernels draw (the active build's vector Philox): int64 [count], entry t =
// Philox4x32-10 word 0 at counter start + t under seed (flashlite.core.dropout.philox_words).
Tensor cpu_dropout_words(int64_t seed, int64_t start, int64_t count) {
  TORCH_CHECK_VALUE(start >= 0 && count >= 0 && count <= (int64_t(1) << 30),
                    "flashlite: cpu_dropout_words: start must be >= 0 and count in [0, 2^30], got ", start, " and ",
                    count);
  std::vector<uint32_t> words(static_cast<size_t>(count));
  flashlite::cpu::dropout_words(static_cast<uint64_t>(seed), static_cast<uint64_t>(start), count, words.data());
  Tensor out = at::empty({count}, at::kLong);
  int64_t* data = out.data_ptr<int64_t>();
  for (int64_t t = 0; t < count; ++t) data[t] = words[size_t(t)];
  return out;
}

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (const char* name : flashlite::cpu::available_isas()) names.emplace_back(name);
  return names;
}

void cpu_set_isa(const std::string& name) {
  TORCH_CHECK_VALUE(flashlite::cpu::set_isa(name.c_str()), "flashlite: cpu_set_isa: '", name,
                    "' is not one of this CPU's kernel builds ", cpu_isas());
}

py::dict peak_dict(const flashlite::cpu::PeakResult& r, const char* unit) {
  py::dict out;
  out[unit] = r.best;
  out[(std::string("median_") + unit).c_str()] = r.median;
  out["trials"] = r.trials;
  out["threads"] = r.threads;
  out["trial_seconds"] = r.trial_seconds;
  return out;
}

// The processor's FMA limit (csrc/cpu/peak.h): GFLOP/s of the fastest trial and how it was measured.
py::dict cpu_fma_peak(int64_t threads, double seconds, const std::string& isa) {
  TORCH_CHECK_VALUE(seconds >= 0 && seconds <= 60, "flashlite: cpu_fma_peak: seconds must be in [0, 60], got ",
                    seconds);
  flashlite::cpu::PeakResult r;
  bool ran = false;
  {
    py::gil_scoped_release no_gil;
    ran = flashlite::cpu::fma_peak(isa.c_str(), static_cast<int>(threads), seconds, &r);
  }
  TORCH_CHECK_VALUE(ran, "flashlite: cpu_fma_peak: '", isa, "' is not one of this CPU's kernel builds ", cpu_isas());
  py::dict out = peak_dict(r, "gflops");
  out["isa"] = std::string(r.isa);
  out["lanes"] = r.lanes;
  out["accumulators"] = r.accumulators;
  out["flops_per_trial"] = r.work_per_trial;
  return out;
}

// Memory bandwidth of a stream copy (csrc/cpu/peak.h): GB/s (2 bytes per byte copied) of the fastest trial.
py::dict cpu_stream_copy(int64_t threads, int64_t bytes, double seconds) {
  TORCH_CHECK_VALUE(bytes > 0 && bytes <= (int64_t(1) << 34), "flashlite: cpu_stream_copy: bytes must be in (0, 16 GiB]");
  TORCH_CHECK_VALUE(seconds >= 0 && seconds <= 60, "flashlite: cpu_stream_copy: seconds must be in [0, 60]");
  flashlite::cpu::PeakResult r;
  {
    py::gil_scoped_release no_gil;
    flashlite::cpu::stream_copy(static_cast<int>(threads), bytes, seconds, &r);
  }
  py::dict out = peak_dict(r, "gbps");
  out["bytes_per_trial"] = r.work_per_trial;
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flashlite C++ kernels (CPU always; CUDA when built with it)";
  m.def("cpu_tile_config", &cpu_tile_config, py::arg("head_dim"), py::arg("dtype"), py::arg("block_size"),
        "(block_m, block_n) of the CPU tile engine; block_size 0 = no block-sparse constraint");
  m.def("cpu_tile_forward", &cpu_tile_forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("kv_tiles"),
        py::arg("kv_count"), py::arg("alibi_slopes"), py::arg("is_list"), py::arg("block_m"), py::arg("block_n"),
        py::arg("window_left"), py::arg("window_right"), py::arg("scale"), py::arg("softcap"),
        py::arg("q_items") = py::none(), py::arg("k_items") = py::none(), py::arg("cu_seqlens_q") = py::none(),
        py::arg("cu_seqlens_k") = py::none(), py::arg("dropout_p") = 0.0, py::arg("dropout_seed") = 0,
        py::arg("row_stats") = py::none(), py::arg("sink_tokens") = 0, py::arg("block_table") = py::none(),
        py::arg("cache_seqlens") = py::none(), py::arg("page_size") = 0, py::arg("tile_counter") = py::none(),
        "tile engine forward -> (out, lse); q_items/k_items/cu_seqlens_q/cu_seqlens_k: a packed batch's work items; "
        "dropout_p (0 = off) / dropout_seed: attention dropout; row_stats (float32 [5, B, Hq, Nq], None = off) / "
        "sink_tokens: filled with the head statistics; block_table/cache_seqlens/page_size: keys in a paged cache "
        "(k, v: the pool as [B, Hkv, num_pages*page_size, D]); tile_counter (debug, int32 [B*Hq*rows], zeroed by "
        "the caller): the key tiles each (b, h, schedule row) visited are added (docs/native_abi.md)");
  m.def("cpu_tile_backward", &cpu_tile_backward, py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("kv_tiles"), py::arg("kv_count"), py::arg("q_tiles"),
        py::arg("q_count"), py::arg("alibi_slopes"), py::arg("is_list"), py::arg("block_m"), py::arg("block_n"),
        py::arg("window_left"), py::arg("window_right"), py::arg("scale"), py::arg("softcap"),
        py::arg("deterministic"), py::arg("q_items") = py::none(), py::arg("k_items") = py::none(),
        py::arg("cu_seqlens_q") = py::none(), py::arg("cu_seqlens_k") = py::none(), py::arg("dropout_p") = 0.0,
        py::arg("dropout_seed") = 0, py::arg("entropy") = py::none(),
        "tile engine backward -> (dq, dk, dv); q_items/k_items/cu_seqlens_q/cu_seqlens_k: a packed batch's work "
        "items; dropout_p / dropout_seed: the forward's; entropy (float32 [2, B, Hq, Nq]: g, g*(lse - H); None = "
        "off): the entropy's gradient (docs/native_abi.md)");
  m.def("cpu_gather_forward", &cpu_gather_forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("indices"),
        py::arg("alibi_slopes"), py::arg("causal"), py::arg("scale"), py::arg("softcap"), py::arg("dropout_p") = 0.0,
        py::arg("dropout_seed") = 0, py::arg("row_stats") = py::none(), py::arg("sink_tokens") = 0,
        py::arg("row_keep") = py::none(),
        "gather (top-k) forward -> (out, lse); dropout_p (0 = off) / dropout_seed: attention dropout; row_stats / "
        "sink_tokens: the head statistics; row_keep (uint8 [B, Hq, Nq], None = all): the head mask, a masked row "
        "visits no key (docs/native_abi.md)");
  m.def("cpu_gather_backward", &cpu_gather_backward, py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("indices"), py::arg("key_offsets"), py::arg("key_slots"),
        py::arg("alibi_slopes"), py::arg("causal"), py::arg("scale"), py::arg("softcap"), py::arg("deterministic"),
        py::arg("dropout_p") = 0.0, py::arg("dropout_seed") = 0, py::arg("entropy") = py::none(),
        py::arg("row_keep") = py::none(),
        "gather (top-k) backward -> (dq, dk, dv); key_offsets/key_slots: the key -> slot index of indices; "
        "dropout_p / dropout_seed: the forward's; entropy: the entropy's gradient terms; row_keep: the forward's "
        "head mask (docs/native_abi.md)");
  m.def("cpu_canonical_rows", &cpu_canonical_rows, py::arg("indices"), py::arg("seqlen_q"), py::arg("seqlen_k"),
        py::arg("causal"),
        "canonical top-k rows (int64, indices' shape): flashlite.core.gather_rows.canonical_rows, element for "
        "element");
  m.def("cpu_key_index", &cpu_key_index, py::arg("rows"), py::arg("seqlen_q"), py::arg("seqlen_k"),
        py::arg("causal"),
        "the key -> slot index of canonical rows -> (key_offsets [B*Hi*Nk + 1], key_slots [B*Hi*Nq*K]): "
        "flashlite.core.gather_rows.key_index, element for element");
  m.def("cpu_dropout_words", &cpu_dropout_words, py::arg("seed"), py::arg("start"), py::arg("count"),
        "attention dropout's random words as the CPU kernels draw them -> int64 [count]: Philox4x32-10 word 0 at "
        "counters start .. start + count - 1 (flashlite.core.dropout.philox_words)");
  m.def("cpu_isa", [] { return std::string(flashlite::cpu::isa()); }, "instruction-set build of the CPU kernels in use");
  m.def("cpu_isas", &cpu_isas, "instruction-set builds this CPU can run, best first");
  m.def("cpu_set_isa", &cpu_set_isa, py::arg("name"), "use another runnable build (tests, benchmarks)");
  m.def("cpu_fma_peak", &cpu_fma_peak, py::arg("threads") = 0, py::arg("seconds") = 0.5, py::arg("isa") = "",
        "float32 FMA GFLOP/s of a register-resident loop on `threads` threads (0: the OpenMP default) with the "
        "`isa` build's vectors ('' = the kernels' build) -> {gflops, median_gflops, trials, threads, isa, lanes, "
        "accumulators, ...}");
  m.def("cpu_stream_copy", &cpu_stream_copy, py::arg("threads") = 0, py::arg("bytes") = int64_t(1) << 28,
        py::arg("seconds") = 0.5,
        "memory bandwidth of a copy of `bytes` on `threads` threads -> {gbps (2 bytes per byte copied), ...}");
#ifdef FLASHLITE_WITH_CUDA
  flashlite_register_cuda(m);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
