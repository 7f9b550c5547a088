"""The CUDA sources compile on a machine without a GPU (DESIGN.md: "CUDA sources compile with nvcc
(sm_80 and sm_90a) in the test suite, even where nothing runs them").

* every ``csrc/cuda/*.cu`` compiles with the local nvcc for sm_90a (and sm_80 with
  ``FLASHLITE_CUDA_TESTS=full``, which also runs every emulation case) with ``-I csrc`` only,
  i.e. without torch headers (the kernels are torch-free). ptxas runs, so the inline PTX
  (mma.sync, ldmatrix, cp.async) is checked too. To stay within the CI budget the tensor-core
  and SIMT templates are compiled with ``-DFLASHLITE_CUDA_FEW_INSTANTIATIONS`` (every kernel,
  both 16-bit dtypes, a subset of the head-dim/tile shapes); the full set is built by setup.py;
  the host-only ``csrc/cuda/*.cpp`` (planning, checks, dispatch) compile with g++, torch-free;
* ptxas's registers, spills, stack and shared memory of the kernels compiled here stay within the
  budget of ``csrc/cuda/ptxas_budget.json`` (``csrc/cuda/tools/ptxas_report.py`` prints the table
  of every instantiation);
* the generated instantiation files (``mma_*.cu``, ``simt_*.cu``) match ``tiles.h``
  (``csrc/cuda/tools/generate_instantiations.py --check``);
* ``csrc/cuda/bindings_cuda.cpp`` (torch + CUDA runtime headers) passes ``g++ -fsyntax-only``
  against torch's include dirs when the CUDA runtime headers are installed;
* the host-side planner (``csrc/cuda/*.cpp``: tile sizes per device, decode packing, split-key
  counts, error messages) runs on the CPU against stub kernels, for an assumed H100 and an
  assumed sm_86 card;
* the kernels themselves run on a CPU emulation of CUDA (``csrc/cuda/emulation.h``: the real
  kernel code built with g++, threads as fibers, ldmatrix/mma.sync/shuffles emulated by their PTX
  fragment layouts, cp.async landing early or late at random, adversarial scheduling) and are
  checked by DESIGN.md's rule against ``flashlite.reference``, forward and backward, for every
  kernel family (tensor-core tiles, decode packing + split keys, SIMT, top-k gather, atomic and
  deterministic backward).

Skipped, with the reason, where nvcc (or the headers) are missing.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CUDA_DIR = CSRC / "cuda"
ALL_CU_SOURCES = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
# Host-only sources of the launchers (no device code; g++ builds them in setup.py too).
HOST_SOURCES = sorted(p.name for p in CUDA_DIR.glob("*.cpp") if p.name != "bindings_cuda.cpp")
# The default run (CI: 2 cores) compiles for sm_90a, the GPUs flashlite is measured on, and emulates
# the core cases (one or two per kernel family); FLASHLITE_CUDA_TESTS=full adds sm_80 and every
# emulation case: about twice the CPU time.
FULL = os.environ.get("FLASHLITE_CUDA_TESTS") == "full"
ARCHS = ["sm_80", "sm_90a"] if FULL else ["sm_90a"]
# ... and one source per kernel family (each family's templates at one dtype and head-dim bucket; the
# generated instantiation files differ only in those arguments; with FLASHLITE_CUDA_FEW_INSTANTIATIONS
# the tensor-core files hold kernels at D = 64 and 256 only); FULL compiles every source.
CORE_CU_SOURCES = ("mma_forward_f16_d32_64.cu", "mma_forward_bf16_d256.cu", "mma_backward_bf16_d32_64.cu",
                   "simt_tile_f32.cu", "simt_gather_bf16.cu", "utility_kernels.cu")
CU_SOURCES = [s for s in ALL_CU_SOURCES if FULL or s in CORE_CU_SOURCES]
# Host code at -O0: the device code is optimized all the same (cicc, ptxas -O3; the ptxas numbers are
# identical to -O2), and each run takes ~20% less CPU.
NVCC_FLAGS = ["-std=c++17", "-O0", "-c", f"-I{CSRC}", "-DFLASHLITE_CUDA_FEW_INSTANTIATIONS", "-Xptxas", "-v"]
TIMEOUT = 900
BUDGET = CUDA_DIR / "ptxas_budget.json"


def _tool(name: str):
    """A module of csrc/cuda/tools (ptxas_report, generate_instantiations)."""
    spec = importlib.util.spec_from_file_location(name, CUDA_DIR / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _find_nvcc() -> str | None:
    candidates = [shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    candidates += sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), reverse=True)
    return next((c for c in candidates if c and os.path.exists(c)), None)


def _find_cuda_include() -> str | None:
    """A directory holding cuda_runtime.h (CUDA_HOME, /usr/local/cuda*, next to nvcc)."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    roots += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    if NVCC:
        roots.append(str(Path(NVCC).resolve().parents[1]))
    for root in roots:
        if root and os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return os.path.join(root, "include")
    return None


def _cuda_build_present() -> bool:
    """flashlite._C was built with the CUDA kernels here (a GPU machine): setup.py has compiled every
    source with every instantiation, so the compile-only checks would only repeat it."""
    try:
        import torch

        if not torch.cuda.is_available():
            return False
        from flashlite import _C
    except Exception:  # noqa: BLE001 - any import problem means "no build to rely on"
        return False
    return hasattr(_C, "cuda_tile_forward")


NVCC = _find_nvcc()
CUDA_BUILD_PRESENT = _cuda_build_present()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolkit on this machine)")
skip_if_built = pytest.mark.skipif(CUDA_BUILD_PRESENT, reason="flashlite._C was built with these CUDA sources here")

# The planner test: the host files (dispatch, plan, ...) and utility_kernels.cu linked with stub
# engine launchers that record what they were asked.
PLANNER_DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include "cuda/engine_launchers.h"
#include "cuda/launch.h"

