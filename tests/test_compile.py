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
