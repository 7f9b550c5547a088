"""flashlite.nn.MultiheadAttention against torch.nn.MultiheadAttention, and flashlite.swap.

Every numeric comparison follows DESIGN.md's rule: the twin's error against torch's module run
in float64 is at most twice the error of torch's module in the twin's dtype, plus 1e-5.
"""
from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from torch import nn

import flashlite
from flashlite.nn import MultiheadAttention, SlowPathWarning
from flashlite.nn import functional as FL

from conftest import DEVICE, assert_rule, randn

E, H = 32, 4

# need_weights=True is what these tests compare; its once-per-module warning has its own test.
pytestmark = pytest.mark.filterwarnings("ignore::flashlite.nn.SlowPathWarning")


def twin_of(mha: nn.MultiheadAttention, **kw) -> MultiheadAttention:
    twin = MultiheadAttention(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                              add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim,
                              vdim=mha.vdim, batch_first=mha.batch_first, device=DEVICE,
                              dtype=mha.out_proj.weight.dtype, **kw)
    twin.load_state_dict(mha.state_dict(), strict=True)
    return twin


def as_double(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.double()
    return x


def check_mha(mha: nn.MultiheadAttention, args, kwargs, twin_kwargs=None, twin=None):
    """Run torch (float64 and the inputs' dtype) and the twin; apply the rule to output and weights."""
    twin = twin if twin is not None else twin_of(mha)
    exact_mha = copy.deepcopy(mha).double()
    exact_out, exact_w = exact_mha(*[as_double(a) for a in args], **{k: as_double(v) for k, v in kwargs.items()})
    low_out, low_w = mha(*args, **kwargs)
    got_out, got_w = twin(*args, **(twin_kwargs if twin_kwargs is not None else kwargs))
    assert torch.isfinite(exact_out).all(), "the float64 baseline is not finite: the rule would be vacuous"
    assert got_out.dtype == low_out.dtype
    assert not torch.isnan(got_out).any()
    assert_rule("out", got_out, low_out, exact_out)
    assert (got_w is None) == (low_w is None)
    if got_w is not None:
        assert_rule("weights", got_w, low_w, exact_w)
    return got_out


def layout(batch_first, B, S, e):
    return (B, S, e) if batch_first else (S, B, e)


# -- state dict -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"kdim": 24, "vdim": 20}, {"bias": False}, {"add_bias_kv": True},
                                {"add_zero_attn": True}], ids=str)
def test_state_dict_keys_and_strict_load(kw):
    mha = nn.MultiheadAttention(E, H, **kw)
    twin = MultiheadAttention(E, H, **kw)
    assert list(twin.state_dict()) == list(mha.state_dict())
    assert [n for n, _ in twin.named_parameters()] == [n for n, _ in mha.named_parameters()]
    twin.load_state_dict(mha.state_dict(), strict=True)
    for (name, a), b in zip(mha.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    mha.load_state_dict(twin.state_dict(), strict=True)  # and back


def test_constructor_errors():
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(30, 4)
    with pytest.raises(ValueError, match="greater than 0"):
        MultiheadAttention(0, 4)
    with pytest.raises(TypeError, match="pattern"):
        MultiheadAttention(E, H, pattern="causal")


# -- outputs ----------------------------------------------------------------------------------------
MASKS = ["none", "kpm_bool", "kpm_float", "attn_bool", "attn_float", "attn_3d", "causal_mask", "padded_attn"]


def make_masks(kind, B, L, S, dtype):
    kw = {}
    if kind in ("kpm_bool", "padded_attn"):
        kpm = torch.zeros(B, S, dtype=torch.bool, device=DEVICE)
        kpm[0, -3:] = True  # right padding
        kpm[-1, :2] = True  # left padding
        kw["key_padding_mask"] = kpm
    if kind == "kpm_float":
        kpm = torch.zeros(B, S, device=DEVICE, dtype=dtype)
        kpm[0, -2:] = float("-inf")
        kpm[-1, 1] = -1.5  # a soft penalty: stays a bias
        kw["key_padding_mask"] = kpm
    if kind in ("attn_bool", "padded_attn"):
        am = torch.rand(L, S, device=DEVICE) < 0.3
        am[:, 0] = False  # every row keeps a key (torch gives NaN for empty rows)
        am[:, -1] = False
        kw["attn_mask"] = am
    if kind == "attn_float":
        kw["attn_mask"] = randn(L, S, dtype=dtype)
    if kind == "attn_3d":
        am = torch.rand(B * H, L, S, device=DEVICE) < 0.3
        am[..., 0] = False
        kw["attn_mask"] = am
    if kind == "causal_mask":
        kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L, device=DEVICE)[:L, :S]
    return kw


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mode", ["self", "cross", "kvdim"])
@pytest.mark.parametrize("mask", MASKS)
def test_matches_torch(batch_first, mode, mask):
    B, L = 3, 11
    S = L if mode == "self" else 14
    kw = {"kdim": 24, "vdim": 20} if mode == "kvdim" else {}
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, device=DEVICE, **kw).eval()
    with torch.no_grad():  # non-zero biases, so they are tested too
        for p in mha.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    if mask == "causal_mask" and mode != "self":
        S = L
    x = randn(*layout(batch_first, B, L, E))
    key = x if mode == "self" else randn(*layout(batch_first, B, S, kw.get("kdim", E)))
    value = x if mode == "self" else randn(*layout(batch_first, B, S, kw.get("vdim", E)))
    masks = make_masks(mask, B, L, S, torch.float32)
    for need_weights in (False, True):
        check_mha(mha, (x, key, value), dict(masks, need_weights=need_weights))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_is_causal(batch_first, with_mask):
    B, L = 2, 13
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first, device=DEVICE).eval()
    x = randn(*layout(batch_first, B, L, E))
    causal = nn.Transformer.generate_square_subsequent_mask(L, device=DEVICE)
    twin_kwargs = {"is_causal": True, "need_weights": False}
    if with_mask:
        twin_kwargs["attn_mask"] = causal
    check_mha(mha, (x, x, x), {"attn_mask": causal, "is_causal": True, "need_weights": False}, twin_kwargs)


