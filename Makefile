# slimlab: two commands on a fresh clone.
#   make demo   create .venv, install, run the quickstart, print the summary
#   make test   create or reuse .venv, install the test extras, run the whole suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: 2.13.0 is the CPU wheel on these machines; an unpinned torch pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-fast lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/slimlab run experiment=quickstart

test: install
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not slow" -x

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) outputs multirun .slimlab mlflow.db mlartifacts
