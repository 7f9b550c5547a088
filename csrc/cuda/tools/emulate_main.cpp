// Runs flashlite's CUDA launchers (launch.h) on the CPU emulation (emulation.h) for one case
// described by files in a directory, so the kernel logic can be checked against the Python
// reference on a machine without a GPU. Built and driven by tests/test_cuda_compile.py:
//
//   g++ -std=c++20 -x c++ -DFLASHLITE_CUDA_EMULATION -I csrc -I <cuda>/include csrc/cuda/*.cu \
//       csrc/cuda/*.cpp (but bindings_cuda.cpp) csrc/cuda/tools/emulate_main.cpp -lcudart   (one object per file)
//   emulate <dir>
//
// <dir>/case.txt holds "key value..." lines: mode (config | tile_forward | tile_backward |
// gather_forward | gather_backward), dtype (0 f16, 1 bf16, 2 f32), B Hq Hkv Nq Nk D, scale,
// softcap, window_left, window_right, block_m, block_n, is_list, alibi (0, 1 = [Hq], 2 = [B,Hq]),
// pad (extra elements per row of q/k/v/out/grads, NaN-filled: unaligned rows), causal,
// deterministic, kv_tiles / kv_count / q_tiles / q_count / indices / key_offsets / key_slots shapes
// ("name_shape d0 d1 ..."; the top-k backward's inverse index as flashlite/core/gather_rows.py builds it),
// stats (1: the forward also fills row_stats, float32 [5, B, Hq, Nq] -> row_stats.bin) with
// sink_tokens, entropy (1: the backward reads entropy.bin, float32 [2, B, Hq, Nq]: g, g·(lse − H)).
// Inputs are raw little-endian arrays (<name>.bin, contiguous); outputs out/lse or dq/dk/dv .bin.
// mode config: reads head_dim, block_size and prints "block_m block_n" per dtype.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "common/params.h"
#include "cuda/launch.h"

using flashlite::AttentionParams;
using flashlite::BackwardParams;
using flashlite::DType;

namespace {

std::string g_dir;
std::map<std::string, std::vector<std::string>> g_case;

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "emulate: %s\n", what.c_str());
  std::exit(2);
}

long num(const std::string& key, long fallback = -1) {
  auto it = g_case.find(key);
  if (it == g_case.end() || it->second.empty()) {
    if (fallback == -1) die("case.txt lacks " + key);
    return fallback;
  }
  return std::stol(it->second[0]);
}
double real(const std::string& key) {
  auto it = g_case.find(key);
  if (it == g_case.end()) die("case.txt lacks " + key);
  return std::stod(it->second[0]);
}
std::vector<long> shape(const std::string& name) {
  std::vector<long> out;
  auto it = g_case.find(name + "_shape");
  if (it == g_case.end()) return out;
  for (const auto& v : it->second) out.push_back(std::stol(v));
  return out;
}

std::vector<unsigned char> read_file(const std::string& name, size_t bytes) {
  std::ifstream in(g_dir + "/" + name, std::ios::binary);
  if (!in) die("cannot read " + name);
  std::vector<unsigned char> data(bytes);
  in.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(bytes));
  if (static_cast<size_t>(in.gcount()) != bytes) die(name + " is shorter than expected");
  return data;
}

void write_file(const std::string& name, const void* data, size_t bytes) {
  std::ofstream out(g_dir + "/" + name, std::ios::binary);
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
}

// A [B, H, N, D] operand stored with row pitch D + pad, padding NaN-filled (0xFF bytes).
struct Operand {
  long B = 0, H = 0, N = 0, D = 0, pad = 0, elem = 0;
  std::vector<unsigned char> storage;
  void init(long b, long h, long n, long d, long pd, long e) {
    B = b, H = h, N = n, D = d, pad = pd, elem = e;
    storage.assign(static_cast<size_t>(B * H * N * (D + pad) * elem) + 64, 0xFF);
  }
  // Offset the base by one element when padded, so rows are not 16-byte aligned.
  unsigned char* base() { return storage.data() + (pad ? elem : 0); }
  flashlite::Strides3 strides() const {
    flashlite::Strides3 s;
    s.row = D + pad;
    s.head = N * s.row;
    s.batch = H * s.head;
    return s;
  }
  void load(const std::string& name) {
    const auto data = read_file(name, static_cast<size_t>(B * H * N * D * elem));
    for (long r = 0; r < B * H * N; ++r)
      std::memcpy(base() + r * (D + pad) * elem, data.data() + r * D * elem, static_cast<size_t>(D * elem));
  }
  void save(const std::string& name) {
    std::vector<unsigned char> data(static_cast<size_t>(B * H * N * D * elem));
    for (long r = 0; r < B * H * N; ++r)
      std::memcpy(data.data() + r * D * elem, base() + r * (D + pad) * elem, static_cast<size_t>(D * elem));
    write_file(name, data.data(), data.size());
  }
};

