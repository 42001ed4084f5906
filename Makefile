VENV := .venv
PYTHON := $(VENV)/bin/python
RUFF := $(VENV)/bin/ruff

.DEFAULT_GOAL := test
.PHONY: bootstrap run test lint bench clean

bootstrap:
	bash scripts/bootstrap.sh

run: bootstrap
	$(PYTHON) -m gateway.demo

test: bootstrap
	$(RUFF) check .
	$(PYTHON) -m pytest -q tests

lint: bootstrap
	$(RUFF) check .

bench: bootstrap
	$(PYTHON) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf var
