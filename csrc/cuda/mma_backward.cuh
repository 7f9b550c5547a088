// Tensor-core backward of the tile engine (float16 / bfloat16), FlashAttention-2 structure.
//
// With the saved lse and δ_i = Σ_d dO_id·O_id (computed by the binding):
//   p_ij = 2^(s_ij − lse_i·log2 e)            (recomputed scores, log2 units)
//   dP   = dO·Vᵀ;   dS_ij = p_ij·(dP_ij − δ_i)·(1 − tanh²) (softcap chain; 1 without softcap)
//   dV   = Pᵀ·dO;   dK = scale·dSᵀ·Q;   dQ = scale·dS·K
//
// dK/dV kernel: one block per (key tile, KV head, batch). It walks the transposed schedule of
// every query head of the GQA group (so each block owns its dK/dV rows: no atomics), a query
// tile at a time in chunks of kChunk rows streamed through a cp.async ring. Each warp owns 16
// keys and computes in the transposed orientation (Sᵀ = K·Qᵀ), so P and dS are already the A
// operands of dV += Pᵀ·dO and dK += dSᵀ·Q.
// dQ: either a second kernel over the forward schedule (deterministic), or, when
// dq_accum != nullptr, fp32 atomics from the dK/dV kernel (dS staged in shared memory).
//
// The entropy's gradient (BackwardParams::entropy: g and shift = g·(lse − H) per row; the
// backward of flashlite.attention_stats): dS_ij = p_ij·(dP_ij − (δ_i − shift_i) − g_i·s_ij)·chain,
// s_ij = ln2·x2 the natural-units score, in the kernels of BwdStatsTile (Cfg::kStats: their own
// instantiations, FLASHLITE_MMA_STATS_TILES; the plain kernels do not change): the dK/dV kernel
// stages g and shift per chunk in shared memory past the plain layout (entropy_smem), the dQ
// kernel keeps δ − shift and g·ln2 per row in registers.
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

// The two score-shaped products of a step, in one pass over the head dim (each A fragment is read
// once per k-block, each B fragment pair feeds its two MMAs at once):
//   c1 = A1·B1ᵀ,  c2 = A2·B2ᵀ   (A: rows row0 .. row0 + 15 of a1, a2; B: rows 0 .. N − 1 of b1, b2)
// over [rows][D] shared tiles of pitch P; f32 accumulators, zeroed here.
// dK/dV kernel: Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ;  dQ kernel: S = Q·Kᵀ, dP = dO·Vᵀ.
template <typename T, int D, int N, int P>
__device__ __forceinline__ void mma_score_pair(float (&c1)[N / 8][4], float (&c2)[N / 8][4], const T* a1,
                                               const T* a2, int row0, const T* b1, const T* b2) {
#pragma unroll
  for (int nb = 0; nb < N / 8; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) c1[nb][e] = c2[nb][e] = 0.f;
#pragma unroll
  for (int kb = 0; kb < D / 16; ++kb) {
    uint32_t x1[4], x2[4];
    load_a(x1, a1, P, row0, kb * 16);
    load_a(x2, a2, P, row0, kb * 16);
#pragma unroll
    for (int nb2 = 0; nb2 < N / 16; ++nb2) {
      uint32_t y1[4], y2[4];
      load_b_nk(y1, b1, P, nb2 * 16, kb * 16);
      load_b_nk(y2, b2, P, nb2 * 16, kb * 16);
      mma_16x16<T>(c1, nb2, x1, y1);
      mma_16x16<T>(c2, nb2, x2, y2);
    }
  }
}

