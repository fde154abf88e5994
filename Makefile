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

# The docs' generated tables (README.md, docs/*.md), rendered again: the figures from the committed
# JSON (docs/benchmarks/, benchmarks/results/), the configuration from the settings classes; the
# tests fail while a page and its sources disagree.
figures:
	$(PYTHON) -m benchmarks.figures
