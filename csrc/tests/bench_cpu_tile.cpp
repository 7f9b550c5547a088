// Timing of the CPU tile engine (dense full / causal attention) without Python: the kernels' own
// cost and each product's, for tuning the backward.
//
//   cmake -B build-cmake && cmake --build build-cmake --target bench_cpu_tile
//   build-cmake/bench_cpu_tile [forward|backward|stages] [full|causal] [N] [D] [heads] [reps] [threads]
//
// float32, 1 batch x `heads` heads (default 4) x N queries x N keys (default 1024), head_dim D
// (default 64), the avx512 build when the CPU has it. forward / backward: best of `reps` calls
// (default 10) of tile_forward / tile_backward on `threads` threads (default 1), GFLOP/s by the
// bench's rule (forward 4·D per visible (query, key) pair, backward 2.5x that). stages: each
// product of the backward's inner loop (64 x 64 tiles, D) on its own, with the backward's operand
// layouts, and the elementwise P / dS stage, best of `reps` x 200 runs, GFLOP/s each (the
// products' share of the backward's flops: every one is 2·64·64·D).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/peak.h"

// The stages mode compiles the kernels' parts once more, in a namespace of its own.
#include "cpu/prelude.h"
#if defined(__x86_64__)
#define FL_ISA bench512
#define FL_ISA_NAME "bench512"
#define FL_LANES 16
#define FL_MR 8
#define FL_TARGET "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"
#include "cpu/isa_target.h"
#endif

namespace {
using Clock = std::chrono::steady_clock;
float* aligned_floats(size_t count) {
  float* x = static_cast<float*>(std::aligned_alloc(64, (count * sizeof(float) + 63) / 64 * 64));
  std::memset(x, 0, count * sizeof(float));
  return x;
}
double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }
// CPU time of the process (all threads): time spent preempted on a busy machine does not count.
double cpu_seconds() {
  timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

#if defined(__x86_64__)
// Best time of `runs` calls of f, over `reps` rounds.
template <class F>
double best_of(int reps, int runs, F&& f) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto start = Clock::now();
    for (int i = 0; i < runs; ++i) f();
    best = std::min(best, seconds_since(start) / runs);
  }
  return best;
}

template <int R, int NV>
void gemm_try(int X, int Y, int depth, const float* a, int64_t a_x, int64_t a_k, const float* b, int64_t b_k, float* c,
              int64_t c_x, bool accumulate) {
  using namespace flashlite::cpu::bench512;
  for (int y = 0; y < Y; y += NV * L) {
    int x = 0;
    for (; x + R <= X; x += R) gemm_block<R, NV>(depth, a + x * a_x, a_x, a_k, b + y, b_k, c + x * c_x + y, c_x, accumulate);
    for (; x + 4 <= X; x += 4) gemm_block<4, NV>(depth, a + x * a_x, a_x, a_k, b + y, b_k, c + x * c_x + y, c_x, accumulate);
    for (; x < X; ++x) gemm_block<1, NV>(depth, a + x * a_x, a_x, a_k, b + y, b_k, c + x * c_x + y, c_x, accumulate);
  }
}
template <int R, int NV>
void try_shape(int D, int reps, float* k, float* qt, float* st, float* q_rows, float* dk, float* dpt, float* dq, double peak) {
  const int BM = 64, BN = 64, Dp = D;
  const double flops = 2.0 * BM * BN * D;
  double t1 = best_of(reps, 200, [&] { gemm_try<R, NV>(BN, BM, D, k, Dp, 1, qt, BM, st, BM, false); });
  double t2 = best_of(reps, 200, [&] { gemm_try<R, NV>(BN, Dp, BM, st, BM, 1, q_rows, Dp, dk, Dp, true); });
  double t3 = best_of(reps, 200, [&] { gemm_try<R, NV>(BM, Dp, BN, dpt, 1, BM, k, Dp, dq, Dp, true); });
  std::printf("R=%d NV=%d: %4.0f%% %4.0f%% %4.0f%% of peak\n", R, NV, 100 * flops / t1 * 1e-9 / peak,
              100 * flops / t2 * 1e-9 / peak, 100 * flops / t3 * 1e-9 / peak);
}

