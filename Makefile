VENV := .venv
PYTHON := $(VENV)/bin/python
RUFF := $(VENV)/bin/ruff
LINT_IMPORTS := $(VENV)/bin/lint-imports

.DEFAULT_GOAL := test
.PHONY: bootstrap run test lint bench soak clean image image-test

bootstrap:
	bash scripts/bootstrap.sh

run: bootstrap
	$(PYTHON) -m gateway.demo

# The suite in two passes (docs/testing.md): the tests in parallel, TEST_WORKERS at a time
# (pytest-xdist; worksteal hands each worker a run of the collection, so a module's shared
# gateway starts on few of them), then alone the tests marked `serial`, which measure
# durations, rates or memory. Each pass fails the target, also one that selects no test
# (pytest's exit code 5): neither is ever empty.
TEST_WORKERS ?= 6

test: bootstrap
	$(RUFF) check .
	$(LINT_IMPORTS)
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not serial" tests
	$(PYTHON) -m pytest -q -m serial tests

# The container image (containers/Containerfile) and the unit that runs it. PODMAN_CONF:
# podman and buildah settings for machines like the CI's (containers/ci/); empty, the
# machine's own.
IMAGE ?= localhost/rclone-gateway:latest
PODMAN_CONF ?= $(CURDIR)/containers/ci
PODMAN_ENV = $(if $(PODMAN_CONF),CONTAINERS_CONF=$(PODMAN_CONF)/containers.conf \
	CONTAINERS_STORAGE_CONF=$(PODMAN_CONF)/storage.conf)

image: bootstrap
	bash scripts/image-bootstrap.sh
	$(PODMAN_ENV) bash scripts/image.sh $(IMAGE)

image-test: image
	$(PODMAN_ENV) IMAGE=$(IMAGE) $(PYTHON) -m pytest -q -p no:randomly -m image tests/test_image.py

lint: bootstrap
	$(RUFF) check .
	$(LINT_IMPORTS)

bench: bootstrap
	$(PYTHON) bench/run.py $(BENCH_ARGS)

# a few minutes of mixed traffic with faults; DURATION=1800 for half an hour
soak: bootstrap
	$(PYTHON) bench/soak.py $(if $(DURATION),--duration $(DURATION)) $(SOAK_ARGS)

clean:
	rm -rf var
