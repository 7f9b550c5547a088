"""Hugging Face transformers integration: tiny Llama / Mistral built from configs (random weights,
nothing downloaded). Logits are compared by DESIGN.md's rule: flashlite's error against the eager
model run in float64 is at most twice the error of the eager model in float32, plus 1e-5;
greedy generation must give the same tokens."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is an optional extra: pip install 'flashlite[transformers]'")

import flashlite  # noqa: E402
from flashlite.integrations import transformers as fl_tf  # noqa: E402
from flashlite.nn import functional as FL  # noqa: E402

from conftest import assert_rule  # noqa: E402

NAMES = fl_tf.register()
MAIN = NAMES[0]


def tiny(kind: str, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                  bos_token_id=2)
    common.update(extra)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = MistralForCausalLM(MistralConfig(sliding_window=5, **common))
    return model.eval()


def logits(model, impl, ids, mask=None, dtype=torch.float32):
    model.set_attn_implementation(impl)
    model.to(dtype)
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
    model.to(torch.float32)
    return out


def check_logits(model, ids, mask=None):
    # Exact = sdpa in float64: eager casts the masked scores to float32 for its softmax, where
    # float64's min becomes -inf, so fully padded rows turn NaN and spread through the layers.
    exact = logits(model, "sdpa", ids, mask, torch.float64)
    low = logits(model, "eager", ids, mask)
    sdpa = logits(model, "sdpa", ids, mask)
    got = logits(model, MAIN, ids, mask)
    if mask is not None:  # padded query positions are garbage in every implementation
        keep = mask.bool()
        exact, low, sdpa, got = exact[keep], low[keep], sdpa[keep], got[keep]
    assert torch.isfinite(exact).all(), "the float64 baseline is not finite: the rule would be vacuous"
    assert_rule("logits vs eager", got, low, exact)
    assert_rule("logits vs sdpa", got, sdpa, exact)


def generate(model, impl, ids, mask=None, steps=5):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, min_new_tokens=steps)


def left_padded(batch=2, length=12):
    ids = torch.randint(3, 96, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :4] = 0
    ids[1, :4] = 0
    return ids, mask


def test_names_avoid_flash_and_register_returns_main_first():
    assert NAMES == ["fl_attention", "fl_topk"]
    assert all("flash" not in name for name in NAMES)
    from transformers import AttentionInterface

    assert MAIN in AttentionInterface._global_mapping
    try:
        from transformers import AttentionMaskInterface
    except ImportError:
        return
    assert AttentionMaskInterface._global_mapping[MAIN] is fl_tf.attention_mask


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_logits_match_eager_and_sdpa(kind):
    torch.manual_seed(0)
    model = tiny(kind)
    ids = torch.randint(3, 96, (2, 13))  # longer than Mistral's window of 5
    check_logits(model, ids)
    check_logits(model, *left_padded())


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_greedy_generation_matches(kind):
    model = tiny(kind)
    ids, mask = left_padded()
    want = generate(model, "eager", ids, mask)
    assert torch.equal(generate(model, MAIN, ids, mask), want)
    assert torch.equal(generate(model, MAIN, ids[:1]), generate(model, "sdpa", ids[:1]))


def test_padding_with_holes_and_load_time_name():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny("llama")
    ids = torch.randint(3, 96, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 3] = 0
    mask[1, 6:8] = 0
    check_logits(model, ids, mask)
    # attn_implementation at construction time
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4)
    built = LlamaForCausalLM._from_config(config, attn_implementation=MAIN)
    assert built.config._attn_implementation == MAIN


def test_paths_no_dense_masks(monkeypatch):
    """Causal, sliding window and padding run on patterns: the dense slow path never runs."""
    def boom(*a, **k):
        raise AssertionError("dense path ran")

    monkeypatch.setattr(FL, "dense_attention", boom)
    for kind in ("llama", "mistral"):
        model = tiny(kind)
        ids, mask = left_padded()
        generate(model, MAIN, ids, mask, steps=3)


def test_mask_function_outputs():
    from transformers.masking_utils import and_masks, causal_mask_function, sliding_window_causal_mask_function

    kw = dict(batch_size=2, q_length=4, kv_length=6, q_offset=2, kv_offset=0)
    assert fl_tf.attention_mask(mask_function=causal_mask_function, **kw) is None
    padding = torch.ones(2, 6, dtype=torch.bool)
    padding[1, 0] = False
    from flashlite.dispatch import plan as plans

    got = fl_tf.attention_mask(mask_function=causal_mask_function, attention_mask=padding, **kw)
    assert got.shape == (2, 6) and plans.recall(("transformers-mask",), (got,)) == ((None, 0), False)
    got = fl_tf.attention_mask(mask_function=sliding_window_causal_mask_function(3), **kw)
    assert plans.recall(("transformers-mask",), (got,)) == ((2, 0), True)
    assert not got.__dict__  # what the mask function knows is kept in the plan cache, not on the tensor
    custom = and_masks(causal_mask_function, lambda b, h, q, k: k != 1)
    dense = fl_tf.attention_mask(mask_function=custom, **kw)
    assert dense.shape == (2, 1, 4, 6) and not bool(dense[:, :, :, 1].any())
    misaligned = fl_tf.attention_mask(mask_function=causal_mask_function, **dict(kw, q_offset=0))
    assert misaligned.dim() == 4  # a static-cache style layout: the explicit mask


def test_softcap_sinks_and_4d_masks():
    class Layer(torch.nn.Module):
        is_causal = True

    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    ref = flashlite.reference.attention
    out, none = fl_tf.attention_forward(Layer(), q, k, v, None, scaling=0.3, softcap=2.0)
    assert none is None and out.shape == (2, 5, 4, 16)
    want = ref(q, k, v, flashlite.Full(causal=True), scale=0.3, softcap=2.0).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    # learned sinks: one extra logit per head in the softmax denominator
    sinks = torch.randn(4)
    out, _ = fl_tf.attention_forward(Layer(), q, k, v, None, s_aux=sinks)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = q @ kr.transpose(-1, -2) / 4.0
    scores = scores.masked_fill(~flashlite.Full(causal=True).dense_mask(1, 1, 1, 5, 7, "cpu"), float("-inf"))
    scores = torch.cat([scores, sinks.view(1, 4, 1, 1).expand(2, 4, 5, 1)], dim=-1)
    want = (scores.softmax(-1)[..., :-1] @ vr).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    # a 4-D float mask (eager style) is applied as given
    bias = torch.zeros(2, 1, 5, 7)
    bias[..., 2] = torch.finfo(torch.float32).min
    out, _ = fl_tf.attention_forward(Layer(), q, k, v, bias)
    torch.testing.assert_close(out, ref(q, k, v, attn_bias=bias).transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_triton_backend(monkeypatch):
    """The model-level path on the Triton kernels (interpreter on CPU), kept tiny."""
    monkeypatch.setenv("FLASHLITE_BACKEND", "triton")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    ids = torch.randint(0, 64, (1, 9))
    exact = logits(model, "eager", ids, dtype=torch.float64)
    low = logits(model, "eager", ids)
    got = logits(model, MAIN, ids)
    assert flashlite.last_backend() == "triton"
    assert torch.isfinite(exact).all()
    assert_rule("logits", got, low, exact)


def test_topk_variant_is_exact_when_k_covers_the_sequence():
    model = tiny("llama")
    ids = torch.randint(3, 96, (1, 10))
    fl_tf.register(topk=16)
    want = logits(model, "eager", ids)
    got = logits(model, NAMES[1], ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_topk_variant_selects():
    pytest.importorskip("flashlite.selection")
    model = tiny("llama")
    ids = torch.randint(3, 96, (1, 12))
    try:
        fl_tf.register(topk=4, sinks=1, window=2)
        got = logits(model, NAMES[1], ids)
    finally:
        fl_tf.register()
    assert torch.isfinite(got).all()
    # the first positions see at most k + window + sinks keys: identical to exact attention there
    want = logits(model, "eager", ids)
    torch.testing.assert_close(got[:, :4], want[:, :4], atol=1e-4, rtol=1e-4)


def test_gemma2_softcap_and_alternating_windows():
    """Gemma2: attention logit softcapping and sliding-window layers alternating with full ones."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(2)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           sliding_window=4, attn_logit_softcapping=1.0,
                                           query_pre_attn_scalar=1, initializer_range=0.2)).eval()  # the cap matters
    ids, mask = left_padded(length=11)
    # No sdpa for Gemma2 (softcap) and eager's float64 padded rows turn NaN (see check_logits):
    # logits by the rule without padding, padded batches through greedy generation.
    exact = logits(model, "eager", ids, None, torch.float64)
    assert torch.isfinite(exact).all()
    assert_rule("gemma2 logits", logits(model, MAIN, ids), logits(model, "eager", ids), exact)
    assert torch.equal(generate(model, MAIN, ids, mask, steps=4), generate(model, "eager", ids, mask, steps=4))


