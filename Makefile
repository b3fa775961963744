# Two commands a newcomer needs: `make demo` and `make test`. Everything runs from .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test lint unit demo bench test-slow mutants docs clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -U pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

## test: lint, type-check and run the default test suite (what CI runs)
test: lint unit

lint: $(BIN)/.installed
	$(BIN)/ruff check smt_watch tests bench scripts
	$(BIN)/mypy smt_watch

# The suite starts a few hundred `smt-watch` processes: each would compile the package again where the
# environment sets PYTHONDONTWRITEBYTECODE (~0.15 s of CPU a start), so the run lets Python cache bytecode
# and compiles it once up front (workers racing to write the same .pyc files would each compile it).
# Four workers on two cores: the suite waits (outages, leases, servers starting) more than it computes; on
# this 2-core machine -n 2 took 200 s of tests, -n 3 180 s, -n 4 122 s (pytest and its waited-for children
# used 1.5 cores of 2).
unit: $(BIN)/.installed
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m compileall -q smt_watch tests scripts
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/pytest -n 4

## test-slow: the large-file and long-running tests left out of the default run
test-slow: $(BIN)/.installed
	$(BIN)/pytest -m slow

## mutants: break each promise in tests/mutants/*.toml on purpose and check a test goes red (~45 min)
mutants: $(BIN)/.installed
	$(BIN)/python scripts/mutants.py

## demo: start a local receiver, deliver generated files in both modes, show the ledger
demo: $(BIN)/.installed
	$(BIN)/python scripts/demo.py

## bench: every benchmark (~15 min): bench/RESULTS.md and bench/plot.png, against curl, sftp, sha256sum
bench: $(BIN)/.installed
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[test,bench]"
	bench/run_all

## docs: rewrite the generated docs (docs/cli.md, docs/settings.md, docs/contract.md §1's list)
docs: $(BIN)/.installed
	$(BIN)/python scripts/docs.py --write

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
