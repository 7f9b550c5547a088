// SIMT gather engine (top-k; simt_engine.cuh with the GatherRows policy). GatherRows: (query,
// query head) pairs that share an index list: the heads of one KV head's GQA group for one query
// (per-query indices), or (query, head) pairs in order (indices shared by every query); the KV rows
// gathered for a step serve every row of the block. Backward: dQ per row block, and dK/dV either
// scattered with fp32 atomics from the same kernel, or deterministic per key over the inverse
// index (gather_key_grads_kernel).
#pragma once

#include "cuda/debug_env.h"
#include "cuda/engine_launchers.h"
#include "cuda/simt_engine.cuh"
#include "cuda/simt_grid.h"

namespace flashlite::cuda::detail {

struct GatherRows {
  static constexpr bool kStats = false;  // WithStats<GatherRows>: with head statistics
  static constexpr bool kGather = true;
  int b, kvh, g0, i_fixed;
  int64_t rb;
  bool per_query;
  const int64_t* list;

  __device__ GatherRows(const AttentionParams& p, int64_t block) {
    const int G = p.group();
    per_query = p.indices_stride_n != 0;
    const int64_t nrb = per_query ? static_cast<int64_t>(p.seqlen_q) * ((G + kSimtRows - 1) / kSimtRows)
                                  : (static_cast<int64_t>(p.seqlen_q) * G + kSimtRows - 1) / kSimtRows;
    rb = block % nrb;
    const int bkv = static_cast<int>(block / nrb);
    b = bkv / p.heads_kv;
    kvh = bkv % p.heads_kv;
    list = p.indices + b * p.indices_stride_b + kvh * p.indices_stride_h;
    g0 = 0;
    i_fixed = 0;
    if (per_query) {
      const int gblocks = (G + kSimtRows - 1) / kSimtRows;
      i_fixed = static_cast<int>(rb / gblocks);
      g0 = static_cast<int>(rb % gblocks) * kSimtRows;
      list += i_fixed * p.indices_stride_n;
    }
  }
  __device__ RowSlot row(const AttentionParams& p, int r) const {
    const int G = p.group();
    if (per_query) {
      const int g = g0 + r;
      return RowSlot{g < G, kvh * G + (g < G ? g : 0), i_fixed};
    }
    const int64_t f = rb * kSimtRows + r;
    const bool ok = f < static_cast<int64_t>(p.seqlen_q) * G;
    return RowSlot{ok, kvh * G + (ok ? static_cast<int>(f % G) : 0), ok ? static_cast<int>(f / G) : 0};
  }
  __device__ int num_steps(const AttentionParams& p) const { return (p.top_k + kSimtKeys - 1) / kSimtKeys; }
  __device__ int64_t key(const AttentionParams& p, int step, int slot) const {
    const int k = step * kSimtKeys + slot;
    return k < p.top_k ? list[k] : -1;
  }
};

// ---------------------------------------------------------------------------------------------
// Deterministic top-k dK/dV: one warp per (key, KV head, batch), over the query rows that select
// the key (the plan's inverse index g.key_offsets / g.key_slots: slots i·K + t, ascending) and the
// query heads of the group, in a fixed order. Lanes split the head dimension.
// ---------------------------------------------------------------------------------------------
// The query row i of a slot i·K + t. kWide: the slots may exceed 32 bits (Nq·K > 2^32 − 1); else a
// 32-bit division (a 64-bit one costs the kernel ~5 registers for a case that is almost never met).
template <bool kWide>
__device__ __forceinline__ int slot_row(int64_t slot, int top_k) {
  if constexpr (kWide) return static_cast<int>(slot / top_k);
  return static_cast<int>(static_cast<uint32_t>(slot) / static_cast<uint32_t>(top_k));
}

// kEntropy: with the entropy's gradient (g.entropy), dS = p·(dP − (δ − shift) − g·ln2·x2)·chain;
// its own kernel (gather_key_grads_entropy_kernel), so the plain one does not change.
template <typename T, int DC, bool kWide, bool kEntropy>
__device__ __forceinline__ void gather_key_grads(const BackwardArgs& args) {
  const AttentionParams& p = args.p;
  const BackwardParams& g = args.g;
  const ScoreMath& math = args.math;
  const int hd = p.head_dim;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int key_blocks = (p.seqlen_k + kSimtWarps - 1) / kSimtWarps;
  const int bkv = static_cast<int>(blockIdx.x / key_blocks);
  const int j = static_cast<int>(blockIdx.x % key_blocks) * kSimtWarps + warp;
  if (j >= p.seqlen_k) return;  // whole warp; no block-wide barriers below
  const int b = bkv / p.heads_kv, kvh = bkv % p.heads_kv, G = p.group();
  const int index_heads = p.index_heads;  // 1 or Hkv (checked by the launcher)
  const int hi = index_heads == 1 ? 0 : kvh;
  const int64_t seg = (static_cast<int64_t>(b) * index_heads + hi) * p.seqlen_k + j;
  const int64_t* const slots_end = g.key_slots + g.key_offsets[seg + 1];
  const int64_t shift = static_cast<int64_t>(p.seqlen_k) - p.seqlen_q;

  const T* k_row = row_ptr<T>(p.k, p.k_strides, b, kvh, j);
  const T* v_row = row_ptr<T>(p.v, p.v_strides, b, kvh, j);
  float kf[DC], vf[DC], acc_dk[DC], acc_dv[DC];
#pragma unroll
  for (int c = 0; c < DC; ++c) {
    const int col = lane + 32 * c;
    kf[c] = col < hd ? Elem<T>::to_float(k_row[col]) : 0.f;
    vf[c] = col < hd ? Elem<T>::to_float(v_row[col]) : 0.f;
    acc_dk[c] = acc_dv[c] = 0.f;
  }
  for (const int64_t* slot = g.key_slots + g.key_offsets[seg]; slot != slots_end; ++slot) {
    const int i = slot_row<kWide>(*slot, p.top_k);
    const int64_t pos = i + shift;
    if (p.causal && j > pos) continue;
    for (int gg = 0; gg < G; ++gg) {
      const int h = kvh * G + gg;
      const int64_t rid = row_id(p, b, h, i);
      const T* q_row = row_ptr<T>(p.q, p.q_strides, b, h, i);
      const T* do_row = row_ptr<T>(g.grad_out, g.grad_out_strides, b, h, i);
      float qf[DC], dof[DC], s = 0.f, dp = 0.f;
#pragma unroll
      for (int c = 0; c < DC; ++c) {
        const int col = lane + 32 * c;
        qf[c] = col < hd ? Elem<T>::to_float(q_row[col]) : 0.f;
        dof[c] = col < hd ? Elem<T>::to_float(do_row[col]) : 0.f;
        s += qf[c] * kf[c];
        dp += dof[c] * vf[c];
      }
      s = warp_sum(s);
      dp = warp_sum(dp);
      const float slope = math.has_alibi ? p.alibi(b, h) : 0.f;
      float pr, ds;
      if constexpr (kEntropy) {
        const int64_t plane = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
        const float x2 = math.log2_units(s, slope, pos, j);
        pr = exp2f(x2 - lse_log2(p.lse[rid]));
        ds = pr * (dp - g.delta[rid] + g.entropy[plane + rid] - g.entropy[rid] * kLn2 * x2) * math.cap_grad(s);
      } else {
        pr = exp2f(math.log2_units(s, slope, pos, j) - lse_log2(p.lse[rid]));
        ds = pr * (dp - g.delta[rid]) * math.cap_grad(s);
      }
#pragma unroll
      for (int c = 0; c < DC; ++c) {
        acc_dv[c] += pr * dof[c];
        acc_dk[c] += ds * qf[c];
      }
    }
  }
  T* dk_out = row_ptr_mut<T>(g.dk, g.dk_strides, b, kvh, j);
  T* dv_out = row_ptr_mut<T>(g.dv, g.dv_strides, b, kvh, j);
#pragma unroll
  for (int c = 0; c < DC; ++c) {
    const int col = lane + 32 * c;
    if (col < hd) {
      dk_out[col] = Elem<T>::from_float(acc_dk[c] * math.scale);
      dv_out[col] = Elem<T>::from_float(acc_dv[c]);
    }
  }
}

template <typename T, int DC, bool kWide>
__global__ void __launch_bounds__(kSimtThreads)
    gather_key_grads_kernel(const __grid_constant__ BackwardArgs args) {
  gather_key_grads<T, DC, kWide, false>(args);
}

template <typename T, int DC, bool kWide>
__global__ void __launch_bounds__(kSimtThreads)
    gather_key_grads_entropy_kernel(const __grid_constant__ BackwardArgs args) {
  gather_key_grads<T, DC, kWide, true>(args);
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------
template <typename T>
cudaError_t simt_gather_forward(ForwardArgs args, size_t smem_limit, cudaStream_t stream) {
  args.kv_stages = simt_forward_smem(sizeof(T), args.p.head_dim, 2) <= smem_limit ? 2 : 1;
  return simt_forward_launch<T, GatherRows>(args, simt_gather_blocks(args.p), stream);
}

// Top-k backward: dQ per row block, plus dK/dV either scattered with atomics from the same kernel
// (args.dk_accum set) or, deterministic, per key over the inverse index (g.key_offsets / g.key_slots).
template <typename T>
cudaError_t simt_gather_backward(BackwardArgs args, size_t smem_limit, cudaStream_t stream) {
  const cudaError_t err = simt_rows_backward_launch<T, GatherRows>(args, simt_gather_blocks(args.p), smem_limit, stream);
  if (err != cudaSuccess || args.dk_accum != nullptr) return err;
  const AttentionParams& p = args.p;
  const int64_t blocks = static_cast<int64_t>((p.seqlen_k + kSimtWarps - 1) / kSimtWarps) * p.batch * p.heads_kv;
  if (blocks == 0) return cudaSuccess;
  const bool wide = static_cast<int64_t>(p.seqlen_q) * p.top_k > static_cast<int64_t>(UINT32_MAX) || wide_slots();
  const dim3 grid(static_cast<unsigned>(blocks));
  if (args.g.entropy) {  // the entropy's gradient: DC = 8 serves every head_dim
    if constexpr (simt_stats_kernels<T, GatherRows>())
      return wide ? launch_with_smem(gather_key_grads_entropy_kernel<T, 8, true>, grid, kSimtThreads, 0, stream, args)
                  : launch_with_smem(gather_key_grads_entropy_kernel<T, 8, false>, grid, kSimtThreads, 0, stream,
                                     args);
    return cudaErrorInvalidValue;
  }
  FL_SIMT_DC_SWITCH(p.head_dim, return wide ? launch_with_smem(gather_key_grads_kernel<T, DC, true>, grid,
                                                               kSimtThreads, 0, stream, args)
                                            : launch_with_smem(gather_key_grads_kernel<T, DC, false>, grid,
                                                               kSimtThreads, 0, stream, args))
  return cudaErrorInvalidValue;
}

}  // namespace flashlite::cuda::detail
