# The README's two commands: `make demo` and `make test`. Both work on a fresh clone: they create
# .venv, install the pinned CPU build of torch FIRST (an unpinned torch would pull a CUDA build of
# several GB), then the project. pip's default upgrade strategy (only-if-needed) keeps that torch.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# Where torch comes from, if not pip's default (PyPI's torch for Linux is a CUDA build): e.g.
# `make TORCH_INDEX=https://download.pytorch.org/whl/cpu test` for the CPU build.
TORCH_INDEX ?=
PIP := $(BIN)/python -m pip --disable-pip-version-check
# The project goes in as an editable install in setuptools' "compat" mode: a .pth file naming
# this folder, which mypy follows, so code outside it type-checks against typedbrain (the
# default mode installs an import hook that mypy cannot see through: typedbrain is then Any).
EDITABLE := --config-settings editable_mode=compat -e

.PHONY: demo test lint typecheck unit clean

demo: $(VENV)/.installed-examples
	$(BIN)/python examples/digits/demo.py

test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

unit: $(VENV)/.installed-dev
	$(BIN)/pytest

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Its own marker, written only once torch is in: an install that failed or was interrupted is
# retried, never skipped (the project's install would then resolve an unpinned torch). The
# marker holds the pin and serves as a constraints file for every later install.
$(VENV)/.torch: $(BIN)/python
	$(PIP) install $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	echo '$(TORCH_SPEC)' > $@

$(VENV)/.installed-examples: $(VENV)/.torch pyproject.toml
	$(PIP) install -c $(VENV)/.torch $(EDITABLE) '.[examples,plot]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.torch pyproject.toml
	$(PIP) install -c $(VENV)/.torch $(EDITABLE) '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis results
