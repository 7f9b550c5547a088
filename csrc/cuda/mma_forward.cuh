// Tensor-core forward of the tile engine (float16 / bfloat16), FlashAttention-2 structure.
//
// One block per (query tile, head, batch) [or, packed for decode, per (head group, batch)], and
// optionally per split of the key tiles (Flash-Decoding; partials are merged by the combine
// kernel). One warp owns 16·MW query rows (tiles.h): its Q fragments stay in registers when they
// are few, scores and the output accumulator live in MMA accumulator registers. K/V tiles of the schedule stream
// through a two-stage cp.async ring in shared memory.
//
// Notation per query row i and key j: s_ij = transformed score in log2 units (x·log2 e),
// m_i running max, l_i running sum of 2^(s_ij − m_i), O_i running (unnormalized) output.
//
// Head statistics (Cfg::kStats, FwdStatsTile: a separate kernel, launched when
// AttentionParams::row_stats is set; the plain kernel's code is unchanged): running sums beside
// the online softmax, per thread over its columns (quad-reduced at the end, like l), log2 units:
//   t = Σ 2^(s − m)·(s − m),  d = Σ 2^(s − m)·|p(i) − j|,  z = Σ_{j < sink_tokens} 2^(s − m),
// rescaled when m becomes m' (α = 2^(m − m')): t ← α·(t + (m − m')·l), d ← α·d, z ← α·z (no carry
// while m = −inf); masked keys (s = −inf) add nothing. The visible-key count c is the band's
// overlap with each visited key tile (per row, no per-element work). At the end (l > 0):
// entropy = ln l − ln2·t/l, max_prob = 1/l, mean_distance = d/l, sink_mass = z/l, keys = c; a
// row without keys: all 0. Statistics need the whole key range in one block: the planner does not
// split keys when row_stats is set.
#pragma once

#include "cuda/elem.cuh"
#include "cuda/engine_launchers.h"
#include "cuda/global_rows.cuh"
#include "cuda/kernel_args.cuh"
#include "cuda/kernel_launch.cuh"
#include "cuda/mma_fragments.cuh"
#include "cuda/ptx.cuh"
#include "cuda/score.cuh"
#include "cuda/tiles.h"
#include "cuda/warp_reduce.cuh"

