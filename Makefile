# One command to set up and run the demo, one to set up and run the tests.
# The CPU wheel of torch is installed first: an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint bench-accuracy bench-speed clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest tests

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench-accuracy: setup
	$(PY) benchmarks/accuracy.py

bench-speed: setup
	$(PY) benchmarks/speed.py

clean:
	rm -rf $(VENV) outputs multirun lightning_logs .pytest_cache
