// The processor's FMA limit and copy bandwidth (peak.h): what `flashlite bench --peak` divides the
// CPU kernels' throughput by. Torch-free.
#include "peak.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"
#include "omp_sync.h"

namespace flashlite {
namespace cpu {
namespace {

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int team_size(int requested) {
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// One FMA loop per instruction set: ACC independent chains acc = acc * a + b on vectors of BYTES
// bytes, all in registers (ACC + 2 vector registers: 18 of AVX-512's 32, 14 of AVX2's or SSE2's
// 16), fully unrolled over the chains so each iteration is ACC independent FMAs. The chains
// converge to b / (1 - a) = 1: no overflow, no subnormals. Returns the sum so nothing is dead.
#define FL_FMA_LOOP(NAME, ATTRS, BYTES, ACC)                                                     \
  ATTRS __attribute__((noinline)) float NAME(int64_t iters, float seed) {                       \
    typedef float V __attribute__((vector_size(BYTES)));                                        \
    constexpr int kLanes = (BYTES) / 4;                                                         \
    V a, b, acc[ACC];                                                                           \
    for (int l = 0; l < kLanes; ++l) {                                                          \
      a[l] = 0.9999f;                                                                           \
      b[l] = 1e-4f;                                                                             \
    }                                                                                           \
    for (int j = 0; j < (ACC); ++j)                                                             \
      for (int l = 0; l < kLanes; ++l) acc[j][l] = seed + 0.01f * float(j * kLanes + l);       \
    for (int64_t i = 0; i < iters; ++i) {                                                       \
      _Pragma("GCC unroll 16") for (int j = 0; j < (ACC); ++j) acc[j] = acc[j] * a + b;         \
    }                                                                                           \
    V sum = acc[0];                                                                             \
    for (int j = 1; j < (ACC); ++j) sum += acc[j];                                              \
    float total = 0.f;                                                                          \
    for (int l = 0; l < kLanes; ++l) total += sum[l];                                           \
    return total;                                                                               \
  }

#if defined(__x86_64__) || defined(_M_X64)
FL_FMA_LOOP(fma_avx512, __attribute__((target("avx512f,avx2,fma"))), 64, 16)
FL_FMA_LOOP(fma_avx2, __attribute__((target("avx2,fma"))), 32, 12)
#endif
FL_FMA_LOOP(fma_default, , 16, 12)
#undef FL_FMA_LOOP

struct Loop {
  const char* name;
  float (*run)(int64_t, float);
  int lanes, accumulators;
};

const Loop* find_loop(const char* name) {
  static const Loop loops[] = {
#if defined(__x86_64__) || defined(_M_X64)
      {"avx512", &fma_avx512, 16, 16},
      {"avx2", &fma_avx2, 8, 12},
#endif
      {"default", &fma_default, 4, 12},
  };
  for (const Loop& loop : loops)
    if (std::strcmp(loop.name, name) == 0) return &loop;
  return nullptr;
}

double median_of(std::vector<double> values) {
  if (values.empty()) return 0.0;
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

// Every thread of the team runs trials of `iters` iterations until `seconds` have passed (at least
// 3 each), timing each trial itself; per thread, the rate (FLOP/s) of its fastest trial and all its
// trial rates are returned.
FLASHLITE_OMP_DRIVER void fma_trials(const Loop& loop, int threads, int64_t iters, double seconds,
                                     std::vector<double>* best, std::vector<std::vector<double>>* rates) {
  const double flops = 2.0 * double(loop.lanes) * loop.accumulators * double(iters);
  std::vector<float> sums(static_cast<size_t>(threads), 0.f);
  OmpSync sync;
  sync.begin_region();
#pragma omp parallel num_threads(threads)
  {
    sync.enter();
    const int t = thread_index();
    std::vector<double>& mine = (*rates)[static_cast<size_t>(t)];
    const double start = now();
    float sum = 0.f;
    while (mine.size() < 3 || now() - start < seconds) {
      const double begin = now();
      sum += loop.run(iters, 1.0f + 0.001f * float(t));
      mine.push_back(flops / (now() - begin));
    }
    (*best)[static_cast<size_t>(t)] = *std::max_element(mine.begin(), mine.end());
    sums[static_cast<size_t>(t)] = sum;
    sync.leave();
  }
  sync.end_region();
  volatile float sink = 0.f;
  for (float s : sums) sink = sink + s;
}

constexpr double kTrialSeconds = 0.001;

}  // namespace

bool fma_peak(const char* isa_name, int threads, double seconds, PeakResult* result) {
  const char* name = isa_name && *isa_name ? isa_name : isa();
  bool runnable = false;
  for (const char* available : available_isas()) runnable = runnable || std::strcmp(available, name) == 0;
  const Loop* loop = find_loop(name);
  if (!runnable || loop == nullptr) return false;
  threads = team_size(threads);
  // Calibrate one thread's iterations to about kTrialSeconds, on the calling thread alone.
  int64_t iters = 1 << 14;
  double shortest = 1e30;
  volatile float sink = 0.f;
  for (int i = 0; i < 5; ++i) {
    const double begin = now();
    sink = sink + loop->run(iters, 1.0f);
    shortest = std::min(shortest, now() - begin);
  }
  iters = std::max<int64_t>(iters, static_cast<int64_t>(double(iters) * kTrialSeconds / std::max(shortest, 1e-6)));
  // Each thread times its own trials: a core's rate is what it does while it runs, so a busy
  // machine (another process holding a core now and then) delays a trial's start, not its speed.
  // The team's limit is the sum of its threads' fastest trials: one thread per core (torch's
  // default) is assumed; two threads on one core's SMT siblings would be counted twice.
  std::vector<double> best(static_cast<size_t>(threads), 0.0);
  std::vector<std::vector<double>> rates(static_cast<size_t>(threads));
  fma_trials(*loop, threads, iters, seconds, &best, &rates);
  std::vector<double> all;
  for (const auto& mine : rates) all.insert(all.end(), mine.begin(), mine.end());
  double total = 0.0;
  for (double b : best) total += b;
  const double flops = 2.0 * double(loop->lanes) * loop->accumulators * double(iters);
  result->best = total * 1e-9;
  result->median = median_of(all) * threads * 1e-9;
  result->trials = static_cast<int>(all.size());
  result->threads = threads;
  result->trial_seconds = flops / *std::max_element(best.begin(), best.end());
  result->work_per_trial = static_cast<int64_t>(flops);
  result->lanes = loop->lanes;
  result->accumulators = loop->accumulators;
  result->isa = loop->name;
  return true;
}

FLASHLITE_OMP_DRIVER void stream_copy(int threads, int64_t bytes, double seconds, PeakResult* result) {
  threads = team_size(threads);
  // A trial copies a window of kWindow bytes per thread, the windows sliding through the whole
  // buffer from trial to trial, so each trial's data comes from memory (the buffer is far larger
  // than the caches) and a trial is short (~1 ms) like the FMA trials.
  constexpr int64_t kWindow = int64_t(4) << 20;
  const int64_t per_trial = kWindow * threads;
  bytes = std::max<int64_t>(per_trial, (bytes + per_trial - 1) / per_trial * per_trial);
  char* src = static_cast<char*>(std::aligned_alloc(64, static_cast<size_t>(bytes)));
  char* dst = static_cast<char*>(std::aligned_alloc(64, static_cast<size_t>(bytes)));
  if (src == nullptr || dst == nullptr) {
    std::free(src);
    std::free(dst);
    throw std::bad_alloc();
  }
  const int64_t windows = bytes / per_trial;
  OmpSync sync;
  sync.begin_region();
#pragma omp parallel num_threads(threads)
  {
    sync.enter();
    const int t = thread_index();
    for (int64_t w = 0; w < windows; ++w) {  // first touch by the thread that copies the window
      std::memset(src + w * per_trial + t * kWindow, 1, static_cast<size_t>(kWindow));
      std::memset(dst + w * per_trial + t * kWindow, 0, static_cast<size_t>(kWindow));
    }
    sync.leave();
  }
  sync.end_region();
  std::vector<double> rates;
  double best_seconds = 1e30;
  const double start = now();
  for (int64_t trial = 0; rates.size() < 3 || now() - start < seconds; ++trial) {
    const int64_t base = (trial % windows) * per_trial;
    const double begin_time = now();
    OmpSync region;
    region.begin_region();
#pragma omp parallel num_threads(threads)
    {
      region.enter();
      const int64_t offset = base + thread_index() * kWindow;
      std::memcpy(dst + offset, src + offset, static_cast<size_t>(kWindow));
      region.leave();
    }
    region.end_region();
    const double elapsed = now() - begin_time;
    rates.push_back(2.0 * double(per_trial) / elapsed * 1e-9);
    best_seconds = std::min(best_seconds, elapsed);
  }
  volatile char sink = dst[bytes - 1];
  (void)sink;
  std::free(src);
  std::free(dst);
  result->best = 2.0 * double(per_trial) / best_seconds * 1e-9;
  result->median = median_of(rates);
  result->trials = static_cast<int>(rates.size());
  result->threads = threads;
  result->trial_seconds = best_seconds;
  result->work_per_trial = 2 * per_trial;
  result->isa = "";
}

}  // namespace cpu
}  // namespace flashlite
