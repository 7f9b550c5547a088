#!/usr/bin/env python
"""Run a sample of flash-attn's own test suite (tests/test_flash_attn.py) on flashlite, through
``flashlite.compat.install()``, on the CPU. Not part of the CI suite: flash-attn's tests are not in
this repository. Get them once:

    # any checkout of https://github.com/Dao-AILab/flash-attention (the tools' fetch gives a bare mirror)
    git -C <flash-attention checkout or mirror> show HEAD:tests/test_flash_attn.py > /tmp/fa_suite/test_flash_attn.py
    pip install einops pytest          # flash-attn's tests import einops
    .venv/bin/python tools/run_flash_attn_suite.py --tests /tmp/fa_suite/test_flash_attn.py --write-docs

What it does, in a fresh temporary folder:

* copies the test file with every ``"cuda"`` string literal turned into ``"cpu"`` (the device of
  every tensor the tests make), nothing else changed;
* writes a conftest.py that calls ``flashlite.compat.install()`` (so ``import flash_attn``,
  ``flash_attn.bert_padding`` and ``flash_attn.flash_attn_interface`` are flashlite's), registers
  ``flash_attn.layers.rotary`` with a plain-PyTorch ``apply_rotary_emb`` written from flash-attn's
  definition (the kv-cache test's reference rotates with it; it is not flashlite's code), and answers ``torch.cuda.get_device_capability`` / ``get_device_properties``
  as an A100 (sm80, 80 GB) so the module imports and its memory/architecture branches take the
  A100 path;
* samples ``--cases`` test cases (default 150) with a fixed seed (``--seed``, default 0) from the
  functions in ``SAMPLED`` - an equal share per function (``FIXED_SHARE``: one race-condition
  case, 250 repeats of a batch of 60 - about 140 s on two cores; the kv-cache bounds test's two
  cases), among the cases the test does not skip at its top (``self_skipped``) whose work
  ``seqlen_q·seqlen_k·d`` is at most ``--max-work`` (default 2^22) - flash-attn's shapes go up to
  2048² (and 100000 keys in split-kv) with d 256, which the plain-PyTorch references in these
  tests take minutes each to compute on two cores;
* runs them with pytest and classifies each: **passed**; **not applicable** - the test reads
  flash-attn internals flashlite does not have (``S_dmask``, the debug matrix of dropped-out
  probabilities that dropout tests decode; flashlite returns ``None`` in its place), or needs
  what is not built (varlen queries over a paged cache; ALiBi on a paged cache), or the test
  skipped itself; **failed** - with the exception's first line as the cause;
* ``--functions`` runs other functions: flash_attn_with_kvcache's tests (``KVCACHE``) run on their
  own, ``--functions test_flash_attn_kvcache,test_flash_attn_kvcache_paged_block_table_bounds
  --cases 42`` (about 2 minutes of it collecting the kv-cache test's 304128 cases);
* prints the summary and, with ``--write-docs``, writes it into docs/compat.md between the
  ``flash-attn-suite`` markers (a run of other functions than the default ones gets markers named
  by its functions), and the sum over every run's block between the ``flash-attn-suite-total`` ones.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "compat.md"
BEGIN, END = "<!-- flash-attn-suite:begin -->", "<!-- flash-attn-suite:end -->"

SAMPLED = [
    "test_flash_attn_qkvpacked", "test_flash_attn_varlen_qkvpacked", "test_flash_attn_output",
    "test_flash_attn_varlen_output", "test_flash_attn_causal", "test_flash_attn_varlen_causal",
    "test_flash_attn_splitkv", "test_flash_attn_race_condition", "test_flash_attn_bwd_overflow",
    "test_flash_attn_bwd_transpose", "test_flash_attn_bwd_varlen_overflow", "test_flash_attn_deterministic",
    "test_flash_attn_varlen_deterministic",
]
# Cases per function where an equal share would not fit the time budget: the race-condition test
# repeats a batch-60 forward and backward 250 times (about 140 s a case on two cores).
FIXED_SHARE = {"test_flash_attn_race_condition": 1, "test_flash_attn_kvcache_paged_block_table_bounds": 2}
# flash_attn_with_kvcache's tests, run on their own (a second block in docs/compat.md):
#   --functions test_flash_attn_kvcache,test_flash_attn_kvcache_paged_block_table_bounds --cases 42
KVCACHE = ["test_flash_attn_kvcache", "test_flash_attn_kvcache_paged_block_table_bounds"]
NOT_RUN = {
    "test_flash_attn_kvcache": "run on its own, see the flash_attn_with_kvcache run below",
    "test_flash_attn_kvcache_paged_block_table_bounds": "run on its own, see the flash_attn_with_kvcache run below",
    "test_flash_attn_varlen_paged_kv_num_splits": "varlen attention over a paged cache (not built yet)",
    "test_flash_attn_generator_arg_must_be_none": "calls flash-attn's CUDA extension (flash_attn_gpu) directly",
}

CONFTEST = '''
import json, os, sys, types
import random

import pytest
import torch

# The tests ask the CUDA runtime about the GPU at import time: answer as an A100.
torch.cuda.get_device_capability = lambda *a, **k: (8, 0)
torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(total_memory=80 * 2**30, name="cpu")
torch.cuda.synchronize = lambda *a, **k: None

import flashlite.compat

flashlite.compat.install()
layers = types.ModuleType("flash_attn.layers")
rotary = types.ModuleType("flash_attn.layers.rotary")


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     max_seqlen=None):
    """flash-attn's rotary embedding in plain PyTorch (the kv-cache test's reference; written here from
    flash_attn.layers.rotary's definition, not flashlite's code): x [B, S, H, D] rotated at positions
    seqlen_offsets + s (an int or a [B] tensor), in float32, rounded once to x's dtype."""
    assert cu_seqlens is None and not inplace
    half = cos.shape[-1]
    offsets = torch.as_tensor(seqlen_offsets, device=x.device).long().reshape(-1, 1)
    positions = offsets + torch.arange(x.shape[1], device=x.device)
    c = cos[positions].float().unsqueeze(2)
    s = sin[positions].float().unsqueeze(2)
    r = x[..., :2 * half].float()
    if interleaved:
        c, s = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
        turned = torch.stack((-r[..., 1::2], r[..., 0::2]), -1).flatten(-2)
    else:
        c, s = torch.cat((c, c), -1), torch.cat((s, s), -1)
        turned = torch.cat((-r[..., half:], r[..., :half]), -1)
    return torch.cat(((r * c + turned * s).to(x.dtype), x[..., 2 * half:]), -1)


