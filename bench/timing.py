"""Timing protocol (docs/design.md § Benchmark protocol): warm-up, then the median of repeated timed calls.

* GPU: each call is bracketed by its own pair of CUDA events (the same method as
  ``triton.testing.do_bench``); before each call a buffer of twice the L2 size is zeroed
  (outside the events) and the inputs rotate over several copies whose total exceeds the L2,
  so the cache is not what is measured. The median of the per-call times is reported.
* CPU: wall-clock (``time.perf_counter``) per call, median, with the inputs rotated beyond the
  last-level cache; the thread count (``torch.get_num_threads()``) is recorded in the report.

``measure_peak`` measures the device's matmul FLOP/s and copy bandwidth for the "% of peak" column.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch


@dataclass
class Stats:
    median_ms: float
    min_ms: float
    p20_ms: float
    p80_ms: float
    reps: int

    def to_json(self) -> dict:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "p20_ms": self.p20_ms, "p80_ms": self.p80_ms,
                "reps": self.reps}


def _stats(times_ms: List[float]) -> Stats:
    ordered = sorted(times_ms)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return Stats(statistics.median(ordered), ordered[0], quantile(0.2), quantile(0.8), len(ordered))


def cache_bytes(device: torch.device) -> int:
    """The L2 size of a GPU, or the last-level cache of the CPU (32 MiB if unknown)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    for index in (3, 2):
        path = f"/sys/devices/system/cpu/cpu0/cache/index{index}/size"
        try:
            text = open(path).read().strip().upper()
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
            return int(text.rstrip("KMG")) * scale
        except (OSError, ValueError):
            continue
    return 32 * 2**20


def rotation_sets(set_bytes: int, device: torch.device, limit: Optional[int] = None) -> int:
    """How many copies of the inputs to rotate so that together they exceed twice the cache
    (at most 8 on a GPU; 4 on a CPU, where calls are long next to a cache refill)."""
    limit = limit or (8 if torch.device(device).type == "cuda" else 4)
    need = -(-2 * cache_bytes(torch.device(device)) // max(1, set_bytes))
    return int(max(1, min(limit, need)))


class Timer:
    """Times callables on one device. ``target_s`` is the time spent in timed calls per measurement."""

    def __init__(self, device: torch.device, target_s: float = 0.2, min_reps: int = 3, max_reps: int = 500):
        self.device = torch.device(device)
        self.target_s = target_s
        self.min_reps = min_reps
        self.max_reps = max_reps
        self._flush: Optional[torch.Tensor] = None
        if self.device.type == "cuda":
            self._flush = torch.empty(2 * cache_bytes(self.device) // 4, dtype=torch.int32, device=self.device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, calls: Sequence[Callable[[], object]], warmup: int = 2) -> Stats:
        """Median time of ``calls[i % len(calls)]()`` over repeated calls, after ``warmup`` untimed
        calls (on a GPU at least one per input copy)."""
        if not calls:
            raise ValueError("calls must be a non-empty sequence of callables")
        count = max(warmup, len(calls)) if self.device.type == "cuda" else warmup
        for i in range(count):
            calls[i % len(calls)]()
        self.sync()
        if self.device.type == "cuda":
            return self._time_cuda(calls)
        return self._time_wall(calls)

    def _time_cuda(self, calls: Sequence[Callable[[], object]]) -> Stats:
        # estimate one call, then choose the repetitions to fill target_s
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for i in range(3):
            calls[i % len(calls)]()
        end.record()
        torch.cuda.synchronize(self.device)
        per_call_ms = max(begin.elapsed_time(end) / 3, 1e-3)
        reps = int(max(self.min_reps, min(self.max_reps, self.target_s * 1e3 / per_call_ms)))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            self._flush.zero_()  # evict the L2 (not timed)
            starts[i].record()
            calls[i % len(calls)]()
            ends[i].record()
        torch.cuda.synchronize(self.device)
        return _stats([s.elapsed_time(e) for s, e in zip(starts, ends)])

    def _time_wall(self, calls: Sequence[Callable[[], object]]) -> Stats:
        times: List[float] = []
        spent = 0.0
        while len(times) < self.max_reps and (len(times) < self.min_reps or spent < self.target_s):
            call = calls[len(times) % len(calls)]
            start = time.perf_counter()
            call()
            self.sync()
            elapsed = time.perf_counter() - start
            times.append(elapsed * 1e3)
            spent += elapsed
        return _stats(times)

    def peak_memory(self, call: Callable[[], object]) -> Optional[int]:
        """Bytes allocated by one call beyond what was allocated before it (GPU only; None on CPU)."""
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        result = call()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del result
        return int(peak)


def measure_peak(device: torch.device, dtypes: Sequence[str]) -> Dict[str, object]:
    """Measured matmul TFLOP/s per dtype and copy bandwidth (GB/s) of ``device``, from the fastest
    timed call (a peak is the best the device reaches, not its median).

    GPU: square matmuls of 8192 (4096 for float32) and a 1 GiB copy; CPU: matmuls of 1024 and a
    256 MiB copy. Returns ``{"matmul_tflops": {dtype: x}, "copy_gbps": y, "method": ...}``.
    """
    from .cases import DTYPE_NAMES

    device = torch.device(device)
    timer = Timer(device, target_s=0.5 if device.type == "cuda" else 0.3)
    on_gpu = device.type == "cuda"
    result: Dict[str, object] = {"matmul_tflops": {}, "matmul_n": {}}
    for name in dtypes:
        dtype = DTYPE_NAMES[name]
        n = (4096 if dtype == torch.float32 else 8192) if on_gpu else 1024
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        try:
            stats = timer.time([lambda: torch.mm(a, b)])
        except RuntimeError as exc:  # e.g. a dtype without a CPU matmul
            result["matmul_tflops"][name] = None  # type: ignore[index]
            result.setdefault("errors", []).append(f"matmul {name}: {exc}")  # type: ignore[union-attr]
            continue
        result["matmul_tflops"][name] = 2 * n**3 / (stats.min_ms * 1e-3) / 1e12  # type: ignore[index]
        result["matmul_n"][name] = n  # type: ignore[index]
        del a, b
    nbytes = 2**30 if on_gpu else 2**28
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    stats = timer.time([lambda: dst.copy_(src)])
    result["copy_gbps"] = 2 * nbytes / (stats.min_ms * 1e-3) / 1e9  # read + write
    result["copy_bytes"] = nbytes
    result["method"] = ("fastest of the timed torch.mm calls (2*n^3 FLOP) and tensor.copy_ calls (2*bytes "
                        "moved), same timer as the cases: the best the device reached")
    if device.type == "cpu":
        result["threads"] = torch.get_num_threads()
    del src, dst
    if on_gpu:
        torch.cuda.empty_cache()
    return result


def cpu_threads() -> Dict[str, int]:
    return {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count() or 0}
