// SIMT (CUDA-core) engine core: every dtype, any head_dim <= 256, math in fp32. The row-block
// kernels (forward; backward over rows) and their launch helpers, templated on a "Rows" policy;
// the policies, the per-key dK/dV kernels and the launchers are simt_tile.cuh and simt_gather.cuh.
//
// A block owns 16 query rows (4 warps x 4 rows) that share one list of keys, and walks that list
// 32 keys per step (lane j <-> key j of the step), with K/V rows copied into shared memory by
// cp.async (one 4-byte copy per lane-step, per row: rows may come from anywhere, so the same code
// gathers top-k keys). Two row layouts ("Rows" policies):
//   TileRows   - tile engine: 16 consecutive queries of one head; the steps are the schedule's key
//                tiles (block_n <= 32). Serves float32, and block-sparse layouts with 16/32 blocks.
//   GatherRows - top-k: (query, query head) pairs that share an index list: the heads of one
//                KV head's GQA group for one query (per-query indices), or (query, head) pairs in
//                order (indices shared by every query). The KV rows gathered for a step serve
//                every row of the block.
// The visible keys of a row are [lo, hi] of the band (gather: lo = 0, hi = p(i) if causal).
//
// Head statistics (AttentionParams::row_stats): the forward kernel of a WithStats<Rows> policy (a
// separate instantiation, columns-per-lane template 8 only, which serves every head_dim) keeps,
// per row and lane (the lane's keys), the running sums beside the online softmax in log2 units
// (mma_forward.cuh's notation; l_lane: the lane's part of l for the carry of t):
//   t ← α·(t + (m − m')·l_lane) + p·(s − m'),  d ← α·d + p·|p(i) − j|,  z ← α·z + [j < sink]·p,
//   c ← c + [visible],  warp-reduced at the end (score.cuh write_row_stats).
#pragma once

#include "cuda/elem.cuh"
#include "cuda/global_rows.cuh"
#include "cuda/kernel_args.cuh"
#include "cuda/kernel_launch.cuh"
#include "cuda/ptx.cuh"
#include "cuda/score.cuh"
#include "cuda/tiles.h"
#include "cuda/warp_reduce.cuh"

namespace flashlite::cuda::detail {

struct RowSlot {
  bool valid;
  int h, i;
};

// Copy `rows` rows of head_dim elements into a shared tile (row pitch `pitch`): warp w takes rows
// w, w+4, ...; lanes take 4-byte units. row_src(r) = global row or nullptr (zero-filled).
// aligned4: cp.async (caller commits); else plain loads. The tail up to a 4-byte boundary is zero.
template <typename T, typename RowSrc>
__device__ __forceinline__ void simt_load_rows(T* tile, int pitch, int rows, RowSrc row_src, int head_dim,
                                               bool aligned4, const void* any_valid_ptr) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  constexpr int kPer = 4 / static_cast<int>(sizeof(T));
  const int width = (head_dim + kPer - 1) / kPer * kPer;
  for (int r = warp; r < rows; r += kSimtWarps) {
    const T* src = row_src(r);
    T* dst = tile + r * pitch;
    if (aligned4) {
      for (int c = lane * kPer; c < width; c += 32 * kPer)
        cp_async_4(dst + c, src != nullptr ? static_cast<const void*>(src + c) : any_valid_ptr, src != nullptr);
    } else {
      for (int c = lane; c < width; c += 32)
        dst[c] = (src != nullptr && c < head_dim) ? src[c] : Elem<T>::from_float(0.f);
    }
  }
}

