# Two entry points for a fresh machine: `make demo` and `make test` (README: Set-up).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Test-only dependencies (torch CPU for the original code's parity tests): `make test` only.
$(VENV)/.dev-installed: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

.PHONY: install test demo bench
install: $(VENV)/.installed

test: install $(VENV)/.dev-installed
	$(PY) -m pytest -q tests

demo: install
	$(PY) demo.py --workdir $(or $(WORKDIR),runs/demo)

bench: install
	$(PY) -m benchmarks.run
