# The two set-up commands of the README: `make run` and `make test`. Both work on a fresh
# Debian/Ubuntu machine with Python >= 3.11 (and, for the tests, redis-server installed).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/relay: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

.PHONY: install run demo test lint
install: $(BIN)/relay

run: install
	$(BIN)/relay check -c config
	$(BIN)/relay serve -c config

# A sink, the relay, one message and what each saw; then both stop (scripts/demo.py).
demo: install
	$(BIN)/python scripts/demo.py

lint: install
	$(BIN)/ruff check relay tests benchmarks scripts
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q
