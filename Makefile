# make lab        open the course in JupyterLab (http://127.0.0.1:8888, token auth)
# make test       every test: pytest tests/ + strict nbval over notebooks/, solutions/ (CPU_PATHS=avx2|scalar: as another CPU)
# make notebooks  re-execute the notebooks in place (after editing a lesson)
# make exercises  re-execute solutions/ and regenerate exercises/ from them
# make lock       regenerate requirements.lock, requirements-uv.lock and environment.yml (tools/lock.py)
# Each target first sets up .venv if needed, from the lock: nothing else to install by hand.

SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
# Used only when $(PYTHON) cannot import torch; an importable torch is reused via --system-site-packages.
# tools/lock.py resolves the lock for this torch (tests/test_environment.py checks they agree).
TORCH_SPEC ?= torch==2.13.0
# e.g. make test TORCH_PIP_ARGS='--index-url https://download.pytorch.org/whl/cpu'
TORCH_PIP_ARGS ?=
# Extra arguments for jupyter lab, e.g. LAB_ARGS=--allow-root in a container where you are root
LAB_ARGS ?=
# Notebooks to re-execute (default: all), e.g. make notebooks NB='01 02'
NB ?=

VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip --disable-pip-version-check
# -qq: errors only (pip's warnings about unusable extra indexes, progress bars). PIP_QUIET= to see everything.
PIP_QUIET ?= -qq
STAMP := $(VENV)/.installed
UV := $(VENV)/bin/uv
UV_QUIET := $(if $(PIP_QUIET),--quiet)

# The kernel's environment, the same for `make notebooks` (which writes the outputs), `make test` (which
# compares them) and `make lab`. tools/run_notebooks.py sets the same; tests/test_notebook_sources.py checks.
export PYTHONHASHSEED := 0
# Unset, so that kernels use ipykernel's default inline backend whatever the shell has.
unexport MPLBACKEND

PYTEST_ARGS ?=
# What `make test` runs: the unit tests, and every lesson and solution under strict nbval.
TEST_PATHS ?= tests notebooks solutions
# Processes the tests are spread over (pytest-xdist); each notebook's cells stay together in one (loadscope).
# Nothing the tests compare depends on it. JOBS=1 runs them in this process. With several, each process runs torch
# on one thread unless OMP_NUM_THREADS says otherwise: JOBS processes of as many threads each would only wait for
# one another.
JOBS ?= 2
XDIST_ARGS := $(if $(filter-out 1,$(JOBS)),-n $(JOBS) --dist loadscope,-p no:xdist)
XDIST_ENV := $(if $(filter-out 1,$(JOBS)),OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1})
NBVAL_ARGS := --nbval --nbval-current-env --nbval-cell-timeout=600 \
	--nbval-sanitize-with notebooks/nbval_sanitize.cfg

# The CPU code the tests run, so that one machine can check what another would print (README, "On another CPU"):
#   native  this CPU's own paths;
#   avx2    those of an x86 CPU without AVX-512: torch's AVX2 kernels, MKL and oneDNN at AVX2;
#   scalar  those of a CPU without AVX2 either (an ARM laptop's, as far as torch's own kernels go): torch's scalar
#           kernels, MKL at SSE4.2, oneDNN at SSE4.1.
# avx2 and scalar also make bitsandbytes' Python check for AVX512-BF16 answer no (tests/cpu_paths/sitecustomize.py).
CPU_PATHS ?= native
CPU_ENV_native :=
CPU_ENV_avx2 := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
	PYTHONPATH=$(CURDIR)/tests/cpu_paths
CPU_ENV_scalar := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 \
	PYTHONPATH=$(CURDIR)/tests/cpu_paths
ifeq ($(filter $(CPU_PATHS),native avx2 scalar),)
$(error CPU_PATHS must be native, avx2 or scalar, not '$(CPU_PATHS)')
endif

.DEFAULT_GOAL := help
.PHONY: help lab test notebooks exercises lock venv clean

help:
	@sed -n 's/^# \(make .*\)/\1/p' $(firstword $(MAKEFILE_LIST))

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --ip=127.0.0.1 --no-browser --notebook-dir=notebooks $(LAB_ARGS)

# One pytest run, one summary line: tests/ as usual, notebooks/*.ipynb and solutions/*.ipynb under strict nbval
# (exercises/ is not run: its stubs raise NotImplementedError until a learner fills them in).
# Exit 5 (nothing collected) is a failure like any other non-zero status. Off a terminal (CI logs), no colours:
# nbval colours its diffs unless told --color=no.
test: $(STAMP)
	@if [ -t 1 ]; then color=; else color=--color=no; fi; \
	env $(XDIST_ENV) $(CPU_ENV_$(CPU_PATHS)) $(VPY) -m pytest $$color $(XDIST_ARGS) $(NBVAL_ARGS) $(PYTEST_ARGS) $(TEST_PATHS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest ran no tests (exit 5), which counts as a failure" >&2; fi; \
	exit $$rc

notebooks: $(STAMP)
	@$(VPY) tools/run_notebooks.py $(NB)

exercises: $(STAMP)
	@$(VPY) tools/make_exercises.py --execute $(NB)

lock: $(STAMP)
	@$(VPY) tools/lock.py

venv: $(STAMP)
	@:

# The venv itself, with torch in it. If $(PYTHON) already imports torch (Colab, a conda env), the venv sees
# that install through --system-site-packages and torch is never reinstalled.
$(VENV)/.torch:
	@if [ ! -x $(VPY) ]; then \
	  if $(PYTHON) -c 'import torch' >/dev/null 2>&1; then \
	    echo "make: creating $(VENV) on top of $$($(PYTHON) -c 'import sys, torch; print(sys.executable, "with torch", torch.__version__)')"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    echo "make: creating $(VENV) with $$($(PYTHON) -c 'import sys; print(sys.executable)')"; \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@if ! $(VPY) -c 'import torch' >/dev/null 2>&1; then \
	  echo "make: installing $(strip $(TORCH_SPEC) $(TORCH_PIP_ARGS)) into $(VENV)"; \
	  $(PIP) install $(PIP_QUIET) $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'; \
	fi
	@touch $@

# Everything else, from the lock; redone when the lock changes. pip installs uv (pinned, hash-checked), uv
# installs the locked packages exactly (--no-deps: the lock is complete; --require-hashes: nothing else is
# accepted), then the course itself in editable mode.
$(STAMP): pyproject.toml requirements.lock requirements-uv.lock $(VENV)/.torch
	@echo "make: installing qlora_ref and the locked packages into $(VENV)"
	@$(PIP) install $(PIP_QUIET) --no-deps --require-hashes -r requirements-uv.lock
	@$(UV) pip install $(UV_QUIET) --python $(VPY) --no-deps --require-hashes -r requirements.lock
	@$(UV) pip install $(UV_QUIET) --python $(VPY) --no-deps --no-build-isolation -e .
	@touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
