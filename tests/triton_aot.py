"""Ahead-of-time compilation of Triton kernels for sm_90 without a GPU.

Triton's interpreter accepts code its compiler rejects (non-constexpr globals, type mismatches
in loops, unsupported ops), so every kernel is also compiled for Hopper here with Triton's
bundled ptxas. Runs in a subprocess with TRITON_INTERPRET=0.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

PRELUDE = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def compile_for_sm90(fn, pointers, constexprs, floats=("scale", "softcap"), num_warps=4):
    """Compile ``fn`` with pointer types ``pointers`` (name -> "*bf16"...), constexpr values, fp32
    ``floats`` and i32 for every other argument."""
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n in floats else "i32")
           for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
'''


def compile_for_sm90(body: str, timeout: int = 600) -> None:
    """Run ``PRELUDE + body`` (which calls compile_for_sm90 and prints "compiled") in a subprocess."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-c", PRELUDE + body], capture_output=True, text=True, env=env,
                            timeout=timeout)
    if result.returncode and "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip("Triton has no ptxas here")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