using namespace flashlite;
namespace flashlite { namespace cuda { namespace detail {
template <typename T, int D> cudaError_t mma_forward_hd(const ForwardArgs& a, int bm, int bn, int64_t blocks,
                                                        cudaStream_t) {
  std::printf("LAUNCH mma_forward D=%d bm=%d bn=%d blocks=%lld splits=%d hpb=%d aligned16=%d\n", D, bm, bn,
              (long long)blocks, a.split.num_splits, a.heads_per_block, (int)a.aligned16);
  return cudaSuccess;
}
template <typename T, int D> cudaError_t mma_backward_hd(const BackwardArgs& a, int bm, int bn, size_t,
                                                         cudaStream_t) {
  std::printf("LAUNCH mma_backward D=%d bm=%d bn=%d atomic=%d\n", D, bm, bn, a.dq_accum != nullptr);
  return cudaSuccess;
}
template <typename T> cudaError_t simt_tile_forward(ForwardArgs a, size_t, cudaStream_t) {
  std::printf("LAUNCH simt_tile_forward splits=%d\n", a.split.num_splits); return cudaSuccess; }
template <typename T> cudaError_t simt_gather_forward(ForwardArgs a, size_t, cudaStream_t) {
  std::printf("LAUNCH simt_gather_forward splits=%d window=%d,%d\n", a.split.num_splits, a.p.window_left,
              a.p.window_right); return cudaSuccess; }
template <typename T> cudaError_t simt_tile_backward(BackwardArgs, size_t, cudaStream_t) {
  std::printf("LAUNCH simt_tile_backward\n"); return cudaSuccess; }
template <typename T> cudaError_t simt_gather_backward(BackwardArgs a, size_t, cudaStream_t) {
  std::printf("LAUNCH simt_gather_backward atomic=%d\n", a.dk_accum != nullptr); return cudaSuccess; }
#define INST_D(T, d) \
  template cudaError_t mma_forward_hd<T, d>(const ForwardArgs&, int, int, int64_t, cudaStream_t); \
  template cudaError_t mma_backward_hd<T, d>(const BackwardArgs&, int, int, size_t, cudaStream_t);
#define INST_F16(d) INST_D(__half, d)
#define INST_BF16(d) INST_D(__nv_bfloat16, d)
FLASHLITE_MMA_HEAD_DIMS(INST_F16)
FLASHLITE_MMA_HEAD_DIMS(INST_BF16)
#define INST(T) \
  template cudaError_t simt_tile_forward<T>(ForwardArgs, size_t, cudaStream_t); \
  template cudaError_t simt_gather_forward<T>(ForwardArgs, size_t, cudaStream_t); \
  template cudaError_t simt_tile_backward<T>(BackwardArgs, size_t, cudaStream_t); \
  template cudaError_t simt_gather_backward<T>(BackwardArgs, size_t, cudaStream_t);
INST(__half) INST(__nv_bfloat16) INST(float)
}}}

static int32_t fake_i32[8];
static float fake_f32[8];
static char fake_data[64] __attribute__((aligned(16)));

AttentionParams problem(DType dtype, int B, int Hq, int Hkv, int Nq, int Nk, int D, int bm, int bn, bool head_sched) {
  AttentionParams p;
  p.dtype = dtype; p.q = p.k = p.v = fake_data; p.out = fake_data; p.lse = fake_f32;
  p.batch = B; p.heads_q = Hq; p.heads_kv = Hkv; p.seqlen_q = Nq; p.seqlen_k = Nk; p.head_dim = D;
  const int e = dtype == DType::kFloat32 ? 4 : 2;
  (void)e;
  p.q_strides = {(int64_t)Hq * Nq * D, (int64_t)Nq * D, D};
  p.k_strides = p.v_strides = {(int64_t)Hkv * Nk * D, (int64_t)Nk * D, D};
  p.out_strides = p.q_strides;
  p.block_m = bm; p.block_n = bn; p.window_left = p.window_right = Nq + Nk;
  p.forward_schedule.tiles = fake_i32; p.forward_schedule.count = fake_i32;
  p.backward_schedule.tiles = fake_i32; p.backward_schedule.count = fake_i32;
  p.forward_schedule.count_stride_h = head_sched ? 1 : 0;
  return p;
}

void run(const char* name, cudaError_t err) {
  std::printf("RESULT %s err=%d msg=%s\n", name, (int)err, err ? cuda::last_error_message() : "");
}

int main() {
  const DType f16 = DType::kFloat16, bf16 = DType::kBFloat16, f32 = DType::kFloat32;
  for (DType dt : {f16, bf16, f32})
    for (int d : {8, 32, 40, 59, 64, 80, 96, 128, 160, 256})
      for (int bs : {0, 16, 32, 64, 128}) {
        int bm = 0, bn = 0;
        cuda::tile_config(d, dt, bs, &bm, &bn);
        std::printf("CONFIG dtype=%d d=%d bs=%d bm=%d bn=%d\n", (int)dt, d, bs, bm, bn);
        int dm = 0, dn = 0;  // device 0 explicitly: no device here, so the assumed one as well
        cuda::tile_config(d, dt, bs, 0, &dm, &dn);
        if (dm != bm || dn != bn) std::printf("DEVICE_CONFIG_MISMATCH d=%d bs=%d\n", d, bs);
      }
  // Decode, GQA 32/4, 64k keys, shared schedule: packed heads + split keys.
  AttentionParams dec = problem(f16, 2, 32, 4, 1, 65536, 128, 128, 32, false);
  std::printf("WORKSPACE decode=%zu\n", cuda::tile_forward_workspace_bytes(dec));
  run("decode_no_ws", cuda::tile_forward(dec, nullptr));
  // Per-head schedule: no head packing.
  AttentionParams dec_h = problem(bf16, 1, 8, 2, 3, 4096, 256, 64, 32, true);
  run("decode_head_sched", cuda::tile_forward(dec_h, nullptr));
  // Prefill: a full wave, no split.
  AttentionParams pre = problem(f16, 1, 8, 8, 4096, 4096, 128, 128, 64, false);
  std::printf("WORKSPACE prefill=%zu\n", cuda::tile_forward_workspace_bytes(pre));
  run("prefill", cuda::tile_forward(pre, nullptr));
  BackwardParams g;
  g.grad_out = g.dq = g.dk = g.dv = fake_data; g.delta = fake_f32;
  g.grad_out_strides = g.dq_strides = pre.q_strides; g.dk_strides = g.dv_strides = pre.k_strides;
  run("prefill_backward", cuda::tile_backward(pre, g, nullptr, nullptr));
  g.deterministic = false;
  run("prefill_backward_atomic", cuda::tile_backward(pre, g, fake_data, nullptr));
  AttentionParams simt = problem(f32, 1, 2, 1, 100, 100, 64, 16, 32, false);
  run("simt_forward", cuda::tile_forward(simt, nullptr));
  run("simt_backward", cuda::tile_backward(simt, g, nullptr, nullptr));
  // Unsupported tile shapes are refused with a reason.
  run("bad_tile", cuda::tile_forward(problem(f16, 1, 2, 1, 100, 100, 64, 32, 32, false), nullptr));
  run("bad_heads", cuda::tile_forward(problem(f16, 1, 3, 2, 100, 100, 64, 128, 64, false), nullptr));
  // Top-k decode: per-query indices, GQA 8, K = 2048.
  AttentionParams topk = problem(bf16, 1, 32, 4, 1, 65536, 128, 0, 0, false);
  static int64_t fake_idx[8];
  topk.indices = fake_idx; topk.top_k = 2048; topk.indices_stride_n = 2048; topk.causal = true;
  std::printf("WORKSPACE topk=%zu\n", cuda::gather_forward_workspace_bytes(topk));
  run("topk_forward", cuda::gather_forward(topk, nullptr));
  g.deterministic = true;
  run("topk_backward_no_csr", cuda::gather_backward(topk, g, nullptr, nullptr));
  return 0;
}
"""


def _nvcc_job(source: str, out_dir: Path) -> list[str]:
    """One nvcc run per source for both archs (one host pass, one device pass per arch; ptxas -v)."""
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]
    return [NVCC, *NVCC_FLAGS, *gencode, str(CUDA_DIR / source), "-o", str(out_dir / f"{source}.o")]


def _host_job(source: str, out_dir: Path) -> list[str] | str:
    """g++ of a host-only source against the CUDA runtime headers, without torch."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    cuda_include = _find_cuda_include()
    if cxx is None or cuda_include is None:
        return "needs g++ and the CUDA headers"
    return [cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-c", f"-I{CSRC}", f"-I{cuda_include}",
            str(CUDA_DIR / source), "-o", str(out_dir / f"{source}.o")]


