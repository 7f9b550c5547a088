// flashlite CPU kernels: the torch-free entry points (raw pointers + flashlite::AttentionParams).
//
// Every function parallelizes with OpenMP over independent work items (num_threads <= 0 means the
// OpenMP default) and is deterministic: each output element is written by one work item, and every
// sum runs in a fixed order, whatever the thread count.
#pragma once

#include <cstdint>
#include <vector>

#include "../common/params.h"

namespace flashlite {
namespace cpu {

// Tile sizes (block_m queries x block_n keys) for a head_dim/dtype; with block_size > 0 both
// divide it (a block-sparse layout's blocks are then made of whole tiles).
void tile_config(int head_dim, DType dtype, int block_size, int* block_m, int* block_n);

// Tile engine over params.forward_schedule: out, lse.
void tile_forward(const AttentionParams& params, int num_threads);
// dK/dV per key tile over params.backward_schedule, then dQ per query tile over the forward one.
// grads.delta must hold sum_d dO*O (float32 [B, Hq, Nq]).
void tile_backward(const AttentionParams& params, const BackwardParams& grads, int num_threads);

// Gather engine (top-k) over params.indices / top_k / causal: out, lse.
void gather_forward(const AttentionParams& params, int num_threads);
// dq per query row; dk/dv per key from the slots that selected it, in the order of the key -> slot
// index grads.key_offsets / key_slots (required; params.h and docs/native_abi.md give its form).
void gather_backward(const AttentionParams& params, const BackwardParams& grads, int num_threads);

// Attention dropout's random words as the kernels draw them (the active build's vector code):
// out[t] = Philox4x32-10 word 0 at counter start + t under seed, t < count (csrc/cpu/philox.h).
void dropout_words(uint64_t seed, uint64_t start, int64_t count, uint32_t* out);

// The instruction-set variant of the kernels in use ("avx512", "avx2", "default") and those this
// machine can run. set_isa picks one of them (false if it cannot run here).
const char* isa();
std::vector<const char*> available_isas();
bool set_isa(const char* name);

}  // namespace cpu
}  // namespace flashlite
