# Two entry points for a fresh machine: `make demo` and `make test` (README: Set-up).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

.PHONY: install test demo bench
install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) demo.py --workdir $(or $(WORKDIR),runs/demo)

bench: install
	$(PY) -m benchmarks.run
