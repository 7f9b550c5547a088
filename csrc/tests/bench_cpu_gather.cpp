// Timing of the CPU gather (top-k) forward without Python: the kernel's own cost, for tuning.
//
//   cmake -B build-cmake && cmake --build build-cmake --target bench_cpu_gather
//   build-cmake/bench_cpu_gather [random|local] [reps] [isa]
//
// float32, 4 heads x 8192 queries x 64 slots over 8192 keys, head_dim 64, one thread: the case of
// issue 5's top-k target. "random": 64 distinct random keys per query (scattered rows, cache-bound);
// "local": keys drawn from the first 512 (every row L2-resident: the arithmetic's cost). Prints the
// best of `reps` calls. Buffers are 64-byte aligned as torch's are: with malloc's 16-byte
// alignment a 256-byte row spans 5 cache lines instead of 4 and the figures are ~2x worse.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
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
  const int N = 8192, H = 4, D = 64, K = 64;
  const bool random = argc < 2 || argv[1][0] != 'l';
  const int reps = argc > 2 ? std::atoi(argv[2]) : 20;
  if (argc > 3 && !cpu::set_isa(argv[3])) {
    std::fprintf(stderr, "unknown or unsupported isa %s\n", argv[3]);
    return 2;
  }
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
  for (size_t row = 0; row < size_t(H) * N; ++row)
    for (int t = 0; t < K; ++t) {
      if (random) {  // partial Fisher-Yates: K distinct keys
        std::swap(order[t], order[t + rng() % (N - t)]);
        indices[row * K + t] = order[t];
      } else {
        indices[row * K + t] = rng() % 512;
      }
    }

  AttentionParams p;
  p.q = q, p.k = k, p.v = v, p.out = out, p.lse = lse.data();
  p.q_strides = p.k_strides = p.v_strides = p.out_strides = Strides3{int64_t(H) * N * D, int64_t(N) * D, D};
  p.batch = 1, p.heads_q = p.heads_kv = H, p.seqlen_q = p.seqlen_k = N, p.head_dim = D, p.scale = 0.125f;
  p.indices = indices.data(), p.top_k = K;
  p.indices_stride_b = int64_t(H) * N * K, p.indices_stride_h = int64_t(N) * K, p.indices_stride_n = K;

  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto start = std::chrono::steady_clock::now();
    cpu::gather_forward(p, 1);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  double checksum = 0;
  for (size_t i = 0; i < elems; i += 997) checksum += out[i];
  std::printf("%s %s: best of %d %.2f ms (checksum %.6f)\n", cpu::isa(), random ? "random" : "local", reps,
              best * 1e3, checksum);
  for (float* x : {q, k, v, out}) std::free(x);
  return 0;
}
