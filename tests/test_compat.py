"""flashlite.compat: flash-attn 2's functions and bert_padding helpers, install()/uninstall(), and
flashlite.nn.functional.varlen_attn (PyTorch's varlen_attn twin).

The oracle is written here from flash-attn's documented semantics, independently of flashlite:
float64 scores on [B, S, H, D] tensors, bottom-right causal, windows
``p(i) - left <= j <= p(i) + right`` with -1 unbounded, ``softcap·tanh(s / softcap)``, ALiBi
``-slope·|i + Nk - Nq - j|``, rows that see no key give zeros and lse +inf (flash-attn's value).
Small shapes: the whole file runs in well under a minute on two cores.
"""
from __future__ import annotations

import inspect
import sys
import types
import zlib

import pytest
import torch

import flashlite
from flashlite import compat
from flashlite.compat import bert_padding as bp
from flashlite.compat import flash_attn as fa
from flashlite.nn import functional as FL

from conftest import assert_rule


# ---------------------------------------------------------------------------------------------
# The oracle (flash-attn's semantics, float64)
# ---------------------------------------------------------------------------------------------
def oracle(q, k, v, causal=False, window=(-1, -1), softcap=0.0, alibi=None, scale=None, dtype=torch.float64):
    """q [B, Sq, H, D], k/v [B, Sk, Hk, D] -> (out [B, Sq, H, D], lse [B, H, Sq])."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    heads, heads_k = q.shape[2], k.shape[2]
    k = k.repeat_interleave(heads // heads_k, dim=2)
    v = v.repeat_interleave(heads // heads_k, dim=2)
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(seqlen_q).view(-1, 1)
    j = torch.arange(seqlen_k).view(1, -1)
    p = i + seqlen_k - seqlen_q
    if alibi is not None:
        slopes = alibi.to(dtype).view(-1 if alibi.dim() == 2 else 1, heads, 1, 1)
        s = s - slopes * (p - j).abs().to(dtype)
    left, right = window
    right = 0 if causal else right
    keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    if right >= 0:
        keep &= j <= p + right
    if left >= 0:
        keep &= j >= p - left
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    probs = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out, lse.masked_fill(torch.isneginf(lse), float("inf"))


def rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype).requires_grad_(True)


def grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


def close(got, want, what, atol=2e-5, rtol=1e-4):
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------
# Signatures: flash-attn 2.8.4's, parameter for parameter
# ---------------------------------------------------------------------------------------------
_COMMON = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
           ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
_EMPTY = inspect.Parameter.empty
FLASH_ATTN_SIGNATURES = {
    "flash_attn_func": [("q", _EMPTY), ("k", _EMPTY), ("v", _EMPTY)] + _COMMON,
    "flash_attn_qkvpacked_func": [("qkv", _EMPTY)] + _COMMON,
    "flash_attn_kvpacked_func": [("q", _EMPTY), ("kv", _EMPTY)] + _COMMON,
    "flash_attn_varlen_func": [("q", _EMPTY), ("k", _EMPTY), ("v", _EMPTY), ("cu_seqlens_q", _EMPTY),
                               ("cu_seqlens_k", _EMPTY), ("max_seqlen_q", _EMPTY), ("max_seqlen_k", _EMPTY)]
                              + _COMMON + [("block_table", None)],
    "flash_attn_varlen_qkvpacked_func": [("qkv", _EMPTY), ("cu_seqlens", _EMPTY), ("max_seqlen", _EMPTY)] + _COMMON,
    "flash_attn_varlen_kvpacked_func": [("q", _EMPTY), ("kv", _EMPTY), ("cu_seqlens_q", _EMPTY),
                                        ("cu_seqlens_k", _EMPTY), ("max_seqlen_q", _EMPTY), ("max_seqlen_k", _EMPTY)]
                                       + _COMMON,
    "flash_attn_with_kvcache": [("q", _EMPTY), ("k_cache", _EMPTY), ("v_cache", _EMPTY), ("k", None), ("v", None),
                                ("rotary_cos", None), ("rotary_sin", None), ("cache_seqlens", None),
                                ("cache_batch_idx", None), ("cache_leftpad", None), ("block_table", None),
                                ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
                                ("softcap", 0.0), ("rotary_interleaved", True), ("alibi_slopes", None),
                                ("num_splits", 0), ("return_softmax_lse", False)],
}


@pytest.mark.parametrize("name", sorted(FLASH_ATTN_SIGNATURES))
def test_signatures_are_flash_attns(name):
    params = inspect.signature(getattr(fa, name)).parameters.values()
    got = [(p.name, p.default) for p in params]
    assert got == FLASH_ATTN_SIGNATURES[name]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)


def test_varlen_attn_signature_is_pytorchs():
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    want = inspect.signature(varlen.varlen_attn).parameters
    got = inspect.signature(FL.varlen_attn).parameters
    assert list(got) == list(want)
    for name, p in want.items():
        assert (got[name].kind, got[name].default) == (p.kind, p.default), name


# ---------------------------------------------------------------------------------------------
# flash_attn_func and the packed variants
# ---------------------------------------------------------------------------------------------
CASES = [
    # (Nq, Nk, heads, heads_k, d, causal, window, softcap, alibi)
    (9, 9, 4, 4, 16, False, (-1, -1), 0.0, None),
    (9, 9, 4, 2, 16, True, (-1, -1), 0.0, None),            # GQA, causal
    (7, 13, 4, 1, 24, True, (-1, -1), 0.0, "bh"),           # MQA, Nq < Nk, ALiBi [B, H]
    (13, 7, 2, 2, 17, True, (-1, -1), 0.0, None),           # Nq > Nk: leading rows see no key; odd head dim
    (11, 17, 4, 2, 8, False, (3, 2), 0.0, None),            # window both sides
    (11, 17, 4, 2, 8, True, (4, 5), 0.0, "h"),              # causal forces right = 0; ALiBi [H]
    (10, 10, 2, 1, 40, False, (-1, 3), 30.0, None),         # unbounded left, softcap
    (12, 12, 2, 2, 33, False, (2, -1), 5.0, "bh"),          # unbounded right, softcap + ALiBi
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_flash_attn_func_matches_oracle(case):
    seqlen_q, seqlen_k, heads, heads_k, d, causal, window, softcap, alibi = case
    torch.manual_seed(zlib.crc32(repr(case).encode()))
    batch = 2
    q = rand(batch, seqlen_q, heads, d, scale=3.0 if softcap else 1.0)
    k, v = rand(batch, seqlen_k, heads_k, d), rand(batch, seqlen_k, heads_k, d)
    slopes = None if alibi is None else torch.rand(*((batch, heads) if alibi == "bh" else (heads,))) * 0.3
    out, lse, none = fa.flash_attn_func(q, k, v, 0.0, causal=causal, window_size=window, softcap=softcap,
                                        alibi_slopes=slopes, return_attn_probs=True)
    assert none is None and out.shape == q.shape
    assert lse.shape == (batch, heads, seqlen_q) and lse.dtype == torch.float32
    want, want_lse = oracle(q, k, v, causal, window, softcap, slopes)
    close(out, want, "out")
    close(lse, want_lse, "lse")
    g = torch.randn_like(out)
    for name, got_g, want_g in zip("qkv", grads(out, (q, k, v), g), grads(want, (q, k, v), g.double())):
        close(got_g, want_g, f"d{name}", atol=5e-5)


def test_half_precision_by_the_rule():
    torch.manual_seed(1)
    q, k, v = rand(2, 33, 4, 64, dtype=torch.float16), rand(2, 40, 2, 64, dtype=torch.float16), \
        rand(2, 40, 2, 64, dtype=torch.float16)
    out = fa.flash_attn_func(q, k, v, causal=True, window_size=(9, -1))
    exact, _ = oracle(q, k, v, True, (9, -1))
    low, _ = oracle(q, k, v, True, (9, -1), dtype=torch.float16)
    assert out.dtype == torch.float16
    assert_rule("fp16 out", out, low, exact)


def test_qkvpacked_and_kvpacked_match_and_carry_gradients():
    torch.manual_seed(2)
    qkv = rand(2, 10, 3, 4, 16)
    out, lse, _ = fa.flash_attn_qkvpacked_func(qkv, causal=True, return_attn_probs=True)
    q, k, v = qkv.unbind(2)
    want, want_lse = oracle(q, k, v, causal=True)
    close(out, want, "qkvpacked out")
    close(lse, want_lse, "qkvpacked lse")
    g = torch.randn_like(out)
    (dqkv,) = grads(out, (qkv,), g)
    (dqkv_want,) = grads(want, (qkv,), g.double())
    close(dqkv, dqkv_want, "dqkv", atol=5e-5)

    q = rand(2, 6, 4, 16)
    kv = rand(2, 11, 2, 2, 16)
    out = fa.flash_attn_kvpacked_func(q, kv, softmax_scale=0.3, window_size=(2, 1), deterministic=True)
    want, _ = oracle(q, kv[:, :, 0], kv[:, :, 1], window=(2, 1), scale=0.3)
    close(out, want, "kvpacked out")
    g = torch.randn_like(out)
    for got_g, want_g, name in zip(grads(out, (q, kv), g), grads(want, (q, kv), g.double()), ("dq", "dkv")):
        close(got_g, want_g, name, atol=5e-5)


def test_window_sides_at_least_nk_are_unbounded_like_flash_attn():
    torch.manual_seed(3)
    q, k, v = rand(1, 12, 2, 8), rand(1, 5, 2, 8), rand(1, 5, 2, 8)
    # flash-attn clamps a side >= Nk to -1: (7, 9) over 5 keys is full attention, even for the rows
    # whose p(i) is far before the keys.
    close(fa.flash_attn_func(q, k, v, window_size=(7, 9)), oracle(q, k, v)[0], "clamped window")
    assert isinstance(fa.pattern_for(False, (7, 9), 5), flashlite.Full)
    assert repr(fa.pattern_for(False, (-1, 0), 5)) == repr(flashlite.Full(causal=True))
    assert repr(fa.pattern_for(True, (3, 2), 50)) == repr(flashlite.SlidingWindow(3, 0))
    # window_size as a tensor (flash-attn's tests pass torch.randint(0, seqlen_k, (2,)))
    out = fa.flash_attn_func(q, k, v, window_size=torch.tensor([1, 2]))
    close(out, oracle(q, k, v, window=(1, 2))[0], "tensor window")


def test_views_in_bshd_layout_are_not_copied(monkeypatch):
    """The [B, S, H, D] tensors reach flashlite.attention as views of the caller's storage."""
    seen = []
    real = flashlite.api.attention

    def spy(q, k, v, *a, **kw):
        seen.extend(t.untyped_storage().data_ptr() for t in (q, k, v))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(flashlite.api, "attention", spy)
    qkv = torch.randn(2, 7, 3, 2, 16)
    fa.flash_attn_qkvpacked_func(qkv)
    assert seen == [qkv.untyped_storage().data_ptr()] * 3


