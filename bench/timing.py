"""Timing protocol (docs/design.md § Benchmark protocol): warm-up, then the median of repeated
timed calls, repeated until the median is known to ±3 % or a time cap is reached.

* GPU: each call is bracketed by its own pair of CUDA events (the same method as
  ``triton.testing.do_bench``); before each call a buffer of twice the L2 size is zeroed
  (outside the events) and the inputs rotate over several copies whose total exceeds the L2,
  so the cache is not what is measured.
* CPU: wall-clock (``time.perf_counter``) per call, with the inputs rotated beyond the
  last-level cache; the thread count (``torch.get_num_threads()``) is recorded in the report.

**Shared machines.** ``Timer.time_interleaved`` times several implementations of one case
*interleaved*: in rounds, each implementation runs a short batch of calls (about as long as one
call of the slowest, so each gets a similar share of every second), the order rotating each round,
so a burst of other work on the machine hits all of them rather than one. Repetitions are
adaptive: an implementation leaves the rotation once it has run ``min_reps`` calls and
``target_s`` seconds and the 95 % confidence interval of its median (distribution-free, from
order statistics) is within ``±rel_ci`` (3 %); one that reaches ``max_s`` seconds of timed calls
first stops there and is *noisy*. If any is noisy the whole group is measured once more, and the
attempt whose widest interval is narrower is kept; rows still noisy carry ``noisy: true`` and
their interval (``ci_pct``) in their stats. The clock is injectable (``clock=``), so the rule is
tested with synthetic durations (tests/test_timer.py).

``measure_peak`` measures the device's peaks for the "% of peak" column: on a GPU the matmul
FLOP/s and copy bandwidth; on a CPU also the processor's own FMA limit (a register-resident FMA
loop in flashlite._C, per thread count) and its stream-copy bandwidth.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

#: the z value of a two-sided 95 % interval
Z95 = 1.959964


@dataclass
class Stats:
    median_ms: float
    min_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    ci_low_ms: float = float("nan")  # 95 % confidence interval of the median (order statistics)
    ci_high_ms: float = float("nan")
    rel_ci: float = 0.03  # the target: the interval within ±rel_ci of the median
    noisy: bool = False  # the target was not met within the time cap (after the re-measurement, if any)
    attempts: int = 1  # 2 when the group was re-measured
    spent_s: float = 0.0  # time in timed calls (this attempt)
    other_attempt_ms: Optional[float] = None  # the median of the attempt that was not kept

    @property
    def ci_pct(self) -> float:
        """Half-width of the median's 95 % interval, in % of the median (the larger side)."""
        if not (self.median_ms > 0) or math.isnan(self.ci_low_ms):
            return float("inf")
        return 100.0 * max(self.median_ms - self.ci_low_ms, self.ci_high_ms - self.median_ms) / self.median_ms

    def to_json(self) -> dict:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "p20_ms": self.p20_ms, "p80_ms": self.p80_ms,
                "reps": self.reps, "ci_low_ms": self.ci_low_ms, "ci_high_ms": self.ci_high_ms,
                "ci_pct": self.ci_pct, "target_ci_pct": 100 * self.rel_ci, "noisy": self.noisy,
                "attempts": self.attempts, "spent_s": self.spent_s, "other_attempt_ms": self.other_attempt_ms}


def median_ci(ordered: Sequence[float]) -> tuple:
    """The 95 % confidence interval of the median of sorted samples, from order statistics
    (ranks n/2 ∓ 1.96·√n/2, the normal approximation of the binomial; no assumption about the
    distribution of the times). With 5 samples or fewer it is [min, max]."""
    n = len(ordered)
    if n == 0:
        return float("nan"), float("nan")
    half = Z95 * math.sqrt(n) / 2
    lo = max(0, math.floor(n / 2 - half) - 1)  # 1-based rank floor(n/2 - half), as a 0-based index
    hi = min(n - 1, math.ceil(1 + n / 2 + half) - 1)
    return ordered[lo], ordered[hi]


def _stats(times_ms: List[float], rel_ci: float = 0.03) -> Stats:
    ordered = sorted(times_ms)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    low, high = median_ci(ordered)
    return Stats(statistics.median(ordered), ordered[0], quantile(0.2), quantile(0.8), len(ordered), low, high, rel_ci)


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


Calls = Sequence[Callable[[], object]]


