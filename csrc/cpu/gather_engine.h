// The gather engine (top-k): each query row attends the keys its index list names; forward,
// and the backward's row pass (dq, P, dS) and key pass (dk, dv over the key -> slot index), one
// instruction-set build. Scores in base 2, as in the tile engine.
#pragma once

#ifndef FL_ISA
#error "include isa_kernels.h from an isa_*.cpp (FL_ISA, FL_LANES, FL_MR defined), not this header"
#endif

#include "simd.h"
#include "philox.h"
#include "gemm.h"
#include "pack.h"
#include "prefetch.h"

namespace flashlite {
namespace cpu {
namespace FL_ISA {

// The score of one (row, slot) pair from x = q̃·k (see tile_engine.h's score_tile), in log2 units.
inline float gather_score(const AttentionParams& p, float x, float slope, int64_t dist, float* chain) {
  const float distance = static_cast<float>(dist < 0 ? -dist : dist);
  if (p.softcap != 0.f) {
    const float t = tanhf(x / p.softcap);
    *chain = 1.f - t * t;
    return kLog2e * (p.softcap * t - slope * distance);
  }
  *chain = 1.f;
  return x - kLog2e * slope * distance;
}

inline const int64_t* gather_row_indices(const AttentionParams& p, int b, int kv_head, int i) {
  return p.indices + b * p.indices_stride_b + kv_head * p.indices_stride_h + int64_t(i) * p.indices_stride_n;
}

// Per-row gather state: for each slot t < Kp (K rounded up to L) the float32 key and value rows
// (a zero row for an empty slot, a slot past K, or with causal a key after p(i)), the score
// s[t] (log2 units; −inf where empty), bias[t] (0, or −inf where empty) and the softcap chain.
struct GatherRow {
  const float** keys;
  const float** values;
  float* s;
  float* bias;
  float* chain;
  float* key_buf;    // [Kp][Dp] when k/v need converting
  float* value_buf;  // [Kp][Dp]
  const float* zero;  // [Dp] zeros
};

inline size_t gather_row_floats(const AttentionParams& p) {
  const int Dp = round_up(p.head_dim, L), Kp = round_up(p.top_k, L);
  return size_t(3 * Kp + 2 * Kp * Dp + Dp);
}
inline GatherRow gather_row_alloc(const AttentionParams& p, Workspace& ws, float* floats) {
  const int Dp = round_up(p.head_dim, L), Kp = round_up(p.top_k, L);
  GatherRow row;
  const float** pointers = ws.pointers(size_t(2 * Kp));
  row.keys = pointers;
  row.values = pointers + Kp;
  row.s = floats;
  row.bias = row.s + Kp;
  row.chain = row.bias + Kp;
  row.key_buf = row.chain + Kp;
  row.value_buf = row.key_buf + Kp * Dp;
  float* zero = row.value_buf + Kp * Dp;
  fill(zero, Dp, 0.f);
  row.zero = zero;
  return row;
}

// Scores of query row i (qv: the packed query q̃, Dp floats):  s_t = score(q̃·k_{idx_t}).
// Returns the row's maximum score (−inf if no slot is valid).
inline float gather_row_scores(const AttentionParams& p, int b, int kv_head, int i, const float* qv, float slope,
                               GatherRow& row) {
  const int D = p.head_dim, Dp = round_up(D, L), K = p.top_k, Kp = round_up(K, L);
  const int64_t* idx = gather_row_indices(p, b, kv_head, i);
  const int64_t pos = int64_t(i) + p.seqlen_k - p.seqlen_q;
  const int64_t last = p.causal ? pos : int64_t(p.seqlen_k) - 1;
  const bool direct = p.dtype == DType::kFloat32 && D == Dp;
  const float* k_base = static_cast<const float*>(p.k) + offset(p.k_strides, b, kv_head, 0);
  const float* v_base = static_cast<const float*>(p.v) + offset(p.v_strides, b, kv_head, 0);
  if (direct) {  // branch-free: valid iff 0 <= j <= last, i.e. j < limit as unsigned numbers
    const int64_t k_row = p.k_strides.row, v_row = p.v_strides.row;
    const uint64_t limit = last < 0 ? 0 : static_cast<uint64_t>(last) + 1;
    int t = 0;
    if constexpr (L64 > 1) {  // L64 slots per step, addresses as 64-bit lanes (was ~40 % of the row's instructions)
      const vu64 limit_v = vu64{} + limit;
      const vi64 k_addr = vi64{} + reinterpret_cast<int64_t>(k_base), v_addr = vi64{} + reinterpret_cast<int64_t>(v_base);
      const vi64 zero_addr = vi64{} + reinterpret_cast<int64_t>(row.zero);
      const vi64 k_step = vi64{} + k_row * int64_t(sizeof(float)), v_step = vi64{} + v_row * int64_t(sizeof(float));
      for (; t + L64 <= K; t += L64) {
        vi64 j;
        std::memcpy(&j, idx + t, sizeof j);
        const vi64 ok = reinterpret_cast<vi64>(reinterpret_cast<vu64>(j) < limit_v);  // −1 where valid
        const vi64 keys = ok ? k_addr + j * k_step : zero_addr;
        const vi64 values = ok ? v_addr + j * v_step : zero_addr;
        std::memcpy(row.keys + t, &keys, sizeof keys);
        std::memcpy(row.values + t, &values, sizeof values);
        const vfh bias = __builtin_convertvector(ok, vih) ? vfh{} : vfh{} - kInf;
        std::memcpy(row.bias + t, &bias, sizeof bias);
      }
    }
    for (; t < K; ++t) {
      const int64_t j = idx[t];
      const bool ok = static_cast<uint64_t>(j) < limit;
      const int64_t jj = ok ? j : 0;
      row.keys[t] = ok ? k_base + jj * k_row : row.zero;
      row.values[t] = ok ? v_base + jj * v_row : row.zero;
      row.bias[t] = ok ? 0.f : -kInf;
    }
  } else {
    for (int t = 0; t < K; ++t) {
      const int64_t j = idx[t];
      if (j < 0 || j > last) {
        row.keys[t] = row.values[t] = row.zero;
        row.bias[t] = -kInf;
        continue;
      }
      row.keys[t] = vector_row(p.dtype, p.k, offset(p.k_strides, b, kv_head, j), D, Dp, row.key_buf + t * Dp);
      row.values[t] = vector_row(p.dtype, p.v, offset(p.v_strides, b, kv_head, j), D, Dp, row.value_buf + t * Dp);
      row.bias[t] = 0.f;
    }
  }
  for (int t = K; t < Kp; ++t) {
    row.keys[t] = row.values[t] = row.zero;
    row.bias[t] = -kInf;
  }
  vf row_max = splat(-kInf);
  for (int t0 = 0; t0 < Kp; t0 += L) {
    const vf x = dots(qv, row.keys + t0, Dp);
    if (p.softcap == 0.f && slope == 0.f) {  // s = q̃·k (already log2 units)
      const vf s = x + load(row.bias + t0);
      store(row.s + t0, s);
      row_max = vmax(row_max, s);
      continue;
    }
    for (int t = t0; t < t0 + L; ++t) {
      row.chain[t] = 0.f;
      row.s[t] = row.bias[t] == 0.f ? gather_score(p, x[t - t0], slope, pos - idx[t], row.chain + t) : -kInf;
    }
    row_max = vmax(row_max, load(row.s + t0));
  }
  return hmax(row_max);
}

// Attention dropout of query row i's slots t0 .. t0 + L − 1 (philox.h): the factors Z = M/(1 − p)
// of elements (b, h, i, j = idx[t]), the same counters as the dense matrix's (the key position,
// not the slot, counts). Slots past K (and empty ones, whose probability is 0) use key 0.
FL_ALWAYS_INLINE vf gather_dropout_factors(const AttentionParams& p, uint64_t row_base, const int64_t* idx, int t0) {
  vu64w e;
  for (int l = 0; l < L; ++l) e[l] = row_base + static_cast<uint64_t>(t0 + l < p.top_k ? idx[t0 + l] : 0);
  return dropout_factors(p, e);
}

// Prefetch what row i streams through: its index list, its query row and (for writing) its
// output row. They are read in order, but the hardware prefetchers lose track of these streams
// among the scattered key/value loads; fetching them a few rows ahead removes most of the stalls
// (top-k 64 of 8192 keys, float32: 26 -> 17 ms on one core). The scattered key/value rows
// themselves are better left to the hardware: prefetching a whole row's 2·K rows ahead evicts
// the current row's from L1 and was slower.
// always_inline: a function whose only effect is __builtin_prefetch is "const" to GCC's IPA,
// and its calls are deleted as dead code unless it is inlined first.
constexpr int kStreamAhead = 4;
FL_ALWAYS_INLINE void prefetch_indices(const AttentionParams& p, int b, int kv_head, int i) {
  const char* indices = reinterpret_cast<const char*>(gather_row_indices(p, b, kv_head, i));
  for (int byte = 0; byte < p.top_k * int(sizeof(int64_t)); byte += 64) __builtin_prefetch(indices + byte);
}
FL_ALWAYS_INLINE void gather_prefetch_streams(const AttentionParams& p, int b, int h, int kv_head, int i) {
  if (i >= p.seqlen_q) return;
  prefetch_indices(p, b, kv_head, i);
  prefetch_row<0>(p, p.q, p.q_strides, b, h, i);
  prefetch_row<1>(p, p.out, p.out_strides, b, h, i);
}
// The backward's rows pass streams through the index list, q, dO and dq of each row.
FL_ALWAYS_INLINE void gather_prefetch_backward_streams(const AttentionParams& p, const BackwardParams& g, int b, int h,
                                                      int kv_head, int i) {
  if (i >= p.seqlen_q) return;
  prefetch_indices(p, b, kv_head, i);
  prefetch_row<0>(p, p.q, p.q_strides, b, h, i);
  prefetch_row<0>(p, g.grad_out, g.grad_out_strides, b, h, i);
  prefetch_row<1>(p, g.dq, g.dq_strides, b, h, i);
}

// Forward of rows [row_begin, row_end) of (b, h):
//   s_t = score(q_i·k_{idx_t}),  m = max_t s_t,  P_t = 2^(s_t − m),  l = Σ_t P_t,
//   out_i = Σ_t P_t·v_{idx_t} / l,  lse_i = ln2·(m + log2 l)   (no valid slot: 0 and −inf)
// Stats: the head statistics of the row (tile_engine.h's sums over the row's valid slots, one
// tile): t = Σ_t P_t·(s_t − m), d = Σ_t P_t·|p(i) − idx_t|, z = Σ_{idx_t < sink_tokens} P_t, c = the
// number of valid slots.
template <bool Stats>
void gather_forward_of(const AttentionParams& p, int b, int h, int row_begin, int row_end, Workspace& ws) {
  const int D = p.head_dim, Dp = round_up(D, L), K = p.top_k, Kp = round_up(K, L);
  const int kv_head = h / p.group();
  float* qv = ws.floats(size_t(2 * Dp) + gather_row_floats(p));
  float* acc = qv + Dp;
  GatherRow row = gather_row_alloc(p, ws, acc + Dp);
  const float slope = p.alibi(b, h), factor = query_factor(p);
  const int64_t row0 = (int64_t(b) * p.heads_q + h) * p.seqlen_q;
  float* lse = p.lse + row0;
  for (int i = row_begin; i < row_end; ++i) {
    gather_prefetch_streams(p, b, h, kv_head, i + kStreamAhead);
    pack_query_row(p, p.q, p.q_strides, b, h, i, factor, qv);
    const float row_max = gather_row_scores(p, b, kv_head, i, qv, slope, row);
    fill(acc, Dp, 0.f);
    if (row_max == -kInf) {
      lse[i] = -kInf;
      store_scaled_row(p, p.out, p.out_strides, b, h, i, acc, 1.f);
      if constexpr (Stats) write_row_stats(p, row0 + i, 0.f, 0.f, 0.f, 0.f, 0.f);
      continue;
    }
    vf sum = {}, t_sum = {}, c_sum = {};
    for (int t = 0; t < Kp; t += L) {
      const vf x = load(row.s + t) - row_max;
      const vf prob = exp2v(x);
      store(row.s + t, prob);
      sum += prob;
      if constexpr (Stats) {
        const vi seen = x != -kInf;
        t_sum += select(seen, prob * x, splat(0.f));
        c_sum += select(seen, splat(1.f), splat(0.f));
      }
    }
    const float l = hsum(sum);
    if constexpr (Stats) {  // invalid slots have P = 0, whatever their index
      const int64_t* idx = gather_row_indices(p, b, kv_head, i);
      const int64_t pos = int64_t(i) + p.seqlen_k - p.seqlen_q;
      float d = 0.f, z = 0.f;
      for (int t = 0; t < K; ++t) {
        const float prob = row.s[t];
        d += prob * static_cast<float>(pos > idx[t] ? pos - idx[t] : idx[t] - pos);
        z += idx[t] < p.sink_tokens ? prob : 0.f;
      }
      write_row_stats(p, row0 + i, l, hsum(t_sum), d, z, hsum(c_sum));
    }
    if (p.dropout) {  // P_t *= Z_t after the (undropped) sum
      const uint64_t row_base = p.dropout_index(b, h, i, 0);
      const int64_t* idx = gather_row_indices(p, b, kv_head, i);
      for (int t = 0; t < Kp; t += L) store(row.s + t, load(row.s + t) * gather_dropout_factors(p, row_base, idx, t));
    }
    weighted_rows(row.s, row.values, K, Dp, acc);
    store_scaled_row(p, p.out, p.out_strides, b, h, i, acc, 1.f / l);
    lse[i] = (row_max + log2f(l)) * kLn2;
  }
}
void gather_forward(const AttentionParams& p, int b, int h, int row_begin, int row_end, Workspace& ws) {
  if (p.row_stats)
    gather_forward_of<true>(p, b, h, row_begin, row_end, ws);
  else
    gather_forward_of<false>(p, b, h, row_begin, row_end, ws);
}

// Backward, per row:  P_t = 2^(s_t − lse_i),  dS_t = P_t (dO_i·v_t − δ_i)·chain·scale,
// dq_i = Σ_t dS_t·k_t; P and dS are kept for the key pass. With dropout (Z_t = M/(1 − p)):
// dS_t = P_t (Z_t·dO_i·v_t − δ_i)·chain·scale, and P_t·Z_t is kept (dv_j = Σ P·Z·dO). With the
// entropy's gradient (Entropy: g.entropy's g_i and shift_i): dS_t = P_t (dP_t − (δ_i − shift_i) −
// g_i·s_t)·chain·scale, s_t the natural-units logit.
template <bool Entropy>
void gather_backward_rows_of(const AttentionParams& p, const BackwardParams& g, const GatherGrads& gg, int b, int h,
                             int row_begin, int row_end, Workspace& ws) {
  const int D = p.head_dim, Dp = round_up(D, L), K = p.top_k, Kp = round_up(K, L);
  const int kv_head = h / p.group();
  float* qv = ws.floats(size_t(3 * Dp + Kp) + gather_row_floats(p));
  float* dov = qv + Dp;
  float* dq = dov + Dp;
  float* ds = dq + Dp;
  GatherRow row = gather_row_alloc(p, ws, ds + Kp);
  const float slope = p.alibi(b, h), factor = query_factor(p);
  const int64_t row_base = (int64_t(b) * p.heads_q + h) * p.seqlen_q;
  for (int i = row_begin; i < row_end; ++i) {
    gather_prefetch_backward_streams(p, g, b, h, kv_head, i + kStreamAhead);
    float* probs = gg.probs + (row_base + i) * K;
    float* grads = gg.score_grads + (row_base + i) * K;
    fill(dq, Dp, 0.f);
    const float lse = p.lse[row_base + i];
    if (lse == -kInf) {  // no valid slot: nothing flows back
      fill(probs, K, 0.f);
      fill(grads, K, 0.f);
      store_row(p.dtype, g.dq, offset(g.dq_strides, b, h, i), D, dq);
      continue;
    }
    pack_query_row(p, p.q, p.q_strides, b, h, i, factor, qv);
    pack_query_row(p, g.grad_out, g.grad_out_strides, b, h, i, 1.f, dov);
    gather_row_scores(p, b, kv_head, i, qv, slope, row);
    const float lse2 = lse * kLog2e;
    float delta = g.delta[row_base + i], gl = 0.f;
    if constexpr (Entropy) {
      const int64_t plane = int64_t(p.batch) * p.heads_q * p.seqlen_q;
      delta -= g.entropy[plane + row_base + i];
      gl = g.entropy[row_base + i] * kLn2;  // times the log2-units score
    }
    const uint64_t drop_base = p.dropout_index(b, h, i, 0);
    const int64_t* idx = p.dropout ? gather_row_indices(p, b, kv_head, i) : nullptr;
    for (int t0 = 0; t0 < Kp; t0 += L) {
      vf dp = dots(dov, row.values + t0, Dp);  // dP_t = dO_i·v_t
      const vf z = p.dropout ? gather_dropout_factors(p, drop_base, idx, t0) : splat(1.f);
      if (p.dropout) dp *= z;
      for (int t = t0; t < t0 + L; ++t) {
        const float prob = row.s[t] == -kInf ? 0.f : exp2f(row.s[t] - lse2);
        float inner = dp[t - t0] - delta;
        if constexpr (Entropy) inner -= prob == 0.f ? 0.f : gl * row.s[t];
        ds[t] = prob == 0.f ? 0.f : prob * inner * (p.softcap != 0.f ? row.chain[t] : 1.f) * p.scale;
        if (t < K) {
          probs[t] = prob * z[t - t0];  // z = 1 without dropout
          grads[t] = ds[t];
        }
      }
    }
    weighted_rows(ds, row.keys, K, Dp, dq);
    store_row(p.dtype, g.dq, offset(g.dq_strides, b, h, i), D, dq);
  }
}
void gather_backward_rows(const AttentionParams& p, const BackwardParams& g, const GatherGrads& gg, int b, int h,
                          int row_begin, int row_end, Workspace& ws) {
  if (g.entropy)
    gather_backward_rows_of<true>(p, g, gg, b, h, row_begin, row_end, ws);
  else
    gather_backward_rows_of<false>(p, g, gg, b, h, row_begin, row_end, ws);
}

// Backward, per key j of (b, kv head), over the slots that selected it (the key -> slot index,
// ascending) and, for each slot, the GQA group's query heads in order:
//   dk_j = Σ_slot Σ_gi dS·q_i,  dv_j = Σ_slot Σ_gi P·dO_i   (slot = i·K + t)
// The order is fixed by the index, so the sums are the same bits for any thread count.
constexpr int kEntriesAhead = 8;  // 4: -15 %, 8 and 16: -20 % of the backward (top-k 64 of 8192, 1 thread)
void gather_backward_keys(const AttentionParams& p, const BackwardParams& g, const GatherGrads& gg, int b, int kv_head,
                          int key_begin, int key_end, Workspace& ws) {
  const int D = p.head_dim, Dp = round_up(D, L), K = p.top_k, group = p.group();
  float* dk = ws.floats(size_t(4 * Dp));
  float* dv = dk + Dp;
  float* qbuf = dv + Dp;
  float* dobuf = qbuf + Dp;
  const int hi = p.index_heads == 1 ? 0 : kv_head;
  const int64_t* offsets = g.key_offsets + (int64_t(b) * p.index_heads + hi) * p.seqlen_k;
  const int64_t* slots = g.key_slots;
  // P and dS of (b, kv_head·group + gi, slot) at block[gi·Nq·K + slot] (work.h's GatherGrads).
  const int64_t head_stride = int64_t(p.seqlen_q) * K;
  const int64_t block = (int64_t(b) * p.heads_q + int64_t(kv_head) * group) * head_stride;
  const float* probs = gg.probs + block;
  const float* score_grads = gg.score_grads + block;
  const int h0 = kv_head * group;
  // Each (slot, head) entry reads a q row, a dO row and one P and one dS, all at scattered places
  // that the hardware cannot predict but the slot list names: they are prefetched about
  // kEntriesAhead entries early, i.e. `ahead` slots (the list runs on across keys).
  const int ahead = (kEntriesAhead + group - 1) / group;
  const int64_t last_slot = offsets[key_end];
  for (int j = key_begin; j < key_end; ++j) {
    fill(dk, Dp, 0.f);
    fill(dv, Dp, 0.f);
    for (int64_t e = offsets[j]; e < offsets[j + 1]; ++e) {
      if (e + ahead < last_slot) {
        const int64_t slot = slots[e + ahead];
        const int i = static_cast<int>(slot / K);
        for (int gi = 0; gi < group; ++gi) {
          prefetch_row<0>(p, p.q, p.q_strides, b, h0 + gi, i);
          prefetch_row<0>(p, g.grad_out, g.grad_out_strides, b, h0 + gi, i);
          __builtin_prefetch(score_grads + gi * head_stride + slot);
          __builtin_prefetch(probs + gi * head_stride + slot);
        }
      }
      const int64_t slot = slots[e];
      const int i = static_cast<int>(slot / K);
      for (int gi = 0; gi < group; ++gi) {
        const int h = h0 + gi;
        if (!p.row_kept(b, h, i)) continue;  // a masked head's row: no P, no dS, nothing added
        const int64_t at = gi * head_stride + slot;
        axpy(score_grads[at], vector_row(p.dtype, p.q, offset(p.q_strides, b, h, i), D, Dp, qbuf), dk, Dp);
        axpy(probs[at], vector_row(p.dtype, g.grad_out, offset(g.grad_out_strides, b, h, i), D, Dp, dobuf), dv, Dp);
      }
    }
    store_row(p.dtype, g.dk, offset(g.dk_strides, b, kv_head, j), D, dk);
    store_row(p.dtype, g.dv, offset(g.dv_strides, b, kv_head, j), D, dv);
  }
}

}  // namespace FL_ISA
}  // namespace cpu
}  // namespace flashlite