namespace flashlite::cuda::detail {

template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) mma_forward_kernel(const __grid_constant__ ForwardArgs args) {
  constexpr int D = Cfg::D, BM = Cfg::BM, BN = Cfg::BN, P = Cfg::kPitch;
  constexpr int MW = Cfg::MW, RW = Cfg::kRowsPerWarp, NR = 2 * MW;  // NR: rows per thread
  constexpr int kThreads = Cfg::kThreads;
  constexpr bool Stats = Cfg::kStats;
  FL_DYNAMIC_SMEM(smem_raw);
  T* const smem = reinterpret_cast<T*>(smem_raw);
  // Q is staged in K/V stage 1 when it moves to registers, else it has its own region.
  T* const q_s = Cfg::kQInRegs ? smem + Cfg::kStage : smem + 2 * Cfg::kStage;

  const AttentionParams& p = args.p;
  const ScoreMath& math = args.math;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int group = lane >> 2, quad = lane & 3;
  const bool packed = args.heads_per_block > 0;
  const int64_t shift = static_cast<int64_t>(p.seqlen_k) - p.seqlen_q;  // p(i) = i + shift

  // ---- which rows this block owns ------------------------------------------------------------
  int b, h0, m, rows_used;
  if (packed) {  // rows r = (head h0 + r / Nq, query r % Nq), all in query tile 0 of the schedule
    const int head_blocks = p.heads_q / args.heads_per_block;
    b = blockIdx.x / head_blocks;
    h0 = (blockIdx.x % head_blocks) * args.heads_per_block;
    m = 0;
    rows_used = args.heads_per_block * p.seqlen_q;
  } else {  // rows r = query m·BM + r of head h0; heaviest (last) query tiles first
    const int num_q_tiles = (p.seqlen_q + BM - 1) / BM;
    const int bh = blockIdx.x / num_q_tiles;
    m = num_q_tiles - 1 - static_cast<int>(blockIdx.x % num_q_tiles);
    b = bh / p.heads_q;
    h0 = bh % p.heads_q;
    rows_used = min(BM, p.seqlen_q - m * BM);
  }
  const int kvh = h0 / p.group();
  auto row_head = [&](int r) { return packed ? h0 + r / p.seqlen_q : h0; };
  auto row_query = [&](int r) { return packed ? r % p.seqlen_q : m * BM + r; };

  // ---- key tiles of this block: the schedule's list, or this split's slice of it -------------
  const ScheduleView& fs = p.forward_schedule;
  const int count = fs.num_tiles(b, h0, m);
  const int splits = args.split.num_splits, split = blockIdx.y;
  const int t_begin = static_cast<int>(static_cast<int64_t>(count) * split / splits);
  const int t_end = static_cast<int>(static_cast<int64_t>(count) * (split + 1) / splits);

  // ---- the rows of each thread: ri = 2·mw + rr is row g + 8·rr of the warp's m-block mw --------
  bool row_valid[NR];
  int row_h[NR], row_i[NR];
  int64_t pos[NR];
  KeyRange range[NR];
  float slope[NR];
#pragma unroll
  for (int ri = 0; ri < NR; ++ri) {
    const int r = warp * RW + (ri >> 1) * 16 + group + 8 * (ri & 1);
    row_valid[ri] = r < rows_used;
    row_h[ri] = row_valid[ri] ? row_head(r) : h0;
    row_i[ri] = row_valid[ri] ? row_query(r) : 0;
    pos[ri] = row_i[ri] + shift;
    range[ri] = band_range(p, pos[ri]);
    slope[ri] = math.has_alibi ? p.alibi(b, row_h[ri]) : 0.f;
  }
  // A key tile needs the element mask unless every valid row sees all of it: the band is
  // monotone in p(i), so compare with the last row's lower edge and the first row's upper edge.
  const int q_first = packed ? 0 : m * BM;
  const int q_last = packed ? p.seqlen_q - 1 : m * BM + rows_used - 1;
  const int32_t lo_max = band_range(p, q_last + shift).lo;
  const int32_t hi_min = band_range(p, q_first + shift).hi;

  // ---- loads -------------------------------------------------------------------------------------
  auto q_row = [&](int r) -> const T* {
    return r < rows_used ? row_ptr<T>(p.q, p.q_strides, b, row_head(r), row_query(r)) : nullptr;
  };
  auto load_kv = [&](int t, int stage) {
    const int64_t key0 = static_cast<int64_t>(fs.tile(b, h0, m, t)) * BN;
    T* k_s = smem + stage * Cfg::kStage;
    T* v_s = k_s + Cfg::kTile;
    load_head_rows<T, BN, D, kThreads>(k_s, P, p.k, p.k_strides, b, kvh, key0, p.seqlen_k, p.head_dim, args.aligned16);
    load_head_rows<T, BN, D, kThreads>(v_s, P, p.v, p.v_strides, b, kvh, key0, p.seqlen_k, p.head_dim, args.aligned16);
  };

  load_rows_16<T, BM, D, kThreads>(q_s, P, q_row, p.head_dim, args.aligned16, p.q);
  cp_async_commit();
  if (t_begin < t_end) load_kv(t_begin, 0);
  cp_async_commit();

  uint32_t q_frag[Cfg::kQInRegs ? MW : 1][Cfg::kQInRegs ? D / 16 : 1][4];
  if constexpr (Cfg::kQInRegs) {
    cp_async_wait<1>();  // Q has landed (the first K/V tile may still be in flight)
    __syncthreads();
#pragma unroll
    for (int mw = 0; mw < MW; ++mw)
#pragma unroll
      for (int kb = 0; kb < D / 16; ++kb) load_a(q_frag[mw][kb], q_s, P, warp * RW + mw * 16, kb * 16);
    __syncthreads();  // stage 1 is free for K/V again
  }

  float o[MW][D / 8][4];
#pragma unroll
  for (int mw = 0; mw < MW; ++mw)
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) o[mw][nd][0] = o[mw][nd][1] = o[mw][nd][2] = o[mw][nd][3] = 0.f;
  float m_run[NR], l_run[NR];  // l_run: per-thread partial sums (quad-reduced at the end)
