"""Head statistics (issue 18): flashlite.attention_stats and head_mask.

The oracle is independent of every flashlite path that computes statistics: the float64
probability matrix materialized from the reference's masked scores, with entropy as
``−Σ xlogy(P, P)``. Each backend that declares ``stats`` is held to the correctness rule
(conftest) for out, lse, every statistic and the gradients of out and entropy together.
"""
from __future__ import annotations

import pytest
import torch

import flashlite
from flashlite import Full, TopK, dispatch, reference
from flashlite import backend as backends
from flashlite.core.packed import Packed

from conftest import DEVICE, HAS_CUDA, assert_rule, kernel_backends, make_pattern, randn, sample_interpreter

STATS_BACKENDS = ["reference"] + [name for name in kernel_backends() if backends.get(name).stats]
NAMES = ("entropy", "max_prob", "mean_distance", "sink_mass", "keys")
SINK = 3


def oracle(q, k, v, pattern, dtype, *, sink_tokens=SINK, **kw):
    """(out, lse, {name: statistic}) from the materialized probabilities, in ``dtype``."""
    scores, vc = reference._masked_scores(q, k, v, pattern, dtype, kw.get("scale"), kw.get("softcap"),
                                          kw.get("alibi_slopes"), None, None)
    visible = torch.isfinite(scores)
    lse = torch.logsumexp(scores, -1)
    probs = torch.where(visible, torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0)[..., None]), 0)
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    pos = torch.arange(seqlen_q, device=q.device)[:, None] + (seqlen_k - seqlen_q)
    distance = (pos - torch.arange(seqlen_k, device=q.device)).abs().to(dtype)
    stats = {
        "entropy": -torch.special.xlogy(probs, probs).sum(-1),
        "max_prob": probs.amax(-1),
        "mean_distance": (probs * distance).sum(-1),
        "sink_mass": probs[..., :sink_tokens].sum(-1),
        "keys": visible.sum(-1).to(dtype),
    }
    return torch.matmul(probs, vc).to(q.dtype), lse, stats


# (B, Hq, Hkv, Nq, Nk, D): odd lengths, Nq > Nk (causal rows with no key), GQA, odd head dim, decode.
SHAPES = {
    "gqa_odd": (2, 4, 2, 37, 45, 20),
    "nq_gt_nk": (1, 2, 1, 40, 23, 16),
    "decode": (3, 2, 2, 1, 50, 32),
}


# Triton's interpreter (CPU tensors) takes seconds per call: there one shape and dtype per pattern,
# every shape and dtype once (all of them on a GPU).
INTERPRETED_CASES = {("full", "decode", torch.float16), ("causal", "gqa_odd", torch.float32),
                     ("window", "nq_gt_nk", torch.float16), ("block_sparse", "nq_gt_nk", torch.float16),
                     ("topk", "nq_gt_nk", torch.float32)}


