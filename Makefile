# Two commands for a fresh machine with Python 3.11 and pip: `make demo` and `make test`.
# Both create (or reuse) the local virtual environment .venv and install the project into it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
BASE_STAMP := $(VENV)/.installed-base
TEST_STAMP := $(VENV)/.installed-test
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test notebooks lint format clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(BASE_STAMP): setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(TEST_STAMP): setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,tpu-plan]'
	touch $(BASE_STAMP) $@

demo: $(BASE_STAMP)
	$(BIN)/python experiments/frontier.py $(DEMO_ARGS)

test: $(TEST_STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=25 $(PYTEST_ARGS)

# The three notebooks executed in place at their tiny settings (outputs and figures committed).
notebooks: $(TEST_STAMP)
	$(BIN)/python dev/notebooks.py

lint: $(TEST_STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(TEST_STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
