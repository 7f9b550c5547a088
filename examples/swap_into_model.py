"""Swap flashlite into an existing PyTorch model in one line and check the outputs still match.

    python examples/swap_into_model.py

Every torch.nn.MultiheadAttention inside the model (here an nn.TransformerEncoder) becomes a
flashlite.nn.MultiheadAttention sharing the same weights; PyTorch's fused inference path is
switched off for the swapped layers so flashlite really runs.

Called directly, nn.MultiheadAttention defaults to need_weights=True; the attention weights exist
only on flashlite's slow path (dense, the reference with the explicit mask), so a swapped module
warns once when asked for them. Pass need_weights=False to stay on the kernels (the
nn.Transformer* layers already do).
"""
import copy

import torch
from torch import nn

import flashlite

torch.manual_seed(0)
layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True)
model = nn.TransformerEncoder(layer, num_layers=2).eval()
original = copy.deepcopy(model)

model, swapped = flashlite.swap(model, return_count=True)  # <- the one line

x = torch.randn(2, 50, 64)
causal = nn.Transformer.generate_square_subsequent_mask(50)
with torch.no_grad():
    want = original(x, mask=causal, is_causal=True)
    got = model(x, mask=causal, is_causal=True)  # the causal mask runs as flashlite's causal schedule

print(f"swapped {swapped} attention modules; flashlite backend used: {flashlite.last_backend()}")
print(f"max |flashlite - torch| = {(got - want).abs().max().item():.2e}")
assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), "outputs differ"
print("outputs match")

# A direct call: need_weights=False keeps it on the kernels; a key padding mask becomes top-k indices.
attn = model.layers[0].self_attn
padding = torch.zeros(2, 50, dtype=torch.bool)
padding[1, 40:] = True  # the second sequence has 40 real tokens
with torch.no_grad():
    out, weights = attn(x, x, x, key_padding_mask=padding, need_weights=False)
    want, _ = original.layers[0].self_attn(x, x, x, key_padding_mask=padding, need_weights=False)
assert weights is None and torch.allclose(out, want, atol=1e-5, rtol=1e-5)
print(f"direct call with key padding on the kernels: match (backend {flashlite.last_backend()})")