# ---------------------------------------------------------------------------------------------
# varlen
# ---------------------------------------------------------------------------------------------
def packed(lengths, heads, d, **kw):
    return rand(sum(lengths), heads, d, **kw)


def cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def varlen_oracle(q, k, v, lens_q, lens_k, alibi=None, **kw):
    """Each sequence alone through the padded oracle, concatenated: (out [Tq, H, D], lse [H, Tq])."""
    outs, lses, q0, k0 = [], [], 0, 0
    for s, (nq, nk) in enumerate(zip(lens_q, lens_k)):
        slopes = None if alibi is None else (alibi[s] if alibi.dim() == 2 else alibi)
        out, lse = oracle(q[None, q0:q0 + nq], k[None, k0:k0 + nk], v[None, k0:k0 + nk], alibi=slopes, **kw)
        outs.append(out[0])
        lses.append(lse[0])
        q0, k0 = q0 + nq, k0 + nk
    return torch.cat(outs), torch.cat(lses, dim=1)


VARLEN_CASES = [
    # (lens_q, lens_k, heads, heads_k, d, causal, window, softcap, alibi)
    ([5, 1, 9], [5, 1, 9], 4, 2, 16, True, (-1, -1), 0.0, None),
    ([3, 7, 2], [6, 4, 8], 2, 1, 24, True, (-1, -1), 0.0, "bh"),   # Nq != Nk per sequence, per-sequence ALiBi
    ([6, 0, 8], [6, 3, 8], 4, 4, 8, False, (2, 1), 10.0, None),     # an empty query sequence, window, softcap
    ([4, 6], [9, 6], 2, 2, 17, False, (-1, -1), 0.0, "h"),
]