template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::kKvThreads) mma_dkdv_kernel(const __grid_constant__ BackwardArgs args) {
  constexpr int D = Cfg::D, BM = Cfg::BM, BN = Cfg::BN, CM = Cfg::kChunk, P = Cfg::kPitch;
  constexpr int DS = Cfg::kDSplit, DW = D / DS;  // dK/dV columns per warp
  constexpr int kThreads = Cfg::kKvThreads, kWarps = Cfg::kKvWarps;
  constexpr int DSP = Cfg::kDsPitch;
  FL_DYNAMIC_SMEM(smem_raw);
  const AttentionParams& p = args.p;
  const BackwardParams& g = args.g;
  const ScoreMath& math = args.math;
  const int stages = args.kv_stages;
  constexpr bool Entropy = Cfg::kStats;

  // Shared memory: K, V [BN][P]; per stage Q, dO [CM][P]; dS [CM][DSP]; per stage lse, δ [CM];
  // with the entropy's gradient (past the plain launch's bytes) per stage g, shift [CM].
  T* const k_s = reinterpret_cast<T*>(smem_raw);
  T* const v_s = k_s + BN * P;
  T* const qdo_base = v_s + BN * P;  // stage s: Q at qdo_base + s·2·CM·P, dO right after
  T* const ds_s = qdo_base + stages * 2 * CM * P;
  float* const stat_base = reinterpret_cast<float*>(ds_s + CM * DSP);  // stage s: lse, δ at + s·2·CM
  // (Entropy: stage s's g, shift at stat_base + (stages + s)·2·CM)

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int group = lane >> 2, quad = lane & 3;
  const int key_warp = warp / DS, dslice = warp % DS;

  const int num_kv_tiles = (p.seqlen_k + BN - 1) / BN;
  const int n = static_cast<int>(blockIdx.x % num_kv_tiles);
  const int bkv = static_cast<int>(blockIdx.x / num_kv_tiles);
  const int b = bkv / p.heads_kv, kvh = bkv % p.heads_kv;
  const int G = p.group();
  const int64_t key0 = static_cast<int64_t>(n) * BN;
  const int64_t shift = static_cast<int64_t>(p.seqlen_k) - p.seqlen_q;
  const ScheduleView& bs = p.backward_schedule;

  // K, V tile: loaded once.
  load_head_rows<T, BN, D, kThreads>(k_s, P, p.k, p.k_strides, b, kvh, key0, p.seqlen_k, p.head_dim, args.aligned16);
  load_head_rows<T, BN, D, kThreads>(v_s, P, p.v, p.v_strides, b, kvh, key0, p.seqlen_k, p.head_dim, args.aligned16);
  cp_async_commit();

  // Walk (query head g, schedule entry t, chunk c) in order; `seek` normalizes a cursor to the
  // next existing step.
  struct Cursor {
    int g, t, c, q_tile;
    bool valid;
  };
  auto seek = [&](Cursor cur) -> Cursor {
    while (cur.g < G) {
      const int h = kvh * G + cur.g;
      if (cur.t < bs.num_tiles(b, h, n)) {
        const int q_tile = bs.tile(b, h, n, cur.t);
        const int rows = min(BM, p.seqlen_q - q_tile * BM);
        if (cur.c * CM < rows) {
          cur.q_tile = q_tile;
          cur.valid = true;
          return cur;
        }
        ++cur.t;
        cur.c = 0;
        continue;
      }
      ++cur.g;
      cur.t = 0;
      cur.c = 0;
    }
    cur.valid = false;
    return cur;
  };
  auto load_chunk = [&](const Cursor& cur, int stage) {
    const int h = kvh * G + cur.g;
    const int i0 = cur.q_tile * BM + cur.c * CM;
    T* q_s = qdo_base + stage * 2 * CM * P;
    T* do_s = q_s + CM * P;
    float* lse_s = stat_base + stage * 2 * CM;
    float* delta_s = lse_s + CM;
    load_head_rows<T, CM, D, kThreads>(q_s, P, p.q, p.q_strides, b, h, i0, p.seqlen_q, p.head_dim, args.aligned16);
    load_head_rows<T, CM, D, kThreads>(do_s, P, g.grad_out, g.grad_out_strides, b, h, i0, p.seqlen_q, p.head_dim,
                                       args.aligned16);
    for (int r = threadIdx.x; r < CM; r += kThreads) {
      const bool ok = i0 + r < p.seqlen_q;
      const int64_t rid = ok ? row_id(p, b, h, i0 + r) : 0;
      cp_async_4(lse_s + r, p.lse + rid, ok);
      cp_async_4(delta_s + r, g.delta + rid, ok);
      if constexpr (Entropy) {
        const int64_t plane = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
        float* ent_s = stat_base + (stages + stage) * 2 * CM;
        cp_async_4(ent_s + r, g.entropy + rid, ok);
        cp_async_4(ent_s + CM + r, g.entropy + plane + rid, ok);
      }
    }
  };

  float dk[DW / 8][4], dv[DW / 8][4];
#pragma unroll
  for (int nd = 0; nd < DW / 8; ++nd)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[nd][e] = dv[nd][e] = 0.f;

  Cursor cur = seek(Cursor{0, 0, 0, 0, false});
  if (cur.valid) load_chunk(cur, 0);
  cp_async_commit();
  int stage = 0;
  while (cur.valid) {
    const Cursor next = seek(Cursor{cur.g, cur.t, cur.c + 1, 0, false});
    if (stages == 2 && next.valid) {
      load_chunk(next, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    const int h = kvh * G + cur.g;
    const int i0 = cur.q_tile * BM + cur.c * CM;
    const T* q_s = qdo_base + stage * 2 * CM * P;
    const T* do_s = q_s + CM * P;
    const float* lse_s = stat_base + stage * 2 * CM;
    const float* delta_s = lse_s + CM;
    const float slope = math.has_alibi ? p.alibi(b, h) : 0.f;
    // Element mask unless every (query, key) pair of the chunk x tile is visible.
    const bool need_mask = i0 + CM > p.seqlen_q || key0 + BN > p.seqlen_k ||
                           key0 < band_range(p, i0 + CM - 1 + shift).lo ||
                           key0 + BN - 1 > band_range(p, i0 + shift).hi;

    // -- Sᵀ = K_w·Qᵀ and dPᵀ = V_w·dOᵀ: 16 keys x CM queries per warp ---------------------------
    float st[CM / 8][4], dpt[CM / 8][4];
    mma_score_pair<T, D, CM, P>(st, dpt, k_s, v_s, key_warp * 16, q_s, do_s);

    // -- Pᵀ and dSᵀ elementwise (rows = keys, columns = queries of the chunk) -----------------------
#pragma unroll
    for (int nb = 0; nb < CM / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nb * 8 + 2 * quad + (e & 1);
        const int64_t i = i0 + col;
        const int64_t j = key0 + key_warp * 16 + group + 8 * (e >> 1);
        const int64_t pos = i + shift;
        const bool visible = !need_mask || (i < p.seqlen_q && j < p.seqlen_k && j >= pos - p.window_left &&
                                            j <= pos + p.window_right);
        const float raw = st[nb][e];
        const float x2 = math.log2_units(raw, slope, pos, j);
        const float pr = visible ? exp2f(x2 - lse_log2(lse_s[col])) : 0.f;
        st[nb][e] = pr;
        if constexpr (Entropy) {
          const float* ent_s = stat_base + (stages + stage) * 2 * CM;  // g, shift of the chunk's rows
          dpt[nb][e] = pr * (dpt[nb][e] - delta_s[col] + ent_s[CM + col] - ent_s[col] * kLn2 * x2) *
                       math.cap_grad(raw);
        } else {
          dpt[nb][e] = pr * (dpt[nb][e] - delta_s[col]) * math.cap_grad(raw);
        }
      }
    }

    // -- dV_w += Pᵀ·dO and dK_w += dSᵀ·Q over the warp's column slice ------------------------------
#pragma unroll
    for (int kq = 0; kq < CM / 16; ++kq) {
      uint32_t ap[4], ads[4];
      accum_to_a<T>(ap, st, kq);
      accum_to_a<T>(ads, dpt, kq);
#pragma unroll
      for (int nd2 = 0; nd2 < DW / 16; ++nd2) {
        const int d0 = dslice * DW + nd2 * 16;
        uint32_t bo[4], bq[4];
        load_b_kn(bo, do_s, P, kq * 16, d0);
        load_b_kn(bq, q_s, P, kq * 16, d0);
        mma_16x16<T>(dv, nd2, ap, bo);
        mma_16x16<T>(dk, nd2, ads, bq);
      }
    }

    // -- non-deterministic dQ: dQ[chunk] += scale·dS·K with fp32 atomics (dS through shared) -------
    if (args.dq_accum != nullptr) {
      if (dslice == 0) {
#pragma unroll
        for (int nb = 0; nb < CM / 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            ds_s[(nb * 8 + 2 * quad + (e & 1)) * DSP + key_warp * 16 + group + 8 * (e >> 1)] =
                Elem<T>::from_float(dpt[nb][e]);
      }
      __syncthreads();
      constexpr int NC = D % 64 == 0 ? 64 : 32;  // dQ columns per work item (divides D)
      constexpr int kItems = (CM / 16) * (D / NC);
      for (int item = warp; item < kItems; item += kWarps) {
        const int rb = item / (D / NC), cb = item % (D / NC);
        float acc[NC / 8][4];
#pragma unroll
        for (int nc = 0; nc < NC / 8; ++nc) acc[nc][0] = acc[nc][1] = acc[nc][2] = acc[nc][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          uint32_t a[4];
          load_a(a, ds_s, DSP, rb * 16, kk * 16);
#pragma unroll
          for (int nc2 = 0; nc2 < NC / 16; ++nc2) {
            uint32_t bk[4];
            load_b_kn(bk, k_s, P, kk * 16, cb * NC + nc2 * 16);
            mma_16x16<T>(acc, nc2, a, bk);
          }
        }
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const int i = i0 + rb * 16 + group + 8 * rr;
          if (i >= p.seqlen_q) continue;
          float* dst = args.dq_accum + row_id(p, b, h, i) * p.head_dim;
#pragma unroll
          for (int nc = 0; nc < NC / 8; ++nc) {
            const int col = cb * NC + nc * 8 + 2 * quad;
            if (col < p.head_dim) atomicAdd(dst + col, acc[nc][2 * rr] * math.scale);
            if (col + 1 < p.head_dim) atomicAdd(dst + col + 1, acc[nc][2 * rr + 1] * math.scale);
          }
        }
      }
    }
    __syncthreads();  // this stage (and dS) is free again
    if (stages == 1 && next.valid) {
      load_chunk(next, 0);
      cp_async_commit();
    }
    cur = next;
    if (stages == 2) stage ^= 1;
  }
  cp_async_wait<0>();

  // ---- write dK = scale·Σ dSᵀ·Q and dV = Σ Pᵀ·dO (keys past Nk are not stored) -------------------
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int64_t j = key0 + key_warp * 16 + group + 8 * rr;
    if (j >= p.seqlen_k) continue;
    T* dk_row = row_ptr_mut<T>(g.dk, g.dk_strides, b, kvh, j);
    T* dv_row = row_ptr_mut<T>(g.dv, g.dv_strides, b, kvh, j);
#pragma unroll
    for (int nd = 0; nd < DW / 8; ++nd) {
      const int col = dslice * DW + nd * 8 + 2 * quad;
      store_pair(dk_row, col, p.head_dim, dk[nd][2 * rr] * math.scale, dk[nd][2 * rr + 1] * math.scale,
                 args.aligned16);
      store_pair(dv_row, col, p.head_dim, dv[nd][2 * rr], dv[nd][2 * rr + 1], args.aligned16);
    }
  }
}

