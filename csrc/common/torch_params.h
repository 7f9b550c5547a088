// Tensor -> flashlite::AttentionParams / BackwardParams conversion for the binding translation
// units (csrc/bindings.cpp, csrc/cuda/bindings_cuda.cpp). Unlike the rest of csrc/common this
// header needs torch; the kernels never include it.
//
// A binding's steps: make_last_dims_contiguous, its own device checks (check_qkv), then
// prepare_forward / prepare_backward (outputs + params), set_tile_schedule (tile engine) or
// set_indices (gather engine; its backward also set_key_index), and the kernel call. The contract
// of the tensors and the params: docs/native_abi.md.
#pragma once

#include <torch/extension.h>

#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <string>

#include "params.h"

namespace flashlite {

inline DType dtype_of(at::ScalarType type) {
  switch (type) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    default: TORCH_CHECK_TYPE(false, "flashlite: q, k, v must be float16, bfloat16 or float32, got ", type);
  }
  return DType::kFloat32;
}
inline DType dtype_of(const at::Tensor& t) { return dtype_of(t.scalar_type()); }

// A tensor whose last dimension is contiguous (a copy only if it is not).
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.dim() > 0 && t.size(-1) > 1 && t.stride(-1) != 1 ? t.contiguous() : t;
}
// The same in place, for the inputs of a binding (q, k, v; grad_out in a backward).
inline void make_last_dims_contiguous(std::initializer_list<at::Tensor*> tensors) {
  for (at::Tensor* t : tensors) *t = last_dim_contiguous(*t);
}

inline Strides3 strides_of(const at::Tensor& t) {  // [B, H, N, D]
  Strides3 s;
  s.batch = t.stride(0);
  s.head = t.stride(1);
  s.row = t.stride(2);
  return s;
}

// The stride of dim `d`, or 0 when it is a size-1 (broadcast) dimension.
inline int64_t broadcast_stride(const at::Tensor& t, int d) { return t.size(d) == 1 ? 0 : t.stride(d); }

// q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D] on `device`, same dtype, last dim contiguous, Hq % Hkv == 0.
inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, c10::DeviceType device) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "flashlite: q, k, v must be 4-D [B, H, N, D]");
  TORCH_CHECK_VALUE(q.device().type() == device && k.device() == q.device() && v.device() == q.device(),
                    "flashlite: q, k, v must be on the same ", c10::DeviceTypeName(device), " device");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "flashlite: q, k, v must have the same dtype");
  dtype_of(q);
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == v.size(1) &&
                        k.size(2) == v.size(2) && k.size(3) == q.size(3) && v.size(3) == q.size(3),
                    "flashlite: q [B,Hq,Nq,D] and k, v [B,Hkv,Nk,D] do not match");
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "flashlite: Hq must be a multiple of Hkv");
}

// Parameters shared by both engines. out/lse must already be allocated ([B,Hq,Nq,D], float32
// [B,Hq,Nq] contiguous). alibi_slopes: undefined or float32 [Hq] / [B,Hq] contiguous.
inline AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                   const at::Tensor& lse, const at::Tensor& alibi_slopes, double scale, double softcap) {
  AttentionParams p;
  p.dtype = dtype_of(q);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.defined() ? out.data_ptr() : nullptr;
  p.lse = lse.data_ptr<float>();
  p.q_strides = strides_of(q);
  p.k_strides = strides_of(k);
  p.v_strides = strides_of(v);
  if (out.defined()) p.out_strides = strides_of(out);
  p.batch = static_cast<int32_t>(q.size(0));
  p.heads_q = static_cast<int32_t>(q.size(1));
  p.heads_kv = static_cast<int32_t>(k.size(1));
  p.seqlen_q = static_cast<int32_t>(q.size(2));
  p.seqlen_k = static_cast<int32_t>(k.size(2));
  p.head_dim = static_cast<int32_t>(q.size(3));
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  if (alibi_slopes.defined()) {
    p.alibi_slopes = alibi_slopes.data_ptr<float>();
    p.alibi_stride_b = alibi_slopes.dim() == 2 ? alibi_slopes.stride(0) : 0;
  }
  return p;
}

