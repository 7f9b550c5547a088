// Tile sizes, decode packing and split-key planning (plan.h).
#include "cuda/plan.h"

#include <algorithm>

#include "cuda/debug_env.h"
#include "cuda/simt_grid.h"
#include "cuda/tiles.h"
#include "cuda/validate.h"

namespace flashlite::cuda::detail {
namespace {

struct MmaSmem {
  size_t fwd = 0, kv1 = 0, q1 = 0;
};

bool mma_smem(int D, int bm, int bn, MmaSmem* out) {
#define FL_SMEM(d, m, n)                              \
  if (D == d && bm == m && bn == n) {                 \
    out->fwd = FwdTile<d, m, n>::kSmemBytes;          \
    out->kv1 = BwdTile<d, m, n>::kv_smem(1);          \
    out->q1 = BwdTile<d, m, n>::q_smem(1);            \
    return true;                                      \
  }
  FLASHLITE_MMA_TILES(FL_SMEM)
#undef FL_SMEM
  return false;
}

// The forward and (single-stage) backward kernels of a tensor-core shape fit the device.
bool mma_fits(int D, int bm, int bn, size_t limit) {
  MmaSmem s;
  return mma_smem(D, bm, bn, &s) && s.fwd <= limit && s.kv1 <= limit && s.q1 <= limit;
}

}  // namespace

void tile_config_for(const DeviceInfo& device, int head_dim, DType dtype, int block_size, int* block_m,
                     int* block_n) {
  if (dtype != DType::kFloat32 && !simt_only()) {
    const int D = mma_head_dim(head_dim);
    const size_t limit = device.smem_optin;
    int want_m = 0, want_n = 0;
    if (preferred_tiles(&want_m, &want_n) && mma_tile_supported(D, want_m, want_n) &&
        (block_size <= 0 || (block_size % want_m == 0 && block_size % want_n == 0)) &&
        mma_fits(D, want_m, want_n, limit)) {
      *block_m = want_m;
      *block_n = want_n;
      return;
    }
#define FL_PICK(d, m, n)                                                                                  \
  if (D == d && (block_size <= 0 || (block_size % m == 0 && block_size % n == 0)) && mma_fits(d, m, n, limit)) { \
    *block_m = m;                                                                                         \
    *block_n = n;                                                                                         \
    return;                                                                                               \
  }
    FLASHLITE_MMA_TILES(FL_PICK)
#undef FL_PICK
  }
  *block_m = kSimtRows;
  *block_n = (block_size <= 0 || block_size % 32 == 0) ? 32 : 16;
}

int choose_splits(int64_t blocks, int64_t max_steps, int sms) {
  if (blocks <= 0 || blocks >= sms || max_steps < 8 || no_decode()) return 1;
  int64_t s = (2 * static_cast<int64_t>(sms) + blocks - 1) / blocks;
  s = std::min<int64_t>(s, max_steps / 4);
  s = std::min<int64_t>(s, 128);
  return static_cast<int>(std::max<int64_t>(s, 1));
}

ForwardPlan plan_tile_forward(const AttentionParams& p, const DeviceInfo& device) {
  ForwardPlan plan;
  if (uses_mma(p)) {
    plan.mma = true;
    plan.D = mma_head_dim(p.head_dim);
    const int num_q_tiles = (p.seqlen_q + p.block_m - 1) / p.block_m;
    const ScheduleView& fs = p.forward_schedule;
    if (num_q_tiles == 1 && p.seqlen_q <= kDecodeRows && mma_tile_supported(plan.D, kDecodeRows, p.block_n) &&
        !no_decode()) {
      // Decode: (head, query) rows of one KV head's group share a block when the schedule is
      // the same for every head.
      const int G = p.heads_q / p.heads_kv;
      const bool head_shared = fs.count_stride_h == 0 && fs.tiles_stride_h == 0;
      int hpb = 1;
      if (head_shared)
        for (int d = G; d >= 1; --d)
          if (G % d == 0 && d * p.seqlen_q <= kDecodeRows) {
            hpb = d;
            break;
          }
      plan.kernel_bm = kDecodeRows;
      plan.heads_per_block = hpb;
      plan.blocks = static_cast<int64_t>(p.batch) * (p.heads_q / hpb);
    } else {
      plan.kernel_bm = p.block_m;
      plan.blocks = static_cast<int64_t>(num_q_tiles) * p.batch * p.heads_q;
    }
    plan.max_steps = (p.seqlen_k + p.block_n - 1) / p.block_n;
  } else {
    plan.blocks = simt_tile_blocks(p);
    plan.max_steps = simt_tile_steps(p);
  }
  // Head statistics are finished in the block that saw every key of a row: no split keys.
  plan.splits = p.row_stats ? 1 : choose_splits(plan.blocks, plan.max_steps, device.sms);
  return plan;
}

AttentionParams gather_view(const AttentionParams& p) {
  AttentionParams q = p;
  const int32_t big = p.seqlen_q + p.seqlen_k;  // "unbounded" band side
  q.window_left = big;
  q.window_right = p.causal ? 0 : big;
  return q;
}

ForwardPlan plan_gather_forward(const AttentionParams& p, const DeviceInfo& device) {
  ForwardPlan plan;
  plan.blocks = simt_gather_blocks(p);
  plan.max_steps = simt_gather_steps(p);
  plan.splits = p.row_stats ? 1 : choose_splits(plan.blocks, plan.max_steps, device.sms);  // as above
  return plan;
}

size_t split_bytes(const AttentionParams& p, int splits) {
  if (splits <= 1) return 0;
  const size_t rows = static_cast<size_t>(p.batch) * p.heads_q * p.seqlen_q;
  return static_cast<size_t>(splits) * rows * (static_cast<size_t>(p.head_dim) + 1) * sizeof(float);
}

SplitOutput split_output(const AttentionParams& p, int splits, void* workspace) {
  SplitOutput s;
  s.rows = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
  if (splits <= 1 || workspace == nullptr) return s;
  s.num_splits = splits;
  s.out = static_cast<float*>(workspace);
  s.lse = s.out + static_cast<int64_t>(splits) * s.rows * p.head_dim;
  return s;
}

}  // namespace flashlite::cuda::detail
