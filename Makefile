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

.PHONY: install run demo test lint test-compiled
install: $(BIN)/relay

run: install
	$(BIN)/relay check -c config
	$(BIN)/relay serve -c config

# A sink, the relay, one message and what each saw; then both stop (scripts/demo.py).
demo: install
	$(BIN)/python scripts/demo.py

lint: install
	$(BIN)/ruff check relay tests benchmarks scripts setup.py
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

# The compiled build (mypyc, setup.py), tested: the tree (tracked and new files) copied to
# build/compiled, its hot-path modules compiled there in place, and the suite run there.
# Never in this tree: a stale extension beside an edited .py would win the import. Tests
# marked `interpreted` patch a compiled module's internals; they run in `make test` only.
COMPILED := build/compiled
test-compiled: install
	rm -rf $(COMPILED) && mkdir -p $(COMPILED)
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t $(COMPILED)
	cd $(COMPILED) && RELAY_COMPILE=1 $(abspath $(BIN))/python setup.py -q build_ext --inplace >build.log 2>&1 || { tail -40 build.log; exit 1; }
	cd $(COMPILED) && RELAY_EXPECT_COMPILED=1 $(abspath $(BIN))/pytest -q -p no:cacheprovider -m "not interpreted"
