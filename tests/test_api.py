"""Public API: input validation (every bad input a clear error naming the argument), backend
selection, empty inputs, and the window/int conventions."""
from __future__ import annotations

import pytest
import torch

import flashlite
from flashlite import BlockSparse, Full, SlidingWindow, TopK

from conftest import DEVICE, check_against_reference, randn


def qkv(B=1, Hq=2, Hkv=2, Nq=20, Nk=24, D=32, dtype=torch.float32):
    return randn(B, Hq, Nq, D, dtype=dtype), randn(B, Hkv, Nk, D, dtype=dtype), randn(B, Hkv, Nk, D, dtype=dtype)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda q, k, v: (q[0], k, v), ValueError, "q must be 4-D"),
    (lambda q, k, v: (q.long(), k, v), TypeError, "q must be float16"),
    (lambda q, k, v: (q, k.half(), v), TypeError, "share one dtype"),
    (lambda q, k, v: (q, k, v[:, :, :5]), ValueError, "k and v must have the same shape"),
    (lambda q, k, v: (q[..., :16], k, v), ValueError, "head_dim"),
    (lambda q, k, v: (torch.cat([q, q[:, :1]], 1), k, v), ValueError, "multiple of k/v heads"),
    (lambda q, k, v: (q.expand(2, -1, -1, -1), k, v), ValueError, "batch"),
    (lambda q, k, v: ([1, 2], k, v), TypeError, "q must be a torch.Tensor"),
])
def test_bad_qkv(mutate, error, match):
    with pytest.raises(error, match=match):
        flashlite.attention(*mutate(*qkv()))


def test_head_dim_too_large():
    q, k, v = qkv(D=264)
    with pytest.raises(ValueError, match="head_dim must be in"):
        flashlite.attention(q, k, v)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(scale="big"), TypeError, "scale"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes"),
    (dict(alibi_slopes=torch.ones(2, dtype=torch.long)), TypeError, "alibi_slopes"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(return_lse=1), TypeError, "return_lse"),
])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        flashlite.attention(*qkv(), **kwargs)


def test_bad_patterns():
    q, k, v = qkv(Nq=100, Nk=70)
    with pytest.raises(TypeError, match="pattern must be"):
        flashlite.attention(q, k, v, "causal")
    with pytest.raises(ValueError, match="window left must be >= 0"):
        flashlite.sliding_window_attention(q, k, v, -1)
    with pytest.raises(TypeError, match="window must be"):
        flashlite.sliding_window_attention(q, k, v, 2.5)
    with pytest.raises(ValueError, match="right == 0"):
        flashlite.sliding_window_attention(q, k, v, (3, 4), causal=True)
    with pytest.raises(ValueError, match="layout must have shape"):
        flashlite.block_sparse_attention(q, k, v, torch.ones(1, 1, 2, 2, dtype=torch.bool), block_size=32)
    with pytest.raises(TypeError, match="dtype torch.bool"):
        flashlite.block_sparse_attention(q, k, v, torch.ones(1, 1, 4, 3), block_size=32)
    with pytest.raises(ValueError, match="block_size must be one of"):
        flashlite.block_sparse_attention(q, k, v, torch.ones(1, 1, 4, 3, dtype=torch.bool), block_size=24)
    with pytest.raises(ValueError, match=r"layout must have shape \[1\|1, 2\|1"):
        flashlite.block_sparse_attention(q, k, v, torch.ones(1, 3, 4, 3, dtype=torch.bool), block_size=32)


@pytest.mark.parametrize("indices,error,match", [
    (torch.full((1, 2, 20, 3), 70), ValueError, r"\[-1, Nk\)"),
    (torch.full((1, 2, 20, 3), -2), ValueError, r"\[-1, Nk\)"),
    (torch.zeros(1, 2, 20, 3), TypeError, "int32 or int64"),
    (torch.zeros(1, 3, 20, 3, dtype=torch.long), ValueError, "indices must have shape"),
    (torch.zeros(1, 2, 19, 3, dtype=torch.long), ValueError, "indices must have shape"),
    (torch.zeros(2, 3, dtype=torch.long), ValueError, "indices must have shape"),
])
def test_bad_indices(indices, error, match):
    q, k, v = qkv(Nq=20, Nk=70)
    with pytest.raises(error, match=match):
        flashlite.topk_attention(q, k, v, indices.to(DEVICE) if indices.dtype != torch.float32 else indices)


