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

# A second environment with every runtime dependency at the floor pyproject.toml names (torch at
# TORCH_SPEC: its floor is not on this disk), where the tests of what those dependencies serve
# (configuration, hyperparameters, options, state, checkpoints) run again: a floor that no
# longer works fails `make test`.
FLOORS_VENV ?= .venv-floors
FLOOR_TESTS := tests/test_config.py tests/test_typed_hparams.py tests/test_hparams.py \
	tests/test_options.py tests/test_state.py tests/test_run_record.py tests/test_cli_args.py \
	tests/test_checkpoint.py tests/test_experiment.py tests/test_train_loggers.py

.PHONY: demo test test-floors lint typecheck unit clean

demo: $(VENV)/.installed-examples
	$(BIN)/python examples/digits/demo.py

test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest
	$(MAKE) test-floors

test-floors: $(FLOORS_VENV)/.installed
	$(FLOORS_VENV)/bin/python -m pytest -p no:cacheprovider -q -m "not slow" $(FLOOR_TESTS)

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

# Made afresh whenever pyproject.toml changes (an old floor's package must not stay behind).
$(FLOORS_VENV)/.installed: pyproject.toml tools/dependency_floors.py
	rm -rf $(FLOORS_VENV)
	$(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/python tools/dependency_floors.py --torch '$(TORCH_SPEC)' > $(FLOORS_VENV)/floors.txt
	$(FLOORS_VENV)/bin/python -m pip --disable-pip-version-check install $(TORCH_SPEC) \
		$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(FLOORS_VENV)/bin/python -m pip --disable-pip-version-check install \
		-c $(FLOORS_VENV)/floors.txt -r $(FLOORS_VENV)/floors.txt pytest hypothesis
	echo '$(TORCH_SPEC)' > $(FLOORS_VENV)/.torch
	touch $@

# A marker made with another TORCH_SPEC is out of date: that venv gets the new pin (the floors'
# venv is made afresh). Without this, `make test TORCH_SPEC=...` would test the torch it had.
ifneq ($(shell cat $(VENV)/.torch 2>/dev/null),$(TORCH_SPEC))
$(VENV)/.torch: FORCE
endif
ifneq ($(shell cat $(FLOORS_VENV)/.torch 2>/dev/null),$(TORCH_SPEC))
$(FLOORS_VENV)/.installed: FORCE
endif
.PHONY: FORCE
FORCE:

clean:
	rm -rf $(VENV) $(FLOORS_VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis results
