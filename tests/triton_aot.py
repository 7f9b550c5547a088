"""Ahead-of-time compilation of Triton kernels for sm_90a without a GPU.

Triton's interpreter accepts code its compiler rejects (non-constexpr globals, type mismatches
in loops, unsupported ops), so every kernel is also compiled for Hopper with Triton's bundled
ptxas, as flashlite's launchers launch it (tests/test_triton_budget.py; the launches come from
``record_launches``, the compiles from ``compile_launches``, in subprocesses with TRITON_INTERPRET=0).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

# -- Launches as a GPU run makes them, compiled and measured ------------------------------------------------
#
# ``record_launches`` runs flashlite's real launchers on fake CUDA tensors (torch's FakeTensorMode:
# shapes, strides and dtypes, no data, no GPU) with every Triton kernel replaced by a recorder, and
# specializes each recorded call as Triton's JIT does on a GPU (``specialize``): a pointer to a
# tensor is 16-byte aligned ("D": tt.divisibility 16; torch's CUDA allocator aligns to 512 bytes),
# an int divisible by 16 gets "D", an int equal to 1 becomes the constant 1, floats are fp32.
# ``compile_launches`` compiles them for sm_90a in parallel worker processes with Triton's bundled
# ptxas and reads back registers, stack, spill bytes (ptxas -v), shared memory (Triton's metadata)
# and a few PTX instruction counts.

import json  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402

if os.environ.get("FLASHLITE_KERNELS_DIR"):  # measure another tree's kernels (e.g. a worktree of HEAD)
    import types

    import flashlite  # noqa: F401

    _package = types.ModuleType("flashlite.kernels")
    _package.__path__ = [os.environ["FLASHLITE_KERNELS_DIR"]]
    sys.modules["flashlite.kernels"] = _package


@dataclass
class Launch:
    """One kernel launch, specialized: enough to compile it again in another process."""

    module: str  # "flashlite.kernels.tile_engine"
    kernel: str  # "tile_forward_kernel"
    grid: tuple
    signature: dict  # arg name -> "*fp16" | "i32" | "fp32" | "constexpr" ...
    constexprs: dict  # arg name -> value
    aligned: list  # arg names with tt.divisibility 16
    num_warps: int
    num_stages: int
    label: str = ""
    ints: dict = field(default_factory=dict)  # the int arguments' values


POINTER_TYPES = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32", "torch.float64": "fp64",
                 "torch.int8": "i8", "torch.int16": "i16", "torch.int32": "i32", "torch.int64": "i64",
                 "torch.uint8": "u8", "torch.bool": "i1"}


def specialize(value):
    """(type, aligned) of one runtime argument as Triton's JIT specializes it on a GPU."""
    import torch
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    if isinstance(value, torch.Tensor):  # a fake CUDA tensor: aligned, typed by its dtype
        return "*" + POINTER_TYPES[str(value.dtype)], True
    kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)
    return kind, attr == "D"


class _Recorder:
    def __init__(self, module, name, kernel, launches):
        import inspect

        self.module, self.name, self.launches = module, name, launches
        self.params = list(inspect.signature(kernel.fn).parameters.values())

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            num_warps = kwargs.pop("num_warps", 4)
            num_stages = kwargs.pop("num_stages", 3)
            values = dict(zip([p.name for p in self.params], args))
            values.update(kwargs)
            signature, constexprs, aligned, ints = {}, {}, [], {}
            for p in self.params:
                value = values[p.name] if p.name in values else p.default
                if "constexpr" in str(p.annotation):
                    signature[p.name], constexprs[p.name] = "constexpr", value
                    continue
                kind, is_aligned = specialize(value)
                signature[p.name] = kind
                if isinstance(value, int) and not isinstance(value, bool):
                    ints[p.name] = value
                if kind == "constexpr":
                    constexprs[p.name] = value
                elif is_aligned:
                    aligned.append(p.name)
            grid_value = grid(values) if callable(grid) else tuple(grid)
            self.launches.append(Launch(self.module, self.name, grid_value, signature, constexprs, aligned,
                                        num_warps, num_stages, ints=ints))
        return launch


def record_launches(run) -> list:
    """Every Triton kernel launch ``run()`` makes (flashlite's launchers called on fake CUDA
    tensors made inside ``run``), specialized as on a GPU; nothing is executed."""
    import triton
    from torch._subclasses.fake_tensor import FakeTensorMode
    from flashlite.kernels import gather_engine, tile_engine

    launches = []
    saved = []
    for module in (tile_engine, gather_engine):
        for name, kernel in list(vars(module).items()):
            if name.endswith("_kernel") and hasattr(kernel, "fn"):
                saved.append((module, name, kernel))
                setattr(module, name, _Recorder(module.__name__, name, kernel, launches))
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            run()
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)
    del triton
    return launches


