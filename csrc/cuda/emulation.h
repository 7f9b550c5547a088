// CPU emulation of the CUDA features the flashlite kernels use, for checking kernel *logic* on a
// machine without a GPU (tests/test_cuda_compile.py builds csrc/cuda/tools/emulate_main.cpp with
// g++ -DFLASHLITE_CUDA_EMULATION and runs it against the reference).
//
// Each thread of a block is a fiber (ucontext) on one OS thread; blocks run one after another.
// __syncthreads and the warp-level operations (shuffles, ldmatrix, mma.sync) are barriers of the
// block / of the warp's 32 fibers, after which each lane computes its result from what the other
// lanes posted - following the PTX fragment layouts. cp.async copies immediately. Shared memory
// starts as 0xFF bytes (NaN in every float format), so a read of an unwritten element shows.
// Not emulated: timing, races (the order is sequential), register limits, PTX syntax.
#pragma once

#if !defined(FLASHLITE_CUDA_EMULATION) || defined(__CUDACC__)
#error "emulation.h is for host builds with -DFLASHLITE_CUDA_EMULATION only"
#endif

#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <vector>

#define __launch_bounds__(...)
#define __grid_constant__

namespace flashlite_emu {

// A cp.async copy, performed when its group is waited for (so reading shared memory before the
// matching cp.async.wait_group sees stale data, as it could on the GPU).
struct PendingCopy {
  void* dst;
  const void* src;
  int bytes;
  bool valid;
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  bool waiting = false;
  std::vector<PendingCopy> open;                     // issued, not yet committed
  std::vector<std::vector<PendingCopy>> committed;   // oldest first
};

struct Block {
  int threads = 0;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = -1;
  int block_arrived = 0;
  std::vector<int> warp_arrived;
  std::vector<std::vector<unsigned char>> warp_buffers;  // 32 lanes x 64 bytes per warp
  std::vector<unsigned char> smem;
  std::function<void()> body;
};

inline Block* g_block = nullptr;
inline uint3 g_thread_idx{0, 0, 0};
inline uint3 g_block_idx{0, 0, 0};
constexpr size_t kLaneBytes = 64;

inline int lane_id() { return static_cast<int>(g_thread_idx.x & 31); }
inline int warp_id() { return static_cast<int>(g_thread_idx.x >> 5); }
inline unsigned char* lane_slot(int lane) {
  return g_block->warp_buffers[warp_id()].data() + static_cast<size_t>(lane) * kLaneBytes;
}

inline void yield_to_scheduler() {
  Block& b = *g_block;
  swapcontext(&b.fibers[b.current].ctx, &b.scheduler);
}

// Barrier of the fibers in [first, first + count) (the block, or one warp).
inline void barrier(int* arrived, int first, int count) {
  Block& b = *g_block;
  // Participants that already finished (returned) do not take part.
  int live = 0;
  for (int t = first; t < first + count && t < b.threads; ++t) live += b.fibers[t].done ? 0 : 1;
  if (++*arrived >= live) {
    *arrived = 0;
    for (int t = first; t < first + count && t < b.threads; ++t) b.fibers[t].waiting = false;
    return;
  }
  b.fibers[b.current].waiting = true;
  yield_to_scheduler();
}

inline void syncthreads() { barrier(&g_block->block_arrived, 0, g_block->threads); }
inline void syncwarp() { barrier(&g_block->warp_arrived[warp_id()], warp_id() * 32, 32); }

template <typename V>
inline V shuffle(V value, int src_lane) {
  static_assert(sizeof(V) <= kLaneBytes, "lane slot too small");
  std::memcpy(lane_slot(lane_id()), &value, sizeof(V));
  syncwarp();
  V out;
  std::memcpy(&out, lane_slot(src_lane & 31), sizeof(V));
  syncwarp();
  return out;
}

inline void fiber_entry() {
  Block& b = *g_block;
  b.body();
  b.fibers[b.current].done = true;
  // Releasing barriers that now have one participant less.
  for (size_t w = 0; w < b.warp_arrived.size(); ++w) {
    int live = 0;
    for (int t = static_cast<int>(w) * 32; t < std::min(b.threads, static_cast<int>(w) * 32 + 32); ++t)
      live += b.fibers[t].done ? 0 : 1;
    if (b.warp_arrived[w] > 0 && b.warp_arrived[w] >= live) {
      b.warp_arrived[w] = 0;
      for (int t = static_cast<int>(w) * 32; t < std::min(b.threads, static_cast<int>(w) * 32 + 32); ++t)
        b.fibers[t].waiting = false;
    }
  }
  int live = 0;
  for (int t = 0; t < b.threads; ++t) live += b.fibers[t].done ? 0 : 1;
  if (b.block_arrived > 0 && b.block_arrived >= live) {
    b.block_arrived = 0;
    for (int t = 0; t < b.threads; ++t) b.fibers[t].waiting = false;
  }
}

inline std::mt19937& rng() {
  static std::mt19937 gen([] {
    const char* seed = std::getenv("FLASHLITE_EMU_SEED");
    return seed ? static_cast<unsigned>(std::strtoul(seed, nullptr, 10)) : 1u;
  }());
  return gen;
}

// Run kernel(args) on grid x threads with `smem` bytes of dynamic shared memory.
template <typename Kernel, typename Args>
cudaError_t launch(Kernel kernel, dim3 grid, int threads, size_t smem, const Args& args) {
  constexpr size_t kStack = 256 * 1024;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block block;
        block.threads = threads;
        block.fibers.resize(threads);
        block.warp_arrived.assign((threads + 31) / 32, 0);
        block.warp_buffers.assign((threads + 31) / 32, std::vector<unsigned char>(32 * kLaneBytes, 0));
        block.smem.assign(std::max<size_t>(smem, 16), 0xFF);
        block.body = [&] { kernel(args); };
        g_block = &block;
        g_block_idx = uint3{bx, by, bz};
        for (int t = 0; t < threads; ++t) {
          Fiber& f = block.fibers[t];
          f.stack.resize(kStack);
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = &block.scheduler;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        // Scheduling (seeded: FLASHLITE_EMU_SEED), chosen per block so that a missing barrier
        // shows up as a read of data not written yet or already overwritten:
        //  - shuffled rounds: every runnable fiber runs to its next barrier, in a random order;
        //  - warp priority: always the first runnable fiber of a random warp order, so one warp
        //    runs as far as it can (to a block barrier) before the others move.
        const bool by_priority = rng()() & 1u;
        std::vector<int> warp_rank((threads + 31) / 32);
        std::iota(warp_rank.begin(), warp_rank.end(), 0);
        std::shuffle(warp_rank.begin(), warp_rank.end(), rng());
        std::vector<int> order(threads);
        std::iota(order.begin(), order.end(), 0);
        if (by_priority)
          std::stable_sort(order.begin(), order.end(),
                           [&](int a, int b) { return warp_rank[a / 32] < warp_rank[b / 32]; });
        for (;;) {
          bool ran = false, all_done = true;
          if (!by_priority) std::shuffle(order.begin(), order.end(), rng());
          for (int t : order) {
            Fiber& f = block.fibers[t];
            if (f.done) continue;
            all_done = false;
            if (f.waiting) continue;
            block.current = t;
            g_thread_idx = uint3{static_cast<unsigned>(t), 0, 0};
            swapcontext(&block.scheduler, &f.ctx);
            ran = true;
            if (by_priority) break;  // start again from the highest-priority runnable fiber
          }
          if (by_priority && ran) continue;
          if (all_done) break;
          if (!ran) {
            std::fprintf(stderr, "flashlite emulation: deadlock in block (%u,%u,%u): barrier never completes\n",
                         bx, by, bz);
            std::abort();
          }
        }
        g_block = nullptr;
      }
  return cudaSuccess;
}

inline unsigned char* dynamic_smem() { return g_block->smem.data(); }

inline Fiber& current_fiber() { return g_block->fibers[g_block->current]; }
// A copy lands either at once or only when waited for (chosen at random, seeded): the first
// exposes reads of a buffer that is being refilled (missing barrier after use), the second reads
// before the wait / barrier.
// What the hardware requires of a shared-memory access: inside the block's dynamic shared memory
// and aligned to its size (cp.async 4/16 bytes, ldmatrix rows 16 bytes).
inline void check_smem(const void* ptr, int bytes, const char* what) {
  const unsigned char* p = static_cast<const unsigned char*>(ptr);
  const unsigned char* base = g_block->smem.data();
  if (p < base || p + bytes > base + g_block->smem.size() || reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    std::fprintf(stderr, "flashlite emulation: %s at shared offset %td (%d bytes) is out of range or misaligned\n",
                 what, p - base, bytes);
    std::abort();
  }
}

inline void cp_async(void* dst, const void* src, int bytes, bool valid) {
  check_smem(dst, bytes, "cp.async destination");
  if (valid && reinterpret_cast<uintptr_t>(src) % bytes != 0) {
    std::fprintf(stderr, "flashlite emulation: cp.async source %p is not %d-byte aligned\n", src, bytes);
    std::abort();
  }
  if (rng()() & 1u) {
    if (valid) std::memcpy(dst, src, bytes);
    else std::memset(dst, 0, bytes);
    return;
  }
  current_fiber().open.push_back(PendingCopy{dst, src, bytes, valid});
}
inline void cp_async_commit() {
  Fiber& f = current_fiber();
  f.committed.push_back(std::move(f.open));
  f.open.clear();
}
// Complete the oldest groups until at most `pending` remain.
inline void cp_async_wait(int pending) {
  Fiber& f = current_fiber();
  while (static_cast<int>(f.committed.size()) > pending) {
    for (const PendingCopy& c : f.committed.front()) {
      if (c.valid) std::memcpy(c.dst, c.src, c.bytes);
      else std::memset(c.dst, 0, c.bytes);
    }
    f.committed.erase(f.committed.begin());
  }
}

}  // namespace flashlite_emu

#define threadIdx (::flashlite_emu::g_thread_idx)
#define blockIdx (::flashlite_emu::g_block_idx)

inline void __syncthreads() { ::flashlite_emu::syncthreads(); }
template <typename V>
inline V __shfl_xor_sync(unsigned, V value, int mask) {
  return ::flashlite_emu::shuffle(value, ::flashlite_emu::lane_id() ^ mask);
}
template <typename V>
inline V __shfl_sync(unsigned, V value, int src) {
  return ::flashlite_emu::shuffle(value, src);
}
inline float atomicAdd(float* address, float value) {  // fibers share one OS thread
  const float old = *address;
  *address = old + value;
  return old;
}
using std::max;
using std::min;
