# nfctl — the two commands a newcomer runs (as root):
#   sudo make demo   set up this machine and run the lab demo
#   sudo make test   set up this machine and run lint, type checks and the whole test suite
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

.PHONY: setup demo test check lint typecheck pytest protos bench clean

setup:
	./scripts/setup.sh
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/nfctl lab demo

test: setup check pytest

check: lint typecheck

lint:
	$(VENV)/bin/ruff check nfctl tests benchmarks
	$(VENV)/bin/ruff format --check nfctl tests benchmarks
	@command -v gofmt >/dev/null || { echo "gofmt missing (golang-go): run make setup"; exit 1; }
	@unformatted=$$(gofmt -l benchmarks/simagent) && test -z "$$unformatted" \
		|| { echo "gofmt: not formatted: $$unformatted"; exit 1; }

typecheck:
	$(VENV)/bin/mypy

pytest:
	CI=$${CI:-true} $(VENV)/bin/pytest -q -ra $(PYTEST_ARGS)

protos:
	$(PY) -m nfctl.api.generate

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
