// The top-k plan's canonical rows and inverse key index on the CPU (gather_rows.h): the same
// elements as flashlite/core/gather_rows.py, without its full-tensor sorts. Torch-free.
#include "gather_rows.h"

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels.h"
#include "omp_sync.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace flashlite {
namespace cpu {
namespace {

int thread_count(int requested) {
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

// ----- canonical rows ----------------------------------------------------------------------------
// What one row becomes (torch's canonical_rows): entries outside [0, last] (last = Nk − 1, or p(i)
// with a per-query causal cut) become Nk, which sorts after every key; the row is sorted; each entry
// equal to its left neighbour, and each Nk, becomes -1.
//
// Main path: L rows at a time, one row per vector lane (int32: every valid key is < Nk < 2^31): the
// rows are transposed into n = K rounded up to a power of two vectors (the lanes past K hold
// INT32_MAX, which sorts last), sorted by a bitonic network of vector min/max (no branches on the
// data, unlike a comparison sort of random keys), marked (v |= (v == Nk) | (v == left neighbour),
// -1 being all ones) and transposed back. Compiled for AVX2 (8 lanes; also used where the kernels
// run AVX-512: 16 lanes were slower) and the baseline (4 lanes), chosen from isa() as the other
// CPU kernels are (so cpu_set_isa("default") tests the baseline). For [8 x 8192 rows, K = 64] on
// one thread: ~25 ms of CPU time with AVX2, ~50 ms baseline, ~140 ms for std::sort per row. Rows
// of more than kMaxNetwork entries, or Nk >= 2^31 - 1, take std::sort per row.
constexpr int64_t kMaxNetwork = 4096;

#if defined(__GNUC__)
#define FL_GR_INLINE inline __attribute__((always_inline))
#else
#define FL_GR_INLINE inline
#endif

template <int L>
struct Lanes {
  typedef int32_t type __attribute__((vector_size(4 * L)));
};

struct RowsJob {
  int64_t top_k, width;  // K and the network's n (a power of two >= K)
  int64_t seqlen_q, seqlen_k, per_block;  // per_block: rows per (b, hi) block (Nq, or 1 when shared)
  bool cut;  // per-query causal: the last key of query i is p(i) = i + Nk − Nq
  int64_t last_key(int64_t row) const {
    return cut ? std::min(seqlen_k - 1, row % per_block + seqlen_k - seqlen_q) : seqlen_k - 1;
  }
};

// Rows [first, first + count), count <= L, through the network. scratch: width vectors, 64-byte aligned.
template <int L, typename Index>
FL_GR_INLINE void sort_group(const RowsJob& job, const Index* indices, int64_t first, int64_t count, int64_t* rows,
                             void* scratch) {
  using V = typename Lanes<L>::type;
  V* v = static_cast<V*>(scratch);
  int32_t* s = static_cast<int32_t*>(scratch);  // s[t·L + l] = lane l of v[t] (vector types alias their elements)
  const int64_t K = job.top_k, n = job.width;
  const int32_t nk = static_cast<int32_t>(job.seqlen_k);
  // Transposed load, one vector per list position t: lane l = row first + l (rows past count
  // repeat the group's first row: sorted like it, never written back).
  const Index* in[L];
  int64_t last[L];
  for (int64_t l = 0; l < L; ++l) {
    const int64_t row = first + (l < count ? l : 0);
    in[l] = indices + row * K;
    last[l] = job.last_key(row);
  }
  for (int64_t t = 0; t < K; ++t) {
    for (int64_t l = 0; l < L; ++l) {
      const int64_t j = static_cast<int64_t>(in[l][t]);
      s[t * L + l] = (j < 0 || j > last[l]) ? nk : static_cast<int32_t>(j);
    }
  }
  const V pad = V{} + INT32_MAX;
  for (int64_t t = K; t < n; ++t) v[t] = pad;
  // Bitonic sort: stage (k, j) compares t with t + j inside runs of 2j, ascending where t & k == 0.
  for (int64_t k = 2; k <= n; k <<= 1) {
    for (int64_t j = k >> 1; j > 0; j >>= 1) {
      for (int64_t base = 0; base < n; base += 2 * j) {
        V* lo = v + base;
        V* hi = lo + j;
        if ((base & k) == 0) {
          for (int64_t u = 0; u < j; ++u) {
            const V x = lo[u], y = hi[u];
            lo[u] = x < y ? x : y;
            hi[u] = x < y ? y : x;
          }
        } else {
          for (int64_t u = 0; u < j; ++u) {
            const V x = lo[u], y = hi[u];
            hi[u] = x < y ? x : y;
            lo[u] = x < y ? y : x;
          }
        }
      }
    }
  }
  const V nk_v = V{} + nk;
  for (int64_t t = K - 1; t > 0; --t) v[t] |= (v[t] == nk_v) | (v[t] == v[t - 1]);  // right to left
  if (K > 0) v[0] |= (v[0] == nk_v);
  for (int64_t l = 0; l < count; ++l) {
    int64_t* out = rows + (first + l) * K;
    for (int64_t t = 0; t < K; ++t) out[t] = s[t * L + l];
  }
}

// Groups [group_begin, group_end) of L rows; `total` rows in all.
template <int L, typename Index>
FL_GR_INLINE void sort_groups(const RowsJob& job, const Index* indices, int64_t total, int64_t group_begin,
                              int64_t group_end, int64_t* rows, void* scratch) {
  for (int64_t g = group_begin; g < group_end; ++g) {
    const int64_t first = g * L;
    sort_group<L>(job, indices, first, std::min<int64_t>(L, total - first), rows, scratch);
  }
}

template <typename Index>
using GroupsFn = void (*)(const RowsJob&, const Index*, int64_t, int64_t, int64_t, int64_t*, void*);

template <typename Index>
void groups_default(const RowsJob& job, const Index* indices, int64_t total, int64_t begin, int64_t end,
                    int64_t* rows, void* scratch) {
  sort_groups<4>(job, indices, total, begin, end, rows, scratch);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#define FL_GR_X86 1
template <typename Index>
__attribute__((target("avx2"))) void groups_avx2(const RowsJob& job, const Index* indices, int64_t total,
                                                  int64_t begin, int64_t end, int64_t* rows, void* scratch) {
  sort_groups<8>(job, indices, total, begin, end, rows, scratch);
}
#endif

// The per-row path (huge rows or key ranges): copy, map, std::sort, mark.
template <typename Index>
void canonical_row(const Index* in, int64_t top_k, int64_t seqlen_k, int64_t last, int64_t* out) {
  for (int64_t t = 0; t < top_k; ++t) {
    const int64_t j = static_cast<int64_t>(in[t]);
    out[t] = (j < 0 || j > last) ? seqlen_k : j;
  }
  std::sort(out, out + top_k);
  for (int64_t t = top_k - 1; t > 0; --t)
    if (out[t] == seqlen_k || out[t] == out[t - 1]) out[t] = -1;
  if (top_k > 0 && out[0] == seqlen_k) out[0] = -1;
}

template <typename Index>
FLASHLITE_OMP_DRIVER void canonical_rows_impl(const Index* indices, int64_t blocks, int64_t seqlen_q, int64_t seqlen_k, int64_t top_k,
                         bool per_query, bool causal, int64_t* rows, int num_threads) {
  const int64_t per_block = per_query ? seqlen_q : 1;
  const int64_t total = blocks * per_block;
  if (total <= 0 || top_k <= 0) return;
  RowsJob job{top_k, 1, seqlen_q, seqlen_k, per_block, per_query && causal};
  while (job.width < top_k) job.width <<= 1;

  OmpSync sync;
  if (top_k > kMaxNetwork || seqlen_k >= INT32_MAX) {
    sync.begin_region();
#pragma omp parallel num_threads(thread_count(num_threads))
    {
      sync.enter();
#pragma omp for schedule(static, 16) nowait
      for (int64_t r = 0; r < total; ++r)
        canonical_row(indices + r * top_k, top_k, seqlen_k, job.last_key(r), rows + r * top_k);
      sync.leave();
    }
    sync.end_region();
    return;
  }
  GroupsFn<Index> groups = &groups_default<Index>;
  int64_t lanes = 4;
#ifdef FL_GR_X86
  const std::string name = isa();
  if (name == "avx512" || name == "avx2") {  // 16 lanes under AVX-512 measured slower than 8
    groups = &groups_avx2<Index>;
    lanes = 8;
  }
#endif
  const int64_t num_groups = (total + lanes - 1) / lanes;
  // About 16K entries of rows per work item.
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 14) / (lanes * job.width));
  const int64_t chunks = (num_groups + chunk - 1) / chunk;
  sync.begin_region();
#pragma omp parallel num_threads(thread_count(num_threads))
  {
    sync.enter();
    std::vector<int32_t> buffer(static_cast<size_t>(job.width * lanes + 16));
    void* scratch = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t(63));
#pragma omp for schedule(static) nowait
    for (int64_t c = 0; c < chunks; ++c)
      groups(job, indices, total, c * chunk, std::min(num_groups, (c + 1) * chunk), rows, scratch);
    sync.leave();
  }
  sync.end_region();
}

}  // namespace