#pragma unroll
  for (int ri = 0; ri < NR; ++ri) m_run[ri] = -INFINITY, l_run[ri] = 0.f;
  // Stats: t, d, z per row, per-thread partial sums like l_run (unused otherwise).
  float t_run[Stats ? NR : 1], d_run[Stats ? NR : 1], z_run[Stats ? NR : 1];
  if constexpr (Stats) {
#pragma unroll
    for (int ri = 0; ri < NR; ++ri) t_run[ri] = d_run[ri] = z_run[ri] = 0.f;
  }

  for (int t = t_begin; t < t_end; ++t) {
    const int stage = (t - t_begin) & 1;
    if (t + 1 < t_end) {  // prefetch the next tile into the other stage, then wait for this one
      load_kv(t + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* k_s = smem + stage * Cfg::kStage;
    const T* v_s = k_s + Cfg::kTile;
    const int key0 = fs.tile(b, h0, m, t) * BN;  // key indices fit int32 (Nk is int32)

    // -- S = Q·Kᵀ: RW rows x BN keys per warp, f32 accumulators; each K fragment feeds MW MMAs --
    float s[MW][BN / 8][4];
#pragma unroll
    for (int mw = 0; mw < MW; ++mw)
#pragma unroll
      for (int nb = 0; nb < BN / 8; ++nb) s[mw][nb][0] = s[mw][nb][1] = s[mw][nb][2] = s[mw][nb][3] = 0.f;
#pragma unroll
    for (int kb = 0; kb < D / 16; ++kb) {
      uint32_t a[MW][4];
#pragma unroll
      for (int mw = 0; mw < MW; ++mw) {
        if constexpr (Cfg::kQInRegs) {
#pragma unroll
          for (int e = 0; e < 4; ++e) a[mw][e] = q_frag[mw][kb][e];
        } else {
          load_a(a[mw], q_s, P, warp * RW + mw * 16, kb * 16);
        }
      }
#pragma unroll
      for (int nb2 = 0; nb2 < BN / 16; ++nb2) {
        uint32_t bk[4];
        load_b_nk(bk, k_s, P, nb2 * 16, kb * 16);
#pragma unroll
        for (int mw = 0; mw < MW; ++mw) mma_16x16<T>(s[mw], nb2, a[mw], bk);
      }
    }

    // -- scores in log2 units: x2 = (softcap/ALiBi transform of raw·scale)·log2 e; keys outside
    //    the band or past Nk get −inf (only on tiles that straddle the band / sequence end) ------
    const bool need_mask = key0 < lo_max || key0 + BN - 1 > hi_min;
    float tile_max[NR];
#pragma unroll
    for (int ri = 0; ri < NR; ++ri) tile_max[ri] = -INFINITY;
    if (math.plain() && !need_mask) {  // the common case: one multiply per score
#pragma unroll
      for (int mw = 0; mw < MW; ++mw)
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int ri = 2 * mw + (e >> 1);
            s[mw][nb][e] *= math.scale_log2;
            tile_max[ri] = fmaxf(tile_max[ri], s[mw][nb][e]);
          }
    } else {
#pragma unroll
      for (int mw = 0; mw < MW; ++mw) {
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int ri = 2 * mw + (e >> 1);
            const int j = key0 + nb * 8 + 2 * quad + (e & 1);
            float x = math.log2_units(s[mw][nb][e], slope[ri], pos[ri], j);
            if (need_mask && (j < range[ri].lo || j > range[ri].hi)) x = -INFINITY;
            s[mw][nb][e] = x;
            tile_max[ri] = fmaxf(tile_max[ri], x);
          }
        }
      }
    }

    // -- online softmax (base 2), per row:
    //      m' = max(m, max_j s_ij);  α = 2^(m − m');  p_ij = 2^(s_ij − m')
    //      l' = α·l + Σ_j p_ij;      O' = α·O + P·V
    //    A row with no visible key so far keeps m = −inf; 0 stands in for it in the exponents
    //    (2^(−inf − 0) = 0, never NaN). ------------------------------------------------------
    float m_use[NR], alpha[NR], row_sum[NR];
