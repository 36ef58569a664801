# xrec: `make dev` runs the whole loop on the embedded stack; `make test` runs the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install dev once test lint bench chaos clean

help: ## show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "xrec needs Python 3.11"'
	@# a venv cut off while being made (no pip yet) is made again, not reused
	test -x $(BIN)/pip || $(PYTHON) -m venv --clear $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0  # first: the CPU wheel (other versions pull CUDA builds)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install xrec with its test tools

dev: $(STAMP) ## run the whole loop on the embedded stack (Ctrl-C stops everything)
	$(BIN)/xrec dev

once: $(STAMP) ## the loop once, JSON summary last: make once EVENTS=20000
	$(BIN)/xrec dev --once --events $(or $(EVENTS),20000) --json

test: $(STAMP) ## lint, then the test suite (it starts its own broker and Redis)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP) ## ruff
	$(BIN)/ruff check .

bench: $(STAMP) ## throughput + latency vs a bare Faust agent (prints JSON last)
	$(BIN)/python bench/throughput.py --json

chaos: $(STAMP) ## kills, outages, hostile input vs an uninterrupted run (prints JSON last)
	$(BIN)/python bench/chaos.py --json

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