struct IntArray {
  std::vector<long> dims;
  std::vector<unsigned char> data;
  void load(const std::string& name, size_t elem) {
    dims = shape(name);
    if (dims.empty()) return;
    size_t n = 1;
    for (long d : dims) n *= static_cast<size_t>(d);
    data = read_file(name + ".bin", n * elem);
  }
  // Element stride of dim d (contiguous), 0 for a size-1 dim (broadcast).
  int64_t stride(size_t d) const {
    if (dims[d] == 1) return 0;
    int64_t s = 1;
    for (size_t k = d + 1; k < dims.size(); ++k) s *= dims[k];
    return s;
  }
};

flashlite::ScheduleView schedule(IntArray& tiles, IntArray& count, bool is_list) {
  flashlite::ScheduleView v;
  v.tiles = reinterpret_cast<const int32_t*>(tiles.data.data());
  v.count = reinterpret_cast<const int32_t*>(count.data.data());
  v.tiles_stride_b = tiles.stride(0);
  v.tiles_stride_h = tiles.stride(1);
  v.tiles_stride_row = tiles.dims[3];
  v.count_stride_b = count.stride(0);
  v.count_stride_h = count.stride(1);
  v.is_list = is_list;
  return v;
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) die(std::string(what) + " failed: " + flashlite::cuda::last_error_message());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) die("usage: emulate <case directory>");
  setenv("FLASHLITE_CUDA_ASSUME_DEVICE", "132:232448", 0);  // an H100, unless the caller says otherwise
  g_dir = argv[1];
  {
    std::ifstream in(g_dir + "/case.txt");
    if (!in) die("no case.txt in " + g_dir);
    std::string line;
    while (std::getline(in, line)) {
      std::istringstream words(line);
      std::string key, value;
      if (!(words >> key)) continue;
      while (words >> value) g_case[key].push_back(value);
    }
  }
  const std::string mode = g_case.count("mode") ? g_case["mode"][0] : "";
  if (mode == "config") {
    for (int dt = 0; dt < 3; ++dt) {
      int bm = 0, bn = 0;
      flashlite::cuda::tile_config(static_cast<int>(num("head_dim")), static_cast<DType>(dt),
                                   static_cast<int>(num("block_size", 0)), &bm, &bn);
      std::printf("%d %d\n", bm, bn);
    }
    return 0;
  }

  const DType dtype = static_cast<DType>(num("dtype"));
  const long elem = dtype == DType::kFloat32 ? 4 : 2;
  const long B = num("B"), Hq = num("Hq"), Hkv = num("Hkv"), Nq = num("Nq"), Nk = num("Nk"), D = num("D");
  const long pad = num("pad", 0);
  Operand q, k, v, out;
  q.init(B, Hq, Nq, D, pad, elem);
  k.init(B, Hkv, Nk, D, pad, elem);
  v.init(B, Hkv, Nk, D, pad, elem);
  out.init(B, Hq, Nq, D, pad, elem);
  q.load("q.bin");
  k.load("k.bin");
  v.load("v.bin");
  std::vector<float> lse(static_cast<size_t>(B * Hq * Nq), 0.f);

  AttentionParams p;
  p.dtype = dtype;
  p.q = q.base();
  p.k = k.base();
  p.v = v.base();
  p.out = out.base();
  p.lse = lse.data();
  p.q_strides = q.strides();
  p.k_strides = k.strides();
  p.v_strides = v.strides();
  p.out_strides = out.strides();
  p.batch = static_cast<int32_t>(B);
  p.heads_q = static_cast<int32_t>(Hq);
  p.heads_kv = static_cast<int32_t>(Hkv);
  p.seqlen_q = static_cast<int32_t>(Nq);
  p.seqlen_k = static_cast<int32_t>(Nk);
  p.head_dim = static_cast<int32_t>(D);
  p.scale = static_cast<float>(real("scale"));
  p.softcap = static_cast<float>(real("softcap"));
  std::vector<unsigned char> alibi;
  if (num("alibi", 0) > 0) {
    const long n = num("alibi") == 2 ? B * Hq : Hq;
    alibi = read_file("alibi.bin", static_cast<size_t>(n) * 4);
    p.alibi_slopes = reinterpret_cast<const float*>(alibi.data());
    p.alibi_stride_b = num("alibi") == 2 ? Hq : 0;
  }
  p.window_left = static_cast<int32_t>(num("window_left", 0));
  p.window_right = static_cast<int32_t>(num("window_right", 0));
  p.block_m = static_cast<int32_t>(num("block_m", 0));
  p.block_n = static_cast<int32_t>(num("block_n", 0));
  const bool is_list = num("is_list", 0) != 0;
  IntArray kv_tiles, kv_count, q_tiles, q_count, indices;
  kv_tiles.load("kv_tiles", 4);
  kv_count.load("kv_count", 4);
  q_tiles.load("q_tiles", 4);
  q_count.load("q_count", 4);
  if (!kv_tiles.dims.empty()) p.forward_schedule = schedule(kv_tiles, kv_count, is_list);
  if (!q_tiles.dims.empty()) p.backward_schedule = schedule(q_tiles, q_count, is_list);
  indices.load("indices", 8);
  if (!indices.dims.empty()) {
    const bool per_query = indices.dims.size() == 4;
    p.indices = reinterpret_cast<const int64_t*>(indices.data.data());
    p.indices_stride_b = indices.stride(0) ? indices.stride(0) : 0;
    if (indices.dims[0] == 1) {  // batch stride is only used with b = 0 then
      p.indices_stride_b = 0;
    }
    p.indices_stride_h = indices.stride(1);
    p.indices_stride_n = per_query ? indices.stride(2) : 0;
    p.top_k = static_cast<int32_t>(indices.dims.back());
    p.index_heads = static_cast<int32_t>(indices.dims[1]);
    p.causal = num("causal", 0) != 0;
  }

  const bool forward = mode == "tile_forward" || mode == "gather_forward";
  const bool gather = mode == "gather_forward" || mode == "gather_backward";
  std::vector<float> row_stats;
  if (forward && num("stats", 0) != 0) {  // NaN-filled: every element must be written
    row_stats.assign(static_cast<size_t>(5 * B * Hq * Nq), std::nanf(""));
    p.row_stats = row_stats.data();
    p.sink_tokens = static_cast<int32_t>(num("sink_tokens", 0));
  }
  if (forward) {
    const size_t ws_bytes = gather ? flashlite::cuda::gather_forward_workspace_bytes(p)
                                   : flashlite::cuda::tile_forward_workspace_bytes(p);
    std::vector<float> ws(ws_bytes / 4 + 1, -12345.f);
    void* ws_ptr = ws_bytes ? ws.data() : nullptr;
    check(gather ? flashlite::cuda::gather_forward(p, ws_ptr, nullptr) : flashlite::cuda::tile_forward(p, ws_ptr, nullptr),
          mode.c_str());
    out.save("out.bin");
    write_file("lse.bin", lse.data(), lse.size() * 4);
    if (!row_stats.empty()) write_file("row_stats.bin", row_stats.data(), row_stats.size() * 4);
    std::printf("splits_workspace_bytes %zu\n", ws_bytes);
    return 0;
  }

  // Backward: grad_out, out, lse, delta from files.
  Operand grad_out, dq, dk, dv;
  grad_out.init(B, Hq, Nq, D, pad, elem);
  grad_out.load("grad_out.bin");
  out.load("out.bin");
  const auto lse_in = read_file("lse.bin", lse.size() * 4);
  std::memcpy(lse.data(), lse_in.data(), lse_in.size());
  const auto delta = read_file("delta.bin", lse.size() * 4);
  dq.init(B, Hq, Nq, D, pad, elem);
  dk.init(B, Hkv, Nk, D, pad, elem);
  dv.init(B, Hkv, Nk, D, pad, elem);
  BackwardParams g;
  g.grad_out = grad_out.base();
  g.grad_out_strides = grad_out.strides();
  g.delta = reinterpret_cast<const float*>(delta.data());
  g.dq = dq.base();
  g.dk = dk.base();
  g.dv = dv.base();
  g.dq_strides = dq.strides();
  g.dk_strides = dk.strides();
  g.dv_strides = dv.strides();
  g.deterministic = num("deterministic", 1) != 0;
  std::vector<unsigned char> entropy;
  if (num("entropy", 0) != 0) {
    entropy = read_file("entropy.bin", 2 * lse.size() * 4);
    g.entropy = reinterpret_cast<const float*>(entropy.data());
  }
  IntArray key_offsets, key_slots;
  key_offsets.load("key_offsets", 8);
  key_slots.load("key_slots", 8);
  if (!key_offsets.dims.empty()) {
    g.key_offsets = reinterpret_cast<const int64_t*>(key_offsets.data.data());
    g.key_slots = reinterpret_cast<const int64_t*>(key_slots.data.data());
  }
  const size_t ws_bytes = g.deterministic ? 0
                          : gather        ? flashlite::cuda::gather_backward_workspace_bytes(p)
                                          : flashlite::cuda::tile_backward_workspace_bytes(p);
  std::vector<float> ws(ws_bytes / 4 + 1, -12345.f);
  void* ws_ptr = ws_bytes ? ws.data() : nullptr;
  check(gather ? flashlite::cuda::gather_backward(p, g, ws_ptr, nullptr)
               : flashlite::cuda::tile_backward(p, g, ws_ptr, nullptr),
        mode.c_str());
  dq.save("dq.bin");
  dk.save("dk.bin");
  dv.save("dv.bin");
  return 0;
}
