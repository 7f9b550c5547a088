"""`flashlite bench` and its parts: a tiny CPU run end to end (validation, table, JSON schema,
PNG plots with the expected series, PyTorch SDPA rows measured in the same run), the useful-work
counts against the patterns' own key counts, the stop on a failed validation, the console
scripts, the pytest-benchmark suite and bench/gpu_suite.sh's dry run."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flashlite
from flashlite.bench import cases as C
from flashlite.bench import runner
from flashlite.bench.report import SCHEMA

REPO = Path(__file__).resolve().parent.parent
PATTERNS = "full,causal,window,block_sparse,topk,decode"
SEQLENS = [64, 96]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# the flashlite backend timed in the tiny run: the C++ CPU kernels if built, else the reference
BACKEND = "cpu" if flashlite.backends().get("cpu") == "available" else "reference"
IMPL = f"flashlite:{BACKEND}"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny CPU run through the command-line entry, shared by the checks below."""
    out_dir = tmp_path_factory.mktemp("bench")
    argv = ["--quick", "--device", "cpu", "--patterns", PATTERNS, "--seqlens", ",".join(map(str, SEQLENS)),
            "--backends", BACKEND, "--peers", "sdpa", "--target-ms", "3", "--window", "24", "--topk", "16",
            "--block-size", "32", "--densities", "0.5", "--max-mask-mib", "0.03", "--out", str(out_dir),
            "--json", str(out_dir / "run.json"), "--quiet"]
    stdout = io.StringIO()
    report = runner.run(runner.parse_args(argv), out=stdout)
    return report, json.loads((out_dir / "run.json").read_text()), stdout.getvalue(), out_dir


def test_json_schema(tiny_run):
    report, data, _, _ = tiny_run
    assert data["schema"] == SCHEMA
    for key in ("created", "command", "profile", "config", "environment", "backends", "timed", "left_out",
                "validation", "results", "noisy", "plots", "elapsed_s", "peak", "interrupted"):
        assert key in data, key
    env = data["environment"]
    for key in ("device_type", "device_name", "torch", "triton", "git_commit", "torch_threads", "cpu_count"):
        assert key in env, key
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__
    assert env["torch_threads"] == torch.get_num_threads()
    assert data["interrupted"] is False
    validation = data["validation"]
    assert validation["ran"] and validation["passed"] and validation["counts"]["fail"] == 0
    assert validation["counts"]["pass"] >= 5 * len(data["validated_backends"])
    assert {c["pattern"] for c in validation["checks"]} == {"full", "causal", "window", "block_sparse", "topk"}
    assert all(set(c["tensors"]) == {"out", "lse", "dq", "dk", "dv"} for c in validation["checks"]
               if c["status"] == "pass")

    rows = data["results"]
    assert rows
    row_keys = {"case", "label", "pattern", "params", "shape", "dtype", "mode", "impl", "kind", "status", "reason",
                "flops", "bytes", "memory_bound", "base_point"}
    for row in rows:
        assert row_keys <= set(row), row_keys - set(row)
        assert row["status"] in ("ok", "skip", "error"), row
        assert row["status"] != "error", row
        assert set(row["shape"]) == {"batch", "heads_q", "heads_kv", "seqlen_q", "seqlen_k", "head_dim"}
        if row["status"] == "ok":
            assert row["time_ms"] > 0 and row["stats"]["reps"] >= 3
            assert row["stats"]["min_ms"] <= row["time_ms"] <= max(row["stats"]["p80_ms"], row["time_ms"])
            assert row["tflops"] == pytest.approx(row["flops"] / (row["time_ms"] * 1e-3) / 1e12)
            assert (row["gbps"] is not None) == row["memory_bound"]
            assert row["threads"] == torch.get_num_threads()
            # the median's interval and the noisy flag (tests/test_timer.py checks the rule itself)
            stats = row["stats"]
            assert stats["ci_low_ms"] <= row["time_ms"] <= stats["ci_high_ms"] and stats["attempts"] in (1, 2)
            assert row["noisy"] == stats["noisy"] == (stats["ci_pct"] > stats["target_ci_pct"])
        else:
            assert row["reason"]
    listed = {(n["case"], n["mode"], n["impl"]) for n in data["noisy"]}
    assert listed == {(r["case"], r["mode"], r["impl"]) for r in rows if r["status"] == "ok" and r["noisy"]}
    assert data["config"]["ci_pct"] == 3.0 and data["config"]["max_ms"] == pytest.approx(30.0)
    # every case x timed implementation x mode has a row (timed or skipped with its reason)
    cases = {r["case"] for r in rows}
    assert len(cases) == 6 * len(SEQLENS)
    for case in cases:
        modes = {"fwd"} if case.startswith("decode") else {"fwd", "bwd", "fwd+bwd"}
        for impl in data["timed"]:
            assert {r["mode"] for r in rows if r["case"] == case and r["impl"] == impl} == modes, (case, impl)


