// Host side of the CUDA kernels: tile sizes, planning (which kernel family, decode packing,
// split-key count), workspace layout, the split combine and fp32->dtype conversion kernels, and
// error reporting. See launch.h for what is supported.
#include "cuda/launch.h"

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

#include "cuda/common.cuh"
#include "cuda/dispatch.h"
#include "cuda/simt.cuh"
#include "cuda/tiles.h"

namespace flashlite::cuda {
namespace detail {
namespace {

thread_local std::string g_error;

cudaError_t fail(cudaError_t code, const char* fmt, ...) {
  char buf[640];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  g_error = buf;
  if (code != cudaSuccess) {
    g_error += " (";
    g_error += cudaGetErrorString(code);
    g_error += ")";
  }
  return code;
}

// A kernel launch result: on failure, name the step and the CUDA error.
cudaError_t checked(cudaError_t code, const char* step) {
  if (code == cudaSuccess) return code;
  return fail(code, "flashlite CUDA: %s failed", step);
}

struct DeviceInfo {
  int sms = 1;
  size_t smem_optin = 48 * 1024;
};

DeviceInfo device_info() {
  constexpr int kMaxDevices = 128;
  static std::mutex mu;
  static DeviceInfo cache[kMaxDevices];
  static bool known[kMaxDevices] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    cudaGetLastError();  // clear
    // No device: FLASHLITE_CUDA_ASSUME_DEVICE="<SMs>:<opt-in shared memory bytes>" lets the
    // compile tests exercise the host planning (tile_config, splits) on a CPU-only machine.
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
  std::lock_guard<std::mutex> lock(mu);
  if (!known[dev]) {
    int sms = 0, smem = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
      cudaGetLastError();
      return DeviceInfo{};
    }
    cache[dev].sms = std::max(sms, 1);
    cache[dev].smem_optin = static_cast<size_t>(std::max(smem, 48 * 1024));
    known[dev] = true;
  }
  return cache[dev];
}

// Debug switches (read once): isolate a kernel family when hunting a wrong result on a GPU.
//   FLASHLITE_CUDA_SIMT_ONLY=1   tile_config picks SIMT tiles for every dtype (no tensor cores)
//   FLASHLITE_CUDA_NO_DECODE=1   no decode packing and no split keys (plain one-block-per-tile grid)
bool env_flag(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] == '1';
}
bool simt_only() {
  static const bool flag = env_flag("FLASHLITE_CUDA_SIMT_ONLY");
  return flag;
}
bool no_decode() {
  static const bool flag = env_flag("FLASHLITE_CUDA_NO_DECODE");
  return flag;
}

int elem_bytes(DType d) { return d == DType::kFloat32 ? 4 : 2; }
const char* dtype_name(DType d) {
  return d == DType::kFloat16 ? "float16" : d == DType::kBFloat16 ? "bfloat16" : "float32";
}

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

// Every row of a [B, H, N, head_dim] operand starts on a `bytes` boundary and spans whole units.
bool rows_aligned(const void* ptr, const Strides3& s, int elem, int bytes, int head_dim) {
  if (ptr == nullptr) return true;
  if (reinterpret_cast<uintptr_t>(ptr) % bytes != 0) return false;
  const int64_t unit = bytes / elem;
  if (unit <= 1) return true;
  return s.batch % unit == 0 && s.head % unit == 0 && s.row % unit == 0 && head_dim % unit == 0;
}

struct MmaSmem {
  size_t fwd = 0, kv1 = 0, q1 = 0;
};

bool mma_smem(int D, int bm, int bn, MmaSmem* out) {
#define FL_SMEM(d, m, n)                              \
  if (D == d && bm == m && bn == n) {                 \
    out->fwd = FwdTile<d, m, n>::kSmemBytes;          \
    out->kv1 = BwdTile<d, m, n>::kv_smem(1);          \
    out->q1 = BwdTile<d, m, n>::q_smem(1);            \
    return true;                                      \
  }
  FLASHLITE_MMA_TILES(FL_SMEM)
#undef FL_SMEM
  return false;
}

// The forward and (single-stage) backward kernels of a tensor-core shape fit the device.
bool mma_fits(int D, int bm, int bn, size_t limit) {
  MmaSmem s;
  return mma_smem(D, bm, bn, &s) && s.fwd <= limit && s.kv1 <= limit && s.q1 <= limit;
}

bool uses_mma(const AttentionParams& p) { return p.dtype != DType::kFloat32 && p.block_m != kSimtRows; }

bool empty_problem(const AttentionParams& p) { return p.batch == 0 || p.heads_q == 0 || p.seqlen_q == 0; }

cudaError_t validate(const AttentionParams& p, const char* who) {
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0)
    return fail(cudaErrorInvalidValue, "%s: heads_q=%d must be a positive multiple of heads_kv=%d", who, p.heads_q,
                p.heads_kv);
  if (p.head_dim < 1 || p.head_dim > 256)
    return fail(cudaErrorInvalidValue, "%s: head_dim=%d outside 1..256", who, p.head_dim);
  if (p.seqlen_q < 0 || p.seqlen_k < 0 || p.batch < 0)
    return fail(cudaErrorInvalidValue, "%s: negative sizes (B=%d, Nq=%d, Nk=%d)", who, p.batch, p.seqlen_q,
                p.seqlen_k);
  if (!p.q || !p.k || !p.v || !p.lse)
    return fail(cudaErrorInvalidValue, "%s: q, k, v and lse must be device pointers", who);
  return cudaSuccess;
}

