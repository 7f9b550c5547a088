# flashlite: the two commands of the README.
#   make bench   validate every kernel against the reference, time it beside the peers, table + plot
#   make test    the test suite (what CI runs)
# Both create (or reuse) a virtualenv in $(VENV) and install what is missing. torch is installed
# only if the environment has none ($(TORCH_SPEC) then; on a GPU box install your CUDA torch first).

VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flashlite-installed
SOURCES := $(shell find flashlite kernels csrc bench -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) 2>/dev/null)

.PHONY: setup test test-full bench sanitize clean
setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(SOURCES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q setuptools wheel pybind11 ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench,transformers]"
	@touch $(STAMP)

# Two pytest workers (pytest-xdist), one test file each at a time (module fixtures such as the
# CUDA compile run once): most tests are single-threaded Python (Triton's interpreter), so two
# workers use both cores. --no-loadscope-reorder: files go out in collection order, which
# tests/conftest.py (LONGEST_FILES_FIRST) makes longest first, so both workers finish together. `make test-full` adds what CI leaves out: every .cu source for sm_80 and
# sm_90a (CI: one per kernel family, sm_90a), every CUDA emulation case, the whole Triton sm_90a
# resource table, and every case of the parametrizations CI samples on the Triton interpreter
# (FLASHLITE_TESTS=full; about 40 minutes more on 2 cores).
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

test-full: setup
	FLASHLITE_TESTS=full FLASHLITE_CUDA_TESTS=full FLASHLITE_BUDGET_FULL=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

bench: setup
	$(VENV)/bin/flashlite bench $(BENCH_ARGS)

# make sanitize: the C++ CPU kernels under sanitizers (csrc/README.md § Sanitizers), about 15 minutes
# on 2 cores, not part of `make test`:
#   1. AddressSanitizer + UndefinedBehaviorSanitizer: the ctest (CMake, -DFLASHLITE_SANITIZE=
#      address,undefined), then flashlite._C built the same way into $(SANITIZE_DIR)/lib (the in-tree
#      extension is left alone) and the CPU-backend tests run against it, libasan preloaded into Python;
#   2. ThreadSanitizer: the ctest, whose OpenMP drivers run 1, 2 and 3 threads.
# Any report fails the target. The logs of step 1's Python part go to $(SANITIZE_DIR)/asan.<pid>.
SANITIZE_DIR ?= build/sanitize
SANITIZE_JOBS ?= 2
SANITIZE_TESTS ?= tests/test_cpu_backend.py tests/test_gather_rows_cpu.py tests/test_threads.py
SAN_FLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
# Python is not built with ASan: its runtime must be loaded first, and libstdc++ with it (else
# ASan's __cxa_throw interceptor finds no real __cxa_throw when the extension throws).
SAN_PRELOAD = $(shell $(CXX) -print-file-name=libasan.so) $(shell $(CXX) -print-file-name=libstdc++.so)
SAN_ENV = LD_PRELOAD="$(SAN_PRELOAD)" ASAN_OPTIONS=detect_leaks=0:log_path=$(abspath $(SANITIZE_DIR))/asan \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$(abspath $(SANITIZE_DIR))/asan \
	FLASHLITE_SANITIZED_C="$$(ls $(SANITIZE_DIR)/lib/flashlite/_C*.so)" PYTHONPATH=csrc/tests
SAN_PYTEST = $(PY) -m pytest -q -p sanitize_plugin -p no:cacheprovider

sanitize: setup
	cmake -S . -B $(SANITIZE_DIR)/asan -DFLASHLITE_CUDA=OFF -DFLASHLITE_SANITIZE=address,undefined
	cmake --build $(SANITIZE_DIR)/asan --target test_cpu_kernels --parallel $(SANITIZE_JOBS)
	ctest --test-dir $(SANITIZE_DIR)/asan --output-on-failure
	CFLAGS="$(SAN_FLAGS)" LDFLAGS="-fsanitize=address,undefined" FLASHLITE_CUDA=0 MAX_JOBS=$(SANITIZE_JOBS) \
		$(PY) setup.py -q build_ext -b $(SANITIZE_DIR)/lib -t $(SANITIZE_DIR)/tmp
	rm -f $(SANITIZE_DIR)/asan.*
	$(SAN_ENV) $(SAN_PYTEST) $(SANITIZE_TESTS) || { cat $(SANITIZE_DIR)/asan.* 2>/dev/null; exit 1; }
	$(SAN_ENV) $(SAN_PYTEST) tests/test_topk.py -k cpu || { cat $(SANITIZE_DIR)/asan.* 2>/dev/null; exit 1; }
	@if ls $(SANITIZE_DIR)/asan.* >/dev/null 2>&1; then cat $(SANITIZE_DIR)/asan.*; exit 1; fi
	cmake -S . -B $(SANITIZE_DIR)/tsan -DFLASHLITE_CUDA=OFF -DFLASHLITE_SANITIZE=thread
	cmake --build $(SANITIZE_DIR)/tsan --target test_cpu_kernels --parallel $(SANITIZE_JOBS)
	ctest --test-dir $(SANITIZE_DIR)/tsan --output-on-failure
	@echo "sanitize: ASan+UBSan (ctest, CPU-backend tests) and TSan (ctest) clean"

clean:
	rm -rf build *.egg-info flashlite/_C*.so
