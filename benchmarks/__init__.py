"""Benchmarks: each writes its figures as JSON (``python -m benchmarks.NAME --json OUT``)."""