int stages(int D, int reps) {
  using namespace flashlite::cpu::bench512;
  const int BM = 64, BN = 64, Dp = round_up(D, L);
  float *k = aligned_floats(BN * Dp), *v = aligned_floats(BN * Dp), *qt = aligned_floats(Dp * BM),
        *q_rows = aligned_floats(BM * Dp), *st = aligned_floats(BN * BM), *dpt = aligned_floats(BN * BM),
        *dk = aligned_floats(BN * Dp), *dq = aligned_floats(BM * Dp), *lse2 = aligned_floats(BM),
        *delta = aligned_floats(BM);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (float* x : {k, v, qt, q_rows, st, dpt})
    for (int i = 0; i < BN * Dp; ++i) x[i] = normal(rng) * 0.1f;
  const double flops = 2.0 * BM * BN * D;
  struct Stage {
    const char* name;
    double seconds;
  } rows[] = {
      {"S^T = K q~^T   (X=nk, Y=BM, depth D; A rows of K)", best_of(reps, 200, [&] {
         gemm(BN, BM, D, k, Dp, 1, qt, BM, st, BM, false);
       })},
      {"dV += P^T dO   (X=nk, Y=Dp, depth BM; A columns of P^T)", best_of(reps, 200, [&] {
         gemm(BN, Dp, BM, st, BM, 1, q_rows, Dp, dk, Dp, true);
       })},
      {"dQ += dS K     (X=BM, Y=Dp, depth nk; A strided by BM)", best_of(reps, 200, [&] {
         gemm(BM, Dp, BN, dpt, 1, BM, k, Dp, dq, Dp, true);
       })},
  };
  flashlite::cpu::PeakResult peak;
  flashlite::cpu::fma_peak("avx512", 1, 0.3, &peak);
  std::printf("FMA loop peak (avx512, 1 thread, best 1 ms trial): %.1f GFLOP/s\n", peak.best);
  for (const Stage& s : rows)
    std::printf("%-60s %8.2f us  %6.1f GFLOP/s  %4.0f%% of peak\n", s.name, s.seconds * 1e6, flops / s.seconds * 1e-9,
                100.0 * flops / s.seconds * 1e-9 / peak.best);
  try_shape<8, 2>(D, reps, k, qt, st, q_rows, dk, dpt, dq, peak.best);
  try_shape<12, 2>(D, reps, k, qt, st, q_rows, dk, dpt, dq, peak.best);
  try_shape<4, 4>(D, reps, k, qt, st, q_rows, dk, dpt, dq, peak.best);
  try_shape<6, 4>(D, reps, k, qt, st, q_rows, dk, dpt, dq, peak.best);
  try_shape<8, 4>(D, reps, k, qt, st, q_rows, dk, dpt, dq, peak.best);
  flashlite::AttentionParams p;
  p.scale = 0.125f;
  p.seqlen_k = 4096;
  for (int r = 0; r < BM; ++r) lse2[r] = 3.f, delta[r] = 0.1f;
  const double ew = best_of(reps, 200, [&] {
    probs_and_score_grads_of<false, false>(p, BN, BM, st, dpt, nullptr, lse2, delta, nullptr, BM, true, 0);
  });
  std::printf("%-60s %8.2f us  (%.1f%% of 5 products at the first's rate)\n", "P, dS elementwise", ew * 1e6,
              100.0 * ew / (5 * rows[0].seconds));
  return 0;
}
// tile_backward_head of (b = 0, kv head 0) with each stage timed (rdtsc) per tile pair; prints the
// median ticks of each stage, so preemptions on a busy machine do not count.
void profile_head(const flashlite::AttentionParams& p, const flashlite::BackwardParams& g, bool timed = true) {
  using namespace flashlite::cpu::bench512;
  using flashlite::cpu::Workspace;
  const flashlite::cpu::Segment sg = flashlite::cpu::batch_segment(p, 0);
  const int BM = p.block_m, BN = p.block_n, D = p.head_dim, Dp = round_up(D, L);
  const int num_m = (sg.nq + BM - 1) / BM, num_n = (sg.nk + BN - 1) / BN;
  Workspace ws, pack_ws;
  const int64_t tile_floats = packed_tile_floats(p);
  std::vector<float> packed(size_t(tile_floats * num_m) + 16);
  for (int m = 0; m < num_m; ++m) tile_backward_pack(p, g, sg, 0, m, packed.data() + m * tile_floats, pack_ws);
  const int64_t dq_floats = int64_t(num_m) * BM * Dp;
  float* dq_all = ws.floats(size_t(dq_floats + 2 * BN * BM + 4 * BN * Dp));
  float* st = dq_all + dq_floats;
  float* dpt = st + BN * BM;
  float* kbuf = dpt + BN * BM;
  float* vbuf = kbuf + BN * Dp;
  float* dk = vbuf + BN * Dp;
  float* dv = dk + BN * Dp;
  fill(dq_all, dq_floats, 0.f);
  const char* names[] = {"S = K q~^T", "dP = V dO^T", "P, dS", "dV += P^T dO", "dK += dS^T Q", "dQ += dS K"};
  std::vector<uint64_t> ticks[7];
  for (int n = 0; n < num_n; ++n) {
    const int j0 = n * BN, nk = imin(BN, sg.nk - j0);
    const RowsView k = kv_rows(p.dtype, p.k, p.k_strides, 0, 0, j0, nk, D, Dp, true, kbuf);
    const RowsView v = kv_rows(p.dtype, p.v, p.v_strides, 0, 0, j0, nk, D, Dp, false, vbuf);
    fill(dk, BN * Dp, 0.f);
    fill(dv, BN * Dp, 0.f);
    for (int m = 0; m < num_m; ++m) {
      const int rows = imin(BM, sg.nq - m * BM), Y = round_up(rows, L);
      const PackedTile tile = packed_tile(p, packed.data() + m * tile_floats);
      uint64_t t[7];
      t[0] = __rdtsc();
      gemm(nk, Y, D, k.data, k.ld, 1, tile.qt, BM, st, BM, false);
      t[1] = __rdtsc();
      gemm(nk, Y, D, v.data, v.ld, 1, tile.do_t, BM, dpt, BM, false);
      t[2] = __rdtsc();
      probs_and_score_grads(p, nk, Y, st, dpt, nullptr, tile, false, BM, true, 0);
      t[3] = __rdtsc();
      gemm(nk, Dp, rows, st, BM, 1, tile.do_rows, Dp, dv, Dp, true);
      t[4] = __rdtsc();
      gemm(nk, Dp, rows, dpt, BM, 1, tile.q_rows, Dp, dk, Dp, true);
      t[5] = __rdtsc();
      gemm(rows, Dp, nk, dpt, 1, BM, k.data, k.ld, dq_all + int64_t(m) * BM * Dp, Dp, true);
      t[6] = __rdtsc();
      for (int i = 0; i < 6; ++i) ticks[i].push_back(t[i + 1] - t[i]);
      if (!timed) continue;
      // the first product again, its operands now in L1: the same work hot, under the same conditions
      const uint64_t h0 = __rdtsc();
      gemm(nk, Y, D, k.data, k.ld, 1, tile.qt, BM, st, BM, false);
      ticks[6].push_back(__rdtsc() - h0);
    }
  }
  if (!timed) return;
  double total = 0;
  for (int i = 0; i < 6; ++i) {
    std::sort(ticks[i].begin(), ticks[i].end());
    total += double(ticks[i][ticks[i].size() / 2]);
  }
  for (int i = 0; i < 6; ++i) {
    const double med = double(ticks[i][ticks[i].size() / 2]);
    std::printf("%-16s median %8.0f ticks  %5.1f%%  min %8llu\n", names[i], med, 100 * med / total,
                (unsigned long long)ticks[i][0]);
  }
  std::sort(ticks[6].begin(), ticks[6].end());
  std::printf("S again (hot)    median %8.0f ticks\n", double(ticks[6][ticks[6].size() / 2]));
  std::printf("sum of medians %.0f ticks per tile pair; %.0f flops per product\n", total, 2.0 * BM * BN * D);
}
#endif
}  // namespace

