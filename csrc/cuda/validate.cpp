// Argument checks and kernel arguments (validate.h).
#include "cuda/validate.h"

#include <cstdint>

#include "cuda/host_errors.h"
#include "cuda/tiles.h"

namespace flashlite::cuda::detail {
namespace {

// Every row of a [B, H, N, head_dim] operand starts on a `bytes` boundary and spans whole units.
bool rows_aligned(const void* ptr, const Strides3& s, int elem, int bytes, int head_dim) {
  if (ptr == nullptr) return true;
  if (reinterpret_cast<uintptr_t>(ptr) % bytes != 0) return false;
  const int64_t unit = bytes / elem;
  if (unit <= 1) return true;
  return s.batch % unit == 0 && s.head % unit == 0 && s.row % unit == 0 && head_dim % unit == 0;
}

}  // namespace

int elem_bytes(DType d) { return d == DType::kFloat32 ? 4 : 2; }

const char* dtype_name(DType d) {
  return d == DType::kFloat16 ? "float16" : d == DType::kBFloat16 ? "bfloat16" : "float32";
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

cudaError_t validate_backward(const BackwardParams& g, const char* who) {
  if (!g.grad_out || !g.delta || !g.dq || !g.dk || !g.dv)
    return fail(cudaErrorInvalidValue, "%s: grad_out, delta, dq, dk and dv must be device pointers", who);
  return cudaSuccess;
}

ForwardArgs forward_args(const AttentionParams& p) {
  ForwardArgs a;
  a.p = p;
  a.math = make_score_math(p);
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
  a.math = make_score_math(p);
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

}  // namespace flashlite::cuda::detail
