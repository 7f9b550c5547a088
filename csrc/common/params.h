// Parameters and schedule/mask logic shared by the CPU and CUDA kernels of flashlite.
//
// Torch-free: raw pointers, element strides and sizes. Layout conventions are the Python
// side's (flashlite/schedule.py):
//   q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D], out like q, lse float32 [B, Hq, Nq] contiguous;
//   last dimension contiguous, other strides arbitrary (in elements).
//   Query i sits at p(i) = i + Nk - Nq (bottom-right). Key j is visible to query i iff
//   0 <= j < Nk and p(i) - window_left <= j <= p(i) + window_right (an unbounded side is
//   passed as Nq + Nk).
//   Tile schedule, forward: for (b, h, query tile m), kv_count[b,h,m] key tiles; tile t is
//   kv_tiles[b,h,m,0] + t ("range") or kv_tiles[b,h,m,t] ("list"). Backward: the same with
//   q_tiles/q_count per key tile. Strides of broadcast dims are 0.
//   Gather (top-k): indices [B, Hi, Nq, K] (per query) or [B, Hi, K] (shared), int64, Hi =
//   index_heads = 1 (one list for every KV head) or Hkv; -1 = empty slot; with causal, an index
//   > p(i) is ignored. The rows arrive canonical (the Python side sorts them and turns repeats
//   into -1): the valid entries of a row are distinct keys.
//   Gather backward, the key -> slot inverse (CSR), built once per call plan by the Python side
//   (flashlite/core/gather_rows.py key_index) and read by every backend:
//     key_offsets int64 [B*Hi*Nk + 1]; for key s = (b*Hi + hi)*Nk + j its entries are
//     key_slots[key_offsets[s] .. key_offsets[s+1]), each a slot i*K + t (query row i < Nq, list
//     position t < K) whose index is j, ascending within a key. Only valid selections appear
//     (index >= 0 and, with causal, j <= p(i)); a shared list [B, Hi, K] still has slot i*K + t,
//     one entry per query i that sees it. key_slots may be longer than key_offsets[B*Hi*Nk]
//     (the tail is not read). The full contract: docs/native_abi.md.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FL_HOST_DEVICE inline
#endif

namespace flashlite {

enum class DType : int32_t { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

struct Strides3 {  // batch, head, row (element strides; the last dim is contiguous)
  int64_t batch = 0, head = 0, row = 0;
};

struct ScheduleView {
  const int32_t* tiles = nullptr;  // [B, H, rows, L] with strides below
  const int32_t* count = nullptr;  // [B, H, rows]
  int64_t tiles_stride_b = 0, tiles_stride_h = 0, tiles_stride_row = 0;
  int64_t count_stride_b = 0, count_stride_h = 0;
  bool is_list = false;

  FL_HOST_DEVICE int32_t num_tiles(int b, int h, int row) const {
    return count[b * count_stride_b + h * count_stride_h + row];
  }
  // The t-th tile of (b, h, row): a range's first tile plus t, or the t-th list entry.
  FL_HOST_DEVICE int32_t tile(int b, int h, int row, int t) const {
    const int32_t* entry = tiles + b * tiles_stride_b + h * tiles_stride_h + row * tiles_stride_row;
    return is_list ? entry[t] : entry[0] + t;
  }
};

// A packed (variable-length) batch (flashlite/core/packed.py): the tensors are [1, H, T, D] views
// holding S sequences back to back; the tile engine's work is a list of items instead of
// (batch, tile). Forward item t = q_items[2t .. 2t+1] = (sequence s, query tile m) reads schedule
// row t of forward_schedule; backward item t = k_items[2t ..] = (s, key tile n) reads row t of
// backward_schedule. Tile numbers are local to the sequence, whose query rows are
// cu_seqlens_q[s] .. cu_seqlens_q[s+1] and keys cu_seqlens_k[s] .. cu_seqlens_k[s+1]; positions,
// band and ALiBi (row s of [S, Hq] slopes) are local too. The items come in order: sequence by
// sequence, every tile of a sequence once, ascending (the binding checks it). Unset = plain batch.
struct PackedItems {
  const int32_t* q_items = nullptr;       // [num_q_items, 2] contiguous
  const int32_t* k_items = nullptr;       // [num_k_items, 2] contiguous
  const int32_t* cu_seqlens_q = nullptr;  // [num_sequences + 1]
  const int32_t* cu_seqlens_k = nullptr;  // [num_sequences + 1]
  int32_t num_q_items = 0, num_k_items = 0, num_sequences = 0;

