# Everyday targets. The virtual environment is cached in .venv and reinstalled only when pyproject.toml or
# constraints.txt change; constraints.txt pins the versions the project was tested with.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PROMPT ?= def main(

.PHONY: install demo test test-fast lint format lock clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

## make demo: the tiny pipeline on an embedded Ray, then one completion from the model it trained.
demo: $(STAMP)
	$(BIN)/raylm pipeline --config jobs/configs/tiny.yaml --ask "$(PROMPT)"

## make test: the whole suite (unit, integration with real Ray and real HTTP).
test: $(STAMP)
	$(BIN)/python -m pytest --ignore=tests/multinode
	$(BIN)/python -m pytest tests/multinode

## make test-fast: unit tests only (no Ray).
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests/unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## make lock: pin what is installed now (after changing dependencies in pyproject.toml).
lock:
	$(BIN)/python -m pip freeze --exclude-editable --disable-pip-version-check \
		| sed -E 's/^torch==([0-9.]+)\+cpu$$/torch==\1/' > constraints.txt

clean:
	rm -rf runs .pytest_cache