WORKER = r'''
import contextlib, importlib, io, json, os, re, sys, time
import triton
if os.environ.get("FLASHLITE_KERNELS_DIR"):  # measure another tree's kernels (e.g. a worktree of HEAD)
    import types
    import flashlite
    package = types.ModuleType("flashlite.kernels")
    package.__path__ = [os.environ["FLASHLITE_KERNELS_DIR"]]
    sys.modules["flashlite.kernels"] = package
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

PTX_COUNTS = {"cp_async": r"cp\.async\.(?:ca|cg)", "ld_v4": r"ld\.global(?:\.\w+)*\.v4",
              "ld_v2": r"ld\.global(?:\.\w+)*\.v2",
              "ld_scalar": r"ld\.global(?:\.(?!v\d)\w+)*\s", "tma": r"cp\.async\.bulk", "wgmma": r"wgmma\.mma_async",
              "mma": r"\bmma\.sync", "tanh_approx": r"tanh\.approx"}
for line in sys.stdin:
    job = json.loads(line)
    fn = getattr(importlib.import_module(job["module"]), job["kernel"])
    names = fn.arg_names
    log = io.StringIO()
    start = time.time()
    try:
        src = ASTSource(fn=fn, signature=job["signature"],
                        constexprs={(names.index(k),): v for k, v in job["constexprs"].items()},
                        attrs={(names.index(k),): [["tt.divisibility", 16]] for k in job["aligned"]})
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
    except Exception as exc:  # reported, the test decides
        print(json.dumps({"key": job["key"], "error": f"{type(exc).__name__}: {exc}"[-4000:]}), flush=True)
        continue
    text = log.getvalue()
    found = lambda pattern: [int(x) for x in re.findall(pattern, text)]
    ptx = compiled.asm["ptx"]
    if job.get("keep_ptx"):
        with open(job["keep_ptx"] + "/" + re.sub(r"[^\w.-]+", "_", job["key"]) + ".ptx", "w") as f:
            f.write(ptx)
    print(json.dumps({
        "key": job["key"], "seconds": round(time.time() - start, 1),
        "regs": max(found(r"Used (\d+) registers") or [-1]),
        "stack": max(found(r"(\d+) bytes stack frame") or [-1]),
        "spill_stores": max(found(r"(\d+) bytes spill stores") or [-1]),
        "spill_loads": max(found(r"(\d+) bytes spill loads") or [-1]),
        "smem": compiled.metadata.shared,
        "ptx": {name: len(re.findall(pattern, ptx)) for name, pattern in PTX_COUNTS.items()},
    }), flush=True)
'''


def compile_launches(launches, workers: int = 2, timeout: float = 1800, keep_ptx: str = "") -> dict:
    """Compile ``launches`` (keyed by their ``label``) for sm_90a in ``workers`` processes that take
    the next launch as they finish one; returns label -> {"regs", "stack", "spill_stores",
    "spill_loads", "smem", "seconds", "ptx"} or {"error"} (also for what ``timeout`` seconds in all
    left uncompiled). Compiles always run (no Triton cache), so ptxas reports every kernel.
    ``keep_ptx``: a folder that receives each kernel's PTX."""
    import queue
    import tempfile
    import threading
    import time

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1", TRITON_DUMP_PTXAS_LOG="1",
               TRITON_ALWAYS_COMPILE="1")
    jobs = queue.Queue()
    for launch in launches:
        job = dict(asdict(launch), key=launch.label, keep_ptx=keep_ptx)
        job["grid"] = list(job["grid"])
        jobs.put(job)
    results, errors = {}, []
    deadline = time.time() + timeout

    def work(index, tmp):
        with open(os.path.join(tmp, f"{index}.err"), "w+") as err:
            proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=err, env=env, text=True)
            timer = threading.Timer(max(0.0, deadline - time.time()), proc.kill)
            timer.start()
            try:
                while time.time() < deadline:
                    try:
                        job = jobs.get_nowait()
                    except queue.Empty:
                        break
                    proc.stdin.write(json.dumps(job) + "\n")
                    proc.stdin.flush()
                    line = proc.stdout.readline()
                    if not line:
                        err.seek(0)
                        errors.append(err.read()[-3000:])
                        results[job["key"]] = {"error": "worker died or timed out"}
                        break
                    row = json.loads(line)
                    results[row.pop("key")] = row
            finally:
                timer.cancel()
                proc.kill()
                proc.wait()

    with tempfile.TemporaryDirectory() as tmp:
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        threads = [threading.Thread(target=work, args=(i, tmp)) for i in range(max(1, min(workers, len(launches))))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if any("ptxas" in e and "not found" in e for e in errors):
        pytest.skip("Triton has no ptxas here")
    for launch in launches:
        results.setdefault(launch.label, {"error": f"not compiled within {timeout:.0f} s"})
    return results
