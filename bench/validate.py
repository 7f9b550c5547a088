"""Validate before timing: every backend x pattern against ``flashlite.reference``.

The correctness rule (docs/design.md): compare with the reference computed in float64; the kernel's max
error must be at most twice the error of the same computation done by PyTorch in the kernel's
dtype, plus 1e-5 — for the output, the log-sum-exp and each gradient (dq, dk, dv). Inputs are
fresh random draws (the seed is recorded), and kernels' outputs are poisoned with NaN before
they are written (``FLASHLITE_POISON=1`` during validation).

Head statistics (the ``stats`` case): ``flashlite.attention_stats`` over causal attention against
``flashlite.reference.attention_stats`` (float64 and the inputs' dtype) by the same rule, for out,
lse, each statistic (entropy, max_prob, mean_distance, sink_mass, keys; their slack relative to
their scale, see ``rule``) and dq, dk, dv of a loss on out and
the entropy together.

This module is the benchmark's own copy of the rule (tests/conftest.py keeps the test suite's),
so ``flashlite bench`` works from an installed package without the tests.
"""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .cases import DTYPE_NAMES, random_layout

SLACK = 1e-5
# (batch, heads_q, heads_kv, seqlen_q, seqlen_k): odd lengths, GQA, Nq < Nk, Nq > Nk, a decode step.
SHAPES: Tuple[Tuple[int, int, int, int, int], ...] = (
    (1, 4, 2, 97, 97),
    (2, 2, 1, 45, 130),
    (1, 2, 2, 80, 50),
    (1, 4, 1, 1, 150),
)
TINY_SHAPES: Tuple[Tuple[int, int, int, int, int], ...] = ((1, 2, 1, 40, 40),)
VALIDATION_PATTERNS = ("full", "causal", "window", "block_sparse", "topk")


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max |got - want|; -inf == -inf counts as 0, any NaN as infinite."""
    got, want = got.detach().double(), want.detach().double()
    diff = (got - want).abs()
    diff = torch.where(torch.isneginf(got) & torch.isneginf(want), torch.zeros_like(diff), diff)
    if torch.isnan(diff).any():
        return float("inf")
    return float(diff.max()) if diff.numel() else 0.0


def rule(got: torch.Tensor, lowp: torch.Tensor, exact: torch.Tensor, scaled_slack: bool = False) -> Dict[str, float]:
    """Error of ``got`` and the bound ``2 * error(lowp) + SLACK``; ``ok`` if within it.
    ``scaled_slack``: the slack is relative to the exact result's largest magnitude when that
    exceeds 1 (``SLACK * max(1, max|exact|)``): for head statistics, whose mean distance reaches
    ~Nk/2, an absolute 1e-5 is under one float32 ulp, and torch's float32 baseline, summing in
    another order, sometimes rounds exactly (a decode row over 150 keys: mean_distance ~75, kernel
    error 1.5e-5, baseline 0)."""
    if got.shape != exact.shape:
        return {"error": float("inf"), "bound": 0.0, "ok": False}
    err, base = max_error(got, exact), max_error(lowp, exact)
    slack = SLACK
    if scaled_slack:
        finite = exact.detach()[torch.isfinite(exact.detach())].double()
        slack = SLACK * max(1.0, float(finite.abs().max()) if finite.numel() else 0.0)
    bound = 2 * base + slack
    return {"error": err, "bound": bound, "ok": err <= bound}


@dataclass
class Check:
    backend: str
    pattern: str
    shape: Tuple[int, ...]  # (B, Hq, Hkv, Nq, Nk, D)
    dtype: str
    status: str = "pass"  # pass | fail | skip
    reason: Optional[str] = None
    tensors: Dict[str, Dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict:
        b, hq, hkv, nq, nk, d = self.shape
        return {"backend": self.backend, "pattern": self.pattern, "dtype": self.dtype, "status": self.status,
                "reason": self.reason, "tensors": self.tensors,
                "shape": {"batch": b, "heads_q": hq, "heads_kv": hkv, "seqlen_q": nq, "seqlen_k": nk, "head_dim": d}}

    def text(self) -> str:
        shape = "x".join(map(str, self.shape))
        worst = ", ".join(f"{k} {v['error']:.2e} (bound {v['bound']:.2e})" for k, v in self.tensors.items()
                          if not v["ok"])
        return f"{self.backend:10s} {self.pattern:13s} {self.dtype:9s} {shape:22s} {self.status}" + (
            f": {self.reason}" if self.reason else "") + (f" [{worst}]" if worst else "")


def make_pattern(name: str, batch: int, heads_q: int, heads_kv: int, seqlen_q: int, seqlen_k: int, device,
                 gen: torch.Generator):
    """A small instance of each pattern, with the awkward parts: a query block without keys,
    empty (-1) index slots, a window narrower than a tile."""
    import flashlite

    if name == "full":
        return flashlite.Full(causal=False)
    if name == "causal":
        return flashlite.Full(causal=True)
    if name == "window":
        return flashlite.SlidingWindow(17, 0)
    if name == "block_sparse":
        block_size = 16
        layout = random_layout(heads_q, seqlen_q, seqlen_k, block_size, 0.4, gen)
        if layout.shape[2] > 1:
            layout[:, 0, 1] = False  # one query block of head 0 sees nothing: zeros, lse -inf
        return flashlite.BlockSparse(layout.to(device), block_size)
    if name == "topk":
        k = min(8, seqlen_k)
        scores = torch.rand(batch, heads_kv, seqlen_q, seqlen_k, generator=gen)
        indices = scores.topk(k, dim=-1).indices.to(torch.int32)
        indices[..., -1] = torch.where(torch.rand(indices.shape[:-1], generator=gen) < 0.3, -1, indices[..., -1])
        return flashlite.TopK(indices.to(device), causal=False)
    raise ValueError(f"unknown validation pattern {name!r}")


@contextlib.contextmanager
def _poisoned():
    old = os.environ.get("FLASHLITE_POISON")
    os.environ["FLASHLITE_POISON"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FLASHLITE_POISON", None)
        else:
            os.environ["FLASHLITE_POISON"] = old


def check_one(backend: str, pattern_name: str, shape: Tuple[int, ...], dtype: str, device: torch.device,
              gen: torch.Generator, grads: bool = True) -> Check:
    """Run ``backend`` and the reference (float64 and the inputs' dtype) on fresh inputs."""
    import flashlite
    from flashlite import reference

    batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim = shape
    check = Check(backend, pattern_name, tuple(shape), dtype)
    torch_dtype = DTYPE_NAMES[dtype]
    pattern = make_pattern(pattern_name, batch, heads_q, heads_kv, seqlen_q, seqlen_k, device, gen)

    q, k, v = _draw_qkv(shape, torch_dtype, device, gen)
    leaves = [t.clone().requires_grad_(grads) for t in (q, k, v)]
    result = _served(check, backend, lambda: flashlite.attention(*leaves, pattern, backend=backend, return_lse=True))
    if result is None:
        return check
    out, lse = result

    exact_leaves = [t.detach().double().requires_grad_(grads) for t in (q, k, v)]
    exact, exact_lse = reference.attention(*exact_leaves, pattern, return_lse=True, compute_dtype=torch.float64)
    lowp_leaves = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    lowp, lowp_lse = reference.attention(*lowp_leaves, pattern, return_lse=True, compute_dtype=None)
    check.tensors["out"] = rule(out, lowp, exact)
    check.tensors["lse"] = rule(lse, lowp_lse, exact_lse)
    if grads:
        grad_out = torch.randn(exact.shape, generator=gen, dtype=torch.float64).to(device)
        grads = _backward_ran(check, lambda: out.backward(grad_out.to(out.dtype)))
        if grads is None:
            return check
    if grads:
        exact.backward(grad_out)
        lowp.backward(grad_out.to(lowp.dtype))
        for name, got, low, ex in zip(("dq", "dk", "dv"), leaves, lowp_leaves, exact_leaves):
            if got.grad is None:
                check.tensors[name] = {"error": float("inf"), "bound": 0.0, "ok": False}
            else:
                check.tensors[name] = rule(got.grad, low.grad, ex.grad)
    if not all(t["ok"] for t in check.tensors.values()):
        check.status = "fail"
    return check


def _draw_qkv(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    """Fresh q ``[B, Hq, Nq, D]``, k, v ``[B, Hkv, Nk, D]`` from ``gen``."""
    batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim = shape

    def draw(heads, seqlen):
        return torch.randn(batch, heads, seqlen, head_dim, generator=gen).to(device=device, dtype=dtype)

    return draw(heads_q, seqlen_q), draw(heads_kv, seqlen_k), draw(heads_kv, seqlen_k)


def _served(check: Check, backend: str, call):
    """``call()`` with poisoned outputs; None (and ``check`` marked skip or fail) when the backend
    declined, crashed, or another backend served it."""
    import flashlite

    try:
        with _poisoned():
            result = call()
    except (ValueError, NotImplementedError) as exc:
        check.status, check.reason = "skip", str(exc).strip().splitlines()[-1]
        return None
    except Exception as exc:  # noqa: BLE001 - a crash of an available backend is a failure
        check.status, check.reason = "fail", f"{type(exc).__name__}: {exc}"
        return None
    served = flashlite.last_backend()
    if served != backend:
        check.status, check.reason = "fail", f"asked for {backend}, ran {served}"
        return None
    return result


def _backward_ran(check: Check, call) -> Optional[bool]:
    """``call()`` (a backward) with poisoned outputs: True when it ran; False when the backend is
    forward-only (said in ``check.reason``); None when it failed (``check`` marked fail)."""
    try:
        with _poisoned():
            call()
    except NotImplementedError as exc:
        check.reason = f"forward only: {exc}"
        return False
    except Exception as exc:  # noqa: BLE001
        check.status, check.reason = "fail", f"backward: {type(exc).__name__}: {exc}"
        return None
    return True


STATS_SINK = 3  # a sink width that is not a tile or vector size


def check_stats_one(backend: str, shape: Tuple[int, ...], dtype: str, device: torch.device, gen: torch.Generator,
                    grads: bool = True) -> Check:
    """``attention_stats`` on ``backend`` over causal attention against the reference's statistics."""
    import flashlite
    from flashlite import reference

    check = Check(backend, "stats", tuple(shape), dtype)
    torch_dtype = DTYPE_NAMES[dtype]
    pattern = flashlite.Full(causal=True)

    q, k, v = _draw_qkv(shape, torch_dtype, device, gen)
    leaves = [t.clone().requires_grad_(grads) for t in (q, k, v)]
    result = _served(check, backend, lambda: flashlite.attention_stats(*leaves, pattern, sink_tokens=STATS_SINK,
                                                                       backend=backend))
    if result is None:
        return check
    out, stats = result
    runs = {}
    for label, compute in (("exact", torch.float64), ("lowp", None)):  # float64, and torch in the dtype
        ref_leaves = [t.detach().to(compute or torch_dtype).clone().requires_grad_(grads) for t in (q, k, v)]
        runs[label] = (ref_leaves, *reference.attention_stats(*ref_leaves, pattern, sink_tokens=STATS_SINK,
                                                              compute_dtype=compute))
    check.tensors["out"] = rule(out, runs["lowp"][1], runs["exact"][1])
    check.tensors["lse"] = rule(stats.lse, runs["lowp"][2], runs["exact"][2])
    for index, name in enumerate(reference.STAT_NAMES):
        check.tensors[name] = rule(getattr(stats, name), runs["lowp"][3][index], runs["exact"][3][index],
                                   scaled_slack=True)
    if grads:
        grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device)
        grad_entropy = torch.randn(stats.entropy.shape, generator=gen, dtype=torch.float64).to(device)
        grads = _backward_ran(check, lambda: torch.autograd.backward(
            [out, stats.entropy], [grad_out.to(out.dtype), grad_entropy.float()]))
        if grads is None:
            return check
    if grads:
        for ref_leaves, ref_out, _, ref_stats in runs.values():
            torch.autograd.backward([ref_out, ref_stats[0]], [grad_out.to(ref_out.dtype), grad_entropy.float()])
        for name, got, low, ex in zip(("dq", "dk", "dv"), leaves, runs["lowp"][0], runs["exact"][0]):
            if got.grad is None:
                check.tensors[name] = {"error": float("inf"), "bound": 0.0, "ok": False}
            else:
                check.tensors[name] = rule(got.grad, low.grad, ex.grad)
    if not all(t["ok"] for t in check.tensors.values()):
        check.status = "fail"
    return check


@dataclass
class Plan:
    """What to validate: per backend, the shapes/dtypes/head dims it gets (small ones)."""

    backend: str
    shapes: Sequence[Tuple[int, int, int, int, int]]
    dtypes: Sequence[str]
    head_dims: Sequence[int]
    note: Optional[str] = None


def plan_for(backends: Sequence[str], device: torch.device, dtypes: Sequence[str], head_dims: Sequence[int],
             triton_interpreted: bool) -> Tuple[List[Plan], Dict[str, str]]:
    """Which backends are validated and how; backends left out map to the reason."""
    plans, left_out = [], {}
    for name in backends:
        if name == "triton" and device.type == "cpu":
            if not triton_interpreted:
                left_out[name] = "Triton on CPU tensors runs only under TRITON_INTERPRET=1; not validated or timed"
                continue
            # the interpreter is slow: one tiny shape, float32, the smallest head dim
            plans.append(Plan(name, TINY_SHAPES, ["float32"], [min(32, min(head_dims))],
                              "interpreter: one tiny shape"))
            continue
        plans.append(Plan(name, SHAPES, list(dtypes), sorted(set(head_dims))))
    return plans, left_out


def validate(plans: Sequence[Plan], device: torch.device, patterns: Iterable[str] = VALIDATION_PATTERNS,
             seed: Optional[int] = None, progress: Optional[Callable[[str], None]] = None) -> Dict[str, object]:
    """Run every plan over every pattern. Returns the JSON-ready summary (``passed`` is False if any
    check failed)."""
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    checks: List[Check] = []
    patterns = list(patterns)
    patterns = [p for p in patterns if p in VALIDATION_PATTERNS] + (["stats"] if "stats" in patterns else [])
    jobs = [(plan, pattern, shape, dtype, head_dim) for plan in plans for pattern in patterns
            for dtype in plan.dtypes for head_dim in plan.head_dims for shape in plan.shapes]
    for index, (plan, pattern, shape, dtype, head_dim) in enumerate(jobs):
        if progress:
            progress(f"validate [{index + 1}/{len(jobs)}] {plan.backend} {pattern} {dtype} d{head_dim}")
        if pattern == "stats":
            checks.append(check_stats_one(plan.backend, (*shape, head_dim), dtype, device, gen))
        else:
            checks.append(check_one(plan.backend, pattern, (*shape, head_dim), dtype, device, gen))
    failed = [c for c in checks if c.status == "fail"]
    return {
        "ran": True, "passed": not failed, "seed": seed,
        "rule": ("max|kernel - ref64| <= 2 * max|torch-in-dtype - ref64| + 1e-5 for out, lse, dq, dk, dv"
                 + (" (stats: also entropy, max_prob, mean_distance, sink_mass, keys, their slack 1e-5 "
                    "* max(1, max|ref64|); dq, dk, dv of a loss on out and entropy)" if "stats" in patterns else "")),
        "counts": {s: sum(c.status == s for c in checks) for s in ("pass", "fail", "skip")},
        "plans": [{"backend": p.backend, "dtypes": list(p.dtypes), "head_dims": list(p.head_dims),
                   "shapes": [list(s) for s in p.shapes], "note": p.note} for p in plans],
        "checks": [c.to_json() for c in checks],
        "failures": [c.text() for c in failed],
    }