int main(int argc, char** argv) {
  using namespace flashlite;
  const char* mode = argc > 1 ? argv[1] : "backward";
  const bool causal = argc > 2 && argv[2][0] == 'c';
  const int N = argc > 3 ? std::atoi(argv[3]) : 1024, D = argc > 4 ? std::atoi(argv[4]) : 64;
  const int H = argc > 5 ? std::atoi(argv[5]) : 4, reps = argc > 6 ? std::atoi(argv[6]) : 10;
  const int threads = argc > 7 ? std::atoi(argv[7]) : 1;
#if defined(__x86_64__)
  if (mode[0] == 's') return stages(D, reps);
#endif
  const bool backward = mode[0] == 'b';
  const size_t elems = size_t(H) * N * D;
  float *q = aligned_floats(elems), *k = aligned_floats(elems), *v = aligned_floats(elems), *out = aligned_floats(elems),
        *grad_out = aligned_floats(elems), *dq = aligned_floats(elems), *dk = aligned_floats(elems),
        *dv = aligned_floats(elems);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (float* x : {q, k, v, grad_out})
    for (size_t i = 0; i < elems; ++i) x[i] = normal(rng);
  std::vector<float> lse(size_t(H) * N), delta(size_t(H) * N);

  AttentionParams p;
  p.q = q, p.k = k, p.v = v, p.out = out, p.lse = lse.data();
  p.q_strides = p.k_strides = p.v_strides = p.out_strides = Strides3{int64_t(H) * N * D, int64_t(N) * D, D};
  p.batch = 1, p.heads_q = p.heads_kv = H, p.seqlen_q = p.seqlen_k = N, p.head_dim = D;
  p.scale = 1.f / std::sqrt(float(D));
  p.window_left = 2 * N, p.window_right = causal ? 0 : 2 * N;
  cpu::tile_config(D, DType::kFloat32, 0, &p.block_m, &p.block_n);
  // Range schedules of the band (square tiles): query tile m sees key tiles 0 .. (causal ? m : all).
  const int tiles = (N + p.block_m - 1) / p.block_m;
  const size_t num_tiles = size_t(tiles);
  std::vector<int32_t> zeros(num_tiles, 0), count(num_tiles), q_first(num_tiles), q_count(num_tiles);
  for (int t = 0; t < tiles; ++t) {
    count[size_t(t)] = causal ? t + 1 : tiles;
    q_first[size_t(t)] = causal ? t : 0;
    q_count[size_t(t)] = causal ? tiles - t : tiles;
  }
  p.forward_schedule.tiles = zeros.data(), p.forward_schedule.count = count.data();
  p.forward_schedule.tiles_stride_row = 1;
  p.backward_schedule.tiles = q_first.data(), p.backward_schedule.count = q_count.data();
  p.backward_schedule.tiles_stride_row = 1;

  BackwardParams g;
  cpu::tile_forward(p, threads);
  for (size_t r = 0; r < delta.size(); ++r)
    for (int d = 0; d < D; ++d) delta[r] += grad_out[r * D + d] * out[r * D + d];
  g.grad_out = grad_out, g.delta = delta.data(), g.dq = dq, g.dk = dk, g.dv = dv;
  g.grad_out_strides = g.dq_strides = g.dk_strides = g.dv_strides = p.q_strides;

#if defined(__x86_64__)
  if (mode[0] == 'p') {
    profile_head(p, g);
    return 0;
  }
  if (mode[0] == 'o') {  // overhead: the whole call (1 head) against its tile pairs alone, interleaved
    double call = 1e30, pairs = 1e30;
    for (int r = 0; r < reps; ++r) {
      auto start = Clock::now();
      cpu::tile_backward(p, g, 1);
      call = std::min(call, seconds_since(start));
      start = Clock::now();
      profile_head(p, g, false);
      pairs = std::min(pairs, seconds_since(start));
    }
    std::printf("whole call %.3f ms, its tile pairs (and packing) %.3f ms: %.1f%% more\n", call * 1e3, pairs * 1e3,
                100 * (call / pairs - 1));
    return 0;
  }
#endif
  double best = 1e30, best_cpu = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto start = Clock::now();
    const double cpu_start = cpu_seconds();
    if (backward)
      cpu::tile_backward(p, g, threads);
    else
      cpu::tile_forward(p, threads);
    best = std::min(best, seconds_since(start));
    best_cpu = std::min(best_cpu, (cpu_seconds() - cpu_start) / threads);
  }
  const double pairs = causal ? double(N) * (N + 1) / 2 : double(N) * N;
  const double flops = 4.0 * D * pairs * H * (backward ? 2.5 : 1.0);
  double checksum = 0;
  for (size_t i = 0; i < elems; i += 997) checksum += backward ? dq[i] + dk[i] + dv[i] : out[i];
  std::printf("%s %s %s N=%d D=%d H=%d threads=%d: best of %d %.2f ms, %.1f GFLOP/s; CPU time per thread %.2f ms, "
              "%.1f GFLOP/s (checksum %.6f)\n", cpu::isa(), causal ? "causal" : "full", backward ? "backward" : "forward",
              N, D, H, threads, reps, best * 1e3, flops / best * 1e-9, best_cpu * 1e3, flops / best_cpu * 1e-9, checksum);
  for (float* x : {q, k, v, out, grad_out, dq, dk, dv}) std::free(x);
  return 0;
}
