"""Ring attention on this machine (gloo, 2 ranks): time with communication vs compute alone.

    python bench/bench_context_parallel.py [--tokens-per-rank 2048] [--heads 4] [--head-dim 64]
        [--reps 5] [--threads 1] [--out bench/results/context-parallel-<date>-<host>.json]

The script starts the ranks itself (torch.multiprocessing, gloo over 127.0.0.1). Each rank:

1. probes the two numbers the cost model needs (docs/context_parallel.md): the ring exchange's
   bandwidth (every rank sends a buffer to the next and receives one from the previous, as the
   ring does) and the local kernel's throughput (one full n×n call, backend "cpu");
2. from them, the model's crossover — the tokens per rank above which a K/V transfer takes less
   time than the kernel on one shard pair — for full and causal (zigzag) attention;
3. times ``context_parallel_attention`` (ring, forward and forward+backward) two ways, interleaved
   rep by rep: as is, and with the P2P exchange replaced by a stub that hands back the local K/V
   (same calls, same merges, no communication) — "compute alone". Each time is the slowest
   rank's; the JSON has every rep, the medians, their ratio, and the median of the per-rep
   ratios (both modes timed back to back, so less exposed to a load that drifts), and the
   ring's time blocked on transfers (``comm_wait_s``).

``--device cuda`` runs the same protocol under NCCL, one GPU per rank, bfloat16 (written for the
GPU machines, not yet run on one).

The goal: time with communication <= 1.1 × compute alone at a size the model says hides. The
machine's load average is recorded before and after; a busy machine (load above its core
count) is flagged in the JSON, since other processes then share the cores the ranks and gloo's
transfer threads need.
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
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
DTYPE = torch.float32


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


DEVICE = torch.device("cpu")
KERNEL_BACKEND = "cpu"


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _max_over_ranks(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=DEVICE)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def probe_bandwidth(nbytes: int, reps: int) -> float:
    """Bytes/s one rank moves to its neighbour while receiving from the other (the ring pattern)."""
    from flashlite.distributed.comm import Stats, exchange

    rank, world = dist.get_rank(), dist.get_world_size()
    send = torch.randn(nbytes // 4, device=DEVICE)
    recv = torch.empty_like(send)
    stats = Stats("probe", "-", rank, world)
    times = []
    for i in range(reps + 1):
        dist.barrier()
        start = time.perf_counter()
        exchange([(send, (rank + 1) % world)], [(recv, (rank - 1) % world)], None, stats, "probe").wait()
        _sync()
        if i:
            times.append(_max_over_ranks(time.perf_counter() - start))
    return nbytes / statistics.median(times)


def probe_kernel(n: int, heads: int, head_dim: int, reps: int) -> float:
    """FLOP/s of one full n×n forward call of the local kernel."""
    import flashlite
    from flashlite import dispatch

    q, k, v = (torch.randn(1, heads, n, head_dim, device=DEVICE, dtype=DTYPE) for _ in range(3))
    times = []
    for i in range(reps + 1):
        _sync()
        start = time.perf_counter()
        dispatch.run(q, k, v, flashlite.Full(), scale=head_dim ** -0.5, softcap=0.0, alibi_slopes=None,
                     backend=KERNEL_BACKEND)
        _sync()
        if i:
            times.append(time.perf_counter() - start)
    return 4 * n * n * head_dim * heads / statistics.median(times)


class _NoComm:
    """Stands in for ``comm.exchange``: the "received" shard is the one sent (no transfer)."""

    def __init__(self, sends, recvs, group, stats, phase):
        self.buffers = tuple(t for t, _ in sends)

    def wait(self) -> None:
        pass


def time_ring(pattern, layout: str, n: int, heads: int, head_dim: int, reps: int, backward: bool):
    """{"with_comm": s, "compute_alone": s, ...}: medians over reps of the slowest rank."""
    from flashlite import distributed as fld
    from flashlite.distributed import ring

    real = ring.exchange
    q, k, v = (torch.randn(1, heads, n, head_dim, device=DEVICE, dtype=DTYPE).requires_grad_(backward)
               for _ in range(3))
    grad = torch.randn(1, heads, n, head_dim, device=DEVICE, dtype=DTYPE)
    found = {"with_comm": [], "compute_alone": []}
    waits = []
    for i in range(reps + 1):
        for mode in ("with_comm", "compute_alone"):
            ring.exchange = real if mode == "with_comm" else _NoComm
            try:
                dist.barrier()
                _sync()
                start = time.perf_counter()
                out = fld.context_parallel_attention(q, k, v, pattern, layout=layout, backend=KERNEL_BACKEND)
                if backward:
                    (out * grad).sum().backward()
                _sync()
                elapsed = time.perf_counter() - start
            finally:
                ring.exchange = real
            slowest = _max_over_ranks(elapsed)
            if i:
                found[mode].append(slowest)
                if mode == "with_comm":
                    s = fld.last_stats()
                    waits.append(sum(s.get(p, {}).get("comm_wait_s", 0.0) for p in ("forward", "backward")))
            q.grad = k.grad = v.grad = None
    out = {mode: statistics.median(ts) for mode, ts in found.items()}
    out["ratio"] = out["with_comm"] / out["compute_alone"]
    # each rep times both modes back to back: the median of those paired ratios is less exposed to
    # a machine whose load drifts during the run
    out["ratio_paired_median"] = statistics.median(w / a for w, a in zip(found["with_comm"], found["compute_alone"]))
    out["comm_wait_s_median_rank"] = statistics.median(waits)
    out["all_with_comm"], out["all_compute_alone"] = found["with_comm"], found["compute_alone"]
    return out


def rank_main(rank: int, world: int, init: str, args, result_path: str) -> None:
    global DEVICE, KERNEL_BACKEND, DTYPE
    if args.device == "cuda":  # one GPU per rank, NCCL; the kernel backend chosen automatically
        torch.cuda.set_device(rank)
        DEVICE, KERNEL_BACKEND, DTYPE = torch.device("cuda", rank), None, torch.bfloat16
    else:
        torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", init_method=init, rank=rank,
                            world_size=world)
    import flashlite

    heads, head_dim = args.heads, args.head_dim
    runs = []
    for n in [int(x) for x in str(args.tokens_per_rank).split(",")]:
        elem = torch.tensor([], dtype=DTYPE).element_size()
        kv_bytes = 2 * heads * n * head_dim * elem  # one K/V shard
        bandwidth = probe_bandwidth(kv_bytes, args.reps)
        flops = probe_kernel(n, heads, head_dim, args.reps)
        # The model (docs/context_parallel.md): a ring step hides its transfer when the kernel on one
        # shard pair takes at least as long. Full, forward: 4·n²·d·h flops vs K+V = 2·n·d·h·b bytes
        # -> n* = b·F / (2·BW). Forward+backward: 3.5x the flops; K/V twice plus the float32 dK/dV
        # accumulator -> 2·n·d·h·(2b + 4) bytes -> n* = (2b + 4)·F / (7·BW). Causal (zigzag): a step
        # after the first computes half a shard pair -> twice those.
        b = elem
        n_fwd = b * flops / (2 * bandwidth)
        n_fb = (2 * b + 4) * flops / (7 * bandwidth)
        model = {"bandwidth_GBps": bandwidth / 1e9, "kernel_GFLOPs": flops / 1e9,
                 "crossover_tokens_per_rank": {"full_forward": n_fwd, "causal_forward": 2 * n_fwd,
                                               "full_forward_backward": n_fb, "causal_forward_backward": 2 * n_fb},
                 "predicted_transfer_s_per_step": kv_bytes / bandwidth,
                 "predicted_kernel_s_per_step_full": 4 * n * n * head_dim * heads / flops}
        cases = {}
        for name, pattern, layout in (("full", flashlite.Full(), "contiguous"),
                                      ("causal", flashlite.Full(causal=True), "zigzag")):
            for backward in (False, True):
                key = f"{name}-{layout}-{'forward_backward' if backward else 'forward'}"
                cases[key] = time_ring(pattern, layout, n, heads, head_dim, args.reps, backward)
        # forward over P ranks: each of the first P-1 steps takes max(kernel, transfer of the next
        # shard), the last one the kernel alone; a causal zigzag step is half a full pair
        c_full = model["predicted_kernel_s_per_step_full"]
        t = model["predicted_transfer_s_per_step"]
        model["predicted_ratio_forward"] = {
            kind: ((world - 1) * max(c, t) + c) / (world * c) for kind, c in (("full", c_full), ("causal", c_full / 2))}
        runs.append({"tokens_per_rank": n, "model": model, "cases": cases})
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump({"runs": runs}, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description="ring attention: time with communication vs compute alone (gloo)")
    parser.add_argument("--tokens-per-rank", default="2048",
                        help="tokens per rank, or several, comma-separated (e.g. 64,256,2048)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: NCCL, one GPU per rank, bfloat16 (not yet run on a GPU)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import flashlite

    load_before = os.getloadavg()
    start = time.time()
    folder = tempfile.mkdtemp(prefix="flashlite-cp-bench-")
    result_path = os.path.join(folder, "result.json")
    mp.spawn(rank_main, args=(args.world, f"file://{folder}/init", args, result_path), nprocs=args.world)
    with open(result_path) as f:
        found = json.load(f)
    load_after = os.getloadavg()
    cores = os.cpu_count() or 1
    busy = max(load_before[0], load_after[0]) > cores
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    now = datetime.datetime.now()
    report = {
        "benchmark": "bench/bench_context_parallel.py",
        "command": " ".join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else "python"]
                            + [os.path.relpath(os.path.abspath(__file__), ROOT)] + sys.argv[1:]),
        "date": now.isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "hostname": socket.gethostname(), "logical_cpus": cores,
                    "load_average_before": load_before, "load_average_after": load_after,
                    "busy": busy,
                    "note": ("the machine was busy (load average above its core count): other processes shared "
                             "the cores, so times are noisy and the communication's CPU cost shows more")
                    if busy else "load average at or below the core count"},
        "versions": {"torch": torch.__version__, "flashlite": flashlite.__version__,
                     "python": platform.python_version(), "git_commit": commit},
        "setup": {"world_size": args.world, "backend_dist": "nccl" if args.device == "cuda" else "gloo",
                  "kernel_backend": "auto" if args.device == "cuda" else "cpu",
                  "dtype": "bfloat16" if args.device == "cuda" else "float32",
                  "tokens_per_rank": [int(x) for x in str(args.tokens_per_rank).split(",")], "heads": args.heads, "head_dim": args.head_dim,
                  "batch": 1, "threads_per_rank": args.threads, "reps": args.reps,
                  "statistic": "median over reps of the slowest rank's wall time"},
        **found,
        "wall_seconds": time.time() - start,
    }
    out = args.out or str(ROOT / "bench" / "results" /
                          f"context-parallel-{now.strftime('%Y%m%d-%H%M%S')}-{socket.gethostname()}.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    for run in found["runs"]:
        m = run["model"]
        cross = m["crossover_tokens_per_rank"]
        print(f"{run['tokens_per_rank']} tokens/rank: ring exchange {m['bandwidth_GBps']:.2f} GB/s, kernel "
              f"{m['kernel_GFLOPs']:.1f} GFLOP/s -> model crossover {cross['full_forward']:.0f} tokens/rank (full), "
              f"{cross['causal_forward']:.0f} (causal); predicted forward ratio "
              f"{m['predicted_ratio_forward']['full']:.3f} (full), {m['predicted_ratio_forward']['causal']:.3f} (causal)")
        print(f"  {'case':<34} {'with comm s':>12} {'compute alone s':>16} {'ratio':>7} {'paired':>7} {'wait s':>7}")
        for key, c in run["cases"].items():
            print(f"  {key:<34} {c['with_comm']:>12.4f} {c['compute_alone']:>16.4f} {c['ratio']:>7.3f} "
                  f"{c['ratio_paired_median']:>7.3f} {c['comm_wait_s_median_rank']:>7.4f}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} on {cores} cores"
          + (" (busy: see the JSON's note)" if busy else ""))
    print(f"wrote {os.path.relpath(out, ROOT)}")


if __name__ == "__main__":
    main()