@pytest.mark.parametrize("backend", STATS_BACKENDS)
@pytest.mark.parametrize("pattern_name", ["full", "causal", "window", "block_sparse", "topk"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_stats_and_gradients_match_the_oracle(backend, pattern_name, shape, dtype):
    if backend == "triton" and not HAS_CUDA and (pattern_name, shape, dtype) not in INTERPRETED_CASES:
        pytest.skip("Triton's interpreter: one shape and dtype per pattern (INTERPRETED_CASES)")
    batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim = SHAPES[shape]
    pattern = make_pattern(pattern_name, batch, heads_q, heads_kv, seqlen_q, seqlen_k)
    q = randn(batch, heads_q, seqlen_q, head_dim, dtype=dtype)
    k = randn(batch, heads_kv, seqlen_k, head_dim, dtype=dtype, scale=2.0)
    v = randn(batch, heads_kv, seqlen_k, head_dim, dtype=dtype)
    kw = {"softcap": 5.0} if pattern_name == "window" else {}
    if pattern_name == "topk":  # ALiBi at the key positions the slots name
        kw = {"alibi_slopes": torch.rand(heads_q, device=DEVICE)}

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, stats = flashlite.attention_stats(*leaves, pattern, sink_tokens=SINK, backend=backend, **kw)
    assert flashlite.last_backend() == backend
    runs = {}
    for label, compute in (("exact", torch.float64), ("lowp", dtype), ("f32", torch.float32)):
        ref_leaves = [t.detach().to(compute).requires_grad_() for t in (q, k, v)]
        runs[label] = (ref_leaves,) + oracle(*ref_leaves, pattern, compute, **kw)
    assert_rule("out", out, runs["lowp"][1], runs["exact"][1], fallback=runs["f32"][1])
    assert_rule("lse", stats.lse, runs["lowp"][2], runs["exact"][2], fallback=runs["f32"][2])
    for name in NAMES:
        got = getattr(stats, name)
        assert got.dtype == torch.float32 and got.shape == (batch, heads_q, seqlen_q), name
        assert_rule(name, got, runs["lowp"][3][name], runs["exact"][3][name], fallback=runs["f32"][3][name])
    assert torch.equal(stats.keys, runs["exact"][3]["keys"].float()), "keys is a count"
    empty = torch.isneginf(stats.lse)
    for name in NAMES:
        assert (getattr(stats, name)[empty] == 0).all(), f"{name} of a query with no key"

    grad_out, grad_entropy = torch.randn_like(out, dtype=torch.float64), torch.randn_like(stats.entropy,
                                                                                          dtype=torch.float64)
    ((out.double() * grad_out).sum() + (stats.entropy.double() * grad_entropy).sum()).backward()
    for label, (ref_leaves, ref_out, _, ref_stats) in runs.items():
        loss = (ref_out.double() * grad_out).sum() + (ref_stats["entropy"].double() * grad_entropy).sum()
        loss.backward()
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_rule(name, leaves[i].grad, runs["lowp"][0][i].grad, runs["exact"][0][i].grad,
                    fallback=runs["f32"][0][i].grad)


@pytest.mark.parametrize("backend", STATS_BACKENDS)
def test_entropy_alone_drives_the_backward(backend):
    """A loss on the entropy only (no gradient reaches out): dv is zero, dq/dk match the oracle."""
    q, k, v = (randn(1, 2, 19, 16, requires_grad=True) for _ in range(3))
    _, stats = flashlite.attention_stats(q, k, v, Full(causal=True), backend=backend)
    stats.entropy.sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    oracle(*ref, Full(causal=True), torch.float64)[2]["entropy"].sum().backward()
    for got, want in zip((q, k), ref[:2]):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-4, rtol=1e-4)
    assert v.grad is None or not v.grad.any()


def _packed_oracle(q, k, v, packed, dtype, alibi_slopes, **kw):
    """Per-sequence ``oracle`` of a packed batch (local positions), concatenated: (out, lse, stats);
    a sequence with no key gives zeros and lse = −inf (the autograd links kept)."""
    outs, lses, planes = [], [], {name: [] for name in NAMES}
    for s in packed.sequences():
        rows, keys = slice(s.q_start, s.q_end), slice(s.k_start, s.k_end)
        if s.k_end == s.k_start:
            outs.append(q[:, :, rows].to(dtype) * 0)
            lses.append(torch.full((1, q.shape[1], s.q_end - s.q_start), float("-inf"), dtype=dtype, device=q.device))
            for name in NAMES:
                planes[name].append(q.new_zeros((1, q.shape[1], s.q_end - s.q_start), dtype=dtype))
            continue
        out, lse, stats = oracle(q[:, :, rows], k[:, :, keys], v[:, :, keys], s.pattern, dtype,
                                 alibi_slopes=alibi_slopes[s.index].to(dtype), **kw)
        outs.append(out)
        lses.append(lse)
        for name in NAMES:
            planes[name].append(stats[name])
    return torch.cat(outs, 2), torch.cat(lses, 2), {name: torch.cat(p, 2) for name, p in planes.items()}


@pytest.mark.parametrize("backend", [name for name in STATS_BACKENDS if name != "reference"])
def test_packed_stats_and_gradients(backend):
    """A packed (varlen) batch through ``dispatch.run(..., stats=)``: local positions per sequence
    (mean_distance, sink_mass), empty, one-token and Nq > Nk sequences, ALiBi per sequence and
    softcap; against the per-sequence float64 oracle and the reference backend."""
    lengths_q, lengths_k = [37, 0, 1, 9, 3], [37, 4, 1, 5, 3]
    cu = [torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
          for n in (lengths_q, lengths_k)]
    packed = Packed(Full(causal=True), *cu)
    q = randn(1, 4, sum(lengths_q), 16)
    k, v = randn(1, 2, sum(lengths_k), 16, scale=2.0), randn(1, 2, sum(lengths_k), 16)
    slopes = torch.rand(len(lengths_q), 4, device=DEVICE)
    scale, softcap = 0.25, 4.0
    grad_out, grad_entropy = torch.randn_like(q), torch.randn(1, 4, sum(lengths_q), device=DEVICE)
    packed.validate(q, k)

    def run(name):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse, row_stats = dispatch.run(*leaves, packed, scale=scale, softcap=softcap, alibi_slopes=slopes,
                                           backend=name, stats=SINK)
        assert dispatch.last_backend() == name
        ((out * grad_out).sum() + (row_stats[0] * grad_entropy).sum()).backward()
        return (out.detach(), lse.detach(), row_stats.detach()) + tuple(t.grad for t in leaves)

    got, ref = run(backend), run("reference")
    runs = {}
    for label, compute in (("exact", torch.float64), ("f32", torch.float32)):
        leaves = [t.detach().to(compute).requires_grad_() for t in (q, k, v)]
        out, lse, stats = _packed_oracle(*leaves, packed, compute, slopes, scale=scale, softcap=softcap)
        ((out.double() * grad_out).sum() + (stats["entropy"].double() * grad_entropy).sum()).backward()
        runs[label] = (out, lse, stats) + tuple(t.grad for t in leaves)
    assert_rule("out", got[0], runs["f32"][0], runs["exact"][0])
    assert_rule("lse", got[1], runs["f32"][1], runs["exact"][1])
    for i, name in enumerate(NAMES):
        assert_rule(name, got[2][i], runs["f32"][2][name], runs["exact"][2][name])
    assert torch.equal(got[2][4], runs["exact"][2]["keys"].float()), "keys is a count"
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_rule(name, got[3 + i], runs["f32"][3 + i], runs["exact"][3 + i])
    for name, a, b in zip(("out", "lse", "row_stats", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"{name} vs the reference backend")


@pytest.mark.parametrize("backend", [name for name in STATS_BACKENDS if name != "reference"])
def test_packed_top_k_stats_are_declined(backend):
    """The gather kernels see a packed batch's keys at packed positions (no sequence starts for the
    local distances and sinks): the kernel backends decline statistics there; the reference serves them."""
    ind = torch.randint(-1, 5, (12, 1, 3), device=DEVICE).int()
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32, device=DEVICE) for c in ([0, 7, 12], [0, 5, 10]))
    packed = Packed(TopK(ind), cu_q, cu_k)
    q, k, v = randn(1, 2, 12, 8), randn(1, 1, 10, 8), randn(1, 1, 10, 8)
    packed.validate(q, k)
    kw = dict(scale=0.3, softcap=0.0, alibi_slopes=None, stats=SINK)
    with pytest.raises(Exception, match="packed top-k"):
        dispatch.run(q, k, v, packed, backend=backend, **kw)
    assert dispatch.run(q, k, v, packed, backend="reference", **kw)[2].shape == (5, 1, 2, 12)


