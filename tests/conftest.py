"""Shared test machinery: device/backends under test and the correctness rule
(docs/design.md).

Correctness rule: compare with the reference computed in float64; the kernel's max error must
be at most twice the error of the same computation done by PyTorch in the kernel's dtype,
plus 1e-5 - for the output, the lse and every gradient. Inputs are fresh random draws; the
kernels' outputs are poisoned with NaN before they are written (FLASHLITE_POISON=1).
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton reads this when kernels are decorated: set it before flashlite.kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["FLASHLITE_POISON"] = "1"
os.environ.pop("FLASHLITE_BACKEND", None)

import flashlite  # noqa: E402
from flashlite import BlockSparse, Full, SlidingWindow, TopK, reference  # noqa: E402
from flashlite.core.schedule import cdiv  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# Triton's interpreter is exact for float16/float32 inputs once upcast; bfloat16 is covered
# on a GPU (and by the C++ CPU backend).
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def kernel_backends():
    """Backends whose kernels run here (the reference is the oracle, tested on its own)."""
    report = flashlite.backends()
    names = ["triton"]
    names += [name for name in ("cpu", "cuda") if report.get(name) == "available"]
    if not HAS_CUDA:
        names = [n for n in names if n != "cuda"]
    return names


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# The default run (CI: 2 cores, no GPU) samples the Triton interpreter's share of the largest
# parametrizations; FLASHLITE_TESTS=full (make test-full) or a GPU runs every case.
FULL_TESTS = os.environ.get("FLASHLITE_TESTS") == "full"


# The test files that take longest on 2 cores without a GPU, longest first (seconds of one core, idle
# machine, measured on the default run). `make test` runs `pytest -n 2 --dist loadfile
# --no-loadscope-reorder`: each worker takes whole files in collection order, and this order
# hands out the long files first, so the run does not end on one long file while the other worker
# idles. Files not listed follow in their usual order.
LONGEST_FILES_FIRST = (
    "test_cuda_compile.py",  # nvcc + the CUDA emulator build, then the emulated kernels
    "test_hardening.py", "test_varlen.py", "test_tile_engine.py", "test_topk.py", "test_stats.py",
    "test_triton_budget.py",  # compiles Triton kernels for sm_90a
    "test_dropout.py", "test_build.py",  # the CMake build and ctest
    "test_bench_cli.py", "test_tile_edges.py", "test_readme.py", "test_plan.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order kept


def sample_interpreter(backend: str, keep: bool) -> None:
    """Skip this case on the Triton interpreter unless ``keep`` (a case the default run samples)."""
    if backend == "triton" and not keep and not FULL_TESTS and not HAS_CUDA:
        pytest.skip("a sampled subset of this parametrization runs on the Triton interpreter by default; "
                    "FLASHLITE_TESTS=full (make test-full) runs all")


def randn(*shape, dtype=torch.float32, scale=1.0, requires_grad=False):
    t = (torch.randn(*shape, device=DEVICE, dtype=torch.float32) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max |got − want| over the elements, treating −inf == −inf as 0 and any NaN as infinite."""
    got, want = got.detach().double(), want.detach().double()
    both_neg_inf = torch.isneginf(got) & torch.isneginf(want)
    diff = (got - want).abs()
    diff = torch.where(both_neg_inf, torch.zeros_like(diff), diff)
    if torch.isnan(diff).any():
        return float("inf")
    return float(diff.max()) if diff.numel() else 0.0


