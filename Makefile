# One command runs every check: `make check` (lint, format, types, tests). CI runs exactly this.
PYTHON ?= python3

.PHONY: check lint types test test-fast figures

check: lint types test

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

types:
	$(PYTHON) -m mypy

test:
	$(PYTHON) -m pytest

# Everything but the real-process federation tests (a few seconds).
test-fast:
	$(PYTHON) -m pytest -m "not slow"

# The README's figure tables, rendered again from the committed JSON (docs/benchmarks/,
# benchmarks/results/); the tests fail while README.md and the JSON disagree.
figures:
	$(PYTHON) -m benchmarks.figures