// alibi_slopes as float32 contiguous [Hq] / [B,Hq] on q's device (undefined if none). rows: the
// first dim of 2-D slopes, B by default (-1); a packed batch's sequence count S.
inline at::Tensor prepare_alibi(const c10::optional<at::Tensor>& alibi_slopes, const at::Tensor& q,
                                int64_t rows = -1) {
  if (!alibi_slopes.has_value() || !alibi_slopes->defined()) return at::Tensor();
  const at::Tensor& a = *alibi_slopes;
  const bool per_head = a.dim() == 1 && a.size(0) == q.size(1);
  const bool per_batch = a.dim() == 2 && a.size(0) == (rows < 0 ? q.size(0) : rows) && a.size(1) == q.size(1);
  TORCH_CHECK_VALUE(per_head || per_batch, "flashlite: alibi_slopes must be float32 [Hq] or ",
                    rows < 0 ? "[B, Hq]" : "[S, Hq] (S sequences of the packed batch)");
  return a.to(q.device(), at::kFloat).contiguous();
}

// A schedule's int32 [Bs,Hs,rows,L] tiles and [Bs,Hs,rows] counts (size-1 dims broadcast).
inline ScheduleView make_schedule(const at::Tensor& tiles, const at::Tensor& count, bool is_list, int64_t rows,
                                  const at::Tensor& q, const char* what) {
  TORCH_CHECK_VALUE(tiles.dim() == 4 && count.dim() == 3 && tiles.scalar_type() == at::kInt &&
                        count.scalar_type() == at::kInt && tiles.device() == q.device() && count.device() == q.device(),
                    "flashlite: ", what, " schedule must be int32 tiles [Bs,Hs,rows,L] and counts [Bs,Hs,rows] on q's device");
  TORCH_CHECK_VALUE((tiles.size(0) == 1 || tiles.size(0) == q.size(0)) && (tiles.size(1) == 1 || tiles.size(1) == q.size(1)) &&
                        tiles.size(2) == rows && count.size(0) == tiles.size(0) && count.size(1) == tiles.size(1) &&
                        count.size(2) == rows && tiles.size(3) >= 1 && (tiles.size(3) == 1 || tiles.stride(3) == 1),
                    "flashlite: ", what, " schedule has the wrong shape for these inputs");
  ScheduleView s;
  s.tiles = tiles.data_ptr<int32_t>();
  s.count = count.data_ptr<int32_t>();
  s.tiles_stride_b = broadcast_stride(tiles, 0);
  s.tiles_stride_h = broadcast_stride(tiles, 1);
  s.tiles_stride_row = tiles.stride(2);
  s.count_stride_b = broadcast_stride(count, 0);
  s.count_stride_h = broadcast_stride(count, 1);
  TORCH_CHECK_VALUE(rows <= 1 || count.stride(2) == 1, "flashlite: ", what, " counts must be contiguous in the last dim");
  s.is_list = is_list;
  return s;
}

// Tile engine: the (block_m, block_n) tiles, the band and the forward schedule (kv_tiles/kv_count:
// key tiles per query tile). tile_config: the function that gives valid tiles, for the message.
// rows: the schedule's rows, ⌈Nq / block_m⌉ by default (-1); a packed batch's forward items.
inline void set_tile_schedule(AttentionParams& p, const at::Tensor& q, int64_t block_m, int64_t block_n,
                              int64_t window_left, int64_t window_right, const at::Tensor& kv_tiles,
                              const at::Tensor& kv_count, bool is_list, const char* tile_config, int64_t rows = -1) {
  TORCH_CHECK_VALUE(block_m > 0 && block_n > 0 && block_m % 16 == 0 && block_n % 16 == 0,
                    "flashlite: block_m and block_n must be positive multiples of 16 (use ", tile_config, "), got (",
                    block_m, ", ", block_n, ")");
  p.block_m = static_cast<int32_t>(block_m);
  p.block_n = static_cast<int32_t>(block_n);
  p.window_left = static_cast<int32_t>(window_left);
  p.window_right = static_cast<int32_t>(window_right);
  p.forward_schedule = make_schedule(kv_tiles, kv_count, is_list, rows < 0 ? (q.size(2) + block_m - 1) / block_m : rows,
                                     q, "kv_tiles/kv_count");
}

