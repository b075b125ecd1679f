# `make demo` and `make test` each run the idempotent `make setup` first.
SHELL := /bin/bash
PY := .venv/bin/python
DEMO_DIR ?= runs/demo

.PHONY: setup test test-fast demo lint bench clean

setup:
	@bash tools/setup.sh

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not dist" tests

demo: setup
	@bash tools/demo.sh $(DEMO_DIR)

lint: setup
	$(PY) -m ruff check unet_dist tests

clean:
	rm -rf runs .pytest_cache
