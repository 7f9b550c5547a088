"""flashlite.distributed on CPU: 2 and 4 gloo processes against the single-process reference.

One launch per world size runs every case (each process imports torch once, ~3 s on the 2-core
CI machine) and writes its findings to a JSON file per rank; the tests below read them:

* ``test_matches_reference``: out, lse, dq, dk, dv of each rank's shard against flashlite.reference
  on the unsharded tensors (float64), by the correctness rule (tests/conftest.py ``assert_rule``):
  causal, window, block-sparse (causal, with rows that see nothing) and top-k (causal), both
  layouts, both methods, GQA (Hkv = 2: split over 2 ranks, replicated over 4), plus softcap,
  bfloat16, ALiBi (Ulysses), a shared top-k list, and a short causal window (the ring stops early);
* ``test_skipped_shards_never_computed``: every kernel call the ring makes (forward and backward),
  identified by the values of its q and k rows, covers only chunk pairs the pattern can see, each
  once, and all of them; ``last_stats()`` counts the same shard pairs;
* ``test_zigzag_balances_causal_work``: tiles counted per rank, max/min <= 1.05 for zigzag;
* ``test_bad_input_rejected``: uneven lengths, bad groups, unknown layout/method, heads Ulysses
  cannot split, blocks that straddle shards, ALiBi with the ring, out-of-range indices: ValueError
  naming the argument, on every rank concerned, with no rank left hanging;
* ``test_shard_unshard``; ``test_attention_module``: flashlite.nn.Attention and a subclass with
  ``context_parallel=`` (ring and Ulysses) against the reference, forward and gradients.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import pytest

WORLD_SIZES = (2, 4)
B, HQ, HKV, N, D = 1, 4, 2, 128, 16
PATTERNS = ("causal", "window", "block_sparse", "topk")
LAYOUTS = ("contiguous", "zigzag")
METHODS = ("ring", "ulysses")
EXTRA = ("full-softcap-zigzag-ring", "causal-bf16-zigzag-ring", "causal-alibi-zigzag-ulysses",
         "topk_shared-zigzag-ring", "topk_shared-contiguous-ulysses", "window_short-contiguous-ring")
CASES = [f"{p}-{lay}-{m}" for p in PATTERNS for lay in LAYOUTS for m in METHODS] + list(EXTRA)
BAD = ("layout", "method", "uneven", "zigzag_odd", "ulysses_heads", "block_straddles", "alibi_ring",
       "not_member", "group_too_small", "group_type", "shard_uneven", "topk_range")
TIMEOUT_S = 240


# -- the worker (one process per rank) --------------------------------------------------------


def _inputs(name, torch, flashlite, fld):
    """Global q, k, v, grad, the global pattern and the kwargs of one case (same on every rank)."""
    parts = name.split("-")
    kind, extras = parts[0], parts[1:-2]
    dtype = torch.bfloat16 if "bf16" in extras else torch.float32
    q = torch.randn(B, HQ, N, D).to(dtype)
    k = torch.randn(B, HKV, N, D).to(dtype)
    v = torch.randn(B, HKV, N, D).to(dtype)
    kw = {}
    if kind == "full":
        pattern = flashlite.Full()
    elif kind == "causal":
        pattern = flashlite.Full(causal=True)
    elif kind == "window":
        pattern = flashlite.SlidingWindow(20, 5)
    elif kind == "window_short":
        pattern = flashlite.SlidingWindow(8, 0)
    elif kind == "block_sparse":
        pattern = flashlite.BlockSparse(torch.rand(1, HQ, N // 16, N // 16) < 0.3, 16, causal=True)
    elif kind == "topk":
        pattern = flashlite.TopK(torch.randint(-1, N, (B, HKV, N, 12)), causal=True)
    elif kind == "topk_shared":
        pattern = flashlite.TopK(torch.randint(-1, N, (B, 1, 24)))
    if "softcap" in extras:
        kw["softcap"] = 5.0
    if "alibi" in extras:
        kw["alibi_slopes"] = torch.rand(HQ)
    return q, k, v, torch.randn(B, HQ, N, D), pattern, kw


def _local_pattern(pattern, layout, fld, flashlite):
    if isinstance(pattern, flashlite.TopK) and pattern.indices.dim() == 4:  # this rank's query rows
        return flashlite.TopK(fld.shard(pattern.indices, 2, layout), causal=pattern.causal)
    return pattern


def _chunk_ids(t, full, size, torch):
    """Which global chunks (of ``size`` tokens) the rows of ``t`` are, found by value."""
    ids = []
    for i in range(t.shape[2] // size):
        block = t[:, :, i * size:(i + 1) * size]
        found = [x for x in range(full.shape[2] // size) if torch.equal(block, full[:, :, x * size:(x + 1) * size])]
        ids.append(found[0] if len(found) == 1 else -1)
    return ids


def _run_case(name, rank, world, torch, flashlite, fld, dispatch, reference, conftest):
    layout, method = name.split("-")[-2], name.split("-")[-1]
    q, k, v, grad, pattern, kw = _inputs(name, torch, flashlite, fld)
    record = {"forward": [], "backward": []}
    seg = N // world // (2 if layout == "zigzag" else 1)
    run, run_backward = dispatch.run, dispatch.run_backward

    def recording_run(qc, kc, vc, pat, **a):
        record["forward"].append([_chunk_ids(qc, q, seg, torch), _chunk_ids(kc, k, seg, torch)])
        return run(qc, kc, vc, pat, **a)

    def recording_backward(g, qc, kc, vc, o, lse, pat, **a):
        record["backward"].append([_chunk_ids(qc, q, seg, torch), _chunk_ids(kc, k, seg, torch)])
        return run_backward(g, qc, kc, vc, o, lse, pat, **a)

    leaves = [fld.shard(t, 2, layout).requires_grad_() for t in (q, k, v)]
    if method == "ring":
        dispatch.run, dispatch.run_backward = recording_run, recording_backward
    try:
        out, lse = fld.context_parallel_attention(*leaves, _local_pattern(pattern, layout, fld, flashlite),
                                                  layout=layout, method=method, return_lse=True,
                                                  backend=BACKEND, **kw)
        # (out·g).sum() rather than out.backward(g): the latter imports sympy (2 s) on first use
        (out * fld.shard(grad, 2, layout).to(out.dtype)).sum().backward()
    finally:
        dispatch.run, dispatch.run_backward = run, run_backward
    stats = fld.last_stats()

    # the reference on the unsharded tensors: float64 (exact), the kernel's dtype, float32
    refs = {}
    for key, cdt in (("exact", torch.float64), ("lowp", None), ("f32", torch.float32)):
        ref_leaves = [(t.double() if cdt is torch.float64 else t.clone()).requires_grad_() for t in (q, k, v)]
        ref_kw = dict(kw)
        if "alibi_slopes" in ref_kw and cdt is torch.float64:
            ref_kw["alibi_slopes"] = ref_kw["alibi_slopes"].double()
        o, l = reference.attention(*ref_leaves, pattern, return_lse=True, compute_dtype=cdt, **ref_kw)
        (o * grad.to(o.dtype)).sum().backward()
        refs[key] = [o, l] + [t.grad for t in ref_leaves]
    failures = []
    got = [out, lse] + [t.grad for t in leaves]
    for i, what in enumerate(("out", "lse", "dq", "dk", "dv")):
        exact, lowp, f32 = (fld.shard(refs[key][i].detach(), 2, layout) for key in ("exact", "lowp", "f32"))
        try:
            assert not torch.isnan(got[i]).any(), f"{what}: NaN"
            conftest.assert_rule(what, got[i].detach(), lowp, exact, fallback=f32)
        except AssertionError as exc:
            failures.append(str(exc))

    # which chunk pairs the global pattern can see at all (any batch row, any head)
    mask = pattern.dense_mask(B, HQ, HKV, N, N, "cpu")
    chunks = N // seg
    visible = mask.reshape(-1, N, N).any(0).view(chunks, seg, chunks, seg).any(3).any(1)
    return {"failures": failures, "calls": record, "stats": stats, "visible": visible.tolist()}


def _run_bad(name, rank, world, torch, flashlite, fld):
    """Bad input: returns "ok" or "<ExceptionType>: message" for this rank."""
    import torch.distributed as dist

    n = N // world
    q = torch.randn(B, HQ, n, D)
    kv = torch.randn(B, HKV, n, D)
    args, kw = [q, kv, kv.clone()], {}
    if name == "layout":
        kw["layout"] = "diagonal"
    elif name == "method":
        kw["method"] = "tree"
    elif name == "uneven":
        if rank == 0:
            args = [torch.randn(B, HQ, n + 2, D), torch.randn(B, HKV, n + 2, D), torch.randn(B, HKV, n + 2, D)]
    elif name == "zigzag_odd":
        args = [torch.randn(B, HQ, n + 1, D), torch.randn(B, HKV, n + 1, D), torch.randn(B, HKV, n + 1, D)]
    elif name == "ulysses_heads":
        args = [torch.randn(B, 3, n, D), torch.randn(B, 1, n, D), torch.randn(B, 1, n, D)]
        kw["method"] = "ulysses"
    elif name == "block_straddles":  # zigzag segments of N/(2P) tokens are not whole 64-blocks
        kw["pattern"] = flashlite.BlockSparse(torch.ones(1, 1, N // 64, N // 64, dtype=torch.bool), 64)
    elif name == "alibi_ring":
        kw["alibi_slopes"] = torch.rand(HQ)
    elif name in ("not_member", "group_too_small"):
        sub = dist.new_group(list(range(world // 2)))  # every rank creates it, half are members
        if name == "group_too_small" and rank >= world // 2:
            return "not a member"
        kw["group"] = sub
        if name == "group_too_small":  # a layout for the whole world's sequence on half the ranks
            kw["pattern"] = flashlite.BlockSparse(torch.ones(1, 1, N // 16, N // 16, dtype=torch.bool), 16)
        elif rank < world // 2:
            return "member"
    elif name == "group_type":
        kw["group"] = "world"
    elif name == "shard_uneven":
        try:
            fld.shard(torch.randn(1, 1, 2 * world + 2, 4), 2, "zigzag")
        except Exception as exc:  # noqa: BLE001 - reported
            return f"{type(exc).__name__}: {exc}"
        return "ok"
    elif name == "topk_range":
        ind = torch.randint(0, N, (B, HKV, n, 4))
        if rank == 0:
            ind[0, 0, 0, 0] = N
        kw["pattern"] = flashlite.TopK(ind)
    try:
        pattern = kw.pop("pattern", None)
        fld.context_parallel_attention(*args, pattern, backend=BACKEND, **kw)
    except Exception as exc:  # noqa: BLE001 - reported
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def _balance(rank, world, torch, flashlite, fld):
    """Forward tiles of a causal sequence long enough for several tiles per chunk, per layout."""
    n_total = 512 * world
    out = {}
    for layout in LAYOUTS:
        q, k, v = (torch.randn(1, 1, n_total, 16) for _ in range(3))
        local = [fld.shard(t, 2, layout) for t in (q, k, v)]
        fld.context_parallel_attention(*local, flashlite.Full(causal=True), layout=layout, backend=BACKEND)
        out[layout] = fld.last_stats()["forward"]["tiles"]
    return out


def _module_case(rank, world, torch, flashlite, fld, reference):
    """flashlite.nn modules with ``context_parallel=`` on shards vs the reference; None if absent."""
    import inspect

    from flashlite import nn as fnn

    if "context_parallel" not in inspect.signature(fnn.Attention.__init__).parameters:
        return None
    q, k, v = torch.randn(B, HQ, N, D), torch.randn(B, HKV, N, D), torch.randn(B, HKV, N, D)
    found = {}
    for name, module, layout, pattern in (
            ("attention-zigzag-ring", fnn.Attention(flashlite.Full(causal=True), context_parallel=True,
                                                    backend=BACKEND), "zigzag", flashlite.Full(causal=True)),
            ("window-contiguous-ulysses", fnn.SlidingWindowAttention(
                16, context_parallel={"layout": "contiguous", "method": "ulysses"}, backend=BACKEND), "contiguous",
             flashlite.SlidingWindow(16, 0))):
        leaves = [fld.shard(t, 2, layout).requires_grad_() for t in (q, k, v)]
        out = module(*leaves)
        out.sum().backward()
        ref = [t.clone().requires_grad_() for t in (q, k, v)]
        want = reference.attention(*ref, pattern)
        want.sum().backward()
        errs = [(out - fld.shard(want, 2, layout)).abs().max()]
        errs += [(t.grad - fld.shard(r.grad, 2, layout)).abs().max() for t, r in zip(leaves, ref)]
        found[name] = max(float(e.detach()) for e in errs)
    try:
        fnn.TopKAttention(window=4, context_parallel=True)(*(fld.shard(t, 2, "zigzag") for t in (q, k, v)))
        found["topk-without-indices"] = "ok"
    except ValueError as exc:
        found["topk-without-indices"] = f"ValueError: {exc}"
    return found


def worker(rank: int, world: int, folder: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import conftest  # the correctness rule (sets FLASHLITE_POISON=1)

    import flashlite
    from flashlite import dispatch, reference
    from flashlite import distributed as fld

    global BACKEND
    BACKEND = "cpu" if flashlite.backends().get("cpu") == "available" else "reference"
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    report = {"backend": BACKEND, "cases": {}, "bad": {}, "seconds": {}}
    for name in CASES:
        torch.manual_seed(zlib_crc(name))
        start = time.perf_counter()
        try:
            report["cases"][name] = _run_case(name, rank, world, torch, flashlite, fld, dispatch, reference, conftest)
        except Exception:  # noqa: BLE001 - reported to the test
            report["cases"][name] = {"failures": [traceback.format_exc()]}
        report["seconds"][name] = time.perf_counter() - start
    start = time.perf_counter()
    for name in BAD:
        report["bad"][name] = _run_bad(name, rank, world, torch, flashlite, fld)
    dist.barrier()
    report["seconds"]["bad"] = time.perf_counter() - start
    start = time.perf_counter()
    report["balance"] = _balance(rank, world, torch, flashlite, fld)
    report["seconds"]["balance"] = time.perf_counter() - start
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8 * world, 4)
    report["round_trip"] = {lay: bool(torch.equal(fld.unshard(fld.shard(x, 2, lay), 2, lay), x)) for lay in LAYOUTS}
    report["positions"] = {lay: fld.positions(rank, world, 8, lay).tolist() for lay in LAYOUTS}
    try:
        report["module"] = _module_case(rank, world, torch, flashlite, fld, reference)
    except Exception:  # noqa: BLE001
        report["module"] = traceback.format_exc()
    dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


def zlib_crc(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode())


BACKEND = "cpu"

# -- the launcher and the tests ----------------------------------------------------------------

_RESULTS = {}


def _child(rank: int, world: int, folder: str) -> None:
    """A forked rank: torch and flashlite are already imported (no 3-5 s import per process)."""
    try:
        worker(rank, world, folder)
    except BaseException:  # reported to the parent, then re-raised
        with open(os.path.join(folder, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def results(world: int):
    """Per-rank reports of one launch of ``world`` processes (run once per session). The ranks
    are forked from this process where the platform allows (Linux), else started afresh."""
    if world not in _RESULTS:
        import multiprocessing

        folder = tempfile.mkdtemp(prefix=f"flashlite-cp{world}-")
        start = time.perf_counter()
        if "fork" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("fork")
            procs = [ctx.Process(target=_child, args=(r, world, folder)) for r in range(world)]
            for p in procs:
                p.start()
            for p in procs:
                p.join(max(1.0, TIMEOUT_S - (time.perf_counter() - start)))
            if any(p.is_alive() for p in procs):
                for p in procs:
                    p.kill()
                pytest.fail(f"{world} gloo workers did not finish in {TIMEOUT_S} s")
            codes = [p.exitcode for p in procs]
        else:  # pragma: no cover - no fork: one fresh interpreter per rank
            env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
            env.pop("FLASHLITE_BACKEND", None)
            procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(r), str(world),
                                       folder], env=env) for r in range(world)]
            try:
                codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                pytest.fail(f"{world} gloo workers did not finish in {TIMEOUT_S} s")
        reports = []
        for r, code in enumerate(codes):
            path, err = os.path.join(folder, f"rank{r}.json"), os.path.join(folder, f"rank{r}.err")
            log = ""
            if os.path.exists(err):
                with open(err) as f:
                    log = f.read()
            assert code == 0 and os.path.exists(path), f"rank {r} of {world} failed (exit {code}):\n{log[-4000:]}"
            with open(path) as f:
                reports.append(json.load(f))
        _RESULTS[world] = reports
        if os.environ.get("FLASHLITE_CP_TIMES"):
            print(f"\nworld {world}: {time.perf_counter() - start:.1f} s;",
                  {k: round(v, 2) for k, v in reports[0]["seconds"].items()})
    return _RESULTS[world]


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(world, case):
    for rank, report in enumerate(results(world)):
        failures = report["cases"][case]["failures"]
        assert not failures, f"rank {rank}/{world} {case}: " + "\n".join(failures)


def _expected_pairs(report, rank, world, layout):
    from flashlite.distributed.layouts import chunks_of

    mine = chunks_of(rank, world, layout)
    visible = report["visible"]
    return {(x, y) for x in mine for y in range(len(visible)) if visible[x][y]}


RING_CASES = [c for c in CASES if c.endswith("-ring")]


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case", RING_CASES)
def test_skipped_shards_never_computed(world, case):
    from flashlite.distributed.layouts import chunks_of

    layout = case.split("-")[-2]
    owner = {c: r for r in range(world) for c in chunks_of(r, world, layout)}
    for rank, report in enumerate(results(world)):
        found = report["cases"][case]
        assert not found["failures"], found["failures"]
        want = _expected_pairs(found, rank, world, layout)
        want_ranks = {owner[y] for _, y in want}
        for phase in ("forward", "backward"):
            covered = [(x, y) for qs, ks in found["calls"][phase] for x in qs for y in ks]
            assert -1 not in [c for pair in covered for c in pair], f"{phase}: a call on rows that are no chunk"
            ranks = {owner[y] for _, y in covered}
            assert ranks == want_ranks, f"rank {rank} {phase}: computed key shards {ranks}, visible {want_ranks}"
            if not case.startswith("topk"):  # tile patterns are cut per segment pair; top-k per shard pair
                assert len(covered) == len(set(covered)), f"rank {rank} {phase}: a chunk pair computed twice"
                assert set(covered) == want, f"rank {rank} {phase}: computed {sorted(set(covered))}, visible {sorted(want)}"
            stats = found["stats"][phase]
            assert stats["pairs_computed"] == len(want_ranks)
            assert stats["pairs_skipped"] == world - len(want_ranks)
        if case.startswith("window_short"):  # a causal window of 8 < one shard: one hop, then stop
            assert found["stats"]["forward"]["steps"] == 2
            assert found["stats"]["forward"]["bytes_sent"] == 2 * B * HKV * (N // world) * D * 4


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_zigzag_balances_causal_work(world):
    tiles = {lay: [r["balance"][lay] for r in results(world)] for lay in LAYOUTS}
    ratio = max(tiles["zigzag"]) / min(tiles["zigzag"])
    assert ratio <= 1.05, f"zigzag causal tiles per rank {tiles['zigzag']} (max/min {ratio:.3f})"
    assert max(tiles["contiguous"]) / min(tiles["contiguous"]) > 1.5  # what zigzag fixes


EXPECTED_BAD = {
    "layout": "ValueError: layout", "method": "ValueError: method", "uneven": "ValueError: q_l",
    "zigzag_odd": "ValueError: q_l", "ulysses_heads": "ValueError: q_l", "block_straddles": "ValueError: pattern",
    "alibi_ring": "ValueError: alibi_slopes", "group_type": "ValueError: group", "shard_uneven": "ValueError: t",
    "topk_range": "ValueError: pattern",
}


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case", BAD)
def test_bad_input_rejected(world, case):
    for rank, report in enumerate(results(world)):
        got = report["bad"][case]
        if case == "not_member":
            want = "member" if rank < world // 2 else "ValueError: group"
        elif case == "group_too_small":
            want = "not a member" if rank >= world // 2 else "ValueError: pattern"
        else:
            want = EXPECTED_BAD[case]
        assert got.startswith(want), f"rank {rank}/{world} {case}: {got!r}, want {want!r}..."
    if case == "uneven":
        assert "uneven" in results(world)[1]["bad"][case]


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_shard_unshard(world):
    for rank, report in enumerate(results(world)):
        assert report["round_trip"] == {"contiguous": True, "zigzag": True}
        c = 8 // 2
        assert report["positions"]["zigzag"] == (list(range(rank * c, rank * c + c))
                                                 + list(range((2 * world - 1 - rank) * c, (2 * world - rank) * c)))
        assert report["positions"]["contiguous"] == list(range(rank * 8, rank * 8 + 8))


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_attention_module(world):
    found = [r["module"] for r in results(world)]
    if found[0] is None:
        pytest.skip("flashlite.nn.Attention has no context_parallel= option in this tree")
    for rank, cases in enumerate(found):
        assert isinstance(cases, dict), f"rank {rank}: {cases}"
        for name in ("attention-zigzag-ring", "window-contiguous-ulysses"):
            assert cases[name] < 1e-5, f"rank {rank} {name}: max error {cases[name]}"
        assert cases["topk-without-indices"].startswith("ValueError: indices"), cases["topk-without-indices"]


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