// dQ over the forward schedule: one block per (query tile, head, batch), warps own 16 rows.
template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::kQThreads) mma_dq_kernel(const __grid_constant__ BackwardArgs args) {
  constexpr int D = Cfg::D, BM = Cfg::BM, BN = Cfg::BN, P = Cfg::kPitch;
  constexpr int kThreads = Cfg::kQThreads;
  FL_DYNAMIC_SMEM(smem_raw);
  const AttentionParams& p = args.p;
  const BackwardParams& g = args.g;
  const ScoreMath& math = args.math;
  const int stages = args.kv_stages;

  // Shared memory: Q, dO [BM][P]; per stage K, V [BN][P].
  T* const q_s = reinterpret_cast<T*>(smem_raw);
  T* const do_s = q_s + BM * P;
  T* const kv_base = do_s + BM * P;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int group = lane >> 2, quad = lane & 3;
  const int num_q_tiles = (p.seqlen_q + BM - 1) / BM;
  const int bh = static_cast<int>(blockIdx.x / num_q_tiles);
  const int m = num_q_tiles - 1 - static_cast<int>(blockIdx.x % num_q_tiles);
  const int b = bh / p.heads_q, h = bh % p.heads_q, kvh = h / p.group();
  const int rows_used = min(BM, p.seqlen_q - m * BM);
  const int64_t shift = static_cast<int64_t>(p.seqlen_k) - p.seqlen_q;
  const ScheduleView& fs = p.forward_schedule;
  const int count = fs.num_tiles(b, h, m);

  auto q_row = [&](int r) -> const T* {
    return r < rows_used ? row_ptr<T>(p.q, p.q_strides, b, h, m * BM + r) : nullptr;
  };
  auto do_row = [&](int r) -> const T* {
    return r < rows_used ? row_ptr<T>(g.grad_out, g.grad_out_strides, b, h, m * BM + r) : nullptr;
  };
  auto load_kv = [&](int t, int stage) {
    const int64_t key0 = static_cast<int64_t>(fs.tile(b, h, m, t)) * BN;
    T* k_s = kv_base + stage * 2 * BN * P;
    T* v_s = k_s + BN * P;
    load_head_rows<T, BN, D, kThreads>(k_s, P, p.k, p.k_strides, b, kvh, key0, p.seqlen_k, p.head_dim, args.aligned16);
    load_head_rows<T, BN, D, kThreads>(v_s, P, p.v, p.v_strides, b, kvh, key0, p.seqlen_k, p.head_dim, args.aligned16);
  };
  load_rows_16<T, BM, D, kThreads>(q_s, P, q_row, p.head_dim, args.aligned16, p.q);
  load_rows_16<T, BM, D, kThreads>(do_s, P, do_row, p.head_dim, args.aligned16, g.grad_out);
  cp_async_commit();
  if (count > 0) load_kv(0, 0);
  cp_async_commit();

  // Per-thread rows (g, g+8): lse (log2 units), δ, position, band; with the entropy's gradient
  // δ − shift and g·ln2 (gl).
  constexpr bool Entropy = Cfg::kStats;
  float lse2[2], delta[2], gl[Entropy ? 2 : 1];
  int64_t pos[2];
  KeyRange range[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = warp * 16 + group + 8 * rr;
    const bool ok = r < rows_used;
    const int64_t rid = ok ? row_id(p, b, h, m * BM + r) : 0;
    lse2[rr] = ok ? lse_log2(p.lse[rid]) : INFINITY;  // invalid rows: p = 0
    delta[rr] = ok ? g.delta[rid] : 0.f;
    if constexpr (Entropy) {
      const int64_t plane = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
      gl[rr] = ok ? g.entropy[rid] * kLn2 : 0.f;
      if (ok) delta[rr] -= g.entropy[plane + rid];
    }
    pos[rr] = m * BM + r + shift;
    range[rr] = band_range(p, pos[rr]);
  }
  const float slope = math.has_alibi ? p.alibi(b, h) : 0.f;
  const int32_t lo_max = band_range(p, m * BM + rows_used - 1 + shift).lo;
  const int32_t hi_min = band_range(p, m * BM + shift).hi;

  float dq[D / 8][4];
#pragma unroll
  for (int nd = 0; nd < D / 8; ++nd) dq[nd][0] = dq[nd][1] = dq[nd][2] = dq[nd][3] = 0.f;

  int stage = 0;
  for (int t = 0; t < count; ++t) {
    if (stages == 2 && t + 1 < count) {
      load_kv(t + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* k_s = kv_base + stage * 2 * BN * P;
    const T* v_s = k_s + BN * P;
    const int64_t key0 = static_cast<int64_t>(fs.tile(b, h, m, t)) * BN;

    // -- S = Q_w·Kᵀ, dP = dO_w·Vᵀ (16 rows x BN keys per warp) -----------------------------------
    float s[BN / 8][4], dp[BN / 8][4];
    mma_score_pair<T, D, BN, P>(s, dp, q_s, do_s, warp * 16, k_s, v_s);

    // -- p = 2^(s − lse), dS = p·(dP − δ)·(1 − tanh²) -------------------------------------------
    //    (with the entropy's gradient: dS = p·(dP − (δ − shift) − g·ln2·x2)·(1 − tanh²))
    const bool need_mask = key0 < lo_max || key0 + BN - 1 > hi_min;
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int rr = e >> 1;
        const int64_t j = key0 + nb * 8 + 2 * quad + (e & 1);
        const float raw = s[nb][e];
        const bool visible = !need_mask || (j >= range[rr].lo && j <= range[rr].hi);
        if constexpr (Entropy) {
          const float x2 = math.log2_units(raw, slope, pos[rr], j);
          const float pr = visible ? exp2f(x2 - lse2[rr]) : 0.f;
          dp[nb][e] = pr * (dp[nb][e] - delta[rr] - gl[rr] * x2) * math.cap_grad(raw);
        } else {
          const float pr = visible ? exp2f(math.log2_units(raw, slope, pos[rr], j) - lse2[rr]) : 0.f;
          dp[nb][e] = pr * (dp[nb][e] - delta[rr]) * math.cap_grad(raw);
        }
      }
    }

    // -- dQ_w += dS·K (K via ldmatrix.trans) ----------------------------------------------------
#pragma unroll
    for (int kb = 0; kb < BN / 16; ++kb) {
      uint32_t a[4];
      accum_to_a<T>(a, dp, kb);
#pragma unroll
      for (int nd2 = 0; nd2 < D / 16; ++nd2) {
        uint32_t bk[4];
        load_b_kn(bk, k_s, P, kb * 16, nd2 * 16);
        mma_16x16<T>(dq, nd2, a, bk);
      }
    }
    __syncthreads();
    if (stages == 1 && t + 1 < count) {
      load_kv(t + 1, 0);
      cp_async_commit();
    }
    if (stages == 2) stage ^= 1;
  }
  cp_async_wait<0>();

#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = warp * 16 + group + 8 * rr;
    if (r >= rows_used) continue;
    T* dq_row = row_ptr_mut<T>(g.dq, g.dq_strides, b, h, m * BM + r);
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd)
      store_pair(dq_row, nd * 8 + 2 * quad, p.head_dim, dq[nd][2 * rr] * math.scale,
                 dq[nd][2 * rr + 1] * math.scale, args.aligned16);
  }
}

