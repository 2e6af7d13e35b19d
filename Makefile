# guardstream: the two commands.
#   make demo   install into .venv, bring up the embedded stack, moderate the sample feed, print verdicts
#   make test   install into .venv, lint + type-check, run unit and integration tests on real local services
#   make bench  benchmarks on the local broker/S3/Redis, with ratios against baselines from the same run
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch (this pin is the CPU wheel on the dev/CI image; see README "Install notes").
TORCH  ?= torch==2.13.0
# Extras per target (pyproject.toml): the demo needs the CPU engine and the embedded stack; the tests
# also cover the alerts app and the training loop, and need the dev tools (`dev` pulls in `console`, the
# review console's web stack, whose tests run here too). `gpu` is never installed here.
EXTRAS_demo := cpu,local
EXTRAS_test := dev,cpu,local,alerts,train

.PHONY: install demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"

# One stamp per extras set; re-run when pyproject.toml changes.
$(BIN)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS_$*)]'
	touch $@

install: $(BIN)/.installed-test

demo: $(BIN)/.installed-demo
	$(BIN)/guardstream demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Three test processes, each with its own broker, S3 server and Redis (tests/conftest.py): most tests
# wait on brokers, group joins and subprocesses, so three share 2 cores well (14 min serial, ~6 here).
# --dist loadfile keeps each file in one process, so its module fixtures start once.
test: lint
	$(BIN)/python -m pytest -q -n 3 --dist loadfile

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
