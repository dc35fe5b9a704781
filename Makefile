# Two entry points for a fresh machine: `make demo` and `make test` (README: Set-up).
# The pins need Python 3.11+ (jax 0.10, flax 0.12, numpy 2.4): the first of these on PATH
# that is, the tested 3.11 first; or give one: make test PYTHON=/path/to/python3.11.
PY_CANDIDATES := python3.11 python3.12 python3.13 python3
ifeq ($(origin PYTHON),undefined)
PYTHON := $(firstword $(foreach p,$(PY_CANDIDATES),$(shell $(p) -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && echo $(p))))
endif
VENV ?= .venv
PY := $(VENV)/bin/python
# On a CUDA 12 machine: make install CUDA=12 (or make test / make demo CUDA=12) adds JAX's
# CUDA wheels at the locked jax version, e.g. jax[cuda12]==0.10.2.
CUDA ?=
JAX_CUDA := $(subst jax==,jax[cuda$(CUDA)]==,$(shell grep '^jax==' requirements.txt))
# The test-suite's tolerances are float32-on-CPU ones (GPUs multiply float32 in TF32 by
# default), so make test runs on the CPU; TEST_PLATFORMS=cuda runs it on the GPU (unmeasured).
TEST_PLATFORMS ?= cpu

# The exact lock, then this project itself (editable, no dependencies: the lock has them), so
# that rqvae-separate / rqvae-train / rqvae-eval are on the venv's PATH.
$(VENV)/.installed: requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "rqvae-jax needs Python 3.11 or newer (its pinned jax, flax and numpy do); PYTHON='$(PYTHON)'"; \
	  echo "is not (by default: the first 3.11+ of $(PY_CANDIDATES) on PATH)."; \
	  echo "Install one, or run: make $(MAKECMDGOALS) PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt $(if $(CUDA),"$(JAX_CUDA)")
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# Test-only dependencies (pytest, TFDS, librosa, torch CPU for the original code's parity
# tests): `make test` only.
$(VENV)/.dev-installed: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

.PHONY: install test demo generate-demo bench
install: $(VENV)/.installed

# The suite is mostly XLA compiles, each on one thread: one pytest worker per core
# (pytest-xdist; TEST_WORKERS=0 runs it in this process).
TEST_WORKERS ?= auto

# The suite's programs are tiny and compiled once each, so compilation is most of its time:
# XLA's backend at optimisation level 0 compiles them in about half the time (the demo test:
# 117 s -> 69 s). Runs, benchmarks and the GPU check keep the default level.
TEST_XLA_FLAGS ?= --xla_backend_optimization_level=0

# Huge pages for XLA's per-call buffers in the test processes too (rqvae_jax/hugepages.py: the
# programs re-execute themselves with it; pytest is not one of them). A GLIBC_TUNABLES of
# your own is kept as it is.
test: install $(VENV)/.dev-installed
	GLIBC_TUNABLES="$${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}" JAX_PLATFORMS=$(TEST_PLATFORMS) XLA_FLAGS="$(TEST_XLA_FLAGS) $$XLA_FLAGS" $(PY) -m pytest -q -n $(TEST_WORKERS) tests

demo: install
	$(PY) demo.py --workdir $(or $(WORKDIR),runs/demo)

# codec + RQ-Transformer prior + samples on the synthetic set (README: Codec and prior)
generate-demo: install
	$(PY) generate_demo.py --workdir $(or $(WORKDIR),runs/generate_demo)

bench: install
	$(PY) -m benchmarks.run
