// The OpenMP driver of the CPU kernels: splits each call into independent work items, runs them
// on the best instruction-set build of the kernels (isa_kernels.h) for this CPU. Torch-free.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"
#include "omp_sync.h"
#include "work.h"

namespace flashlite {
namespace cpu {

Workspace::~Workspace() {
  std::free(data_);
  std::free(pointers_);
}

const float** Workspace::pointers(size_t count) {
  if (count > pointer_capacity_) {
    std::free(pointers_);
    pointers_ = static_cast<const float**>(std::malloc(count * sizeof(float*)));
    if (pointers_ == nullptr) throw std::bad_alloc();
    pointer_capacity_ = count;
  }
  return pointers_;
}

float* Workspace::floats(size_t count) {
  if (count > capacity_) {
    std::free(data_);
    const size_t bytes = (count * sizeof(float) + 63) / 64 * 64;
    data_ = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (data_ == nullptr) throw std::bad_alloc();
    capacity_ = bytes / sizeof(float);
  }
  return data_;
}

namespace {

int cdiv(int a, int b) { return (a + b - 1) / b; }

int thread_count(int requested) {
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

// ----- instruction-set choice ------------------------------------------------------------------
std::vector<const KernelTable*> runnable_tables() {
  std::vector<const KernelTable*> tables;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
    tables.push_back(&kernels_avx512());
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) tables.push_back(&kernels_avx2());
#endif
  tables.push_back(&kernels_default());
  return tables;  // best first
}

const KernelTable* find_table(const char* name) {
  for (const KernelTable* table : runnable_tables())
    if (std::strcmp(table->name, name) == 0) return table;
  return nullptr;
}

std::atomic<const KernelTable*> g_active{nullptr};

// The best build this CPU runs, unless FLASHLITE_CPU_ISA names another runnable one.
const KernelTable& active() {
  const KernelTable* table = g_active.load();
  if (table == nullptr) {
    const char* wanted = std::getenv("FLASHLITE_CPU_ISA");
    table = wanted && *wanted ? find_table(wanted) : nullptr;
    if (table == nullptr) table = runnable_tables().front();
    g_active.store(table);
  }
  return *table;
}

}  // namespace

const char* isa() { return active().name; }

void dropout_words(uint64_t seed, uint64_t start, int64_t count, uint32_t* out) {
  if (count > 0) active().dropout_words(seed, start, count, out);
}

std::vector<const char*> available_isas() {
  std::vector<const char*> names;
  for (const KernelTable* table : runnable_tables()) names.push_back(table->name);
  return names;
}

bool set_isa(const char* name) {
  const KernelTable* table = find_table(name);
  if (table == nullptr) return false;
  g_active.store(table);
  return true;
}

void tile_config(int head_dim, DType dtype, int block_size, int* block_m, int* block_n) {
  (void)head_dim;
  (void)dtype;
  // 64 x 64 tiles: Sᵀ and the packed tiles stay in L1/L2 for head_dim <= 256. Block-sparse
  // layouts (blocks of 16..128) get tiles that divide their block.
  const int tile = 64;
  *block_m = block_size > 0 && block_size < tile ? block_size : tile;
  *block_n = *block_m;
}

namespace {
// Up to this many query rows (decode), the forward runs row by row with keys along the vector
// lanes (KernelTable::tile_forward_rows); more rows fill the query-major tile kernel's lanes.
constexpr int kDecodeRows = 4;

// Decode: one work item per (b, KV head) when the group's heads share their schedule rows (a
// broadcast schedule: full, causal, window, a layout without a head dimension), so each key tile
// is loaded once for the whole group; else one per (b, head). In a paged cache one item takes
// every head of b: a page's slots hold all KV heads' rows side by side ([page_size, Hkv, D]),
// read together instead of Hkv strided passes. A long key range is split into pieces of about
// kDecodeSplitKeys keys per KV head of the item, run as separate items and merged in order, so
// that a batch of one with few KV heads still uses every thread. The split depends on the sizes
// only (batch row b's key count: Nk, or its own length in a paged cache), never on the thread
// count: results are the same bits for any number of threads.
constexpr int kDecodeSplitKeys = 512;
constexpr int kDecodeMaxSplits = 64;

FLASHLITE_OMP_DRIVER void tile_forward_decode(const KernelTable& kernels, const AttentionParams& p, int num_threads) {
  const ScheduleView& schedule = p.forward_schedule;
  // Heads share one item when they share the tile row; their counts may differ (a head mask
  // zeroes a masked head's): the item takes the longest, each row stops at its own.
  const bool shared = schedule.tiles_stride_h == 0;
  const int heads = !shared ? 1 : p.paged.active() ? p.heads_q : p.group(), items = p.heads_q / heads;
  const int kv_heads = std::max(1, heads / p.group());  // KV heads per item
  const int64_t groups = int64_t(p.batch) * items;
  const int rows = std::min(p.block_m, p.seqlen_q);
  const int record = decode_record_floats(p.head_dim, kernels.lanes);
  const int64_t split_floats = int64_t(heads) * rows * record;
  // Group g's splits are tasks first_task[g] .. first_task[g + 1]; its partial records (when it
  // has more than one split) start at first_part[g].
  std::vector<int64_t> first_task(size_t(groups + 1), 0), first_part(size_t(groups + 1), 0);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t keys = int64_t(batch_segment(p, static_cast<int>(g / items)).nk) * kv_heads;
    const int splits = static_cast<int>(std::min<int64_t>(kDecodeMaxSplits, std::max<int64_t>(1, keys / kDecodeSplitKeys)));
    first_task[size_t(g + 1)] = first_task[size_t(g)] + splits;
    first_part[size_t(g + 1)] = first_part[size_t(g)] + (splits > 1 ? splits * split_floats : 0);
  }
  std::vector<int64_t> task_group(size_t(first_task[size_t(groups)]));
  for (int64_t g = 0; g < groups; ++g)
    std::fill(task_group.begin() + first_task[size_t(g)], task_group.begin() + first_task[size_t(g + 1)], g);
  std::vector<float> partials(size_t(first_part[size_t(groups)]));
  OmpSync sync;
  sync.begin_region();
#pragma omp parallel num_threads(thread_count(num_threads))
  {
    sync.enter();
    Workspace ws;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t task = 0; task < int64_t(task_group.size()); ++task) {
      const int64_t group = task_group[size_t(task)];
      const int splits = static_cast<int>(first_task[size_t(group + 1)] - first_task[size_t(group)]);
      const int split = static_cast<int>(task - first_task[size_t(group)]);
      const int b = static_cast<int>(group / items), h_first = static_cast<int>(group % items) * heads;
      int count = 0;
      for (int h = h_first; h < h_first + heads; ++h) count = std::max(count, schedule.num_tiles(b, h, 0));
      const int per = cdiv(count, splits);
      const int begin = std::min(count, split * per), end = std::min(count, begin + per);
      float* part = splits > 1 ? partials.data() + first_part[size_t(group)] + split * split_floats : nullptr;
      kernels.tile_forward_rows(p, b, h_first, heads, 0, begin, end, part, ws);
    }
    sync.before_barrier(0);
#pragma omp barrier
    sync.after_barrier(0);
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t group = 0; group < groups; ++group) {
      const int splits = static_cast<int>(first_task[size_t(group + 1)] - first_task[size_t(group)]);
      if (splits > 1)
        kernels.tile_forward_rows_merge(p, static_cast<int>(group / items), static_cast<int>(group % items) * heads,
                                        heads, 0, splits, partials.data() + first_part[size_t(group)], ws);
    }
    sync.leave();
  }
  sync.end_region();
}
}  // namespace

