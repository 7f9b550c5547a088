// SIMT tile engine (simt_engine.cuh with the TileRows policy): float32, and 16-bit block-sparse
// layouts with 16/32 blocks. TileRows: 16 consecutive queries of one head per block; the steps are
// the schedule's key tiles (block_n <= 32). Backward: dK/dV per key tile (simt_dkdv_kernel), then
// dQ per query tile; both deterministic.
#pragma once

#include "cuda/engine_launchers.h"
#include "cuda/simt_engine.cuh"
#include "cuda/simt_grid.h"

namespace flashlite::cuda::detail {

struct TileRows {
  static constexpr bool kStats = false;  // WithStats<TileRows>: with head statistics
  static constexpr bool kGather = false;
  int b, h, kvh, m;

  __device__ TileRows(const AttentionParams& p, int64_t block) {
    const int num_q_tiles = (p.seqlen_q + kSimtRows - 1) / kSimtRows;
    m = num_q_tiles - 1 - static_cast<int>(block % num_q_tiles);  // heaviest tiles first
    const int bh = static_cast<int>(block / num_q_tiles);
    b = bh / p.heads_q;
    h = bh % p.heads_q;
    kvh = h / p.group();
  }
  __device__ RowSlot row(const AttentionParams& p, int r) const {
    const int i = m * kSimtRows + r;
    return RowSlot{i < p.seqlen_q, h, i};
  }
  __device__ int num_steps(const AttentionParams& p) const { return p.forward_schedule.num_tiles(b, h, m); }
  __device__ int64_t key(const AttentionParams& p, int step, int slot) const {
    if (slot >= p.block_n) return -1;
    const int64_t j = static_cast<int64_t>(p.forward_schedule.tile(b, h, m, step)) * p.block_n + slot;
    return j < p.seqlen_k ? j : -1;
  }
};

// ---------------------------------------------------------------------------------------------
// Tile-engine dK/dV (SIMT): one block per (key tile of block_n <= 32 keys, KV head, batch),
// over the transposed schedule of every query head of the group (16-row query tiles). Warp w
// accumulates key slots 8w..8w+7 in registers (lanes: columns).
// ---------------------------------------------------------------------------------------------
// kEntropy: with the entropy's gradient (g.entropy; g and shift of each query tile staged past the
// plain layout), dS = p·(dP − (δ − shift) − g·ln2·x2)·chain: simt_dkdv_entropy_kernel, so the plain
// kernel does not change.
template <typename T, int DC, bool kEntropy>
__device__ __forceinline__ void simt_dkdv(const BackwardArgs& args) {
  const AttentionParams& p = args.p;
  const BackwardParams& g = args.g;
  const ScoreMath& math = args.math;
  const int hd = p.head_dim, pitch = simt_pitch(sizeof(T), hd);
  FL_DYNAMIC_SMEM(smem_raw);
  T* const k_s = reinterpret_cast<T*>(smem_raw);
  T* const v_s = k_s + kSimtKeys * pitch;
  T* const q_s = v_s + kSimtKeys * pitch;
  T* const do_s = q_s + kSimtRows * pitch;
  float* const p_s = reinterpret_cast<float*>(do_s + kSimtRows * pitch);
  float* const ds_s = p_s + kSimtRows * kSimtPPitch;
  float* const lse_s = ds_s + kSimtRows * kSimtPPitch;
  float* const delta_s = lse_s + kSimtRows;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int r0 = warp * kSimtRowsPerWarp;
  const int bn = p.block_n;
  const int num_kv_tiles = (p.seqlen_k + bn - 1) / bn;
  const int n = static_cast<int>(blockIdx.x % num_kv_tiles);
  const int bkv = static_cast<int>(blockIdx.x / num_kv_tiles);
  const int b = bkv / p.heads_kv, kvh = bkv % p.heads_kv, G = p.group();
  const int64_t key0 = static_cast<int64_t>(n) * bn;
  const int64_t shift = static_cast<int64_t>(p.seqlen_k) - p.seqlen_q;
  const ScheduleView& bs = p.backward_schedule;

  simt_load_head_rows<T>(k_s, pitch, kSimtKeys, bn, p.k, p.k_strides, b, kvh, key0, p.seqlen_k, hd, args.aligned4);
  simt_load_head_rows<T>(v_s, pitch, kSimtKeys, bn, p.v, p.v_strides, b, kvh, key0, p.seqlen_k, hd, args.aligned4);
  cp_async_commit();

  const int64_t j_lane = key0 + lane;
  const bool lane_key_ok = lane < bn && j_lane < p.seqlen_k;
  float acc_dk[8][DC], acc_dv[8][DC];
#pragma unroll
  for (int kk = 0; kk < 8; ++kk)
#pragma unroll
    for (int c = 0; c < DC; ++c) acc_dk[kk][c] = acc_dv[kk][c] = 0.f;

  for (int gg = 0; gg < G; ++gg) {
    const int h = kvh * G + gg;
    const float slope = math.has_alibi ? p.alibi(b, h) : 0.f;
    const int count = bs.num_tiles(b, h, n);
    for (int t = 0; t < count; ++t) {
      const int i0 = bs.tile(b, h, n, t) * kSimtRows;
      simt_load_head_rows<T>(q_s, pitch, kSimtRows, kSimtRows, p.q, p.q_strides, b, h, i0, p.seqlen_q, hd,
                             args.aligned4);
      simt_load_head_rows<T>(do_s, pitch, kSimtRows, kSimtRows, g.grad_out, g.grad_out_strides, b, h, i0, p.seqlen_q,
                             hd, args.aligned4);
      if (threadIdx.x < kSimtRows) {
        const int r = threadIdx.x;
        const bool ok = i0 + r < p.seqlen_q;
        const int64_t rid = ok ? row_id(p, b, h, i0 + r) : 0;
        cp_async_4(lse_s + r, p.lse + rid, ok);
        cp_async_4(delta_s + r, g.delta + rid, ok);
        if constexpr (kEntropy) {  // g, shift [16] past δ
          const int64_t plane = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
          cp_async_4(delta_s + kSimtRows + r, g.entropy + rid, ok);
          cp_async_4(delta_s + 2 * kSimtRows + r, g.entropy + plane + rid, ok);
        }
      }
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();

      // p, dS for the warp's 4 rows x key j = this lane's
      float sc[4] = {0.f, 0.f, 0.f, 0.f}, dp[4] = {0.f, 0.f, 0.f, 0.f};
      simt_dot4<T>(sc, q_s + r0 * pitch, pitch, k_s + lane * pitch, hd);
      simt_dot4<T>(dp, do_s + r0 * pitch, pitch, v_s + lane * pitch, hd);
      if constexpr (kEntropy) {  // dS = p·(dP − (δ − shift) − g·ln2·x2)·chain
        const float* ent_s = delta_s + kSimtRows;
#pragma unroll
        for (int rr = 0; rr < 4; ++rr) {
          const int r = r0 + rr;
          const int64_t pos = i0 + r + shift;
          const KeyRange range = band_range(p, pos);
          const bool visible = i0 + r < p.seqlen_q && lane_key_ok && j_lane >= range.lo && j_lane <= range.hi;
          const float x2 = math.log2_units(sc[rr], slope, pos, j_lane);
          const float pr = visible ? exp2f(x2 - lse_log2(lse_s[r])) : 0.f;
          p_s[r * kSimtPPitch + lane] = pr;
          ds_s[r * kSimtPPitch + lane] =
              pr * (dp[rr] - delta_s[r] + ent_s[kSimtRows + r] - ent_s[r] * kLn2 * x2) * math.cap_grad(sc[rr]);
        }
      } else {
#pragma unroll
        for (int rr = 0; rr < 4; ++rr) {
          const int r = r0 + rr;
          const int64_t pos = i0 + r + shift;
          const KeyRange range = band_range(p, pos);
          const bool visible = i0 + r < p.seqlen_q && lane_key_ok && j_lane >= range.lo && j_lane <= range.hi;
          const float pr =
              visible ? exp2f(math.log2_units(sc[rr], slope, pos, j_lane) - lse_log2(lse_s[r])) : 0.f;
          p_s[r * kSimtPPitch + lane] = pr;
          ds_s[r * kSimtPPitch + lane] = pr * (dp[rr] - delta_s[r]) * math.cap_grad(sc[rr]);
        }
      }
      __syncthreads();

      // dV_j += Σ_r p_rj·dO_r, dK_j += Σ_r dS_rj·q_r for the warp's 8 key slots
      for (int r = 0; r < kSimtRows; ++r) {
        float qv[DC], dov[DC];
#pragma unroll
        for (int c = 0; c < DC; ++c) {
          const int col = lane + 32 * c;
          qv[c] = col < hd ? Elem<T>::to_float(q_s[r * pitch + col]) : 0.f;
          dov[c] = col < hd ? Elem<T>::to_float(do_s[r * pitch + col]) : 0.f;
        }
#pragma unroll
        for (int kk = 0; kk < 8; ++kk) {
          const float pv = p_s[r * kSimtPPitch + warp * 8 + kk];
          const float dsv = ds_s[r * kSimtPPitch + warp * 8 + kk];
#pragma unroll
          for (int c = 0; c < DC; ++c) {
            acc_dv[kk][c] += pv * dov[c];
            acc_dk[kk][c] += dsv * qv[c];
          }
        }
      }
      __syncthreads();
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    const int s = warp * 8 + kk;
    const int64_t j = key0 + s;
    if (s >= bn || j >= p.seqlen_k) continue;
    T* dk_row = row_ptr_mut<T>(g.dk, g.dk_strides, b, kvh, j);
    T* dv_row = row_ptr_mut<T>(g.dv, g.dv_strides, b, kvh, j);
#pragma unroll
    for (int c = 0; c < DC; ++c) {
      const int col = lane + 32 * c;
      if (col < hd) {
        dk_row[col] = Elem<T>::from_float(acc_dk[kk][c] * math.scale);
        dv_row[col] = Elem<T>::from_float(acc_dv[kk][c]);
      }
    }
  }
}

template <typename T, int DC>
__global__ void __launch_bounds__(kSimtThreads) simt_dkdv_kernel(const __grid_constant__ BackwardArgs args) {
  simt_dkdv<T, DC, false>(args);
}

template <typename T, int DC>
__global__ void __launch_bounds__(kSimtThreads) simt_dkdv_entropy_kernel(const __grid_constant__ BackwardArgs args) {
  simt_dkdv<T, DC, true>(args);
}

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------
template <typename T>
cudaError_t simt_tile_forward(ForwardArgs args, size_t smem_limit, cudaStream_t stream) {
  args.kv_stages = simt_forward_smem(sizeof(T), args.p.head_dim, 2) <= smem_limit ? 2 : 1;
  return simt_forward_launch<T, TileRows>(args, simt_tile_blocks(args.p), stream);
}

// Tile engine backward: dK/dV per key tile, then dQ per query tile (both deterministic).
template <typename T>
cudaError_t simt_tile_backward(BackwardArgs args, size_t smem_limit, cudaStream_t stream) {
  const AttentionParams& p = args.p;
  const int64_t kv_blocks = static_cast<int64_t>((p.seqlen_k + p.block_n - 1) / p.block_n) * p.batch * p.heads_kv;
  if (kv_blocks > 0) {
    // + g, shift of a query tile with the entropy's gradient
    const size_t smem =
        simt_dkdv_smem(sizeof(T), p.head_dim) + (args.g.entropy ? 2 * kSimtRows * sizeof(float) : 0);
    cudaError_t err = cudaSuccess;
    const dim3 grid(static_cast<unsigned>(kv_blocks));
    if (args.g.entropy) {  // the entropy's gradient: DC = 8 serves every head_dim
      if constexpr (simt_stats_kernels<T, TileRows>())
        err = launch_with_smem(simt_dkdv_entropy_kernel<T, 8>, grid, kSimtThreads, smem, stream, args);
      else
        err = cudaErrorInvalidValue;
    } else {
      FL_SIMT_DC_SWITCH(p.head_dim, err = launch_with_smem(simt_dkdv_kernel<T, DC>, grid, kSimtThreads, smem, stream,
                                                           args);
                        break)
    }
    if (err != cudaSuccess) return err;
  }
  args.dk_accum = args.dv_accum = nullptr;
  return simt_rows_backward_launch<T, TileRows>(args, simt_tile_blocks(args.p), smem_limit, stream);
}

}  // namespace flashlite::cuda::detail
