"""The backends and their registry.

``select(request, backend)`` returns the backend to run: the one named by ``backend=`` or
``FLASHLITE_BACKEND``, or the first of ``AUTO_ORDER[device]`` that serves the request. When
none fits, the error lists every backend's reason. The C++ backends (``cpu``, ``cuda``) are
registered at import when ``flashlite._C`` loads (~0.1 s), so a first call under
``torch.compile`` finds them without importing anything inside the trace.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

from .base import Backend, Request, TileConfig
from .reference import ReferenceBackend
from .triton import TritonBackend

_REGISTRY: Dict[str, Backend] = {}

# Fastest first. The Triton backend is not auto-picked for CPU tensors (its interpreter is a
# testing tool, not a fast path); name it explicitly to use it there.
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}
NAMES = ("triton", "cuda", "cpu", "reference")  # a plan carries its backend as an index into this
_native_loaded = False


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def _load_native() -> None:
    """Register "cpu" / "cuda" if flashlite._C was built (once, on first need)."""
    global _native_loaded
    if not _native_loaded:
        _native_loaded = True
        from . import native

        native.register_all(register)


def get(name: str) -> Backend:
    if name not in NAMES:
        raise ValueError(f"backend must be one of {NAMES} or None, got {name!r}")
    backend = _REGISTRY.get(name)
    if backend is None and name in ("cpu", "cuda"):
        _load_native()
        backend = _REGISTRY.get(name)
    if backend is None:
        raise ValueError(f"backend {name!r} is not available: {unavailable_reason(name)}")
    return backend


def unavailable_reason(name: str) -> str:
    from . import native

    if name == "cpu":
        return native.missing_reason or "flashlite._C (the C++ extension) is not built"
    if name == "cuda":
        return native.missing_reason or "flashlite._C was built without CUDA kernels, or no CUDA device is present"
    return "not registered"


def report() -> Dict[str, str]:
    """Each backend name -> "available" or the reason it is not."""
    _load_native()
    out = {}
    for name in NAMES:
        backend = _REGISTRY.get(name)
        out[name] = unavailable_reason(name) if backend is None else (backend.available() or "available")
    return out


def select(req: Request, backend: Optional[str] = None) -> Backend:
    requested = backend if backend is not None else (os.environ.get("FLASHLITE_BACKEND") or None)
    if requested is not None:
        source = "backend=" if backend is not None else "FLASHLITE_BACKEND="
        try:
            chosen = get(requested)
        except ValueError as exc:
            raise ValueError(f"{source}{requested!r}: {exc}") from None
        reason = chosen.why_not(req)
        if reason:
            raise ValueError(f"{source}{requested!r} cannot run this call: {reason}")
        return chosen
    _load_native()
    reasons = []
    for name in AUTO_ORDER.get(req.device_type, ("reference",)):
        candidate = _REGISTRY.get(name)
        if candidate is None:
            reasons.append(f"{name}: {unavailable_reason(name)}")
            continue
        reason = candidate.why_not(req) or candidate.slower_here(req)
        if reason is None:
            return candidate
        reasons.append(f"{name}: {reason}")
    raise ValueError("no flashlite backend can run this call:\n  " + "\n  ".join(reasons))


register(TritonBackend())
register(ReferenceBackend())
_load_native()

__all__ = ["Backend", "Request", "TileConfig", "register", "get", "select", "report", "AUTO_ORDER", "NAMES"]
