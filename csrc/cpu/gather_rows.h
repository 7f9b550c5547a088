// flashlite CPU: the top-k plan's two index tensors, built in C++ with the same elements as the
// torch builders in flashlite/core/gather_rows.py (canonical_rows, key_index). Torch-free; the
// binding (csrc/bindings.cpp: cpu_canonical_rows, cpu_key_index) checks and allocates.
//
// Layout of both: `blocks` = B·Hi lists of rows, each block either `seqlen_q` rows of `top_k`
// entries (per_query: indices [B, Hi, Nq, K]) or one row shared by every query ([B, Hi, K]);
// contiguous, row after row. Query i sits at p(i) = i + Nk − Nq. OpenMP (num_threads <= 0: the
// OpenMP default); every output element is written by one work item, so the result does not depend
// on the thread count.
#pragma once

#include <cstdint>

namespace flashlite {
namespace cpu {

// Canonical rows, int64, same layout as `indices`: per row, entries < 0, >= Nk and (per_query with
// causal) > p(i) become Nk, the row is sorted ascending, then every entry equal to its left
// neighbour and every Nk becomes -1. For a shared list `causal` is ignored (as in torch: the cut
// is per query, made by key_index). Element for element the output of canonical_rows. Rows of up
// to 4096 entries are sorted by a bitonic network, one row per vector lane (gather_rows.cpp).
void canonical_rows(const int32_t* indices, int64_t blocks, int64_t seqlen_q, int64_t seqlen_k, int64_t top_k,
                    bool per_query, bool causal, int64_t* rows, int num_threads);
void canonical_rows(const int64_t* indices, int64_t blocks, int64_t seqlen_q, int64_t seqlen_k, int64_t top_k,
                    bool per_query, bool causal, int64_t* rows, int num_threads);

// The inverse key index of canonical rows (a counting sort per block): key_offsets
// [blocks·Nk + 1], key_slots [blocks·Nq·K]. For key s = block·Nk + j the slots i·K + t with
// rows[..., i, t] == j (a shared list: rows[..., t] == j, for every i), and with causal j <= p(i),
// are key_slots[key_offsets[s] .. key_offsets[s+1]), ascending. The rest of key_slots (from
// key_offsets[blocks·Nk]) holds the other slots, block after block, ascending: the same tail as
// the torch builder's stable sort, so all of key_slots equals key_index's. Entries outside
// [0, Nk) select nothing (canonical rows hold only -1 and keys).
void key_index(const int64_t* rows, int64_t blocks, int64_t seqlen_q, int64_t seqlen_k, int64_t top_k,
               bool per_query, bool causal, int64_t* key_offsets, int64_t* key_slots, int num_threads);

}  // namespace cpu
}  // namespace flashlite