@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: "-".join(map(str, c)))
def test_flash_attn_varlen_func_matches_oracle(case):
    lens_q, lens_k, heads, heads_k, d, causal, window, softcap, alibi = case
    torch.manual_seed(4)
    q = packed(lens_q, heads, d, scale=3.0 if softcap else 1.0)
    k, v = packed(lens_k, heads_k, d), packed(lens_k, heads_k, d)
    slopes = None if alibi is None else torch.rand(*((len(lens_q), heads) if alibi == "bh" else (heads,))) * 0.3
    out, lse, none = fa.flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k),
                                               causal=causal, window_size=window, softcap=softcap,
                                               alibi_slopes=slopes, return_attn_probs=True)
    assert none is None and lse.shape == (heads, sum(lens_q))  # flash-attn's varlen lse layout [H, total_q]
    want, want_lse = varlen_oracle(q, k, v, lens_q, lens_k, slopes, causal=causal, window=window, softcap=softcap)
    close(out, want, "out")
    close(lse, want_lse, "lse")
    g = torch.randn_like(out)
    for name, got_g, want_g in zip("qkv", grads(out, (q, k, v), g), grads(want, (q, k, v), g.double())):
        close(got_g, want_g, f"d{name}", atol=5e-5)


def test_varlen_packed_variants_and_max_seqlen_tensors():
    torch.manual_seed(5)
    lens = [4, 7, 1]
    qkv = rand(sum(lens), 3, 2, 16)
    out = fa.flash_attn_varlen_qkvpacked_func(qkv, cu(lens), torch.tensor(7), causal=True)
    q, k, v = qkv.unbind(1)
    want, _ = varlen_oracle(q, k, v, lens, lens, causal=True)
    close(out, want, "varlen qkvpacked")
    (dqkv,) = grads(out, (qkv,), torch.ones_like(out))
    (dqkv_want,) = grads(want, (qkv,), torch.ones_like(want))
    close(dqkv, dqkv_want, "varlen dqkv", atol=5e-5)

    q = packed([2, 5], 4, 16)
    kv = rand(9, 2, 2, 16)
    out, lse, _ = fa.flash_attn_varlen_kvpacked_func(q, kv, cu([2, 5]), cu([3, 6]), 5, 6, window_size=(1, 1),
                                                     return_attn_probs=True)
    want, want_lse = varlen_oracle(q, kv[:, 0], kv[:, 1], [2, 5], [3, 6], window=(1, 1))
    close(out, want, "varlen kvpacked")
    close(lse, want_lse, "varlen kvpacked lse")