@pytest.mark.parametrize("extra", ["add_bias_kv", "add_zero_attn"])
@pytest.mark.parametrize("case", ["hint", "hint_weights", "mask"])
def test_extra_key_columns(extra, case):
    B, L = 2, 9
    mha = nn.MultiheadAttention(E, H, device=DEVICE, **{extra: True}).eval()
    x = randn(L, B, E)
    causal = nn.Transformer.generate_square_subsequent_mask(L, device=DEVICE)
    kwargs = {"attn_mask": causal, "is_causal": case != "mask", "need_weights": case == "hint_weights"}
    check_mha(mha, (x, x, x), kwargs)
    check_mha(mha, (x, x, x), {"need_weights": True, "key_padding_mask": torch.rand(B, L, device=DEVICE) < 0.2})


@pytest.mark.parametrize("average", [True, False])
def test_unbatched_and_per_head_weights(average):
    mha = nn.MultiheadAttention(E, H, device=DEVICE).eval()
    q, kv = randn(7, E), randn(10, E)
    kpm = torch.zeros(10, dtype=torch.bool, device=DEVICE)
    kpm[3] = True
    check_mha(mha, (q, kv, kv), {"key_padding_mask": kpm, "average_attn_weights": average})


def test_float16():
    mha = nn.MultiheadAttention(E, H, batch_first=True, device=DEVICE, dtype=torch.float16).eval()
    x = randn(2, 12, E, dtype=torch.float16)
    kpm = torch.zeros(2, 12, dtype=torch.bool, device=DEVICE)
    kpm[1, :5] = True
    check_mha(mha, (x, x, x), {"key_padding_mask": kpm, "need_weights": False})
    check_mha(mha, (x, x, x), {"need_weights": False})


def test_gradients_match_torch():
    B, L = 2, 10
    mha = nn.MultiheadAttention(E, H, batch_first=True, device=DEVICE)
    twin = twin_of(mha)
    exact = copy.deepcopy(mha).double()
    x = randn(B, L, E)
    kpm = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    kpm[1, :3] = True
    grad = randn(B, L, E)
    for module, inp in ((mha, x), (twin, x), (exact, x.double())):
        leaf = inp.detach().clone().requires_grad_(True)
        out, _ = module(leaf, leaf, leaf, key_padding_mask=kpm, need_weights=False)
        out.backward(grad.to(out.dtype))
        module._leaf = leaf
    assert_rule("dx", twin._leaf.grad, mha._leaf.grad, exact._leaf.grad)
    for (name, p_low), p_got, p_ex in zip(mha.named_parameters(), twin.parameters(), exact.parameters()):
        assert_rule(f"d{name}", p_got.grad, p_low.grad, p_ex.grad)


