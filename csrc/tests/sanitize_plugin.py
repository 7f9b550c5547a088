"""pytest plugin of `make sanitize`: load a sanitizer build of flashlite._C instead of the in-tree one.

    FLASHLITE_SANITIZED_C=build/sanitize/lib/flashlite/_C...so \\
    LD_PRELOAD=$(gcc -print-file-name=libasan.so) PYTHONPATH=csrc/tests \\
    python -m pytest -p sanitize_plugin tests/test_cpu_backend.py ...

The extension named by ``FLASHLITE_SANITIZED_C`` (built by the Makefile with -fsanitize=...) is
imported as ``flashlite._C`` before flashlite itself is, so every CPU-backend call of the tests runs
the instrumented kernels. The session fails at its start if the file is missing or is not a
sanitizer build, so a pass can never silently test the uninstrumented extension.
"""
from __future__ import annotations

import importlib.util
import os
import sys


def _load() -> str:
    path = os.environ.get("FLASHLITE_SANITIZED_C", "")
    if not path or not os.path.isfile(path):
        raise RuntimeError(f"FLASHLITE_SANITIZED_C must name the sanitizer build of flashlite._C (got {path!r})")
    with open(path, "rb") as handle:
        blob = handle.read()
    if b"__asan_" not in blob and b"__tsan_" not in blob and b"__ubsan_" not in blob:
        raise RuntimeError(f"{path} has no sanitizer symbols: not a `make sanitize` build")
    import torch  # noqa: F401  (loads libc10 / libtorch, which the extension links against)

    spec = importlib.util.spec_from_file_location("flashlite._C", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["flashlite._C"] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return path


_PATH = _load()


def pytest_report_header(config):
    return f"flashlite._C: sanitizer build {_PATH}"


def pytest_sessionfinish(session, exitstatus):
    import flashlite._C as C  # noqa: N812

    if getattr(C, "__file__", None) != _PATH:
        raise RuntimeError(f"flashlite._C was replaced during the session ({C.__file__} instead of {_PATH})")