def test_training_gradients_match():
    """A training step through fl_attention (padding included) gives eager's gradients."""
    ids, mask = left_padded(length=9)
    grads = {}
    for impl in ("eager", MAIN):
        torch.manual_seed(3)
        model = tiny("mistral").train()
        model.set_attn_implementation(impl)
        # Logits at t predict label t+1: the last padded position would predict the first real
        # token from a padded (garbage in every implementation) row, so that label is off too.
        labels = ids.masked_fill(mask == 0, -100)
        labels[1, 4] = -100
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads[impl] = {n: p.grad for n, p in model.named_parameters() if "self_attn" in n}
    assert grads[MAIN]
    for name, want in grads["eager"].items():
        torch.testing.assert_close(grads[MAIN][name], want, atol=2e-5, rtol=1e-3, msg=name)


def test_left_padded_batch_compiles_into_one_graph():
    """A left-padded batch on fl_attention under torch.compile: the mask path reads no value while
    tracing (one graph, no break) and the compiled model gives eager's / sdpa's logits on the real
    positions. (The "aot_eager" compile backend keeps it quick on CPU.)"""
    torch._dynamo.reset()
    model = tiny("llama", num_hidden_layers=1)
    ids, mask = left_padded()
    keep = mask.bool()
    exact = logits(model, "sdpa", ids, mask, torch.float64)[keep]
    low = logits(model, "eager", ids, mask)[keep]
    sdpa = logits(model, "sdpa", ids, mask)[keep]
    model.set_attn_implementation(MAIN)
    inputs = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(**inputs)
        assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
        assert explained.graph_count == 1
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs).logits[keep]
        eager = model(**inputs).logits[keep]
    assert torch.isfinite(exact).all()
    for name, got in (("eager", eager), ("compiled", compiled)):
        assert_rule(f"{name} vs eager", got, low, exact)
        assert_rule(f"{name} vs sdpa", got, sdpa, exact)


