// ctest: the CPU kernels (tile engine and gather engine, forward and backward) against a naive
// double-precision loop, on every instruction-set build this CPU runs. Torch-free.
//
// Naive math per (b, h, i):  s_j = cap·tanh(q·k_j·scale / cap) − slope·|p(i) − j| over visible j,
// P = softmax(s), out = Σ P_j v_j, lse = log Σ exp(s_j);  backward: dP_j = dO·v_j,
// δ = Σ_j P_j dP_j, dS_j = P_j (dP_j − δ)·(1 − tanh²)·scale, dq = Σ dS_j k_j, dk_j += dS_j q,
// dv_j += P_j dO. The gather backward's key -> slot index (CSR, docs/native_abi.md) is built here
// by a plain loop over (key, query, slot). Every backward also runs with 1 and 3 threads and must
// give the same bits.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "common/params.h"
#include "cpu/convert.h"
#include "cpu/kernels.h"
#include "cpu/peak.h"

using flashlite::AttentionParams;
using flashlite::BackwardParams;
using flashlite::DType;
using flashlite::ScheduleView;
using flashlite::Strides3;

namespace {

struct Case {
  const char* name;
  int B, Hq, Hkv, Nq, Nk, D;
  int window_left, window_right;  // -1 = unbounded
  float softcap;
  bool alibi;
  DType dtype;
  int top_k;  // > 0: gather engine with this many slots per query (causal = window_right == 0)
  bool one_index_head = false;  // gather: indices [B, 1, ...] shared by every KV head (else [B, Hkv, ...])
  bool shared_list = false;     // gather: one list per (b, index head), [B, Hi, K], for every query
};

uint64_t g_state = 0x9E3779B97F4A7C15ull;
double uniform() {  // [0, 1)
  g_state = g_state * 6364136223846793005ull + 1442695040888963407ull;
  return double(g_state >> 11) * (1.0 / 9007199254740992.0);
}
double normal() { return std::sqrt(-2.0 * std::log(1.0 - uniform())) * std::cos(6.283185307179586 * uniform()); }

// A tensor stored in `dtype` (16-bit payload or float32) plus its exact values as doubles.
struct Tensor {
  DType dtype;
  std::vector<float> f32;
  std::vector<uint16_t> f16;
  std::vector<double> value;
  void* data() { return dtype == DType::kFloat32 ? static_cast<void*>(f32.data()) : static_cast<void*>(f16.data()); }
  void fill_random(DType type, size_t n) {
    dtype = type;
    value.resize(n);
    f32.assign(type == DType::kFloat32 ? n : 0, 0.f);
    f16.assign(type == DType::kFloat32 ? 0 : n, 0);
    for (size_t i = 0; i < n; ++i) {
      const float x = static_cast<float>(normal());
      if (type == DType::kFloat32) {
        f32[i] = x;
        value[i] = x;
      } else if (type == DType::kFloat16) {
        f16[i] = flashlite::cpu::float_to_half(x);
        value[i] = flashlite::cpu::half_to_float(f16[i]);
      } else {
        f16[i] = flashlite::cpu::float_to_bf16(x);
        value[i] = flashlite::cpu::bf16_to_float(f16[i]);
      }
    }
  }
  void zeros(DType type, size_t n) {
    dtype = type;
    f32.assign(type == DType::kFloat32 ? n : 0, NAN);
    f16.assign(type == DType::kFloat32 ? 0 : n, 0x7e00);
  }
  double at(size_t i) const {
    if (dtype == DType::kFloat32) return f32[i];
    return dtype == DType::kFloat16 ? flashlite::cpu::half_to_float(f16[i]) : flashlite::cpu::bf16_to_float(f16[i]);
  }
};

Strides3 contiguous(int H, int N, int D) {
  Strides3 s;
  s.batch = int64_t(H) * N * D;
  s.head = int64_t(N) * D;
  s.row = D;
  return s;
}

// Range schedule of the band (as flashlite/schedule.py builds it): for each row tile of
// `row_block` rows, the column tiles holding a column r + low <= c <= r + high.
void band_ranges(int rows, int cols, int row_block, int col_block, int64_t low, int64_t high,
                 std::vector<int32_t>* first, std::vector<int32_t>* count) {
  for (int t = 0; t * row_block < rows; ++t) {
    const int64_t r0 = int64_t(t) * row_block, r1 = std::min<int64_t>(r0 + row_block, rows) - 1;
    const int64_t lo = std::max<int64_t>(r0 + low, 0), hi = std::min<int64_t>(r1 + high, cols - 1);
    first->push_back(hi >= lo ? int32_t(lo / col_block) : 0);
    count->push_back(hi >= lo ? int32_t(hi / col_block - lo / col_block + 1) : 0);
  }
}

ScheduleView range_view(const std::vector<int32_t>& first, const std::vector<int32_t>& count) {
  ScheduleView s;  // shared by every (b, h): broadcast strides 0
  s.tiles = first.data();
  s.count = count.data();
  s.tiles_stride_row = 1;
  return s;
}

double max_error(const Tensor& got, const std::vector<double>& want, double* scale) {
  double err = 0.0;
  *scale = 1.0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = got.at(i);
    err = std::isfinite(g) ? std::max(err, std::abs(g - want[i])) : INFINITY;
    *scale = std::max(*scale, std::abs(want[i]));
  }
  return err;
}

