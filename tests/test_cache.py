"""SelectiveKVCache: bounded over 1,000 appended tokens, marks survive eviction, capacity eviction
order, attention through the cache equals topk_attention over the full history, bad input, and the
selective-generation example end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flashlite
from flashlite import SelectiveKVCache, selection

from conftest import DEVICE, kernel_backends, randn

ROOT = Path(__file__).resolve().parents[1]


def expected_retained(total, window, sinks, marks):
    return sorted({p for p in range(total) if p < sinks or p >= total - window or p in set(marks)})


def test_bounded_over_1000_tokens_and_marks_survive():
    """One token at a time: the retained set is exactly sinks ∪ marks ∪ window, the storage never
    grows past sinks + window + mark room, and marked keys/values are the ones appended."""
    B, H, D, window, sinks = 2, 2, 8, 16, 3
    cache = SelectiveKVCache(window=window, sinks=sinks)
    marks = [5, 40, 41, 300, 777, 999]
    cache.mark(marks[:3])
    cache.mark(torch.tensor([300, 777]))  # future positions are pinned when they arrive
    history_k, history_v = [], []
    for t in range(1000):
        if t == 990:
            cache.mark(999)
        k, v = randn(B, H, 1, D), randn(B, H, 1, D)
        history_k.append(k)
        history_v.append(v)
        cache.append(k, v)
        marked_so_far = [m for m in marks if m <= t and (m != 999 or t >= 990)]
        assert len(cache) <= sinks + len(marked_so_far) + window
        assert cache.slots <= sinks + window + 16  # the initial mark room is never outgrown here
        if t % 97 == 0 or t == 999:
            assert cache.positions.tolist() == expected_retained(t + 1, window, sinks, marked_so_far)
    full_k, full_v = torch.cat(history_k, 2), torch.cat(history_v, 2)
    pos = cache.positions
    assert torch.equal(cache.keys, full_k[:, :, pos]) and torch.equal(cache.values, full_v[:, :, pos])
    assert set(marks) <= set(pos.tolist())
    assert cache.total == 1000 and len(cache) == len(expected_retained(1000, window, sinks, marks))
    assert cache.memory_bytes == 2 * B * H * cache.slots * D * 4


def test_mark_room_grows_only_with_marks():
    cache = SelectiveKVCache(window=4, sinks=0, mark_room=2)
    cache.mark(range(0, 100, 10))  # 10 marks > room of 2
    for _ in range(10):
        cache.append(randn(1, 1, 10, 4), randn(1, 1, 10, 4))
    assert len(cache) == 10 + 4 and cache.slots <= 4 + 2 * 10
    assert cache.positions.tolist() == sorted(set(range(0, 100, 10)) | {96, 97, 98, 99})


def test_matches_from_marks_for_a_decode_step():
    """The retained positions are what from_marks selects for the last query."""
    cache = SelectiveKVCache(window=10, sinks=2)
    cache.mark([7, 31])
    cache.append(randn(1, 1, 57, 4), randn(1, 1, 57, 4))  # a prompt in one call
    for _ in range(20):
        cache.append(randn(1, 1, 1, 4), randn(1, 1, 1, 4))
    want = selection.from_marks([7, 31], cache.total, window=10, sinks=2, num_queries=1)
    assert cache.positions.tolist() == want[0, 0, 0][want[0, 0, 0] >= 0].tolist()


def test_capacity_evicts_oldest_unmarked_first():
    cache = SelectiveKVCache(window=8, sinks=2, capacity=9)
    cache.mark([3, 5])
    for _ in range(30):
        cache.append(randn(1, 1, 1, 4), randn(1, 1, 1, 4))
        assert len(cache) <= 9 and cache.slots == 9
    # 2 sinks + 2 marks + the 5 newest (the window's oldest 3 went first)
    assert cache.positions.tolist() == [0, 1, 3, 5, 25, 26, 27, 28, 29]
    tiny = SelectiveKVCache(window=4, sinks=2, capacity=3)
    tiny.mark([1, 2])
    for _ in range(10):
        tiny.append(randn(1, 1, 1, 4), randn(1, 1, 1, 4))
    # sinks ∪ marks ∪ window = {0, 1, 2, 6, 7, 8, 9} > 3: the unmarked window tokens go first
    assert tiny.positions.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="already evicted"):
        tiny.mark(9)


def test_mark_after_eviction_is_an_error():
    cache = SelectiveKVCache(window=4, sinks=1)
    cache.append(randn(1, 1, 20, 4), randn(1, 1, 20, 4))
    cache.mark(17)  # still in the window: fine
    with pytest.raises(ValueError, match="already evicted"):
        cache.mark([2, 18])
    cache.unmark(17)
    cache.append(randn(1, 1, 10, 4), randn(1, 1, 10, 4))
    assert 17 not in cache.positions.tolist()


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_attend_equals_topk_attention_over_full_history(backend, dtype):
    """cache.attend(q) == topk_attention(q, full K, full V, retained positions, causal=True), for decode
    steps (Nq = 1) and a multi-token append (Nq = 3, causal inside the new tokens)."""
    B, Hq, Hkv, D, window, sinks = 2, 4, 2, 32, 12, 2
    cache = SelectiveKVCache(window=window, sinks=sinks)
    cache.mark([4, 20])
    keys, values = [], []

    def step(n):
        k, v = randn(B, Hkv, n, D, dtype=dtype), randn(B, Hkv, n, D, dtype=dtype)
        keys.append(k)
        values.append(v)
        cache.append(k, v)
        q = randn(B, Hq, n, D, dtype=dtype)
        got = cache.attend(q, backend=backend)
        full_k, full_v = torch.cat(keys, 2), torch.cat(values, 2)
        indices = cache.positions.view(1, 1, -1).expand(B, 1, -1)
        want = flashlite.topk_attention(q, full_k, full_v, indices, causal=True, backend=backend)
        torch.testing.assert_close(got, want, atol=1e-3 if dtype == torch.float16 else 1e-6, rtol=1e-3)
        return got

    step(30)  # prefill: many queries, causal within the prompt
    for _ in range(4):
        step(1)
    step(3)
    assert len(cache) == sinks + 2 + window


def test_bad_input():
    with pytest.raises(ValueError, match="window"):
        SelectiveKVCache(window=-1)
    with pytest.raises(ValueError, match="capacity"):
        SelectiveKVCache(window=4, capacity=0)
    cache = SelectiveKVCache(window=4)
    with pytest.raises(ValueError, match="empty"):
        cache.attend(randn(1, 1, 1, 4))
    with pytest.raises(ValueError, match=r"\[B, Hkv, n, D\]"):
        cache.append(randn(1, 4, 4), randn(1, 4, 4))
    cache.append(randn(1, 2, 3, 4), randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match="like earlier appends"):
        cache.append(randn(1, 3, 1, 4), randn(1, 3, 1, 4))
    with pytest.raises(TypeError, match="positions"):
        cache.mark([1.5])
    with pytest.raises(ValueError, match=">= 0"):
        cache.mark(-1)
    with pytest.raises(ValueError, match="only 3 tokens"):
        cache.attend(randn(1, 2, 5, 4))


def test_example_runs_bounded_and_plots(tmp_path):
    """examples/selective_generation.py with tiny settings: matches transformers on the prompt,
    keeps the cache bounded, writes the plot."""
    pytest.importorskip("transformers")
    plot = tmp_path / "memory.png"
    summary = tmp_path / "run.json"
    marks = tmp_path / "marks.txt"
    marks.write_text("# kept\n3, 9\n150\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "selective_generation.py"), "--tokens", "200", "--prompt", "12",
         "--window", "16", "--sinks", "2", "--marks", "5", "--marks-file", str(marks), "--layers", "1",
         "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--vocab", "64", "--plot", str(plot),
         "--json", str(summary)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert plot.exists() and plot.stat().st_size > 1000
    run = json.loads(summary.read_text())
    retained = run["history"]["retained_tokens"]
    assert max(retained) <= 2 + 4 + 16 == run["bound"]
    assert run["history"]["allocated_bytes"][-1] < run["history"]["full_bytes"][-1] / 4
    assert "manual forward vs transformers" in result.stdout and "marks still held: [3, 5, 9, 150]" in result.stdout