cudaError_t validate_tiles(const AttentionParams& p, const char* who) {
  if (!p.forward_schedule.tiles || !p.forward_schedule.count)
    return fail(cudaErrorInvalidValue, "%s: the forward schedule (kv_tiles, kv_count) is missing", who);
  if (uses_mma(p)) {
    const int D = mma_head_dim(p.head_dim);
    if (!mma_tile_supported(D, p.block_m, p.block_n))
      return fail(cudaErrorInvalidValue,
                  "%s: tile (block_m=%d, block_n=%d) is not a tensor-core shape for head_dim %d (%s); "
                  "build the schedule with cuda_tile_config()",
                  who, p.block_m, p.block_n, p.head_dim, dtype_name(p.dtype));
  } else if (p.block_m != kSimtRows || (p.block_n != 16 && p.block_n != 32)) {
    return fail(cudaErrorInvalidValue,
                "%s: tile (block_m=%d, block_n=%d) is not a SIMT shape (16, 16|32) for %s; build the schedule "
                "with cuda_tile_config()",
                who, p.block_m, p.block_n, dtype_name(p.dtype));
  }
  return cudaSuccess;
}

ScoreMath score_math(const AttentionParams& p) { return make_score_math(p); }

ForwardArgs forward_args(const AttentionParams& p) {
  ForwardArgs a;
  a.p = p;
  a.math = score_math(p);
  const int e = elem_bytes(p.dtype);
  a.aligned16 = rows_aligned(p.q, p.q_strides, e, 16, p.head_dim) && rows_aligned(p.k, p.k_strides, e, 16, p.head_dim) &&
                rows_aligned(p.v, p.v_strides, e, 16, p.head_dim) &&
                rows_aligned(p.out, p.out_strides, e, 16, p.head_dim);
  a.aligned4 = rows_aligned(p.q, p.q_strides, e, 4, p.head_dim) && rows_aligned(p.k, p.k_strides, e, 4, p.head_dim) &&
               rows_aligned(p.v, p.v_strides, e, 4, p.head_dim);
  return a;
}

BackwardArgs backward_args(const AttentionParams& p, const BackwardParams& g) {
  BackwardArgs a;
  a.p = p;
  a.g = g;
  a.math = score_math(p);
  const int e = elem_bytes(p.dtype), hd = p.head_dim;
  a.aligned16 = rows_aligned(p.q, p.q_strides, e, 16, hd) && rows_aligned(p.k, p.k_strides, e, 16, hd) &&
                rows_aligned(p.v, p.v_strides, e, 16, hd) &&
                rows_aligned(g.grad_out, g.grad_out_strides, e, 16, hd) &&
                rows_aligned(g.dq, g.dq_strides, e, 16, hd) && rows_aligned(g.dk, g.dk_strides, e, 16, hd) &&
                rows_aligned(g.dv, g.dv_strides, e, 16, hd);
  a.aligned4 = rows_aligned(p.q, p.q_strides, e, 4, hd) && rows_aligned(p.k, p.k_strides, e, 4, hd) &&
               rows_aligned(p.v, p.v_strides, e, 4, hd) && rows_aligned(g.grad_out, g.grad_out_strides, e, 4, hd);
  return a;
}

cudaError_t validate_backward(const BackwardParams& g, const char* who) {
  if (!g.grad_out || !g.delta || !g.dq || !g.dk || !g.dv)
    return fail(cudaErrorInvalidValue, "%s: grad_out, delta, dq, dk and dv must be device pointers", who);
  return cudaSuccess;
}