class Timer:
    """Times callables on one device.

    ``target_s``: the least time spent in timed calls per implementation and measurement;
    ``rel_ci``: the half-width of the median's 95 % interval to reach (a fraction of the median);
    ``max_s``: the time cap per implementation and attempt (default ``10 * target_s``);
    ``remeasure``: measure a group once more when a member misses ``rel_ci``;
    ``clock``: seconds, ``time.perf_counter`` by default (CPU; the GPU uses CUDA events).
    """

    def __init__(self, device: torch.device, target_s: float = 0.2, min_reps: int = 3, max_reps: int = 20000,
                 rel_ci: float = 0.03, max_s: Optional[float] = None, remeasure: bool = True,
                 clock: Optional[Callable[[], float]] = None, min_slice_s: float = 0.01, max_batch: int = 1000):
        self.device = torch.device(device)
        self.target_s = target_s
        self.min_reps = max(1, min_reps)
        self.max_reps = max(self.min_reps, max_reps)
        self.rel_ci = rel_ci
        self.max_s = max(target_s, max_s if max_s is not None else 10 * target_s)
        self.remeasure = remeasure
        self.clock = clock or time.perf_counter
        self.min_slice_s = min_slice_s
        self.max_batch = max_batch
        self._flush: Optional[torch.Tensor] = None
        if self.device.type == "cuda":
            self._flush = torch.empty(2 * cache_bytes(self.device) // 4, dtype=torch.int32, device=self.device)

    def describe(self) -> str:
        return (f"interleaved rounds; each median until its 95 % interval is within ±{100 * self.rel_ci:g} % "
                f"(at least {self.min_reps} calls and {self.target_s * 1e3:g} ms, at most {self.max_s:g} s of timed "
                f"calls per implementation), a group with a noisy member re-measured once")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, calls: Calls, warmup: int = 2) -> Stats:
        """Median time of ``calls[i % len(calls)]()`` over repeated calls, after ``warmup`` untimed
        calls (on a GPU at least one per input copy): ``time_interleaved`` with one member."""
        return self.time_interleaved({"": calls}, warmup)[""]

    def time_interleaved(self, groups: Mapping[str, Calls], warmup: int = 2) -> Dict[str, Stats]:
        """Time every member of ``groups`` (name -> its calls, rotated over) interleaved, with
        adaptive repetitions (see the module's docstring); re-measure the group once when a member
        is noisy and keep the attempt whose widest interval is narrower."""
        if not groups:
            raise ValueError("groups must name at least one sequence of calls")
        for name, calls in groups.items():
            if not calls:
                raise ValueError(f"calls of {name!r} must be a non-empty sequence of callables")
        for calls in groups.values():
            count = max(warmup, len(calls)) if self.device.type == "cuda" else warmup
            for i in range(count):
                calls[i % len(calls)]()
        self.sync()
        first = self._attempt(groups)
        if not (self.remeasure and any(s.noisy for s in first.values())):
            return first
        second = self._attempt(groups)

        def worst(result: Dict[str, Stats]) -> float:
            return max(s.ci_pct for s in result.values())

        keep, other = (second, first) if worst(second) < worst(first) else (first, second)
        for name, stats in keep.items():
            stats.attempts = 2
            stats.other_attempt_ms = other[name].median_ms
        return keep

    def _attempt(self, groups: Mapping[str, Calls]) -> Dict[str, Stats]:
        names = list(groups)
        times: Dict[str, List[float]] = {name: [] for name in names}  # seconds
        spent = dict.fromkeys(names, 0.0)
        result: Dict[str, Stats] = {}
        active = list(names)
        round_index = 0
        while active:
            # each member runs about one call of the slowest (at least min_slice_s) per round
            estimates = {name: statistics.median(times[name]) if times[name] else None for name in active}
            known = [e for e in estimates.values() if e]
            slice_s = max(known + [self.min_slice_s]) if known else 0.0
            start = round_index % len(active)
            for name in active[start:] + active[:start]:
                estimate = estimates[name]
                if estimate is None or not slice_s:
                    batch = 1  # the first call: an estimate
                elif estimate <= 0:
                    batch = self.max_batch  # below the clock's resolution
                else:
                    batch = max(1, min(self.max_batch, int(slice_s / estimate)))
                batch = min(batch, self.max_reps - len(times[name]))
                sample = self._sample(groups[name], batch, len(times[name]))
                times[name].extend(sample)
                spent[name] += sum(sample)
            round_index += 1
            for name in list(active):
                count = len(times[name])
                stats = _stats([t * 1e3 for t in times[name]], self.rel_ci)
                stats.spent_s = spent[name]
                enough = count >= self.min_reps and (spent[name] >= self.target_s or count >= self.max_reps)
                capped = count >= self.min_reps and (spent[name] >= self.max_s or count >= self.max_reps)
                if (enough and stats.ci_pct <= 100 * self.rel_ci) or capped:
                    stats.noisy = stats.ci_pct > 100 * self.rel_ci
                    result[name] = stats
                    active.remove(name)
        return {name: result[name] for name in names}

    def _sample(self, calls: Calls, count: int, offset: int) -> List[float]:
        """``count`` timed calls (seconds each), continuing the rotation at ``offset``."""
        if self.device.type == "cuda":
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
            for i in range(count):
                self._flush.zero_()  # evict the L2 (not timed)
                starts[i].record()
                calls[(offset + i) % len(calls)]()
                ends[i].record()
            torch.cuda.synchronize(self.device)
            return [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]
        clock = self.clock
        out = []
        for i in range(count):
            call = calls[(offset + i) % len(calls)]
            begin = clock()
            call()
            out.append(clock() - begin)
        return out

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


