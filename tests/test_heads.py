"""flashlite.heads: recording equals statistics of the materialized probabilities (a tiny
transformers Llama, eager ``output_attentions``), importance equals autograd of a manual gate,
pruned heads output zeros, flags follow their documented criteria, the CLI writes its files, and
the example's induction head is found. Tiny shapes: the whole file runs in seconds."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings

import pytest
import torch
from torch import nn

import flashlite
from flashlite import heads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# A tiny Llama: record() == statistics of eager output_attentions
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    transformers = pytest.importorskip("transformers")
    from flashlite.integrations.transformers import register

    register()
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      initializer_range=0.5)  # large weights: heads far from uniform
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        probs = [a.double() for a in model(ids, output_attentions=True).attentions]
    model.set_attn_implementation("fl_attention")
    return model, ids, probs


def _expected(probs, sink_tokens):
    """Per-head means over the batch and the queries, computed here from P [B, H, N, N] (causal)."""
    n = probs.shape[-1]
    i = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    plogp = torch.where(probs > 0, probs * torch.log(probs.clamp_min(1e-300)), torch.zeros_like(probs))
    entropy = -plogp.sum(-1)  # [B, H, N]
    keys = i.squeeze(1) + 1
    return {
        "entropy": entropy.mean(dim=(0, 2)),
        "max_prob": probs.amax(-1).mean(dim=(0, 2)),
        "mean_distance": (probs * (i - j).abs()).sum(-1).mean(dim=(0, 2)),
        "sink_mass": probs[..., :sink_tokens].sum(-1)[:, :, sink_tokens:].mean(dim=(0, 2)),  # queries with > sink keys
        "norm_entropy": (entropy[:, :, 1:] / torch.log(keys[1:])).mean(dim=(0, 2)),
        "keys": keys.mean().expand(probs.shape[1]),
        "local_share": ((probs * (i - j).abs()).sum(-1) <= 2.5).double().mean(dim=(0, 2)),
    }


def test_record_matches_eager_attentions(llama):
    model, ids, probs = llama
    with torch.no_grad(), heads.record(model, sink_tokens=2, grid=12) as rec:
        model(ids[:1])
        model(ids[1:])  # two batches: sums over calls
    report = rec.report()
    assert report.layers == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert report.heads == [4, 4]
    for layer, p in enumerate(probs):
        for name, want in _expected(p, sink_tokens=2).items():
            got = report[name][layer]
            assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (layer, name, got, want)
        # grid = N: the pooled map is the batch mean of P (rows already sum to 1)
        assert torch.allclose(report.maps[layer].double(), p.mean(0), atol=2e-5)
    # the same model and input under record() and without it give the same logits
    with torch.no_grad():
        plain = model(ids).logits
        with heads.record(model, maps=False):
            recorded = model(ids).logits
    assert torch.allclose(plain, recorded, atol=1e-5)


def test_prune_llama_head_does_no_work(llama):
    model, ids, _ = llama
    with torch.no_grad():
        before = model(ids).logits
    masks = heads.prune(model, [(1, 2)])
    try:
        assert list(masks) == ["model.layers.1.self_attn"]
        assert masks["model.layers.1.self_attn"].tolist() == [True, True, False, True]
        with torch.no_grad(), heads.record(model, maps=False) as rec:
            after = model(ids).logits
        report = rec.report()
        assert math.isnan(report["entropy"][1, 2])  # the head saw no key: it did no work
        assert not math.isnan(report["entropy"][1, 1])
        assert not torch.allclose(before, after)
    finally:
        heads.unprune(model)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, atol=1e-6)


def test_record_refuses_other_implementations(llama):
    model, _, _ = llama
    model.set_attn_implementation("eager")
    try:
        with pytest.raises(ValueError, match="fl_attention"):
            with heads.record(model):
                pass
    finally:
        model.set_attn_implementation("fl_attention")


# ---------------------------------------------------------------------------------------------
# flashlite.nn modules: prune -> zeros; importance == autograd of a manual gate
# ---------------------------------------------------------------------------------------------
def test_prune_nn_module_outputs_zeros():
    torch.manual_seed(0)
    attn = flashlite.nn.FlashAttention(causal=True)
    q, k, v = (torch.randn(2, 4, 10, 8, requires_grad=True) for _ in range(3))
    full = attn(q, k, v)
    with pytest.raises(ValueError, match="num_heads"):
        heads.prune(attn, [(0, 1)])  # a plain Attention does not know its head count
    heads.prune(attn, [(0, 1)], num_heads=4)
    out = attn(q, k, v)
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    assert torch.allclose(out[:, [0, 2, 3]], full[:, [0, 2, 3]], atol=1e-6)
    out.sum().backward()
    assert torch.equal(q.grad[:, 1], torch.zeros_like(q.grad[:, 1]))
    # a per-call head_mask overrides the buffer
    again = attn(q, k, v, head_mask=torch.tensor([True, True, True, False]))
    assert torch.equal(again[:, 3], torch.zeros_like(again[:, 3])) and again[:, 1].abs().sum() > 0
    heads.unprune(attn)
    assert torch.allclose(attn(q, k, v), full, atol=1e-6)


def test_prune_is_atomic():
    model = nn.Sequential(_Block(), _Block())
    with pytest.raises(ValueError, match=r"no head \[99\]"):
        heads.prune(model, [(0, 1), (1, 99)], num_heads=4)
    assert all(block.attn.head_mask is None for block in model)  # layer 0 was not pruned either
    with pytest.raises(ValueError, match="out of range"):
        heads.prune(model, [(0, 1), (5, 0)], num_heads=4)
    assert all(block.attn.head_mask is None for block in model)
    masks = heads.prune(model, {0: [1], 1: 2}, num_heads=4)
    assert [m.tolist() for m in masks.values()] == [[True, False, True, True], [True, True, False, True]]


def test_pruned_head_map_is_zeros_and_not_computed(monkeypatch):
    """A recording's map of a pruned layer: flashlite.attention_map with the bool head mask, one call
    (the plan's skip; no per-group calls), masked heads' maps zeros; a float gate leaves the maps."""
    from flashlite.heads import _hook

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8)  # GQA: groups (0, 1), (2, 3)
    pattern = flashlite.Full(causal=True)
    full = flashlite.attention_map(q, k, pattern, block=3)
    calls = []
    real = flashlite.attention_map
    monkeypatch.setattr(flashlite, "attention_map", lambda *a, **kw: calls.append(kw.get("head_mask")) or real(*a, **kw))
    for mask in (torch.tensor([True, False, True, True]),
                 torch.tensor([[False, False, True, True], [True, True, True, False]])):
        calls.clear()
        got = _hook._masked_map(q, k, pattern, mask, (3, 3), {})
        assert len(calls) == 1 and calls[0] is mask
        assert torch.allclose(got, full * mask.expand(2, 4)[:, :, None, None], atol=1e-6)
    calls.clear()
    assert torch.allclose(_hook._masked_map(q, k, pattern, torch.rand(4), (3, 3), {}), full, atol=1e-6)
    assert calls == [None]


def test_pruned_head_in_a_recording():
    torch.manual_seed(0)
    mha = flashlite.nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 9, 16)
    heads.prune(mha, [(0, 2)])
    reports = []
    for need_weights in (False, True):  # kernels / slow path
        with torch.no_grad(), heads.record(mha, grid=9) as rec, warnings.catch_warnings():
            warnings.simplefilter("ignore", flashlite.nn.SlowPathWarning)
            _, weights = mha(x, x, x, need_weights=need_weights, is_causal=True, average_attn_weights=False)
        reports.append(rec.report())
    assert torch.equal(weights[:, 2], torch.zeros_like(weights[:, 2]))  # need_weights: the masked head's are zeros
    assert weights[:, 1].abs().sum() > 0
    for report in reports:
        assert torch.equal(report.maps[0, 2], torch.zeros_like(report.maps[0, 2]))
        assert math.isnan(report["entropy"][0, 2]) and report["output_norm"][0, 2] == 0
        assert all(h.head != 2 for h in report.choose_heads())
    assert torch.allclose(reports[0].maps, reports[1].maps, atol=1e-5)
    heads.unprune(mha)


class _Block(nn.Module):
    """Projections around flashlite.nn.FlashAttention; ``gate`` (if set) multiplies each head's
    output explicitly - the manual gate."""

    def __init__(self, dim=16, num_heads=4):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn = flashlite.nn.FlashAttention(causal=True)
        self.out = nn.Linear(dim, dim)
        self.gate = None

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        o = self.attn(q, k, v)
        if self.gate is not None:
            o = o * self.gate[:, :, None, None]
        return x + self.out(o.transpose(1, 2).reshape(b, n, d))


def test_importance_matches_manual_gate():
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), _Block())
    batches = [torch.randn(3, 9, 16), torch.randn(2, 7, 16)]

    def loss_fn(m, x):
        return m(x).pow(2).mean()

    result = heads.importance(model, batches, loss_fn)
    assert result.layers == ["0.attn", "1.attn"] and result.heads == [4, 4]
    want = torch.zeros(2, 4, dtype=torch.float64)
    for x in batches:
        gates = [torch.ones(x.shape[0], 4, requires_grad=True) for _ in range(2)]
        for block, gate in zip(model, gates):
            block.gate = gate
        grads = torch.autograd.grad(loss_fn(model, x), gates)
        for layer, g in enumerate(grads):
            want[layer] += g.abs().sum(0).double()
    for block in model:
        block.gate = None
    want /= sum(x.shape[0] for x in batches)
    assert torch.allclose(result.scores, want, rtol=1e-4, atol=1e-9), (result.scores, want)
    assert all(p.grad is None for p in model.parameters())  # parameters untouched


def test_slow_path_records_the_same_statistics():
    torch.manual_seed(0)
    mha = flashlite.nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 9, 16)
    reports = []
    for need_weights in (False, True):  # kernels (attention_stats) / slow path (materialized probabilities)
        with torch.no_grad(), heads.record(mha, grid=9) as rec, warnings.catch_warnings():
            warnings.simplefilter("ignore", flashlite.nn.SlowPathWarning)
            mha(x, x, x, need_weights=need_weights, is_causal=True)
        reports.append(rec.report())
    fast, slow = reports
    for name in heads.STATS:
        assert torch.allclose(fast[name], slow[name], atol=1e-5, rtol=1e-4), name
    assert torch.allclose(fast.maps, slow.maps, atol=1e-5)
    heads.prune(mha, [(0, 2)])  # the slow path applies the mask too
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", flashlite.nn.SlowPathWarning)
        out_fast = mha(x, x, x, need_weights=False, is_causal=True)[0]
        out_slow = mha(x, x, x, need_weights=True, is_causal=True)[0]
    assert torch.allclose(out_fast, out_slow, atol=1e-5)
    heads.unprune(mha)
    assert not torch.allclose(mha(x, x, x, need_weights=False, is_causal=True)[0], out_fast, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Flags: the documented criteria
# ---------------------------------------------------------------------------------------------
def test_flags_follow_criteria(tmp_path):
    nan = float("nan")
    values = {  # heads: uniform, sink-only, previous-token, induction-like, no data
        "entropy": [2.9, 0.3, 0.1, 0.2, nan], "norm_entropy": [0.97, 0.1, 0.05, 0.08, nan],
        "max_prob": [0.06, 0.9, 0.97, 0.93, nan], "mean_distance": [9.0, 12.0, 1.0, 7.0, nan],
        "sink_mass": [0.1, 0.95, 0.0, 0.02, nan], "local_share": [0.2, 0.0, 0.9, 0.1, nan],
        "keys": [20.0] * 4 + [nan],
        "output_norm": [1.0, 1.0, 1.0, 1.0, 0.0], "output_variation": [0.5, 0.005, 0.9, 0.9, nan],
    }
    stats = {name: torch.tensor([row], dtype=torch.float64) for name, row in values.items()}
    maps = torch.rand(1, 5, 4, 4)
    maps[0, 3] = maps[0, 2] * 2  # same pattern: cosine 1
    report = heads.HeadReport(["blk"], [5], stats, maps, heads.Criteria(), {})
    flags = {name: [h.head for h in found] for name, found in report.flags().items()}
    assert flags == {"dead": [0, 1], "sink": [1], "local": [2]}
    pairs = report.redundant_pairs()
    assert [(a.head, b.head) for a, b, _ in pairs] == [(2, 3)]
    assert report.flags(heads.Criteria(uniform=0.99, constant=0.0))["dead"] == []
    assert [h.head for h, _ in report.rank("mean_distance", descending=False)] == [2, 3, 0, 1, 4]
    data = json.loads(open(report.save_json(tmp_path / "r.json")).read())
    assert data["heads"][4]["entropy"] is None and data["flags"]["local"] == [[0, 2]]
    assert "local" in report.table().splitlines()[4]


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------
def test_cli_writes_png_and_json(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    from flashlite.cli import main

    out = tmp_path / "out"
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat; the cat sat on the mat. " * 4)
    # default (small) random weights: every head is near-uniform, flagged dead; the maps picture
    # still shows the most focused ones (choose_heads' fallback)
    rc = main(["heads", "llama", "--set", "num_attention_heads=2",
               "--text", str(text), "--seq-len", "24", "--batch-size", "2", "--batches", "2", "--grid", "8",
               "--out", str(out), "--stats", "entropy,mean_distance"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "heads [" in captured.err and "2/2" in captured.err  # the progress bar
    assert "model.layers.1.self_attn" in captured.out
    data = json.loads((out / "heads.json").read_text())
    assert [layer["heads"] for layer in data["layers"]] == [2, 2]
    assert data["meta"]["tokens"]["batches"] == 2
    for name in ("heads_entropy.png", "heads_mean_distance.png", "heads_maps.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (out / "heads_keys.png").exists()  # --stats chose two heatmaps
    # errors name the argument
    assert main(["heads", "llama", "--set", "oops", "--out", str(out)]) == 2
    assert "--set" in capsys.readouterr().err
    assert main(["heads", "llama", "--seq-len", "0"]) == 2
    assert "--seq-len" in capsys.readouterr().err
    assert main(["heads", "no_such_model_type_xyz"]) == 2
    assert "MODEL" in capsys.readouterr().err
    assert main(["heads", "llama", "--stats", "entropy,colour"]) == 2
    assert "--stats" in capsys.readouterr().err
    # checked before the model is made or run: nothing written
    early = tmp_path / "early"
    assert main(["heads", "llama", "--heads", "5.0", "--out", str(early)]) == 2
    assert "--heads: no head 5.0" in capsys.readouterr().err and not early.exists()
    assert main(["heads", "llama", "--heads", "1.7", "--out", str(early)]) == 2  # 4 heads per layer
    assert "--heads" in capsys.readouterr().err and not early.exists()
    assert main(["heads", "llama", "--stats", "importance", "--out", str(early)]) == 2
    assert "--importance" in capsys.readouterr().err and not early.exists()
    assert main(["heads", "llama", "--set", "bogus_key=3", "--out", str(early)]) == 2
    err = capsys.readouterr().err
    assert "--set" in err and "bogus_key" in err and not early.exists()


def test_choose_heads_falls_back_when_every_head_is_dead():
    nan = float("nan")
    values = {name: [0.5, 0.5, 0.5, nan] for name in heads.STATS}
    values["norm_entropy"] = [0.97, 0.92, 0.99, nan]  # all near-uniform: dead; head 3 has no data (pruned)
    values["entropy"] = [2.0, 1.9, 2.1, nan]
    values["output_norm"] = [1.0, 1.0, 1.0, 0.0]
    stats = {name: torch.tensor([row], dtype=torch.float64) for name, row in values.items()}
    report = heads.HeadReport(["blk"], [4], stats, torch.rand(1, 4, 4, 4), heads.Criteria(), {})
    assert [h.head for h in report.flags()["dead"]] == [0, 1, 2]
    assert [h.head for h in report.choose_heads()] == [1, 0, 2]  # the most focused first, never the pruned one
    assert [h.head for h in report.choose_heads(count=1)] == [1]
    values["norm_entropy"] = [0.97, 0.2, 0.99, nan]  # one live head: only it (no dead filler)
    stats = {name: torch.tensor([row], dtype=torch.float64) for name, row in values.items()}
    report = heads.HeadReport(["blk"], [4], stats, None, heads.Criteria(), {})
    assert [h.head for h in report.choose_heads()] == [1]


# ---------------------------------------------------------------------------------------------
# The example: a short fixed-seed run grows an induction head and flashlite.heads finds it
# ---------------------------------------------------------------------------------------------
def test_example_finds_induction_head():
    spec = importlib.util.spec_from_file_location("head_analysis", os.path.join(ROOT, "examples", "head_analysis.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model, losses = example.train(120, batch=32, seed=0, threads=1)
    assert losses[-1] < 0.5 * losses[0]
    report = example.analyze(model, batches=1, batch=16)
    found = example.find_induction_heads(report)
    assert found, report.table()
    best = found[0]
    assert best.layer == 1  # an induction head needs the previous-token information of layer 0
    assert abs(report.value("mean_distance", best) - (example.PERIOD - 1)) <= 1.0
    assert report.value("norm_entropy", best) <= 0.3
    previous = example.previous_token_heads(report)
    assert previous and previous[0].layer == 0  # the other half of the induction circuit
    assert "importance" in report.stats