# -- paths ----------------------------------------------------------------------------------------------
@pytest.fixture
def no_dense(monkeypatch):
    """Fail if the slow (dense-mask) path runs."""
    def boom(*a, **k):
        raise AssertionError("the dense slow path ran")

    monkeypatch.setattr(FL, "dense_attention", boom)


@pytest.mark.parametrize("kind", ["none", "is_causal", "causal_mask", "kpm_bool"])
def test_kernel_path_without_dense_masks(no_dense, kind):
    B, L = 2, 12
    mha = nn.MultiheadAttention(E, H, batch_first=True, device=DEVICE).eval()
    twin = twin_of(mha)
    x = randn(B, L, E)
    causal = nn.Transformer.generate_square_subsequent_mask(L, device=DEVICE)
    kwargs = {"need_weights": False}
    if kind == "is_causal":
        kwargs.update(attn_mask=causal, is_causal=True)
    if kind == "causal_mask":
        kwargs.update(attn_mask=causal.isinf())  # a bool causal mask is recognised too
    if kind == "kpm_bool":
        kwargs["key_padding_mask"] = torch.rand(B, L, device=DEVICE) < 0.3
    want, _ = mha(x, x, x, **kwargs)
    got, _ = twin(x, x, x, **kwargs)
    assert flashlite.last_backend() is not None
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dropout_in_training():
    """Dropout runs on the documented reference path: the returned weights are the dropped-out
    probabilities (each kept entry scaled by 1/(1-p)), and the output is exactly those weights
    applied to the projected values."""
    B, L, p = 2, 9, 0.4
    twin = MultiheadAttention(E, H, dropout=p, batch_first=True, device=DEVICE).train()
    x = randn(B, L, E)
    out, weights = twin(x, x, x, need_weights=True, average_attn_weights=False)
    eval_w = twin.eval()(x, x, x, need_weights=True, average_attn_weights=False)[1]
    dropped = weights == 0
    assert 0.2 < dropped.float().mean() < 0.6
    torch.testing.assert_close(weights[~dropped], (eval_w / (1 - p))[~dropped], atol=1e-5, rtol=1e-5)
    v = torch.nn.functional.linear(x, twin.in_proj_weight[2 * E:], twin.in_proj_bias[2 * E:])
    v = v.view(B, L, H, E // H).transpose(1, 2)
    want = (weights @ v).transpose(1, 2).reshape(B, L, E)
    want = torch.nn.functional.linear(want, twin.out_proj.weight, twin.out_proj.bias)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    twin.train()
    a, _ = twin(x, x, x, need_weights=False)
    b, _ = twin(x, x, x, need_weights=False)
    assert not torch.equal(a, b)  # fresh dropout each call


def test_pattern_restricts_heads():
    B, L = 1, 20
    window = flashlite.SlidingWindow(3, 0)
    twin = MultiheadAttention(E, H, batch_first=True, device=DEVICE, pattern=window).eval()
    plain = MultiheadAttention(E, H, batch_first=True, device=DEVICE).eval()
    plain.load_state_dict(twin.state_dict())
    x = randn(B, L, E)
    band = torch.ones(L, L, dtype=torch.bool, device=DEVICE)
    band = ~(band.tril() & ~band.tril(-4))  # hidden outside j in [i-3, i]
    got, _ = twin(x, x, x, need_weights=False)
    want, _ = plain(x, x, x, attn_mask=band, need_weights=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_need_weights_warns_once_per_module():
    """need_weights=True (PyTorch's default) takes the slow path: each module says so once, naming the fix."""
    twin, other = (MultiheadAttention(E, H, batch_first=True, device=DEVICE) for _ in range(2))
    x = randn(2, 6, E)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        twin(x, x, x)
        twin(x, x, x, need_weights=True)
        other(x, x, x)
        twin(x, x, x, need_weights=False)
    slow = [w for w in caught if issubclass(w.category, SlowPathWarning)]
    assert len(slow) == 2, [str(w.message) for w in slow]  # once per module
    assert "need_weights=False" in str(slow[0].message) and slow[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPathWarning)
        MultiheadAttention(E, H, batch_first=True, device=DEVICE)(x, x, x, need_weights=False)


def test_nested_input_is_refused():
    twin = MultiheadAttention(E, H, batch_first=True)
    nt = torch.nested.nested_tensor([torch.randn(3, E), torch.randn(5, E)])
    with pytest.raises(ValueError, match="nested"):
        twin(nt, nt, nt)


# -- swap -------------------------------------------------------------------------------------------------
@pytest.fixture
def attend_calls(monkeypatch):
    calls = []
    original = FL.serve

    def counting(*a, **k):
        calls.append(1)
        return original(*a, **k)

    monkeypatch.setattr(FL, "serve", counting)
    return calls


def exact_and_low(model, *args, **kwargs):
    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        want = exact(*[as_double(a) for a in args], **{k: as_double(v) for k, v in kwargs.items()})
        assert torch.isfinite(want).all()
        return want, model(*args, **kwargs)


@pytest.mark.parametrize("padding", [False, True])
def test_swap_transformer_encoder_fast_path(attend_calls, padding):
    """Under no_grad in eval mode PyTorch would run its fused encoder kernels; after swap the
    flashlite modules must run (counted) and the outputs must still match."""
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=64, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2).to(DEVICE).eval()
    x = randn(3, 10, E)
    kwargs = {}
    if padding:
        kpm = torch.zeros(3, 10, dtype=torch.bool, device=DEVICE)
        kpm[1, 6:] = True
        kpm[2, 8:] = True
        kwargs["src_key_padding_mask"] = kpm
    exact, low = exact_and_low(encoder, x, **kwargs)
    weights_before = [p for p in encoder.parameters()]
    swapped, count = flashlite.swap(encoder, return_count=True)
    assert swapped is encoder and count == 2
    assert all(isinstance(l.self_attn, MultiheadAttention) for l in encoder.layers)
    assert all(a is b for a, b in zip(weights_before, encoder.parameters()))  # same tensors
    with torch.no_grad():
        got = encoder(x, **kwargs)
    assert len(attend_calls) == 2, "the swapped modules did not run (PyTorch's fused path bypassed them?)"
    if padding:  # PyTorch's nested path zeroes padded positions; compare the real ones
        keep = ~kwargs["src_key_padding_mask"]
        got, low, exact = got[keep], low[keep], exact[keep]
    assert_rule("encoder", got, low, exact)


def test_swap_full_transformer(attend_calls):
    model = nn.Transformer(d_model=E, nhead=H, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
                           dropout=0.0, batch_first=True).to(DEVICE).eval()
    src, tgt = randn(2, 12, E), randn(2, 7, E)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(7, device=DEVICE)
    exact, low = exact_and_low(model, src, tgt, tgt_mask=tgt_mask, tgt_is_causal=True)
    _, count = flashlite.swap(model, return_count=True)
    assert count == 6  # 2 encoder self-attn + 2 x (decoder self-attn + cross-attn)
    assert not any(type(m) is nn.MultiheadAttention for m in model.modules())
    with torch.no_grad():
        got = model(src, tgt, tgt_mask=tgt_mask, tgt_is_causal=True)
    assert len(attend_calls) == 6
    assert_rule("transformer", got, low, exact)


def test_swap_training_gradients_and_sharing():
    layer = nn.TransformerDecoderLayer(E, H, dim_feedforward=64, dropout=0.0, batch_first=True).to(DEVICE)
    layer.multihead_attn = layer.self_attn  # one module used twice stays one module
    ref = copy.deepcopy(layer)
    _, count = flashlite.swap(layer, return_count=True)
    assert count == 1 and layer.multihead_attn is layer.self_attn
    x, mem = randn(2, 6, E), randn(2, 8, E)
    out_ref, out = ref(x, mem), layer(x, mem)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    out_ref.sum().backward()
    torch.testing.assert_close(layer.self_attn.in_proj_weight.grad, ref.self_attn.in_proj_weight.grad,
                               atol=1e-4, rtol=1e-4)


def test_swap_logs_the_need_weights_slow_path(caplog):
    model = nn.Sequential(nn.TransformerEncoderLayer(E, H, dim_feedforward=64, batch_first=True))
    with caplog.at_level(logging.INFO, logger="flashlite"):
        flashlite.swap(model)
    assert "replaced 1" in caplog.text and "need_weights=False" in caplog.text
    assert "need_weights" in flashlite.swap.__doc__


def test_swap_single_module_and_pattern():
    mha = nn.MultiheadAttention(E, H, batch_first=True, device=DEVICE)
    window = flashlite.SlidingWindow(2, 0)
    twin = flashlite.swap(mha, pattern=window)
    assert isinstance(twin, MultiheadAttention) and twin.pattern is window
    assert twin.in_proj_weight is mha.in_proj_weight and twin.out_proj is mha.out_proj
    with pytest.raises(TypeError, match="model"):
        flashlite.swap("model")
    _, none = flashlite.swap(nn.Linear(2, 2), return_count=True)
    assert none == 0