def test_bert_padding_round_trip_through_varlen():
    torch.manual_seed(6)
    batch, seqlen, heads, d = 3, 8, 2, 16
    x = rand(batch, seqlen, heads, d)
    mask = torch.ones(batch, seqlen, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 1:] = False
    unpadded, indices, cu_seqlens, max_seqlen, used = bp.unpad_input(x, mask)
    assert unpadded.shape == (int(mask.sum()), heads, d) and max_seqlen == 8 and isinstance(max_seqlen, int)
    assert cu_seqlens.tolist() == [0, 5, 13, 14] and cu_seqlens.dtype == torch.int32 and used.tolist() == [5, 8, 1]
    assert torch.equal(unpadded, x.reshape(-1, heads, d)[mask.flatten()])
    out = fa.flash_attn_varlen_func(unpadded, unpadded, unpadded, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                    causal=True)
    padded = bp.pad_input(out, indices, batch, seqlen)
    assert padded.shape == x.shape and not padded[~mask].any()
    for b in range(batch):
        n = int(mask[b].sum())
        want, _ = oracle(x[b:b + 1, :n], x[b:b + 1, :n], x[b:b + 1, :n], causal=True)
        close(padded[b:b + 1, :n], want, f"sequence {b}")
    (dx,) = grads(padded, (x,), torch.ones_like(padded))
    assert not dx[~mask].any() and dx[mask].abs().sum() > 0
    # unused_mask counts into the lengths but not into seqused; the residual helper adds gradients
    unused = torch.zeros_like(mask)
    unused[2, 1:3] = True
    _, _, cu2, _, used2 = bp.unpad_input(x, mask, unused)
    assert cu2.tolist() == [0, 5, 13, 16] and used2.tolist() == [5, 8, 1]
    y = torch.randn(6, 3, requires_grad=True)
    picked, residual = bp.index_first_axis_residual(y, torch.tensor([0, 4]))
    (picked.sum() + (residual * 2).sum()).backward()
    assert y.grad[0].tolist() == [3.0, 3.0, 3.0] and y.grad[1].tolist() == [2.0, 2.0, 2.0]


def test_unpad_input_for_concatenated_sequences():
    x = torch.arange(2 * 6, dtype=torch.float32).view(2, 6, 1)
    lengths = torch.tensor([[2, 3, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]])
    states, indices, cu_seqlens, max_seqlen = bp.unpad_input_for_concatenated_sequences(x, lengths)
    assert cu_seqlens.tolist() == [0, 2, 5, 11] and max_seqlen == 6
    assert indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11] and states.shape == (11, 1)


# ---------------------------------------------------------------------------------------------
# Empty rows, dropout, errors
# ---------------------------------------------------------------------------------------------
def test_rows_that_see_no_key_give_zeros_and_plus_inf_lse():
    q, k, v = rand(1, 6, 2, 8), rand(1, 3, 2, 8), rand(1, 3, 2, 8)
    out, lse, _ = fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    # p(i) = i - 3: rows 0..2 see no key
    assert not out[:, :3].any() and torch.isposinf(lse[..., :3]).all() and torch.isfinite(lse[..., 3:]).all()


def test_dropout_is_passed_through():
    """dropout_p reaches flashlite: seeded by torch's default generator where flashlite has
    dropout, NotImplementedError naming dropout where it has none."""
    q = rand(1, 6, 2, 8)
    calls = (lambda p: fa.flash_attn_func(q, q, q, p),
             lambda p: fa.flash_attn_varlen_func(q[0], q[0], q[0], cu([6]), cu([6]), 6, 6, dropout_p=p))
    for call in calls:
        try:
            torch.manual_seed(0)
            first = call(0.5)
        except NotImplementedError as exc:
            assert "dropout" in str(exc)
            continue
        torch.manual_seed(0)
        assert torch.equal(call(0.5), first)  # the default generator's seed repeats the mask
        assert not torch.allclose(call(0.0), first)
    with pytest.raises(ValueError, match="dropout_p"):
        fa.flash_attn_func(q, q, q, 1.5)