@pytest.mark.parametrize("pattern_name", ["causal", "topk"])
def test_reference_backward_contract_with_entropy_terms(pattern_name):
    """The kernels' backward contract (reference.attention_backward with ``entropy_terms`` built by
    dispatch.ops.entropy_terms) equals float64 autograd of out and entropy together."""
    from flashlite.dispatch.ops import entropy_terms

    pattern = make_pattern(pattern_name, 1, 2, 1, 23, 23)
    q, k, v = randn(1, 2, 23, 16), randn(1, 1, 23, 16, scale=2.0), randn(1, 1, 23, 16)
    out, lse, row_stats = reference.attention_stats(q, k, v, pattern, compute_dtype=torch.float64)
    grad_out, grad_entropy = torch.randn_like(out), torch.randn_like(lse)
    got = reference.attention_backward(grad_out, q, k, v, out, lse, pattern, compute_dtype=torch.float64,
                                       entropy_terms=entropy_terms(grad_entropy, lse, row_stats[0]))
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, _, ref_stats = oracle(*ref, pattern, torch.float64)
    ((ref_out.double() * grad_out).sum() + (ref_stats["entropy"] * grad_entropy).sum()).backward()
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r.grad, atol=1e-5, rtol=1e-5)


def test_stats_other_than_entropy_carry_no_gradient():
    q, k, v = (randn(1, 1, 8, 8, requires_grad=True) for _ in range(3))
    _, stats = flashlite.attention_stats(q, k, v, backend="reference")
    assert stats.entropy.requires_grad
    for name in ("max_prob", "mean_distance", "sink_mass", "keys", "lse"):
        assert not getattr(stats, name).requires_grad, name