void canonical_rows(const int32_t* indices, int64_t blocks, int64_t seqlen_q, int64_t seqlen_k, int64_t top_k,
                    bool per_query, bool causal, int64_t* rows, int num_threads) {
  canonical_rows_impl(indices, blocks, seqlen_q, seqlen_k, top_k, per_query, causal, rows, num_threads);
}

void canonical_rows(const int64_t* indices, int64_t blocks, int64_t seqlen_q, int64_t seqlen_k, int64_t top_k,
                    bool per_query, bool causal, int64_t* rows, int num_threads) {
  canonical_rows_impl(indices, blocks, seqlen_q, seqlen_k, top_k, per_query, causal, rows, num_threads);
}

// A counting sort per block, in three steps:
//   1. per block (parallel): count each key's valid slots into key_offsets[block·Nk + j + 1] and
//      turn them into the block's running sums (the block owns positions block·Nk + 1 .. + Nk);
//   2. (serial, one number per block) each block's first entry and the start of its part of the
//      tail (the invalid slots, after all E valid entries, block after block);
//   3. per block (parallel): add the block's base to its offsets and write every slot, ascending,
//      at its key's cursor (valid) or at the block's tail cursor (invalid).
FLASHLITE_OMP_DRIVER void key_index(const int64_t* rows, int64_t blocks, int64_t seqlen_q, int64_t seqlen_k, int64_t top_k,
               bool per_query, bool causal, int64_t* key_offsets, int64_t* key_slots, int num_threads) {
  key_offsets[0] = 0;
  const int64_t slots = seqlen_q * top_k;  // per block
  if (blocks <= 0) return;
  const int64_t row_stride = per_query ? top_k : 0;
  const int64_t shift = seqlen_k - seqlen_q;  // p(i) = i + shift
  std::vector<int64_t> first(static_cast<size_t>(blocks) + 1);  // valid slots per block, then bases and E
  // The last key query i may select: Nk - 1, or p(i) with causal (a negative value: none).
  auto last_key = [&](int64_t i) { return causal ? std::min(seqlen_k - 1, i + shift) : seqlen_k - 1; };

  OmpSync sync;
  sync.begin_region();
#pragma omp parallel num_threads(thread_count(num_threads))
  {
    sync.enter();
    std::vector<int64_t> cursor;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t block = 0; block < blocks; ++block) {
      int64_t* counts = key_offsets + block * seqlen_k + 1;  // counts[j]: slots of key j, then running sums
      std::fill(counts, counts + seqlen_k, int64_t(0));
      const int64_t* list = rows + block * (per_query ? slots : top_k);
      for (int64_t i = 0; i < seqlen_q; ++i) {
        const int64_t* row = list + i * row_stride;
        const int64_t last = last_key(i);
        for (int64_t t = 0; t < top_k; ++t) {
          const int64_t j = row[t];
          if (j >= 0 && j <= last) ++counts[j];
        }
      }
      for (int64_t j = 1; j < seqlen_k; ++j) counts[j] += counts[j - 1];
      first[static_cast<size_t>(block)] = seqlen_k > 0 ? counts[seqlen_k - 1] : 0;
    }
    // A barrier after the loop above; one thread turns the block totals into bases.
    sync.before_barrier(0);
#pragma omp barrier
    sync.after_barrier(0);
#pragma omp single nowait
    {
      int64_t total = 0;
      for (int64_t block = 0; block < blocks; ++block) {
        const int64_t n = first[static_cast<size_t>(block)];
        first[static_cast<size_t>(block)] = total;  // now: the block's first entry
        total += n;
      }
      first[static_cast<size_t>(blocks)] = total;  // E = key_offsets[blocks·Nk]
    }
    sync.before_barrier(1);
#pragma omp barrier
    sync.after_barrier(1);
    const int64_t entries = first[static_cast<size_t>(blocks)];
    cursor.resize(static_cast<size_t>(seqlen_k));
#pragma omp for schedule(dynamic, 1)
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t base = first[static_cast<size_t>(block)];
      int64_t* sums = key_offsets + block * seqlen_k + 1;
      for (int64_t j = 0; j < seqlen_k; ++j) {
        cursor[static_cast<size_t>(j)] = base + (j > 0 ? sums[j - 1] : 0);
      }
      for (int64_t j = 0; j < seqlen_k; ++j) sums[j] += base;
      // Invalid slots of earlier blocks: block·Nq·K slots in all, minus their valid ones.
      int64_t tail = entries + block * slots - base;
      const int64_t* list = rows + block * (per_query ? slots : top_k);
      for (int64_t i = 0; i < seqlen_q; ++i) {
        const int64_t* row = list + i * row_stride;
        const int64_t last = last_key(i);
        for (int64_t t = 0; t < top_k; ++t) {
          const int64_t j = row[t];
          const int64_t slot = i * top_k + t;
          if (j >= 0 && j <= last)
            key_slots[cursor[static_cast<size_t>(j)]++] = slot;
          else
            key_slots[tail++] = slot;
        }
      }
    }
    sync.leave();
  }
  sync.end_region();
}

}  // namespace cpu
}  // namespace flashlite