  FL_HOST_DEVICE bool active() const { return q_items != nullptr; }
};

// A paged KV cache (flashlite/core/paged.py; tile engine forward, CPU): k and v are the page pool
// [num_pages, page_size, Hkv, D] viewed as [B, Hkv, num_pages·page_size, D] (batch stride 0), so a
// row of the views is a physical slot. Batch row b has seqlens[b] keys (its own Nk: query i sits at
// p(i) = i + seqlens[b] − Nq) and its logical key j lives in slot
//   block_table[b·table_stride + j / page_size]·page_size + j % page_size.
// The binding checks that every page a sequence uses is a page of the pool. Unset = contiguous keys.
struct PagedKeys {
  const int32_t* block_table = nullptr;  // [B, max_pages], row stride table_stride
  const int32_t* seqlens = nullptr;      // [B]
  int64_t table_stride = 0;
  int32_t page_size = 0;

  FL_HOST_DEVICE bool active() const { return block_table != nullptr; }
  FL_HOST_DEVICE int32_t slot(int32_t b, int32_t j) const {
    return block_table[b * table_stride + j / page_size] * page_size + j % page_size;
  }
};

struct AttentionParams {
  DType dtype = DType::kFloat32;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // [B, Hq, Nq] contiguous
  Strides3 q_strides, k_strides, v_strides, out_strides;
  int32_t batch = 0, heads_q = 0, heads_kv = 0, seqlen_q = 0, seqlen_k = 0, head_dim = 0;
  float scale = 1.f;
  float softcap = 0.f;                   // 0 = off; else s = softcap * tanh(s / softcap)
  const float* alibi_slopes = nullptr;   // null = off; [Hq] (stride_b 0) or [B, Hq] ([S, Hq] packed)
  int64_t alibi_stride_b = 0;
  int32_t window_left = 0, window_right = 0;  // band; unbounded side = Nq + Nk
  // Tile engine.
  int32_t block_m = 0, block_n = 0;
  ScheduleView forward_schedule;   // per query tile: key tiles
  ScheduleView backward_schedule;  // per key tile: query tiles
  PackedItems packed;              // a packed batch's work items (tile engine, CPU); unset = plain batch
  PagedKeys paged;                 // keys read through a block table (tile engine forward, CPU); unset = contiguous
  // Gather engine.
  const int64_t* indices = nullptr;
  int64_t indices_stride_b = 0, indices_stride_h = 0, indices_stride_n = 0;  // stride_n 0 = shared list
  int32_t top_k = 0;
  int32_t index_heads = 0;  // Hi = indices.size(1): 1 (shared by the KV heads) or Hkv
  bool causal = false;
  // Attention dropout (flashlite/core/dropout.py; the CPU kernels so far). Element (b, h, i, j) of
  // the [B, Hq, Nq, Nk] probability matrix (a packed batch: its [1, Hq, Tq, Tk] views) has the
  // counter e = dropout_index(b, h, i, j) and is kept iff Philox4x32-10(key = seed, counter = e)
  // word 0 >= dropout_threshold = floor(p * 2^32); kept probabilities are scaled by dropout_scale =
  // 1 / (1 - p). The lse stays the undropped one. Off (dropout = false): nothing is read.
  bool dropout = false;
  uint32_t dropout_threshold = 0;
  float dropout_scale = 1.f;
  uint64_t dropout_seed = 0;

