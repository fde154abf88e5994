# One command runs every check: `make check` (lint, format, types, tests). CI runs exactly this.
PYTHON ?= python3

.PHONY: check lint types test test-fast

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
