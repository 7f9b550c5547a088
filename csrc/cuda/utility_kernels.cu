// The split-key combine and the fp32 -> dtype conversion kernels, and their launchers
// (utility_kernels.h), instantiated for the three dtypes.
#include "cuda/utility_kernels.h"

#include <cstring>

#include "cuda/elem.cuh"
#include "cuda/global_rows.cuh"
#include "cuda/host_errors.h"
#include "cuda/kernel_launch.cuh"
#include "cuda/warp_reduce.cuh"

namespace flashlite::cuda::detail {
namespace {

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

}  // namespace

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

cudaError_t zero_async(void* ptr, size_t bytes, cudaStream_t stream) {
#if FL_EMULATED
  (void)stream;
  std::memset(ptr, 0, bytes);
  return cudaSuccess;
#else
  return cudaMemsetAsync(ptr, 0, bytes, stream);
#endif
}

#define FL_INSTANTIATE(T)                                                                             \
  template cudaError_t combine_splits<T>(const AttentionParams&, const SplitOutput&, cudaStream_t); \
  template cudaError_t accum_to_tensor<T>(const float*, void*, const Strides3&, int, int, int, int, cudaStream_t);
FL_INSTANTIATE(float)
FL_INSTANTIATE(__half)
FL_INSTANTIATE(__nv_bfloat16)
#undef FL_INSTANTIATE

}  // namespace flashlite::cuda::detail
