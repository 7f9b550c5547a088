"""``flashlite bench``: validate, time beside the peers, print the table, write JSON and plots.

Python API: ``run(parse_args([...]))`` returns the report dict (the JSON's content);
``main(argv)`` is the command line (``flashlite bench`` and ``python -m flashlite.bench``).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import cases as C
from .cases import Case, Skip
from .peers import FlashliteImpl, Impl, PerSequenceImpl, PlainImpl, make_peers, parse_peers
from .report import (REPO_ROOT, SCHEMA, busy_warning, command_line, derive, environment, noisy_lines, noisy_rows,
                     peak_lines, slug, stamp, stats_lines, stats_summary, summary, table, write_json)
from .timing import Timer, cpu_peak_bytes, measure_peak, rotation_sets

BACKEND_NAMES = ("cuda", "triton", "cpu", "reference")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _list(kind: Callable[[str], object]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        items = [item for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return [kind(item.strip()) for item in items]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"expected a positive int, got {text!r}")
    return value


def _density(text: str) -> float:
    value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    if not 0 < value <= 1:
        raise ValueError(f"density must be in (0, 1] (or a percentage), got {text!r}")
    return value


def default_results_dir() -> Path:
    """bench/results/ of the source checkout, else ./flashlite-bench-results."""
    bench_dir = Path(__file__).resolve().parent
    if (REPO_ROOT / ".git").exists() or (REPO_ROOT / "setup.py").exists():
        return bench_dir / "results"
    return Path.cwd() / "flashlite-bench-results"


def build_parser(prog: str = "flashlite bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Validate every flashlite backend against the reference, then time forward, backward and "
                    "forward+backward of each pattern beside PyTorch SDPA and FlexAttention measured in the same run. "
                    "Prints a table, writes JSON and PNG plots. The sweep options default to the profile's values.")
    # Each help text states its default itself (argparse's ArgumentDefaultsHelpFormatter would repeat it,
    # and print "(default: True)" for the --no-* switches).
    add = parser.add_argument
    add("--quick", action="store_true", help="a short run (about a minute): fewer, smaller shapes")
    add("--profile", choices=sorted(C.PROFILES), default=None,
        help="size profile (default: gpu/gpu-quick on a GPU, cpu/cpu-quick on a CPU)")
    add("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    add("--patterns", type=_list(C.parse_pattern), default=None,
        help=f"comma list of {', '.join(C.ALL_PATTERNS)} (default: all but varlen and stats)")
    add("--seqlens", type=_list(_positive_int), default=None,
        help="comma list of sequence lengths (default: the profile's)")
    add("--head-dims", type=_list(_positive_int), default=None,
        help="comma list of head dims, the first is the base (default: the profile's)")
    add("--dtypes", type=_list(C.parse_dtype), default=None,
        help="comma list of bf16, fp16, fp32, the first is the base (default: the profile's)")
    add("--batch-heads", type=_list(C.parse_batch_heads), default=None,
        help="comma list like 2x16, the first is the base (default: the profile's)")
    add("--window", type=_positive_int, default=None,
        help="sliding-window size, keys to the left (default: the profile's)")
    add("--densities", type=_list(_density), default=None,
        help="block-sparse densities, e.g. 0.1,0.25 or 10%% (default: the profile's)")
    add("--block-size", type=int, choices=(16, 32, 64, 128), default=None, help="block-sparse block size (default: 64)")
    add("--topk", type=_positive_int, default=None, help="keys per query of the top-k pattern (default: the profile's)")
    add("--grid", action="store_true", help="full cross product of seqlens x head dims x dtypes x batch-heads "
                                            "(default: the base line over seqlens, other values at the middle seqlen)")
    add("--backends", type=_list(str), default=None,
        help=f"flashlite backends among {', '.join(BACKEND_NAMES)} (default: all available; the reference only on CPU)")
    add("--peers", type=_list(str), default=None,
        help="peers: sdpa (every SDPA backend), sdpa:flash, sdpa:cudnn, sdpa:efficient, sdpa:math, flex, eager "
             "(the stats case's materialized attention matrix), none "
             "(default: sdpa,flex on GPU; sdpa on CPU; and eager when stats is among the patterns)")
    add("--modes", type=_list(str), default=None, help="fwd, bwd, fwd+bwd (default: all)")
    add("--peak", action="store_true", help="measure matmul TFLOP/s and copy bandwidth first (the %%peak column)")
    add("--no-validate", dest="validate", action="store_false",
        help="skip the validation against the reference (default: validate)")
    add("--out", type=Path, default=None,
        help="folder for the JSON and plots (default: bench/results/ in a checkout, else ./flashlite-bench-results)")
    add("--json", type=Path, default=None, help="path of the JSON report (default: OUT/<date>-<device>.json)")
    add("--no-plot", dest="plot", action="store_false", help="no PNG plots (default: write them)")
    add("--target-ms", type=float, default=None,
        help="least time spent in timed calls per implementation and row (default: 100, 60 in cpu-quick)")
    add("--ci-pct", type=float, default=3.0,
        help="repeat until the median's 95%% confidence interval is within +-this %% (default: %(default)s)")
    add("--max-ms", type=float, default=None,
        help="time cap per implementation, row and attempt; a row still outside --ci-pct is re-measured once, "
             "then flagged noisy (default: 10x --target-ms)")
    add("--budget", type=float, default=None,
        help="stop timing after this many seconds, the rows left marked skipped (default: no limit)")
    add("--max-mask-mib", type=float, default=2048, help="largest dense mask a peer may build (default: %(default)s)")
    add("--flex-all", action="store_true",
        help="run FlexAttention on every case (default: the base line and extra cases only; each shape compiles)")
    add("--no-extras", dest="extras", action="store_false",
        help="leave out the profile's extra goal cases (default: run them, unless --seqlens is given)")
    add("--threads", type=_positive_int, default=None, help="torch.set_num_threads on CPU (default: torch's)")
    add("--seed", type=int, default=None, help="seed of the validation inputs (default: fresh)")
    add("--list", action="store_true", help="print the cases and implementations, run nothing")
    add("--quiet", action="store_true", help="no progress line")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Progress line (stderr; no dependency)
# ---------------------------------------------------------------------------------------------
class Progress:
    def __init__(self, enabled: bool = True, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.monotonic()
        self._last_plain = ""

    def line(self, text: str, key: Optional[str] = None) -> None:
        """On a terminal: rewrite one status line. Elsewhere: print when ``key`` changes."""
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        if self.tty:
            self.stream.write("\r\033[K" + f"[{elapsed:6.1f}s] {text}"[:150])
            self.stream.flush()
        elif (key or text) != self._last_plain:
            self._last_plain = key or text
            self.stream.write(f"[{elapsed:6.1f}s] {text}\n")
            self.stream.flush()

    def bar(self, done: int, total: int, text: str, key: Optional[str] = None) -> None:
        width = 20
        filled = int(width * done / max(1, total))
        self.line(f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {text}", key)

    def done(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------
def resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("flashlite bench: --device cuda but torch sees no CUDA device")
    if device.type not in ("cuda", "cpu"):
        raise SystemExit(f"flashlite bench: --device must be cuda or cpu, got {name!r}")
    return device


def make_sweep(opts: argparse.Namespace, device: torch.device) -> tuple:
    profile = opts.profile or (("gpu" if device.type == "cuda" else "cpu") + ("-quick" if opts.quick else ""))
    sweep = C.profile_sweep(profile, opts.patterns or C.DEFAULT_PATTERNS)
    for field, attr in (("seqlens", "seqlens"), ("head_dims", "head_dims"), ("dtypes", "dtypes"),
                        ("batch_heads", "batch_heads"), ("window", "window"), ("densities", "densities"),
                        ("block_size", "block_size"), ("topk", "topk")):
        value = getattr(opts, attr)
        if value is not None:
            setattr(sweep, field, value)
    sweep.grid = bool(opts.grid)
    if opts.seqlens is not None or not opts.extras:
        sweep.extras = []
    return profile, sweep


def choose_backends(opts: argparse.Namespace, device: torch.device) -> tuple:
    """(backends to validate, backends to time, {left-out backend: reason})."""
    import flashlite

    report = flashlite.backends()
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    left_out: Dict[str, str] = {}
    if opts.backends:
        unknown = [b for b in opts.backends if b not in BACKEND_NAMES]
        if unknown:
            raise SystemExit(f"flashlite bench: --backends must be among {', '.join(BACKEND_NAMES)}; got {unknown}")
        wanted = list(dict.fromkeys(opts.backends))
    else:
        wanted = [b for b in BACKEND_NAMES if report.get(b) == "available"]
        kernels = [b for b in wanted if b in (("cuda", "triton") if device.type == "cuda" else ("cpu",))]
        if kernels and "reference" in wanted:
            wanted.remove("reference")
            left_out["reference"] = (f"the oracle (O(N^2) memory) is not timed when a kernel backend ({', '.join(kernels)}) "
                                     f"serves the device; name it in --backends to time it")
    for name in list(wanted):
        if report.get(name) != "available":
            left_out[name] = report.get(name) or "unknown backend"
            wanted.remove(name)
    validated = list(wanted)
    timed = list(wanted)
    if device.type == "cpu" and "triton" in wanted:
        timed.remove("triton")
        left_out["triton"] = ("not timed on CPU: Triton runs on CPU tensors only in its interpreter (TRITON_INTERPRET=1), "
                              "far too slow to time" + ("; validated on a tiny shape" if interpreted else
                                                        "; not validated either (TRITON_INTERPRET is not set)"))
        if not interpreted:
            validated.remove("triton")
    if device.type == "cuda" and "cpu" in wanted:
        validated.remove("cpu")
        timed.remove("cpu")
        left_out["cpu"] = "runs on CPU tensors; run flashlite bench --device cpu"
    return validated, timed, left_out


# ---------------------------------------------------------------------------------------------
# Measuring one row
# ---------------------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _attempt(fn: Callable[[], object]) -> object:
    """Run once; turn "cannot run" errors (unsupported, OOM) into Skip."""
    try:
        return fn()
    except Skip:
        raise
    except (RuntimeError, ValueError, NotImplementedError, TypeError) as exc:
        if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
            raise Skip("out of memory") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Skip(f"{type(exc).__name__}: {first}") from None


def make_calls(impl: Impl, forward, inputs: list, mode: str, timer: Timer, case: Optional[Case] = None,
               data=None) -> tuple:
    """The zero-argument calls to time, one per rotated input set, and the seconds the first
    (untimed) call took — compilation included. ``fwd`` runs under ``no_grad``; ``bwd`` times
    ``autograd.grad`` of a forward made beforehand; ``fwd+bwd`` times both. Raises Skip."""
    start = time.perf_counter()
    # the implementation's own form of each input set (e.g. padded or split), made untimed
    inputs = [impl.adapt(case, data, *triple) for triple in inputs] if data is not None else inputs
    if mode == "fwd":
        def make_call(tensors):
            def call():
                with torch.no_grad():
                    return forward(*tensors)
            return call

        with torch.no_grad():
            impl.check(forward, *inputs[0])
        return [make_call(tensors) for tensors in inputs], time.perf_counter() - start
    calls = []
    first_s = 0.0
    for index, triple in enumerate(inputs):
        leaves = [t.detach().requires_grad_(True) for t in triple]
        if index == 0:  # the first forward: compiles, or says it cannot run
            holder: Dict[str, object] = {}

            def first_forward(*tensors):
                holder["out"] = forward(*tensors)
                return holder["out"]

            impl.check(first_forward, *leaves)
            out = holder["out"]
        else:
            out = forward(*leaves)
        # a forward may return a list of outputs (one per sequence): one gradient each
        out = list(out) if isinstance(out, (list, tuple)) else out
        grad_out = [torch.randn_like(o) for o in out] if isinstance(out, list) else torch.randn_like(out)
        if mode == "bwd":
            def call(out=out, leaves=leaves, grad_out=grad_out):
                return torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
        else:
            def call(leaves=leaves, grad_out=grad_out):
                return torch.autograd.grad(forward(*leaves), leaves, grad_out)
        if index == 0:
            _attempt(call)  # the first backward: compiles, or says it cannot run
            timer.sync()
            first_s = time.perf_counter() - start
        calls.append(call)
    return calls, first_s


def measure(impl: Impl, forward, case: Case, inputs: list, mode: str, timer: Timer, warmup: int,
            data=None) -> dict:
    """Time ``impl`` on ``case`` in ``mode`` alone; returns the measured fields of the row."""
    calls, first_s = make_calls(impl, forward, inputs, mode, timer, case, data)
    return {**measured(timer, calls, _attempt(lambda: timer.time(calls, warmup=warmup))), "first_call_s": first_s}


def measured(timer: Timer, calls: list, stats) -> dict:
    """The measured fields of a row from its stats (and, on a GPU, one more call's peak memory)."""
    peak = _attempt(lambda: timer.peak_memory(calls[0]))
    return {"time_ms": stats.median_ms, "stats": stats.to_json(), "noisy": stats.noisy, "peak_mem_bytes": peak}


def cpu_peak(call: Callable[[], object]) -> dict:
    """A CPU row's peak memory (one more call under the PyTorch profiler's allocation trace)."""
    try:
        return {"peak_mem_bytes": cpu_peak_bytes(call), "peak_mem_method": "torch.profiler (CPU allocations)"}
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - the time stands without it
        return {"peak_mem_bytes": None, "peak_mem_method": f"failed: {_first_line(exc)}"}


def time_group(timer: Timer, calls_of: Dict[str, list], warmup: int) -> Dict[str, object]:
    """Each implementation's stats (or the exception that stopped it), timed interleaved with
    the others; if the group fails as a whole, each member is timed alone to find which fails."""
    try:
        stats = _attempt(lambda: timer.time_interleaved(calls_of, warmup=warmup))
        return dict(stats)  # type: ignore[call-overload]
    except KeyboardInterrupt:
        raise
    except Exception:  # noqa: BLE001 - one member failed: find which
        pass
    out: Dict[str, object] = {}
    for name, calls in calls_of.items():
        try:
            out[name] = _attempt(lambda calls=calls: timer.time(calls, warmup=warmup))
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001
            out[name] = exc
    return out


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What a run will do, decided from the options and the machine."""

    device: torch.device
    profile: str
    sweep: C.Sweep
    modes: List[str]
    validated: List[str]  # flashlite backends validated
    impls: List[Impl]  # what is timed: flashlite backends, then peers
    cases: List[Case]
    left_out: Dict[str, str]  # backend or peer -> why it is not timed


def setup(opts: argparse.Namespace) -> Plan:
    device = resolve_device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    profile, sweep = make_sweep(opts, device)
    modes = opts.modes or list(C.MODES)
    bad_modes = [m for m in modes if m not in C.MODES]
    if bad_modes:
        raise SystemExit(f"flashlite bench: --modes must be among {', '.join(C.MODES)}; got {bad_modes}")
    validated, timed, left_out = choose_backends(opts, device)
    quick = profile.endswith("-quick")
    default_peers = ["sdpa", "flex"] if device.type == "cuda" and not quick else ["sdpa"]
    stats = "stats" in sweep.patterns
    if stats:
        default_peers.append("eager")  # the output_attentions path the stats case is compared with
    try:
        peer_names = parse_peers(opts.peers or default_peers)
    except ValueError as exc:
        raise SystemExit(f"flashlite bench: --peers: {exc}") from None
    peers, peers_left_out = make_peers(peer_names, device, C.DTYPE_NAMES[sweep.dtypes[0]],
                                       int(opts.max_mask_mib * 2**20))
    if device.type == "cuda" and "flex" not in peer_names and quick and not opts.peers:
        peers_left_out["flex"] = ("left out of a quick run: FlexAttention compiles each shape (tens of seconds); "
                                  "pass --peers sdpa,flex to include it")
    elif device.type == "cpu" and "flex" not in peer_names:
        peers_left_out["flex"] = ("not run on CPU by default: FlexAttention has no backward on CPU and its forward "
                                  "compiles with inductor (~20 s at first, ~1 s per further shape); "
                                  "pass --peers sdpa,flex to include it")
    impls: List[Impl] = [FlashliteImpl(b) for b in timed]
    if stats:  # head statistics: whichever backend serves them, then the plain forward of each backend
        fallback = stats_fallback(timed, left_out)
        if fallback:
            impls.append(fallback)
    if stats or "paged" in sweep.patterns:  # the plain forward (stats) / the contiguous cache (paged)
        impls += [PlainImpl(b) for b in timed]
    impls += peers
    if "varlen" in sweep.patterns and "none" not in [p.strip().lower() for p in (opts.peers or [])]:
        impls += [PerSequenceImpl(b) for b in timed]  # varlen: the sum of per-sequence calls
    return Plan(device, profile, sweep, modes, validated, impls, C.make_cases(sweep), {**left_out, **peers_left_out})


def stats_fallback(timed: List[str], left_out: Dict[str, str]) -> Optional[Impl]:
    """The stats case on a device whose timed kernel backends have no head statistics: automatic
    selection falls back to the reference backend, so that is what is timed (stats cases only),
    unless it is timed anyway. Updates ``left_out``'s word on the reference."""
    import flashlite
    from flashlite import backend

    if "reference" in timed or flashlite.backends().get("reference") != "available":
        return None
    if any(getattr(backend.get(name), "stats", False) for name in timed):
        return None
    why = (f"automatic selection's fallback: {', '.join(timed) or 'no timed kernel backend'} "
           f"{'has' if len(timed) == 1 else 'have'} no head statistics in {'its' if len(timed) == 1 else 'their'} "
           f"kernels")
    left_out["reference"] = f"timed on the stats case only ({why})"
    return FlashliteImpl("reference", stats_only=why)


def run(opts: argparse.Namespace, progress: Optional[Progress] = None, out=None) -> Dict[str, object]:
    """Validate, time, report. Returns the report (also written as JSON unless ``--list``)."""
    import flashlite
    from . import validate as V

    out = out or sys.stdout
    progress = progress or Progress(enabled=not opts.quiet)
    started = time.monotonic()
    plan = setup(opts)
    device, profile, sweep, modes = plan.device, plan.profile, plan.sweep, plan.modes
    validated, impls, case_list = plan.validated, plan.impls, plan.cases
    target_s = (opts.target_ms / 1e3 if opts.target_ms else
                (0.1 if device.type == "cuda" else (0.06 if profile == "cpu-quick" else 0.1)))
    warmup = 3 if device.type == "cuda" else 1
    timer = Timer(device, target_s=target_s, rel_ci=opts.ci_pct / 100,
                  max_s=opts.max_ms / 1e3 if opts.max_ms else None)

    env = environment(device)
    report: Dict[str, object] = {
        "schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command_line(),
        "profile": profile,
        "config": {"patterns": sweep.patterns, "seqlens": sweep.seqlens, "head_dims": sweep.head_dims,
                   "dtypes": sweep.dtypes, "batch_heads": [list(bh) for bh in sweep.batch_heads],
                   "window": sweep.window, "densities": sweep.densities, "block_size": sweep.block_size,
                   "topk": sweep.topk, "grid": sweep.grid, "modes": modes, "target_ms": target_s * 1e3,
                   "ci_pct": 100 * timer.rel_ci, "max_ms": timer.max_s * 1e3, "warmup": warmup, "budget_s": opts.budget, "max_mask_mib": opts.max_mask_mib},
        "environment": env, "backends": flashlite.backends(),
        "timed": [i.name for i in impls], "validated_backends": validated,
        "left_out": plan.left_out,
        "timing_protocol": ("GPU: CUDA events around each call, L2 flushed between calls and inputs rotated over "
                            "copies exceeding 2x L2, median, one implementation at a time; CPU: wall-clock median, "
                            "inputs rotated beyond the LLC, flashlite and its peers timed interleaved. Both: "
                            + timer.describe()),
        "flop_rule": "4*D*sum(keys visited per query) forward, backward 2.5x, fwd+bwd 3.5x",
        "peak": None, "validation": {"ran": False}, "results": [], "noisy": [], "plots": [], "interrupted": False,
    }

    print(f"flashlite bench — {env['device_name']} ({device}), profile {profile}, torch {env['torch']}, "
          f"triton {env['triton']}, commit {(env['git_commit'] or 'unknown')[:10]}"
          + (f", {env['torch_threads']} threads" if device.type == "cpu" else ""), file=out)
    warning = busy_warning(env, timer)
    if warning:
        print("  " + warning, file=out)
    print(f"  timing: {', '.join(i.name for i in impls) or 'nothing'}", file=out)
    for name, reason in report["left_out"].items():  # type: ignore[union-attr]
        print(f"  not timed: {name}: {reason}", file=out)
    print(f"  cases: {len(case_list)} ({', '.join(sweep.patterns)}; seqlens {sweep.seqlens}; head dims "
          f"{sweep.head_dims}; dtypes {sweep.dtypes}; batch x heads {['%dx%d' % bh for bh in sweep.batch_heads]})",
          file=out)
    if opts.list:
        for case in case_list:
            print(f"    {case.id}  modes {','.join(m for m in case.modes if m in modes)}", file=out)
        return report

    out_dir = Path(opts.out) if opts.out else default_results_dir()
    json_path = Path(opts.json) if opts.json else out_dir / f"{stamp()}-{slug(str(env['device_name']))}.json"
    report["json"] = str(json_path)

    # (a) validation
    if opts.validate:
        plans, skipped = V.plan_for(validated, device, sweep.dtypes, sweep.head_dims,
                                    os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
        patterns = [p if p != "decode" else "full" for p in sweep.patterns]
        result = V.validate(plans, device, dict.fromkeys(patterns), seed=opts.seed,
                            progress=lambda text: progress.line(text, key="validate"))
        result["left_out"] = skipped
        report["validation"] = result
        progress.done()
        counts = result["counts"]
        print(f"  validation against the reference (seed {result['seed']}): {counts['pass']} passed, "
              f"{counts['fail']} failed, {counts['skip']} skipped"
              f" — backends {', '.join(p.backend for p in plans) or 'none'}", file=out)
        for check in result["checks"]:
            if check["status"] == "skip":
                print(f"    skip {check['backend']} {check['pattern']} {check['dtype']}: {check['reason']}", file=out)
                break  # one example; all are in the JSON
        if not result["passed"]:
            print("\nVALIDATION FAILED — nothing timed. Failing checks:", file=out)
            for line in result["failures"]:
                print("  " + line, file=out)
            report["elapsed_s"] = time.monotonic() - started
            write_json(report, json_path)
            print(f"\nreport: {json_path}", file=out)
            return report

    # peak
    if opts.peak:
        progress.line("measuring the peaks (FMA loop, stream copy, matmul, copy)" if device.type == "cpu"
                      else "measuring matmul TFLOP/s and copy bandwidth")
        report["peak"] = measure_peak(device, sweep.dtypes)
        progress.done()
        for line in peak_lines(report["peak"]):  # type: ignore[arg-type]
            print("  " + line, file=out)

    # (b, c) timing
    rows: List[Dict[str, object]] = report["results"]  # type: ignore[assignment]
    total = sum(len([m for m in case.modes if m in modes]) for case in case_list) * len(impls)
    done = 0
    budget_hit = False
    extras = set(C.make_extra_cases(sweep))
    # Implementations with a long first call (FlexAttention compiles each shape) run in a second
    # pass over the cases, so a time budget cuts them first, not the other rows.
    phases = [p for p in ([i for i in impls if not i.deferred], [i for i in impls if i.deferred]) if p]
    try:
        for phase, phase_impls in enumerate(phases):
            for case_index, case in enumerate(case_list):
                case_modes = [m for m in case.modes if m in modes]
                base = case.to_json()
                common = {"case": case.id, "label": case.label, "pattern": case.pattern, "params": base["params"],
                          "shape": base["shape"], "dtype": case.dtype, "memory_bound": case.memory_bound,
                          "base_point": C.is_base_point(case, sweep) and case not in extras,
                          "extra": case in extras}
                if case.pattern == "stats":
                    common["stats_memory"] = C.stats_memory(case)

                def skip_all(impls_: Sequence[Impl], status: str, reason: str) -> None:
                    nonlocal done
                    for impl_ in impls_:
                        for mode_ in case_modes:
                            done += 1
                            rows.append({**common, "mode": mode_, "impl": impl_.name, "kind": impl_.kind,
                                         "status": status, "reason": reason, "note": None, "flops": None,
                                         "bytes": None})

                # rows decided before any input is built: the time budget, Flex off the base line
                if opts.budget is not None and time.monotonic() - started > opts.budget:
                    budget_hit = True
                    skip_all(phase_impls, "skip", f"time budget of {opts.budget:.0f} s spent")
                    continue
                active = [i for i in phase_impls if not (i.deferred and not opts.flex_all
                                                         and not (common["base_point"] or common["extra"]))]
                skip_all([i for i in phase_impls if i not in active], "skip",
                         "runs on the base line and extra cases only (each shape compiles); --flex-all to include")
                if not active:
                    continue
                try:  # the case's pattern and inputs (a failure here, e.g. out of memory, skips the case)
                    data = C.make_pattern_data(case, device)
                    inputs = C.make_qkv(case, device, rotation_sets(C.qkv_bytes(case), device), seed=case_index)
                    work = {m: (case.flops(m, data), case.bytes(m, data)) for m in case_modes}
                except Exception as exc:  # noqa: BLE001
                    data = inputs = None
                    skip_all(active, "skip" if "out of memory" in str(exc).lower() else "error",
                             f"building the case's inputs failed: {_first_line(exc)}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                common["rotation_sets"] = len(inputs)
                prepared: Dict[tuple, object] = {}
                for mode in case_modes:
                    # every implementation's calls first, then all timed together: interleaved on a
                    # CPU (contention hits all alike); on a GPU one at a time (CUDA events are not
                    # disturbed by other processes, and holding every backward graph costs memory)
                    group_rows: Dict[str, Dict[str, object]] = {}
                    calls_of: Dict[str, list] = {}
                    for impl in active:
                        done += 1
                        row = {**common, "mode": mode, "impl": impl.name, "kind": impl.kind, "status": "ok",
                               "reason": None, "note": None, "flops": work[mode][0], "bytes": work[mode][1]}
                        rows.append(row)
                        progress.bar(done, total, f"{case.id} {mode} {impl.name}", key=f"{phase}:{case.id}")
                        if opts.budget is not None and time.monotonic() - started > opts.budget:
                            budget_hit = True
                            row.update(status="skip", reason=f"time budget of {opts.budget:.0f} s spent")
                            continue
                        grad = mode != "fwd"
                        try:
                            key = (impl.name, grad)
                            if key not in prepared:
                                try:
                                    impl.note = None
                                    prepared[key] = impl.prepare(case, data, device, grad)
                                except Skip as exc:
                                    prepared[key] = exc
                            if isinstance(prepared[key], Skip):
                                raise prepared[key]  # type: ignore[misc]
                            calls, first_s = make_calls(impl, prepared[key], inputs, mode, timer, case, data)
                            row["first_call_s"] = first_s
                            row["note"] = impl.note  # as it ran (a peer may have fallen back)
                            if device.type == "cpu":
                                row["threads"] = torch.get_num_threads()
                                calls_of[impl.name] = calls
                                group_rows[impl.name] = row
                            else:
                                stats = _attempt(lambda calls=calls: timer.time(calls, warmup=warmup))
                                row.update(measured(timer, calls, stats))
                                del calls
                                torch.cuda.empty_cache()
                        except Skip as exc:
                            row.update(status="skip", reason=str(exc))
                        except KeyboardInterrupt:
                            raise
                        except Exception as exc:  # noqa: BLE001 - one row's failure never ends the run
                            row.update(status="error", reason=_first_line(exc))
                    if calls_of:
                        progress.bar(done, total, f"{case.id} {mode}: timing {', '.join(calls_of)} interleaved",
                                     key=f"{phase}:{case.id}")
                        for name, result in time_group(timer, calls_of, warmup).items():
                            row = group_rows[name]
                            if isinstance(result, Skip):
                                row.update(status="skip", reason=str(result))
                            elif isinstance(result, BaseException):
                                row.update(status="error", reason=_first_line(result))
                            else:
                                row.update(measured(timer, calls_of[name], result))
                                if case.pattern == "stats":  # eager's matrix against the statistics
                                    row.update(cpu_peak(calls_of[name][0]))
                    del calls_of
                del data, inputs
                report["elapsed_s"] = time.monotonic() - started
                write_json(report, json_path)  # partial results survive an interruption
    except KeyboardInterrupt:
        report["interrupted"] = True
        print("\ninterrupted: reporting the rows measured so far", file=out)
        for row in rows:  # CPU rows wait for their group's interleaved timing: not timed, not ok
            if row["status"] == "ok" and "time_ms" not in row:
                row.update(status="skip", reason="interrupted before it was timed")
    progress.done()
    impl_order = {impl.name: i for i, impl in enumerate(impls)}
    case_order = {case.id: i for i, case in enumerate(case_list)}
    rows.sort(key=lambda r: (case_order[r["case"]], impl_order[r["impl"]], C.MODES.index(r["mode"])))

    # (d) table, (e) JSON + plots
    derive(rows, report["peak"])  # type: ignore[arg-type]
    print("", file=out)
    print(table(rows), file=out)
    print("", file=out)
    report["noisy"] = noisy_rows(rows)
    for line in noisy_lines(report["noisy"], timer):  # type: ignore[arg-type]
        print(line, file=out)
    for line in summary(rows):
        print(line, file=out)
    if "stats" in sweep.patterns:
        report["stats"] = stats_summary(rows)
        for line in stats_lines(report["stats"]):  # type: ignore[arg-type]
            print(line, file=out)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skip", "error")}
    print(f"rows: {counts['ok']} timed ({len(report['noisy'])} noisy), {counts['skip']} skipped, "  # type: ignore[arg-type]
          f"{counts['error']} errors"
          + (" (time budget reached)" if budget_hit else ""), file=out)
    if opts.plot and rows:
        from .plot import make_plots

        stem = out_dir / json_path.stem
        out_dir.mkdir(parents=True, exist_ok=True)
        subtitle = (f"{env['device_name']}, {sweep.dtypes[0]}, d={sweep.head_dims[0]}, "
                    f"B x H = {sweep.batch_heads[0][0]}x{sweep.batch_heads[0][1]}")
        try:
            report["plots"] = make_plots(rows, stem, subtitle, measure_memory=device.type == "cuda")
        except ImportError as exc:
            report["plots_error"] = f"matplotlib is needed for plots ({exc}); pip install flashlite[bench]"
            print(report["plots_error"], file=out)
    report["elapsed_s"] = time.monotonic() - started
    write_json(report, json_path)
    print(f"report: {json_path}", file=out)
    for figure in report["plots"]:  # type: ignore[union-attr]
        print(f"plot:   {out_dir / figure['file']}", file=out)
    print(f"elapsed: {report['elapsed_s']:.1f} s", file=out)
    return report


def _terminate(signum, frame):  # SIGTERM (e.g. from `timeout`): report what was measured, then stop
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None, prog: str = "flashlite bench") -> int:
    opts = build_parser(prog).parse_args(argv)
    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread
        pass
    report = run(opts)
    validation = report.get("validation") or {}
    if validation.get("ran") and not validation.get("passed"):
        return 2
    if report.get("interrupted"):
        return 130
    return 0
