"""pytest-benchmark suite: the cases of ``flashlite bench``, one test per (case, implementation, mode).

    pytest bench/ --benchmark-only                              # quick profile of this device
    pytest bench/ --benchmark-only --benchmark-autosave         # keep the run (.benchmarks/)
    pytest bench/ --benchmark-only --benchmark-compare          # compare with the last saved run
    FLASHLITE_BENCH_ARGS="--profile gpu --patterns full,causal" pytest bench/ --benchmark-only

``FLASHLITE_BENCH_ARGS`` takes ``flashlite bench``'s own options (default ``--quick``), so the
two run the same cases; test names are stable (``case-impl-mode``) for ``--benchmark-compare``.
Tests are grouped per (case, mode), so each group lists flashlite beside its peers. Each test
records the useful FLOPs/bytes and the achieved TFLOP/s / GB/s in ``extra_info``. On a GPU the
timed call ends with ``torch.cuda.synchronize()``; the rotation over input copies is the same
as ``flashlite bench``'s (the L2 flush between calls is not: pytest-benchmark times its own loop).
Unsupported combinations are skipped with the implementation's reason. Validation is
``flashlite bench``'s job (and the tests'), not this suite's.
"""
from __future__ import annotations

import itertools
import os
import shlex

import pytest
import torch

from flashlite.bench import cases as C
from flashlite.bench import runner
from flashlite.bench.cases import Skip
from flashlite.bench.timing import Timer, rotation_sets

OPTIONS = runner.parse_args(shlex.split(os.environ.get("FLASHLITE_BENCH_ARGS", "--quick")))
PLAN = runner.setup(OPTIONS)
TIMER = Timer(PLAN.device)
_INPUTS: dict = {}


def _case_inputs(case: C.Case):
    """Pattern data and rotated inputs of ``case``, kept for the case's tests only."""
    if case.id not in _INPUTS:
        _INPUTS.clear()
        if PLAN.device.type == "cuda":
            torch.cuda.empty_cache()
        data = C.make_pattern_data(case, PLAN.device)
        inputs = C.make_qkv(case, PLAN.device, rotation_sets(C.qkv_bytes(case), PLAN.device))
        _INPUTS[case.id] = (data, inputs)
    return _INPUTS[case.id]


def _id(case: C.Case) -> str:
    return case.id.replace(" ", "-")


@pytest.mark.parametrize("mode", PLAN.modes)
@pytest.mark.parametrize("impl", PLAN.impls, ids=[i.name for i in PLAN.impls])
@pytest.mark.parametrize("case", PLAN.cases, ids=[_id(c) for c in PLAN.cases])
def test_attention(benchmark, case: C.Case, impl, mode: str):
    if mode not in case.modes:
        pytest.skip(f"{case.pattern} has no {mode} (inference only)")
    data, inputs = _case_inputs(case)
    try:
        forward = impl.prepare(case, data, PLAN.device, mode != "fwd")
        calls, first_s = runner.make_calls(impl, forward, inputs, mode, TIMER, case, data)
    except Skip as exc:
        pytest.skip(str(exc))
    rotation = itertools.cycle(calls)
    sync = TIMER.sync

    def target():
        result = next(rotation)()
        sync()
        return result

    for _ in range(len(calls)):  # warm-up over every input copy
        target()
    benchmark.group = f"{case.id} {mode}"
    flops, nbytes = case.flops(mode, data), case.bytes(mode, data)
    benchmark.extra_info.update(case.to_json())
    benchmark.extra_info.update(impl=impl.name, mode=mode, flops=flops, bytes=nbytes, note=impl.note,
                                first_call_s=first_s, device=str(PLAN.device), threads=torch.get_num_threads())
    benchmark(target)
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None) if stats is not None else None
    if median:
        benchmark.extra_info["tflops"] = flops / median / 1e12
        if nbytes:
            benchmark.extra_info["gbps"] = nbytes / median / 1e9
