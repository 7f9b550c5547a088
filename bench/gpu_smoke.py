"""A small run of every CUDA-side kernel, for compute-sanitizer (bench/gpu_suite.sh runs it under
racecheck and synccheck first, before anything is timed): each pattern, forward and backward, on
the cuda and triton backends, at odd small shapes, checked against the reference.

Usage: python bench/gpu_smoke.py [--backends cuda,triton]. Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import sys

import torch

import flashlite
from flashlite import BlockSparse, Full, SlidingWindow, TopK


def patterns(batch: int, heads_kv: int, seqlen_q: int, seqlen_k: int, device) -> dict:
    return {
        "causal": Full(True),
        "window": SlidingWindow(19, 3),
        "block_sparse": BlockSparse(torch.rand(1, 1, -(-seqlen_q // 64), -(-seqlen_k // 64), device=device) < 0.5,
                                    64),
        "topk": TopK(torch.randint(-1, seqlen_k, (batch, heads_kv, seqlen_q, 24), device=device), causal=True),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="cuda,triton", help="comma-separated backends (default: cuda,triton)")
    opts = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device")
        return 1
    device = torch.device("cuda")
    torch.manual_seed(0)
    batch, heads_q, heads_kv, seqlen_q, seqlen_k = 1, 4, 2, 77, 131
    failures = 0
    available = flashlite.backends()
    for name in opts.backends.split(","):
        if available.get(name) != "available":
            print(f"{name}: skipped ({available.get(name)})")
            continue
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for head_dim in (64, 128):
                for label, pattern in patterns(batch, heads_kv, seqlen_q, seqlen_k, device).items():
                    q, k, v = (torch.randn(batch, h, n, head_dim, device=device, dtype=dtype, requires_grad=True)
                               for h, n in ((heads_q, seqlen_q), (heads_kv, seqlen_k), (heads_kv, seqlen_k)))
                    try:
                        out = flashlite.attention(q, k, v, pattern, backend=name)
                        out.float().square().sum().backward()
                        want = flashlite.reference.attention(q.float(), k.float(), v.float(), pattern)
                        error = float((out.float() - want).abs().max())
                        ok = error < (2e-3 if dtype == torch.float32 else 5e-2)
                    except Exception as exc:  # reported, the run goes on
                        ok, error = False, f"{type(exc).__name__}: {exc}"
                    torch.cuda.synchronize()
                    failures += not ok
                    print(f"{name} {str(dtype)[6:]} d{head_dim} {label}: {'ok' if ok else 'FAILED'} ({error})")
    print(f"gpu_smoke: {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
