"""flashlite (cpu backend) called from 8 Python threads at once gives, bit for bit, what each call
gives alone.

The C++ kernels release the GIL, so the 8 calls really run at the same time, each starting its own
OpenMP team; the plan cache, the custom ops and autograd are shared. Each thread runs its own
pattern and shape (full, causal, window, block-sparse, top-k with empty and repeated slots, decode,
GQA, float32 / float16 / bfloat16, softcap, ALiBi), forward and backward, several times, and every
output, lse and gradient must equal the single-thread result exactly (the kernels are
deterministic for any thread count: csrc/README.md § Determinism). `make sanitize` also runs this
file against the AddressSanitizer build of flashlite._C.
"""
from __future__ import annotations

import threading

import pytest
import torch

import flashlite
from flashlite import BlockSparse, Full, SlidingWindow, TopK

pytestmark = pytest.mark.skipif(flashlite.backends()["cpu"] != "available",
                                reason=f"cpu backend: {flashlite.backends()['cpu']}")

THREADS = 8
ROUNDS = 3


def _job(index: int):
    """Inputs, pattern and keyword arguments of thread ``index`` (all different)."""
    g = torch.Generator().manual_seed(1000 + index)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    def qkv(B, Hq, Hkv, Nq, Nk, D, dtype=torch.float32):
        return randn(B, Hq, Nq, D, dtype=dtype), randn(B, Hkv, Nk, D, dtype=dtype), randn(B, Hkv, Nk, D, dtype=dtype)

    kw = {}
    if index == 0:
        q, k, v = qkv(1, 4, 4, 150, 150, 64)
        pattern = Full(False)
    elif index == 1:
        q, k, v = qkv(2, 4, 1, 97, 130, 40, torch.bfloat16)
        pattern = Full(True)
    elif index == 2:
        q, k, v = qkv(1, 6, 2, 200, 200, 32, torch.float16)
        pattern = SlidingWindow(37, 5)
        kw = {"softcap": 15.0}
    elif index == 3:
        q, k, v = qkv(1, 2, 2, 130, 170, 24)
        layout = torch.rand(1, 2, 5, 6, generator=g) < 0.5
        layout[..., 0] = True
        pattern = BlockSparse(layout, 32)
    elif index == 4:
        q, k, v = qkv(2, 4, 2, 61, 90, 48)
        indices = torch.randint(-1, 90, (2, 2, 61, 16), generator=g)  # -1 slots and repeated keys
        pattern = TopK(indices, causal=True)
    elif index == 5:
        q, k, v = qkv(1, 8, 1, 3, 1500, 64)  # decode rows, keys split in pieces
        pattern = Full(True)
        kw = {"alibi_slopes": torch.rand(8, generator=g)}
    elif index == 6:
        q, k, v = qkv(1, 3, 3, 77, 77, 17, torch.bfloat16)
        indices = torch.randint(0, 77, (1, 1, 9), generator=g)  # one list shared by every query
        pattern = TopK(indices)
    else:
        q, k, v = qkv(3, 2, 1, 45, 45, 96)
        pattern = SlidingWindow(8, 8)
    return q, k, v, pattern, kw, randn(*q.shape, dtype=q.dtype)


def _run(job):
    """out, lse, dq, dk, dv of one call on the cpu backend."""
    q, k, v, pattern, kw, grad_out = job
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = flashlite.attention(*leaves, pattern, backend="cpu", return_lse=True, **kw)
    assert flashlite.last_backend() == "cpu"
    out.backward(grad_out)
    return [out.detach(), lse.detach()] + [t.grad for t in leaves]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def test_eight_python_threads_give_the_single_thread_results_bitwise():
    jobs = [_job(i) for i in range(THREADS)]
    alone = [_run(job) for job in jobs]  # one at a time, on the main thread
    start = threading.Barrier(THREADS)
    results, errors = {}, []

    def worker(index: int) -> None:
        try:
            start.wait(timeout=60)
            results[index] = [_run(jobs[index]) for _ in range(ROUNDS)]
        except BaseException as exc:  # noqa: BLE001 - reported below with the thread's index
            errors.append((index, repr(exc)))

    threads = [threading.Thread(target=worker, args=(i,), name=f"flashlite-{i}") for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"
    assert not errors, errors
    names = ("out", "lse", "dq", "dk", "dv")
    for index in range(THREADS):
        for round_ in range(ROUNDS):
            for name, got, want in zip(names, results[index][round_], alone[index]):
                assert got.dtype == want.dtype and got.shape == want.shape, (index, name)
                assert torch.equal(_bits(got), _bits(want)), f"thread {index} round {round_}: {name} differs"


def test_threads_share_one_cached_plan_per_pattern():
    """The same top-k pattern from 8 threads at once: every call gets the single-thread bits, and
    the plan cache (shared) still serves the pattern afterwards."""
    q, k, v, pattern, kw, grad_out = _job(4)
    job = (q, k, v, pattern, kw, grad_out)
    want = _run(job)
    start = threading.Barrier(THREADS)
    results, errors = [], []

    def worker() -> None:
        try:
            start.wait(timeout=60)
            results.append(_run(job))
        except BaseException as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    assert len(results) == THREADS
    for got in results:
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(got, want))


def test_threads_while_the_plan_cache_evicts(monkeypatch):
    """Calls from 8 threads while the plan cache is full and evicting (a cache of 4 entries, many
    shapes, the interpreter switching threads every microsecond): no call may fail."""
    import sys

    from flashlite.dispatch import plan as plan_module

    monkeypatch.setattr(plan_module.CACHE, "size", 4)
    switch = sys.getswitchinterval()
    errors = []

    def worker(index: int) -> None:
        try:
            for r in range(400):
                n = 16 + (index * 7 + r) % 3
                q, k = torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16)
                flashlite.attention(q, k, k, SlidingWindow(1 + r % 2, 0), backend="cpu")
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
    finally:
        sys.setswitchinterval(switch)
        plan_module.CACHE.clear()
    assert not errors, errors[:3]