#pragma unroll
    for (int ri = 0; ri < NR; ++ri) {
      const float m_new = fmaxf(m_run[ri], quad_max(tile_max[ri]));
      m_use[ri] = m_new == -INFINITY ? 0.f : m_new;
      alpha[ri] = exp2f(m_run[ri] - m_use[ri]);
      if constexpr (Stats) {  // t <- α·(t + (m − m')·l), d <- α·d, z <- α·z (l: this thread's part)
        const float carry = m_run[ri] == -INFINITY ? 0.f : (m_run[ri] - m_use[ri]) * l_run[ri];
        t_run[ri] = alpha[ri] * (t_run[ri] + carry);
        d_run[ri] *= alpha[ri];
        z_run[ri] *= alpha[ri];
      }
      m_run[ri] = m_new;
      row_sum[ri] = 0.f;
    }
    // Stats: this thread's keys are key0 + 2·quad + c, c = nb·8 + (e & 1) (a constant per element):
    // |p(i) − j| = |rel − c| with rel = p(i) − key0 − 2·quad, and j < sink_tokens iff c < sink_rel.
    float rel[Stats ? NR : 1];
    int sink_rel = 0;
    if constexpr (Stats) {
#pragma unroll
      for (int ri = 0; ri < NR; ++ri) rel[ri] = static_cast<float>(pos[ri] - key0 - 2 * quad);
      sink_rel = p.sink_tokens - key0 - 2 * quad;
    }
#pragma unroll
    for (int mw = 0; mw < MW; ++mw) {
#pragma unroll
      for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int ri = 2 * mw + (e >> 1);
          const float x = s[mw][nb][e] - m_use[ri];
          const float pr = exp2f(x);
          s[mw][nb][e] = pr;
          row_sum[ri] += pr;
          if constexpr (Stats) {
            const int c = nb * 8 + (e & 1);
            t_run[ri] += x == -INFINITY ? 0.f : pr * x;
            d_run[ri] += pr * fabsf(rel[ri] - static_cast<float>(c));
            z_run[ri] += c < sink_rel ? pr : 0.f;
          }
        }
      }
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd) {
        o[mw][nd][0] *= alpha[2 * mw];
        o[mw][nd][1] *= alpha[2 * mw];
        o[mw][nd][2] *= alpha[2 * mw + 1];
        o[mw][nd][3] *= alpha[2 * mw + 1];
      }
    }
#pragma unroll
    for (int ri = 0; ri < NR; ++ri) l_run[ri] = l_run[ri] * alpha[ri] + row_sum[ri];

    // -- O += P·V: P (rounded to T) re-used from the accumulators as A fragments; V via
    //    ldmatrix.trans, each fragment feeding MW MMAs -----------------------------------------
