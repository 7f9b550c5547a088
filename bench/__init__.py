"""flashlite's benchmarks (installed as ``flashlite.bench``): ``flashlite bench`` / ``python -m
flashlite.bench`` (runner.py), its cases, timing, peers, validation, report and plots, and the
pytest-benchmark suite (test_attention.py). See bench/README.md."""
