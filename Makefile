# Two entry points a newcomer needs: `make demo` (the main job) and `make test`.
# Each creates .venv and installs what it needs; torch is pinned and installed first so that pip
# does not pull a multi-GB CUDA build on CPU machines.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
DEMO_OUT ?= outputs/demo

.PHONY: install demo lint test clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e .[test,distributed]
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m recipes.demo --outputs $(DEMO_OUT)

# lint first (seconds): ruff (lint + format) and the layer contract in .importlinter
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) outputs