namespace {
// ----- packed batches (AttentionParams::packed): the work list is the items, times heads --------
// Each sequence as a Segment (work.h), with the schedule rows of its first query and key tiles:
// the items come sequence by sequence, every tile once, ascending (checked by the binding).
std::vector<Segment> packed_segments(const AttentionParams& p) {
  const PackedItems& items = p.packed;
  std::vector<Segment> segments(size_t(items.num_sequences));
  int q_row = 0, k_row = 0;
  for (int s = 0; s < items.num_sequences; ++s) {
    Segment& sg = segments[size_t(s)];
    sg.b = 0;
    sg.seq = s;
    sg.q0 = items.cu_seqlens_q[s];
    sg.k0 = items.cu_seqlens_k[s];
    sg.nq = items.cu_seqlens_q[s + 1] - sg.q0;
    sg.nk = items.cu_seqlens_k[s + 1] - sg.k0;
    sg.q_row0 = q_row;
    sg.k_row0 = k_row;
    q_row += cdiv(sg.nq, p.block_m);
    k_row += cdiv(sg.nk, p.block_n);
  }
  return segments;
}

// Work items in the order they are handed out: by cost (tile pairs, head 0's schedule row)
// descending, so that the longest start first (the order never changes a result: every item
// writes its own rows).
std::vector<int> by_cost(const ScheduleView& schedule, int rows) {
  std::vector<int> order(size_t(rows > 0 ? rows : 0));
  for (int t = 0; t < rows; ++t) order[size_t(t)] = t;
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return schedule.num_tiles(0, 0, a) > schedule.num_tiles(0, 0, b); });
  return order;
}

