"""Head statistics' cost on the cpu backend (issue 18 goal: attention_stats <= 1.15x a plain
forward at N = 2048): [1, 8, 2048, 64] causal, fp32 (and bf16), flashlite.attention_stats vs
flashlite.attention (no grad), interleaved in one process; min and median of N rounds, ratio of
the mins. Also the forward+backward with a loss on out + entropy vs on out alone.

Usage: .venv/bin/python tools/bench_cpu_stats.py [rounds] [--backward] [--cpu-time]
(threads: OMP_NUM_THREADS / torch's; run when `uptime`'s load is low. --cpu-time: time.thread_time
instead of wall time, meaningful with one thread only (OMP_NUM_THREADS=1: the kernels run on the
calling thread), and far less disturbed by a busy machine)
"""
import statistics
import sys
import time

import torch

import flashlite
from flashlite import Full

args = [a for a in sys.argv[1:] if not a.startswith("--")]
rounds = int(args[0]) if args else 9
backward = "--backward" in sys.argv
clock = time.thread_time if "--cpu-time" in sys.argv else time.perf_counter
with open("/proc/loadavg") as f:
    load = f.read().split()[0]
print("threads", torch.get_num_threads(), "isa", __import__("flashlite._C", fromlist=["x"]).cpu_isa(), "load", load,
      "clock", clock.__name__, "rounds", rounds)
for dtype in (torch.float32, torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2048, 64, generator=g).to(dtype) for _ in range(3))
    grad = torch.randn(1, 8, 2048, 64, generator=g).to(dtype)
    grad_h = torch.randn(1, 8, 2048, generator=g)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def fwd(stats):
        with torch.no_grad():
            if stats:
                flashlite.attention_stats(q, k, v, Full(True), backend="cpu")
            else:
                flashlite.attention(q, k, v, Full(True), backend="cpu")

    def fwdbwd(stats):
        if stats:
            out, st = flashlite.attention_stats(*leaves, Full(True), backend="cpu")
            torch.autograd.grad((out, st.entropy), leaves, (grad, grad_h))
        else:
            out = flashlite.attention(*leaves, Full(True), backend="cpu")
            torch.autograd.grad(out, leaves, grad)

    for name, fn in (("forward", fwd),) + ((("fwd+bwd", fwdbwd),) if backward else ()):
        times = {False: [], True: []}
        for s in (False, True):
            fn(s)  # warm-up (plan cache)
        for _ in range(rounds):
            for s in (False, True):
                t0 = clock()
                fn(s)
                times[s].append(clock() - t0)
        a, b = min(times[False]) * 1e3, min(times[True]) * 1e3
        print(f"{str(dtype):15s} {name:8s} plain: {a:7.2f} ms  stats: {b:7.2f} ms  ratio {b / a:.3f}"
              f"  (medians {statistics.median(times[False]) * 1e3:.2f} / {statistics.median(times[True]) * 1e3:.2f})")
