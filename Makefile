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

.PHONY: setup test bench clean
setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(SOURCES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q setuptools wheel pybind11 ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench,transformers]"
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(VENV)/bin/flashlite bench $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info flashlite/_C*.so
