"""Reporting: the environment block, the derived figures of each row, the table, the JSON file."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from .timing import cpu_peak_for

SCHEMA = "flashlite-bench/1"
REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------
def _git(*args: str) -> Optional[str]:
    if not (REPO_ROOT / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def busy_warning(env: Dict[str, object], timer=None) -> Optional[str]:
    """A warning when other processes keep the CPU busy, saying what the timer does about it."""
    load, cores = env.get("load_average"), env.get("cpu_count")
    if env.get("device_type") == "cpu" and load and cores and load[0] > 1.5 * cores:  # type: ignore[index]
        what = ("flashlite and its peers are timed interleaved, so contention hits them alike; "
                + (timer.describe() if timer is not None else "each median repeated until it is known to ±3 %")
                + "; rows still outside are flagged noisy under the table and in the JSON")
        return (f"warning: the machine is busy (load average {load[0]:.1f} on {cores} cores): "  # type: ignore[index]
                f"{what}. Compare min_ms in the JSON, and re-run noisy rows when it is idle")
    return None


def environment(device: torch.device) -> Dict[str, object]:
    """Device, versions, commit, threads: everything needed to reproduce or compare a run."""
    import flashlite

    try:
        import triton

        triton_version: Optional[str] = triton.__version__
    except ImportError:
        triton_version = None
    env: Dict[str, object] = {
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "flashlite": getattr(flashlite, "__version__", None),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "cuda_runtime": torch.version.cuda,
        "load_average": _load_average(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "device_name": torch.cuda.get_device_name(device),
            "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_bytes": props.total_memory,
            "l2_bytes": getattr(props, "L2_cache_size", None),
            "driver": _nvidia_driver(),
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        })
    else:
        env["device_name"] = _cpu_model()
    return env


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40] or "device"


def stamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


# ---------------------------------------------------------------------------------------------
# Derived figures
# ---------------------------------------------------------------------------------------------
def derive(rows: List[Dict[str, object]], peak: Optional[Dict[str, object]]) -> None:
    """Fill TFLOP/s, GB/s, % of peak and the ratio to the best peer of the same case and mode."""
    best: Dict[tuple, tuple] = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        seconds = float(row["time_ms"]) * 1e-3
        row["tflops"] = row["flops"] / seconds / 1e12 if row.get("flops") else None
        row["gbps"] = row["bytes"] / seconds / 1e9 if row.get("bytes") else None
        row["pct_peak"] = row["pct_matmul"] = None
        if peak:
            # %peak: against the processor's own limits where measured (CPU: the FMA loop of the
            # kernels' build and the stream copy, at the row's thread count), else torch's figures;
            # torch's matmul of the row's dtype stays beside it (pct_matmul), a peer, not a limit.
            fma_gflops, stream_gbps = cpu_peak_for(peak, row.get("threads"))
            copy = stream_gbps or peak.get("copy_gbps")
            matmul = (peak.get("matmul_tflops") or {}).get(row["dtype"])
            if matmul and row.get("tflops"):
                row["pct_matmul"] = 100 * row["tflops"] / float(matmul)
            if row.get("memory_bound") and row.get("gbps") and copy:
                row["pct_peak"] = 100 * row["gbps"] / float(copy)
            elif not row.get("memory_bound") and row.get("tflops"):
                limit = fma_gflops / 1e3 if fma_gflops else matmul
                if limit:
                    row["pct_peak"] = 100 * row["tflops"] / float(limit)
        if row["kind"] == "peer":
            key = (row["case"], row["mode"])
            if key not in best or row["time_ms"] < best[key][0]:
                best[key] = (row["time_ms"], row["impl"])
    for row in rows:
        key = (row["case"], row["mode"])
        if row["status"] == "ok" and key in best:
            row["best_peer"] = best[key][1]
            row["best_peer_ms"] = best[key][0]
            row["speedup_vs_best_peer"] = best[key][0] / row["time_ms"]
        else:
            row.setdefault("best_peer", None)
            row.setdefault("speedup_vs_best_peer", None)
    derive_vs_plain(rows)


def _backend_of(impl: str) -> Optional[str]:
    return impl.split(":", 1)[1] if impl.startswith(("flashlite:", "plain:")) else None


RATIO_PATTERNS = ("stats", "paged")  # the cases with a vs_plain column


def derive_vs_plain(rows: List[Dict[str, object]]) -> None:
    """stats and paged cases: each row's time over the plain forward's (``flashlite.attention`` on
    the same inputs, contiguous for paged; same case and mode): the ``plain:<backend>`` row of its own backend, else (a peer, or a backend whose plain
    forward was not timed) the fastest plain row. Fills ``plain_impl``, ``plain_ms``, ``vs_plain``."""
    plain: Dict[tuple, Dict[str, float]] = {}
    for row in rows:
        if row["status"] == "ok" and str(row["impl"]).startswith("plain:"):
            plain.setdefault((row["case"], row["mode"]), {})[str(row["impl"])] = float(row["time_ms"])
    for row in rows:
        if row.get("pattern") not in RATIO_PATTERNS:
            continue
        options = plain.get((row["case"], row["mode"]))
        if row["status"] != "ok" or not options:
            row.setdefault("vs_plain", None)
            continue
        own = f"plain:{_backend_of(str(row['impl']))}"
        name = own if own in options else min(options, key=options.__getitem__)
        row.update(plain_impl=name, plain_ms=options[name], vs_plain=float(row["time_ms"]) / options[name])
        fastest = {r["impl"]: (r.get("stats") or {}).get("min_ms") for r in rows  # type: ignore[union-attr]
                   if r["case"] == row["case"] and r["mode"] == row["mode"] and r["impl"] in (name, row["impl"])}
        if all(isinstance(v, float) and v > 0 for v in fastest.values()):
            row["vs_plain_min"] = fastest[row["impl"]] / fastest[name]  # the fastest calls' ratio (busy machines)


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------
def _num(value, fmt: str, width: int) -> str:
    """``value`` right-aligned in ``width`` with ``fmt`` (a leading ``#`` keeps trailing zeros), or ``-``."""
    if not (isinstance(value, (int, float)) and value == value):
        return f"{'-':>{width}}"
    alternate = "#" if fmt.startswith("#") else ""
    return f"{value:{alternate}{width}{fmt.lstrip('#')}}"


HEADER = (f"{'case':<44} {'mode':<7} {'impl':<20} {'time ms':>9} {'±%':>6} {'TFLOP/s':>8} {'GB/s':>7} "
          f"{'%peak':>6} {'vs best peer':>12} {'mem MiB':>8}")


def _ci_cell(row: Dict[str, object]) -> str:
    """The median's 95 % interval half-width in %, with ``!`` when the row is noisy."""
    ci = (row.get("stats") or {}).get("ci_pct")  # type: ignore[union-attr]
    if not isinstance(ci, (int, float)) or ci != ci:
        return f"{'-':>6}"
    text = f"{ci:.1f}" if ci < 100 else ">99"
    return f"{text + ('!' if row.get('noisy') else ' '):>6}"


VS_PLAIN = f" {'vs plain':>9}"  # the column a run with the stats case adds


def format_row(row: Dict[str, object], vs_plain: bool = False) -> str:
    head = f"{row['case']:<44.44} {row['mode']:<7} {row['impl']:<20.20}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row.get('reason') or ''}"[:200]
    speed = row.get("speedup_vs_best_peer")
    speed_text = f"{speed:11.2f}x" if isinstance(speed, float) else f"{'-':>12}"
    mem = row.get("peak_mem_bytes")
    ratio = row.get("vs_plain")
    ratio_text = (f" {ratio:8.2f}x" if isinstance(ratio, float) else f" {'-':>9}") if vs_plain else ""
    return (f"{head} {_num(row['time_ms'], '#.4g', 9)} {_ci_cell(row)} {_num(row.get('tflops'), '#.3g', 8)} "
            f"{_num(row.get('gbps'), '#.4g', 7)} {_num(row.get('pct_peak'), '.3g', 6)} {speed_text} "
            f"{_num(mem / 2**20 if isinstance(mem, int) else None, '.1f', 8)}{ratio_text}")


def table(rows: Sequence[Dict[str, object]], show_skipped: bool = True) -> str:
    """The rows grouped by case, one line per (mode, impl); skipped rows show their reason. With a
    stats case, a last column: each row's time over the plain forward's (``vs_plain``)."""
    vs_plain = any(r.get("pattern") in RATIO_PATTERNS for r in rows)
    header = HEADER + (VS_PLAIN if vs_plain else "")
    lines = [header, "-" * len(header)]
    previous = None
    for row in rows:
        if row["status"] == "skip" and not show_skipped:
            continue
        if previous is not None and row["case"] != previous:
            lines.append("")
        previous = row["case"]
        lines.append(format_row(row, vs_plain))
    return "\n".join(lines)


def peak_lines(peak: Dict[str, object]) -> List[str]:
    """What --peak measured, one line per kind."""
    lines = []
    if peak.get("fma_gflops"):
        active = peak.get("fma_isa")
        for isa, per in peak["fma_gflops"].items():  # type: ignore[union-attr]
            figures = ", ".join(f"{v:.1f} GFLOP/s on {t} thread{'s' if t != '1' else ''}" for t, v in per.items())
            lines.append(f"measured peak: FMA loop ({isa}{', the kernels build: %peak uses it' if isa == active else ''}): "
                         f"{figures}")
        copy = ", ".join(f"{v:.1f} GB/s on {t}" for t, v in peak["stream_copy_gbps"].items())  # type: ignore[union-attr]
        lines.append(f"measured peak: stream copy {copy} thread(s)")
    matmul = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in (peak.get("matmul_tflops") or {}).items() if v)  # type: ignore[union-attr]
    peer = " (peers, beside: pct_matmul in the JSON)" if peak.get("fma_gflops") else ""
    lines.append(f"measured{' torch' if peer else ' peak:'} matmul GFLOP/s {matmul}; tensor copy "
                 f"{peak['copy_gbps']:.3g} GB/s{peer}")
    for error in peak.get("errors") or []:  # type: ignore[union-attr]
        lines.append(f"peak: {error}")
    return lines


