"""torch.compile(fullgraph=True) through flashlite's custom ops: no graph breaks, same numbers.

The "aot_eager" compile backend keeps this fast on CPU while still tracing forward and backward
through the ops' fake implementations and registered autograd.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import flashlite
from flashlite.nn import FlashAttention, MultiheadAttention, SlidingWindowAttention

from conftest import DEVICE, assert_rule, randn


class Block(nn.Module):
    """Projections around a flashlite attention module, as a model would use it."""

    def __init__(self, attention: nn.Module, dim: int = 32, heads: int = 2):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        B, S, E = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, E // self.heads).permute(2, 0, 3, 1, 4)
        o = self.attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(B, S, E))


CPU_BUILT = flashlite.backends().get("cpu") == "available"
BACKENDS = ["triton"] + ["cpu"] * CPU_BUILT + [None]  # None: auto dispatch


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("attention", ["causal", "window"])
def test_fullgraph_forward_and_backward(backend, attention):
    torch._dynamo.reset()
    inner = FlashAttention(causal=True, backend=backend) if attention == "causal" else \
        SlidingWindowAttention(4, backend=backend)
    model = Block(inner).to(DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = randn(2, 19, 32)
    x_eager, x_comp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want = model(x_eager)
    got = compiled(x_comp)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(x_comp.grad, x_eager.grad, atol=1e-5, rtol=1e-5)
    if backend is not None:
        assert flashlite.last_backend() == backend


def test_fullgraph_multihead_twin_matches_torch():
    torch._dynamo.reset()
    mha = nn.MultiheadAttention(32, 4, batch_first=True, device=DEVICE).eval()
    twin = MultiheadAttention(32, 4, batch_first=True, device=DEVICE, backend="triton").eval()
    twin.load_state_dict(mha.state_dict())

    def run(module, x):
        return module(x, x, x, need_weights=False, is_causal=True,
                      attn_mask=nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=DEVICE))[0]

    compiled = torch.compile(lambda x: twin(x, x, x, need_weights=False, is_causal=True)[0], fullgraph=True,
                             backend="aot_eager")
    x = randn(2, 15, 32)
    with torch.no_grad():
        exact = run(mha.double(), x.double())
        mha.float()
        low = run(mha, x)
        got = compiled(x)
    assert flashlite.last_backend() == "triton"
    assert_rule("compiled twin", got, low, exact)


def test_fullgraph_masks_read_no_values():
    """Padding and masks through the mask front compile into one graph (no value read while
    tracing: key padding becomes fixed-width top-k indices, float masks stay biases) and match
    eager PyTorch."""
    from flashlite.nn.functional import scaled_dot_product_attention as fl_sdpa

    torch._dynamo.reset()
    mha = nn.MultiheadAttention(32, 4, batch_first=True, device=DEVICE).eval()
    twin = MultiheadAttention(32, 4, batch_first=True, device=DEVICE).eval()
    twin.load_state_dict(mha.state_dict())
    x = randn(2, 11, 32)
    kpm = torch.zeros(2, 11, dtype=torch.bool, device=DEVICE)
    kpm[1, :4] = True  # left padding (True = padded, PyTorch's convention)

    def padded(x, kpm):
        return twin(x, x, x, key_padding_mask=kpm, need_weights=False)[0]

    def sdpa(q, k, v, float_mask, keys):
        return (fl_sdpa(q, k, v, attn_mask=float_mask) + fl_sdpa(q, k, v, is_causal=True)
                + fl_sdpa(q, k, v, attn_mask=keys))

    q, k, v = randn(2, 2, 7, 16), randn(2, 2, 9, 16), randn(2, 2, 9, 16)
    float_mask = torch.zeros(7, 9, device=DEVICE)
    float_mask[:, 2] = float("-inf")
    keys = (torch.rand(2, 1, 1, 9, device=DEVICE) > 0.3) | (torch.arange(9, device=DEVICE) == 0)
    for fn, args in ((padded, (x, kpm)), (sdpa, (q, k, v, float_mask, keys))):
        explained = torch._dynamo.explain(fn)(*args)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        with torch.no_grad():
            got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
            want = fn(*args)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(padded(x, kpm), mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0],
                                   atol=1e-5, rtol=1e-5)
