"""Resource budget of the Triton kernels on sm_90a, held without a GPU (issue 15, checks).

Every Triton kernel, launched by flashlite's launchers on fake CUDA tensors at the configurations
they pick on a GPU and specialized as a real launch is (``triton_budget``), is compiled ahead of
time for sm_90a and held against ``tests/budgets/triton.json``:

* no spills in forward kernels at head dim <= 128;
* shared memory <= 90 % of the sm_90 limit (227 KB per block);
* a packed (varlen) tile kernel spills no more than the same kernel over a plain batch ("causal");
* a kernel with attention dropout (DROPOUT), or with the head statistics (STATS forward, ENTROPY
  backward: "stats"), spills no more than the same kernel without them ("causal" for the tile
  engine, "row" or "-" for the gather engine);
* every kernel at most the spill bytes recorded for it (a ceiling that may only come down; a
  launch without an entry fails, with the line to add; ``python tests/triton_budget.py --write``
  records a whole new table).

``test_resource_budget_core`` compiles a few launches of each engine (about a minute on 2 idle
cores) and runs with the suite. ``test_resource_budget_full`` compiles the rest of the table (about
90 launches, 10 to 15 minutes on 2 cores): it is marked slow and runs only when asked for, with
``-m slow`` or FLASHLITE_BUDGET_FULL=1 (``pytest -s -m slow tests/test_triton_budget.py`` prints
the table). Both also catch what the interpreter accepts and the compiler rejects.
"""
from __future__ import annotations

import os

import pytest

from triton_aot import compile_launches
from triton_budget import (BUDGET_FILE, FORWARD_KERNELS, SMEM_LIMIT, SMEM_SHARE, budget_entry, budget_launches,
                           format_table)

# Each engine's kernels at bfloat16 d128 (and with softcap + ALiBi; the tile kernels also over a
# packed batch, PACKED work items; both engines with attention dropout, DROPOUT; both forwards and
# the tile dK/dV with the head statistics, STATS / ENTROPY), and the block-sparse forward at d64 (a
# 36-byte spill before 2 pipeline stages).
CORE = {f"tile_{k}_kernel {v} bf16 d128" for k in ("forward", "backward_kv", "backward_q")
        for v in ("causal", "packed", "dropout")} \
    | {"tile_forward_kernel flags bf16 d128", "tile_backward_kv_kernel flags bf16 d128",
       "tile_forward_kernel sparse bf16 d64"} \
    | {f"gather_{k} bf16 d128" for k in ("forward_kernel row", "backward_q_kernel row", "backward_kv_kernel -",
                                         "reduce_kv_kernel -", "forward_kernel flags", "backward_kv_kernel flags")} \
    | {f"gather_{k} dropout bf16 d128" for k in ("forward_kernel", "backward_q_kernel", "backward_kv_kernel")} \
    | {f"{k} stats bf16 d128" for k in ("tile_forward_kernel", "tile_backward_kv_kernel", "gather_forward_kernel")}


def load_budget() -> dict:
    import json

    return json.loads(BUDGET_FILE.read_text()) if BUDGET_FILE.exists() else {}


def check_budget(launches, results):
    """The rules of the module docstring for every launch measured."""
    budget = load_budget()
    failures = []
    for x in launches:
        r = results[x.label]
        if "error" in r:
            failures.append(f"{x.label}: does not compile: {r['error'][:500]}")
            continue
        d = int(x.label.split()[-1][1:])
        if r["smem"] > SMEM_SHARE * SMEM_LIMIT:
            failures.append(f"{x.label}: {r['smem']} B of shared memory > {SMEM_SHARE:.0%} of {SMEM_LIMIT} B")
        if x.kernel in FORWARD_KERNELS and d <= 128 and r["spill_stores"]:
            failures.append(f"{x.label}: a forward kernel spills {r['spill_stores']} B at d{d}")
        plain = results.get(x.label.replace(" packed ", " causal "), {})
        if " packed " in x.label and "spill_stores" in plain and r["spill_stores"] > plain["spill_stores"]:
            failures.append(f"{x.label}: {r['spill_stores']} B spilled > {plain['spill_stores']} B without PACKED")
        for variant, flag in ((" dropout ", "DROPOUT"), (" stats ", "STATS/ENTROPY")):
            without = [results.get(x.label.replace(variant, f" {v} "), {}) for v in ("causal", "row", "-")]
            without = [u["spill_stores"] for u in without if "spill_stores" in u]
            if variant in x.label and without and r["spill_stores"] > without[0]:
                failures.append(f"{x.label}: {r['spill_stores']} B spilled > {without[0]} B without {flag}")
        entry = budget.get(x.label)
        if entry is None:
            failures.append(f'{x.label}: no budget entry; measured "{x.label}": {budget_entry(r)}')
        elif r["spill_stores"] > entry["spill"]:
            failures.append(f"{x.label}: {r['spill_stores']} B spilled > the recorded ceiling of {entry['spill']} B")
    assert not failures, "\n".join(failures)


def measure(select):
    launches = [x for x in budget_launches() if select(x.label)]
    results = compile_launches(launches, workers=int(os.environ.get("FLASHLITE_BUDGET_WORKERS", "2")))
    print("\n" + format_table(launches, results))
    return launches, results


def test_resource_budget_core():
    """Registers, spills and shared memory of each engine's kernels at a few configurations."""
    check_budget(*measure(lambda label: label in CORE))


@pytest.mark.slow
def test_resource_budget_full(request):
    """The rest of the table: every kernel at every budgeted dtype, head dim and variant."""
    markexpr = request.config.option.markexpr or ""
    if not os.environ.get("FLASHLITE_BUDGET_FULL") and ("slow" not in markexpr or "not slow" in markexpr):
        pytest.skip("compiles about 90 kernels (10-15 min on 2 cores): run with -m slow or FLASHLITE_BUDGET_FULL=1")
    check_budget(*measure(lambda label: label not in CORE))


def test_budget_table_lists_every_launch():
    """The table in the repository names exactly the launches measured (no stale or missing entry)."""
    labels = {x.label for x in budget_launches()}
    assert CORE <= labels, CORE - labels
    budget = load_budget()
    assert set(budget) == labels, {"missing": sorted(labels - set(budget)), "stale": sorted(set(budget) - labels)}