@pytest.mark.parametrize("call, error, match", [
    (lambda q: fa.flash_attn_func(q, q, q, window_size=(1, 2, 3)), TypeError, "window_size"),
    (lambda q: fa.flash_attn_func(q, q, q, window_size=(1.5, 2)), TypeError, r"window_size\[0\]"),
    (lambda q: fa.flash_attn_func(q, q, q, softcap="x"), TypeError, "softcap"),
    (lambda q: fa.flash_attn_func(q, q, q, causal=1), TypeError, "causal"),
    (lambda q: fa.flash_attn_func(q, q, q, deterministic=None), TypeError, "deterministic"),
    (lambda q: fa.flash_attn_func(q, q, q, return_attn_probs=1), TypeError, "return_attn_probs"),
    (lambda q: fa.flash_attn_func(q[0], q, q), ValueError, "q must be 4-D"),
    (lambda q: fa.flash_attn_func(q, q, q, alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes"),
    (lambda q: fa.flash_attn_qkvpacked_func(q), ValueError, "qkv must be 5-D"),
    (lambda q: fa.flash_attn_kvpacked_func(q, torch.stack([q, q, q], 2)), ValueError, "kv must be"),
    (lambda q: fa.flash_attn_varlen_func(q[0], q[0], q[0], cu([4]), cu([4]), "4", 4), TypeError, "max_seqlen_q"),
    (lambda q: fa.flash_attn_varlen_func(q[0], q[0], q[0], cu([3]), cu([4]), 4, 4), ValueError, "cu_seqlens_q"),
    (lambda q: fa.flash_attn_varlen_func(q[0], q[0], q[0], cu([4]), cu([4]), 4, 4, block_table=cu([1])),
     NotImplementedError, "block_table"),
])
def test_bad_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(1, 4, 2, 8))


# ---------------------------------------------------------------------------------------------
# install() / uninstall()
# ---------------------------------------------------------------------------------------------
def test_install_makes_flash_attn_imports_resolve_and_uninstall_restores(monkeypatch):
    names = ("flash_attn", "flash_attn.flash_attn_interface", "flash_attn.bert_padding")
    placeholder = types.ModuleType("flash_attn")
    monkeypatch.setitem(sys.modules, "flash_attn", placeholder)  # e.g. a real flash-attn imported earlier
    for name in names[1:]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        module = compat.install()
        assert compat.install() is module and compat.installed()  # idempotent
        import flash_attn
        from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache  # noqa: F401
        from flash_attn.bert_padding import index_first_axis, pad_input, unpad_input  # noqa: F401
        from flash_attn.flash_attn_interface import USE_TRITON_ROCM, _get_block_size_n  # noqa: F401
        import flash_attn.flash_attn_interface as interface

        assert flash_attn is module and flash_attn.__version__ == compat.FLASH_ATTN_VERSION
        assert flash_attn_func is fa.flash_attn_func and interface is fa and unpad_input is bp.unpad_input
        assert flash_attn.bert_padding is bp and flash_attn.flash_attn_interface is fa
        q = torch.randn(1, 5, 2, 8)
        torch.testing.assert_close(flash_attn_func(q, q, q, causal=True), oracle(q, q, q, True)[0].float())
    finally:
        compat.uninstall()
    compat.uninstall()  # idempotent
    assert not compat.installed()
    assert sys.modules["flash_attn"] is placeholder
    assert all(name not in sys.modules for name in names[1:])


def test_install_is_opt_in():
    import subprocess

    code = ("import sys, flashlite, flashlite.compat; assert 'flash_attn' not in sys.modules or "
            "not getattr(sys.modules['flash_attn'], '__flashlite__', False); flashlite.compat.install(); "
            "import flash_attn; assert flash_attn.__flashlite__; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# ---------------------------------------------------------------------------------------------
# flashlite.nn.functional.varlen_attn (PyTorch's varlen_attn)
# ---------------------------------------------------------------------------------------------
def test_varlen_attn_twin():
    torch.manual_seed(7)
    lens = [3, 8, 5]
    q, k, v = packed(lens, 4, 16), packed(lens, 2, 16), packed(lens, 2, 16)
    with pytest.raises(ValueError, match="enable_gqa"):
        FL.varlen_attn(q, k, v, cu(lens), cu(lens), 8, 8)
    out = FL.varlen_attn(q, k, v, cu(lens), cu(lens), 8, 8, window_size=(-1, 0), enable_gqa=True, scale=0.2)
    want, want_lse = varlen_oracle(q, k, v, lens, lens, causal=True, scale=0.2)
    close(out, want, "varlen_attn causal")
    aux = types.SimpleNamespace(lse=True)
    out, lse = FL.varlen_attn(q, k, v, cu(lens), cu(lens), 8, 8, return_aux=aux, window_size=(2, 0),
                              enable_gqa=True, num_splits=1)
    want, want_lse = varlen_oracle(q, k, v, lens, lens, window=(2, 0))
    close(out, want, "varlen_attn window")
    assert lse.shape == (4, sum(lens))
    close(lse, want_lse, "varlen_attn lse")
    g = torch.randn_like(out)
    for name, got_g, want_g in zip("qkv", grads(out, (q, k, v), g), grads(want, (q, k, v), g.double())):
        close(got_g, want_g, f"d{name}", atol=5e-5)
    for kw, match in ((dict(seqused_k=torch.tensor(lens, dtype=torch.int32)), "seqused_k"),
                      (dict(block_table=torch.zeros(3, 1, dtype=torch.int32)), "block_table")):
        with pytest.raises(NotImplementedError, match=match):
            FL.varlen_attn(q, k, v, cu(lens), cu(lens), 8, 8, enable_gqa=True, **kw)
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    out, lse = FL.varlen_attn(q, q, q, cu(lens), cu(lens), 8, 8, return_aux=varlen.AuxRequest(lse=True))
    assert lse.shape == (4, sum(lens))


# ---------------------------------------------------------------------------------------------
# flash_attn_with_kvcache (issue 17 item 4): contiguous and paged caches, in-place append, rotary,
# cache_batch_idx, cache_leftpad. The oracle follows flash-attn's docstring and its
# test_flash_attn_kvcache: sequence b's keys are cache positions [leftpad_b, cache_seqlens_b +
# Sk_new) after the new k/v are written at cache_seqlens_b..; causal / window / ALiBi count
# positions from leftpad (query i at n_b - Sq + i, n_b the key count); rotary rotates the new k at
# cache_seqlens_b + j and q at cache_seqlens_b + i (causal or local) or cache_seqlens_b (else).
# ---------------------------------------------------------------------------------------------
def rotary_oracle(x, cos, sin, positions, interleaved):
    """x [B, S, H, D] float64 rotated at positions [B, S] (flash-attn's apply_rotary_emb_torch)."""
    x = x.double()
    rd = 2 * cos.shape[1]
    c = cos.double()[positions]
    s_ = sin.double()[positions]
    if interleaved:
        c, s_ = c.repeat_interleave(2, -1), s_.repeat_interleave(2, -1)
        r = x[..., :rd]
        half = torch.stack((-r[..., 1::2], r[..., 0::2]), -1).flatten(-2)
    else:
        c, s_ = torch.cat((c, c), -1), torch.cat((s_, s_), -1)
        r = x[..., :rd]
        half = torch.cat((-r[..., rd // 2:], r[..., :rd // 2]), -1)
    return torch.cat((r * c[:, :, None] + half * s_[:, :, None], x[..., rd:]), -1)


def kvcache_oracle(q, k_cache, v_cache, k, v, cos, sin, lengths, rows, leftpad, table, causal, window, softcap,
                   alibi, interleaved, capacity):
    """(out, lse, logical k/v cache per sequence after the append) in float64, plain loops."""
    batch, seqlen_q = q.shape[:2]
    new = 0 if k is None else k.shape[1]
    left, right = window
    left, right = (-1 if left >= capacity else left), (-1 if right >= capacity else right)
    positional = causal or left >= 0 or right >= 0
    if cos is not None:
        steps = torch.arange(seqlen_q) if positional else torch.zeros(seqlen_q, dtype=torch.long)
        q = rotary_oracle(q, cos, sin, lengths[:, None] + steps, interleaved)
        k = rotary_oracle(k, cos, sin, lengths[:, None] + torch.arange(new), interleaved)
    outs, lses = [], []
    for b in range(batch):
        total = int(lengths[b]) + new
        if table is None:
            keys, values = k_cache[rows[b], :total].double(), v_cache[rows[b], :total].double()
        else:
            ps = k_cache.shape[1]
            keys = torch.stack([k_cache[table[b, j // ps], j % ps] for j in range(total)]).double() if total else \
                k_cache.new_zeros(0, *k_cache.shape[2:]).double()
            values = torch.stack([v_cache[table[b, j // ps], j % ps] for j in range(total)]).double() if total else \
                keys
        if new:
            keys = torch.cat((keys[:int(lengths[b])], k[b].double()))
            values = torch.cat((values[:int(lengths[b])], v[b].double()))
        start = 0 if leftpad is None else int(leftpad[b])
        slopes = None if alibi is None else (alibi if alibi.dim() == 1 else alibi[b])
        o, l = oracle(q[b:b + 1], keys[None, start:], values[None, start:], causal=causal, window=(left, right),
                      softcap=softcap, alibi=slopes)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


def rotary_tables(length, rotary_dim, dtype=torch.float32):
    angle = torch.rand(length, rotary_dim // 2) * 2 * torch.pi
    return angle.cos().to(dtype), angle.sin().to(dtype)


# (name, page size or None, Sq, Sk_new, H, Hk, D, options)
KVCACHE_CASES = [
    ("decode-contiguous", None, 1, 0, 4, 4, 16, dict()),
    ("decode-append-rotary-gqa", None, 1, 1, 4, 2, 32, dict(causal=True, rotary=(32, True), lse=True)),
    ("prefill-rotary-neox-leftpad", None, 3, 3, 4, 2, 32, dict(causal=True, rotary=(16, False), leftpad=True)),
    ("nonpositional-rotary-batchidx", None, 4, 2, 4, 1, 32, dict(rotary=(16, True), batch_idx=True, lse=True)),
    ("window-softcap-leftpad-batchidx", None, 2, 2, 4, 2, 16,
     dict(window=(3, 1), softcap=5.0, leftpad=True, batch_idx=True, lse=True)),
    ("alibi-causal", None, 2, 1, 4, 2, 16, dict(causal=True, alibi=True, lse=True, leftpad=True)),
    ("alibi-heads-window", None, 3, 3, 4, 4, 16, dict(window=(4, 0), alibi="heads", rotary=(16, False))),
    ("fewer-keys-than-queries", None, 6, 0, 4, 2, 16, dict(causal=True, short=True, lse=True)),
    ("int-seqlens-rotary-local", None, 2, 2, 2, 1, 32, dict(window=(5, 2), rotary=(16, False), int_seqlens=True)),
    ("full-capacity", None, 2, 0, 2, 2, 16, dict(no_seqlens=True, causal=True)),
    ("strided-cache", None, 2, 2, 4, 2, 16, dict(causal=True, strided=True, leftpad=True, lse=True)),
    ("paged16-prefill-rotary", 16, 3, 3, 4, 2, 32, dict(causal=True, rotary=(32, True), lse=True)),
    ("paged16-decode-window-softcap", 16, 1, 0, 4, 2, 16, dict(window=(20, 0), softcap=3.0)),
    ("paged16-chunk-neox", 16, 5, 5, 4, 4, 32, dict(causal=True, rotary=(16, False), lse=True)),
    ("paged256-decode-mqa-rotary", 256, 1, 1, 4, 1, 32, dict(rotary=(16, False), lse=True)),
    ("paged256-noncausal-append", 256, 4, 4, 2, 2, 16, dict()),
    ("paged16-fewer-keys", 16, 4, 0, 2, 2, 16, dict(causal=True, short=True, lse=True)),
    ("paged16-fp16", 16, 2, 2, 4, 2, 32, dict(causal=True, dtype=torch.float16, rotary=(16, True))),
]


@pytest.mark.parametrize("case", KVCACHE_CASES, ids=lambda c: c[0])
def test_flash_attn_with_kvcache_matches_oracle(case):
    name, page, seqlen_q, new, heads, heads_k, d, opt = case
    torch.manual_seed(zlib.crc32(name.encode()))
    dtype = opt.get("dtype", torch.float32)
    batch = 3
    if page is None:
        capacity = 24
        rows_cache = 5 if opt.get("batch_idx") else batch
        if opt.get("strided"):  # batch and sequence dimensions that cannot merge into one view
            k_cache = torch.randn(rows_cache, capacity + 3, heads_k, d).to(dtype)[:, :capacity]
            v_cache = torch.randn(rows_cache, capacity + 3, heads_k, d).to(dtype)[:, :capacity]
        else:
            k_cache = torch.randn(rows_cache, capacity, heads_k, d).to(dtype)
            v_cache = torch.randn(rows_cache, capacity, heads_k, d).to(dtype)
        table = None
        rows = torch.randperm(rows_cache)[:batch].to(torch.int32) if opt.get("batch_idx") else None
    else:
        max_blocks = 3 if page == 16 else 2
        capacity = max_blocks * page
        num_pages = batch * max_blocks + 2
        k_cache = torch.randn(num_pages, page, heads_k, d).to(dtype)
        v_cache = torch.randn(num_pages, page, heads_k, d).to(dtype)
        table = torch.randperm(num_pages)[:batch * max_blocks].view(batch, max_blocks).to(torch.int32)
        rows = None
    top = capacity - max(new, seqlen_q if opt.get("rotary") else 0)
    if opt.get("short"):
        lengths = torch.tensor([2, 0 if page is None else 1, seqlen_q + 1], dtype=torch.int32)
    else:
        lengths = torch.randint(0 if new else 1, top + 1, (batch,), dtype=torch.int32)
        lengths[0] = top  # one sequence at the end of its capacity
    if opt.get("no_seqlens"):
        lengths = torch.full((batch,), capacity, dtype=torch.int32)
    if opt.get("int_seqlens"):
        lengths = torch.full((batch,), int(lengths[1]), dtype=torch.int32)
    leftpad = torch.stack([torch.randint(0, int(n) + 1, ()) for n in lengths]).to(torch.int32) \
        if opt.get("leftpad") else None
    q = torch.randn(batch, seqlen_q, heads, d).to(dtype)
    k = torch.randn(batch, new, heads_k, d).to(dtype) if new else None
    v = torch.randn(batch, new, heads_k, d).to(dtype) if new else None
    cos = sin = None
    if opt.get("rotary"):
        rd, interleaved = opt["rotary"]
        cos, sin = rotary_tables(capacity, rd, dtype)
    interleaved = opt.get("rotary", (0, True))[1]
    alibi = None
    if opt.get("alibi"):
        alibi = torch.rand(heads) * 0.3 if opt["alibi"] == "heads" else torch.rand(batch, heads) * 0.3
    causal, window, softcap = opt.get("causal", False), opt.get("window", (-1, -1)), opt.get("softcap", 0.0)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    seqlens_arg = None if opt.get("no_seqlens") else (int(lengths[0]) if opt.get("int_seqlens") else lengths)

    result = fa.flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens_arg, cache_batch_idx=rows,
        cache_leftpad=leftpad, block_table=table, causal=causal, window_size=window, softcap=softcap,
        rotary_interleaved=interleaved, alibi_slopes=alibi, num_splits=3, return_softmax_lse=opt.get("lse", False))
    out, lse = result if opt.get("lse") else (result, None)

    rows_l = torch.arange(batch) if rows is None else rows.long()
    want, want_lse = kvcache_oracle(q, k_before, v_before, k, v, cos, sin, lengths.long(), rows_l, leftpad,
                                    None if table is None else table.long(), causal, window, softcap, alibi,
                                    interleaved, capacity)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    assert out.shape == q.shape and out.dtype == dtype
    close(out, want, f"{name}: out", **tol)
    if lse is not None:
        assert lse.shape == (batch, heads, seqlen_q) and lse.dtype == torch.float32
        close(lse, want_lse, f"{name}: lse", atol=1e-4, rtol=1e-4)

    # The append: exactly the new rows are written, everything else is bit-identical.
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for b in range(batch):
        for j in range(new):
            pos = int(lengths[b]) + j
            at = (int(rows_l[b]), pos) if table is None else (int(table[b, pos // page]), pos % page)
            written[at] = True
            torch.testing.assert_close(v_cache[at], v[b, j], atol=0, rtol=0)
            k_want = k[b, j] if cos is None else rotary_oracle(
                k[b:b + 1, j:j + 1], cos, sin, lengths[b:b + 1, None].long() + j, interleaved)[0, 0].to(dtype)
            close(k_cache[at], k_want, f"{name}: appended k", **tol)
    assert torch.equal(k_cache[~written], k_before[~written]), "k_cache changed outside the appended rows"
    assert torch.equal(v_cache[~written], v_before[~written]), "v_cache changed outside the appended rows"
    assert int(written.sum()) == batch * new


def test_flash_attn_with_kvcache_decode_loop_matches_flash_attn_func():
    """Ten decode steps appending into a preallocated cache give flash_attn_func's causal result on
    the whole sequence so far (each step's query is the last row)."""
    torch.manual_seed(3)
    batch, heads, heads_k, d, steps = 2, 4, 2, 16, 10
    k_all, v_all = torch.randn(batch, steps, heads_k, d), torch.randn(batch, steps, heads_k, d)
    q_all = torch.randn(batch, steps, heads, d)
    k_cache, v_cache = torch.zeros(batch, 16, heads_k, d), torch.zeros(batch, 16, heads_k, d)
    seqlens = torch.zeros(batch, dtype=torch.int32)
    for t in range(steps):
        out = fa.flash_attn_with_kvcache(q_all[:, t:t + 1], k_cache, v_cache, k_all[:, t:t + 1], v_all[:, t:t + 1],
                                         cache_seqlens=seqlens, causal=True)
        seqlens += 1
        want = fa.flash_attn_func(q_all[:, :t + 1], k_all[:, :t + 1], v_all[:, :t + 1], causal=True)[:, -1:]
        close(out, want, f"step {t}")
    assert torch.equal(k_cache[:, :steps], k_all) and torch.equal(k_cache[:, steps:], torch.zeros_like(k_cache[:, steps:]))


def _kv_args():
    q = torch.randn(2, 1, 4, 8)
    return q, torch.randn(2, 8, 2, 8), torch.randn(2, 8, 2, 8)


@pytest.mark.parametrize("kw, error, match", [
    (dict(k=torch.randn(2, 1, 2, 8)), ValueError, "k and v"),
    (dict(k=torch.randn(2, 1, 2, 8), v=torch.randn(2, 1, 2, 8)), ValueError, "cache_seqlens"),
    (dict(cache_seqlens=torch.tensor([9, 1], dtype=torch.int32)), ValueError, "cache_seqlens"),
    (dict(cache_seqlens=torch.tensor([1, 1])), TypeError, "cache_seqlens"),
    (dict(cache_seqlens=7, k=torch.randn(2, 2, 2, 8), v=torch.randn(2, 2, 2, 8)), ValueError, "cache_seqlens"),
    (dict(cache_seqlens=2, cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32)), ValueError, "cache_batch_idx"),
    (dict(cache_seqlens=2, cache_leftpad=torch.tensor([0, 3], dtype=torch.int32)), ValueError, "cache_leftpad"),
    (dict(cache_seqlens=2, rotary_cos=torch.ones(8, 2), rotary_sin=torch.ones(8, 2)), ValueError, "rotary_cos"),
    (dict(cache_seqlens=2, k=torch.randn(2, 1, 2, 8), v=torch.randn(2, 1, 2, 8), rotary_cos=torch.ones(8, 8),
          rotary_sin=torch.ones(8, 8)), ValueError, "rotary_cos"),
    (dict(cache_seqlens=7, k=torch.randn(2, 1, 2, 8), v=torch.randn(2, 1, 2, 8), rotary_cos=torch.ones(7, 2),
          rotary_sin=torch.ones(7, 2)), ValueError, "rotary_cos"),
    (dict(k=torch.randn(2, 1, 2, 8).half(), v=torch.randn(2, 1, 2, 8).half(), cache_seqlens=1), TypeError, "k must"),
    (dict(block_table=torch.tensor([[0], [1]], dtype=torch.int32), alibi_slopes=torch.ones(4)),
     NotImplementedError, "alibi_slopes"),
    (dict(block_table=torch.tensor([[0], [1]], dtype=torch.int32), cache_batch_idx=torch.zeros(2, dtype=torch.int32)),
     ValueError, "cache_batch_idx"),
    (dict(block_table=torch.tensor([[0], [5]], dtype=torch.int32), cache_seqlens=3), ValueError, r"block_table\[1, 0\]"),
    (dict(block_table=torch.tensor([[0], [1]])), TypeError, "block_table"),
    (dict(return_softmax_lse=1), TypeError, "return_softmax_lse"),
    (dict(num_splits="x"), TypeError, "num_splits"),
])
def test_flash_attn_with_kvcache_bad_arguments_are_named_and_write_nothing(kw, error, match):
    q, k_cache, v_cache = _kv_args()
    before = k_cache.clone()
    with pytest.raises(error, match=match):
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, **kw)
    assert torch.equal(k_cache, before)