FLASHLITE_OMP_DRIVER void tile_forward_packed(const KernelTable& kernels, const AttentionParams& p, int num_threads) {
  const std::vector<Segment> segments = packed_segments(p);
  const std::vector<int> order = by_cost(p.forward_schedule, p.packed.num_q_items);
  const int32_t* items = p.packed.q_items;
  const int64_t tasks = int64_t(order.size()) * p.heads_q;
  OmpSync sync;
  sync.begin_region();
#pragma omp parallel num_threads(thread_count(num_threads))
  {
    sync.enter();
    Workspace ws;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t task = 0; task < tasks; ++task) {
      // head-major: one head's items in turn (longest first), so its K/V rows stay in cache
      const int t = order[size_t(task % int64_t(order.size()))], h = static_cast<int>(task / int64_t(order.size()));
      kernels.tile_forward(p, segments[size_t(items[2 * t])], h, items[2 * t + 1], ws);
    }
    sync.leave();
  }
  sync.end_region();
}
}  // namespace

FLASHLITE_OMP_DRIVER void tile_forward(const AttentionParams& p, int num_threads) {
  if (p.batch == 0 || p.heads_q == 0 || p.seqlen_q == 0) return;
  const KernelTable& kernels = active();
  if (p.packed.active()) return tile_forward_packed(kernels, p, num_threads);
  if (p.seqlen_q <= kDecodeRows && p.seqlen_q <= p.block_m) return tile_forward_decode(kernels, p, num_threads);
  const int num_m = cdiv(p.seqlen_q, p.block_m);
  const int64_t tasks = int64_t(p.batch) * p.heads_q * num_m;
  OmpSync sync;
  sync.begin_region();
#pragma omp parallel num_threads(thread_count(num_threads))
  {
    sync.enter();
    Workspace ws;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t task = 0; task < tasks; ++task) {
      // Last query tiles first: under a causal band they visit the most key tiles, and starting
      // the longest items first balances the threads.
      const int m = num_m - 1 - static_cast<int>(task % num_m);
      const int64_t bh = task / num_m;
      const int b = static_cast<int>(bh / p.heads_q);
      kernels.tile_forward(p, batch_segment(p, b), static_cast<int>(bh % p.heads_q), m, ws);
    }
    sync.leave();
  }
  sync.end_region();
}