// Tile engine backward: also the transposed schedule (q_tiles/q_count: query tiles per key tile).
// After set_tile_schedule. rows: ⌈Nk / block_n⌉ by default (-1); a packed batch's backward items.
inline void set_backward_schedule(AttentionParams& p, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& q_tiles, const at::Tensor& q_count, bool is_list,
                                  int64_t rows = -1) {
  p.backward_schedule = make_schedule(q_tiles, q_count, is_list,
                                      rows < 0 ? (k.size(2) + p.block_n - 1) / p.block_n : rows, q, "q_tiles/q_count");
}

// A packed batch's work items (params.h PackedItems; flashlite/core/packed.py): all of q_items
// and cu_seqlens_q/k or none (a plain batch: false). int32, contiguous, on the CPU; q, k are the
// [1, H, T, D] views; cu_seqlens_* [S + 1] start at 0, never decrease and end at Tq / Tk; the
// items list every tile of every sequence once, sequence by sequence, ascending (q_items with
// block_m rows per tile; k_items, when given, with block_n keys). `fn` names the binding. Reads
// O(S + items) numbers; before set_tile_schedule (whose rows are then the items).
inline bool set_packed_items(AttentionParams& p, const at::Tensor& q, const at::Tensor& k,
                             const c10::optional<at::Tensor>& q_items, const c10::optional<at::Tensor>& k_items,
                             const c10::optional<at::Tensor>& cu_seqlens_q,
                             const c10::optional<at::Tensor>& cu_seqlens_k, int64_t block_m, int64_t block_n,
                             const char* fn) {
  auto given = [](const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); };
  const int any = given(q_items) + given(k_items) + given(cu_seqlens_q) + given(cu_seqlens_k);
  if (any == 0) return false;
  TORCH_CHECK_VALUE(given(q_items) && given(cu_seqlens_q) && given(cu_seqlens_k), "flashlite: ", fn,
                    ": a packed batch needs q_items, cu_seqlens_q and cu_seqlens_k together (or none of them)");
  TORCH_CHECK_VALUE(q.size(0) == 1, "flashlite: ", fn, ": a packed batch's q, k, v are [1, H, T, D] views, got B = ",
                    q.size(0));
  TORCH_CHECK_VALUE(block_m > 0 && block_n > 0, "flashlite: ", fn, ": block_m and block_n must be positive");
  auto check_int32 = [&](const at::Tensor& t, const char* what, int64_t dims) {
    TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kInt && t.dim() == dims && t.is_contiguous() &&
                          (dims == 1 || t.size(1) == 2),
                      "flashlite: ", fn, ": ", what, " must be an int32 contiguous CPU tensor ",
                      dims == 1 ? "[S + 1]" : "[items, 2]", ", got ", t.scalar_type(), " ", t.sizes(),
                      t.is_contiguous() ? "" : " non-contiguous", " on ", t.device());
  };
  const at::Tensor& cu_q = *cu_seqlens_q;
  const at::Tensor& cu_k = *cu_seqlens_k;
  check_int32(cu_q, "cu_seqlens_q", 1);
  check_int32(cu_k, "cu_seqlens_k", 1);
  check_int32(*q_items, "q_items", 2);
  TORCH_CHECK_VALUE(cu_q.numel() >= 1 && cu_q.numel() == cu_k.numel(), "flashlite: ", fn,
                    ": cu_seqlens_q and cu_seqlens_k must both be [S + 1], got ", cu_q.numel(), " and ", cu_k.numel());
  const int64_t S = cu_q.numel() - 1;
  auto check_cu = [&](const at::Tensor& cu, const char* what, int64_t total) {
    const int32_t* c = cu.data_ptr<int32_t>();
    bool ok = c[0] == 0 && c[S] == total;
    for (int64_t s = 0; s < S && ok; ++s) ok = c[s] <= c[s + 1];
    TORCH_CHECK_VALUE(ok, "flashlite: ", fn, ": ", what, " must start at 0, never decrease and end at ", total);
  };
  check_cu(cu_q, "cu_seqlens_q", q.size(2));
  check_cu(cu_k, "cu_seqlens_k", k.size(2));
  // The items: every tile of every sequence once, in order.
  auto check_items = [&](const at::Tensor& items, const at::Tensor& cu, int64_t block, const char* what) {
    const int32_t *c = cu.data_ptr<int32_t>(), *it = items.data_ptr<int32_t>();
    int64_t t = 0;
    bool ok = true;
    for (int64_t s = 0; s < S && ok; ++s) {
      const int64_t tiles = (int64_t(c[s + 1]) - c[s] + block - 1) / block;
      for (int64_t m = 0; m < tiles && ok; ++m, ++t) ok = t < items.size(0) && it[2 * t] == s && it[2 * t + 1] == m;
    }
    TORCH_CHECK_VALUE(ok && t == items.size(0), "flashlite: ", fn, ": ", what,
                      " must list (sequence, tile) for every tile of every sequence, in order (",
                      "flashlite.core.packed.packed_schedule), tiles of ", block);
  };
  check_items(*q_items, cu_q, block_m, "q_items");
  p.packed.q_items = q_items->data_ptr<int32_t>();
  p.packed.num_q_items = static_cast<int32_t>(q_items->size(0));
  if (given(k_items)) {
    check_int32(*k_items, "k_items", 2);
    check_items(*k_items, cu_k, block_n, "k_items");
    p.packed.k_items = k_items->data_ptr<int32_t>();
    p.packed.num_k_items = static_cast<int32_t>(k_items->size(0));
  }
  p.packed.cu_seqlens_q = cu_q.data_ptr<int32_t>();
  p.packed.cu_seqlens_k = cu_k.data_ptr<int32_t>();
  p.packed.num_sequences = static_cast<int32_t>(S);
  return true;
}

