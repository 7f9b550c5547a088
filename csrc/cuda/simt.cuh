// SIMT (CUDA-core) engine: every dtype, any head_dim <= 256, math in fp32.
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
#pragma once

#include "cuda/common.cuh"
#include "cuda/tiles.h"

namespace flashlite {
namespace cuda {
namespace detail {

struct RowSlot {
  bool valid;
  int h, i;
};

struct TileRows {
  int b, h, kvh, m;

  static int64_t num_blocks(const AttentionParams& p) {
    return static_cast<int64_t>((p.seqlen_q + kSimtRows - 1) / kSimtRows) * p.batch * p.heads_q;
  }
  // Upper bound of the steps per block (host side, for the split heuristic).
  static int64_t max_steps(const AttentionParams& p) { return (p.seqlen_k + p.block_n - 1) / p.block_n; }

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

struct GatherRows {
  int b, kvh, g0, i_fixed;
  int64_t rb;
  bool per_query;
  const int64_t* list;

  static int64_t row_blocks(const AttentionParams& p) {
    const int G = p.heads_q / p.heads_kv;
    if (p.indices_stride_n != 0) return static_cast<int64_t>(p.seqlen_q) * ((G + kSimtRows - 1) / kSimtRows);
    return (static_cast<int64_t>(p.seqlen_q) * G + kSimtRows - 1) / kSimtRows;
  }
  static int64_t num_blocks(const AttentionParams& p) { return row_blocks(p) * p.batch * p.heads_kv; }
  static int64_t max_steps(const AttentionParams& p) { return (p.top_k + kSimtKeys - 1) / kSimtKeys; }

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
template <typename T, int DC, class Rows>
__global__ void __launch_bounds__(kSimtThreads) simt_forward_kernel(const __grid_constant__ ForwardArgs args) {
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
    if (!slot[rr].valid) continue;
    const float l = l_run[rr];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const float lse = l > 0.f ? (m_run[rr] + log2f(l)) * kLn2 : -INFINITY;
    const int64_t rid = row_id(p, rows.b, slot[rr].h, slot[rr].i);
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
// ---------------------------------------------------------------------------------------------
template <typename T, int DC, class Rows>
__global__ void __launch_bounds__(kSimtThreads)
    simt_backward_rows_kernel(const __grid_constant__ BackwardArgs args) {
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
  float slope[4], lse2[4], delta[4], dq[4][DC];
#pragma unroll
  for (int rr = 0; rr < 4; ++rr) {
    slot[rr] = rows.row(p, r0 + rr);
    pos[rr] = slot[rr].i + shift;
    range[rr] = band_range(p, pos[rr]);
    slope[rr] = math.has_alibi ? p.alibi(rows.b, slot[rr].h) : 0.f;
    const int64_t rid = row_id(p, rows.b, slot[rr].h, slot[rr].i);
    lse2[rr] = slot[rr].valid ? lse_log2(p.lse[rid]) : INFINITY;  // invalid rows: p = 0
    delta[rr] = slot[rr].valid ? g.delta[rid] : 0.f;
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
      pr[rr] = visible ? exp2f(math.log2_units(sc[rr], slope[rr], pos[rr], j) - lse2[rr]) : 0.f;
      ds[rr] = pr[rr] * (dp[rr] - delta[rr]) * math.cap_grad(sc[rr]);
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
// Tile-engine dK/dV (SIMT): one block per (key tile of block_n <= 32 keys, KV head, batch),
// over the transposed schedule of every query head of the group (16-row query tiles). Warp w
// accumulates key slots 8w..8w+7 in registers (lanes: columns).
// ---------------------------------------------------------------------------------------------
template <typename T, int DC>
__global__ void __launch_bounds__(kSimtThreads) simt_dkdv_kernel(const __grid_constant__ BackwardArgs args) {
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
      }
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();

      // p, dS for the warp's 4 rows x key j = this lane's
      float sc[4] = {0.f, 0.f, 0.f, 0.f}, dp[4] = {0.f, 0.f, 0.f, 0.f};
      simt_dot4<T>(sc, q_s + r0 * pitch, pitch, k_s + lane * pitch, hd);
      simt_dot4<T>(dp, do_s + r0 * pitch, pitch, v_s + lane * pitch, hd);
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

// ---------------------------------------------------------------------------------------------
// Deterministic top-k dK/dV: one warp per (key, KV head, batch), over the query rows that select
// the key (CSR built by the binding: g.key_offsets / g.key_rows, ascending query order) and the
// query heads of the group, in a fixed order. Lanes split the head dimension.
// ---------------------------------------------------------------------------------------------
template <typename T, int DC>
__global__ void __launch_bounds__(kSimtThreads)
    gather_key_grads_kernel(const __grid_constant__ BackwardArgs args) {
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
  const int index_heads = p.indices_stride_h == 0 ? 1 : p.heads_kv;
  const int hi = index_heads == 1 ? 0 : kvh;
  const int64_t seg = (static_cast<int64_t>(b) * index_heads + hi) * p.seqlen_k + j;
  const int64_t begin = g.key_offsets[seg], end = g.key_offsets[seg + 1];
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
  for (int64_t e = begin; e < end; ++e) {
    const int i = g.key_rows[e];
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
      const float pr = exp2f(math.log2_units(s, slope, pos, j) - lse_log2(p.lse[rid]));
      const float ds = pr * (dp - g.delta[rid]) * math.cap_grad(s);
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

}  // namespace detail
}  // namespace cuda
}  // namespace flashlite
