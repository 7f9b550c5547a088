"""Backend registry and selection.

``select(request, backend)`` returns the backend to run: the one named by ``backend=`` or
``FLASHLITE_BACKEND``, or the first of ``AUTO_ORDER[device]`` that serves the request. When
none fits, the error lists every backend's reason.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

from .base import Backend, Request, TileSizes
from .reference_backend import ReferenceBackend
from .triton_backend import TritonBackend

_REGISTRY: Dict[str, Backend] = {}

# Fastest first. The Triton backend is not auto-picked for CPU tensors (its interpreter is a
# testing tool, not a fast path); name it explicitly to use it there.
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}
NAMES = ("triton", "cuda", "cpu", "reference")


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def get(name: str) -> Backend:
    if name not in NAMES:
        raise ValueError(f"backend must be one of {NAMES} or None, got {name!r}")
    backend = _REGISTRY.get(name)
    if backend is None:
        raise ValueError(f"backend {name!r} is not available: {unavailable_reason(name)}")
    return backend


def unavailable_reason(name: str) -> str:
    if name == "cpu":
        native = globals().get("native")  # set once flashlite._backends.native has been imported
        return getattr(native, "missing_reason", None) or "flashlite._C (the C++ extension) is not built"
    if name == "cuda":
        return "flashlite._C was built without CUDA kernels, or no CUDA device is present"
    return "not registered"


def report() -> Dict[str, str]:
    """Each backend name -> "available" or the reason it is not."""
    out = {}
    for name in NAMES:
        backend = _REGISTRY.get(name)
        if backend is None:
            out[name] = unavailable_reason(name)
        else:
            out[name] = backend.available() or "available"
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
    reasons = []
    for name in AUTO_ORDER.get(req.device_type, ("reference",)):
        candidate = _REGISTRY.get(name)
        if candidate is None:
            reasons.append(f"{name}: {unavailable_reason(name)}")
            continue
        reason = candidate.why_not(req)
        if reason is None:
            return candidate
        reasons.append(f"{name}: {reason}")
    raise ValueError("no flashlite backend can run this call:\n  " + "\n  ".join(reasons))


register(TritonBackend())
register(ReferenceBackend())


def _register_native() -> None:
    """Register the C++ backends if flashlite._C was built (see csrc/)."""
    try:
        from . import native  # noqa: F401  (registers "cpu" / "cuda" when flashlite._C imports)
    except ImportError:
        pass


_register_native()

__all__ = ["Backend", "Request", "TileSizes", "register", "get", "select", "report", "AUTO_ORDER", "NAMES"]