namespace {
// The backward's δ = Σ_d dO·O when the caller left it to the kernels (g.delta null, g.out set):
// a pass of its own over the query rows, into `buffer`; returns the params to run the backward
// with. Chunks of rows, each by one thread in a fixed order: the same bits for any thread count.
constexpr int64_t kDeltaRows = 256;
FLASHLITE_OMP_DRIVER BackwardParams with_deltas(const KernelTable& kernels, const AttentionParams& p,
                                                const BackwardParams& g, int num_threads, std::vector<float>& buffer) {
  if (g.delta != nullptr || g.out == nullptr) return g;
  const int64_t rows = int64_t(p.batch) * p.heads_q * p.seqlen_q, chunks = (rows + kDeltaRows - 1) / kDeltaRows;
  buffer.resize(size_t(rows));
  OmpSync sync;
  sync.begin_region();
#pragma omp parallel num_threads(thread_count(num_threads))
  {
    sync.enter();
    Workspace ws;
#pragma omp for schedule(static) nowait
    for (int64_t chunk = 0; chunk < chunks; ++chunk)
      kernels.backward_deltas(p, g, chunk * kDeltaRows, std::min(rows, (chunk + 1) * kDeltaRows), buffer.data(), ws);
    sync.leave();
  }
  sync.end_region();
  BackwardParams ready = g;
  ready.delta = buffer.data();
  return ready;
}
}  // namespace

// The backward's query tiles are packed once (q̃ᵀ, q rows, dOᵀ, dO rows, lse, δ) by a first
// pass and read by every key tile that visits them, unless the buffer would exceed this (then each
// work item packs what it visits, as the kernels also can).
constexpr int64_t kMaxPackedBytes = int64_t(512) << 20;

namespace {
// The backward of a packed batch: the plain batch's passes with items for tiles. Pack pass: every
// forward item's query tile (per head), into row h·num_q_items + item of the buffer. Then either
// whole (sequence, kv head) items (tile_backward_head), or dK/dV per backward item and dQ per
// forward item. As for a plain batch the two give the same bits, so the choice may depend on the
// thread count: whole sequences when there are enough of them and none is more than a thread's
// share of the work (the tile pairs of head 0's schedule).
FLASHLITE_OMP_DRIVER void tile_backward_packed(const KernelTable& kernels, const AttentionParams& p,
                                               const BackwardParams& g, int num_threads) {
  const PackedItems& it = p.packed;
  const std::vector<Segment> segments = packed_segments(p);
  const int threads = thread_count(num_threads), S = it.num_sequences;
  const int64_t tile_floats = backward_tile_floats(p.head_dim, p.block_m, kernels.lanes);
  const int64_t pack_tasks = int64_t(p.heads_q) * it.num_q_items, packed_floats = pack_tasks * tile_floats;
  // A query tile is read by more than one key tile only if some sequence has more than one.
  const bool prepack = it.num_k_items > S && packed_floats * int64_t(sizeof(float)) <= kMaxPackedBytes;
  std::vector<int64_t> cost(size_t(S), 1);  // tile pairs per sequence (+1: an empty one still writes)
  int64_t total = 0, largest = 0;
  for (int t = 0; t < it.num_k_items; ++t) cost[size_t(it.k_items[2 * t])] += p.backward_schedule.num_tiles(0, 0, t);
  for (int64_t c : cost) total += c, largest = std::max(largest, c);
  const int64_t heads = int64_t(S) * p.heads_kv;
  const bool whole_heads = heads >= threads && largest * threads <= total * p.heads_kv;
  std::vector<int> sequences(static_cast<size_t>(S));
  for (int s = 0; s < S; ++s) sequences[size_t(s)] = s;
  std::stable_sort(sequences.begin(), sequences.end(), [&](int a, int b) { return cost[size_t(a)] > cost[size_t(b)]; });
  const std::vector<int> kv_order = by_cost(p.backward_schedule, it.num_k_items);
  const std::vector<int> q_order = by_cost(p.forward_schedule, it.num_q_items);
  const int64_t kv_tasks = int64_t(kv_order.size()) * p.heads_kv, q_tasks = int64_t(q_order.size()) * p.heads_q;
  float* packed = prepack ? static_cast<float*>(std::aligned_alloc(64, size_t((packed_floats * 4 + 63) / 64 * 64)))
                          : nullptr;
  if (prepack && packed == nullptr) throw std::bad_alloc();
  OmpSync sync;
  sync.begin_region();
#pragma omp parallel num_threads(threads)
  {
    sync.enter();
    Workspace ws;
    if (packed) {
#pragma omp for schedule(static) nowait
      for (int64_t task = 0; task < pack_tasks; ++task) {
        const int h = static_cast<int>(task / it.num_q_items), t = static_cast<int>(task % it.num_q_items);
        kernels.tile_backward_pack(p, g, segments[size_t(it.q_items[2 * t])], h, it.q_items[2 * t + 1],
                                   packed + task * tile_floats, ws);
      }
      sync.before_barrier(1);
#pragma omp barrier
      sync.after_barrier(1);
    }
    if (whole_heads) {
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t task = 0; task < heads; ++task)
        kernels.tile_backward_head(p, g, segments[size_t(sequences[size_t(task / p.heads_kv)])],
                                   static_cast<int>(task % p.heads_kv), packed, ws);
    } else {
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t task = 0; task < kv_tasks; ++task) {
        const int t = kv_order[size_t(task / p.heads_kv)];
        kernels.tile_backward_kv(p, g, segments[size_t(it.k_items[2 * t])], static_cast<int>(task % p.heads_kv),
                                 it.k_items[2 * t + 1], packed, ws);
      }
      sync.before_barrier(0);
#pragma omp barrier
      sync.after_barrier(0);
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t task = 0; task < q_tasks; ++task) {
        const int t = q_order[size_t(task / p.heads_q)];
        kernels.tile_backward_q(p, g, segments[size_t(it.q_items[2 * t])], static_cast<int>(task % p.heads_q),
                                it.q_items[2 * t + 1], packed, ws);
      }
    }
    sync.leave();
  }
  sync.end_region();
  std::free(packed);
}
}  // namespace

