VENV := .venv
PYTHON := $(VENV)/bin/python
RUFF := $(VENV)/bin/ruff

.DEFAULT_GOAL := test
.PHONY: bootstrap run test lint bench soak clean

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

# a few minutes of mixed traffic with faults; DURATION=1800 for half an hour
soak: bootstrap
	$(PYTHON) bench/soak.py $(if $(DURATION),--duration $(DURATION)) $(SOAK_ARGS)

clean:
	rm -rf var
