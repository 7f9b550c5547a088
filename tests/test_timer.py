"""The benchmark timer for shared machines (bench/timing.py): interleaved rounds, repetitions until
the median's 95 % interval is within ±3 % or a time cap, noisy rows flagged and re-measured once.

Every test runs on a simulated clock, so nothing here depends on how busy the machine running it
is: a "call" advances the clock by the duration the test chooses. Contention is simulated the way
the scheduler applies it to a call sharing its core with a busy process (the hog): with a chosen
probability the call loses the core for part of a 4 ms quantum.
"""
from __future__ import annotations

import io
import random

import pytest

from flashlite.bench import report as R
from flashlite.bench import runner
from flashlite.bench.timing import Stats, Timer, _stats, median_ci


class Clock:
    """A clock that only moves when a simulated call moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Core:
    """One core shared with a busy process: on each call, with probability ``hog`` (seeded, so the
    run is reproducible), the scheduler hands the core to the hog once, for a uniform part of a
    ``quantum`` (4 ms, the scheduler quanta the issue saw), before the work finishes.
    ``work(seconds)`` runs that much CPU work for the caller and advances the clock."""

    def __init__(self, clock: Clock, hog: float, seed: int = 0, quantum: float = 4e-3) -> None:
        self.clock, self.hog, self.quantum = clock, hog, quantum
        self.random = random.Random(seed)

    def work(self, seconds: float) -> None:
        preempted = self.random.random() < self.hog
        self.clock.now += seconds + (self.quantum * self.random.random() if preempted else 0.0)


def jittered(clock: Clock, seconds: float, jitter: float, seed: int):
    """A call of ``seconds`` ± ``jitter`` (relative, uniform, seeded)."""
    rng = random.Random(seed)

    def call():
        clock.now += seconds * (1 + rng.uniform(-jitter, jitter))
    return call


def test_median_interval_from_order_statistics():
    assert median_ci([]) != median_ci([])  # nan
    for n in range(1, 6):  # five samples or fewer: [min, max]
        values = list(range(n))
        assert median_ci(values) == (0, n - 1)
    values = list(range(100))  # ranks 40 and 61 (1-based) for n = 100
    assert median_ci(values) == (39, 60)
    stats = _stats([1.0] * 10 + [2.0] * 10)
    assert stats.ci_low_ms == 1.0 and stats.ci_high_ms == 2.0 and stats.ci_pct == pytest.approx(100 / 1.5 * 0.5)
    assert _stats([3.0] * 7).ci_pct == 0.0


def test_quiet_row_is_not_flagged():
    clock = Clock()
    timer = Timer("cpu", target_s=0.05, clock=clock)
    stats = timer.time([jittered(clock, 1e-3, 0.002, seed=1)])
    assert not stats.noisy and stats.attempts == 1
    assert stats.ci_pct <= 3.0 and stats.median_ms == pytest.approx(1.0, rel=0.01)
    assert stats.spent_s >= 0.05 and stats.spent_s < 0.06  # stopped at the least time, not the cap
    assert stats.to_json()["noisy"] is False and stats.to_json()["ci_pct"] <= 3.0


def test_row_under_contention_is_flagged_with_its_spread_and_remeasured_once():
    clock = Clock()
    core = Core(clock, hog=0.5, seed=3)  # the busy process gets half of the 4 ms quanta
    quiet = jittered(clock, 1e-3, 0.002, seed=2)
    timer = Timer("cpu", target_s=0.05, max_s=0.5, clock=clock)
    start = clock.now
    result = timer.time_interleaved({"contended": [lambda: core.work(1e-3)], "quiet": [quiet]})
    busy, calm = result["contended"], result["quiet"]
    assert busy.noisy and busy.ci_pct > 3.0
    assert busy.attempts == 2 and busy.other_attempt_ms is not None  # re-measured once
    assert busy.p80_ms > 2 * busy.min_ms  # the spread is in the stats
    assert busy.spent_s >= 0.5  # it ran to the cap
    assert not calm.noisy and calm.ci_pct <= 3.0 and calm.attempts == 2  # same group, measured twice
    # two attempts, each at most the cap per member plus one round
    assert clock.now - start < 2 * (0.5 + 0.05) + 2 * (0.05 + 0.05) + 0.1
    as_json = busy.to_json()
    assert as_json["noisy"] is True and as_json["ci_pct"] == busy.ci_pct and as_json["attempts"] == 2


def test_light_contention_leaves_the_median_alone():
    """A hog preempting one call in eight hits a minority of calls: the median (not the mean) is
    still the quiet time, known to ±3 %, so the row is not flagged."""
    clock = Clock()
    core = Core(clock, hog=0.125, seed=5)
    stats = Timer("cpu", target_s=0.1, max_s=1.0, clock=clock).time([lambda: core.work(0.5e-3)])
    assert not stats.noisy and stats.median_ms == pytest.approx(0.5, rel=0.03)
    assert stats.p80_ms < 0.6 and stats.reps >= 100


def test_interleaving_shares_a_burst_between_the_implementations():
    """Two identical implementations; the machine is three times slower from t = 0.2 s to 0.45 s.
    Timed one after the other, the burst lands on the second; interleaved, on both alike."""
    def make(clock: Clock):
        def call():
            clock.now += 1e-3 * (3.0 if 0.2 <= clock.now < 0.45 else 1.0)
        return call

    clock = Clock()
    timer = Timer("cpu", target_s=0.2, max_s=0.2, remeasure=False, clock=clock, rel_ci=1.0)
    alone = {name: timer.time([make(clock)]).median_ms for name in ("a", "b")}
    assert alone["b"] / alone["a"] > 2.5  # "b" was timed during the burst
    clock = Clock()
    timer = Timer("cpu", target_s=0.2, max_s=0.2, remeasure=False, clock=clock, rel_ci=1.0)
    both = timer.time_interleaved({"a": [make(clock)], "b": [make(clock)]})
    assert both["b"].median_ms / both["a"].median_ms == pytest.approx(1.0, rel=0.05)


def test_rounds_balance_time_and_rotate_inputs():
    clock = Clock()
    seen = {"fast": [], "slow": []}

    def call(name, seconds, index):
        def run():
            seen[name].append(index)
            clock.now += seconds
        return run

    timer = Timer("cpu", target_s=0.1, clock=clock)
    result = timer.time_interleaved({"fast": [call("fast", 1e-4, i) for i in range(3)],
                                     "slow": [call("slow", 1e-2, i) for i in range(2)]}, warmup=0)
    assert result["fast"].reps > 20 * result["slow"].reps  # a similar time each, not a similar count
    assert seen["fast"][:6] == [0, 1, 2, 0, 1, 2] and seen["slow"][:4] == [0, 1, 0, 1]
    assert not result["fast"].noisy and not result["slow"].noisy


def test_runner_time_group_and_the_lines_under_the_table():
    clock = Clock()
    core = Core(clock, hog=0.5, seed=11)
    timer = Timer("cpu", target_s=0.02, max_s=0.2, clock=clock)
    result = runner.time_group(timer, {"flashlite:cpu": [lambda: core.work(1e-3)],
                                       "sdpa:math": [jittered(clock, 2e-3, 0.001, seed=4)]}, warmup=1)
    assert isinstance(result["flashlite:cpu"], Stats) and result["flashlite:cpu"].noisy
    assert not result["sdpa:math"].noisy
    rows = []
    for name, stats in result.items():
        rows.append({"case": "full 1x1 8x8 d8 fp32", "label": "full", "mode": "fwd", "impl": name,
                     "kind": "peer" if name.startswith("sdpa") else "flashlite", "status": "ok", "flops": 1.0,
                     "bytes": None, "memory_bound": False, "dtype": "float32",
                     **runner.measured(timer, [lambda: None], stats)})
    R.derive(rows, None)
    noisy = R.noisy_rows(rows)
    assert [item["impl"] for item in noisy] == ["flashlite:cpu"]
    assert noisy[0]["ci_pct"] > 3 and noisy[0]["attempts"] == 2 and noisy[0]["p80_ms"] > noisy[0]["p20_ms"]
    lines = R.noisy_lines(noisy, timer)
    assert len(lines) == 2 and "flashlite:cpu" in lines[1] and "±3 %" in lines[0]
    text = R.table(rows).splitlines()
    flagged = [line for line in text if "flashlite:cpu" in line]
    assert flagged and "!" in flagged[0]
    assert not any("!" in line for line in text if "sdpa:math" in line)


def test_busy_warning_says_what_the_timer_does():
    timer = Timer("cpu", target_s=0.1)
    env = {"device_type": "cpu", "load_average": [6.0, 5.0, 4.0], "cpu_count": 2}
    text = R.busy_warning(env, timer)
    assert "busy" in text and "interleaved" in text and "±3 %" in text and "noisy" in text
    assert R.busy_warning({**env, "load_average": [1.0, 1.0, 1.0]}, timer) is None
    assert "ci_pct" in runner.parse_args(["--ci-pct", "5"]).__dict__


def test_bad_groups_are_rejected():
    timer = Timer("cpu")
    with pytest.raises(ValueError):
        timer.time_interleaved({})
    with pytest.raises(ValueError):
        timer.time([])
    out = io.StringIO()
    assert R.noisy_lines([], timer) == [] and out.getvalue() == ""
