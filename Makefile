# tokenmill: run `make demo` for the end-to-end job, `make test` for the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv proto proto-check demo test test-fast lint typecheck up down clean

# torch: the CPU build, from the local wheel cache where there is one, else from PyTorch's CPU index
# (a bare `pip install torch` would pull a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 || \
		$(PY) -m pip install -q 'torch>=2.6,<=2.13.0' --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q -e '.[dev,ray]'
	touch $@

venv: $(VENV)/.installed

# Generated stubs are committed (tokenmill/v1/); this regenerates them.
proto: venv
	$(PY) -m tokenmill.common.protogen

# Fails when the committed stubs differ from what the protos generate.
proto-check: venv
	$(PY) -m tokenmill.common.protogen --check

lint: venv typecheck
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy over common/ and services/ under their tokenmill.* names (scripts/typecheck.py says how).
typecheck: venv
	$(PY) scripts/typecheck.py

test: venv proto-check typecheck
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# The inner loop: everything not marked slow, property tests with fewer examples; under a minute.
test-fast: venv
	HYPOTHESIS_PROFILE=fast $(PY) -m pytest -q -m "not slow"

demo: venv
	$(PY) -m tokenmill.common.platform.demo

up: venv
	$(VENV)/bin/tokenmill up

down: venv
	$(VENV)/bin/tokenmill down

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