def cpu_peak_bytes(call: Callable[[], object]) -> int:
    """Peak bytes allocated during one ``call`` on CPU beyond what was allocated before it (its
    outputs included), from the PyTorch profiler's allocation trace: allocations made through
    PyTorch's allocator only (scratch a C++ kernel takes from ``malloc`` is not seen)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = call()
    del result
    deltas = []
    for event in prof.events():
        amount = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if amount:
            deltas.append((event.time_range.start, amount))
    current = peak = 0
    for _, amount in sorted(deltas):
        current += amount
        peak = max(peak, current)
    return int(peak)


def measure_peak(device: torch.device, dtypes: Sequence[str], seconds: float = 0.5) -> Dict[str, object]:
    """The device's peaks for the %peak column (a peak is the best the device reaches, not a median).

    Both: torch's matmul TFLOP/s per dtype (the fastest timed call: square matmuls of 8192, 4096 for
    float32, on a GPU; 1024 on a CPU) and a tensor copy (1 GiB on a GPU, 256 MiB on a CPU).
    CPU, besides (``measure_cpu_limits``): the processor's own float32 FMA limit for every kernel
    build and thread count, and a stream copy's bandwidth; %peak divides by those, torch's matmul
    is kept beside them as a peer. Returns ``{"matmul_tflops": {dtype: x}, "copy_gbps": y, ...}``.
    """
    from .cases import DTYPE_NAMES

    device = torch.device(device)
    target_s = 0.5 if device.type == "cuda" else 0.3
    timer = Timer(device, target_s=target_s, max_s=target_s, remeasure=False)  # a peak is the fastest call: no interval
    on_gpu = device.type == "cuda"
    result: Dict[str, object] = {"matmul_tflops": {}, "matmul_n": {}}
    for name in dtypes:
        dtype = DTYPE_NAMES[name]
        n = (4096 if dtype == torch.float32 else 8192) if on_gpu else 1024
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        try:
            stats = timer.time([lambda a=a, b=b: torch.mm(a, b)])
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
    del src, dst
    if device.type == "cpu":
        result["threads"] = torch.get_num_threads()
        try:
            result.update(measure_cpu_limits(seconds=seconds))
        except (ImportError, AttributeError) as exc:  # flashlite._C missing or without the peak functions
            result.setdefault("errors", []).append(f"CPU limits: {exc}")  # type: ignore[union-attr]
    if on_gpu:
        torch.cuda.empty_cache()
    return result


def measure_cpu_limits(seconds: float = 0.5, threads: Optional[Sequence[int]] = None,
                       copy_bytes: int = 2**28) -> Dict[str, object]:
    """The processor's limits, measured by flashlite._C (csrc/cpu/peak.cpp): for every kernel
    build this CPU runs and every thread count (default: 1 and ``torch.get_num_threads()``) the
    float32 FMA GFLOP/s of a register-resident loop (no memory traffic: the most any kernel of that
    build can do), and the GB/s of a stream copy of ``copy_bytes`` (2 bytes counted per byte
    copied). Each is the fastest of ~1 ms trials over ``seconds``, short enough to fall between two
    preemptions, so a busy machine lowers it far less than it lowers a median."""
    from flashlite import _C

    counts = sorted(set(threads or (1, torch.get_num_threads())))
    fma: Dict[str, Dict[str, object]] = {}
    for isa in _C.cpu_isas():
        fma[isa] = {str(t): _C.cpu_fma_peak(threads=t, seconds=seconds, isa=isa) for t in counts}
    copy = {str(t): _C.cpu_stream_copy(threads=t, bytes=copy_bytes, seconds=seconds) for t in counts}
    return {
        "fma_isa": _C.cpu_isa(),  # the build the kernels run (whose limit %peak uses)
        "fma_gflops": {isa: {t: r["gflops"] for t, r in per.items()} for isa, per in fma.items()},
        "fma": fma,
        "stream_copy_gbps": {t: r["gbps"] for t, r in copy.items()},
        "stream_copy": copy,
        "cpu_method": ("flashlite._C.cpu_fma_peak: independent register-resident float32 FMA chains (2 FLOP per "
                       "lane per FMA), each thread timing its own ~1 ms trials; the team's figure is the sum of its "
                       "threads' fastest trials (one thread per core). cpu_stream_copy: every thread memcpy's its own "
                       "4 MiB window of two 256 MiB buffers per trial, the windows sliding through them, fastest "
                       "trial of the whole team (wall clock), 2 bytes per byte copied"),
    }


def cpu_peak_for(peak: Optional[Dict[str, object]], threads: Optional[int]) -> tuple:
    """(FMA GFLOP/s, stream copy GB/s) of ``peak`` for a row run on ``threads`` threads, or Nones."""
    if not peak or not peak.get("fma_gflops"):
        return None, None
    key = str(threads or peak.get("threads") or 1)
    fma = (peak["fma_gflops"].get(peak.get("fma_isa")) or {}).get(key)  # type: ignore[union-attr]
    copy = (peak.get("stream_copy_gbps") or {}).get(key)  # type: ignore[union-attr]
    return fma, copy


def cpu_threads() -> Dict[str, int]:
    return {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count() or 0}