// A paged KV cache (params.h PagedKeys; flashlite/core/paged.py): block_table and cache_seqlens
// together or neither (contiguous keys: false). k, v are the page pool [num_pages, page_size, Hkv,
// D] viewed as [B, Hkv, num_pages·page_size, D]; block_table int32 [B, max_pages] (last dim
// contiguous), cache_seqlens int32 [B] contiguous, both on the CPU. Every value is checked (O(B +
// pages used) reads): seqlens in [0, 2^31), the table wide enough, the pages used in [0, num_pages).
inline bool set_paged_keys(AttentionParams& p, const at::Tensor& q, const at::Tensor& k,
                           const c10::optional<at::Tensor>& block_table,
                           const c10::optional<at::Tensor>& cache_seqlens, int64_t page_size, const char* fn) {
  auto given = [](const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); };
  if (!given(block_table) && !given(cache_seqlens)) return false;
  TORCH_CHECK_VALUE(given(block_table) && given(cache_seqlens), "flashlite: ", fn,
                    ": a paged cache needs block_table and cache_seqlens together (or neither)");
  TORCH_CHECK_VALUE(!p.packed.active(), "flashlite: ", fn, ": a packed batch cannot also be paged");
  TORCH_CHECK_VALUE(page_size > 0 && k.size(2) % page_size == 0, "flashlite: ", fn,
                    ": page_size must be positive and divide the pool's slot count k.size(2) = ", k.size(2), ", got ",
                    page_size);
  const at::Tensor& table = *block_table;
  const at::Tensor& seqlens = *cache_seqlens;
  TORCH_CHECK_VALUE(table.device().is_cpu() && table.scalar_type() == at::kInt && table.dim() == 2 &&
                        table.size(0) == q.size(0) && (table.size(1) <= 1 || table.stride(1) == 1),
                    "flashlite: ", fn, ": block_table must be an int32 CPU tensor [B, max_pages] = [", q.size(0),
                    ", max_pages] with a contiguous last dim, got ", table.scalar_type(), " ", table.sizes(), " on ",
                    table.device());
  TORCH_CHECK_VALUE(seqlens.device().is_cpu() && seqlens.scalar_type() == at::kInt && seqlens.dim() == 1 &&
                        seqlens.size(0) == q.size(0) && seqlens.is_contiguous(),
                    "flashlite: ", fn, ": cache_seqlens must be an int32 contiguous CPU tensor [B] = [", q.size(0),
                    "], got ", seqlens.scalar_type(), " ", seqlens.sizes(), " on ", seqlens.device());
  const int64_t num_pages = k.size(2) / page_size, width = table.size(1);
  const int32_t* lengths = seqlens.data_ptr<int32_t>();
  const int32_t* pages = table.data_ptr<int32_t>();
  for (int64_t b = 0; b < q.size(0); ++b) {
    TORCH_CHECK_VALUE(lengths[b] >= 0, "flashlite: ", fn, ": cache_seqlens[", b, "] = ", lengths[b], " is negative");
    const int64_t used = (int64_t(lengths[b]) + page_size - 1) / page_size;
    TORCH_CHECK_VALUE(used <= width, "flashlite: ", fn, ": block_table is too narrow: cache_seqlens[", b,
                      "] = ", lengths[b], " keys need ", used, " pages of ", page_size, ", the table has ", width);
    for (int64_t j = 0; j < used; ++j) {
      const int32_t page = pages[b * table.stride(0) + j];
      TORCH_CHECK_VALUE(page >= 0 && page < num_pages, "flashlite: ", fn, ": block_table[", b, ", ", j, "] = ", page,
                        " is not a page id in [0, ", num_pages, ")");
    }
  }
  p.paged.block_table = pages;
  p.paged.seqlens = lengths;
  p.paged.table_stride = table.stride(0);
  p.paged.page_size = static_cast<int32_t>(page_size);
  return true;
}

