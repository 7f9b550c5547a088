"""The CMake build (CMakeLists.txt): configure, build the CPU kernel library and its C++ test, run
ctest - in a temporary build directory. The C++ test checks the CPU kernels (tile and gather
engines, forward and backward, every instruction-set build this CPU runs) against a naive loop."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CMAKE = shutil.which("cmake")
NINJA = shutil.which("ninja") or shutil.which("ninja", path=os.path.dirname(sys.executable))


def run(*cmd: str, cwd: Path) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.mark.skipif(CMAKE is None, reason="cmake is not installed")
def test_cmake_build_and_ctest(tmp_path):
    build = tmp_path / "build"
    generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={NINJA}"] if NINJA else []
    # The CUDA compile check is the CUDA suite's job; keep this build to the small CPU targets.
    run(CMAKE, "-S", str(ROOT), "-B", str(build), *generator, "-DFLASHLITE_CUDA=OFF", "-DCMAKE_BUILD_TYPE=Release",
        cwd=ROOT)
    commands = json.loads((build / "compile_commands.json").read_text())
    assert any(entry["file"].endswith("csrc/cpu/driver.cpp") for entry in commands)
    run(CMAKE, "--build", str(build), "--target", "test_cpu_kernels", "-j", str(os.cpu_count() or 2), cwd=ROOT)
    out = run("ctest", "--test-dir", str(build), "--output-on-failure", cwd=build) if shutil.which("ctest") else ""
    assert "100% tests passed" in out