// ---- split-key (Flash-Decoding) planning ----------------------------------------------------------
struct ForwardPlan {
  bool mma = false;
  int D = 0;                // head-dim template (MMA)
  int kernel_bm = 0;        // block_m of the launched MMA kernel (64 when packed)
  int heads_per_block = 0;  // > 0: packed decode layout
  int64_t blocks = 0;       // blocks per split
  int64_t max_steps = 0;    // upper bound of key steps per block
  int splits = 1;
};

// Split the keys only when the grid is less than one wave and every split keeps >= 4 steps.
int choose_splits(int64_t blocks, int64_t max_steps, int sms) {
  if (blocks <= 0 || blocks >= sms || max_steps < 8 || no_decode()) return 1;
  int64_t s = (2 * static_cast<int64_t>(sms) + blocks - 1) / blocks;
  s = std::min<int64_t>(s, max_steps / 4);
  s = std::min<int64_t>(s, 128);
  return static_cast<int>(std::max<int64_t>(s, 1));
}

ForwardPlan plan_tile_forward(const AttentionParams& p) {
  ForwardPlan plan;
  if (uses_mma(p)) {
    plan.mma = true;
    plan.D = mma_head_dim(p.head_dim);
    const int num_q_tiles = (p.seqlen_q + p.block_m - 1) / p.block_m;
    const ScheduleView& fs = p.forward_schedule;
    if (num_q_tiles == 1 && p.seqlen_q <= kDecodeRows && mma_tile_supported(plan.D, kDecodeRows, p.block_n) &&
        !no_decode()) {
      // Decode: (head, query) rows of one KV head's group share a block when the schedule is
      // the same for every head.
      const int G = p.heads_q / p.heads_kv;
      const bool head_shared = fs.count_stride_h == 0 && fs.tiles_stride_h == 0;
      int hpb = 1;
      if (head_shared)
        for (int d = G; d >= 1; --d)
          if (G % d == 0 && d * p.seqlen_q <= kDecodeRows) {
            hpb = d;
            break;
          }
      plan.kernel_bm = kDecodeRows;
      plan.heads_per_block = hpb;
      plan.blocks = static_cast<int64_t>(p.batch) * (p.heads_q / hpb);
    } else {
      plan.kernel_bm = p.block_m;
      plan.blocks = static_cast<int64_t>(num_q_tiles) * p.batch * p.heads_q;
    }
    plan.max_steps = (p.seqlen_k + p.block_n - 1) / p.block_n;
  } else {
    plan.blocks = TileRows::num_blocks(p);
    plan.max_steps = TileRows::max_steps(p);
  }
  plan.splits = choose_splits(plan.blocks, plan.max_steps, device_info().sms);
  return plan;
}

AttentionParams gather_view(const AttentionParams& p) {
  AttentionParams q = p;
  const int32_t big = p.seqlen_q + p.seqlen_k;  // "unbounded" band side
  q.window_left = big;
  q.window_right = p.causal ? 0 : big;
  return q;
}

ForwardPlan plan_gather_forward(const AttentionParams& p) {
  ForwardPlan plan;
  plan.blocks = GatherRows::num_blocks(p);
  plan.max_steps = GatherRows::max_steps(p);
  plan.splits = choose_splits(plan.blocks, plan.max_steps, device_info().sms);
  return plan;
}

size_t split_bytes(const AttentionParams& p, int splits) {
  if (splits <= 1) return 0;
  const size_t rows = static_cast<size_t>(p.batch) * p.heads_q * p.seqlen_q;
  return static_cast<size_t>(splits) * rows * (static_cast<size_t>(p.head_dim) + 1) * sizeof(float);
}

SplitOutput split_output(const AttentionParams& p, int splits, void* workspace) {
  SplitOutput s;
  s.rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
  if (splits <= 1 || workspace == nullptr) return s;
  s.num_splits = splits;
  s.out = static_cast<float*>(workspace);
  s.lse = s.out + static_cast<int64_t>(splits) * s.rows * p.head_dim;
  return s;
}

// ---- small kernels: merge split partials; fp32 accumulators -> output dtype ------------------------
struct CombineArgs {
  AttentionParams p;
  SplitOutput split;
};

