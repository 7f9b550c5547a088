// Tile shapes and shared-memory budgets of the CUDA kernels (host and device).
//
// Two kernel families:
//  * tensor-core ("MMA") tile engine, float16/bfloat16: head-dim templates 32/64/96/128/256
//    (a head_dim in between runs on the next template with masked columns), tiles
//    (block_m, block_n) per FLASHLITE_MMA_TILES below;
//  * SIMT engine (CUDA cores, every dtype): 16 query rows x up to 32 keys per step. It runs the
//    float32 tile engine, tiles that the MMA shapes cannot serve (block-sparse block_size 16/32,
//    devices with too little shared memory) and the top-k gather engine.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define FL_HD __host__ __device__ __forceinline__
#else
#define FL_HD inline
#endif

namespace flashlite {
namespace cuda {
namespace detail {

// ---------------------------------------------------------------------------------------------
// Tensor-core tile engine
// ---------------------------------------------------------------------------------------------
// Forward: one block per (query tile, head, batch); a warp owns MW blocks of 16 query rows (32
// rows for most 128-row tiles: every K/V fragment read from shared memory then serves two MMAs,
// halving the shared-memory traffic per MMA). Row pitch D + 8 elements (16 bytes of padding: the 8
// rows an ldmatrix reads fall in distinct banks).
// MW_ = 0: the default warp layout above. kStats: the head-statistics variant (FwdStatsTile).
template <int D_, int BM_, int BN_, int MW_ = 0, bool kStats_ = false>
struct FwdTileOf {
  static constexpr int D = D_, BM = BM_, BN = BN_;
  // (32 rows per warp fit in 255 registers without spills for D <= 64, and for D <= 128 with
  // 32-key tiles; the (128, 64) tiles of D = 96/128 run 16 rows per warp.)
  static constexpr int MW = MW_ > 0 ? MW_ : (BM >= 128 && D <= 128 && (D <= 64 || BN <= 32)) ? 2 : 1;
  static constexpr bool kStats = kStats_;
  static constexpr int kRowsPerWarp = 16 * MW;
  static constexpr int kWarps = BM / kRowsPerWarp;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kPitch = D + 8;
  static constexpr int kTile = BN * kPitch;    // one K or V tile, elements
  static constexpr int kStage = 2 * kTile;     // K then V
  static constexpr int kQ = BM * kPitch;
  // Q fragments stay in registers when they are few (and Q can be staged in K/V stage 1); else
  // they are re-read from shared memory.
  static constexpr bool kQInRegs = MW == 1 && D <= 128 && kQ <= kStage;
  static constexpr int kSmemElems = 2 * kStage + (kQInRegs ? 0 : kQ);
  static constexpr size_t kSmemBytes = static_cast<size_t>(kSmemElems) * 2;
  static_assert(D % 16 == 0 && BM % 16 == 0 && BN % 16 == 0, "tiles are multiples of the 16x16 MMA block");
  static_assert(!kQInRegs || kQ <= kStage, "Q is staged in K/V stage 1 before it moves to registers");
};
template <int D_, int BM_, int BN_>
struct FwdTile : FwdTileOf<D_, BM_, BN_> {};
// The forward with head statistics (AttentionParams::row_stats): the same tile and schedule, 16
// rows per warp (the running sums t, d, z of each row take registers that 32 rows per warp do not
// have); shared memory never exceeds FwdTile's (Q in registers where it can be staged).
template <int D_, int BM_, int BN_>
struct FwdStatsTile : FwdTileOf<D_, BM_, BN_, 1, true> {};

// Backward: dK/dV kernel (one block per key tile: warps own 16 key rows; D = 256 splits the dK/dV
// columns over two warps) and dQ kernel (one block per query tile, like the forward).
// kStats: the variant with the entropy's gradient (BwdStatsTile).
template <int D_, int BM_, int BN_, bool kStats_ = false>
struct BwdTileOf {
  static constexpr int D = D_, BM = BM_, BN = BN_;
  static constexpr bool kStats = kStats_;
  static constexpr int kPitch = D + 8;
  static constexpr int kDSplit = D > 128 ? 2 : 1;
  static constexpr int kKvWarps = (BN / 16) * kDSplit;
  static constexpr int kKvThreads = kKvWarps * 32;
  // Query rows per step of the dK/dV kernel (a schedule query tile is walked in such chunks).
  static constexpr int kChunkPref = D <= 64 ? 64 : (D <= 128 ? 32 : 16);
  static constexpr int kChunk = kChunkPref < BM ? kChunkPref : BM;
  static constexpr int kDsPitch = BN + 8;  // dS tile [chunk][BN] for the atomic dQ path
  static constexpr int kQWarps = BM / 16;
  static constexpr int kQThreads = kQWarps * 32;
  static_assert(BM % kChunk == 0, "query chunks tile the query tile");

