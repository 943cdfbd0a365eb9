# Developer shortcuts; CI itself runs .ci/run. The venv's tools are used where .venv/bin exists.
PY ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

.DEFAULT_GOAL := help
.PHONY: help lint typecheck test test-fast ci

help:
	@echo "make lint       ruff check . and the type checker (mypy)"
	@echo "make typecheck  mypy (the package, configured in pyproject.toml)"
	@echo "make test       the whole test suite (OMP_NUM_THREADS=1 pytest -q)"
	@echo "make test-fast  the tests not marked slow"
	@echo "make ci         what CI runs (bash .ci/run: a fresh venv, the tests, lint, a wheel)"
	@echo "(tools from $(PY); PY=... to choose another Python)"

lint:
	$(PY) -m ruff check . && $(PY) -m mypy

typecheck:
	$(PY) -m mypy

test:
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

test-fast:
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow"

ci:
	bash .ci/run