// acc[rr] += rows[rr]·key_row for the 4 rows of a warp (rows: shared, pitch apart; key_row: this
// lane's key). 16-bit types are read in pairs (pitch/2 is odd: no bank conflicts across lanes).
template <typename T>
__device__ __forceinline__ void simt_dot4(float (&acc)[4], const T* rows, int pitch, const T* key_row,
                                          int head_dim) {
  if constexpr (sizeof(T) == 4) {
#pragma unroll 4
    for (int d = 0; d < head_dim; ++d) {
      const float kv = key_row[d];
#pragma unroll
      for (int rr = 0; rr < 4; ++rr) acc[rr] += rows[rr * pitch + d] * kv;
    }
  } else {
    const uint32_t* k2 = reinterpret_cast<const uint32_t*>(key_row);
    const uint32_t* q2 = reinterpret_cast<const uint32_t*>(rows);
    const int half_pitch = pitch / 2, pairs = (head_dim + 1) / 2;
#pragma unroll 4
    for (int d2 = 0; d2 < pairs; ++d2) {
      const float2 kv = Elem<T>::unpack(k2[d2]);
#pragma unroll
      for (int rr = 0; rr < 4; ++rr) {
        const float2 qv = Elem<T>::unpack(q2[rr * half_pitch + d2]);
        acc[rr] += qv.x * kv.x + qv.y * kv.y;
      }
    }
  }
}

// acc[rr][c] += Σ_s w_rr(s)·tile[s][lane + 32c] for the 4 rows of a warp: w_rr(s) = weight[rr] of
// lane s (the row's p or dS for key slot s), broadcast by shuffles; tile: the step's 32 key rows.
template <typename T, int DC>
__device__ __forceinline__ void simt_accumulate(float (&acc)[4][DC], const float (&weight)[4], const T* tile,
                                                int pitch, int lane, int head_dim) {
  for (int s = 0; s < kSimtKeys; ++s) {
    float ws[4];
#pragma unroll
    for (int rr = 0; rr < 4; ++rr) ws[rr] = __shfl_sync(0xffffffffu, weight[rr], s);
    const T* row = tile + s * pitch;
#pragma unroll
    for (int c = 0; c < DC; ++c) {
      const int col = lane + 32 * c;
      if (col < head_dim) {
        const float x = Elem<T>::to_float(row[col]);
#pragma unroll
        for (int rr = 0; rr < 4; ++rr) acc[rr][c] += ws[rr] * x;
      }
    }
  }
}

// row[lane + 32c] = x[c]·factor for the columns < head_dim (lanes split a row's columns).
template <typename T, int DC>
__device__ __forceinline__ void simt_store_row(T* row, const float (&x)[DC], float factor, int lane, int head_dim) {
#pragma unroll
  for (int c = 0; c < DC; ++c) {
    const int col = lane + 32 * c;
    if (col < head_dim) row[col] = Elem<T>::from_float(x[c] * factor);
  }
}

// The row loaders below take some arguments by const reference, as the kernels' row lambdas
// captured them, so each is still read where it was and the kernels compile to the same code.

// Rows first + r (r < used, first + r < n) of head h (batch b) of a [B, H, N, D] tensor into the
// first `rows` rows of a shared tile; the other rows are zero-filled.
template <typename T, typename Index>
__device__ __forceinline__ void simt_load_head_rows(T* tile, int pitch, int rows, int used,
                                                    const void* const& base, const Strides3& strides, int b, int h,
                                                    const Index& first, const int& n, int head_dim, bool aligned4) {
  auto row = [&](int r) -> const T* {
    return r < used && first + r < n ? row_ptr<T>(base, strides, b, h, first + r) : nullptr;
  };
  simt_load_rows<T>(tile, pitch, rows, row, head_dim, aligned4, base);
}

// The block's 16 rows (Rows::row) of a [B, H, Nq, D] tensor (q, dO) into a shared tile; rows
// without a query are zero-filled.
template <typename T, class Rows>
__device__ __forceinline__ void simt_load_block_rows(T* tile, int pitch, const AttentionParams& p, const Rows& rows,
                                                     const void* const& base, const Strides3& strides, int head_dim,
                                                     bool aligned4) {
  auto row = [&](int r) -> const T* {
    const RowSlot s = rows.row(p, r);
    return s.valid ? row_ptr<T>(base, strides, rows.b, s.h, s.i) : nullptr;
  };
  simt_load_rows<T>(tile, pitch, kSimtRows, row, head_dim, aligned4, base);
}

