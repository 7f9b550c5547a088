"""The C++ builders of the top-k plan's index tensors (flashlite._C.cpu_canonical_rows,
cpu_key_index; csrc/cpu/gather_rows.cpp) against the torch ones (flashlite.core.gather_rows):
the same elements, exactly. The cpu backend plans with them (CpuBackend.gather_rows/key_index).

Run with ``-s`` to see the timing line of ``test_timing_torch_vs_cpp`` (printed, not asserted).
"""
from __future__ import annotations

import time

import pytest
import torch

from flashlite.core.gather_rows import canonical_rows, key_index

try:
    from flashlite import _C
except ImportError as exc:  # pragma: no cover - depends on the build
    _C, _WHY = None, f"flashlite._C does not import ({exc})"
else:
    _WHY = "flashlite._C has no cpu_canonical_rows / cpu_key_index (rebuild it)"

pytestmark = pytest.mark.skipif(
    _C is None or not (hasattr(_C, "cpu_canonical_rows") and hasattr(_C, "cpu_key_index")), reason=_WHY)


def random_indices(shape, seqlen_k, dtype, generator):
    """Keys with repeats (a small key range), -1, other negatives and values >= Nk."""
    keys = torch.randint(-3, seqlen_k + 4, shape, generator=generator)
    empty = torch.rand(shape, generator=generator) < 0.1
    return torch.where(empty, torch.full_like(keys, -1), keys).to(dtype)


def check_same(indices, seqlen_q, seqlen_k, causal):
    """C++ == torch: rows fully, key_offsets fully, key_slots up to key_offsets[-1] (and, as the
    C++ side leaves the invalid slots where torch's stable sort does, the tail too)."""
    want_rows = canonical_rows(indices, seqlen_q, seqlen_k, causal)
    rows = _C.cpu_canonical_rows(indices, seqlen_q, seqlen_k, causal)
    assert rows.dtype == torch.int64 and rows.shape == indices.shape and rows.is_contiguous()
    assert torch.equal(rows, want_rows)
    want_offsets, want_slots = key_index(want_rows, seqlen_q, seqlen_k, causal)
    offsets, slots = _C.cpu_key_index(rows, seqlen_q, seqlen_k, causal)
    assert offsets.dtype == slots.dtype == torch.int64
    assert offsets.shape == want_offsets.shape and slots.shape == want_slots.shape
    assert torch.equal(offsets, want_offsets)
    entries = int(offsets[-1])
    assert torch.equal(slots[:entries], want_slots[:entries])
    assert torch.equal(slots, want_slots)
    return rows, offsets, slots


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch,heads,seqlen_q,seqlen_k", [(1, 1, 7, 7), (2, 3, 5, 13), (1, 2, 19, 6),
                                                           (2, 1, 40, 33)])
@pytest.mark.parametrize("top_k", [1, 3, 24, 25, 70])  # insertion sort up to 24 entries, std::sort above
def test_cpp_rows_and_key_index_equal_torch(dtype, shared, causal, batch, heads, seqlen_q, seqlen_k, top_k):
    generator = torch.Generator().manual_seed(hash((dtype, shared, causal, batch, heads, seqlen_q, top_k)) % 2**31)
    shape = (batch, heads, top_k) if shared else (batch, heads, seqlen_q, top_k)
    check_same(random_indices(shape, seqlen_k, dtype, generator), seqlen_q, seqlen_k, causal)


@pytest.mark.parametrize("shape,seqlen_q,seqlen_k", [
    ((2, 3, 5, 0), 5, 7),  # K = 0
    ((2, 3, 0), 5, 7),  # shared, K = 0
    ((1, 2, 0, 4), 0, 7),  # Nq = 0
    ((1, 2, 4, 3), 4, 0),  # Nk = 0: every entry is out of range
    ((1, 2, 3), 4, 0),
    ((0, 2, 4, 3), 4, 5),  # B = 0
])
@pytest.mark.parametrize("causal", [False, True])
def test_empty_dims(shape, seqlen_q, seqlen_k, causal):
    generator = torch.Generator().manual_seed(1)
    check_same(random_indices(shape, max(seqlen_k, 1), torch.int64, generator), seqlen_q, seqlen_k, causal)


