# Every target creates or reuses .venv and installs what it needs, so each works on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# One GPU architecture keeps the CUDA compile short in CI; GPU wheels list the ones they need.
TORCH_CUDA_ARCH_LIST ?= 9.0
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS ?= 2

DEPS := torch==2.14.1 torchvision==0.29.1 compressai==1.2.8 numpy scipy tqdm matplotlib \
	scikit-image scikit-learn pytorch-msssim bjontegaard \
	pytest pytest-benchmark hypothesis expecttest ruff build ninja setuptools wheel
SOURCES := setup.py pyproject.toml $(wildcard csrc/*)

.PHONY: demo install test bench study sweep wheel lint format clean

# Re-run when the Makefile (and so DEPS) changes; pip skips what is already installed.
$(VENV)/.deps: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(DEPS)
	touch $@

# The project, editable, with its C++ (and, when a CUDA toolkit is present, CUDA) extensions.
$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed

# The main job: plain Adam against STDET on the bundled photos (runs/demo: summary.json, report.md, plots).
demo: $(VENV)/.installed
	$(VENV)/bin/stdet demo --out runs/demo

# The default suite; slow tests (wheel install) run too unless STDET_FAST=1.
test: $(VENV)/.installed
	bash .ci/pytest.sh $(if $(STDET_FAST),-m "not slow",) $(PYTEST_ARGS)

lint: $(VENV)/.deps
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.deps
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(VENV)/.installed
	$(PY) bench/run_bench.py
	$(PY) bench/bench_fit.py
	$(PY) bench/bench_memory.py
	$(PY) bench/bench_sma.py
	$(PY) bench/bench_step.py

# Plain Adam against STDET over 3 seeds and 2 lambdas (runs/study, tables in bench/results/study.md).
study: $(VENV)/.installed
	$(PY) bench/study.py

# The defaults sweep: one STDET knob at a time on the study's setting (bench/results/sweep.md).
sweep: $(VENV)/.installed
	$(PY) bench/study.py --sweep

wheel: $(VENV)/.deps
	$(PY) -m build --wheel --no-isolation

clean:
	rm -rf build dist *.egg-info stdet_kernels/*.so .pytest_cache .benchmarks
