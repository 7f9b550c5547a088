"""The Triton kernels' launches as a GPU run makes them, measured on sm_90a without a GPU.

``budget_launches`` calls flashlite's own launchers on fake CUDA tensors (shapes, strides and
dtypes only) at the configurations they pick on a GPU (``launch.tile_config`` and
``backward_launches``, the gather launchers' block sizes) for the dtypes and head dims of
``MATRIX``, and records every kernel launch, specialized as Triton's JIT does on a GPU
(``triton_aot.record_launches``). ``triton_aot.compile_launches`` compiles them for sm_90a with
Triton's bundled ptxas and reads back registers, spill bytes, stack, shared memory and PTX counts.
tests/test_triton_budget.py holds them against tests/budgets/triton.json.

    python tests/triton_budget.py [--write]   # measure every launch, print the table (and record it)

(TRITON_INTERPRET=1 in the environment, as the tests have it; FLASHLITE_BUDGET_WORKERS processes,
2 by default; FLASHLITE_KEEP_PTX=folder keeps each kernel's PTX.)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from triton_aot import compile_launches, record_launches  # first: it may point flashlite.kernels elsewhere

from flashlite import BlockSparse, Full  # noqa: E402
from flashlite.core.packed import Packed  # noqa: E402
from flashlite.kernels import gather_launch, launch  # noqa: E402

BUDGET_FILE = Path(__file__).parent / "budgets" / "triton.json"
GPU = torch.device("cuda")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BATCH, HEADS_Q, HEADS_KV, SEQLEN, TOP_K = 2, 8, 2, 1024, 64
PACKED_LENGTHS = [1024, 777, 250]  # a packed (varlen) batch: 2051 tokens, an odd total as most are
DROPOUT = (0.1, 2 ** 40 + 7)  # (p, seed) of the "dropout" variants: a 64-bit seed, as draw_seed gives
SINK_TOKENS = 4  # the "stats" variants: head statistics (STATS forward, ENTROPY backward)
SMEM_LIMIT = 227 * 1024  # sm_90: largest shared memory per block
SMEM_SHARE = 0.9

FORWARD_KERNELS = ("tile_forward_kernel", "gather_forward_kernel")


def _tensors(dtype, head_dim, packed=False):
    if packed:  # the [1, H, T, D] views of packed [T, H, D] tensors that varlen_attention passes
        total = sum(PACKED_LENGTHS)
        q = torch.empty(total, HEADS_Q, head_dim, dtype=dtype, device=GPU).transpose(0, 1).unsqueeze(0)
        k = torch.empty(total, HEADS_KV, head_dim, dtype=dtype, device=GPU).transpose(0, 1).unsqueeze(0)
        v = torch.empty(total, HEADS_KV, head_dim, dtype=dtype, device=GPU).transpose(0, 1).unsqueeze(0)
        return q, k, v
    q = torch.empty(BATCH, HEADS_Q, SEQLEN, head_dim, dtype=dtype, device=GPU)
    k = torch.empty(BATCH, HEADS_KV, SEQLEN, head_dim, dtype=dtype, device=GPU)
    v = torch.empty_like(k)
    return q, k, v


def tile_launches(name, dtype, head_dim):
    """The tile engine's three kernels for pattern ``name`` ("causal": a range schedule with the
    band mask; "flags": the same with softcap and ALiBi; "sparse": a block-sparse list schedule;
    "packed": causal over a packed batch, PACKED work items; "dropout": causal with attention dropout;
    "stats": causal with the head statistics, STATS forward and ENTROPY backward), as ``tile_config``
    configures them."""
    block_size = 128 if name == "sparse" else None
    config = launch.tile_config(head_dim, dtype, GPU, block_size)
    if name == "sparse":
        tiles = -(-SEQLEN // 128)
        layout = torch.rand(1, 1, tiles, tiles, generator=torch.Generator().manual_seed(0)) < 0.5
        pattern = BlockSparse(layout, 128, causal=True)
    else:
        pattern = Full(True)
    seqlen = SEQLEN
    if name == "packed":
        cu_seqlens = torch.tensor([0] + PACKED_LENGTHS).cumsum(0).to(torch.int32)
        pattern, seqlen = Packed(Full(True), cu_seqlens, cu_seqlens), sum(PACKED_LENGTHS)
    schedule = pattern.schedule(seqlen, seqlen, config.block_m, config.block_n)  # real: built before faking

    softcap = 30.0 if name == "flags" else 0.0
    dropout = DROPOUT if name == "dropout" else None
    stats = SINK_TOKENS if name == "stats" else None

    def run():
        q, k, v = _tensors(dtype, head_dim, packed=name == "packed")
        slopes = torch.empty(HEADS_Q, device=GPU) if name == "flags" else None
        out, lse, *_ = launch.tile_forward(q, k, v, schedule, head_dim ** -0.5, softcap, slopes, config=config,
                                           dropout=dropout, stats=stats)
        entropy = torch.empty((2,) + tuple(lse.shape), device=GPU) if stats is not None else None
        launch.tile_backward(torch.empty_like(out), q, k, v, out, lse, schedule, head_dim ** -0.5, softcap, slopes,
                             config=config, dropout=dropout, entropy=entropy)

    return record_launches(run)


def gather_launches(mode, dtype, head_dim):
    """The gather engine's forward and dQ kernels in ``mode`` ("row", "union", "shared"; "flags":
    union with softcap and ALiBi; "dropout": row with attention dropout; "stats": row with the head
    statistics) and, with "row", "flags", "dropout" and "stats", its dK/dV and reduce kernels, at the
    block sizes the launchers pick on a GPU."""
    group = HEADS_Q // HEADS_KV
    block_q = gather_launch.forward_block_q(head_dim, group, GPU, dtype)

    def run():
        q, k, v = _tensors(dtype, head_dim)
        i64, i32 = dict(dtype=torch.int64, device=GPU), dict(dtype=torch.int32, device=GPU)
        if mode == "shared":
            rows = torch.empty(BATCH, HEADS_KV, TOP_K, **i64)
            plan = gather_launch.forward_plan(rows, SEQLEN, SEQLEN, True, group, head_dim, dtype=dtype)
        elif mode in ("row", "dropout", "stats"):
            rows = torch.empty(BATCH, HEADS_KV, SEQLEN, TOP_K, **i64)
            plan = gather_launch.forward_plan(rows, SEQLEN, SEQLEN, True, group, head_dim, mode="row", dtype=dtype)
        else:  # union (and flags): built from data on a real run; here its tensors at their shapes
            tiles, width = -(-SEQLEN // block_q), 4 * TOP_K
            plan = gather_launch.ForwardPlan("union", block_q, tiles, torch.empty(BATCH, HEADS_KV, tiles, width, **i32),
                                             torch.empty(BATCH, HEADS_KV, tiles, **i32),
                                             torch.empty(BATCH, HEADS_KV, tiles * block_q, width, dtype=torch.int8,
                                                         device=GPU))
        softcap = 30.0 if mode == "flags" else 0.0
        slopes = torch.empty(HEADS_Q, device=GPU) if mode == "flags" else None
        dropout = DROPOUT if mode == "dropout" else None
        stats = SINK_TOKENS if mode == "stats" else None
        out, lse, *_ = gather_launch.gather_forward(q, k, v, plan, HEADS_KV, True, head_dim ** -0.5, softcap, slopes,
                                                    dropout=dropout, stats=stats)
        entropy = torch.empty((2,) + tuple(lse.shape), device=GPU) if stats is not None else None
        entries = BATCH * HEADS_KV * SEQLEN * TOP_K
        block_e = gather_launch.backward_block_e(group)
        pieces, keys = entries // 8, BATCH * HEADS_KV * SEQLEN
        inverse = gather_launch.InversePlan(
            block_e, pieces, torch.empty(entries, **i32), torch.empty(entries, **i64), torch.empty(entries, **i32),
            torch.empty(-(-entries // block_e) + 1, **i64), torch.empty(keys, **i64), torch.empty(keys, **i64),
            torch.empty(keys, **i32))
        gather_launch.gather_backward(torch.empty_like(out), q, k, v, out, lse, plan, inverse, HEADS_KV, True,
                                      head_dim ** -0.5, softcap, slopes, dropout=dropout, entropy=entropy)

    launches = record_launches(run)
    if mode in ("union", "shared"):  # the dK/dV side does not depend on the forward mode
        launches = [x for x in launches if x.kernel in ("gather_forward_kernel", "gather_backward_q_kernel")]
    return launches


# The measured matrix: (dtype, head dim) -> tile variants, gather variants. float16 compiles to the
# same resources as bfloat16 (every row of the first full table), so it is sampled; head dim 72
# shows the alignment hints (BLOCK_D = 128, as d128).
MATRIX = {
    **{(dt, d): (("causal", "sparse") if d <= 128 else ("causal",), ("row", "union"))
       for dt in ("bf16", "fp32") for d in (64, 128, 256)},
    ("bf16", 128): (("causal", "sparse", "flags", "packed", "dropout", "stats"),
                    ("row", "union", "shared", "flags", "dropout", "stats")),
    ("bf16", 72): (("causal",), ("row",)),
    ("fp32", 72): (("causal",), ()),
    ("fp16", 64): (("causal", "sparse"), ("row",)),
}


def label_of(launch, variant, dt, d):
    engine_variant = variant if launch.kernel.startswith("tile") or "forward" in launch.kernel or "_q_" in \
        launch.kernel else (variant if variant in ("flags", "dropout", "stats") else "-")
    return f"{launch.kernel} {engine_variant} {dt} d{d}"


def budget_launches(matrix=None):
    """Every budgeted launch (``MATRIX``), labelled "kernel variant dtype dD"."""
    launches = []
    for (dt, d), (tile_variants, gather_variants) in (matrix or MATRIX).items():
        for variant in tile_variants:
            for x in tile_launches(variant, DTYPES[dt], d):
                x.label = label_of(x, variant, dt, d)
                launches.append(x)
        for variant in gather_variants:
            for x in gather_launches(variant, DTYPES[dt], d):
                x.label = label_of(x, variant, dt, d)
                launches.append(x)
    return launches


def format_table(launches, results) -> str:
    head = f"{'kernel':<28}{'variant':<8}{'dtype':<6}{'d':>4}{'tile':>16}{'warps':>6}{'stg':>4}" \
           f"{'regs':>6}{'spill':>7}{'stack':>7}{'smem':>8}{'v4':>5}{'cp.as':>6}{'s':>6}"
    lines = [head, "-" * len(head)]
    for x in launches:
        r = results.get(x.label, {})
        kernel, variant, dt, d = x.label.split()
        c = x.constexprs
        tile = "x".join(str(c[n]) for n in ("BLOCK_M", "BLOCK_N", "BLOCK_Q", "GROUP_PAD", "BLOCK_K", "BLOCK_E",
                                            "BLOCK_R") if n in c)
        tile += "".join(f"/{c[n]}" for n in ("SUB_M", "SUB_N", "BLOCK_DC") if n in c)
        if "error" in r:
            lines.append(f"{kernel:<28}{variant:<8}{dt:<6}{d[1:]:>4}  ERROR {r['error'][:80]}")
            continue
        lines.append(f"{kernel:<28}{variant:<8}{dt:<6}{d[1:]:>4}{tile:>16}{x.num_warps:>6}{x.num_stages:>4}"
                     f"{r.get('regs', '?'):>6}{r.get('spill_stores', '?'):>7}{r.get('stack', '?'):>7}"
                     f"{r.get('smem', '?'):>8}{r.get('ptx', {}).get('ld_v4', '?'):>5}"
                     f"{r.get('ptx', {}).get('cp_async', '?'):>6}{r.get('seconds', '?'):>6}")
    return "\n".join(lines)


def budget_entry(result: dict) -> dict:
    return {"spill": result["spill_stores"], "regs": result["regs"], "smem": result["smem"]}


if __name__ == "__main__":
    import sys
    import time

    start = time.time()
    launches = budget_launches()
    results = compile_launches(launches, workers=int(os.environ.get("FLASHLITE_BUDGET_WORKERS", "2")),
                               keep_ptx=os.environ.get("FLASHLITE_KEEP_PTX", ""))
    print(format_table(launches, results))
    print(f"{len(launches)} kernels in {time.time() - start:.0f} s")
    if "--write" in sys.argv:
        BUDGET_FILE.parent.mkdir(exist_ok=True)
        table = {x.label: budget_entry(results[x.label]) for x in launches if "error" not in results[x.label]}
        BUDGET_FILE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