// One warp per row: lse = log Σ_s exp(lse_s); out = Σ_s exp(lse_s − lse)·out_s.
template <typename T>
__global__ void __launch_bounds__(128) combine_splits_kernel(const __grid_constant__ CombineArgs args) {
  const AttentionParams& p = args.p;
  const SplitOutput& split = args.split;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t rid = static_cast<int64_t>(blockIdx.x) * 4 + warp;
  if (rid >= split.rows) return;
  const int i = static_cast<int>(rid % p.seqlen_q);
  const int64_t bh = rid / p.seqlen_q;
  const int h = static_cast<int>(bh % p.heads_q), b = static_cast<int>(bh / p.heads_q);
  const int S = split.num_splits, hd = p.head_dim;
  T* out_row = row_ptr_mut<T>(p.out, p.out_strides, b, h, i);
  float mx = -INFINITY;
  for (int s = lane; s < S; s += 32) mx = fmaxf(mx, split.lse[s * split.rows + rid]);
  mx = warp_max(mx);
  if (mx == -INFINITY) {  // no split saw a key
    for (int col = lane; col < hd; col += 32) out_row[col] = Elem<T>::from_float(0.f);
    if (lane == 0) p.lse[rid] = -INFINITY;
    return;
  }
  float sum = 0.f;
  for (int s = lane; s < S; s += 32) sum += expf(split.lse[s * split.rows + rid] - mx);
  sum = warp_sum(sum);
  const float lse = mx + logf(sum);
  for (int col = lane; col < hd; col += 32) {
    float acc = 0.f;
    for (int s = 0; s < S; ++s) {
      const float w = expf(split.lse[s * split.rows + rid] - lse);
      if (w > 0.f) acc += w * split.out[(s * split.rows + rid) * hd + col];
    }
    out_row[col] = Elem<T>::from_float(acc);
  }
  if (lane == 0) p.lse[rid] = lse;
}

struct ConvertArgs {
  const float* src;  // [rows, head_dim], row = (b·heads + h)·seqlen + n
  void* dst;         // strided [B, heads, seqlen, head_dim]
  Strides3 st;
  int heads, seqlen, head_dim;
  int64_t rows;
};

template <typename T>
__global__ void __launch_bounds__(128) accum_to_tensor_kernel(const __grid_constant__ ConvertArgs a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t rid = static_cast<int64_t>(blockIdx.x) * 4 + warp;
  if (rid >= a.rows) return;
  const int n = static_cast<int>(rid % a.seqlen);
  const int64_t bh = rid / a.seqlen;
  const int h = static_cast<int>(bh % a.heads), b = static_cast<int>(bh / a.heads);
  T* row = row_ptr_mut<T>(a.dst, a.st, b, h, n);
  for (int col = lane; col < a.head_dim; col += 32) row[col] = Elem<T>::from_float(a.src[rid * a.head_dim + col]);
}

template <typename T>
cudaError_t combine_splits(const AttentionParams& p, const SplitOutput& split, cudaStream_t stream) {
  const int64_t blocks = (split.rows + 3) / 4;
  if (blocks == 0) return cudaSuccess;
  return checked(launch_with_smem(combine_splits_kernel<T>, dim3(static_cast<unsigned>(blocks)), 128, 0, stream,
                                  CombineArgs{p, split}),
                 "combine_splits_kernel launch");
}