def test_empty_inputs_give_zero_statistics():
    q, k, v = randn(2, 2, 0, 8), randn(2, 2, 5, 8), randn(2, 2, 5, 8)
    out, stats = flashlite.attention_stats(q, k, v)
    assert out.shape == q.shape and stats.entropy.shape == (2, 2, 0)
    q = randn(1, 2, 3, 8)
    out, stats = flashlite.attention_stats(q, k[:1, :, :0], v[:1, :, :0])
    assert not out.any() and torch.isneginf(stats.lse).all() and not stats.keys.any()


@pytest.mark.parametrize("bad, error", [
    (dict(sink_tokens=-1), "sink_tokens"),
    (dict(sink_tokens=1.5), "sink_tokens"),
    (dict(head_mask=torch.ones(3, dtype=torch.bool)), "head_mask"),
    (dict(head_mask=torch.ones(2, dtype=torch.int64)), "head_mask"),
    (dict(head_mask=[True, False]), "head_mask"),
])
def test_bad_arguments_name_themselves(bad, error):
    q, k, v = randn(1, 2, 4, 8), randn(1, 2, 4, 8), randn(1, 2, 4, 8)
    with pytest.raises((TypeError, ValueError), match=error):
        flashlite.attention_stats(q, k, v, **bad)


# -- head_mask ------------------------------------------------------------------------------------

MASK_BACKENDS = ["reference"] + kernel_backends()


@pytest.mark.parametrize("backend", MASK_BACKENDS)
def test_bool_head_mask_is_one_call_on_the_inputs(backend, monkeypatch):
    """A bool mask does not split the call: one dispatch.run on q, k, v themselves, the mask in its
    plan (tests/test_head_mask.py: what the plan skips, and the kept heads' bits)."""
    sample_interpreter(backend, False)
    q, k, v = randn(2, 4, 9, 16), randn(2, 2, 9, 16), randn(2, 2, 9, 16)
    mask = torch.tensor([[True, False, False, False], [False, True, True, True]], device=DEVICE)
    calls = []
    real_run = flashlite.dispatch.run

    def spy(q_run, k_run, v_run, *args, **kw):
        calls.append((q_run is q, k_run is k, v_run is v, kw.get("head_mask") is mask))
        return real_run(q_run, k_run, v_run, *args, **kw)

    monkeypatch.setattr(flashlite.dispatch, "run", spy)
    out = flashlite.attention(q, k, v, Full(causal=True), head_mask=mask, backend=backend)
    assert calls == [(True, True, True, True)]
    assert not out[~mask].any() and out[mask].abs().sum() > 0


@pytest.mark.parametrize("heads_kv", [1, 4])
def test_masked_heads_are_zero_even_with_non_finite_inputs(heads_kv):
    """A masked head's output is zeros whatever its inputs hold (GQA: also when it shares a kept head's group)."""
    q, k, v = randn(1, 4, 6, 8), randn(1, heads_kv, 6, 8), randn(1, heads_kv, 6, 8)
    q[:, 1] = float("nan")
    mask = torch.tensor([True, False, True, True], device=DEVICE)
    out, stats = flashlite.attention_stats(q, k, v, Full(causal=True), head_mask=mask)
    assert not out[:, 1].any() and not stats.entropy[:, 1].any() and torch.isneginf(stats.lse[:, 1]).all()
    assert torch.isfinite(out[:, [0, 2, 3]]).all()


def test_float_head_mask_is_a_differentiable_gate():
    q, k, v = randn(2, 3, 9, 8), randn(2, 3, 9, 8), randn(2, 3, 9, 8)
    gate = torch.tensor([1.0, 0.5, 0.0], device=DEVICE, requires_grad=True)
    out = flashlite.attention(q, k, v, Full(causal=True), head_mask=gate)
    plain = flashlite.attention(q, k, v, Full(causal=True))
    torch.testing.assert_close(out, plain * gate.detach()[None, :, None, None])
    grad = torch.randn_like(out)
    out.backward(grad)
    # d loss / d gate_h = Σ out_h · grad_h: the head-importance score.
    torch.testing.assert_close(gate.grad, (plain * grad).sum((0, 2, 3)))


def test_head_mask_all_false_does_no_work():
    """Every head masked: the plan visits no tile, the call returns zeros (and zero gradients)."""
    q, k, v = randn(1, 2, 5, 8, requires_grad=True), randn(1, 2, 5, 8), randn(1, 2, 5, 8)
    out, stats = flashlite.attention_stats(q, k, v, head_mask=torch.zeros(2, dtype=torch.bool, device=DEVICE))
    assert not out.any() and torch.isneginf(stats.lse).all() and not stats.entropy.any()
    (dq,) = torch.autograd.grad(out.sum() + stats.entropy.sum(), q)
    assert not dq.any()
