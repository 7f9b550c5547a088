// Timing of the CPU gather (top-k) kernels without Python: the kernels' own cost, for tuning.
//
//   cmake -B build-cmake && cmake --build build-cmake --target bench_cpu_gather
//   build-cmake/bench_cpu_gather [random|local] [reps] [isa] [forward|backward] [heads]
//
// float32, `heads` heads (default 4) x 8192 queries x 64 slots over 8192 keys, head_dim 64, one
// thread: the case of issue 5's top-k target. "random": 64 distinct random keys per query
// (scattered rows, cache-bound); "local": keys drawn from the first 512 (every row L2-resident:
// the arithmetic's cost; duplicates made -1, as the Python side canonicalizes rows). "backward"
// times gather_backward (after one forward for lse); its key -> slot CSR is built here, untimed,
// as the Python side builds it once per call plan. Prints the best of `reps` calls. Buffers are
// 64-byte aligned as torch's are: with malloc's 16-byte alignment a 256-byte row spans 5 cache
// lines instead of 4 and the figures are ~2x worse.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/kernels.h"

namespace {
float* aligned_floats(size_t count) {
  return static_cast<float*>(std::aligned_alloc(64, (count * sizeof(float) + 63) / 64 * 64));
}
}  // namespace

int main(int argc, char** argv) {
  using namespace flashlite;
  const int N = 8192, D = 64, K = 64;
  const bool random = argc < 2 || argv[1][0] != 'l';
  const int reps = argc > 2 ? std::atoi(argv[2]) : 20;
  if (argc > 3 && std::strcmp(argv[3], "best") != 0 && !cpu::set_isa(argv[3])) {
    std::fprintf(stderr, "unknown or unsupported isa %s (\"best\" = the default choice)\n", argv[3]);
    return 2;
  }
  const bool backward = argc > 4 && argv[4][0] == 'b';
  const int H = argc > 5 ? std::atoi(argv[5]) : 4;
  const size_t elems = size_t(H) * N * D;
  float *q = aligned_floats(elems), *k = aligned_floats(elems), *v = aligned_floats(elems), *out = aligned_floats(elems);
  std::vector<float> lse(size_t(H) * N);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (float* x : {q, k, v})
    for (size_t i = 0; i < elems; ++i) x[i] = normal(rng);
  std::vector<int64_t> indices(size_t(H) * N * K);
  std::vector<int> order(N);
  for (int j = 0; j < N; ++j) order[j] = j;
  for (size_t row = 0; row < size_t(H) * N; ++row) {
    for (int t = 0; t < K; ++t) {
      if (random) {  // partial Fisher-Yates: K distinct keys
        std::swap(order[t], order[t + rng() % (N - t)]);
        indices[row * K + t] = order[t];
      } else {
        indices[row * K + t] = rng() % 512;
      }
    }
    int64_t* list = indices.data() + row * K;  // canonical: sorted, repeats -1
    std::sort(list, list + K);
    for (int t = K - 1; t > 0; --t)
      if (list[t] == list[t - 1]) list[t] = -1;
  }

  AttentionParams p;
  p.q = q, p.k = k, p.v = v, p.out = out, p.lse = lse.data();
  p.q_strides = p.k_strides = p.v_strides = p.out_strides = Strides3{int64_t(H) * N * D, int64_t(N) * D, D};
  p.batch = 1, p.heads_q = p.heads_kv = H, p.seqlen_q = p.seqlen_k = N, p.head_dim = D, p.scale = 0.125f;
  p.indices = indices.data(), p.top_k = K, p.index_heads = H;
  p.indices_stride_b = int64_t(H) * N * K, p.indices_stride_h = int64_t(N) * K, p.indices_stride_n = K;

  // Backward inputs: dO, δ = Σ_d dO·O, outputs, and the key -> slot CSR (docs/native_abi.md).
  float *grad_out = nullptr, *dq = nullptr, *dk = nullptr, *dv = nullptr;
  std::vector<float> delta;
  std::vector<int64_t> key_offsets, key_slots;
  BackwardParams g;
  if (backward) {
    grad_out = aligned_floats(elems), dq = aligned_floats(elems), dk = aligned_floats(elems), dv = aligned_floats(elems);
    for (size_t i = 0; i < elems; ++i) grad_out[i] = normal(rng);
    cpu::gather_forward(p, 1);
    delta.assign(size_t(H) * N, 0.f);
    for (size_t r = 0; r < delta.size(); ++r)
      for (int d = 0; d < D; ++d) delta[r] += grad_out[r * D + d] * out[r * D + d];
    key_offsets.assign(size_t(H) * N + 1, 0);
    for (size_t e = 0; e < indices.size(); ++e)
      if (indices[e] >= 0) ++key_offsets[e / (size_t(N) * K) * N + size_t(indices[e]) + 1];
    for (size_t s = 0; s < size_t(H) * N; ++s) key_offsets[s + 1] += key_offsets[s];
    key_slots.resize(size_t(key_offsets.back()));
    std::vector<int64_t> fill(key_offsets.begin(), key_offsets.end() - 1);
    for (size_t e = 0; e < indices.size(); ++e)  // e = (h·N + i)·K + t: ascending slot i·K + t per key
      if (indices[e] >= 0) key_slots[size_t(fill[e / (size_t(N) * K) * N + size_t(indices[e])]++)] = int64_t(e % (size_t(N) * K));
    g.grad_out = grad_out, g.delta = delta.data(), g.dq = dq, g.dk = dk, g.dv = dv;
    g.grad_out_strides = g.dq_strides = g.dk_strides = g.dv_strides = p.q_strides;
    g.key_offsets = key_offsets.data(), g.key_slots = key_slots.data();
  }

  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto start = std::chrono::steady_clock::now();
    if (backward) {
      cpu::gather_backward(p, g, 1);
    } else {
      cpu::gather_forward(p, 1);
    }
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  double checksum = 0;
  for (size_t i = 0; i < elems; i += 997) checksum += backward ? dq[i] + dk[i] + dv[i] : out[i];
  std::printf("%s %s %s, %d heads: best of %d %.2f ms (checksum %.6f)\n", cpu::isa(), random ? "random" : "local",
              backward ? "backward" : "forward", H, reps, best * 1e3, checksum);
  for (float* x : {q, k, v, out, grad_out, dq, dk, dv}) std::free(x);
  return 0;
}