def noisy_rows(rows: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """The timed rows whose median missed the interval target (the JSON's ``noisy`` list)."""
    out = []
    for row in rows:
        if row["status"] == "ok" and row.get("noisy"):
            stats = row.get("stats") or {}
            out.append({"case": row["case"], "mode": row["mode"], "impl": row["impl"], "time_ms": row["time_ms"],
                        **{k: stats.get(k) for k in ("ci_pct", "min_ms", "p20_ms", "p80_ms", "reps", "attempts",  # type: ignore[union-attr]
                                                     "other_attempt_ms")}})
    return out


def noisy_lines(noisy: Sequence[Dict[str, object]], timer=None) -> List[str]:
    """The lines under the table that list the noisy rows with their spread."""
    if not noisy:
        return []
    target = f"±{100 * timer.rel_ci:g} %" if timer is not None else "the interval target"
    cap = f" after {timer.max_s:g} s" if timer is not None else ""
    lines = [f"noisy: {len(noisy)} rows whose median's 95 % interval is still wider than {target}{cap} and one "
             f"re-measurement (marked ! in the ±% column; their ratios are uncertain):"]
    for item in noisy:
        other = item.get("other_attempt_ms")
        lines.append(f"  {item['case']} {item['mode']} {item['impl']}: {item['time_ms']:.4g} ms ±{item['ci_pct']:.1f} %, "
                     f"min {item['min_ms']:.4g} p20 {item['p20_ms']:.4g} p80 {item['p80_ms']:.4g} ms, "
                     f"{item['reps']} reps" + (f", other attempt {other:.4g} ms" if isinstance(other, float) else ""))
    return lines


def summary(rows: Sequence[Dict[str, object]]) -> List[str]:
    """Geometric-mean speed-up of each flashlite backend over the best peer, per mode."""
    from .cases import geometric_mean

    out = []
    impls = sorted({r["impl"] for r in rows if r["kind"] == "flashlite"})
    for impl in impls:
        parts = []
        for mode in ("fwd", "bwd", "fwd+bwd"):
            ratios = [r["speedup_vs_best_peer"] for r in rows if r["impl"] == impl and r["mode"] == mode
                      and isinstance(r.get("speedup_vs_best_peer"), float)]
            if ratios:
                parts.append(f"{mode} {geometric_mean(ratios):.2f}x over {len(ratios)} cases")
        if parts:
            out.append(f"{impl}: geometric-mean speed-up vs the best peer: " + "; ".join(parts))
    return out


STATS_GOAL = 1.15  # issue 18: attention_stats at most 1.15x the plain forward (N = 2048)


def stats_summary(rows: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """stats cases, one entry per (case, mode): each attention_stats row's ratio to the plain
    forward, eager's ratio, and the memory: eager's [B, H, Nq, Nk] matrix against the statistics
    (computed), with each row's measured peak (the report's ``stats`` list)."""
    out: List[Dict[str, object]] = []
    groups: Dict[tuple, List[Dict[str, object]]] = {}
    for row in rows:
        if row.get("pattern") == "stats":
            groups.setdefault((row["case"], row["mode"]), []).append(row)
    for (case, mode), members in groups.items():
        memory = members[0].get("stats_memory") or {}
        entry: Dict[str, object] = {"case": case, "mode": mode, "shape": members[0]["shape"],
                                    "dtype": members[0]["dtype"], **memory, "goal_vs_plain": STATS_GOAL,
                                    "rows": []}
        for row in members:
            if row["status"] != "ok":
                continue
            entry["rows"].append({"impl": row["impl"], "time_ms": row["time_ms"], "noisy": row.get("noisy"),  # type: ignore[union-attr]
                                  "vs_plain": row.get("vs_plain"), "vs_plain_min": row.get("vs_plain_min"),
                                  "plain_impl": row.get("plain_impl"),
                                  "peak_mem_bytes": row.get("peak_mem_bytes")})
        out.append(entry)
    return out


def _mib(value) -> str:
    return f"{value / 2**20:.3g} MiB" if isinstance(value, (int, float)) else "-"


def stats_lines(entries: Sequence[Dict[str, object]]) -> List[str]:
    """The lines under the table for the stats cases: the ratios to the plain forward, then eager's
    matrix against the statistics."""
    lines = []
    for entry in entries:
        timed = entry["rows"]
        if not timed:
            lines.append(f"{entry['case']} {entry['mode']}: nothing timed")
            continue
        ratios = [f"{r['impl']} {r['vs_plain']:.2f}x ({r['plain_impl']})" for r in timed  # type: ignore[union-attr]
                  if isinstance(r.get("vs_plain"), float) and not str(r["impl"]).startswith("plain:")]
        lines.append(f"{entry['case']} {entry['mode']}: time over the plain forward: "
                     + ("; ".join(ratios) or "-") + f" (goal for attention_stats: <= {STATS_GOAL}x)")
        peaks = "; ".join(f"{r['impl']} {_mib(r.get('peak_mem_bytes'))}" for r in timed)  # type: ignore[union-attr]
        shape = entry["shape"]
        lines.append(f"  memory: eager's P [{shape['batch']}, {shape['heads_q']}, {shape['seqlen_q']}, "  # type: ignore[index]
                     f"{shape['seqlen_k']}] {entry['dtype']} = {_mib(entry.get('eager_matrix_bytes'))} per call vs "  # type: ignore[index]
                     f"attention_stats' statistics {_mib(entry.get('stats_output_bytes'))}; measured peak per call "
                     f"(outputs included): {peaks}")
    return lines


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------
def _clean(value):
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None if value != value else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(report: Dict[str, object], path: Path) -> None:
    """Write atomically (``path.tmp`` then rename), so an interrupted run leaves a valid file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(_clean(report), handle, indent=1, sort_keys=False)
        handle.write("\n")
    os.replace(tmp, path)


def command_line(argv: Optional[Iterable[str]] = None) -> str:
    args = list(sys.argv if argv is None else argv)
    return " ".join(args)
