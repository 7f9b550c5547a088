// Environment switches of the CUDA backend, each read once (debugging and tuning on a GPU):
//   FLASHLITE_CUDA_SIMT_ONLY=1       tile_config picks SIMT tiles for every dtype (no tensor cores)
//   FLASHLITE_CUDA_NO_DECODE=1       no decode packing and no split keys (one block per tile)
//   FLASHLITE_CUDA_TILES=<m>x<n>     prefer that tensor-core shape where it is instantiated and fits
//   FLASHLITE_CUDA_WIDE_SLOTS=1      top-k per-key dK/dV with 64-bit slot division even when Nq·K < 2^32
//                                    (the path of huge problems, for tests)
#pragma once

namespace flashlite::cuda::detail {

bool simt_only();
bool no_decode();
bool wide_slots();
// The FLASHLITE_CUDA_TILES shape: true and (block_m, block_n) when it is set.
bool preferred_tiles(int* block_m, int* block_n);

}  // namespace flashlite::cuda::detail