// Step `step` of the block's key walk into K/V stage `stage`: its 32 key indices into
// key_base[stage·32 ..] (−1: no key) and those K, V rows into k_s, v_s (zeros for no key).
template <typename T, class Rows>
__device__ __forceinline__ void simt_load_step(const AttentionParams& p, const Rows& rows, int step, int stage,
                                               int32_t* key_base, T* k_s, T* v_s, int pitch, int head_dim,
                                               const bool& aligned4) {
  if (threadIdx.x < kSimtKeys)
    key_base[stage * kSimtKeys + threadIdx.x] = static_cast<int32_t>(rows.key(p, step, threadIdx.x));
  auto k_row = [&](int r) -> const T* {
    const int64_t j = rows.key(p, step, r);
    return j >= 0 ? row_ptr<T>(p.k, p.k_strides, rows.b, rows.kvh, j) : nullptr;
  };
  auto v_row = [&](int r) -> const T* {
    const int64_t j = rows.key(p, step, r);
    return j >= 0 ? row_ptr<T>(p.v, p.v_strides, rows.b, rows.kvh, j) : nullptr;
  };
  simt_load_rows<T>(k_s, pitch, kSimtKeys, k_row, head_dim, aligned4, p.k);
  simt_load_rows<T>(v_s, pitch, kSimtKeys, v_row, head_dim, aligned4, p.v);
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
// Whether the statistics kernels of (T, Rows) are instantiated: stats_kernels<T>() (elem.cuh), and
// in the compile tests (FLASHLITE_CUDA_FEW_INSTANTIATIONS) the gather engine's only (Rows::kGather),
// which keeps their added compile time small.
template <typename T, class Rows>
constexpr bool simt_stats_kernels() {
#if defined(FLASHLITE_CUDA_FEW_INSTANTIATIONS)
  return stats_kernels<T>() && Rows::kGather;
#else
  return stats_kernels<T>();
#endif
}

// A Rows policy whose forward also computes the head statistics.
template <class Rows>
struct WithStats : Rows {
  static constexpr bool kStats = true;
  __device__ WithStats(const AttentionParams& p, int64_t block) : Rows(p, block) {}
};

template <typename T, int DC, class Rows>
__global__ void __launch_bounds__(kSimtThreads) simt_forward_kernel(const __grid_constant__ ForwardArgs args) {
  constexpr bool Stats = Rows::kStats;
  const AttentionParams& p = args.p;
  const ScoreMath& math = args.math;
  const int hd = p.head_dim, pitch = simt_pitch(sizeof(T), hd), stages = args.kv_stages;
  FL_DYNAMIC_SMEM(smem_raw);
  T* const q_s = reinterpret_cast<T*>(smem_raw);
  T* const kv_base = q_s + kSimtRows * pitch;  // stage s: K at s·2·32·pitch, V 32·pitch later
  int32_t* const key_base = reinterpret_cast<int32_t*>(kv_base + stages * 2 * kSimtKeys * pitch);

  const Rows rows(p, blockIdx.x);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int r0 = warp * kSimtRowsPerWarp;
  const int64_t shift = static_cast<int64_t>(p.seqlen_k) - p.seqlen_q;
  const int steps = rows.num_steps(p);
  const int splits = args.split.num_splits, split = blockIdx.y;
  const int s_begin = static_cast<int>(static_cast<int64_t>(steps) * split / splits);
  const int s_end = static_cast<int>(static_cast<int64_t>(steps) * (split + 1) / splits);

  simt_load_block_rows<T>(q_s, pitch, p, rows, p.q, p.q_strides, hd, args.aligned4);
  cp_async_commit();
  auto load_step = [&](int step, int stage) {
    T* k_s = kv_base + stage * 2 * kSimtKeys * pitch;
    T* v_s = k_s + kSimtKeys * pitch;
    simt_load_step<T>(p, rows, step, stage, key_base, k_s, v_s, pitch, hd, args.aligned4);
  };
  if (s_begin < s_end) load_step(s_begin, 0);
  cp_async_commit();

  RowSlot slot[4];
  int64_t pos[4];
  KeyRange range[4];
  float slope[4], m_run[4], l_run[4], acc[4][DC];
#pragma unroll
  for (int rr = 0; rr < 4; ++rr) {
    slot[rr] = rows.row(p, r0 + rr);
    pos[rr] = slot[rr].i + shift;
    range[rr] = band_range(p, pos[rr]);
    slope[rr] = math.has_alibi ? p.alibi(rows.b, slot[rr].h) : 0.f;
    m_run[rr] = -INFINITY;
    l_run[rr] = 0.f;
#pragma unroll
    for (int c = 0; c < DC; ++c) acc[rr][c] = 0.f;
  }
  // Stats: this lane's parts of l, t, d, z, c per row (unused otherwise).
  constexpr int NS = Stats ? 4 : 1;
  float l_lane[NS], t_lane[NS], d_lane[NS], z_lane[NS], c_lane[NS];
  if constexpr (Stats) {
#pragma unroll
    for (int rr = 0; rr < 4; ++rr) l_lane[rr] = t_lane[rr] = d_lane[rr] = z_lane[rr] = c_lane[rr] = 0.f;
  }

  int stage = 0;
  for (int step = s_begin; step < s_end; ++step) {
    if (stages == 2 && step + 1 < s_end) {
      load_step(step + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* k_s = kv_base + stage * 2 * kSimtKeys * pitch;
    const T* v_s = k_s + kSimtKeys * pitch;
    const int32_t j = key_base[stage * kSimtKeys + lane];

    // s_rj = q_r·k_j for the warp's 4 rows, key j = this lane's
    float sc[4] = {0.f, 0.f, 0.f, 0.f};
    simt_dot4<T>(sc, q_s + r0 * pitch, pitch, k_s + lane * pitch, hd);

    // Online softmax (base 2), per row over the 32 lanes:
    //   m' = max(m, max_j s_j);  α = 2^(m − m');  p_j = 2^(s_j − m');  l' = α·l + Σ_j p_j
    float prob[4];
#pragma unroll
    for (int rr = 0; rr < 4; ++rr) {
      const bool visible = j >= range[rr].lo && j <= range[rr].hi;  // j = −1 (no key) is never inside
      const float x = visible ? math.log2_units(sc[rr], slope[rr], pos[rr], j) : -INFINITY;
      const float m_new = fmaxf(m_run[rr], warp_max(x));
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m_run[rr] - m_use);
      prob[rr] = exp2f(x - m_use);
      l_run[rr] = l_run[rr] * alpha + warp_sum(prob[rr]);
      if constexpr (Stats) {
        const float carry = m_run[rr] == -INFINITY ? 0.f : (m_run[rr] - m_use) * l_lane[rr];
        t_lane[rr] = alpha * (t_lane[rr] + carry) + (x == -INFINITY ? 0.f : prob[rr] * (x - m_use));
        l_lane[rr] = alpha * l_lane[rr] + prob[rr];
        d_lane[rr] = alpha * d_lane[rr] + prob[rr] * fabsf(static_cast<float>(pos[rr] - j));
        z_lane[rr] = alpha * z_lane[rr] + (j < p.sink_tokens ? prob[rr] : 0.f);  // no key: j = −1, p = 0
        c_lane[rr] += visible ? 1.f : 0.f;
      }
      m_run[rr] = m_new;
#pragma unroll
      for (int c = 0; c < DC; ++c) acc[rr][c] *= alpha;
    }
    // O_r += Σ_j p_rj·v_j: lane owns columns lane + 32c; p_j broadcast from lane j
    simt_accumulate<T>(acc, prob, v_s, pitch, lane, hd);
    __syncthreads();
    if (stages == 1 && step + 1 < s_end) {
      load_step(step + 1, 0);
      cp_async_commit();
    }
    if (stages == 2) stage ^= 1;
  }
  cp_async_wait<0>();

  // out = O / l, lse = (m + log2 l)·ln 2; a row without keys: 0 and −inf
#pragma unroll
  for (int rr = 0; rr < 4; ++rr) {
    float stat_t = 0.f, stat_d = 0.f, stat_z = 0.f, stat_c = 0.f;
    if constexpr (Stats) {  // every lane (the slot is the warp's)
      stat_t = warp_sum(t_lane[rr]);
      stat_d = warp_sum(d_lane[rr]);
      stat_z = warp_sum(z_lane[rr]);
      stat_c = warp_sum(c_lane[rr]);
    }
    if (!slot[rr].valid) continue;
    const float l = l_run[rr];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const float lse = l > 0.f ? (m_run[rr] + log2f(l)) * kLn2 : -INFINITY;
    const int64_t rid = row_id(p, rows.b, slot[rr].h, slot[rr].i);
    if constexpr (Stats) {
      if (lane == 0) write_row_stats(p, rid, l, stat_t, stat_d, stat_z, stat_c);
    }
    if (splits == 1) {
      T* out_row = row_ptr_mut<T>(p.out, p.out_strides, rows.b, slot[rr].h, slot[rr].i);
      simt_store_row<T>(out_row, acc[rr], inv, lane, hd);
      if (lane == 0) p.lse[rid] = lse;
    } else {
      const int64_t slot_id = static_cast<int64_t>(split) * args.split.rows + rid;
      simt_store_row<float>(args.split.out + slot_id * hd, acc[rr], inv, lane, hd);
      if (lane == 0) args.split.lse[slot_id] = lse;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward over rows: dQ (tile engine dQ pass; gather backward), and with dk_accum/dv_accum the
// scatter of dK/dV contributions to the step's keys with fp32 atomics (non-deterministic top-k).
//   p = 2^(s − lse·log2 e);  dS = p·(dP − δ)·(1 − tanh²);  dQ_r = scale·Σ_j dS_rj·k_j
//   dK_j += scale·Σ_r dS_rj·q_r;  dV_j += Σ_r p_rj·dO_r   (r over the block's 16 rows)
// With the entropy's gradient (g.entropy: g, shift per row), in the kernel of a WithStats<Rows>
// policy (its own instantiation; the plain kernel does not change):
//   dS = p·(dP − (δ − shift) − g·ln2·x2)·(1 − tanh²),  x2 the log2-units score.
// ---------------------------------------------------------------------------------------------
template <typename T, int DC, class Rows>
__global__ void __launch_bounds__(kSimtThreads)
    simt_backward_rows_kernel(const __grid_constant__ BackwardArgs args) {
  constexpr bool Entropy = Rows::kStats;
  const AttentionParams& p = args.p;
  const BackwardParams& g = args.g;
  const ScoreMath& math = args.math;
  const int hd = p.head_dim, pitch = simt_pitch(sizeof(T), hd), stages = args.kv_stages;
  const bool scatter = args.dk_accum != nullptr;
  FL_DYNAMIC_SMEM(smem_raw);
  T* const q_s = reinterpret_cast<T*>(smem_raw);
  T* const do_s = q_s + kSimtRows * pitch;
  T* const kv_base = do_s + kSimtRows * pitch;
  int32_t* const key_base = reinterpret_cast<int32_t*>(kv_base + stages * 2 * kSimtKeys * pitch);
  float* const p_s = reinterpret_cast<float*>(key_base + stages * kSimtKeys);  // [16][33]
  float* const ds_s = p_s + kSimtRows * kSimtPPitch;                          // [16][33]

  const Rows rows(p, blockIdx.x);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int r0 = warp * kSimtRowsPerWarp;
  const int64_t shift = static_cast<int64_t>(p.seqlen_k) - p.seqlen_q;
  const int steps = rows.num_steps(p);

  simt_load_block_rows<T>(q_s, pitch, p, rows, p.q, p.q_strides, hd, args.aligned4);
  simt_load_block_rows<T>(do_s, pitch, p, rows, g.grad_out, g.grad_out_strides, hd, args.aligned4);
  cp_async_commit();
  auto load_step = [&](int step, int stage) {
    T* k_s = kv_base + stage * 2 * kSimtKeys * pitch;
    T* v_s = k_s + kSimtKeys * pitch;
    simt_load_step<T>(p, rows, step, stage, key_base, k_s, v_s, pitch, hd, args.aligned4);
  };
  if (steps > 0) load_step(0, 0);
  cp_async_commit();

  RowSlot slot[4];
  int64_t pos[4];
  KeyRange range[4];
  float slope[4], lse2[4], delta[4], gl[Entropy ? 4 : 1], dq[4][DC];
#pragma unroll
  for (int rr = 0; rr < 4; ++rr) {
    slot[rr] = rows.row(p, r0 + rr);
    pos[rr] = slot[rr].i + shift;
    range[rr] = band_range(p, pos[rr]);
    slope[rr] = math.has_alibi ? p.alibi(rows.b, slot[rr].h) : 0.f;
    const int64_t rid = row_id(p, rows.b, slot[rr].h, slot[rr].i);
    lse2[rr] = slot[rr].valid ? lse_log2(p.lse[rid]) : INFINITY;  // invalid rows: p = 0
    delta[rr] = slot[rr].valid ? g.delta[rid] : 0.f;
    if constexpr (Entropy) {  // δ − shift and g·ln2
      const int64_t plane = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
      gl[rr] = slot[rr].valid ? g.entropy[rid] * kLn2 : 0.f;
      if (slot[rr].valid) delta[rr] -= g.entropy[plane + rid];
    }
#pragma unroll
    for (int c = 0; c < DC; ++c) dq[rr][c] = 0.f;
  }

  int stage = 0;
  for (int step = 0; step < steps; ++step) {
    if (stages == 2 && step + 1 < steps) {
      load_step(step + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* k_s = kv_base + stage * 2 * kSimtKeys * pitch;
    const T* v_s = k_s + kSimtKeys * pitch;
    const int32_t* key_s = key_base + stage * kSimtKeys;
    const int32_t j = key_s[lane];

    float sc[4] = {0.f, 0.f, 0.f, 0.f}, dp[4] = {0.f, 0.f, 0.f, 0.f};
    simt_dot4<T>(sc, q_s + r0 * pitch, pitch, k_s + lane * pitch, hd);
    simt_dot4<T>(dp, do_s + r0 * pitch, pitch, v_s + lane * pitch, hd);
    float pr[4], ds[4];
#pragma unroll
    for (int rr = 0; rr < 4; ++rr) {
      const bool visible = j >= range[rr].lo && j <= range[rr].hi;
      if constexpr (Entropy) {
        const float x2 = math.log2_units(sc[rr], slope[rr], pos[rr], j);
        pr[rr] = visible ? exp2f(x2 - lse2[rr]) : 0.f;
        ds[rr] = pr[rr] * (dp[rr] - delta[rr] - gl[rr] * x2) * math.cap_grad(sc[rr]);
      } else {
        pr[rr] = visible ? exp2f(math.log2_units(sc[rr], slope[rr], pos[rr], j) - lse2[rr]) : 0.f;
        ds[rr] = pr[rr] * (dp[rr] - delta[rr]) * math.cap_grad(sc[rr]);
      }
    }
    // dQ_r += Σ_j dS_rj·k_j
    simt_accumulate<T>(dq, ds, k_s, pitch, lane, hd);
    if (scatter) {
#pragma unroll
      for (int rr = 0; rr < 4; ++rr) {
        p_s[(r0 + rr) * kSimtPPitch + lane] = pr[rr];
        ds_s[(r0 + rr) * kSimtPPitch + lane] = ds[rr];
      }
      __syncthreads();
      // Warp w: key slots w, w+4, ...; lanes: columns. One atomic per (key, column) per step.
      for (int s = warp; s < kSimtKeys; s += kSimtWarps) {
        const int32_t js = key_s[s];
        if (js < 0) continue;
        const int64_t kv_row = (static_cast<int64_t>(rows.b) * p.heads_kv + rows.kvh) * p.seqlen_k + js;
        float* dk_dst = args.dk_accum + kv_row * hd;
        float* dv_dst = args.dv_accum + kv_row * hd;
#pragma unroll
        for (int c = 0; c < DC; ++c) {
          const int col = lane + 32 * c;
          if (col >= hd) continue;
          float a_k = 0.f, a_v = 0.f;
#pragma unroll 4
          for (int r = 0; r < kSimtRows; ++r) {
            a_k += ds_s[r * kSimtPPitch + s] * Elem<T>::to_float(q_s[r * pitch + col]);
            a_v += p_s[r * kSimtPPitch + s] * Elem<T>::to_float(do_s[r * pitch + col]);
          }
          atomicAdd(dk_dst + col, a_k * math.scale);
          atomicAdd(dv_dst + col, a_v);
        }
      }
    }
    __syncthreads();
    if (stages == 1 && step + 1 < steps) {
      load_step(step + 1, 0);
      cp_async_commit();
    }
    if (stages == 2) stage ^= 1;
  }
  cp_async_wait<0>();

#pragma unroll
  for (int rr = 0; rr < 4; ++rr) {
    if (!slot[rr].valid) continue;
    T* dq_row = row_ptr_mut<T>(g.dq, g.dq_strides, rows.b, slot[rr].h, slot[rr].i);
    simt_store_row<T>(dq_row, dq[rr], math.scale, lane, hd);
  }
}

// ---------------------------------------------------------------------------------------------
// Launch helpers
// ---------------------------------------------------------------------------------------------
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
  if (args.p.row_stats) {  // head statistics: one instantiation (DC = 8 serves every head_dim)
    if constexpr (simt_stats_kernels<T, Rows>())
      return launch_with_smem(simt_forward_kernel<T, 8, WithStats<Rows>>, grid, kSimtThreads, smem, stream, args);
    return cudaErrorInvalidValue;
  }
  FL_SIMT_DC_SWITCH(args.p.head_dim,
                    return launch_with_smem(simt_forward_kernel<T, DC, Rows>, grid, kSimtThreads, smem, stream, args))
  return cudaErrorInvalidValue;
}

template <typename T, class Rows>
cudaError_t simt_rows_backward_launch(BackwardArgs args, int64_t blocks, size_t smem_limit, cudaStream_t stream) {
  if (blocks == 0) return cudaSuccess;
  args.kv_stages = simt_rows_backward_smem(sizeof(T), args.p.head_dim, 2) <= smem_limit ? 2 : 1;
  const size_t smem = simt_rows_backward_smem(sizeof(T), args.p.head_dim, args.kv_stages);
  const dim3 grid(static_cast<unsigned>(blocks));
  if (args.g.entropy) {  // the entropy's gradient: the statistics variant (DC = 8 serves every head_dim)
    if constexpr (simt_stats_kernels<T, Rows>())
      return launch_with_smem(simt_backward_rows_kernel<T, 8, WithStats<Rows>>, grid, kSimtThreads, smem, stream,
                              args);
    return cudaErrorInvalidValue;
  }
  FL_SIMT_DC_SWITCH(args.p.head_dim, return launch_with_smem(simt_backward_rows_kernel<T, DC, Rows>, grid,
                                                             kSimtThreads, smem, stream, args))
  return cudaErrorInvalidValue;
}

}  // namespace flashlite::cuda::detail