// The sequence count of a packed call (2-D ALiBi slopes have one row per sequence), else -1.
inline int64_t packed_sequences(const c10::optional<at::Tensor>& cu_seqlens_q) {
  return cu_seqlens_q.has_value() && cu_seqlens_q->defined() ? cu_seqlens_q->numel() - 1 : -1;
}

// Gather indices: int64 [B, Hkv|1, Nq, K] or [B, Hkv|1, K] (shared by every query), last dim
// contiguous, canonical (valid entries of a row distinct; the Python side sorts the rows and turns
// repeats into -1).
inline void set_indices(AttentionParams& p, const at::Tensor& indices, bool causal) {
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "flashlite: indices must be int64 (the Python side converts)");
  TORCH_CHECK_VALUE(indices.dim() == 3 || indices.dim() == 4, "flashlite: indices must be [B, Hkv|1, Nq, K] or [B, Hkv|1, K]");
  const bool per_query = indices.dim() == 4;
  TORCH_CHECK_VALUE(indices.size(0) == p.batch && (indices.size(1) == 1 || indices.size(1) == p.heads_kv) &&
                        (!per_query || indices.size(2) == p.seqlen_q) && indices.size(-1) >= 1 &&
                        indices.stride(-1) == 1,
                    "flashlite: indices must be [B, Hkv|1, Nq, K] or [B, Hkv|1, K] with a contiguous last dim");
  p.indices = indices.data_ptr<int64_t>();
  p.indices_stride_b = indices.stride(0);
  p.indices_stride_h = broadcast_stride(indices, 1);
  p.indices_stride_n = per_query ? indices.stride(2) : 0;
  p.top_k = static_cast<int32_t>(indices.size(-1));
  p.index_heads = static_cast<int32_t>(indices.size(1));
  p.causal = causal;
}