// Host side: dK/dV (+ atomic dQ when args.dq_accum) and, unless atomic, the dQ pass.
// kv_stages: 2 if both kernels' double-buffered budgets fit `smem_limit`, else 1. With the
// entropy's gradient the dK/dV kernel gets entropy_smem more bytes (g, shift per stage).
template <typename T, class Cfg>
cudaError_t launch_mma_backward(BackwardArgs args, size_t smem_limit, cudaStream_t stream) {
  constexpr int BM = Cfg::BM, BN = Cfg::BN;
  const AttentionParams& p = args.p;
  const int64_t kv_blocks = static_cast<int64_t>((p.seqlen_k + BN - 1) / BN) * p.batch * p.heads_kv;
  auto entropy_smem = [&](int stages) -> size_t {
    return Cfg::kStats ? static_cast<size_t>(stages) * 2 * Cfg::kChunk * sizeof(float) : 0;
  };
  args.kv_stages = Cfg::kv_smem(2) + entropy_smem(2) <= smem_limit ? 2 : 1;
  if (kv_blocks > 0) {  // Nk = 0: no keys, nothing to write for dK/dV
    const cudaError_t err =
        launch_with_smem(mma_dkdv_kernel<T, Cfg>, dim3(static_cast<unsigned>(kv_blocks)), Cfg::kKvThreads,
                         Cfg::kv_smem(args.kv_stages) + entropy_smem(args.kv_stages), stream, args);
    if (err != cudaSuccess) return err;
  }
  if (args.dq_accum != nullptr) return cudaSuccess;
  const int64_t q_blocks = static_cast<int64_t>((p.seqlen_q + BM - 1) / BM) * p.batch * p.heads_q;
  args.kv_stages = Cfg::q_smem(2) <= smem_limit ? 2 : 1;
  return launch_with_smem(mma_dq_kernel<T, Cfg>, dim3(static_cast<unsigned>(q_blocks)), Cfg::kQThreads,
                          Cfg::q_smem(args.kv_stages), stream, args);
}