template <typename T>
cudaError_t accum_to_tensor(const float* src, void* dst, const Strides3& st, int batch, int heads, int seqlen,
                            int head_dim, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(batch) * heads * seqlen;
  const int64_t blocks = (rows + 3) / 4;
  if (blocks == 0) return cudaSuccess;
  return checked(launch_with_smem(accum_to_tensor_kernel<T>, dim3(static_cast<unsigned>(blocks)), 128, 0, stream,
                                  ConvertArgs{src, dst, st, heads, seqlen, head_dim, rows}),
                 "accum_to_tensor_kernel launch");
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
  const ForwardPlan plan = plan_tile_forward(p);
  ForwardArgs args = forward_args(p);
  args.split = split_output(p, plan.splits, workspace);
  args.heads_per_block = plan.heads_per_block;
  const size_t smem_limit = device_info().smem_optin;
  return with_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    cudaError_t e = cudaSuccess;
    if constexpr (is_16bit<T>()) {
      if (plan.mma) {
        e = mma_forward_dispatch<T>(args, plan.D, plan.kernel_bm, p.block_n, plan.blocks, stream);
        if (e == cudaErrorInvalidValue)
          return fail(e, "%s: no tensor-core kernel for head_dim template %d, tile (%d, %d)", who, plan.D,
                      plan.kernel_bm, p.block_n);
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
  const size_t smem_limit = device_info().smem_optin;
  return with_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    if constexpr (is_16bit<T>()) {
      if (uses_mma(p)) {
        const int D = mma_head_dim(p.head_dim);
        const bool atomic_dq = !g.deterministic && workspace != nullptr;
        if (atomic_dq) {
          args.dq_accum = static_cast<float*>(workspace);
          cudaError_t e = memset_async(workspace, 0, tile_backward_workspace_bytes(p), stream);
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
  const ForwardPlan plan = plan_gather_forward(p);
  ForwardArgs args = forward_args(p);
  args.split = split_output(p, plan.splits, workspace);
  const size_t smem_limit = device_info().smem_optin;
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
  if (!atomic && (!g.key_offsets || !g.key_rows))
    return fail(cudaErrorInvalidValue,
                "%s: the deterministic top-k backward needs BackwardParams::key_offsets/key_rows (the query rows "
                "selecting each key); pass deterministic=false with a workspace for the atomic path",
                who);
  const size_t kv_elems = static_cast<size_t>(p.batch) * p.heads_kv * p.seqlen_k * p.head_dim;
  if (atomic) {
    args.dk_accum = static_cast<float*>(workspace);
    args.dv_accum = args.dk_accum + kv_elems;
    const cudaError_t e = memset_async(workspace, 0, 2 * kv_elems * sizeof(float), stream);
    if (e != cudaSuccess) return checked(e, "cudaMemsetAsync(dk/dv accumulators)");
  }
  const size_t smem_limit = device_info().smem_optin;
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

// ---- tile sizes ------------------------------------------------------------------------------------
// FLASHLITE_CUDA_TILES="<block_m>x<block_n>" (tuning): prefer that tensor-core shape when it is
// instantiated for the head dim, fits the device and divides the block size.
bool preferred_tiles(int* block_m, int* block_n) {
  static const std::pair<int, int> preferred = [] {
    int m = 0, n = 0;
    const char* spec = std::getenv("FLASHLITE_CUDA_TILES");
    if (spec == nullptr || std::sscanf(spec, "%dx%d", &m, &n) != 2) m = n = 0;
    return std::make_pair(m, n);
  }();
  *block_m = preferred.first;
  *block_n = preferred.second;
  return preferred.first > 0;
}

void tile_config_impl(int head_dim, DType dtype, int block_size, int* block_m, int* block_n) {
  if (dtype != DType::kFloat32 && !simt_only()) {
    const int D = mma_head_dim(head_dim);
    const size_t limit = device_info().smem_optin;
    int want_m = 0, want_n = 0;
    if (preferred_tiles(&want_m, &want_n) && mma_tile_supported(D, want_m, want_n) &&
        (block_size <= 0 || (block_size % want_m == 0 && block_size % want_n == 0)) &&
        mma_fits(D, want_m, want_n, limit)) {
      *block_m = want_m;
      *block_n = want_n;
      return;
    }
#define FL_PICK(d, m, n)                                                                                  \
  if (D == d && (block_size <= 0 || (block_size % m == 0 && block_size % n == 0)) && mma_fits(d, m, n, limit)) { \
    *block_m = m;                                                                                         \
    *block_n = n;                                                                                         \
    return;                                                                                               \
  }
    FLASHLITE_MMA_TILES(FL_PICK)
#undef FL_PICK
  }
  *block_m = kSimtRows;
  *block_n = (block_size <= 0 || block_size % 32 == 0) ? 32 : 16;
}

}  // namespace detail

// ---- the ABI ---------------------------------------------------------------------------------------
void tile_config(int head_dim, DType dtype, int block_size, int* block_m, int* block_n) {
  detail::tile_config_impl(head_dim, dtype, block_size, block_m, block_n);
}

cudaError_t tile_forward(const AttentionParams& p, cudaStream_t stream) {
  return detail::tile_forward_impl(p, nullptr, stream);
}

cudaError_t tile_forward(const AttentionParams& p, void* workspace, cudaStream_t stream) {
  return detail::tile_forward_impl(p, workspace, stream);
}

size_t tile_forward_workspace_bytes(const AttentionParams& p) {
  if (detail::empty_problem(p) || p.heads_kv <= 0 || p.block_m <= 0 || p.block_n <= 0) return 0;
  return detail::split_bytes(p, detail::plan_tile_forward(p).splits);
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
  return detail::split_bytes(p, detail::plan_gather_forward(p).splits);
}

cudaError_t gather_backward(const AttentionParams& p, const BackwardParams& g, void* workspace,
                            cudaStream_t stream) {
  return detail::gather_backward_impl(p, g, workspace, stream);
}

size_t gather_backward_workspace_bytes(const AttentionParams& p) {
  return 2 * static_cast<size_t>(p.batch) * p.heads_kv * p.seqlen_k * p.head_dim * sizeof(float);
}

const char* last_error_message() { return detail::g_error.c_str(); }

}  // namespace flashlite::cuda