rotary.apply_rotary_emb = apply_rotary_emb
layers.rotary = rotary
sys.modules["flash_attn.layers"] = layers
sys.modules["flash_attn.layers.rotary"] = rotary
sys.modules["flash_attn"].layers = layers

SAMPLED = json.loads(os.environ["FA_SUITE_FUNCTIONS"])
FIXED_SHARE = json.loads(os.environ["FA_SUITE_FIXED_SHARE"])
RESULTS = os.environ["FA_SUITE_RESULTS"]


NOT_COLLECTED = {}


def pytest_pycollect_makeitem(collector, name, obj):
    """Functions outside the sample are counted (product of their parametrize lists), not collected:
    flash-attn's kv-cache test alone has 300k cases."""
    if name.startswith("test_") and callable(obj) and name not in SAMPLED:
        total = 1
        for mark in getattr(obj, "pytestmark", []):
            if mark.name == "parametrize":
                total *= len(mark.args[1])
        NOT_COLLECTED[name] = total
        return []
    return None


def work(params):
    q = params.get("seqlen_q", params.get("seqlen", 128))
    k = params.get("seqlen_k", params.get("seqlen", 128))
    return q * k * params.get("d", 64)


def self_skipped(name, p):
    """The cases a test skips at its top (pytest.skip() with no reason): not sampled, so a sample
    holds cases flash-attn itself runs. test_flash_attn_kvcache's rules, copied from its body."""
    if name == "test_flash_attn_kvcache":
        paged = p["paged_kv_block_size"] is not None
        return ((p["seqlen_q"] > p["seqlen_k"] and p["new_kv"]) or (not p["new_kv"] and p["rotary_fraction"] > 0.0)
                or (p["has_batch_idx"] and paged) or (p["has_leftpad"] and paged))
    return False


