// The processor's own limits, for `flashlite bench --peak`: the float32 FMA throughput of a
// register-resident loop per instruction-set build and thread count, and the memory bandwidth of a
// stream copy. Torch-free.
#pragma once

#include <cstdint>
#include <vector>

namespace flashlite {
namespace cpu {

struct PeakResult {
  double best = 0.0;            // GFLOP/s (fma_peak) or GB/s (stream_copy) of the fastest trial
  double median = 0.0;          // of all trials
  int trials = 0;
  int threads = 0;
  double trial_seconds = 0.0;   // duration of the fastest trial
  int64_t work_per_trial = 0;   // FLOPs (2 per lane per FMA, one thread) or bytes (read + written, all) per trial
  int lanes = 0;                // fma_peak: floats per vector
  int accumulators = 0;         // fma_peak: independent FMA chains per thread (all in registers)
  const char* isa = "";         // fma_peak: the build timed
};

// `threads` OpenMP threads each run a loop of independent FMAs on vectors held in registers
// (acc = acc * a + b, `accumulators` chains; no loads or stores), in trials of about 1 ms that
// each thread times itself (short enough to fall between two preemptions on a busy machine), for
// about `seconds` (at least 3 trials each). `best` is the sum over threads of each one's fastest
// trial (one thread per core assumed: SMT siblings would be counted twice), `median` the median
// trial times the thread count; `work_per_trial` is one thread's trial. `isa`: "avx512", "avx2", "default" (SSE2 on x86-64, NEON on aarch64:
// SSE2 has no FMA, its loop is a multiply and an add, counted as the same 2 FLOPs per lane), or
// "" for the build the kernels use. Returns false (result untouched) if this CPU cannot run it.
bool fma_peak(const char* isa, int threads, double seconds, PeakResult* result);

// `threads` OpenMP threads copy between two buffers of `bytes` (rounded up to 4 MiB per thread;
// far larger than the caches): each trial, every thread memcpy's its own 4 MiB window, the windows
// sliding through the buffers trial after trial, for about `seconds`; counts 2 bytes per byte
// copied (read + write, STREAM's convention; the write-allocate reads a cache adds are not).
void stream_copy(int threads, int64_t bytes, double seconds, PeakResult* result);

}  // namespace cpu
}  // namespace flashlite