// The head mask of a gather call (AttentionParams::row_keep): uint8 (or bool) [B, Hq, Nq], any
// strides (0 where broadcast: a per-head mask is [B, Hq, 1] expanded), on q's device. None: every row.
inline void set_row_keep(AttentionParams& p, const c10::optional<at::Tensor>& row_keep, const at::Tensor& q,
                         const char* fn) {
  if (!row_keep.has_value() || !row_keep->defined()) return;
  const at::Tensor& t = *row_keep;
  TORCH_CHECK_VALUE((t.scalar_type() == at::kByte || t.scalar_type() == at::kBool) && t.dim() == 3 &&
                        t.size(0) == q.size(0) && t.size(1) == q.size(1) && t.size(2) == q.size(2) &&
                        t.device() == q.device(),
                    "flashlite: ", fn, ": row_keep must be a uint8 or bool tensor [B, Hq, Nq] = [", q.size(0), ", ",
                    q.size(1), ", ", q.size(2), "] on q's device (the head mask), got ", t.scalar_type(), " ",
                    t.sizes(), " on ", t.device());
  p.row_keep = static_cast<const uint8_t*>(t.data_ptr());
  p.keep_stride_b = t.size(0) == 1 ? 0 : t.stride(0);
  p.keep_stride_h = t.size(1) == 1 ? 0 : t.stride(1);
  p.keep_stride_n = t.size(2) == 1 ? 0 : t.stride(2);
}

// The gather backward's key -> slot index (after set_indices): key_offsets int64 contiguous
// [B*Hi*Nk + 1] (Hi = indices.size(1)) and key_slots int64 contiguous [E'] with E' >=
// key_offsets[-1], both on q's device; for key s = (b*Hi + hi)*Nk + j the slots i*K + t that
// select j are key_slots[key_offsets[s] .. key_offsets[s+1]), ascending. The entries are trusted
// (the Python side builds them); on CPU the offsets' first, last and order are checked too (one
// pass over B*Hi*Nk + 1 numbers, no device sync anywhere).
inline void set_key_index(BackwardParams& g, const AttentionParams& p, const at::Tensor& key_offsets,
                          const at::Tensor& key_slots, const at::Tensor& q) {
  const int64_t keys = int64_t(p.batch) * p.index_heads * p.seqlen_k;
  TORCH_CHECK_VALUE(key_offsets.scalar_type() == at::kLong && key_offsets.dim() == 1 && key_offsets.is_contiguous() &&
                        key_offsets.device() == q.device() && key_offsets.numel() == keys + 1,
                    "flashlite: key_offsets must be an int64 contiguous 1-D tensor [B*Hi*Nk + 1] = [", keys + 1,
                    "] on ", q.device(), " (B=", p.batch, ", Hi=indices.size(1)=", p.index_heads, ", Nk=", p.seqlen_k,
                    "; the top-k backward's key -> slot index, docs/native_abi.md), got ", key_offsets.scalar_type(),
                    " ", key_offsets.sizes(), key_offsets.is_contiguous() ? "" : " non-contiguous", " on ",
                    key_offsets.device());
  TORCH_CHECK_VALUE(key_slots.scalar_type() == at::kLong && key_slots.dim() == 1 && key_slots.is_contiguous() &&
                        key_slots.device() == q.device(),
                    "flashlite: key_slots must be an int64 contiguous 1-D tensor [E] on ", q.device(),
                    " (slots i*K + t per key, ascending, as key_offsets delimits them; docs/native_abi.md), got ",
                    key_slots.scalar_type(), " ", key_slots.sizes(), key_slots.is_contiguous() ? "" : " non-contiguous",
                    " on ", key_slots.device());
  const int64_t* offsets = key_offsets.data_ptr<int64_t>();
  if (key_offsets.is_cpu()) {
    bool ordered = offsets[0] == 0;
    for (int64_t s = 0; s < keys && ordered; ++s) ordered = offsets[s] <= offsets[s + 1];
    TORCH_CHECK_VALUE(ordered && offsets[keys] <= key_slots.numel() &&
                          offsets[keys] <= int64_t(p.batch) * p.index_heads * p.seqlen_q * p.top_k,
                      "flashlite: key_offsets must start at 0, never decrease and end at most at key_slots.numel() = ",
                      key_slots.numel(), " and at B*Hi*Nq*K (got ", offsets[0], " .. ", offsets[keys], ")");
  }
  g.key_offsets = offsets;
  g.key_slots = key_slots.data_ptr<int64_t>();
}