# ---------------------------------------------------------------------------------------------
# Packed sequences (padding-free batches): each sequence attends only to itself, via varlen
# ---------------------------------------------------------------------------------------------
PACKED_LENGTHS = (5, 9, 3, 7)


def flattened(lengths=PACKED_LENGTHS, **collator):
    """transformers' DataCollatorWithFlattening output: input_ids [1, total], position_ids restarting."""
    from transformers import DataCollatorWithFlattening

    seqs = [torch.randint(3, 96, (n,)).tolist() for n in lengths]
    return seqs, DataCollatorWithFlattening(**collator)([{"input_ids": s} for s in seqs])


def count_packed_runs(monkeypatch):
    runs = []
    real = fl_tf._run_packed
    monkeypatch.setattr(fl_tf, "_run_packed", lambda *a, **k: runs.append(a[3]) or real(*a, **k))

    def boom(*a, **k):
        raise AssertionError("dense path ran")

    monkeypatch.setattr(FL, "dense_attention", boom)
    return runs


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("source", ["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("use_cache", [False, True])
def test_packed_batch_matches_each_sequence_alone(kind, source, use_cache, monkeypatch):
    """use_cache=False: transformers detects the packing and the mask function tags it;
    use_cache=True: no mask, the attention function reads position_ids; cu_seq_lens: the kwargs."""
    torch.manual_seed(4)
    model = tiny(kind)  # Mistral: window 5 < the longer sequences
    seqs, batch = flattened(return_flash_attn_kwargs=source == "cu_seq_lens")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    runs = count_packed_runs(monkeypatch)
    model.set_attn_implementation(MAIN)
    with torch.no_grad():
        got = model(**inputs, use_cache=use_cache).logits[0]
    assert len(runs) == model.config.num_hidden_layers
    assert runs[0][0].tolist() == [0, 5, 14, 17, 24]
    monkeypatch.undo()
    start = 0
    for seq in seqs:
        ids = torch.tensor([seq])
        exact = logits(model, "sdpa", ids, dtype=torch.float64)[0]
        low = logits(model, "eager", ids)[0]
        assert_rule(f"packed sequence at {start}", got[start:start + len(seq)], low, exact)
        start += len(seq)


def test_packed_batch_with_pruned_heads_passes_the_mask(monkeypatch):
    """A pruned layer (flashlite.heads.prune) on a packed batch: varlen_attention gets the layer's
    bool head_mask (the masked head does no work) instead of a product after the call, and each
    sequence's logits are those of the same pruned model run on that sequence alone."""
    from flashlite import api, heads

    torch.manual_seed(5)
    model = tiny("llama")
    model.set_attn_implementation(MAIN)
    seqs, batch = flattened()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    heads.prune(model, [(0, 1), (1, 0)])
    try:
        masks = []
        real = api.varlen_attention
        monkeypatch.setattr(api, "varlen_attention", lambda *a, **k: masks.append(k.get("head_mask")) or real(*a, **k))
        with torch.no_grad():
            got = model(**inputs).logits[0]
        monkeypatch.undo()
        assert [m.tolist() for m in masks] == [[True, False, True, True], [False, True, True, True]]
        start = 0
        for seq in seqs:
            with torch.no_grad():
                alone = model(torch.tensor([seq])).logits[0]
            torch.testing.assert_close(got[start:start + len(seq)], alone, atol=2e-5, rtol=0)
            start += len(seq)
    finally:
        heads.unprune(model)


def test_packed_training_loss_and_gradients_match_eager():
    """A padding-free training step: fl_attention's loss and gradients are eager's on the same packed
    batch (eager gets transformers' block-diagonal mask)."""
    seqs, batch = flattened()
    results = {}
    for impl in ("eager", MAIN):
        torch.manual_seed(5)
        model = tiny("llama").train()
        model.set_attn_implementation(impl)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        results[impl] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(results[MAIN][0], results["eager"][0], atol=1e-6, rtol=1e-5)
    grads = results[MAIN][1]
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    for name, want in results["eager"][1].items():
        torch.testing.assert_close(grads[name], want, atol=2e-5, rtol=1e-3, msg=name)


def test_mask_function_tags_packed_sequences():
    from transformers import masking_utils as mu

    from flashlite.dispatch import plan as plans

    ids = torch.tensor([[0, 0, 0, 1, 1, 2]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    kw = dict(batch_size=1, q_length=6, kv_length=6)
    for base, band in ((mu.causal_mask_function, (None, 0)), (mu.sliding_window_causal_mask_function(3), (2, 0))):
        function = mu.and_masks(mu.remap_positions_for_packed_sequence(base, positions),
                                mu.packed_sequence_mask_function(ids))
        got = fl_tf.attention_mask(mask_function=function, **kw)
        assert torch.equal(got, ids) and plans.recall(("transformers-packed",), (got,)) == band
        # the packed mask on a path without the packed kernel: the dense block-diagonal band
        keep = fl_tf._resolve(type("L", (), {"is_causal": True})(), torch.zeros(1, 2, 6, 4),
                              torch.zeros(1, 2, 6, 4), got, None, None)[2]
        want = fl_tf.attention_mask(mask_function=mu.and_masks(function, lambda b, h, q, k: q >= 0), **kw)
        assert torch.equal(keep, want)


def test_packed_kwargs_with_padding_is_an_error():
    class Layer(torch.nn.Module):
        is_causal = True

    q = torch.randn(1, 2, 6, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    padding = torch.ones(1, 6, dtype=torch.bool)
    padding[0, 5] = False
    with pytest.raises(ValueError, match="padding"):
        fl_tf.attention_forward(Layer(), q, q, q, padding, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=4,
                                max_length_k=4)
    out, _ = fl_tf.attention_forward(Layer(), q, q, q, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                     max_length_q=torch.tensor(4), max_length_k=4)
    want = torch.cat([flashlite.reference.attention(q[:, :, a:b], q[:, :, a:b], q[:, :, a:b],
                                                    flashlite.Full(causal=True)) for a, b in ((0, 2), (2, 6))], 2)
    torch.testing.assert_close(out, want.transpose(1, 2), atol=1e-5, rtol=1e-5)
