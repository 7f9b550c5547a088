"""CPU benchmark of flashlite's C++ backend ("cpu") beside PyTorch SDPA, measured in the same run.

    python bench/bench_cpu.py [--reps 7] [--threads 1,2] [--out bench/results/cpu-<host>-<date>.json]

Figures (forward, float32, head_dim 64, batch 1):
  * full attention at N = 2048 (8 heads): flashlite vs torch.nn.functional.scaled_dot_product_attention;
  * causal vs non-causal at N = 2048 (flashlite; SDPA's causal beside it);
  * sliding window 256 (causal band) at N = 8192 (4 heads) vs full attention at N = 8192;
  * top-k with 64 keys per query at N = 8192 via flashlite.topk_attention(backend="cpu"): random
    distinct keys per query, and marks-like selections (flashlite.selection.from_marks: 32 marked
    positions + 4 sinks + a 28-token recent window, causal) - each vs full attention at N = 8192;
  * decode: 1 query per head, 32 query heads on 4 KV heads, 8192 cached tokens: flashlite vs SDPA
    (enable_gqa=True).

Protocol (docs/design.md § Benchmark protocol): the median of ``--reps`` timed calls after a
warm-up, inputs rotated over two sets so one set's cache residency is not what is measured;
useful FLOPs only (4·B·H·Nq·keys·D, keys = those each query actually attends); %peak against a
float32 matmul measured in the same run. ``--threads 1,2`` repeats everything per thread count (on a shared
machine the 1-thread figures are the least disturbed by other processes). Writes JSON with the
machine (CPU model, threads, load average), torch version and git commit, and prints a table.
Takes about a minute per thread count on 2 idle cores.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import flashlite
from flashlite import Full, SlidingWindow

ROOT = Path(__file__).resolve().parents[1]
D = 64
DTYPE = torch.float32


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def median_seconds(fn: Callable, input_sets: Sequence[tuple], reps: int, warmup: int = 1) -> Dict[str, float]:
    """Median (and min) wall time of fn(*inputs) over reps calls, rotating the input sets."""
    for r in range(warmup):
        fn(*input_sets[r % len(input_sets)])
    times: List[float] = []
    for r in range(reps):
        args = input_sets[r % len(input_sets)]
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "reps": reps}


def qkv_sets(heads: int, seqlen: int, count: int = 2) -> List[tuple]:
    return [tuple(torch.randn(1, heads, seqlen, D, dtype=DTYPE) for _ in range(3)) for _ in range(count)]


def matmul_peak_gflops(reps: int) -> float:
    """float32 matmul throughput (2048³) with torch's BLAS: the measured peak for %peak."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    timing = median_seconds(lambda x, y: torch.mm(x, y), [(a, b)], reps, warmup=2)
    return 2 * 2048 ** 3 / timing["median_s"] / 1e9


def random_topk(seqlen: int, width: int, heads: int) -> torch.Tensor:
    """``width`` distinct random keys per query: int64 [1, heads, Nq, width]."""
    rows = [torch.rand(min(512, seqlen - start), seqlen).topk(width, dim=-1).indices
            for start in range(0, seqlen, 512)]
    return torch.cat(rows).view(1, 1, seqlen, width).expand(1, heads, -1, -1).contiguous()


def marks_topk(seqlen: int) -> torch.Tensor:
    """A person's marks (32 positions) + 4 sinks + a 28-token recent window, causal: [1, 1, Nq, <=64]."""
    from flashlite.selection import from_marks

    generator = torch.Generator().manual_seed(0)
    marks = torch.randperm(seqlen, generator=generator)[:32].sort().values.tolist()
    return from_marks(marks, seqlen, window=28, sinks=4, causal=True)


def topk_keys(indices: torch.Tensor, causal: bool, seqlen: int) -> float:
    """Keys actually attended, summed over queries (valid slots; with causal only j <= i)."""
    valid = indices >= 0
    if causal:
        valid &= indices <= torch.arange(seqlen).view(1, 1, -1, 1)
    return float(valid.sum()) / indices.shape[1]  # per head