def _binding_job(tmp: Path) -> list[str] | str:
    """g++ -fsyntax-only of bindings_cuda.cpp, or the reason it cannot run here."""
    binding = CUDA_DIR / "bindings_cuda.cpp"
    if not binding.exists():
        return "csrc/cuda/bindings_cuda.cpp does not exist"
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        return "torch is not importable"
    cuda_include = _find_cuda_include()
    if cuda_include is None:
        return "CUDA runtime headers (cuda_runtime.h) not found under CUDA_HOME or /usr/local/cuda*"
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        return "no C++ compiler"
    includes = list(include_paths())
    # CPU-only torch wheels lack this generated header that c10/cuda includes; a stub stands in.
    if not any(os.path.exists(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for p in includes):
        stub = tmp / "stub_include" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(tmp / "stub_include"))
    py_include = sysconfig.get_paths()["include"]
    return [cxx, "-std=c++17", "-fsyntax-only", "-w", f"-I{CSRC}", *[f"-I{p}" for p in includes],
            f"-I{cuda_include}", f"-I{py_include}", "-DFLASHLITE_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
            str(binding)]


def _planner_job(tmp: Path) -> list[str]:
    driver = tmp / "planner_driver.cu"
    driver.write_text(PLANNER_DRIVER)
    host = [str(CUDA_DIR / s) for s in HOST_SOURCES]
    return [NVCC, "-std=c++17", "-O1", f"-I{CSRC}", "-arch=sm_80", str(driver), str(CUDA_DIR / "utility_kernels.cu"),
            *host, "-o", str(tmp / "planner")]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(cmd, 124, "", f"timed out after {TIMEOUT}s: {exc}")


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Every compile of this module, run in parallel once: {key: CompletedProcess | skip reason}."""
    tmp = tmp_path_factory.mktemp("cuda_compile")
    jobs: dict = {("planner",): _planner_job(tmp)}
    results: dict = {}
    if not CUDA_BUILD_PRESENT:
        for source in CU_SOURCES:
            jobs[(source,)] = _nvcc_job(source, tmp)
        (tmp / "host").mkdir(exist_ok=True)
        for source in HOST_SOURCES:
            job = _host_job(source, tmp / "host")
            if isinstance(job, str):
                results[("host", source)] = job
            else:
                jobs[("host", source)] = job
        binding = _binding_job(tmp)
        if isinstance(binding, str):
            results[("binding",)] = binding
        else:
            jobs[("binding",)] = binding
    emulation = "the real kernels run on this machine (tests/test_cuda_backend.py)" if CUDA_BUILD_PRESENT \
        else _emulation_jobs(tmp)
    if isinstance(emulation, str):
        results["emulator"] = emulation
    else:
        jobs.update(emulation)
    # Longest first (nvcc runs of the tensor-core backward, ...), so the pool does not end on one
    # long job while the other cores idle.
    order = sorted(jobs, key=_expected_cost, reverse=True)
    workers = max(2, min(len(jobs), os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {key: pool.submit(_run, jobs[key]) for key in order}
        results.update({key: future.result() for key, future in futures.items()})
    if not isinstance(emulation, str):
        failed = [r for key, r in results.items() if key[:1] == ("emu",) and r.returncode != 0]
        results["emulator"] = failed[0] if failed else _link_emulator(tmp, _find_cuda_include())
    results["tmp"] = tmp
    return results


def _expected_cost(key) -> float:
    """Rough CPU seconds of a job (measured on 2 cores; only the order matters)."""
    name = key[-1] if isinstance(key, tuple) else key
    if key[0] == "emu":
        return 5.0 if name.startswith("mma_") else 3.0
    if key[0] == "host":
        return 2.0
    if key[0] in ("binding", "planner"):
        return 20.0
    return 25.0 if name.startswith("mma_backward") else 15.0


def _tail(text: str, n: int = 6000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def test_sources_exist_and_are_torch_free():
    assert ALL_CU_SOURCES, "csrc/cuda has no .cu sources"
    sources = [CUDA_DIR / s for s in ALL_CU_SOURCES + HOST_SOURCES] + [CUDA_DIR / "tools" / "emulate_main.cpp"]
    for path in sources + list(CUDA_DIR.glob("*.cuh")) + list(CUDA_DIR.glob("*.h")):
        text = path.read_text()
        includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', text)
        torchy = [inc for inc in includes if inc.split("/")[0] in ("torch", "ATen", "c10", "pybind11")]
        assert not torchy, f"{path.name} includes torch headers {torchy}: kernels must stay torch-free"


@skip_if_built
@pytest.mark.parametrize("source", CU_SOURCES)
def test_cu_compiles_for_sm80_and_sm90a(builds, source):
    result = builds[(source,)]
    assert result.returncode == 0, f"nvcc {source} ({', '.join(ARCHS)}) failed:\n{_tail(result.stderr)}"
    ours = [line for line in result.stderr.splitlines() if "warning" in line.lower() and "csrc/cuda" in line]
    assert not ours, "nvcc warnings in flashlite sources:\n" + "\n".join(ours[:20])


@skip_if_built
@pytest.mark.parametrize("source", HOST_SOURCES)
def test_host_sources_compile_without_torch(builds, source):
    result = builds[("host", source)]
    if isinstance(result, str):
        pytest.skip(f"{source}: {result}")
    assert result.returncode == 0, f"g++ {source} failed:\n{_tail(result.stderr)}"
    assert "warning" not in result.stderr, f"g++ warnings in {source}:\n{_tail(result.stderr)}"


def test_instantiation_files_match_tiles_h():
    """The mma_*.cu / simt_*.cu files are what tools/generate_instantiations.py writes from tiles.h."""
    run = subprocess.run([sys.executable, str(CUDA_DIR / "tools" / "generate_instantiations.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"instantiation files drifted from tiles.h:\n{run.stdout}{run.stderr}"


def _ptxas_rows(builds) -> list[dict]:
    report = _tool("ptxas_report")
    raw = []
    for source in CU_SOURCES:
        result = builds[(source,)]
        assert result.returncode == 0, f"nvcc {source} failed:\n{_tail(result.stderr)}"
        raw += report.parse_ptxas(result.stderr)
    return report.annotate(raw, report.dynamic_smem(few=True))


@skip_if_built
def test_ptxas_budget(builds):
    """Registers, spills, stack and shared memory of every kernel compiled here against the budget."""
    report = _tool("ptxas_report")
    rows = _ptxas_rows(builds)
    kernels = {r["kernel"].split("<")[0] for r in rows}
    for family in ("mma_forward_kernel", "mma_dkdv_kernel", "mma_dq_kernel", "simt_forward_kernel",
                   "simt_backward_rows_kernel", "simt_dkdv_kernel", "gather_key_grads_kernel",
                   "combine_splits_kernel", "accum_to_tensor_kernel"):
        assert family in kernels, f"ptxas reported no {family} (parsing or sources changed?)"
    assert {r["arch"] for r in rows} == set(ARCHS)
    budget = json.loads(BUDGET.read_text())
    problems = report.check_budget(rows, budget)
    assert not problems, "ptxas budget (csrc/cuda/ptxas_budget.json) exceeded:\n" + "\n".join(problems) + \
        "\n\n" + report.format_table(rows)


@skip_if_built
def test_binding_syntax(builds):
    result = builds[("binding",)]
    if isinstance(result, str):
        pytest.skip(f"bindings_cuda.cpp syntax check skipped: {result}")
    assert result.returncode == 0, f"g++ -fsyntax-only bindings_cuda.cpp failed:\n{_tail(result.stderr)}"


def _planner_output(builds, device: str) -> str:
    build = builds[("planner",)]
    assert build.returncode == 0, f"planner build failed:\n{_tail(build.stderr)}"
    env = dict(os.environ, FLASHLITE_CUDA_ASSUME_DEVICE=device, CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([str(builds["tmp"] / "planner")], capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stderr
    return run.stdout


def _configs(text: str) -> dict:
    out = {}
    for m in re.finditer(r"CONFIG dtype=(\d) d=(\d+) bs=(\d+) bm=(\d+) bn=(\d+)", text):
        dtype, d, bs, bm, bn = map(int, m.groups())
        out[(dtype, d, bs)] = (bm, bn)
    return out


def _lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_planner_on_an_assumed_h100(builds):
    text = _planner_output(builds, "132:232448")  # H100 SXM: 132 SMs, 227 KiB opt-in shared memory
    configs = _configs(text)
    mma = {(128, 64), (128, 32), (64, 64), (64, 32)}
    for (dtype, d, bs), (bm, bn) in configs.items():
        if bs:
            assert bs % bm == 0 and bs % bn == 0, f"tile ({bm}, {bn}) does not divide block_size {bs}"
        if dtype == 2:  # float32: SIMT tiles
            assert bm == 16 and bn in (16, 32)
        elif bs in (0, 64, 128):
            assert (bm, bn) in mma, f"16-bit head_dim {d} block_size {bs} got ({bm}, {bn})"
        else:
            assert (bm, bn) == (16, bs)
    assert configs[(0, 128, 0)] == (128, 32)
    assert configs[(0, 64, 0)] == (128, 64)
    assert configs[(1, 256, 0)] == (64, 32)
    assert configs[(0, 64, 64)] == (64, 64)
    assert configs[(0, 128, 64)] == (64, 64)  # block_size 64: block_m must divide it

    results = {line.split()[1]: line for line in _lines(text, "RESULT")}
    launches = _lines(text, "LAUNCH")
    # Decode with 8 query heads per KV head packed into one 64-row block, keys split (2 x 4 groups
    # = 8 blocks < 132 SMs); without a workspace it does not split.
    assert "LAUNCH mma_forward D=128 bm=64 bn=32 blocks=8 splits=1 hpb=8" in text
    ws = int(re.search(r"WORKSPACE decode=(\d+)", text).group(1))
    assert ws > 0 and ws % (2 * 32 * 1 * (128 + 1) * 4) == 0
    assert "LAUNCH mma_forward D=256 bm=64 bn=32 blocks=8 splits=1 hpb=1" in text
    assert "LAUNCH mma_forward D=128 bm=128 bn=64 blocks=256 splits=1 hpb=0" in text
    assert int(re.search(r"WORKSPACE prefill=(\d+)", text).group(1)) == 0
    assert "LAUNCH mma_backward D=128 bm=128 bn=64 atomic=0" in text
    # deterministic=false zeroes the fp32 dQ accumulator first (no device here: that call fails).
    assert "dq accumulator" in results["prefill_backward_atomic"]
    assert "LAUNCH simt_tile_forward splits=1" in text and "LAUNCH simt_tile_backward" in text
    for name in ("decode_head_sched", "prefill", "prefill_backward", "simt_forward", "simt_backward", "topk_forward"):
        assert "err=0" in results[name], results[name]
    assert "not a tensor-core shape" in results["bad_tile"]
    assert "multiple of heads_kv" in results["bad_heads"]
    assert "key_offsets" in results["topk_backward_no_csr"]
    assert "DEVICE_CONFIG_MISMATCH" not in text  # tile_config(device 0) = the (assumed) device's
    assert int(re.search(r"WORKSPACE topk=(\d+)", text).group(1)) > 0  # few blocks -> split keys
    causal_window = [line for line in launches if line.startswith("LAUNCH simt_gather_forward")]
    assert causal_window and causal_window[0].endswith("window=65537,0")  # causal: right side 0


def test_planner_on_an_assumed_small_smem_card(builds):
    text = _planner_output(builds, "84:101376")  # sm_86: 99 KiB opt-in shared memory
    configs = _configs(text)
    assert configs[(0, 128, 0)] == (128, 32)
    assert configs[(1, 256, 0)] == (64, 32)
    assert configs[(0, 64, 0)] == (128, 64)


# ---------------------------------------------------------------------------------------------
# The kernels themselves, on a CPU emulation of CUDA (csrc/cuda/emulation.h): the real kernel
# code compiled with g++ -DFLASHLITE_CUDA_EMULATION, threads as fibers, warp operations
# (shuffles, ldmatrix, mma.sync) emulated by their PTX fragment layouts. Checks kernel logic -
# schedules, masks, online softmax, fragments, split keys, decode packing, gather, both
# backward paths - by DESIGN.md's rule against flashlite.reference. Not checked: races, timing.
# ---------------------------------------------------------------------------------------------
EMU_FLAGS = ["-std=c++20", "-O1", "-w", "-x", "c++", "-DFLASHLITE_CUDA_EMULATION", f"-I{CSRC}"]  # every instantiation
EMU_SOURCES = [CUDA_DIR / s for s in ALL_CU_SOURCES + HOST_SOURCES] + [CUDA_DIR / "tools" / "emulate_main.cpp"]


def _emulation_jobs(tmp: Path) -> dict | str:
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    cuda_include = _find_cuda_include()
    if cxx is None or cuda_include is None:
        return "needs g++ and the CUDA headers"
    lib = Path(cuda_include).parent / "lib64"
    if not (lib / "libcudart.so").exists():
        return f"libcudart.so not found in {lib}"
    (tmp / "emu").mkdir(exist_ok=True)
    return {("emu", src.name): [cxx, *EMU_FLAGS, f"-I{cuda_include}", "-c", str(src), "-o",
                                str(tmp / "emu" / f"{src.name}.o")] for src in EMU_SOURCES}


def _link_emulator(tmp: Path, cuda_include: str) -> subprocess.CompletedProcess:
    lib = Path(cuda_include).parent / "lib64"
    objects = sorted(str(p) for p in (tmp / "emu").glob("*.o"))
    return _run([shutil.which(os.environ.get("CXX", "g++")), *objects, f"-L{lib}", f"-Wl,-rpath,{lib}", "-lcudart",
                 "-o", str(tmp / "emu" / "emulate")])


def _emulator(builds) -> Path:
    result = builds["emulator"]
    if isinstance(result, str):
        pytest.skip(f"CUDA emulation not built: {result}")
    assert result.returncode == 0, f"emulation build failed:\n{_tail(result.stderr)}"
    return builds["tmp"] / "emu" / "emulate"


def _to_bytes(t) -> bytes:
    import torch

    t = t.detach().contiguous().cpu()
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def _from_file(path: Path, dtype, shape):
    import torch

    raw = bytearray(path.read_bytes())
    if dtype in (torch.float16, torch.bfloat16):
        return torch.frombuffer(raw, dtype=torch.int16).view(dtype).reshape(shape).clone()
    return torch.frombuffer(raw, dtype=dtype).reshape(shape).clone()


_DTYPE_CODE = {"float16": 0, "bfloat16": 1, "float32": 2}


def _emulate(emulator: Path, workdir: Path, case: dict, arrays: dict, env: dict | None = None) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    lines = []
    for key, value in case.items():
        lines.append(f"{key} {' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value}")
    for name, tensor in arrays.items():
        (workdir / f"{name}.bin").write_bytes(_to_bytes(tensor))
        if name in ("kv_tiles", "kv_count", "q_tiles", "q_count", "indices", "key_offsets", "key_slots"):
            lines.append(f"{name}_shape {' '.join(map(str, tensor.shape))}")
    (workdir / "case.txt").write_text("\n".join(lines) + "\n")
    run = subprocess.run([str(emulator), str(workdir)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, **(env or {})))
    assert run.returncode == 0, f"emulator failed ({case.get('mode')}):\n{run.stderr[-3000:]}"
    return run.stdout


def _emulated_attention(emulator, workdir, q, k, v, pattern, *, softcap=0.0, alibi=None, pad=0,
                        deterministic=True, block_size=0, seed=0, env=None, stats=None, entropy=False, heads=None):
    """Forward and backward of `pattern` through the emulated CUDA launchers. stats=sink_tokens: the
    forward also fills row_stats; entropy: the backward also gets the entropy's gradient terms (of a
    random gradient of the emulated entropy, as flashlite.dispatch.ops.entropy_terms builds them).
    heads: a bool head mask, lowered into the tile schedule as the plan does (flashlite.core.head_mask).
    Returns (out, lse, dq, dk, dv, grad_out, forward stdout, {"row_stats", "grad_entropy"} or {})."""
    import torch

    from flashlite import TopK

    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = D ** -0.5
    case = dict(dtype=_DTYPE_CODE[str(q.dtype).split(".")[-1]], B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D,
                scale=repr(scale), softcap=repr(float(softcap)), pad=pad, deterministic=int(deterministic))
    arrays = dict(q=q, k=k, v=v)
    if alibi is not None:
        case["alibi"] = 1 if alibi.dim() == 1 else 2
        arrays["alibi"] = alibi.float()
    gather = isinstance(pattern, TopK)
    if gather:  # the rows and inverse index as the call plan builds them for every backend
        from flashlite.core.gather_rows import canonical_rows, key_index

        rows = canonical_rows(pattern.indices, Nq, Nk, pattern.causal)
        case.update(mode="gather_forward", causal=int(pattern.causal))
        arrays["indices"] = rows
    else:
        block_size = block_size or getattr(pattern, "block_size", None) or 0  # as dispatch asks tile_config
        cfg = _emulate(emulator, workdir / "config", dict(mode="config", head_dim=D, block_size=block_size), {})
        block_m, block_n = map(int, cfg.splitlines()[case["dtype"]].split())
        sched = pattern.schedule(Nq, Nk, block_m, block_n, torch.device("cpu"))
        if heads is not None:
            from flashlite.core.head_mask import masked_schedule

            sched = masked_schedule(sched, heads)
        case.update(mode="tile_forward", block_m=block_m, block_n=block_n, is_list=int(sched.is_list),
                    window_left=sched.window_left, window_right=sched.window_right)
        arrays.update(kv_tiles=sched.kv_tiles, kv_count=sched.kv_count, q_tiles=sched.q_tiles, q_count=sched.q_count)
    extras = {}
    if stats is not None:
        case.update(stats=1, sink_tokens=int(stats))
    stdout = _emulate(emulator, workdir, case, arrays)
    out = _from_file(workdir / "out.bin", q.dtype, q.shape)
    lse = _from_file(workdir / "lse.bin", torch.float32, q.shape[:3])
    if stats is not None:
        extras["row_stats"] = _from_file(workdir / "row_stats.bin", torch.float32, (5,) + tuple(q.shape[:3]))

    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(q.dtype)
    delta = (grad_out.float() * out.float()).sum(-1)
    case["mode"] = "gather_backward" if gather else "tile_backward"
    arrays.update(grad_out=grad_out, out=out, lse=lse, delta=delta)
    if gather and deterministic:
        arrays["key_offsets"], arrays["key_slots"] = key_index(rows, Nq, Nk, pattern.causal)
    if entropy:
        from flashlite.dispatch.ops import entropy_terms

        extras["grad_entropy"] = torch.randn(q.shape[:3], generator=torch.Generator().manual_seed(seed + 2))
        arrays["entropy"] = entropy_terms(extras["grad_entropy"], lse, extras["row_stats"][0])
        case["entropy"] = 1
    _emulate(emulator, workdir, case, arrays, env)
    dq = _from_file(workdir / "dq.bin", q.dtype, q.shape)
    dk = _from_file(workdir / "dk.bin", q.dtype, k.shape)
    dv = _from_file(workdir / "dv.bin", q.dtype, v.shape)
    return out, lse, dq, dk, dv, grad_out, stdout, extras


def _check_emulated(q, k, v, pattern, emulated, **kw):
    """DESIGN.md's rule (conftest.assert_rule) for out, lse, dq, dk, dv of the emulated kernels
    (emulated: what _emulated_attention returned); with stats=sink_tokens also the five head
    statistics (flashlite.reference.attention_stats; keys exactly), with entropy the gradients of
    out and the entropy together."""
    import torch

    from flashlite import reference
    from flashlite.reference import STAT_NAMES

    from conftest import assert_rule

    softcap, alibi = kw.get("softcap") or None, kw.get("alibi")
    out, lse, dq, dk, dv, grad_out, stdout, extras = emulated
    sink = kw.get("stats")
    ref, ref_stats = {}, {}
    for name, dtype in (("exact", torch.float64), ("lowp", None), ("f32", torch.float32)):
        if name == "f32" and sink is None:
            continue
        leaves = [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in (q, k, v)]
        if sink is None:
            o, l = reference.attention(*leaves, pattern, softcap=softcap, alibi_slopes=alibi, return_lse=True,
                                       compute_dtype=dtype)
            loss = (o * grad_out.to(o.dtype)).sum()
        else:
            o, l, st = reference.attention_stats(*leaves, pattern, sink_tokens=sink, softcap=softcap,
                                                 alibi_slopes=alibi, compute_dtype=dtype)
            ref_stats[name] = st.detach()
            loss = (o.double() * grad_out.double()).sum()
            if "grad_entropy" in extras:
                loss = loss + (st[0].double() * extras["grad_entropy"].double()).sum()
        loss.backward()
        ref[name] = (o, l, *[t.grad for t in leaves])
    assert not torch.isnan(out).any(), "NaN in the emulated output"
    for index, name, got in zip(range(5), ("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv)):
        assert_rule(name, got, ref["lowp"][index], ref["exact"][index], fallback=ref.get("f32", [None] * 5)[index])
    if sink is not None:
        row_stats = extras["row_stats"]
        assert not torch.isnan(row_stats).any(), "row_stats has unwritten (NaN) elements"
        for plane, name in enumerate(STAT_NAMES):
            assert_rule(name, row_stats[plane], ref_stats["lowp"][plane], ref_stats["exact"][plane],
                        fallback=ref_stats["f32"][plane])
        assert torch.equal(row_stats[4], ref_stats["exact"][4].float()), "keys is a count"
        assert (row_stats[:, torch.isneginf(lse)] == 0).all(), "a row with no key: all statistics 0"
    return stdout


def _qkv(B, Hq, Hkv, Nq, Nk, D, dtype, seed):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, n, D, generator=gen).to(dtype) for h, n in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk))]


def _emulation_cases():
    """(id, dtype, (B, Hq, Hkv, Nq, Nk, D), pattern factory, extra kwargs)."""
    import torch

    from flashlite import BlockSparse, Full, SlidingWindow, TopK
    from flashlite.core.schedule import cdiv

    def topk(B, Hkv, Nq, Nk, K, causal, shared=False, heads=None, seed=0, repeats=False):
        gen = torch.Generator().manual_seed(seed)
        rows = 1 if shared else Nq
        idx = torch.rand(B, heads or Hkv, rows, Nk, generator=gen).argsort(-1)[..., :K]
        idx[..., -1] = -1
        if repeats:  # a key listed twice counts once (the plan's canonical rows drop the repeat)
            idx[..., 1] = idx[..., 0]
            idx[..., 3] = idx[..., 0]
        return TopK(idx[:, :, 0] if shared else idx, causal=causal)

    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    layout = torch.Generator().manual_seed(1)
    return [
        # tensor cores (64, 64) tiles, head_dim 64: causal with Nq < Nk, GQA, band, block-sparse list
        ("mma_causal", f16, (1, 4, 2, 70, 90, 64), lambda: Full(True), {}),
        # >= 3 steps in every pipeline (forward key tiles, dK/dV query chunks, dQ key tiles): the
        # emulation's cp.async timing and scheduling then expose missing waits or barriers
        ("mma_long_pipeline", f16, (1, 2, 2, 150, 250, 64), lambda: Full(True), {}),
        ("mma_window_bf16", bf16, (1, 2, 1, 90, 70, 64), lambda: SlidingWindow(17, 9), {}),
        ("mma_block_sparse", f16, (2, 2, 1, 130, 100, 64),
         lambda: BlockSparse(torch.rand(2, 2, cdiv(130, 64), cdiv(100, 64), generator=layout) < 0.6, 64), {}),
        ("mma_softcap_alibi", bf16, (1, 2, 2, 40, 75, 64), lambda: Full(True),
         dict(softcap=5.0, alibi=torch.tensor([0.3, 0.1]))),
        # head_dim 40 on the 64 template through unaligned rows (element loads), empty rows (Nq > Nk)
        ("mma_padded_d40", f16, (1, 2, 1, 50, 30, 40), lambda: Full(True), dict(pad=3)),
        # head_dim 256: (64, 32) tiles, Q fragments from shared memory, dK/dV split over 2 warps
        ("mma_d256", bf16, (1, 2, 1, 33, 70, 256), lambda: Full(True), {}),
        # decode: GQA heads packed in one block, keys split across blocks, merged by the combine
        ("mma_decode_split", f16, (1, 8, 2, 1, 700, 64), lambda: Full(True), {}),
        ("mma_decode3_window", bf16, (1, 4, 1, 3, 600, 64), lambda: SlidingWindow(300, 0), {}),
        # the atomic dQ path (64-column and, for head_dim 96, 32-column dQ work items)
        ("mma_atomic_dq", f16, (1, 2, 1, 70, 90, 64), lambda: Full(True), dict(deterministic=False)),
        ("mma_atomic_dq_d96", bf16, (1, 2, 1, 70, 90, 96), lambda: Full(True), dict(deterministic=False)),
        # head_dim 128: (128, 32) tiles with 32 rows per warp; decode on (64, 32)
        ("mma_d128_causal", bf16, (1, 2, 1, 150, 170, 128), lambda: Full(True), {}),
        ("mma_d128_decode_split", f16, (1, 4, 1, 2, 400, 128), lambda: Full(True), {}),
        # the other head-dim templates, and (64, 64) tiles for head_dim 128 (block_size 64)
        ("mma_d32_window", f16, (1, 2, 2, 140, 100, 32), lambda: SlidingWindow(40, 5), {}),
        ("mma_d128_bs64", bf16, (1, 2, 1, 100, 130, 128),
         lambda: BlockSparse(torch.rand(1, 2, cdiv(100, 64), cdiv(130, 64), generator=layout) < 0.7, 64), {}),
        ("mma_d80_alibi_per_batch", f16, (2, 2, 1, 40, 75, 80), lambda: Full(False),
         dict(alibi=torch.tensor([[0.3, 0.1], [0.05, 0.2]]))),
        # SIMT: float32 tile engine, 16-bit block-sparse 16/32 tiles
        ("simt_f32_window", f32, (1, 2, 1, 45, 61, 40), lambda: SlidingWindow(7, 3), {}),
        ("simt_f32_decode_split", f32, (1, 2, 2, 1, 300, 64), lambda: Full(False), {}),
        ("simt_bs16_f16", f16, (1, 2, 2, 40, 50, 32),
         lambda: BlockSparse(torch.rand(1, 2, cdiv(40, 16), cdiv(50, 16), generator=layout) < 0.5, 16), {}),
        ("simt_bs32_bf16_causal", bf16, (1, 2, 1, 70, 70, 64),
         lambda: BlockSparse(torch.rand(1, 1, cdiv(70, 32), cdiv(70, 32), generator=layout) < 0.7, 32, causal=True),
         {}),
        # top-k gather: per-query (GQA), shared lists, broadcast head lists, causal, atomic scatter
        ("topk_per_query", f16, (2, 4, 2, 30, 50, 64), lambda: topk(2, 2, 30, 50, 12, True), {}),
        ("topk_shared_bf16", bf16, (1, 4, 2, 20, 40, 64), lambda: topk(1, 2, 20, 40, 9, False, shared=True), {}),
        ("topk_broadcast_heads_f32", f32, (1, 4, 2, 25, 45, 40), lambda: topk(1, 2, 25, 45, 10, True, heads=1), {}),
        ("topk_atomic", f16, (1, 2, 1, 30, 60, 64), lambda: topk(1, 1, 30, 60, 14, True), dict(deterministic=False)),
        # GQA group of 18 (> 16 rows per block), unaligned rows (element loads), shared lists
        ("topk_gqa18_padded", f16, (1, 36, 2, 5, 40, 64), lambda: topk(1, 2, 5, 40, 11, True), dict(pad=1)),
        ("topk_shared_gqa18", bf16, (1, 36, 2, 6, 40, 32), lambda: topk(1, 2, 6, 40, 7, True, shared=True), {}),
        ("topk_decode_split", bf16, (1, 4, 1, 1, 400, 64), lambda: topk(1, 1, 1, 400, 300, True), {}),
        ("topk_alibi_softcap", f32, (1, 2, 1, 20, 30, 64), lambda: topk(1, 1, 20, 30, 8, True),
         dict(softcap=3.0, alibi=torch.tensor([0.2, 0.5]))),
        # repeated keys in a row (canonical rows), GQA, per-query and shared lists, both backwards
        ("topk_repeated_keys", bf16, (1, 4, 2, 24, 40, 32), lambda: topk(1, 2, 24, 40, 9, True, repeats=True), {}),
        # the per-key dK/dV's 64-bit slot division (taken by itself only when Nq*K >= 2^32)
        ("topk_wide_slots", f16, (1, 4, 2, 20, 40, 64), lambda: topk(1, 2, 20, 40, 10, True),
         dict(env={"FLASHLITE_CUDA_WIDE_SLOTS": "1"})),
        ("topk_repeated_shared_atomic", f16, (1, 4, 2, 12, 40, 64),
         lambda: topk(1, 2, 12, 40, 9, False, shared=True, repeats=True), dict(deterministic=False)),
        # head statistics (row_stats, sink_tokens) and the entropy's gradient in the backward: the
        # tensor-core statistics kernels (GQA, Nq < Nk, masked tiles), the SIMT gather's (causal
        # per-query lists, -1 slots; per-key dK/dV) and the SIMT tile engine's (float32, window)
        ("mma_stats_causal", f16, (1, 4, 2, 70, 90, 64), lambda: Full(True), dict(stats=3, entropy=True)),
        ("topk_stats", f16, (1, 4, 2, 30, 50, 64), lambda: topk(1, 2, 30, 50, 12, True),
         dict(stats=5, entropy=True)),
        ("simt_stats_f32_window", f32, (1, 2, 1, 45, 61, 40), lambda: SlidingWindow(7, 3),
         dict(stats=2, entropy=True)),
    ]


# Run by default: each kernel family (tensor-core tiles at head dims 64/128/256, pipelines, window,
# block-sparse, softcap+ALiBi, decode split, atomic dQ; SIMT; top-k per-query/shared/atomic/decode/
# repeated keys). The rest with FLASHLITE_CUDA_TESTS=full.
CORE_EMULATION = {"mma_causal", "mma_long_pipeline", "mma_window_bf16", "mma_block_sparse", "mma_softcap_alibi",
                  "mma_d256", "mma_decode_split", "mma_atomic_dq", "mma_d128_causal", "simt_f32_window",
                  "simt_bs16_f16", "topk_per_query", "topk_shared_bf16", "topk_atomic", "topk_decode_split",
                  "topk_repeated_keys", "mma_stats_causal"}
EMULATION_CASES = [c for c in (_emulation_cases() if NVCC else []) if FULL or c[0] in CORE_EMULATION]


@pytest.fixture(scope="module")
def emulated(builds, tmp_path_factory):
    """The emulated kernel runs of every case, concurrently (each emulator run is one single-threaded
    process, so the cases use every core; the reference checks stay in the tests):
    {name: (q, k, v, pattern, kw, _emulated_attention's result) | the exception it raised}."""
    emulator = _emulator(builds)
    root = tmp_path_factory.mktemp("emulated")
    prepared = []
    for name, dtype, shape, make_pattern, kw in EMULATION_CASES:  # inputs in order: same data every run
        seed = sum(map(ord, name))
        prepared.append((name, *_qkv(*shape, dtype, seed=seed), make_pattern(), kw, seed))

    def run(name, q, k, v, pattern, kw, seed):
        return q, k, v, pattern, kw, _emulated_attention(emulator, root / name, q, k, v, pattern, seed=seed, **kw)

    results = {}
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {case[0]: pool.submit(run, *case) for case in prepared}
        for name, future in futures.items():
            try:
                results[name] = future.result()
            except Exception as exc:  # noqa: BLE001 - reported by that case's test
                results[name] = exc
    return results


@pytest.mark.skipif(not NVCC, reason="needs nvcc (the emulation uses the CUDA headers)")
def test_head_mask_schedule_on_cpu_emulation(builds, tmp_path):
    """The CUDA tile kernels on a masked plan's schedule (flashlite.core.head_mask: the masked heads'
    counts 0): masked heads out 0, lse −inf, dq 0; kept heads the bits of the unmasked run (out,
    lse, dq); dK/dV by the rule against the reference with the masked heads' gradient 0. Tensor-core
    forward and backward (GQA, a group with one kept head) and the decode path (one head per block
    then, the group's counts differing)."""
    import torch

    from flashlite import Full, reference

    from conftest import assert_rule

    emulator = _emulator(builds)
    cases = (("mma_gqa", (2, 4, 2, 70, 90, 64)), ("mma_decode", (1, 8, 2, 1, 700, 64)))
    for name, shape in cases:
        q, k, v = _qkv(*shape, torch.float16, seed=7)
        batch, heads_q = shape[:2]
        mask = (torch.arange(batch * heads_q).view(batch, heads_q) % 3 != 1)
        plain = _emulated_attention(emulator, tmp_path / name / "plain", q, k, v, Full(True), seed=7)
        out, lse, dq, dk, dv, grad_out = _emulated_attention(emulator, tmp_path / name / "masked", q, k, v,
                                                             Full(True), seed=7, heads=mask)[:6]
        assert not out[~mask].any() and torch.isneginf(lse[~mask]).all() and not dq[~mask].any(), name
        for got, want in zip((out, lse, dq), plain[:3]):
            assert torch.equal(got[mask], want[mask]), name
        kept = mask[:, :, None, None]
        exact = [t.double().requires_grad_() for t in (q, k, v)]
        ref = reference.attention(*exact, Full(True), compute_dtype=torch.float64)
        want_dk, want_dv = torch.autograd.grad(ref, exact[1:], grad_out.double() * kept)
        lowp = [t.detach().requires_grad_() for t in (q, k, v)]
        low = reference.attention(*lowp, Full(True), compute_dtype=None)
        low_dk, low_dv = torch.autograd.grad(low, lowp[1:], grad_out * kept)
        assert_rule(f"{name} dk", dk, low_dk, want_dk)
        assert_rule(f"{name} dv", dv, low_dv, want_dv)


@pytest.mark.parametrize("case", EMULATION_CASES, ids=[c[0] for c in EMULATION_CASES])
def test_kernels_on_cpu_emulation(emulated, case):
    name = case[0]
    result = emulated[name]
    if isinstance(result, BaseException):
        raise result
    q, k, v, pattern, kw, runs = result
    stdout = _check_emulated(q, k, v, pattern, runs, **kw)
    if "split" in name:  # the case exists to take the split-key path: it must have
        assert int(re.search(r"splits_workspace_bytes (\d+)", stdout).group(1)) > 0