  // Head statistics (flashlite.attention_stats; the CPU kernels so far): with row_stats set, the
  // forward also writes float32 [5, B, Hq, Nq] contiguous (a packed batch: [5, 1, Hq, Tq]), planes
  // entropy, max_prob, mean_distance, sink_mass, keys of each query row (plane stride B·Hq·Nq, row
  // (b·Hq + h)·Nq + i as lse); sink_mass sums the probabilities of keys j < sink_tokens (local key
  // positions). Null = off: nothing is computed.
  float* row_stats = nullptr;
  int32_t sink_tokens = 0;

  // Head mask (flashlite's bool head_mask; the CPU gather engine so far): query row i of (b, h) runs
  // only where row_keep[b·keep_stride_b + h·keep_stride_h + i·keep_stride_n] != 0. A masked row
  // visits no key: out 0, lse −inf, statistics 0, dq 0, and it adds nothing to dk/dv. (The tile
  // engine needs no pointer: its plan zeroes the masked heads' schedule counts.) Null = every row.
  const uint8_t* row_keep = nullptr;
  int64_t keep_stride_b = 0, keep_stride_h = 0, keep_stride_n = 0;

  // Debug (tests; the CPU tile engine's forward): where set, the key tiles each (b, h, forward
  // schedule row) computed with are added to tile_counter[(b·Hq + h)·rows + row], int32 (rows:
  // ⌈Nq / block_m⌉, or a packed batch's query items). The evidence that a head mask's masked heads,
  // and tiles outside the pattern, are never visited. Null: not counted.
  int32_t* tile_counter = nullptr;

  FL_HOST_DEVICE uint64_t dropout_index(int32_t b, int32_t h, int64_t i, int64_t j) const {
    return static_cast<uint64_t>(((int64_t(b) * heads_q + h) * seqlen_q + i) * seqlen_k + j);
  }
  FL_HOST_DEVICE bool row_kept(int32_t b, int32_t h, int64_t i) const {
    return row_keep == nullptr || row_keep[b * keep_stride_b + h * keep_stride_h + i * keep_stride_n] != 0;
  }
  FL_HOST_DEVICE int32_t group() const { return heads_q / heads_kv; }
  FL_HOST_DEVICE int32_t query_position(int32_t i) const { return i + seqlen_k - seqlen_q; }
  FL_HOST_DEVICE bool band_visible(int32_t i, int32_t j) const {
    const int32_t pos = query_position(i);
    return j >= 0 && j < seqlen_k && j >= pos - window_left && j <= pos + window_right;
  }
  FL_HOST_DEVICE float alibi(int32_t b, int32_t h) const {
    return alibi_slopes ? alibi_slopes[b * alibi_stride_b + h] : 0.f;
  }
};

struct BackwardParams {
  const void* grad_out = nullptr;
  Strides3 grad_out_strides;
  // [B, Hq, Nq] contiguous: sum_d dO * O. The CPU kernels may be left to compute it (delta null,
  // out set): their driver's first pass, fixed order per row.
  const float* delta = nullptr;
  const void* out = nullptr;  // the forward's output (like grad_out's dtype): read only when delta is null
  Strides3 out_strides;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  Strides3 dq_strides, dk_strides, dv_strides;
  bool deterministic = true;
  // Top-k (gather) backward: the key -> slot inverse index (see the header comment; Hi =
  // AttentionParams::index_heads, hi = Hi == 1 ? 0 : kv_head). Built by the Python side, checked
  // by the binding (set_key_index in torch_params.h); the CPU gather backward requires it.
  const int64_t* key_offsets = nullptr;  // [B*Hi*Nk + 1]
  const int64_t* key_slots = nullptr;    // [>= key_offsets[B*Hi*Nk]]: slots i*K + t, ascending per key
  // The entropy's gradient (attention_stats' backward; the CPU kernels so far): float32
  // [2, B, Hq, Nq] contiguous, plane 0 g (the gradient reaching the entropy of row i), plane 1
  // shift = g·(lse − H) (0 where lse = −inf). The score gradient becomes
  // dS = P ⊙ (dP − (δ − shift) − g·s), s the final logit in natural units. Null = off.
  const float* entropy = nullptr;
};

}  // namespace flashlite