def run_figures(reps: int, threads: int) -> dict:
    """Time every figure at the current thread count; print the table; return the figures and targets."""
    from flashlite import _C

    torch.manual_seed(0)
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    reps_small, reps_large = reps, max(3, reps // 2)
    figures: List[dict] = []

    def record(name: str, impl: str, fn: Callable, input_sets, reps: int, flops: float, **extra) -> dict:
        timing = median_seconds(fn, input_sets, reps)
        entry = {"name": name, "impl": impl, "threads": threads, **timing,
                 "gflops": flops / timing["median_s"] / 1e9, **extra}
        figures.append(entry)
        print(f"  {name:<34} {impl:<10} {timing['median_s'] * 1e3:9.2f} ms", flush=True)
        return entry

    peak = matmul_peak_gflops(reps_small)
    print(f"measured float32 matmul peak: {peak:.1f} GFLOP/s  ({threads} threads, kernels: {_C.cpu_isa()})")

    def cpu(pattern):
        return lambda q, k, v: flashlite.attention(q, k, v, pattern, backend="cpu")

    # N = 2048, 8 heads: full and causal, beside SDPA.
    h, n = 8, 2048
    sets = qkv_sets(h, n)
    full_flops = 4 * h * n * n * D
    causal_flops = 4 * h * D * n * (n + 1) / 2
    full_2048 = record("full N=2048", "flashlite", cpu(Full(False)), sets, reps_small, full_flops)
    sdpa_2048 = record("full N=2048", "sdpa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v), sets,
                       reps_small, full_flops)
    causal_2048 = record("causal N=2048", "flashlite", cpu(Full(True)), sets, reps_small, causal_flops)
    record("causal N=2048", "sdpa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), sets,
           reps_small, causal_flops)
    del sets

    # N = 8192, 4 heads: full, window 256, top-k 64 (random and marks-like).
    h, n = 4, 8192
    sets = qkv_sets(h, n)
    full_flops = 4 * h * n * n * D
    full_8192 = record("full N=8192", "flashlite", cpu(Full(False)), sets, reps_large, full_flops)
    record("full N=8192", "sdpa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v), sets, reps_large,
           full_flops)
    window_keys = sum(min(i + 1, 257) for i in range(n))
    window_8192 = record("window 256 N=8192", "flashlite", cpu(SlidingWindow(256)), sets, reps_small,
                         4 * h * D * window_keys)
    random_idx = random_topk(n, 64, h)
    topk_random = record("top-k 64 random N=8192", "flashlite",
                         lambda q, k, v: flashlite.topk_attention(q, k, v, random_idx, backend="cpu"), sets,
                         reps_small, 4 * h * D * topk_keys(random_idx, False, n))
    marks_idx = marks_topk(n)
    topk_marks = record("top-k 64 marks-like N=8192", "flashlite",
                        lambda q, k, v: flashlite.topk_attention(q, k, v, marks_idx, causal=True, backend="cpu"),
                        sets, reps_small, 4 * h * D * topk_keys(marks_idx, True, n), slots=int(marks_idx.shape[-1]))
    del sets

    # Decode: 1 query per head over a KV cache of 8192 tokens, 32 query heads on 4 KV heads.
    hq, hkv, n = 32, 4, 8192
    decode_sets = [(torch.randn(1, hq, 1, D, dtype=DTYPE), torch.randn(1, hkv, n, D, dtype=DTYPE),
                    torch.randn(1, hkv, n, D, dtype=DTYPE)) for _ in range(2)]
    decode_flops = 4 * hq * n * D
    decode = record("decode 32:4 heads N=8192", "flashlite", cpu(Full(False)), decode_sets, 10 * reps_small,
                    decode_flops)
    decode_sdpa = record("decode 32:4 heads N=8192", "sdpa",
                         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), decode_sets,
                         10 * reps_small, decode_flops)
    del decode_sets

    for entry in figures:
        entry["percent_of_peak"] = 100 * entry["gflops"] / peak

    def ratio(slow: dict, fast: dict) -> float:
        return slow["median_s"] / fast["median_s"]

    targets = [
        {"target": "full fwd N=2048 d=64 fp32: flashlite at least as fast as SDPA (SDPA time / flashlite time)",
         "value": ratio(sdpa_2048, full_2048), "threshold": 1.0},
        {"target": "causal at least 1.6x faster than non-causal (N=2048)",
         "value": ratio(full_2048, causal_2048), "threshold": 1.6},
        {"target": "window 256 at N=8192 at least 10x faster than full",
         "value": ratio(full_8192, window_8192), "threshold": 10.0},
        {"target": "top-k 64 (random per query) at N=8192 at least 20x faster than full",
         "value": ratio(full_8192, topk_random), "threshold": 20.0},
        {"target": "top-k 64 (marks-like, causal) at N=8192 at least 20x faster than full",
         "value": ratio(full_8192, topk_marks), "threshold": 20.0},
        {"target": "decode (1 query, 32:4 heads, N=8192): flashlite at least as fast as SDPA (ours, not issue 5's)",
         "value": ratio(decode_sdpa, decode), "threshold": 1.0},
    ]
    for t in targets:
        t["met"] = t["value"] >= t["threshold"]
        t["threads"] = threads

    print()
    print(f"{'figure':<34} {'impl':<10} {'median ms':>10} {'GFLOP/s':>9} {'%peak':>6}")
    for e in figures:
        print(f"{e['name']:<34} {e['impl']:<10} {e['median_s'] * 1e3:10.2f} {e['gflops']:9.1f} "
              f"{e['percent_of_peak']:6.1f}")
    print()
    for t in targets:
        print(f"[{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['value']:.2f}x (target {t['threshold']}x)")
    print()
    return {"threads": threads, "load_average_at_start": load, "matmul_peak_gflops": peak, "figures": figures,
            "targets": targets}



def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7, help="timed calls per figure at N=2048 (N=8192: fewer)")
    parser.add_argument("--threads", default=None,
                        help="comma list of thread counts to run (default: torch's current count)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/cpu-<host>-<date>.json)")
    args = parser.parse_args(argv)
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    if flashlite.backends()["cpu"] != "available":
        print(f"the cpu backend is not available: {flashlite.backends()['cpu']}", file=sys.stderr)
        return 1
    from flashlite import _C

    started = time.time()
    runs = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        print(f"== {threads} thread(s) ==")
        runs.append(run_figures(args.reps, threads))
    host = socket.gethostname().split(".")[0] or "host"
    out = args.out or ROOT / "bench" / "results" / f"cpu-{host}-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "bench/bench_cpu.py",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "hostname": host, "arch": platform.machine(),
                    "logical_cpus": os.cpu_count(), "threads": thread_counts,
                    "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                    "flashlite_cpu_kernels": _C.cpu_isa()},
        "versions": {"torch": torch.__version__, "flashlite": flashlite.__version__, "python": platform.python_version(),
                     "git_commit": git_commit()},
        "setup": {"dtype": "float32", "head_dim": D, "batch": 1, "heads_n2048": 8, "heads_n8192": 4,
                  "reps_n2048": args.reps, "reps_n8192_full": max(3, args.reps // 2), "input_sets_rotated": 2},
        "runs": runs,
        "wall_seconds": time.time() - started,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} ({result['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