int run_case(const Case& c, const char* isa) {
  const int B = c.B, Hq = c.Hq, Hkv = c.Hkv, Nq = c.Nq, Nk = c.Nk, D = c.D, group = Hq / Hkv;
  const int64_t big = int64_t(Nq) + Nk;
  const int64_t wl = c.window_left < 0 ? big : c.window_left, wr = c.window_right < 0 ? big : c.window_right;
  const bool gather = c.top_k > 0;
  const bool causal = gather && c.window_right == 0;
  const float scale = 1.f / std::sqrt(float(D));
  Tensor q, k, v, dout;
  q.fill_random(c.dtype, size_t(B) * Hq * Nq * D);
  k.fill_random(c.dtype, size_t(B) * Hkv * Nk * D);
  v.fill_random(c.dtype, size_t(B) * Hkv * Nk * D);
  dout.fill_random(c.dtype, size_t(B) * Hq * Nq * D);
  std::vector<float> slopes(static_cast<size_t>(Hq));
  for (float& s : slopes) s = c.alibi ? float(0.5 * uniform()) : 0.f;
  // Gather indices [B, Hi, Nq | -, K]: distinct keys per list, sorted (canonical, as the Python
  // side passes them), some slots empty.
  const int Hi = c.one_index_head ? 1 : Hkv, lists = c.shared_list ? 1 : Nq, K = c.top_k;
  std::vector<int64_t> indices;
  if (gather) {
    for (int64_t r = 0; r < int64_t(B) * Hi * lists; ++r) {
      std::vector<int64_t> keys(static_cast<size_t>(Nk), 0);
      for (int j = 0; j < Nk; ++j) keys[size_t(j)] = j;
      for (int t = 0; t < c.top_k; ++t) {
        const int pick = t + int(uniform() * (Nk - t));
        std::swap(keys[size_t(t)], keys[size_t(pick)]);
        indices.push_back(uniform() < 0.2 ? -1 : keys[size_t(t)]);
      }
      std::sort(indices.end() - K, indices.end());
    }
  }
  auto index_list = [&](int b, int hi, int i) {
    return indices.data() + ((int64_t(b) * Hi + hi) * lists + (c.shared_list ? 0 : i)) * K;
  };
  auto visible = [&](int b, int h, int i, int j) {
    const int64_t pos = int64_t(i) + Nk - Nq;
    if (!gather) return j >= pos - wl && j <= pos + wr;
    if (causal && j > pos) return false;
    const int64_t* row = index_list(b, Hi == 1 ? 0 : h / group, i);
    for (int t = 0; t < K; ++t)
      if (row[t] == j) return true;
    return false;
  };

  // ---- naive reference ----
  const size_t q_size = size_t(B) * Hq * Nq * D, kv_size = size_t(B) * Hkv * Nk * D;
  std::vector<double> out_ref(q_size, 0.0), lse_ref(size_t(B) * Hq * Nq), dq_ref(q_size, 0.0), dk_ref(kv_size, 0.0),
      dv_ref(kv_size, 0.0);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h)
      for (int i = 0; i < Nq; ++i) {
        const int kh = h / group;
        const size_t qi = ((size_t(b) * Hq + h) * Nq + i) * D;
        std::vector<double> s(size_t(Nk), -INFINITY), chain(size_t(Nk), 1.0), p(size_t(Nk), 0.0);
        double m = -INFINITY;
        for (int j = 0; j < Nk; ++j) {
          if (!visible(b, h, i, j)) continue;
          const size_t kj = ((size_t(b) * Hkv + kh) * Nk + j) * D;
          double x = 0.0;
          for (int d = 0; d < D; ++d) x += q.value[qi + d] * k.value[kj + d];
          x *= scale;
          if (c.softcap != 0.f) {
            const double t = std::tanh(x / c.softcap);
            x = c.softcap * t;
            chain[size_t(j)] = 1.0 - t * t;
          }
          x -= slopes[size_t(h)] * std::abs(double(i + Nk - Nq - j));
          s[size_t(j)] = x;
          m = std::max(m, x);
        }
        double l = 0.0;
        for (int j = 0; j < Nk; ++j) l += (p[size_t(j)] = std::isfinite(s[size_t(j)]) ? std::exp(s[size_t(j)] - m) : 0.0);
        lse_ref[(size_t(b) * Hq + h) * Nq + i] = l > 0 ? m + std::log(l) : -INFINITY;
        if (l == 0) continue;
        double delta = 0.0;
        std::vector<double> dp(size_t(Nk), 0.0);
        for (int j = 0; j < Nk; ++j) {
          p[size_t(j)] /= l;
          const size_t vj = ((size_t(b) * Hkv + kh) * Nk + j) * D;
          for (int d = 0; d < D; ++d) {
            out_ref[qi + d] += p[size_t(j)] * v.value[vj + d];
            dp[size_t(j)] += dout.value[qi + d] * v.value[vj + d];
          }
          delta += p[size_t(j)] * dp[size_t(j)];
        }
        for (int j = 0; j < Nk; ++j) {
          if (p[size_t(j)] == 0.0) continue;
          const size_t kj = ((size_t(b) * Hkv + kh) * Nk + j) * D;
          const double ds = p[size_t(j)] * (dp[size_t(j)] - delta) * chain[size_t(j)] * scale;
          for (int d = 0; d < D; ++d) {
            dq_ref[qi + d] += ds * k.value[kj + d];
            dk_ref[kj + d] += ds * q.value[qi + d];
            dv_ref[kj + d] += p[size_t(j)] * dout.value[qi + d];
          }
        }
      }

  // ---- kernels ----
  Tensor out, dq, dk, dv;
  out.zeros(c.dtype, q_size);
  dq.zeros(c.dtype, q_size);
  dk.zeros(c.dtype, kv_size);
  dv.zeros(c.dtype, kv_size);
  std::vector<float> lse(size_t(B) * Hq * Nq, NAN);
  AttentionParams p;
  p.dtype = c.dtype;
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.data();
  p.lse = lse.data();
  p.q_strides = p.out_strides = contiguous(Hq, Nq, D);
  p.k_strides = p.v_strides = contiguous(Hkv, Nk, D);
  p.batch = B;
  p.heads_q = Hq;
  p.heads_kv = Hkv;
  p.seqlen_q = Nq;
  p.seqlen_k = Nk;
  p.head_dim = D;
  p.scale = scale;
  p.softcap = c.softcap;
  p.alibi_slopes = c.alibi ? slopes.data() : nullptr;
  p.window_left = int32_t(wl);
  p.window_right = int32_t(wr);
  std::vector<int32_t> kv_first, kv_count, q_first, q_count;
  if (gather) {
    p.indices = indices.data();
    p.indices_stride_b = int64_t(Hi) * lists * K;
    p.indices_stride_h = Hi == 1 ? 0 : int64_t(lists) * K;
    p.indices_stride_n = c.shared_list ? 0 : K;
    p.top_k = K;
    p.index_heads = Hi;
    p.causal = causal;
    flashlite::cpu::gather_forward(p, 0);
  } else {
    int block_m = 0, block_n = 0;
    flashlite::cpu::tile_config(D, c.dtype, 0, &block_m, &block_n);
    p.block_m = block_m;
    p.block_n = block_n;
    const int64_t shift = int64_t(Nk) - Nq;
    band_ranges(Nq, Nk, block_m, block_n, shift - wl, shift + wr, &kv_first, &kv_count);
    band_ranges(Nk, Nq, block_n, block_m, -shift - wr, -shift + wl, &q_first, &q_count);
    p.forward_schedule = range_view(kv_first, kv_count);
    p.backward_schedule = range_view(q_first, q_count);
    flashlite::cpu::tile_forward(p, 0);
  }
  // δ from the kernel's own output, as the binding computes it.
  std::vector<float> delta(size_t(B) * Hq * Nq, 0.f);
  for (size_t r = 0; r < delta.size(); ++r)
    for (int d = 0; d < D; ++d) delta[r] += float(dout.value[r * D + d] * out.at(r * D + d));
  BackwardParams g;
  g.grad_out = dout.data();
  g.grad_out_strides = p.q_strides;
  g.delta = delta.data();
  g.dq = dq.data();
  g.dk = dk.data();
  g.dv = dv.data();
  g.dq_strides = p.q_strides;
  g.dk_strides = g.dv_strides = p.k_strides;
  // The key -> slot index: for key s = (b·Hi + hi)·Nk + j, the slots i·K + t whose index is j
  // (valid: causal hides j > p(i)), ascending.
  std::vector<int64_t> key_offsets(1, 0), key_slots;
  if (gather) {
    for (int b = 0; b < B; ++b)
      for (int hi = 0; hi < Hi; ++hi)
        for (int j = 0; j < Nk; ++j) {
          for (int i = 0; i < Nq; ++i)
            for (int t = 0; t < K; ++t)
              if (index_list(b, hi, i)[t] == j && !(causal && j > i + Nk - Nq)) key_slots.push_back(int64_t(i) * K + t);
          key_offsets.push_back(int64_t(key_slots.size()));
        }
    key_slots.push_back(-1);  // a tail past key_offsets.back() is allowed and never read
    g.key_offsets = key_offsets.data();
    g.key_slots = key_slots.data();
  }
  auto backward = [&](int threads) {
    if (gather) {
      flashlite::cpu::gather_backward(p, g, threads);
    } else {
      flashlite::cpu::tile_backward(p, g, threads);
    }
  };
  // δ given (as the CUDA binding passes it), then left to the kernels (g.out; the CPU binding) on
  // 1 and 3 threads: both against the reference, the last two bit for bit.
  backward(2);
  const Tensor dq_given = dq, dk_given = dk, dv_given = dv;
  g.delta = nullptr;
  g.out = out.data();
  g.out_strides = p.out_strides;
  backward(1);
  const Tensor dq1 = dq, dk1 = dk, dv1 = dv;
  backward(3);

  // ---- compare: float32 to 2e-5, 16-bit types to the output rounding (relative to the largest value) ----
  const double tol = c.dtype == DType::kFloat32 ? 2e-5 : (c.dtype == DType::kFloat16 ? 2e-3 : 1.6e-2);
  int failures = 0;
  auto check = [&](const char* what, const Tensor& got, const std::vector<double>& want) {
    double magnitude = 1.0;
    const double err = max_error(got, want, &magnitude);
    if (!(err <= tol * magnitude)) {
      std::printf("FAIL [%s] %s %s: max error %.3g > %.3g\n", isa, c.name, what, err, tol * magnitude);
      ++failures;
    }
  };
  Tensor lse_t;
  lse_t.dtype = DType::kFloat32;
  lse_t.f32 = lse;
  std::vector<double> lse_want = lse_ref;
  for (size_t r = 0; r < lse_want.size(); ++r)  // −inf rows must match exactly; compare the rest
    if (std::isinf(lse_want[r]) && std::isinf(lse_t.f32[r]) && lse_t.f32[r] < 0) lse_want[r] = lse_t.f32[r] = 0.f;
  check("out", out, out_ref);
  check("lse", lse_t, lse_want);
  check("dq (delta given)", dq_given, dq_ref);
  check("dk (delta given)", dk_given, dk_ref);
  check("dv (delta given)", dv_given, dv_ref);
  check("dq", dq, dq_ref);
  check("dk", dk, dk_ref);
  check("dv", dv, dv_ref);
  auto same_bits = [&](const char* what, const Tensor& a, const Tensor& b) {
    const bool same = a.dtype == DType::kFloat32
                          ? std::memcmp(a.f32.data(), b.f32.data(), a.f32.size() * sizeof(float)) == 0
                          : std::memcmp(a.f16.data(), b.f16.data(), a.f16.size() * sizeof(uint16_t)) == 0;
    if (!same) {
      std::printf("FAIL [%s] %s %s: 1 and 3 threads differ\n", isa, c.name, what);
      ++failures;
    }
  };
  same_bits("dq", dq1, dq);
  same_bits("dk", dk1, dk);
  same_bits("dv", dv1, dv);
  return failures;
}

}  // namespace