// With the entropy's gradient the BwdStatsTile kernels (FLASHLITE_MMA_STATS_TILES).
template <typename T, int D>
cudaError_t mma_backward_hd(const BackwardArgs& args, int block_m, int block_n, size_t smem_limit,
                            cudaStream_t stream) {
  if (args.g.entropy) {
#define FL_BWD_STATS_CASE(d, bm, bn)                                                       \
  if constexpr (d == D && stats_kernels<T>()) {                                            \
    if (block_m == bm && block_n == bn)                                                    \
      return launch_mma_backward<T, BwdStatsTile<d, bm, bn>>(args, smem_limit, stream);    \
  }
    FLASHLITE_MMA_STATS_TILES(FL_BWD_STATS_CASE)
#undef FL_BWD_STATS_CASE
    return cudaErrorInvalidValue;
  }
#define FL_BWD_CASE(d, bm, bn)                                                                                   \
  if constexpr (d == D) {                                                                                        \
    if (block_m == bm && block_n == bn) return launch_mma_backward<T, BwdTile<d, bm, bn>>(args, smem_limit, stream); \
  }
  FLASHLITE_MMA_TILES(FL_BWD_CASE)
#undef FL_BWD_CASE
  return cudaErrorInvalidValue;
}

}  // namespace flashlite::cuda::detail
