# Set-up is two commands: `make run` and `make test`. Both install into .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SCALE ?= full

.PHONY: run test lint bench clean-outputs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)  ## finetune on the embedded synthetic stream (under a minute on 2 CPU cores)
	$(BIN)/clrun $(ARGS)

test: $(STAMP)  ## the whole test suite
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check clrun tests benchmarks

bench: $(STAMP)  ## throughput benchmarks; JSON into benchmarks/results/
	$(BIN)/python benchmarks/throughput.py

clean-outputs:
	rm -rf outputs/runs