def test_window_int_conventions():
    assert flashlite.api.window_pattern(5, causal=True).band() == (5, 0)
    assert flashlite.api.window_pattern(5, causal=False).band() == (5, 5)
    assert flashlite.api.window_pattern((3, 2), causal=False).band() == (3, 2)


def test_window_equal_to_whole_history_is_causal():
    """Window (Nk - 1, 0) is causal attention."""
    q, k, v = qkv(Nq=30, Nk=45)
    a = flashlite.attention(q, k, v, SlidingWindow(44, 0), backend="triton")
    b = flashlite.attention(q, k, v, Full(True), backend="triton")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_empty_sequences_give_zeros():
    q, k, v = qkv(Nq=5, Nk=0)
    out, lse = flashlite.attention(q, k, v, return_lse=True, backend="triton")
    assert out.shape == q.shape and out.abs().max() == 0 and torch.isneginf(lse).all()


def test_non_contiguous_last_dim_is_copied():
    q, k, v = qkv()
    q_odd = torch.randn(1, 2, 20, 64, device=DEVICE)[..., ::2]
    assert q_odd.stride(-1) == 2
    check_against_reference(q_odd, k, v, Full(False), "triton")


def test_backend_env_override(monkeypatch):
    q, k, v = qkv()
    monkeypatch.setenv("FLASHLITE_BACKEND", "reference")
    flashlite.attention(q, k, v)
    assert flashlite.last_backend() == "reference"
    monkeypatch.setenv("FLASHLITE_BACKEND", "cuda" if not torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="FLASHLITE_BACKEND="):
        flashlite.attention(q, k, v)


def test_backends_report_lists_every_backend():
    report = flashlite.backends()
    assert set(report) == {"triton", "cuda", "cpu", "reference"}
    assert report["reference"] == "available"
    assert all(isinstance(reason, str) and reason for reason in report.values())


def test_auto_backend_on_cpu_is_native_or_reference():
    if DEVICE.type != "cpu":
        pytest.skip("CPU dispatch only")
    flashlite.attention(*qkv())
    expected = "cpu" if flashlite.backends()["cpu"] == "available" else "reference"
    assert flashlite.last_backend() == expected


def test_reference_backend_matches_rule():
    check_against_reference(*qkv(Hq=4, Hkv=2), Full(True), "reference")


@pytest.mark.parametrize("pattern", [Full(True), SlidingWindow(5), TopK(torch.randint(0, 24, (1, 2, 20, 4)))],
                         ids=["causal", "window", "topk"])
def test_inference_call_bypasses_the_custom_op_with_the_same_result(pattern, monkeypatch):
    """Without autograd or tracing, dispatch calls the backend directly (no torch.library op, whose
    Python costs more than a short decode step); the result must be the op's, bit for bit, and the
    op path must still serve autograd and fake tensors."""
    from flashlite import dispatch

    if isinstance(pattern, TopK):
        pattern = TopK(pattern.indices.to(DEVICE))
    q, k, v = qkv()
    ops = []
    real = dispatch.attention_op
    monkeypatch.setattr(dispatch, "attention_op", lambda *a, **kw: ops.append(1) or real(*a, **kw))
    with torch.no_grad():
        direct, direct_lse = flashlite.attention(q, k, v, pattern, return_lse=True)
    assert ops == []
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    through_op, op_lse = flashlite.attention(*leaves, pattern, return_lse=True)
    assert ops == [1]
    assert torch.equal(direct, through_op.detach()) and torch.equal(direct_lse, op_lse)
    from torch.utils._python_dispatch import TorchDispatchMode

    class PassThrough(TorchDispatchMode):  # a mode sees ops: the call must go through the op
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), PassThrough():
        moded = flashlite.attention(q, k, v, pattern)
    assert ops == [1, 1] and torch.equal(moded, direct)
