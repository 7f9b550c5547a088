// Grid sizes of the SIMT engine (host and device): how many 16-row blocks a problem has and how
// many 32-key steps a block walks at most, for the tile layout (TileRows, simt_tile.cuh) and the
// gather layout (GatherRows, simt_gather.cuh). The host planner sizes grids and key splits by them.
#pragma once

#include <cstdint>

#include "common/params.h"
#include "cuda/tiles.h"

namespace flashlite::cuda::detail {

// Tile engine: one block per 16 consecutive queries of one head.
FL_HD int64_t simt_tile_blocks(const AttentionParams& p) {
  return static_cast<int64_t>((p.seqlen_q + kSimtRows - 1) / kSimtRows) * p.batch * p.heads_q;
}
// Upper bound of the key tiles a block walks (the split heuristic).
FL_HD int64_t simt_tile_steps(const AttentionParams& p) { return (p.seqlen_k + p.block_n - 1) / p.block_n; }

// Gather engine, per (batch, KV head): per-query indices put the G query heads of one query in
// ⌈G/16⌉ blocks; indices shared by every query pack the Nq·G (query, head) rows in order.
FL_HD int64_t simt_gather_row_blocks(const AttentionParams& p) {
  const int G = p.heads_q / p.heads_kv;
  if (p.indices_stride_n != 0) return static_cast<int64_t>(p.seqlen_q) * ((G + kSimtRows - 1) / kSimtRows);
  return (static_cast<int64_t>(p.seqlen_q) * G + kSimtRows - 1) / kSimtRows;
}
FL_HD int64_t simt_gather_blocks(const AttentionParams& p) {
  return simt_gather_row_blocks(p) * p.batch * p.heads_kv;
}
FL_HD int64_t simt_gather_steps(const AttentionParams& p) { return (p.top_k + kSimtKeys - 1) / kSimtKeys; }

}  // namespace flashlite::cuda::detail