#pragma unroll
    for (int kb = 0; kb < BN / 16; ++kb) {
      uint32_t a[MW][4];
#pragma unroll
      for (int mw = 0; mw < MW; ++mw) accum_to_a<T>(a[mw], s[mw], kb);
#pragma unroll
      for (int nd2 = 0; nd2 < D / 16; ++nd2) {
        uint32_t bv[4];
        load_b_kn(bv, v_s, P, kb * 16, nd2 * 16);
#pragma unroll
        for (int mw = 0; mw < MW; ++mw) mma_16x16<T>(o[mw], nd2, a[mw], bv);
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  cp_async_wait<0>();

  // ---- finish: out = O / l, lse = (m + log2 l)·ln 2; rows that saw no key: 0 and −inf -----------
#pragma unroll
  for (int ri = 0; ri < NR; ++ri) {
    const int mw = ri >> 1, rr = ri & 1;
    const float l = quad_sum(l_run[ri]);
    float stat_t = 0.f, stat_d = 0.f, stat_z = 0.f;
    if constexpr (Stats) {
      stat_t = quad_sum(t_run[ri]);
      stat_d = quad_sum(d_run[ri]);
      stat_z = quad_sum(z_run[ri]);
    }
    if (!row_valid[ri]) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const float lse = l > 0.f ? (m_run[ri] + log2f(l)) * kLn2 : -INFINITY;
    const int64_t rid = row_id(p, b, row_h[ri], row_i[ri]);
    if constexpr (Stats) {
      if (quad == 0) {  // keys: the band's overlap with each key tile of the schedule
        int keys = 0;
        for (int t = 0; t < count; ++t) {
          const int key0 = fs.tile(b, h0, m, t) * BN;
          keys += max(0, min(range[ri].hi, key0 + BN - 1) - max(range[ri].lo, key0) + 1);
        }
        write_row_stats(p, rid, l, stat_t, stat_d, stat_z, static_cast<float>(keys));
      }
    }
    if (splits == 1) {
      T* out_row = row_ptr_mut<T>(p.out, p.out_strides, b, row_h[ri], row_i[ri]);
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd)
        store_pair(out_row, nd * 8 + 2 * quad, p.head_dim, o[mw][nd][2 * rr] * inv, o[mw][nd][2 * rr + 1] * inv,
                   args.aligned16);
      if (quad == 0) p.lse[rid] = lse;
    } else {
      const int64_t slot = static_cast<int64_t>(split) * args.split.rows + rid;
      float* dst = args.split.out + slot * p.head_dim;
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd) {
        const int col = nd * 8 + 2 * quad;
        if (col < p.head_dim) dst[col] = o[mw][nd][2 * rr] * inv;
        if (col + 1 < p.head_dim) dst[col + 1] = o[mw][nd][2 * rr + 1] * inv;
      }
      if (quad == 0) args.split.lse[slot] = lse;
    }
  }
}

// Host side: launch the instantiation for (D, block_m, block_n) (Cfg: FwdTile, or FwdStatsTile
// with row_stats). grid = (blocks, splits).
template <typename T, class Cfg>
cudaError_t launch_mma_forward(const ForwardArgs& args, int64_t blocks, cudaStream_t stream) {
  return launch_with_smem(mma_forward_kernel<T, Cfg>, dim3(static_cast<unsigned>(blocks), args.split.num_splits),
                          Cfg::kThreads, Cfg::kSmemBytes, stream, args);
}

// The instantiations of one head-dim template D, by tile shape (the packed decode layout runs
// block_m = 64); with row_stats the statistics kernels (FLASHLITE_MMA_STATS_TILES).
// cudaErrorInvalidValue: shape not instantiated.
template <typename T, int D>
cudaError_t mma_forward_hd(const ForwardArgs& args, int block_m, int block_n, int64_t blocks, cudaStream_t stream) {
  if (args.p.row_stats) {
    if constexpr (!stats_kernels<T>()) return cudaErrorInvalidValue;
#define FL_FWD_STATS_CASE(d, bm, bn)                                                       \
  if constexpr (d == D && stats_kernels<T>()) {                                            \
    if (block_m == bm && block_n == bn)                                                    \
      return launch_mma_forward<T, FwdStatsTile<d, bm, bn>>(args, blocks, stream);         \
  }
    FLASHLITE_MMA_STATS_TILES(FL_FWD_STATS_CASE)
#undef FL_FWD_STATS_CASE
    return cudaErrorInvalidValue;
  }
#define FL_FWD_CASE(d, bm, bn)                                                                               \
  if constexpr (d == D) {                                                                                    \
    if (block_m == bm && block_n == bn) return launch_mma_forward<T, FwdTile<d, bm, bn>>(args, blocks, stream); \
  }
  FLASHLITE_MMA_TILES(FL_FWD_CASE)
#undef FL_FWD_CASE
  return cudaErrorInvalidValue;
}

}  // namespace flashlite::cuda::detail
