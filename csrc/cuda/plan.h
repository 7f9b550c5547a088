// Planning of a launch (host): tile sizes for a device (tile_config), and for a forward which kernel
// family runs, whether decode rows pack the heads of a GQA group into one block, and how many
// splits of the keys run in parallel (Flash-Decoding) with the workspace they write.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/params.h"
#include "cuda/device_props.h"
#include "cuda/kernel_args.cuh"

namespace flashlite::cuda::detail {

// (block_m, block_n) of the tile engine on a device with these properties (launch.h tile_config).
void tile_config_for(const DeviceInfo& device, int head_dim, DType dtype, int block_size, int* block_m,
                     int* block_n);

struct ForwardPlan {
  bool mma = false;
  int D = 0;                // head-dim template (MMA)
  int kernel_bm = 0;        // block_m of the launched MMA kernel (64 when packed)
  int heads_per_block = 0;  // > 0: packed decode layout
  int64_t blocks = 0;       // blocks per split
  int64_t max_steps = 0;    // upper bound of key steps per block
  int splits = 1;
};

// Split the keys only when the grid is less than one wave and every split keeps >= 4 steps.
int choose_splits(int64_t blocks, int64_t max_steps, int sms);

ForwardPlan plan_tile_forward(const AttentionParams& p, const DeviceInfo& device);
ForwardPlan plan_gather_forward(const AttentionParams& p, const DeviceInfo& device);

// The gather engine's band: every key (left), none after p(i) when causal (right).
AttentionParams gather_view(const AttentionParams& p);

// Split-key partials: fp32 out [splits, rows, head_dim] then lse [splits, rows] (0 bytes: no split).
size_t split_bytes(const AttentionParams& p, int splits);
SplitOutput split_output(const AttentionParams& p, int splits, void* workspace);

}  // namespace flashlite::cuda::detail