def pytest_collection_modifyitems(session, config, items):
    rng = random.Random(int(os.environ["FA_SUITE_SEED"]))
    limit, cases = int(os.environ["FA_SUITE_MAX_WORK"]), int(os.environ["FA_SUITE_CASES"])
    by_function = {name: [] for name in SAMPLED}
    totals = dict(NOT_COLLECTED)
    for item in items:
        name = item.originalname
        totals[name] = totals.get(name, 0) + 1
        if name in by_function and work(item.callspec.params) <= limit and not self_skipped(name, item.callspec.params):
            by_function[name].append(item)
    fixed = {name: n for name, n in FIXED_SHARE.items() if name in by_function}
    free = [name for name in SAMPLED if name not in fixed]
    share, extra = divmod(cases - sum(fixed.values()), max(len(free), 1))
    chosen = []
    for name in SAMPLED:
        pool = by_function[name]
        wanted = fixed[name] if name in fixed else share + (free.index(name) < extra)
        chosen += rng.sample(pool, min(len(pool), wanted))
    with open(RESULTS + ".collected", "w") as f:
        json.dump({"totals": totals, "eligible": {n: len(p) for n, p in by_function.items()}}, f)
    chosen_ids = {id(item) for item in chosen}
    config.hook.pytest_deselected(items=[item for item in items if id(item) not in chosen_ids])
    items[:] = [item for item in items if id(item) in chosen_ids]


def classify(report, call):
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        return "not applicable", "the test skips itself: " + reason.replace("Skipped: ", "")
    text = report.longreprtext
    exc = call.excinfo.value if call.excinfo is not None else None
    if "convert_flash_attn_S_to_softmax" in text or "S_dmask" in text.split("\\nE ")[-1]:
        return "not applicable", "reads flash-attn's debug S_dmask (dropout mask), which flashlite does not build"
    if isinstance(exc, NotImplementedError):
        message = str(exc).splitlines()[0]
        if "alibi_slopes with a paged" in message:
            return "not applicable", "ALiBi on a paged KV cache: flashlite.paged_attention has no ALiBi yet"
        if "paged" in message or "block_table" in message:
            return "not applicable", "varlen attention over a paged KV cache (block_table): not built yet"
        return "failed", "NotImplementedError: " + message
    lines = [line[2:].strip() for line in text.splitlines() if line.startswith("E ")]
    cause = lines[0] if lines else type(exc).__name__
    return "failed", cause[:300]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (report.when == "call" or report.outcome != "passed") and not getattr(item, "_fa_done", False):
        if report.when == "teardown" and report.outcome == "passed":
            return
        item._fa_done = True
        status, cause = ("passed", "") if report.passed else classify(report, call)
        params = {k: (str(v) if not isinstance(v, (int, float, bool, type(None))) else v)
                  for k, v in item.callspec.params.items()}
        with open(RESULTS, "a") as f:
            f.write(json.dumps({"id": item.nodeid.split("::")[-1], "function": item.originalname, "params": params,
                                "status": status, "cause": cause, "seconds": round(report.duration, 2)}) + "\\n")
