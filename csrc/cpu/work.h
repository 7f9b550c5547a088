// Internal interface between the OpenMP driver (driver.cpp) and the per-instruction-set kernel
// builds (isa_*.cpp, each compiling isa_kernels.h with its own target options).
#pragma once

#include <cstddef>
#include <cstdint>

#include "../common/params.h"

namespace flashlite {
namespace cpu {

// Per-thread scratch memory, grown on demand (64-byte aligned). Defined in driver.cpp only, so
// no instruction-set variant instantiates its code.
class Workspace {
 public:
  Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace();
  float* floats(size_t count);            // valid until the next call
  const float** pointers(size_t count);  // a second, independent area

 private:
  float* data_ = nullptr;
  size_t capacity_ = 0;
  const float** pointers_ = nullptr;
  size_t pointer_capacity_ = 0;
};

// Gather backward bookkeeping between the rows pass and the keys pass: probabilities and score
// gradients per (row, slot). Per (b, kv head) they are a block of group·Nq·K floats laid out
// (gi·Nq + i)·K + t for query head kv_head·group + gi, so the slot i·K + t of the key -> slot
// index (BackwardParams::key_slots) is entry gi·Nq·K + slot of its block.
struct GatherGrads {
  float* probs = nullptr;        // [B, Hq, Nq, K]
  float* score_grads = nullptr;  // [B, Hq, Nq, K]: dL/d(q.k) including scale and softcap chain
};

// Floats per query row of decode state (tile_forward_rows): [acc (head_dim rounded up to the
// vector width) | running max | running sum | the head statistics' four running sums (t, d, z, c;
// tile_engine.h) | pad to a whole vector]. The driver sizes the split buffers with it, the kernels
// lay their records out with it.
constexpr int kDecodeStateFloats = 6;
inline int decode_record_floats(int head_dim, int lanes) {
  return ((head_dim + lanes - 1) / lanes + (kDecodeStateFloats + lanes - 1) / lanes) * lanes;
}

// Floats of one packed backward query tile (KernelTable::tile_backward_pack): q̃ᵀ, q rows, dOᵀ,
// dO rows ([Dp][BM] or [BM][Dp] each, Dp = head_dim rounded up to the vector width) and lse, δ
// and the entropy's gradient g·ln2 (zeros without one) per row.
inline int64_t backward_tile_floats(int head_dim, int block_m, int lanes) {
  return 4 * int64_t((head_dim + lanes - 1) / lanes * lanes) * block_m + 3 * int64_t(block_m);
}

// Where a tile-engine work item's rows are and how long its sequence is: batch row b of a plain
// batch (all Nq queries and Nk keys), or sequence s of a packed batch (AttentionParams::packed:
// its slice of the T axis of the [1, H, T, D] views). The kernels number tiles and positions
// locally (query tile m is local rows m·BM .., p(i) = i + nk − nq), add q0 / k0 where they touch a
// tensor, read schedule rows q_row0 + m (forward) and k_row0 + n (backward), and ALiBi row `seq`.
struct Segment {
  int b = 0;                   // batch index of the tensors and schedules (0 when packed)
  int seq = 0;                 // ALiBi row: b, or the packed sequence
  int q0 = 0, k0 = 0;          // the sequence's first query / key row in the tensors
  int nq = 0, nk = 0;          // its lengths
  int q_row0 = 0, k_row0 = 0;  // schedule rows of its query tile 0 (forward) and key tile 0 (backward)
  int shift() const { return nk - nq; }  // p(i) = i + shift
};

// Batch row b: all Nq queries and Nk keys, or in a paged cache its own seqlens[b] keys.
inline Segment batch_segment(const AttentionParams& p, int b) {
  Segment s;
  s.b = s.seq = b;
  s.nq = p.seqlen_q;
  s.nk = p.paged.active() ? p.paged.seqlens[b] : p.seqlen_k;
  return s;
}

// Forward schedule rows per (b, h): ⌈Nq / BM⌉, or the packed batch's forward items. The driver's
// packed backward query tiles (tile_backward_pack) are laid out (b·Hq + h)·forward_rows + row.
inline int forward_rows(const AttentionParams& p) {
  return p.packed.active() ? p.packed.num_q_items : (p.seqlen_q + p.block_m - 1) / p.block_m;
}

// One instruction-set build of the kernels; each function handles one work item.
struct KernelTable {
  const char* name;
  int lanes;  // floats per vector register
  // Forward of query tile m of (segment, h).
  void (*tile_forward)(const AttentionParams&, const Segment&, int h, int m, Workspace&);
  // The same for a few query rows (decode), rows along the keys: query tile m of heads
  // h_first .. h_first + heads − 1 (one head, or whole GQA groups of one or more KV heads) sharing
  // one schedule row, over key tiles
  // [tile_begin, tile_end) of that row. With `partials` (a split of the keys) the rows' running
  // max, sum and accumulator are left there for tile_forward_rows_merge instead of out/lse.
  void (*tile_forward_rows)(const AttentionParams&, int b, int h_first, int heads, int m, int tile_begin,
                            int tile_end, float* partials, Workspace&);
  void (*tile_forward_rows_merge)(const AttentionParams&, int b, int h_first, int heads, int m, int splits,
                                  const float* partials, Workspace&);
  // The backward's query tile m of (segment, h) packed (q̃ᵀ, q rows, dOᵀ, dO rows, lse, δ) into
  // dst, at ((b·Hq + h)·forward_rows(p) + q_row0 + m)·backward_tile_floats(p, lanes) of the
  // driver's buffer.
  void (*tile_backward_pack)(const AttentionParams&, const BackwardParams&, const Segment&, int h, int m, float* dst,
                             Workspace&);
  // dK, dV of key tile n of (segment, kv head), over the GQA group's query tiles: read from
  // `packed` (the driver's buffer), or packed here when it is null.
  void (*tile_backward_kv)(const AttentionParams&, const BackwardParams&, const Segment&, int kv_head, int n,
                           const float* packed, Workspace&);
  // dK, dV and dQ of a whole (segment, kv head): the same bits as tile_backward_kv +
  // tile_backward_q with 5 products per tile pair instead of 7, in one work item.
  void (*tile_backward_head)(const AttentionParams&, const BackwardParams&, const Segment&, int kv_head,
                             const float* packed, Workspace&);
  // dQ of query tile m of (segment, h) (its tile from `packed` likewise).
  void (*tile_backward_q)(const AttentionParams&, const BackwardParams&, const Segment&, int h, int m,
                          const float* packed, Workspace&);
  // Gather forward of rows [row_begin, row_end) of (b, h).
  void (*gather_forward)(const AttentionParams&, int b, int h, int row_begin, int row_end, Workspace&);
  // Gather backward, per rows: dq, and probs/score_grads for the key pass.
  void (*gather_backward_rows)(const AttentionParams&, const BackwardParams&, const GatherGrads&, int b, int h,
                               int row_begin, int row_end, Workspace&);
  // Gather backward, per keys [key_begin, key_end) of (b, kv head): dk, dv over the key -> slot
  // index (BackwardParams::key_offsets / key_slots).
  void (*gather_backward_keys)(const AttentionParams&, const BackwardParams&, const GatherGrads&, int b,
                               int kv_head, int key_begin, int key_end, Workspace&);
  // Attention dropout's random words (philox.h, this build's vectors): out[t] = word at counter
  // start + t for t < count (tests and debugging: cpu_dropout_words).
  void (*dropout_words)(uint64_t seed, uint64_t start, int64_t count, uint32_t* out);
  // δ = Σ_d dO·O of query rows [begin, end) of the [B, Hq, Nq] grid into delta[row] (a backward
  // whose caller left δ to the kernels: BackwardParams::delta null, out set).
  void (*backward_deltas)(const AttentionParams&, const BackwardParams&, int64_t begin, int64_t end, float* delta,
                          Workspace&);
};

const KernelTable& kernels_default();
#if defined(__x86_64__) || defined(_M_X64)
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();
#endif

}  // namespace cpu
}  // namespace flashlite