def test_flashlite_rows_and_triton_excluded(tiny_run):
    _, data, stdout, _ = tiny_run
    rows = data["results"]
    timed = [r for r in rows if r["impl"] == IMPL and r["status"] == "ok"]
    assert {r["pattern"] for r in timed} == set(C.PATTERNS)
    assert "flashlite:triton" not in data["timed"]  # the interpreter is never timed on CPU
    assert "time ms" in stdout and IMPL in stdout and "sdpa:math" in stdout
    assert ("noisy:" in stdout) == bool(data["noisy"])  # the noisy rows are listed under the table


def test_sdpa_peers_measured_in_the_same_run(tiny_run):
    _, data, _, _ = tiny_run
    rows = data["results"]
    sdpa = [r for r in rows if r["impl"].startswith("sdpa:") and r["status"] == "ok"]
    assert {"sdpa:math", "sdpa:flash"} <= {r["impl"] for r in sdpa}
    assert {r["pattern"] for r in sdpa} >= {"full", "causal", "decode"}
    assert all(r["time_ms"] > 0 and r["stats"]["reps"] >= 3 and r["kind"] == "peer" for r in sdpa)
    # the ratio column is computed from these very rows
    for row in rows:
        if row["kind"] == "flashlite" and row["status"] == "ok":
            peers = [r["time_ms"] for r in sdpa if r["case"] == row["case"] and r["mode"] == row["mode"]]
            if peers:
                assert row["best_peer_ms"] == min(peers)
                assert row["speedup_vs_best_peer"] == pytest.approx(min(peers) / row["time_ms"])
    # a dense mask over --max-mask-mib: the peer row is skipped with the reason, the run goes on
    skipped = [r for r in rows if r["impl"].startswith("sdpa:") and r["status"] == "skip"]
    assert skipped and all("dense mask" in r["reason"] for r in skipped)
    assert {r["pattern"] for r in skipped} <= {"window", "block_sparse", "topk"}


def test_png_plots_are_images_with_the_expected_series(tiny_run):
    matplotlib = pytest.importorskip("matplotlib", reason="plots need the bench extra (matplotlib)")

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    _, data, _, out_dir = tiny_run
    figures = {f["figure"]: f for f in data["plots"]}
    assert set(figures) == {"time", "speedup", "decode"}  # no memory figure on CPU; decode apart
    rows = data["results"]
    for figure in figures.values():
        path = out_dir / figure["file"]
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = plt.imread(path)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 800
        assert image.shape[1] <= 1500  # readable at screen size without shrinking the text
        assert float(image[..., :3].std()) > 0.01  # not a blank canvas
    time_panels = {(p["title"], p["mode"]): p for p in figures["time"]["panels"]}
    labels = {r["label"] for r in rows}
    prefill = labels - {"decode"}
    assert {p["title"] for p in figures["time"]["panels"]} == prefill | {"flashlite, all patterns"}
    for label in prefill:
        for mode in ("fwd", "bwd", "fwd+bwd"):  # a backward panel beside forward and forward+backward
            panel = time_panels[(label, mode)]
            names = {s["label"] for s in panel["series"]}
            assert IMPL in names, (label, mode, names)
            for series in panel["series"]:
                assert series["x"] == sorted(series["x"])
                for x, y in zip(series["x"], series["y"]):
                    match = [r["time_ms"] for r in rows if r["label"] == label and r["mode"] == mode
                             and r["impl"] == series["label"] and r["shape"]["seqlen_k"] == x]
                    assert match == [y]
        assert "sdpa:math" in {s["label"] for s in time_panels[(label, "fwd")]["series"]}
        full_series = {s["label"]: s for s in time_panels[(label, "fwd")]["series"]}[IMPL]
        assert full_series["x"] == SEQLENS
    overview = time_panels[("flashlite, all patterns", "fwd")]
    assert {s["label"] for s in overview["series"]} == prefill
    speedup_names = {s["label"] for p in figures["speedup"]["panels"] for s in p["series"]}
    assert speedup_names == {IMPL}
    assert {p["mode"] for p in figures["speedup"]["panels"]} == {"fwd", "bwd", "fwd+bwd"}
    decode = {p["row"]: p for p in figures["decode"]["panels"]}
    assert {s["label"] for s in decode["time"]["series"]} >= {IMPL, "sdpa:math"}
    assert [s["label"] for s in decode["speedup"]["series"]] == [IMPL]