'''


def patched_tests(source: str) -> str:
    return source.replace('"cuda"', '"cpu"').replace("'cuda'", "'cpu'")


def summarize(results, collected, args, command, wall, functions) -> str:
    counts = collections.Counter(r["status"] for r in results)
    per_function = collections.defaultdict(collections.Counter)
    for r in results:
        per_function[r["function"]][r["status"]] += 1
    causes = collections.Counter((r["status"], r["cause"]) for r in results if r["status"] != "passed")
    lines = [
        f"Command (from the repository root, {wall / 60:.1f} min on this 2-core machine):",
        "",
        "```",
        command,
        "```",
        "",
        f"flash-attn snapshot: `tests/test_flash_attn.py` of Dao-AILab/flash-attention {args.revision}. "
        f"Sample: {len(results)} cases, seed {args.seed}, an equal share per function ("
        + ", ".join(f"`{n}`: {c}" for n, c in FIXED_SHARE.items() if n in functions)
        + (") " if any(n in functions for n in FIXED_SHARE) else "none fixed) ")
        + f"among the cases with seqlen_q·seqlen_k·d ≤ {args.max_work}.",
        "",
        f"**{counts['passed']} passed, {counts['failed']} failed, {counts['not applicable']} not applicable.**",
        "",
        "| function | cases in flash-attn | eligible (work cap) | sampled | passed | failed | not applicable |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in functions:
        c = per_function[name]
        lines.append(f"| `{name}` | {collected['totals'].get(name, 0)} | {collected['eligible'].get(name, 0)} | "
                     f"{sum(c.values())} | {c['passed']} | {c['failed']} | {c['not applicable']} |")
    for name, why in (NOT_RUN.items() if set(functions) == set(SAMPLED) else ()):
        lines.append(f"| `{name}` | {collected['totals'].get(name, 0)} | not run: {why} | | | | |")
    lines += ["", "Causes (failed and not applicable):", ""]
    if not causes:
        lines.append("- none")
    for (status, cause), n in causes.most_common():
        lines.append(f"- {status}, {n} case{'s' if n > 1 else ''}: {cause}")
    failed = [r for r in results if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed cases:", ""]
        lines += [f"- `{r['function']}[{r['id'].split('[', 1)[-1]}`: {r['cause']}" for r in failed[:40]]
        if len(failed) > 40:
            lines.append(f"- ... and {len(failed) - 40} more")
    return "\n".join(lines)


def markers(functions) -> tuple:
    """The docs block of a run: the main one for the default functions, a named one otherwise."""
    if set(functions) == set(SAMPLED):
        return BEGIN, END
    name = ",".join(functions)
    return f"<!-- flash-attn-suite:{name}:begin -->", f"<!-- flash-attn-suite:{name}:end -->"


def replace_block(text: str, begin: str, end: str, body: str) -> str:
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    return f"{head}{begin}\n{body}\n{end}{rest.split(end, 1)[1]}"


TOTAL_BEGIN, TOTAL_END = "<!-- flash-attn-suite-total:begin -->", "<!-- flash-attn-suite-total:end -->"


def write_docs(summary: str, functions) -> None:
    """Write this run's block, then the sum of every run's bold totals line into the total block."""
    text = DOC.read_text() if DOC.exists() else "# flash-attn compatibility\n"
    text = replace_block(text, *markers(functions), summary)
    totals = [0, 0, 0]
    runs = 0
    for match in re.finditer(r"<!-- flash-attn-suite(?::[^ ]*)?:begin -->(.*?)<!-- flash-attn-suite", text, re.S):
        line = re.search(r"\*\*(\d+) passed, (\d+) failed, (\d+) not applicable\.\*\*", match.group(1))
        if line:
            runs += 1
            totals = [t + int(n) for t, n in zip(totals, line.groups())]
    if TOTAL_BEGIN in text:
        body = (f"All runs below together ({runs}): **{sum(totals)} cases, {totals[0]} passed, {totals[1]} failed, "
                f"{totals[2]} not applicable.**")
        text = replace_block(text, TOTAL_BEGIN, TOTAL_END, body)
    DOC.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", default="/tmp/fa_suite/test_flash_attn.py",
                        help="flash-attn's tests/test_flash_attn.py")
    parser.add_argument("--revision", default="(revision not given)", help="the snapshot's commit, for the summary")
    parser.add_argument("--cases", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-work", type=int, default=1 << 22, help="largest seqlen_q*seqlen_k*d sampled")
    parser.add_argument("--functions", default=",".join(SAMPLED), help="comma-separated test functions")
    parser.add_argument("--write-docs", action="store_true", help="write the summary into docs/compat.md")
    args = parser.parse_args()
    source = Path(args.tests)
    if not source.exists():
        print(f"{source} not found: see this script's docstring for how to get flash-attn's tests", file=sys.stderr)
        return 2
    functions = [f for f in args.functions.split(",") if f]
    work = Path(tempfile.mkdtemp(prefix="fa_suite_"))
    (work / "test_flash_attn.py").write_text(patched_tests(source.read_text()))
    (work / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    results_path = work / "results.jsonl"
    env = dict(os.environ, FA_SUITE_FUNCTIONS=json.dumps(functions), FA_SUITE_RESULTS=str(results_path),
               FA_SUITE_FIXED_SHARE=json.dumps(FIXED_SHARE), FA_SUITE_SEED=str(args.seed),
               FA_SUITE_CASES=str(args.cases), FA_SUITE_MAX_WORK=str(args.max_work),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("FLASHLITE_BACKEND", None)
    started = time.time()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(work),
                          "-o", "addopts=", str(work / "test_flash_attn.py")], cwd=work, env=env)
    wall = time.time() - started
    if not results_path.exists():
        print(f"pytest wrote no results (exit {run.returncode})", file=sys.stderr)
        return 1
    results = [json.loads(line) for line in results_path.read_text().splitlines()]
    collected = json.loads((work / "results.jsonl.collected").read_text())
    command = " ".join(["python tools/run_flash_attn_suite.py", f"--tests {args.tests}", f"--cases {args.cases}",
                        f"--seed {args.seed}", f"--max-work {args.max_work}"]
                       + ([f"--revision {args.revision}"] if args.revision != parser.get_default("revision") else [])
                       + ([] if set(functions) == set(SAMPLED) else [f"--functions {','.join(functions)}"])
                       + (["--write-docs"] if args.write_docs else []))
    summary = summarize(results, collected, args, command, wall, functions)
    print(summary)
    if args.write_docs:
        write_docs(summary, functions)
        print(f"\nwritten to {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
