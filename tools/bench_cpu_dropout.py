"""Dropout overhead on the cpu backend (issue 16 item 2): [1, 8, 1024, 64] causal, fp32 / bf16,
forward and forward+backward, dropout_p 0.1 vs 0.0 interleaved (median and min of N rounds).

Usage: .venv/bin/python tools/bench_cpu_dropout.py [rounds]   (threads: OMP_NUM_THREADS / torch's)
"""
import statistics
import sys
import time

import torch

import flashlite
from flashlite import Full

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
print("threads", torch.get_num_threads(), "isa", __import__("flashlite._C", fromlist=["x"]).cpu_isa())
for dtype in (torch.float32, torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 1024, 64, generator=g).to(dtype) for _ in range(3))
    grad = torch.randn(1, 8, 1024, 64, generator=g).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def fwd(p):
        with torch.no_grad():
            flashlite.attention(q, k, v, Full(True), dropout_p=p, backend="cpu")

    def fwdbwd(p):
        out = flashlite.attention(*leaves, Full(True), dropout_p=p, backend="cpu")
        torch.autograd.grad(out, leaves, grad)

    for name, fn in (("forward", fwd), ("fwd+bwd", fwdbwd)):
        times = {0.0: [], 0.1: []}
        for p in (0.0, 0.1):
            fn(p)  # warm-up (plan cache)
        for _ in range(rounds):
            for p in (0.0, 0.1):
                t0 = time.perf_counter()
                fn(p)
                times[p].append(time.perf_counter() - t0)
        a, b = statistics.median(times[0.0]) * 1e3, statistics.median(times[0.1]) * 1e3
        print(f"{str(dtype):15s} {name:8s} p=0: {a:7.2f} ms  p=0.1: {b:7.2f} ms  overhead {100 * (b / a - 1):+.0f}%"
              f"  (min {min(times[0.0]) * 1e3:.2f} / {min(times[0.1]) * 1e3:.2f})")
