"""Peak temporary memory of the backward launch paths, measured on CPU at a large shape.

A dispatch mode counts the bytes of every live tensor storage created while the launcher runs
(outputs included); the kernels themselves are stubbed (their own registers and shared memory are
the GPU budget tests' business), so what is measured is the host side: the row term δ, plan
tensors, partial sums. The temporaries - the peak minus the gradients returned - must stay within
a tenth of the inputs (q, k, v, out, dO).
"""
from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from flashlite import Full, SlidingWindow


class PeakBytes(TorchDispatchMode):
    """Live bytes of the tensor storages created inside the mode, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _free(self, ptr: int) -> None:
        self.now -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view shares an input's storage: only storages no input holds are new.
        held = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr and ptr not in self.live and ptr not in held:
                    self.live[ptr] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, ptr)
        return out


class _NoLaunch:
    """Stands for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def test_the_meter_sees_temporaries():
    with PeakBytes() as meter:
        a = torch.ones(1000, 1000)
        b = a * 2
        del b
        c = a[:10]  # a view: nothing new
    assert meter.peak == 8_000_000 and meter.now == 4_000_000 and c.numel() == 10_000


@pytest.mark.parametrize("pattern", [Full(True), SlidingWindow(512, 0)], ids=["causal", "window"])
def test_tile_backward_temporaries_stay_within_a_tenth_of_the_inputs(pattern, monkeypatch):
    from flashlite.kernels import launch, tile_engine

    monkeypatch.setattr(tile_engine, "tile_backward_kv_kernel", _NoLaunch())
    monkeypatch.setattr(tile_engine, "tile_backward_q_kernel", _NoLaunch())
    B, H, N, D = 1, 8, 16384, 128
    q, k, v, out, grad_out = (torch.empty(B, H, N, D, dtype=torch.float16).normal_() for _ in range(5))
    lse = torch.zeros(B, H, N)
    schedule = pattern.schedule(N, N, 128, 64)
    inputs = sum(t.numel() * t.element_size() for t in (q, k, v, out, grad_out, lse))
    with PeakBytes() as meter:
        dq, dk, dv = launch.tile_backward(grad_out, q, k, v, out, lse, schedule, D ** -0.5)
    temporaries = meter.peak - sum(t.numel() * t.element_size() for t in (dq, dk, dv))
    assert temporaries <= 0.1 * inputs, f"{temporaries / 2**20:.0f} MiB of temporaries for {inputs / 2**20:.0f} MiB"