inline BackwardParams make_backward_params(const at::Tensor& grad_out, const at::Tensor& delta, const at::Tensor& dq,
                                           const at::Tensor& dk, const at::Tensor& dv, bool deterministic) {
  BackwardParams g;
  g.grad_out = grad_out.data_ptr();
  g.grad_out_strides = strides_of(grad_out);
  g.delta = delta.defined() ? delta.data_ptr<float>() : nullptr;
  g.dq = dq.data_ptr();
  g.dk = dk.data_ptr();
  g.dv = dv.data_ptr();
  g.dq_strides = strides_of(dq);
  g.dk_strides = strides_of(dk);
  g.dv_strides = strides_of(dv);
  g.deterministic = deterministic;
  return g;
}

// delta = Σ_d dO·O, float32 [B, Hq, Nq] contiguous.
inline at::Tensor softmax_delta(const at::Tensor& grad_out, const at::Tensor& out) {
  return (grad_out.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();
}

// Under FLASHLITE_POISON=1 (the test suite) outputs start as NaN, so an unwritten element shows.
inline void poison(std::initializer_list<at::Tensor> tensors) {
  const char* value = std::getenv("FLASHLITE_POISON");
  if (value == nullptr || std::string(value) != "1") return;
  for (const at::Tensor& t : tensors) t.fill_(std::numeric_limits<float>::quiet_NaN());
}

// A forward call: out like q, lse float32 [B, Hq, Nq] (both poisoned), and the parameters over
// q, k, v (checked, last dims contiguous) and them. alibi lives as long as the parameters use it.
struct ForwardCall {
  at::Tensor out, lse, alibi;
  AttentionParams params;
};

inline ForwardCall prepare_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const c10::optional<at::Tensor>& alibi_slopes, double scale, double softcap,
                                   int64_t alibi_rows = -1) {
  ForwardCall call;
  call.out = at::empty_like(q);
  call.lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  poison({call.out, call.lse});
  call.alibi = prepare_alibi(alibi_slopes, q, alibi_rows);
  call.params = make_params(q, k, v, call.out, call.lse, call.alibi, scale, softcap);
  return call;
}

// A backward call: dq, dk, dv like q, k, v (poisoned), the saved lse as float32, δ = Σ_d dO·O
// (float32 [B, Hq, Nq]), and the parameters over them (grad_out, q, k, v checked, last dims
// contiguous; out and lse shaped like q and [B, Hq, Nq]).
struct BackwardCall {
  at::Tensor dq, dk, dv, lse, delta, alibi;
  AttentionParams params;
  BackwardParams grads;
};

inline BackwardCall prepare_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                     const c10::optional<at::Tensor>& alibi_slopes, double scale, double softcap,
                                     bool deterministic, int64_t alibi_rows = -1, bool kernel_delta = false) {
  BackwardCall call;
  call.lse = lse.to(at::kFloat).contiguous();
  // kernel_delta (the CPU kernels): δ is left to the kernels (BackwardParams::out) where out reads
  // as grad_out does (same dtype, contiguous last dimension); else computed here.
  kernel_delta = kernel_delta && out.scalar_type() == grad_out.scalar_type() && out.stride(-1) == 1;
  if (!kernel_delta) call.delta = softmax_delta(grad_out, out);
  call.dq = at::empty_like(q);
  call.dk = at::empty_like(k);
  call.dv = at::empty_like(v);
  poison({call.dq, call.dk, call.dv});
  call.alibi = prepare_alibi(alibi_slopes, q, alibi_rows);
  call.params = make_params(q, k, v, at::Tensor(), call.lse, call.alibi, scale, softcap);
  call.grads = make_backward_params(grad_out, call.delta, call.dq, call.dk, call.dv, deterministic);
  if (kernel_delta) {
    call.grads.out = out.data_ptr();
    call.grads.out_strides = strides_of(out);
  }
  return call;
}

}  // namespace flashlite
