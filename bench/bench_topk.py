"""Top-k attention vs full attention: time and peak memory against sequence length.

For each sequence length ``n`` (self-attention, causal, ``Nq = Nk = n``) it times

* full causal attention (flashlite's kernel on the chosen backend, and PyTorch SDPA as the peer),
* top-k attention with ``k`` = 16, 64, 256 keys per query, with two kinds of indices:
  ``marks`` - from ``flashlite.selection.from_marks`` (marks spread over the sequence, 4 sinks and a
  recent window; the rows of a query tile share most keys) and ``random`` - distinct random keys per
  query (stratified; memory-bound gathers),

and records the median time (``bench.timing.Timer``: warm-up, rotated inputs, CUDA events on a GPU),
the peak extra memory of one call (CUDA allocator on a GPU; the PyTorch profiler's allocation trace
on CPU), the speedup over full attention and, for top-k, the gathered bytes per second. Small
sizes are checked against the reference first. Results go to ``bench/results/topk-<time>-<device>.json``.

    python bench/bench_topk.py                  # CPU: n = 256 … 4096, backends cpu + reference
    python bench/bench_topk.py --device cuda    # GPU: n = 1k … 64k, backends triton (+ cuda if built)

Nothing here is a test; numbers are only what the run measured on its machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.timing import cpu_peak_bytes  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def marks_indices(batch: int, n: int, k: int, device) -> torch.Tensor:
    """from_marks with k/2 marks spread evenly, 4 sinks and a window filling the rest (<= k keys per query)."""
    from flashlite import selection

    sinks = min(4, k)
    marks = k // 2
    window = max(1, k - marks - sinks)
    positions = torch.linspace(0, n - 1, steps=marks + 2)[1:-1].round().long().unique().tolist() if marks else []
    return selection.from_marks(positions, n, window=window, sinks=sinks, batch=batch, dtype=torch.int32,
                                device=device)


def random_indices(batch: int, heads_kv: int, n: int, k: int, device, seed: int = 0) -> torch.Tensor:
    from bench.cases import stratified_indices

    generator = torch.Generator().manual_seed(seed)
    return stratified_indices(batch, heads_kv, n, n, k, generator).to(device)


def run(args) -> dict:
    import flashlite
    from bench.timing import Timer, measure_peak

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    timer = Timer(device, target_s=args.target_s)
    available = flashlite.backends()
    backends = [b for b in args.backends if available.get(b) == "available"]
    skipped = {b: available.get(b, "unknown") for b in args.backends if b not in backends}
    B, H, Hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
    rows: List[Dict[str, object]] = []
    started = time.time()

    def peak_of(call) -> Optional[int]:
        return timer.peak_memory(call) if device.type == "cuda" else cpu_peak_bytes(call)

    def record(**row) -> None:
        rows.append(row)
        ms = row.get("median_ms")
        print(f"  n={row['seqlen']:>6} {row['kind']:>5} k={str(row.get('k', '-')):>4} {row.get('indices', ''):>6} "
              f"{row['backend']:>9}: " + (f"{ms:9.3f} ms" if ms is not None else f"skipped ({row.get('error')})")
              + (f"  peak {row['peak_bytes'] / 2**20:8.2f} MiB" if row.get("peak_bytes") is not None else ""),
              flush=True)

    for n in args.seqlens:
        if time.time() - started > args.budget_s:
            print(f"time budget of {args.budget_s}s spent: stopping before n={n}")
            break
        sets = 2 if device.type == "cuda" else 1
        inputs = [tuple(torch.randn(B, heads, n, D, device=device, dtype=dtype) for heads in (H, Hkv, Hkv))
                  for _ in range(sets)]
        full_ms: Dict[str, float] = {}
        # -- full causal attention ---------------------------------------------------------
        peers = [("sdpa", lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=H != Hkv))]
        for backend in backends:
            if backend == "reference" and n > args.reference_max:
                continue
            peers.append((backend, lambda q, k, v, b=backend: flashlite.flash_attention(q, k, v, causal=True,
                                                                                        backend=b)))
        for name, fn in peers:
            try:
                stats = timer.time([lambda t=t: fn(*t) for t in inputs])
                peak = peak_of(lambda: fn(*inputs[0]))
            except Exception as exc:  # a backend that cannot run this size: recorded, not fatal
                record(seqlen=n, kind="full", backend=name, median_ms=None, error=f"{type(exc).__name__}: {exc}"[:200])
                continue
            full_ms[name] = stats.median_ms
            record(seqlen=n, kind="full", backend=name, median_ms=stats.median_ms, p20_ms=stats.p20_ms,
                   p80_ms=stats.p80_ms, peak_bytes=peak, flops=4 * B * H * n * n * D / 2)
        # -- top-k -------------------------------------------------------------------------
        for k in args.ks:
            if k > n:
                continue
            for kind in args.indices:
                indices = (marks_indices(B, n, k, device) if kind == "marks"
                           else random_indices(B, Hkv, n, k, device))
                keys_per_query = float(flashlite.TopK(indices, causal=True).keys_per_query(n, n).float().mean())
                for backend in backends:
                    if backend == "reference" and n > args.reference_max:
                        continue
                    call = lambda q, kk, v, b=backend, ind=indices: flashlite.topk_attention(q, kk, v, ind, causal=True,
                                                                                             backend=b)
                    error = None
                    if n <= args.validate_max:
                        q, kk, v = inputs[0]
                        got = call(q, kk, v).float()
                        want = flashlite.reference.attention(q.float(), kk.float(), v.float(),
                                                             flashlite.TopK(indices, causal=True))
                        error = float((got - want).abs().max())
                    try:
                        stats = timer.time([lambda t=t: call(*t) for t in inputs])
                        peak = peak_of(lambda: call(*inputs[0]))
                    except Exception as exc:
                        record(seqlen=n, kind="topk", k=k, indices=kind, backend=backend, median_ms=None,
                               error=f"{type(exc).__name__}: {exc}"[:200])
                        continue
                    gathered = B * Hkv * n * keys_per_query * D * 2 * inputs[0][1].element_size()  # k and v rows
                    io = 2 * B * H * n * D * inputs[0][0].element_size()  # q in, out
                    reference_full = full_ms.get(backend) or full_ms.get("sdpa")
                    record(seqlen=n, kind="topk", k=k, indices=kind, backend=backend, median_ms=stats.median_ms,
                           p20_ms=stats.p20_ms, p80_ms=stats.p80_ms, peak_bytes=peak, keys_per_query=keys_per_query,
                           gathered_gbps=(gathered + io) / (stats.median_ms * 1e-3) / 1e9,
                           speedup_vs_full=(reference_full / stats.median_ms) if reference_full else None,
                           max_error_vs_reference=error)
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()

    report = {
        "script": "bench/bench_topk.py",
        "argv": sys.argv[1:],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": {"batch": B, "heads": H, "kv_heads": Hkv, "head_dim": D, "dtype": args.dtype, "causal": True,
                   "seqlens": args.seqlens, "ks": args.ks, "indices": args.indices},
        "backends": backends,
        "skipped_backends": skipped,
        "peak": measure_peak(device, [args.dtype]) if args.measure_peak else None,
        "rows": rows,
        "notes": ("median of timed calls (bench.timing.Timer); peak_bytes: extra bytes one call allocates "
                  "(CUDA allocator on GPU, PyTorch profiler allocation trace on CPU); gathered_gbps counts the "
                  "gathered k/v rows plus q and out once; speedup_vs_full divides the same backend's full causal "
                  "time (else SDPA's) by the top-k time."),
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        pass
    return report


def main(argv=None) -> int:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if on_gpu else "cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--seqlens", default=None, help="comma-separated sequence lengths")
    parser.add_argument("--ks", default="16,64,256")
    parser.add_argument("--indices", default="marks,random")
    parser.add_argument("--backends", default=None, help="default: triton,cuda on GPU; cpu,reference on CPU")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=None)
    parser.add_argument("--reference-max", type=int, default=2048, help="largest n for the O(n^2) reference backend")
    parser.add_argument("--validate-max", type=int, default=2048, help="largest n checked against the reference")
    parser.add_argument("--target-s", type=float, default=None, help="timed seconds per measurement")
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop starting new lengths after this")
    parser.add_argument("--measure-peak", action="store_true", help="also measure matmul/copy peaks of the device")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    if gpu and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET to benchmark on a GPU")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.seqlens = [int(x) for x in (args.seqlens or ("1024,2048,4096,8192,16384,32768,65536" if gpu
                                                      else "256,512,1024,2048,4096")).split(",")]
    args.ks = [int(x) for x in args.ks.split(",")]
    args.indices = [x for x in args.indices.split(",") if x]
    bad = [x for x in args.indices if x not in ("marks", "random")]
    if bad:
        parser.error(f"--indices takes marks and/or random, got {bad}")
    args.backends = (args.backends or ("triton,cuda" if gpu else "cpu,reference")).split(",")
    args.heads = args.heads or (16 if gpu else 4)
    args.kv_heads = args.kv_heads or args.heads
    args.head_dim = args.head_dim or (128 if gpu else 64)
    args.target_s = args.target_s or (0.2 if gpu else 0.1)

    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    out = args.out or ROOT / "bench" / "results" / f"topk-{time.strftime('%Y%m%d-%H%M%S')}-{report['device_type']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
