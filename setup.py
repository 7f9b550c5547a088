"""Build script: the Python package (flashlite + kernels/ as flashlite.kernels, bench/ as
flashlite.bench) and the C++ extension flashlite._C (csrc/, see csrc/README.md).

flashlite._C is built with torch's C++ extension tooling (ninja) against the torch already
installed, so build without isolation: ``pip install --no-build-isolation -e .``. Without torch
(an isolated build) the pure-Python package is installed and flashlite falls back to its other
backends.

Environment:
  FLASHLITE_CUDA=0|1          force the CUDA kernels off / on (default: on when torch has CUDA and
                              nvcc is found, and csrc/cuda/ has sources)
  FLASHLITE_CUDA_ARCHS        CUDA archs, default "8.0;8.6;8.9;9.0" (9.0 builds sm_90a; "+PTX"
                              on the last one also embeds PTX)
  FLASHLITE_NATIVE_ARCH=1     add -march=native (a build for this machine only)
  MAX_JOBS                    parallel compile jobs (torch's ninja builder)
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0"


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cuda_archs_flags(spec):
    """nvcc -gencode flags for "8.0;8.6;9.0" (9.0 -> sm_90a, "+PTX" adds PTX of that arch)."""
    flags = []
    for item in spec.replace(",", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        number = item.replace("+PTX", "").replace(".", "")
        arch = number + ("a" if number == "90" else "")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags


def _want_cuda(torch, cuda_home):
    """CUDA kernels are built when asked (FLASHLITE_CUDA=1) or when torch has CUDA and nvcc exists."""
    setting = os.environ.get("FLASHLITE_CUDA", "").strip()
    if setting == "0":
        return False
    nvcc = cuda_home is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    if setting == "1":
        if not nvcc:
            raise RuntimeError("FLASHLITE_CUDA=1 but nvcc was not found: set CUDA_HOME to the CUDA toolkit")
        return True
    return torch.version.cuda is not None and nvcc


def _extensions():
    """(ext_modules, cmdclass) for flashlite._C, or ([], {}) when torch is not importable."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("flashlite: torch is not importable at build time; installing without flashlite._C "
              "(build it with `pip install --no-build-isolation -e .` once torch is installed)", file=sys.stderr)
        return [], {}

    sources = _rel([os.path.join(ROOT, "csrc", "bindings.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-g0", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math", "-DNDEBUG"]
    if os.environ.get("FLASHLITE_NATIVE_ARCH") == "1":
        cxx.append("-march=native")
    common = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])

    cuda_sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    cuda_binding = os.path.join(ROOT, "csrc", "cuda", "bindings_cuda.cpp")
    if _want_cuda(torch, CUDA_HOME):
        if cuda_sources and os.path.exists(cuda_binding):
            archs = os.environ.get("FLASHLITE_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
            nvcc = ["-O3", "-std=c++17", "-DNDEBUG", "--expt-relaxed-constexpr", "-lineinfo"] + _cuda_archs_flags(archs)
            other_cuda = [p for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))]
            extension = CUDAExtension(
                "flashlite._C", sources + _rel(cuda_sources + other_cuda),
                extra_compile_args={"cxx": cxx + ["-DFLASHLITE_WITH_CUDA"], "nvcc": nvcc + ["-DFLASHLITE_WITH_CUDA"]},
                **common,
            )
            print(f"flashlite: building flashlite._C with CPU and CUDA kernels (archs {archs})", file=sys.stderr)
        else:
            print("flashlite: csrc/cuda/ has no kernels yet; building flashlite._C with CPU kernels only",
                  file=sys.stderr)
            extension = CppExtension("flashlite._C", sources, extra_compile_args={"cxx": cxx}, **common)
    else:
        extension = CppExtension("flashlite._C", sources, extra_compile_args={"cxx": cxx}, **common)
    use_ninja = shutil.which("ninja") is not None
    try:
        import ninja  # noqa: F401  (the pip package puts a ninja binary next to python)
        use_ninja = True
    except ImportError:
        pass
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = _extensions()

setup(
    packages=["flashlite", "flashlite.core", "flashlite.dispatch", "flashlite.backend", "flashlite.nn",
              "flashlite.integrations", "flashlite.kernels",
              "flashlite.bench"],
    package_dir={"flashlite": "flashlite", "flashlite.kernels": "kernels", "flashlite.bench": "bench"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
