# guardstream: the two commands.
#   make demo   install into .venv, bring up the embedded stack, moderate the sample feed, print verdicts
#   make test   install into .venv, lint + type-check, run unit and integration tests on real local services
#   make bench  benchmarks on the local broker/S3/Redis, with ratios against baselines from the same run
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch (this pin is the CPU wheel on the dev/CI image; see README "Install").
TORCH  ?= torch==2.13.0

.PHONY: install demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/guardstream demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