int main() {
  const Case cases[] = {
      {"full f32 GQA odd sizes", 2, 4, 2, 37, 53, 64, -1, -1, 0.f, false, DType::kFloat32, 0},
      {"causal f32 Nq>Nk (empty rows)", 1, 2, 1, 70, 33, 40, -1, 0, 0.f, false, DType::kFloat32, 0},
      {"window f16 softcap alibi", 1, 3, 3, 81, 90, 59, 9, 4, 5.f, true, DType::kFloat16, 0},
      {"causal bf16 decode", 2, 4, 1, 1, 130, 64, -1, 0, 0.f, true, DType::kBFloat16, 0},
      {"topk f32 GQA", 1, 4, 2, 29, 47, 64, -1, -1, 0.f, false, DType::kFloat32, 7},
      {"topk causal f16 softcap", 1, 2, 1, 33, 33, 59, -1, 0, 4.f, true, DType::kFloat16, 5},
      {"topk causal bf16 GQA one index head", 2, 4, 2, 37, 53, 40, -1, 0, 0.f, false, DType::kBFloat16, 9, true},
      {"topk f32 GQA shared list", 1, 6, 2, 37, 53, 40, -1, -1, 0.f, true, DType::kFloat32, 11, false, true},
      {"topk causal f32 shared list one head Nq<Nk", 2, 4, 4, 21, 53, 64, -1, 0, 3.f, false, DType::kFloat32, 16,
       true, true},
      // Odd shapes (also what `make sanitize` runs under ASan/UBSan): head dims 1, 17 and 256, one key,
      // a diagonal-only band, tiles with one-row tails, a decode split over many keys, K = 1 (a fifth of
      // the rows empty), K past two vector widths.
      {"full f32 D1 one key", 1, 2, 1, 5, 1, 1, -1, -1, 0.f, false, DType::kFloat32, 0},
      {"window f32 D17 diagonal only tails", 1, 2, 2, 129, 129, 17, 0, 0, 0.f, true, DType::kFloat32, 0},
      {"causal bf16 D256 GQA tail", 1, 4, 1, 65, 65, 256, -1, 0, 2.f, false, DType::kBFloat16, 0},
      {"causal f16 decode split keys", 1, 8, 2, 3, 1500, 64, -1, 0, 0.f, false, DType::kFloat16, 0},
      {"topk f16 D3 K1", 2, 2, 1, 19, 7, 3, -1, -1, 0.f, false, DType::kFloat16, 1},
      {"topk causal f32 D256 K33 GQA", 1, 4, 2, 40, 70, 256, -1, 0, 0.f, true, DType::kFloat32, 33},
  };
  int failures = 0, runs = 0;
  for (const char* isa : flashlite::cpu::available_isas()) {
    flashlite::cpu::set_isa(isa);
    for (const Case& c : cases) {
      failures += run_case(c, isa);
      ++runs;
    }
  }
  // The peaks of `flashlite bench --peak` (csrc/cpu/peak.h): they run and give a positive rate.
  for (const char* isa : flashlite::cpu::available_isas()) {
    flashlite::cpu::PeakResult r;
    if (!flashlite::cpu::fma_peak(isa, 2, 0.0, &r) || !(r.best > 0) || r.trials < 3 || r.threads != 2) {
      std::printf("FAIL fma_peak %s: %g GFLOP/s, %d trials\n", isa, r.best, r.trials);
      ++failures;
    }
  }
  flashlite::cpu::PeakResult copy;
  flashlite::cpu::stream_copy(2, 3 << 20, 0.0, &copy);
  flashlite::cpu::PeakResult none;
  if (!(copy.best > 0) || copy.work_per_trial != 2 * 2 * (4 << 20) || flashlite::cpu::fma_peak("nonsense", 1, 0.0, &none)) {
    std::printf("FAIL stream_copy %g GB/s / fma_peak accepted an unknown build\n", copy.best);
    ++failures;
  }
  std::printf("%s: %d case runs, %d failures\n", failures ? "FAILED" : "passed", runs, failures);
  return failures ? 1 : 0;
}