  static constexpr size_t kv_smem(int stages) {
    return (2 * static_cast<size_t>(BN) * kPitch + stages * 2 * static_cast<size_t>(kChunk) * kPitch +
            static_cast<size_t>(kChunk) * kDsPitch) * 2 +
           stages * 2 * static_cast<size_t>(kChunk) * 4;
  }
  static constexpr size_t q_smem(int stages) {
    return (2 * static_cast<size_t>(BM) * kPitch + stages * 2 * static_cast<size_t>(BN) * kPitch) * 2;
  }
};
template <int D_, int BM_, int BN_>
struct BwdTile : BwdTileOf<D_, BM_, BN_> {};
// The backward with the entropy's gradient (BackwardParams::entropy): same tiles; the dK/dV
// kernel's launch adds 2·stages·kChunk floats (g, shift) past kv_smem.
template <int D_, int BM_, int BN_>
struct BwdStatsTile : BwdTileOf<D_, BM_, BN_, true> {};

// Smallest head-dim template >= head_dim (0 if head_dim > 256).
FL_HD constexpr int mma_head_dim(int head_dim) {
  return head_dim <= 32 ? 32 : head_dim <= 64 ? 64 : head_dim <= 96 ? 96 : head_dim <= 128 ? 128
                                                                                 : head_dim <= 256 ? 256 : 0;
}

// The head-dim templates of the tensor-core kernels (one launcher per template: engine_launchers.h).
#define FLASHLITE_MMA_HEAD_DIMS(X) X(32) X(64) X(96) X(128) X(256)

// The instantiated tensor-core shapes X(D, block_m, block_n), per head-dim template in order of
// preference: THE table of the tensor-core instantiations. tools/generate_instantiations.py writes
// the mma_*.cu files from it (tests/test_cuda_compile.py checks they match).
// FLASHLITE_CUDA_FEW_INSTANTIATIONS (compile tests only) keeps three of them.
#if defined(FLASHLITE_CUDA_FEW_INSTANTIATIONS)
#define FLASHLITE_MMA_TILES(X) X(64, 128, 64) X(64, 64, 64) X(256, 64, 32)
#else
#define FLASHLITE_MMA_TILES(X)                                                                       \
  X(32, 128, 64) X(32, 64, 64)                                                                       \
  X(64, 128, 64) X(64, 64, 64)                                                                       \
  X(96, 128, 32) X(96, 128, 64) X(96, 64, 64) X(96, 64, 32)                                          \
  X(128, 128, 32) X(128, 128, 64) X(128, 64, 64) X(128, 64, 32)                                      \
  X(256, 64, 32)
#endif

// The shapes with head-statistics kernels (FwdStatsTile, BwdStatsTile): every shape, except in the
// compile tests (FLASHLITE_CUDA_FEW_INSTANTIATIONS: one, float16 only (elem.cuh stats_kernels), for
// ptxas) and the CPU emulation (FLASHLITE_CUDA_EMULATION: the shape its statistics case runs), where the second set of
// kernels would double the compile time. A shape without them refuses a call with row_stats or
// entropy (cudaErrorInvalidValue, "no head-statistics kernel").
#if defined(FLASHLITE_CUDA_FEW_INSTANTIATIONS) || defined(FLASHLITE_CUDA_EMULATION)
#define FLASHLITE_MMA_STATS_TILES(X) X(64, 128, 64)
#else
#define FLASHLITE_MMA_STATS_TILES(X) FLASHLITE_MMA_TILES(X)
#endif

// Every shape's D is a head-dim template, and tiles are whole MMA blocks that fit the kernels.
#define FL_CHECK_TILE(d, bm, bn)                                                                        \
  static_assert(mma_head_dim(d) == d, "FLASHLITE_MMA_TILES: D must be a head-dim template");            \
  static_assert((bm == 64 || bm == 128) && (bn == 32 || bn == 64), "FLASHLITE_MMA_TILES: unsupported tile"); \
  static_assert(FwdTile<d, bm, bn>::kWarps >= 1 && BwdTile<d, bm, bn>::kQWarps >= 1, "no warps");
FLASHLITE_MMA_TILES(FL_CHECK_TILE)
#undef FL_CHECK_TILE

FL_HD bool mma_tile_supported(int D, int block_m, int block_n) {
#define FL_TILE_MATCH(d, bm, bn) \
  if (D == d && block_m == bm && block_n == bn) return true;
  FLASHLITE_MMA_TILES(FL_TILE_MATCH)
#undef FL_TILE_MATCH
  return false;
}

// Rows of the decode kernel (the forward kernel with (head, query) rows packed): block_m 64.
constexpr int kDecodeRows = 64;

// ---------------------------------------------------------------------------------------------
// SIMT engine
// ---------------------------------------------------------------------------------------------
constexpr int kSimtWarps = 4;
constexpr int kSimtRowsPerWarp = 4;
constexpr int kSimtRows = kSimtWarps * kSimtRowsPerWarp;  // 16 query rows per block
constexpr int kSimtKeys = 32;                              // keys per step (one per lane)
constexpr int kSimtThreads = kSimtWarps * 32;
constexpr int kSimtPPitch = kSimtKeys + 1;                 // p / dS scratch [16][33] floats

// Row pitch (elements) of a shared tile whose rows lane j reads as [j][d]: conflict-free when the
// pitch in 32-bit words is odd (float: odd elements; 16-bit: pairs are read, pitch/2 odd).
FL_HD int simt_pitch(int elem_bytes, int head_dim) {
  if (elem_bytes == 4) return head_dim % 2 == 0 ? head_dim + 1 : head_dim;
  int pitch = (head_dim + 1) / 2 * 2;
  if ((pitch / 2) % 2 == 0) pitch += 2;
  return pitch;
}

FL_HD size_t simt_forward_smem(int elem_bytes, int head_dim, int stages) {
  const size_t pitch = simt_pitch(elem_bytes, head_dim);
  return (kSimtRows + stages * 2 * kSimtKeys) * pitch * elem_bytes + stages * kSimtKeys * 4;
}
FL_HD size_t simt_rows_backward_smem(int elem_bytes, int head_dim, int stages) {
  const size_t pitch = simt_pitch(elem_bytes, head_dim);
  return (2 * kSimtRows + stages * 2 * kSimtKeys) * pitch * elem_bytes + stages * kSimtKeys * 4 +
         2 * kSimtRows * kSimtPPitch * 4;
}
FL_HD size_t simt_dkdv_smem(int elem_bytes, int head_dim) {
  const size_t pitch = simt_pitch(elem_bytes, head_dim);
  return (2 * kSimtRows + 2 * kSimtKeys) * pitch * elem_bytes + 2 * kSimtRows * kSimtPPitch * 4 +
         2 * kSimtRows * 4;
}

// Columns per lane of the SIMT kernels (a template: 2, 4 or 8 -> head_dim up to 64, 128, 256).
FL_HD int simt_cols_per_lane(int head_dim) { return head_dim <= 64 ? 2 : head_dim <= 128 ? 4 : 8; }

}  // namespace detail
}  // namespace cuda
}  // namespace flashlite