FLASHLITE_OMP_DRIVER void tile_backward(const AttentionParams& p, const BackwardParams& given, int num_threads) {
  if (p.batch == 0 || p.heads_kv == 0) return;
  const KernelTable& kernels = active();
  std::vector<float> deltas;
  const BackwardParams g = with_deltas(kernels, p, given, num_threads, deltas);
  if (p.packed.active()) return tile_backward_packed(kernels, p, g, num_threads);
  const int num_n = cdiv(p.seqlen_k, p.block_n), num_m = cdiv(p.seqlen_q, p.block_m);
  const int64_t kv_tasks = int64_t(p.batch) * p.heads_kv * num_n;
  const int64_t q_tasks = int64_t(p.batch) * p.heads_q * num_m;
  const int64_t tile_floats = backward_tile_floats(p.head_dim, p.block_m, kernels.lanes);
  const int64_t packed_floats = q_tasks * tile_floats;
  const bool prepack = num_n > 1 && packed_floats * int64_t(sizeof(float)) <= kMaxPackedBytes;
  // Whole heads (tile_backward_head: 5 products per tile pair, no second pass) when there are
  // enough of them to keep every thread busy; else key tiles, then query tiles (7 products, finer
  // work items). Both give the same bits, so the choice may depend on the thread count.
  const int threads = thread_count(num_threads);
  const int64_t heads = int64_t(p.batch) * p.heads_kv;
  const bool whole_heads = heads >= threads && (heads % threads == 0 || heads >= 2 * int64_t(threads));
  float* packed = prepack ? static_cast<float*>(std::aligned_alloc(64, size_t((packed_floats * 4 + 63) / 64 * 64)))
                          : nullptr;
  if (prepack && packed == nullptr) throw std::bad_alloc();
  // The query tiles of a (b, h) with no tile pair, forward or backward (a head mask's masked head:
  // its counts are 0), are read by no work item: not packed.
  std::vector<char> idle;
  if (packed) {
    idle.assign(size_t(p.batch) * p.heads_q, 1);
    for (int b = 0; b < p.batch; ++b)
      for (int h = 0; h < p.heads_q; ++h) {
        char& none = idle[size_t(b) * p.heads_q + h];
        for (int n = 0; n < num_n && none; ++n) none = p.backward_schedule.num_tiles(b, h, n) == 0;
        for (int m = 0; m < num_m && none; ++m) none = p.forward_schedule.num_tiles(b, h, m) == 0;
      }
  }
  OmpSync sync;
  sync.begin_region();
#pragma omp parallel num_threads(threads)
  {
    sync.enter();
    Workspace ws;
    if (packed) {
#pragma omp for schedule(static) nowait
      for (int64_t task = 0; task < q_tasks; ++task) {
        const int64_t bh = task / num_m;
        if (idle[size_t(bh)]) continue;
        kernels.tile_backward_pack(p, g, batch_segment(p, static_cast<int>(bh / p.heads_q)),
                                   static_cast<int>(bh % p.heads_q), static_cast<int>(task % num_m),
                                   packed + task * tile_floats, ws);
      }
      sync.before_barrier(1);
#pragma omp barrier
      sync.after_barrier(1);
    }
    if (whole_heads) {
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t task = 0; task < heads; ++task)
        kernels.tile_backward_head(p, g, batch_segment(p, static_cast<int>(task / p.heads_kv)),
                                   static_cast<int>(task % p.heads_kv), packed, ws);
    } else {
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t task = 0; task < kv_tasks; ++task) {
        const int64_t bh = task / num_n;
        kernels.tile_backward_kv(p, g, batch_segment(p, static_cast<int>(bh / p.heads_kv)),
                                 static_cast<int>(bh % p.heads_kv), static_cast<int>(task % num_n), packed, ws);
      }
      sync.before_barrier(0);
#pragma omp barrier
      sync.after_barrier(0);
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t task = 0; task < q_tasks; ++task) {
        const int m = num_m - 1 - static_cast<int>(task % num_m);
        const int64_t bh = task / num_m;
        kernels.tile_backward_q(p, g, batch_segment(p, static_cast<int>(bh / p.heads_q)),
                                static_cast<int>(bh % p.heads_q), m, packed, ws);
      }
    }
    sync.leave();
  }
  sync.end_region();
  std::free(packed);
}