def test_ranges_repeats_and_causal_edges():
    """Hand-made rows: every entry out of range, all one key, keys at p(i) and p(i) + 1, Nq > Nk
    (p(i) < 0 for the first rows: nothing visible)."""
    seqlen_q, seqlen_k = 6, 4
    indices = torch.tensor([[[[-1, -1, -1], [4, 9, -7], [2, 2, 2], [0, 1, 1], [3, 2, 1], [3, 3, 0]]]])
    for causal in (False, True):
        rows, _, _ = check_same(indices, seqlen_q, seqlen_k, causal)
    # causal: p(i) = i - 2, so rows 0, 1 see nothing, row 2 only key 0, row 4 keys <= 2.
    assert [rows[0, 0, i].tolist() for i in range(6)] == [
        [-1, -1, -1], [-1, -1, -1], [-1, -1, -1], [0, 1, -1], [1, 2, -1], [0, 3, -1]]


def test_large_values_and_int32_limits():
    seqlen_q, seqlen_k = 3, 5
    big = torch.tensor([[[2**31 - 1, -2**31, 4, 0], [5, 1, 1, 2**31 - 1], [0, 0, 0, 0]]], dtype=torch.int32)
    check_same(big[None], seqlen_q, seqlen_k, True)
    check_same(big.long()[None] * 2**20, seqlen_q, seqlen_k, False)


def test_non_contiguous_indices():
    generator = torch.Generator().manual_seed(2)
    base = random_indices((2, 9, 3, 11), 8, torch.int64, generator)
    check_same(base.transpose(1, 2), 9, 8, True)  # [2, 3, 9, 11], strided
    check_same(base[..., ::2], 3, 8, True)  # [2, 9, 3, 6], every other entry


@pytest.mark.parametrize("top_k", [1, 7, 64, 200])
def test_every_instruction_set_build(top_k):
    """The rows are sorted by a vector network compiled per instruction set (isa() picks it)."""
    generator = torch.Generator().manual_seed(top_k)
    indices = random_indices((2, 3, 21, top_k), 30, torch.int32, generator)
    shared = random_indices((2, 3, top_k), 30, torch.int64, generator)
    current = _C.cpu_isa()
    try:
        for name in _C.cpu_isas():
            _C.cpu_set_isa(name)
            check_same(indices, 21, 30, True)
            check_same(shared, 21, 30, True)
    finally:
        _C.cpu_set_isa(current)


def test_rows_longer_than_the_network():
    """K > 4096 takes std::sort per row."""
    generator = torch.Generator().manual_seed(6)
    check_same(random_indices((1, 2, 3, 5000), 3000, torch.int64, generator), 3, 3000, True)


