# Set-up contract: `make demo` (main job) and `make test` (full test suite) work on a fresh
# machine with nothing but Python; both create and use the project-local .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A CPU build of torch: plain `torch` would pull the CUDA wheels (gigabytes).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint typecheck bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/biograd compare --out runs/demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --durations=10

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

bench: $(VENV)/.installed
	$(PY) benchmarks/step_time.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
