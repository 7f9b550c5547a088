// OpenMP's synchronization, told to ThreadSanitizer.
//
// libgomp (GCC's OpenMP runtime) is not built with TSan and hands work to its pooled threads
// through futexes and atomics TSan cannot see: under -fsanitize=thread every parallel region then
// looks like a data race (the inputs written before the region, the outputs read after it, the
// buffers shared across an implicit barrier) — 394 reports on the ctest alone, none of them real.
// The drivers therefore mark the region's fork and join and each barrier with
// __tsan_release/__tsan_acquire on addresses of an OmpSync, which is exactly the order libgomp
// guarantees. The region's shared variables themselves are handed over by libgomp too, written
// by the compiler's code after begin_region() and read on entry to each thread's part: the
// functions holding a region are FLASHLITE_OMP_DRIVER (not instrumented by TSan; they only
// split work and call the kernels, which are). What TSan still reports is a race between two
// work items of one region, the thing worth finding. Outside a TSan build every member is an
// empty inline function and FLASHLITE_OMP_DRIVER is nothing.
#pragma once

#if defined(__SANITIZE_THREAD__)
#define FLASHLITE_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define FLASHLITE_TSAN 1
#endif
#endif

#ifdef FLASHLITE_TSAN
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
#endif

#ifdef FLASHLITE_TSAN
#define FLASHLITE_OMP_DRIVER __attribute__((no_sanitize_thread))
#else
#define FLASHLITE_OMP_DRIVER
#endif

namespace flashlite {
namespace cpu {

// One parallel region: begin_region() on the encountering thread before `#pragma omp parallel`,
// enter() first and leave() last in the region's body, end_region() after it; around the k-th
// barrier of the body (an explicit `#pragma omp barrier`, the loops before it `nowait`),
// before_barrier(k) and after_barrier(k) on every thread.
class OmpSync {
 public:
  static constexpr int kBarriers = 4;
#ifdef FLASHLITE_TSAN
  void begin_region() { __tsan_release(&fork_); }
  void enter() { __tsan_acquire(&fork_); }
  void leave() { __tsan_release(&join_); }
  void end_region() { __tsan_acquire(&join_); }
  void before_barrier(int k) { __tsan_release(&barrier_[k]); }
  void after_barrier(int k) { __tsan_acquire(&barrier_[k]); }

 private:
  char fork_ = 0, join_ = 0, barrier_[kBarriers] = {};
#else
  void begin_region() {}
  void enter() {}
  void leave() {}
  void end_region() {}
  void before_barrier(int) {}
  void after_barrier(int) {}
#endif
};

}  // namespace cpu
}  // namespace flashlite