namespace {
constexpr int kGatherRows = 16;  // query rows per gather work item
constexpr int kGatherKeys = 64;  // keys per gather-backward key item

// A gather work item: rows [begin, end) of (b, kv head), run for every query head of the GQA
// group in turn - they share the index rows, so the gathered k/v rows are still in cache.
struct GatherRows {
  int b, kv_head, begin, end;
};
GatherRows gather_rows(const AttentionParams& p, int64_t task, int chunks) {
  const int64_t block = task / chunks;
  const int begin = static_cast<int>(task % chunks) * kGatherRows;
  return {static_cast<int>(block / p.heads_kv), static_cast<int>(block % p.heads_kv), begin,
          begin + kGatherRows < p.seqlen_q ? begin + kGatherRows : p.seqlen_q};
}
}  // namespace

// Rows [begin, end) of (b, h) under the head mask (AttentionParams::row_keep): each run of kept
// rows goes to run(lo, hi); a masked row visits nothing and gets its zeros here: forward, out 0,
// lse −inf and statistics 0; backward (`dq` set), dq 0.
template <class Run>
void kept_runs(const AttentionParams& p, int b, int h, int begin, int end, void* dq, const Strides3& dq_strides,
               Run run) {
  if (p.row_keep == nullptr) return run(begin, end);
  const size_t bytes = size_t(p.head_dim) * (p.dtype == DType::kFloat32 ? 4 : 2);  // zero bits in every dtype
  const int64_t plane = int64_t(p.batch) * p.heads_q * p.seqlen_q;
  int lo = begin;
  for (int i = begin; i < end; ++i) {
    if (p.row_kept(b, h, i)) continue;
    if (i > lo) run(lo, i);
    lo = i + 1;
    const int64_t row = (int64_t(b) * p.heads_q + h) * p.seqlen_q + i;
    if (dq != nullptr) {
      const int64_t at = b * dq_strides.batch + h * dq_strides.head + i * dq_strides.row;
      std::memset(static_cast<char*>(dq) + at * int64_t(bytes / p.head_dim), 0, bytes);
      continue;
    }
    const int64_t at = b * p.out_strides.batch + h * p.out_strides.head + i * p.out_strides.row;
    std::memset(static_cast<char*>(p.out) + at * int64_t(bytes / p.head_dim), 0, bytes);
    p.lse[row] = -__builtin_inff();
    if (p.row_stats)
      for (int s = 0; s < 5; ++s) p.row_stats[s * plane + row] = 0.f;
  }
  if (end > lo) run(lo, end);
}