def test_same_result_for_any_thread_count():
    generator = torch.Generator().manual_seed(3)
    indices = random_indices((2, 4, 64, 33), 50, torch.int64, generator)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            rows = _C.cpu_canonical_rows(indices, 64, 50, True)
            results.append((rows, *_C.cpu_key_index(rows, 64, 50, True)))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_arguments_are_checked_by_name():
    rows = torch.zeros(1, 2, 3, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="indices must be int32 or int64"):
        _C.cpu_canonical_rows(rows.float(), 3, 5, False)
    with pytest.raises(ValueError, match="indices must be 3-D"):
        _C.cpu_canonical_rows(rows[0, 0], 3, 5, False)
    with pytest.raises(ValueError, match="Nq = seqlen_q"):
        _C.cpu_canonical_rows(rows, 4, 5, False)
    with pytest.raises(ValueError, match="indices must be a CPU tensor"):
        _C.cpu_canonical_rows(rows.to("meta"), 3, 5, False)
    with pytest.raises(ValueError, match="rows must be int64 and contiguous"):
        _C.cpu_key_index(rows.int(), 3, 5, False)
    with pytest.raises(ValueError, match="rows must be int64 and contiguous"):
        _C.cpu_key_index(rows.transpose(2, 3).contiguous().transpose(2, 3), 3, 5, False)
    with pytest.raises(ValueError, match="rows must be 3-D"):
        _C.cpu_key_index(rows[0, 0], 3, 5, False)
    with pytest.raises(ValueError, match="seqlen_q and seqlen_k must be >= 0"):
        _C.cpu_key_index(rows[:, :, 0], 3, -1, False)
    # keyword arguments
    got = _C.cpu_key_index(rows=_C.cpu_canonical_rows(indices=rows, seqlen_q=3, seqlen_k=5, causal=True),
                           seqlen_q=3, seqlen_k=5, causal=True)
    assert len(got) == 2


def test_the_cpu_backend_plans_with_them():
    """CpuBackend's hooks call the C++ builders; a fake tensor (compiling/tracing) takes the torch ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import flashlite
    from flashlite import backend as backends

    if flashlite.backends().get("cpu") != "available":
        pytest.skip("the cpu backend is not available")
    cpu = backends.get("cpu")
    generator = torch.Generator().manual_seed(4)
    indices = random_indices((1, 2, 12, 5), 12, torch.int32, generator)
    rows = cpu.gather_rows(indices, 12, 12, True)
    assert torch.equal(rows, canonical_rows(indices, 12, 12, True))
    offsets, slots = cpu.key_index(rows, 12, 12, True)
    want_offsets, want_slots = key_index(rows, 12, 12, True)
    assert torch.equal(offsets, want_offsets) and torch.equal(slots, want_slots)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(indices)
        fake_rows = cpu.gather_rows(fake, 12, 12, True)
        fake_offsets, _ = cpu.key_index(fake_rows, 12, 12, True)
    assert fake_rows.shape == indices.shape and fake_offsets.shape == want_offsets.shape


def test_timing_torch_vs_cpp(capsys):
    """[1, 8, 8192, 64], causal, one thread: torch vs C++ (printed, not asserted: a busy machine)."""
    batch, heads, seqlen, top_k = 1, 8, 8192, 64
    generator = torch.Generator().manual_seed(5)
    indices = torch.randint(0, seqlen, (batch, heads, seqlen, top_k), generator=generator, dtype=torch.int32)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)

    def best(fn, repeats):
        """(best wall seconds, best CPU seconds (one thread: the process's), result)"""
        walls, cpus = [], []
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            result = fn()
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        return (min(walls), min(cpus)), result

    try:
        t_rows, want_rows = best(lambda: canonical_rows(indices, seqlen, seqlen, True), 1)
        c_rows, rows = best(lambda: _C.cpu_canonical_rows(indices, seqlen, seqlen, True), 3)
        t_index, (want_offsets, want_slots) = best(lambda: key_index(want_rows, seqlen, seqlen, True), 1)
        c_index, (offsets, slots) = best(lambda: _C.cpu_key_index(rows, seqlen, seqlen, True), 3)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(rows, want_rows) and torch.equal(offsets, want_offsets)
    assert torch.equal(slots[:int(offsets[-1])], want_slots[:int(offsets[-1])])
    with capsys.disabled():
        ms = "{0[0]:.0f} ms (CPU {0[1]:.0f} ms)".format
        print(f"\n[1, 8, 8192, 64] causal, 1 thread, wall (CPU): canonical_rows torch "
              f"{ms([x * 1e3 for x in t_rows])}, C++ {ms([x * 1e3 for x in c_rows])}; key_index torch "
              f"{ms([x * 1e3 for x in t_index])}, C++ {ms([x * 1e3 for x in c_index])}")
