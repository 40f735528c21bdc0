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

.PHONY: demo install test bench study study-quick study-calibrate wheel lint format clean

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

# The main job: lambda fine-tuning of the shipped model, Adam (+ EMA) against STDET (+ SMA)
# (runs/demo: summary.json, report.md, plots).
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
	$(PY) bench/bench_adam.py

# The study (bench/study.py): Adam, Adam + EMA, STDET, STDET + SMA from scratch and in lambda
# fine-tuning, 3 seeds x 4 lambdas, complete runs at 0.4-1.0 S (about 1.75 h on 2 cores; runs/study,
# tables in bench/results/study.md). STUDY_ARGS passes flags, e.g. STUDY_ARGS=--jobs=1.
study: $(VENV)/.installed
	$(PY) bench/study.py $(STUDY_ARGS)

# The screen (about 20 minutes): one seed, lambda 0.013, four EMA horizons (bench/results/study_quick.md).
study-quick: $(VENV)/.installed
	$(PY) bench/study.py --quick $(STUDY_ARGS)

# The learning-rate calibration behind the study's LR (bench/results/study_calibration.md).
study-calibrate: $(VENV)/.installed
	$(PY) bench/study.py --calibrate $(STUDY_ARGS)

wheel: $(VENV)/.deps
	$(PY) -m build --wheel --no-isolation

clean:
	rm -rf build dist *.egg-info stdet_kernels/*.so .pytest_cache .benchmarks
