#!/usr/bin/env python3
"""Registers, spills, stack and shared memory of every CUDA kernel of csrc/cuda, from ``ptxas -v``.

    python csrc/cuda/tools/ptxas_report.py                       # table, every instantiation, sm_80 + sm_90a
    python csrc/cuda/tools/ptxas_report.py --json /tmp/after.json --compare /tmp/before.json
    python csrc/cuda/tools/ptxas_report.py --read /tmp/before.json   # print a saved table
    python csrc/cuda/tools/ptxas_report.py --few --jobs 2        # the compile tests' subset

Each ``csrc/cuda/*.cu`` is compiled device-only (``nvcc -cubin -Xptxas -v``) once per arch. Columns:
``regs`` registers per thread, ``spill_st`` / ``spill_ld`` spill store / load bytes, ``stack`` stack
frame bytes, ``smem`` static shared memory bytes (ptxas), ``dyn_smem`` the dynamic shared memory the
launcher asks for on that arch's largest device (A100 for sm_80, H100 for sm_90a; the 2-stage
budget when it fits, else the 1-stage one; SIMT kernels at the largest head_dim of their template),
computed from csrc/cuda/tiles.h by a small host program.

tests/test_cuda_compile.py imports ``parse_ptxas`` and ``dynamic_smem`` to hold the kernels compiled
there against csrc/cuda/ptxas_budget.json (``check_budget``).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CUDA_DIR = Path(__file__).resolve().parents[1]
CSRC = CUDA_DIR.parent
ARCHS = ("sm_80", "sm_90a")
# Opt-in shared memory per block of the largest device of each arch (bytes).
SMEM_LIMIT = {"sm_80": 166912, "sm_90a": 232448}
FIELDS = ("regs", "spill_st", "spill_ld", "stack", "smem", "dyn_smem")


def find_nvcc() -> str | None:
    candidates = [shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    candidates += sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), reverse=True)
    return next((c for c in candidates if c and os.path.exists(c)), None)


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(.*)")
_SMEM = re.compile(r"(\d+) bytes smem")


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_name(demangled: str) -> str:
    """flashlite::cuda::detail::mma_forward_kernel<__half, flashlite::...::FwdTile<128, 64, 32> >(...)
    -> mma_forward_kernel<f16, FwdTile<128,64,32>>"""
    name = demangled.replace("(anonymous namespace)::", "")
    name = name.split("(")[0]
    name = re.sub(r"^void ", "", name)
    name = name.replace("flashlite::cuda::detail::", "")
    name = name.replace("__nv_bfloat16", "bf16").replace("__half", "f16")
    name = re.sub(r"\s+", "", name)
    return name


def parse_ptxas(text: str) -> list[dict]:
    """Kernel entries of a ``ptxas -v`` log: [{kernel (mangled), arch, regs, spill_st, spill_ld, stack, smem}]."""
    rows: list[dict] = []
    current = None
    props_for = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = {"kernel": m.group(1), "arch": m.group(2), "regs": 0, "spill_st": 0, "spill_ld": 0,
                       "stack": 0, "smem": 0}
            rows.append(current)
            props_for = None
            continue
        m = _PROPS.search(line)
        if m:
            props_for = m.group(1)
            continue
        m = _FRAME.search(line)
        if m and current is not None and props_for == current["kernel"]:
            current["stack"], current["spill_st"], current["spill_ld"] = map(int, m.groups())
            continue
        m = _USED.search(line)
        if m and current is not None:
            current["regs"] = int(m.group(1))
            s = _SMEM.search(m.group(2))
            current["smem"] = int(s.group(1)) if s else 0
            current = None  # the Used line closes the entry
    return rows


# ---------------------------------------------------------------------------------------------
# Dynamic shared memory (what the launchers ask for), from tiles.h
# ---------------------------------------------------------------------------------------------
_SMEM_PROGRAM = r"""
#include <cstdio>
#include <initializer_list>
#include "cuda/tiles.h"
using namespace flashlite::cuda::detail;
int main() {
#define X(d, m, n) std::printf("mma %d %d %d %zu %zu %zu %zu %zu %zu %d\n", d, m, n, FwdTile<d, m, n>::kSmemBytes, \
    BwdTile<d, m, n>::kv_smem(2), BwdTile<d, m, n>::kv_smem(1), BwdTile<d, m, n>::q_smem(2), BwdTile<d, m, n>::q_smem(1), \
    FwdStatsTile<d, m, n>::kSmemBytes, BwdTile<d, m, n>::kChunk);
  FLASHLITE_MMA_TILES(X)
  for (int e : {2, 4})
    for (int dc : {2, 4, 8})
      std::printf("simt %d %d %zu %zu %zu %zu %zu\n", e, dc, simt_forward_smem(e, 32 * dc, 2),
                  simt_forward_smem(e, 32 * dc, 1), simt_rows_backward_smem(e, 32 * dc, 2),
                  simt_rows_backward_smem(e, 32 * dc, 1), simt_dkdv_smem(e, 32 * dc));
  return 0;
}
"""


def dynamic_smem(few: bool = False, cxx: str | None = None, csrc: Path = CSRC) -> dict | None:
    """{(family key): bytes per arch} from tiles.h, or None without a host compiler."""
    cxx = cxx or shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "smem.cpp", Path(tmp) / "smem"
        src.write_text(_SMEM_PROGRAM)
        flags = ["-DFLASHLITE_CUDA_FEW_INSTANTIATIONS"] if few else []
        build = subprocess.run([cxx, "-std=c++17", "-O0", f"-I{csrc}", *flags, str(src), "-o", str(exe)],
                               capture_output=True, text=True)
        if build.returncode != 0:
            raise RuntimeError(f"smem table program failed to build:\n{build.stderr}")
        lines = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    table: dict = {}
    for line in lines:
        w = line.split()
        if w[0] == "mma":
            d, m, n, fwd, kv2, kv1, q2, q1, fwd_stats, chunk = map(int, w[1:])
            for arch, limit in SMEM_LIMIT.items():
                table[("mma_forward_kernel", d, m, n, arch)] = fwd
                table[("mma_forward_kernel:stats", d, m, n, arch)] = fwd_stats
                # BwdStatsTile (entropy's gradient): the dK/dV launch adds g, shift per stage
                kv2s, kv1s = kv2 + 2 * 2 * chunk * 4, kv1 + 2 * chunk * 4
                table[("mma_dkdv_kernel:stats", d, m, n, arch)] = kv2s if kv2s <= limit else kv1s
                table[("mma_dq_kernel:stats", d, m, n, arch)] = q2 if q2 <= limit else q1
                table[("mma_dkdv_kernel", d, m, n, arch)] = kv2 if kv2 <= limit else kv1
                table[("mma_dq_kernel", d, m, n, arch)] = q2 if q2 <= limit else q1
        else:
            e, dc, f2, f1, r2, r1, kv = map(int, w[1:])
            for arch, limit in SMEM_LIMIT.items():
                table[("simt_forward_kernel", e, dc, arch)] = f2 if f2 <= limit else f1
                table[("simt_backward_rows_kernel", e, dc, arch)] = r2 if r2 <= limit else r1
                table[("simt_dkdv_kernel", e, dc, arch)] = kv
    return table


_TILE = re.compile(r"^(mma_\w+_kernel)<[^,]+,(Fwd|FwdStats|Bwd|BwdStats)Tile<(\d+),(\d+),(\d+)>")
_SIMT = re.compile(r"^(simt_\w+_kernel)<(f16|bf16|float),(\d+)")
_SIMT_ALIAS = {"simt_dkdv_entropy_kernel": "simt_dkdv_kernel"}  # + 2·16 floats, not counted


def dyn_smem_of(name: str, arch: str, table: dict | None) -> int | None:
    if table is None:
        return None
    m = _TILE.match(name)
    if m:
        family = m.group(1) + (":stats" if m.group(2).endswith("Stats") else "")
        return table.get((family, int(m.group(3)), int(m.group(4)), int(m.group(5)), arch))
    m = _SIMT.match(name)
    if m:
        family = _SIMT_ALIAS.get(m.group(1), m.group(1))
        return table.get((family, 4 if m.group(2) == "float" else 2, int(m.group(3)), arch))
    return 0  # gather_key_grads_kernel, combine_splits_kernel, accum_to_tensor_kernel: none


def annotate(rows: list[dict], table: dict | None) -> list[dict]:
    """Short names + dyn_smem; sorted, one row per (kernel, arch)."""
    names = demangle(sorted({r["kernel"] for r in rows}))
    out = {}
    for r in rows:
        name = short_name(names[r["kernel"]])
        row = {"kernel": name, "arch": r["arch"], **{k: r[k] for k in FIELDS if k in r}}
        row["dyn_smem"] = dyn_smem_of(name, r["arch"], table)
        out[(name, r["arch"])] = row
    return [out[k] for k in sorted(out)]


# ---------------------------------------------------------------------------------------------
# Compiling
# ---------------------------------------------------------------------------------------------
def compile_all(sources: list[Path], archs, few: bool, jobs: int, nvcc: str, csrc: Path = CSRC) -> list[dict]:
    flags = ["-std=c++17", "-O2", f"-I{csrc}"] + (["-DFLASHLITE_CUDA_FEW_INSTANTIATIONS"] if few else [])

    def one(task):
        src, arch = task
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [nvcc, *flags, "-cubin", f"-arch={arch}", "-Xptxas", "-v", "-t1", str(src), "-o",
                   str(Path(tmp) / "out.cubin")]
            run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            return f"nvcc {src.name} ({arch}) failed:\n{run.stderr[-4000:]}"
        return parse_ptxas(run.stderr)

    tasks = [(s, a) for s in sources for a in archs]
    rows: list[dict] = []
    failures = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for part in pool.map(one, tasks):
            if isinstance(part, str):
                failures.append(part)
                print(part, file=sys.stderr)
            else:
                rows.extend(part)
    if failures:
        raise RuntimeError(f"{len(failures)} compile(s) failed (above)")
    return rows


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def format_table(rows: list[dict]) -> str:
    width = max([len("kernel")] + [len(r["kernel"]) for r in rows])
    head = f"{'kernel':<{width}}  {'arch':<6} {'regs':>4} {'spill_st':>8} {'spill_ld':>8} {'stack':>5} " \
           f"{'smem':>5} {'dyn_smem':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        dyn = "-" if r.get("dyn_smem") is None else r["dyn_smem"]
        lines.append(f"{r['kernel']:<{width}}  {r['arch']:<6} {r['regs']:>4} {r['spill_st']:>8} {r['spill_ld']:>8} "
                     f"{r['stack']:>5} {r['smem']:>5} {dyn:>8}")
    return "\n".join(lines)


def compare(before: list[dict], after: list[dict]) -> tuple[str, list[str]]:
    """A before/after table of every kernel and the list of kernels that got worse (regs or spills)."""
    b = {(r["kernel"], r["arch"]): r for r in before}
    a = {(r["kernel"], r["arch"]): r for r in after}
    width = max([6] + [len(k[0]) for k in set(a) | set(b)])
    head = f"{'kernel':<{width}}  {'arch':<6} {'regs':>9} {'spill st/ld':>15} {'stack':>9} {'smem':>11}"
    lines, worse = [head, "-" * len(head)], []

    def pair(x, y, key):
        if x is None:
            return f"new {y[key]}"
        if y is None:
            return f"{x[key]} gone"
        return f"{x[key]}" if x[key] == y[key] else f"{x[key]}->{y[key]}"

    for key in sorted(set(a) | set(b)):
        x, y = b.get(key), a.get(key)
        spill = "-" if (x or y) is None else (
            f"{(x or y)['spill_st']}/{(x or y)['spill_ld']}" if x and y and x['spill_st'] == y['spill_st']
            and x['spill_ld'] == y['spill_ld'] else
            f"{x['spill_st'] if x else '?'}/{x['spill_ld'] if x else '?'}->{y['spill_st'] if y else '?'}/"
            f"{y['spill_ld'] if y else '?'}")
        lines.append(f"{key[0]:<{width}}  {key[1]:<6} {pair(x, y, 'regs'):>9} {spill:>15} {pair(x, y, 'stack'):>9} "
                     f"{pair(x, y, 'smem'):>11}")
        if x and y and (y["regs"] > x["regs"] or y["spill_st"] > x["spill_st"] or y["spill_ld"] > x["spill_ld"]
                        or y["stack"] > x["stack"]):
            worse.append(f"{key[0]} {key[1]}")
    return "\n".join(lines), worse


# ---------------------------------------------------------------------------------------------
# Budget (csrc/cuda/ptxas_budget.json)
# ---------------------------------------------------------------------------------------------
def check_budget(rows: list[dict], budget: dict) -> list[str]:
    """Violations of the budget table: each rule {match (regex on the short name), archs (optional),
    max_regs, max_spill, max_stack, max_dyn_smem_fraction} applies to every kernel it matches."""
    problems = []
    for r in rows:
        for rule in budget["rules"]:
            if not re.search(rule["match"], r["kernel"]):
                continue
            if "archs" in rule and r["arch"] not in rule["archs"]:
                continue
            why = rule.get("why", rule["match"])
            if "max_regs" in rule and r["regs"] > rule["max_regs"]:
                problems.append(f"{r['kernel']} {r['arch']}: {r['regs']} registers > {rule['max_regs']} ({why})")
            spill = max(r["spill_st"], r["spill_ld"])
            if "max_spill" in rule and spill > rule["max_spill"]:
                problems.append(f"{r['kernel']} {r['arch']}: {spill} spill bytes > {rule['max_spill']} ({why})")
            if "max_stack" in rule and r["stack"] > rule["max_stack"]:
                problems.append(f"{r['kernel']} {r['arch']}: {r['stack']} stack bytes > {rule['max_stack']} ({why})")
            frac = rule.get("max_dyn_smem_fraction")
            if frac is not None and r.get("dyn_smem") is not None:
                total = r["dyn_smem"] + r["smem"]
                if total > frac * SMEM_LIMIT[r["arch"]]:
                    problems.append(f"{r['kernel']} {r['arch']}: {total} bytes of shared memory > {frac:.0%} of "
                                    f"{SMEM_LIMIT[r['arch']]} ({why})")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", choices=ARCHS, help="default: sm_80 and sm_90a")
    ap.add_argument("--few", action="store_true", help="-DFLASHLITE_CUDA_FEW_INSTANTIATIONS (the compile tests)")
    ap.add_argument("--jobs", type=int, default=1, help="parallel nvcc runs (default 1)")
    ap.add_argument("--sources", nargs="*", help="csrc/cuda/*.cu file names (default: all)")
    ap.add_argument("--csrc", default=str(CSRC), help="the csrc directory to compile (default: this checkout's)")
    ap.add_argument("--json", help="write the table to this JSON file")
    ap.add_argument("--read", help="read a table from this JSON file instead of compiling")
    ap.add_argument("--compare", help="JSON of an earlier table: print before/after, exit 1 if a kernel got worse")
    ap.add_argument("--budget", help="budget JSON (e.g. csrc/cuda/ptxas_budget.json): exit 1 on violations")
    args = ap.parse_args(argv)

    if args.read:
        rows = json.loads(Path(args.read).read_text())["kernels"]
    else:
        nvcc = find_nvcc()
        if nvcc is None:
            print("nvcc not found", file=sys.stderr)
            return 2
        csrc = Path(args.csrc).resolve()
        names = args.sources or sorted(p.name for p in (csrc / "cuda").glob("*.cu"))
        raw = compile_all([csrc / "cuda" / n for n in names], args.arch or ARCHS, args.few, args.jobs, nvcc, csrc)
        rows = annotate(raw, dynamic_smem(args.few, csrc=csrc))
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"few": args.few, "kernels": rows}, indent=1) + "\n")
    status = 0
    if args.compare:
        before = json.loads(Path(args.compare).read_text())["kernels"]
        text, worse = compare(before, rows)
        print("\nbefore -> after\n" + text)
        if worse:
            print("\nworse: " + ", ".join(worse))
            status = 1
    if args.budget:
        problems = check_budget(rows, json.loads(Path(args.budget).read_text()))
        print("\nbudget: " + ("ok" if not problems else "\n  " + "\n  ".join(problems)))
        status = status or (1 if problems else 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