FLASHLITE_OMP_DRIVER void gather_forward(const AttentionParams& p, int num_threads) {
  if (p.batch == 0 || p.heads_q == 0 || p.seqlen_q == 0) return;
  const KernelTable& kernels = active();
  const int chunks = cdiv(p.seqlen_q, kGatherRows), group = p.group();
  const int64_t tasks = int64_t(p.batch) * p.heads_q * chunks;
  OmpSync sync;
  sync.begin_region();
#pragma omp parallel num_threads(thread_count(num_threads))
  {
    sync.enter();
    Workspace ws;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t task = 0; task < tasks / group; ++task) {
      const GatherRows rows = gather_rows(p, task, chunks);
      for (int g = 0; g < group; ++g) {
        const int h = rows.kv_head * group + g;
        kept_runs(p, rows.b, h, rows.begin, rows.end, nullptr, {},
                  [&](int lo, int hi) { kernels.gather_forward(p, rows.b, h, lo, hi, ws); });
      }
    }
    sync.leave();
  }
  sync.end_region();
}

FLASHLITE_OMP_DRIVER void gather_backward(const AttentionParams& p, const BackwardParams& given, int num_threads) {
  if (p.batch == 0 || p.heads_kv == 0) return;
  const KernelTable& kernels = active();
  std::vector<float> deltas;
  const BackwardParams g = with_deltas(kernels, p, given, num_threads, deltas);
  const int K = p.top_k, group = p.group(), Nq = p.seqlen_q, Nk = p.seqlen_k;
  const int64_t rows_total = int64_t(p.batch) * p.heads_q * Nq;
  std::vector<float> probs(size_t(rows_total * K)), score_grads(size_t(rows_total * K));
  GatherGrads gg;
  gg.probs = probs.data();
  gg.score_grads = score_grads.data();

  const int chunks = cdiv(Nq, kGatherRows);
  const int64_t row_tasks = int64_t(p.batch) * p.heads_q * chunks;
  const int key_chunks = cdiv(Nk, kGatherKeys);
  const int64_t key_tasks = int64_t(p.batch) * p.heads_kv * key_chunks;
  OmpSync sync;
  sync.begin_region();
#pragma omp parallel num_threads(thread_count(num_threads))
  {
    sync.enter();
    Workspace ws;
    // 1. Per query row: dq, P and dS.
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t task = 0; task < row_tasks / group; ++task) {
      const GatherRows rows = gather_rows(p, task, chunks);
      for (int gi = 0; gi < group; ++gi) {  // a masked row: dq 0, and its P, dS are never read
        const int h = rows.kv_head * group + gi;
        kept_runs(p, rows.b, h, rows.begin, rows.end, g.dq, g.dq_strides,
                  [&](int lo, int hi) { kernels.gather_backward_rows(p, g, gg, rows.b, h, lo, hi, ws); });
      }
    }
    sync.before_barrier(0);
#pragma omp barrier
    sync.after_barrier(0);
    // 2. Per key chunk of (b, kv head), after the barrier of loop 1: dk, dv from the P and dS of
    //    the slots that the key -> slot index (g.key_offsets / g.key_slots) lists for each key.
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t task = 0; task < key_tasks; ++task) {
      const int64_t block = task / key_chunks;
      const int begin = static_cast<int>(task % key_chunks) * kGatherKeys;
      const int end = begin + kGatherKeys < Nk ? begin + kGatherKeys : Nk;
      kernels.gather_backward_keys(p, g, gg, static_cast<int>(block / p.heads_kv),
                                   static_cast<int>(block % p.heads_kv), begin, end, ws);
    }
    sync.leave();
  }
  sync.end_region();
}

}  // namespace cpu
}  // namespace flashlite