@pytest.mark.parametrize("pattern", ["full", "causal", "window", "block_sparse", "topk", "decode"])
def test_useful_flops_match_the_patterns_key_counts(pattern):
    sweep = C.Sweep(patterns=[pattern], seqlens=[100], head_dims=[40], dtypes=["float32"], batch_heads=[(2, 4)],
                    window=17, densities=[0.3], block_size=16, topk=9)
    for case in C.make_cases(sweep):
        data = C.make_pattern_data(case, "cpu")
        s = case.shape
        # the reference's own mask, broadcast to every batch row and query head
        mask = data.pattern.dense_mask(s.batch, s.heads_q, s.heads_kv, s.seqlen_q, s.seqlen_k, "cpu")
        want = int(mask.expand(s.batch, s.heads_q, s.seqlen_q, s.seqlen_k).sum())
        assert case.visited_keys(data) == want
        assert case.flops("fwd", data) == 4 * s.head_dim * want
        assert case.flops("bwd", data) == 2.5 * case.flops("fwd", data)
        assert case.flops("fwd+bwd", data) == 3.5 * case.flops("fwd", data)
    if pattern == "full":
        case = C.make_cases(sweep)[0]
        assert case.flops("fwd") == 4 * 2 * 4 * 100 * 100 * 40
    if pattern == "causal":
        assert C.make_cases(sweep)[0].flops("fwd") == 4 * 2 * 4 * (100 * 101 // 2) * 40


def test_failed_validation_stops_before_timing(tmp_path, monkeypatch):
    real = flashlite.attention

    def wrong(q, k, v, pattern=None, **kw):  # a "kernel" off by 1e-2
        result = real(q, k, v, pattern, **kw)
        if isinstance(result, tuple):
            return (result[0] + 1e-2, *result[1:])
        return result + 1e-2

    monkeypatch.setattr(flashlite, "attention", wrong)
    out = io.StringIO()
    argv = ["--quick", "--device", "cpu", "--patterns", "full", "--seqlens", "64", "--backends", "reference",
            "--peers", "sdpa", "--out", str(tmp_path), "--json", str(tmp_path / "r.json"), "--quiet"]
    report = runner.run(runner.parse_args(argv), out=out)
    assert "VALIDATION FAILED" in out.getvalue()
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["validation"]["passed"] is False and data["validation"]["failures"]
    assert data["results"] == [] and report["results"] == []
    assert all(c["status"] == "fail" for c in data["validation"]["checks"])


def test_row_errors_and_unsupported_backends_never_crash(tmp_path):
    """A backend that cannot run a pattern gives skip rows with its reason."""
    from flashlite.bench.peers import FlashliteImpl

    case = C.make_cases(C.Sweep(patterns=["topk"], seqlens=[64], head_dims=[32], dtypes=["float32"],
                                batch_heads=[(1, 2)], window=8, densities=[0.5], block_size=16, topk=4))[0]
    data = C.make_pattern_data(case, "cpu")
    with pytest.raises(C.Skip, match=r"\S"):
        FlashliteImpl("cuda").prepare(case, data, torch.device("cpu"), grad=True)


def test_triton_on_cpu_is_validated_only_under_the_interpreter(monkeypatch):
    opts = runner.parse_args(["--device", "cpu", "--backends", "triton,reference"])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    validated, timed, left_out = runner.choose_backends(opts, torch.device("cpu"))
    assert "triton" in validated and "triton" not in timed and "interpreter" in left_out["triton"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    validated, timed, left_out = runner.choose_backends(opts, torch.device("cpu"))
    assert "triton" not in validated and "triton" not in timed and "not validated" in left_out["triton"]


def test_sweep_profiles_and_options():
    opts = runner.parse_args(["--device", "cpu", "--quick"])
    profile, sweep = runner.make_sweep(opts, torch.device("cpu"))
    assert profile == "cpu-quick"
    profile, sweep = runner.make_sweep(runner.parse_args(["--device", "cpu"]), torch.device("cpu"))
    assert profile == "cpu"
    cases = C.make_cases(sweep)
    # the base line runs at every length, the other head dims / dtypes / batch x heads at the pivot only
    base = [c for c in cases if C.is_base_point(c, sweep)]
    assert {c.shape.seqlen_k for c in base} == set(sweep.seqlens)
    others = [c for c in cases if not C.is_base_point(c, sweep)]
    assert others and {c.shape.seqlen_k for c in others} == {C.pivot(sweep.seqlens)}
    gpu = C.make_cases(C.profile_sweep("gpu"))
    assert any(c.pattern == "decode" and c.shape.heads_q == 8 * c.shape.heads_kv for c in gpu)
    assert any(c.pattern == "window" and c.shape.seqlen_k == 65536 for c in gpu)
    with pytest.raises(SystemExit):
        runner.parse_args(["--patterns", "nonsense"])
    with pytest.raises(SystemExit):
        runner.parse_args(["--dtypes", "int8"])
    assert runner.parse_args(["--densities", "10%,0.5"]).densities == [0.1, 0.5]
    assert runner.parse_args(["--batch-heads", "2x16"]).batch_heads == [(2, 16)]


def test_help_states_each_default_once(monkeypatch, capsys):
    """`flashlite bench --help`: every option's default appears once, in its own words; no
    "(default: None)" placeholders, and a --no-* switch never claims "(default: True)"."""
    monkeypatch.setenv("COLUMNS", "100")
    from flashlite import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: flashlite bench")
    blocks, current = {}, None  # option -> its help block (the option line and the lines under it)
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            blocks[current] = line
        elif current is not None:
            blocks[current] += " " + line.strip()
    assert {"--quick", "--no-validate", "--no-plot", "--no-extras", "--max-mask-mib", "--seed"} <= set(blocks)
    for option, block in blocks.items():
        assert block.count("(default:") <= 1, block
        assert "(default: None)" not in block and "(default: False)" not in block, block
        if option.startswith("--no-"):
            assert "(default: True)" not in block and "(default:" in block, block
    assert "(default: 2048)" in blocks["--max-mask-mib"]


def _env():
    """The environment of a child process: no backend override, and not an xdist worker (a child
    pytest that believes it is one disables pytest-benchmark)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.pop("FLASHLITE_BACKEND", None)
    return env


def test_console_scripts():
    exe = Path(sys.executable).parent / "flashlite"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "flashlite.cli"]
    info = subprocess.run([*command, "info", "--json"], capture_output=True, text=True, timeout=60, env=_env())
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["torch"] == torch.__version__ and set(data["backends"]) >= {"triton", "reference"}
    listing = subprocess.run([sys.executable, "-m", "flashlite.bench", "--list", "--quick", "--device", "cpu"],
                             capture_output=True, text=True, timeout=60, env=_env())
    assert listing.returncode == 0, listing.stderr
    assert "sdpa:math" in listing.stdout and "decode" in listing.stdout


def test_pytest_benchmark_suite_runs_the_same_cases(tmp_path):
    env = _env()
    env["FLASHLITE_BENCH_ARGS"] = "--quick --device cpu --patterns full --seqlens 64 --modes fwd --backends reference"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(REPO / "bench"), "-q", "-p", "no:cacheprovider", "--benchmark-only",
         "--benchmark-max-time=0.01", "--benchmark-min-rounds=2", f"--benchmark-json={tmp_path / 'b.json'}",
         "--rootdir", str(REPO)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    data = json.loads((tmp_path / "b.json").read_text())
    names = {b["name"] for b in data["benchmarks"]}
    assert "test_attention[full-1x4-64x64-d64-fp32-flashlite:reference-fwd]" in names
    assert any("sdpa:math" in n for n in names)
    assert all(b["extra_info"]["flops"] == 4 * 4 * 64 * 64 * 64 and b["extra_info"]["tflops"] > 0
               for b in data["benchmarks"])


def test_gpu_suite_dry_run(tmp_path):
    script = REPO / "bench" / "gpu_suite.sh"
    env = _env()
    env["OUT"] = str(tmp_path / "suite")
    result = subprocess.run(["bash", str(script), "--dry-run", "--patterns", "full"], capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    steps = [line.split("[")[1].split(",")[0] for line in lines]
    assert steps == ["install", "info", "aot", "sanitizer-racecheck", "sanitizer-synccheck", "tests", "bench"]
    assert "pip install --no-build-isolation --no-deps -e ." in lines[0]
    assert "sm90 or budget" in lines[2]  # what only a compiler shows, before anything runs on the GPU
    assert "--tool racecheck" in lines[3] and "bench/gpu_smoke.py" in lines[3] and "--tool synccheck" in lines[4]
    assert "pytest tests -x -q" in lines[5]
    assert "-m flashlite.bench --profile gpu --peak --budget" in lines[6] and "--patterns full" in lines[6]
    assert all("timeout -k 20" in line for line in lines)
    limits = [int(line.split("at most ")[1].split("s]")[0]) for line in lines]
    assert sum(limits) <= 600
    assert not (tmp_path / "suite").exists()  # a dry run creates nothing
    env["FLASHLITE_SANITIZER"] = "1"
    result = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, timeout=60, env=env)
    assert "--tool memcheck" in result.stdout


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_gpu_suite_is_shellcheck_clean():
    result = subprocess.run(["shellcheck", str(REPO / "bench" / "gpu_suite.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_cpu_peak_is_the_processors_fma_limit_and_copy():
    """--peak on a CPU: the FMA loop of every kernel build and the stream copy from flashlite._C,
    and %peak divides by them (torch's matmul kept beside as pct_matmul)."""
    from flashlite.bench.report import derive, peak_lines
    from flashlite.bench.timing import measure_cpu_limits

    if BACKEND != "cpu":
        pytest.skip("flashlite._C is not built")
    from flashlite import _C

    if not hasattr(_C, "cpu_fma_peak"):
        pytest.skip("flashlite._C predates cpu_fma_peak: rebuild it")
    limits = measure_cpu_limits(seconds=0.05, threads=[1, 2], copy_bytes=2**24)
    assert limits["fma_isa"] == _C.cpu_isa() and set(limits["fma_gflops"]) == set(_C.cpu_isas())
    for isa, per in limits["fma"].items():
        assert set(per) == {"1", "2"}
        for threads, result in per.items():
            assert result["gflops"] > 0 and result["trials"] >= 3 and result["threads"] == int(threads)
            assert result["isa"] == isa and result["lanes"] in (4, 8, 16) and result["accumulators"] >= 8
    assert all(r["gbps"] > 0 and r["trials"] >= 3 for r in limits["stream_copy"].values())
    with pytest.raises(ValueError, match="nonsense"):
        _C.cpu_fma_peak(threads=1, seconds=0.0, isa="nonsense")

    peak = {"matmul_tflops": {"float32": 0.05}, "copy_gbps": 5.0, "threads": 1, **limits}
    peak["fma_gflops"][limits["fma_isa"]]["1"] = 100.0
    peak["stream_copy_gbps"]["1"] = 10.0
    rows = [{"case": "c", "mode": "fwd", "impl": "flashlite:cpu", "kind": "flashlite", "status": "ok", "dtype": "float32",
             "time_ms": 1.0, "flops": 5e7, "bytes": None, "memory_bound": False, "threads": 1},
            {"case": "d", "mode": "fwd", "impl": "flashlite:cpu", "kind": "flashlite", "status": "ok", "dtype": "float32",
             "time_ms": 1.0, "flops": 1e6, "bytes": 4e6, "memory_bound": True, "threads": 1}]
    derive(rows, peak)
    assert rows[0]["pct_peak"] == pytest.approx(50.0) and rows[0]["pct_matmul"] == pytest.approx(100.0)
    assert rows[1]["pct_peak"] == pytest.approx(40.0)  # 4 GB/s of a 10 GB/s stream copy
    text = "\n".join(peak_lines(peak))
    assert "FMA loop" in text and "stream copy" in text and "torch matmul" in text


def test_interrupt_during_cpu_timing_reports_untimed_rows(tmp_path, monkeypatch):
    """Ctrl-C while a CPU group is being timed: the run reports what it has, and the rows waiting for
    that group's timing say so (they used to stay "ok" without a time and crash the report)."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "time_group", interrupted)
    argv = ["--quick", "--device", "cpu", "--patterns", "full", "--seqlens", "64", "--backends", BACKEND,
            "--peers", "sdpa", "--no-validate", "--out", str(tmp_path), "--json", str(tmp_path / "run.json"),
            "--quiet"]
    report = runner.run(runner.parse_args(argv), out=io.StringIO())
    assert report["interrupted"] is True
    rows = report["results"]
    assert rows and all(r["status"] == "skip" and r["reason"] == "interrupted before it was timed" for r in rows)


def test_stats_case_end_to_end(tmp_path, monkeypatch):
    """--patterns stats (issue 18): attention_stats on whichever backend serves head statistics,
    validated against the reference first, beside the plain forward on the same inputs and the
    eager peer; each row's ratio to the plain forward, and eager's matrix against the statistics."""
    from flashlite import backend as backends
    from flashlite.bench import validate as V

    monkeypatch.setattr(V, "SHAPES", ((1, 4, 2, 33, 33),))  # one small GQA shape keeps the test fast
    serving = IMPL if backends.get(BACKEND).stats else "flashlite:reference"  # else the automatic fallback
    argv = ["--quick", "--device", "cpu", "--patterns", "stats", "--seqlens", "48", "--backends", BACKEND,
            "--peers", "eager", "--target-ms", "1", "--max-ms", "4", "--seed", "0", "--no-plot",
            "--out", str(tmp_path), "--json", str(tmp_path / "run.json"), "--quiet"]
    stdout = io.StringIO()
    runner.run(runner.parse_args(argv), out=stdout)
    data = json.loads((tmp_path / "run.json").read_text())

    checks = [c for c in data["validation"]["checks"] if c["pattern"] == "stats"]
    assert data["validation"]["passed"] and checks
    for check in checks:
        if check["status"] == "pass":
            assert set(check["tensors"]) == {"out", "lse", "entropy", "max_prob", "mean_distance", "sink_mass", "keys",
                                             "dq", "dk", "dv"}
        else:
            assert serving != IMPL and "head statistics" in check["reason"]

    rows = data["results"]
    assert {r["pattern"] for r in rows} == {"stats"} and all(r["status"] != "error" for r in rows)
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}  # no separate backward
    memory = {"eager_matrix_bytes": 4 * 48 * 48 * 4, "stats_output_bytes": 6 * 4 * 48 * 4}
    for mode in ("fwd", "fwd+bwd"):
        by_impl = {r["impl"]: r for r in rows if r["mode"] == mode and r["status"] == "ok"}
        assert {serving, f"plain:{BACKEND}", "eager"} <= set(by_impl), (mode, set(by_impl))
        plain = by_impl[f"plain:{BACKEND}"]
        assert plain["vs_plain"] == 1.0
        for impl in (serving, "eager"):
            row = by_impl[impl]
            assert row["plain_impl"] == f"plain:{BACKEND}"
            assert row["vs_plain"] == pytest.approx(row["time_ms"] / plain["time_ms"])
            assert row["vs_plain_min"] == pytest.approx(row["stats"]["min_ms"] / plain["stats"]["min_ms"])
        for row in by_impl.values():
            assert row["stats_memory"] == memory and row["peak_mem_bytes"] > 0
        # eager holds P [B, H, N, N] (and its float32 softmax) during the call
        assert by_impl["eager"]["peak_mem_bytes"] >= memory["eager_matrix_bytes"]
    summary = {(e["case"], e["mode"]): e for e in data["stats"]}
    assert set(summary) == {("stats 1x4 48x48 d64 fp32", m) for m in ("fwd", "fwd+bwd")}
    for entry in summary.values():
        assert entry["eager_matrix_bytes"] == memory["eager_matrix_bytes"] and entry["goal_vs_plain"] == 1.15
        assert {r["impl"] for r in entry["rows"]} >= {serving, "eager"}
    text = stdout.getvalue()
    assert "vs plain" in text and "time over the plain forward" in text and "eager's P [1, 4, 48, 48]" in text


def test_stats_case_falls_back_to_the_reference_where_no_kernel_has_statistics(monkeypatch):
    """A CPU kernel backend without head statistics: the stats case times the reference (automatic
    selection's fallback) on stats cases only, says why, and the kernel's own stats row is skipped."""
    from flashlite import backend as backends
    from flashlite.bench.peers import EagerImpl, PlainImpl, SdpaImpl

    if BACKEND != "cpu":
        pytest.skip("flashlite._C is not built")
    monkeypatch.setattr(backends.get("cpu"), "stats", False)
    plan = runner.setup(runner.parse_args(["--device", "cpu", "--patterns", "stats,causal", "--backends", "cpu"]))
    names = [i.name for i in plan.impls]
    assert names[:3] == ["flashlite:cpu", "flashlite:reference", "plain:cpu"] and "eager" in names
    assert "stats case only" in plan.left_out["reference"]
    fallback = plan.impls[1]
    device = torch.device("cpu")
    stats_case = next(c for c in plan.cases if c.pattern == "stats")
    causal_case = next(c for c in plan.cases if c.pattern == "causal")
    data = C.make_pattern_data(stats_case, device)
    with pytest.raises(C.Skip, match="head statistics"):
        plan.impls[0].prepare(stats_case, data, device, grad=False)
    assert callable(fallback.prepare(stats_case, data, device, grad=False))
    for impl in (fallback, PlainImpl("cpu"), EagerImpl()):
        with pytest.raises(C.Skip, match=r"stats (case|and paged cases) only"):  # plain also times paged
            impl.prepare(causal_case, data, device, grad=False)
    with pytest.raises(C.Skip, match="eager"):
        SdpaImpl("math", 2**30).prepare(stats_case, data, device, grad=False)


def test_stats_validation_catches_a_wrong_statistic(monkeypatch):
    """The stats check holds each statistic to the rule: one off by 1e-2 fails, naming it."""
    from flashlite.bench import validate as V

    gen = torch.Generator().manual_seed(0)
    shape = (1, 2, 1, 40, 40, 32)
    assert V.check_stats_one(BACKEND, shape, "float32", torch.device("cpu"), gen).status == "pass"
    real = flashlite.attention_stats

    def wrong(*args, **kwargs):
        out, stats = real(*args, **kwargs)
        return out, stats._replace(mean_distance=stats.mean_distance + 1e-2)

    monkeypatch.setattr(flashlite, "attention_stats", wrong)
    check = V.check_stats_one(BACKEND, shape, "float32", torch.device("cpu"), gen)
    assert check.status == "fail" and not check.tensors["mean_distance"]["ok"]
    assert all(t["ok"] for name, t in check.tensors.items() if name != "mean_distance")


def test_paged_case_end_to_end(tmp_path):
    """--patterns paged (issue 17): paged_attention over a shuffled 16-key page pool made from the
    case's contiguous cache (the pool holds exactly its keys), beside plain:<backend> on the
    contiguous cache (the vs plain ratio) and SDPA."""
    from flashlite.bench.peers import paged_pool

    case = C.Case("paged", C.Shape(2, 8, 2, 1, 40, 16), "float32", (("page_size", 16),))
    data = C.make_pattern_data(case, "cpu")
    assert data.block_table.shape == (2, 3) and sorted(data.block_table.flatten().tolist()) == list(range(6))
    k = torch.randn(2, 2, 40, 16)
    pool = paged_pool(k, data.block_table, 16)
    for b in range(2):
        for j in range(40):
            assert torch.equal(pool[data.block_table[b, j // 16], j % 16], k[b, :, j])
    argv = ["--quick", "--device", "cpu", "--patterns", "paged", "--seqlens", "40", "--backends", BACKEND,
            "--peers", "sdpa", "--target-ms", "1", "--max-ms", "4", "--no-validate", "--no-plot",
            "--out", str(tmp_path), "--json", str(tmp_path / "run.json"), "--quiet"]
    runner.run(runner.parse_args(argv), out=io.StringIO())
    rows = json.loads((tmp_path / "run.json").read_text())["results"]
    ok = {r["impl"]: r for r in rows if r["status"] == "ok"}
    assert {r["pattern"] for r in rows} == {"paged"} and {r["mode"] for r in rows} == {"fwd"}
    assert {IMPL, f"plain:{BACKEND}"} <= set(ok) and any(name.startswith("sdpa:") for name in ok)
    assert ok[IMPL]["case"].startswith("paged(16) 1x4/1 1x40")
    assert ok[IMPL]["vs_plain"] == pytest.approx(ok[IMPL]["time_ms"] / ok[f"plain:{BACKEND}"]["time_ms"])