def assert_rule(name: str, got: torch.Tensor, lowp: torch.Tensor, exact: torch.Tensor, slack: float = 1e-5,
                fallback: "torch.Tensor | None" = None):
    """The correctness rule (docs/design.md) for one tensor.

    A baseline that is not finite where the exact result is (PyTorch's low-precision math
    overflowed) would make the rule vacuous; then ``fallback`` (the same math in float32) is the
    baseline instead, and without one the check fails.
    """
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    assert max_error(exact, exact) == 0.0, f"{name}: the float64 reference itself is NaN"
    err = max_error(got, exact)
    base = max_error(lowp, exact)
    if base == float("inf"):
        assert fallback is not None, f"{name}: the torch-{lowp.dtype} baseline is not finite; the rule would be vacuous"
        # Any computation in the kernel's dtype rounds its largest intermediate at least once:
        # one unit of that dtype's precision at the exact result's scale is the floor.
        finite = exact[torch.isfinite(exact)].detach().double()
        floor = torch.finfo(got.dtype).eps * (float(finite.abs().max()) if finite.numel() else 0.0)
        base = max(max_error(fallback.to(got.dtype), exact), floor)
        assert base != float("inf"), f"{name}: the float32 fallback baseline is not finite either"
    assert err <= 2 * base + slack, f"{name}: error {err:.3g} > 2 x torch-{lowp.dtype} error {base:.3g} + {slack}"


def check_against_reference(q, k, v, pattern, backend, *, grads=True, **kw):
    """Run flashlite (``backend``) and the reference (float64 and the inputs' dtype) on the same
    inputs and apply the correctness rule to out, lse and (if ``grads``) dq, dk, dv.
    Returns the flashlite output."""
    leaves = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    out, lse = flashlite.attention(*leaves, pattern, backend=backend, return_lse=True, **kw)
    assert flashlite.last_backend() == backend, f"ran {flashlite.last_backend()}, not {backend}"
    assert out.dtype == q.dtype and lse.dtype == torch.float32

    exact_leaves = [t.detach().double().requires_grad_(grads) for t in (q, k, v)]
    exact, exact_lse = reference.attention(*exact_leaves, pattern, return_lse=True, compute_dtype=torch.float64, **kw)
    lowp_leaves = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    lowp, lowp_lse = reference.attention(*lowp_leaves, pattern, return_lse=True, compute_dtype=None, **kw)

    # The same math in float32: the baseline where PyTorch's low-precision math overflows.
    f32_leaves = [t.detach().clone().requires_grad_(grads) for t in (q, k, v)]
    f32, f32_lse = reference.attention(*f32_leaves, pattern, return_lse=True, compute_dtype=torch.float32, **kw)

    assert not torch.isnan(out).any(), "NaN in output"
    assert_rule("out", out, lowp, exact, fallback=f32)
    assert_rule("lse", lse, lowp_lse, exact_lse, fallback=f32_lse)
    if grads:
        grad_out = torch.randn_like(exact)
        out.backward(grad_out.to(out.dtype))
        exact.backward(grad_out)
        lowp.backward(grad_out.to(lowp.dtype))
        f32.backward(grad_out.to(f32.dtype))
        for name, got, low, ex, fb in zip(("dq", "dk", "dv"), leaves, lowp_leaves, exact_leaves, f32_leaves):
            assert got.grad is not None, f"{name} missing"
            assert_rule(name, got.grad, low.grad, ex.grad, fallback=fb.grad)
    return out


def make_pattern(name: str, batch: int, heads_q: int, heads_kv: int, seqlen_q: int, seqlen_k: int):
    """A fresh pattern by name (full, causal, window, block_sparse, topk) for these shapes: random
    block-sparse layouts per head, top-k rows per KV head with -1 slots, a query with no key and no
    repeated key."""
    if name == "full":
        return Full()
    if name == "causal":
        return Full(causal=True)
    if name == "window":
        return SlidingWindow(5, 2)
    if name == "block_sparse":
        layout = torch.rand(batch, heads_q, cdiv(seqlen_q, 16), cdiv(seqlen_k, 16), device=DEVICE) > 0.5
        return BlockSparse(layout, 16, causal=True)
    if name == "topk":
        ind = torch.randint(-1, seqlen_k, (batch, heads_kv, seqlen_q, 6), device=DEVICE)
        ind[:, :, 0] = -1  # a query with no key
        # distinct entries per row: replace repeats by -1
        sorted_ind, _ = ind.sort(-1)
        repeat = torch.zeros_like(sorted_ind, dtype=torch.bool)
        repeat[..., 1:] = sorted_ind[..., 1:] == sorted_ind[..., :-1]
        return TopK(sorted_ind.masked_fill(repeat, -1).int(), causal=True)
    raise AssertionError(name)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs per test, reproducible from the test id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
