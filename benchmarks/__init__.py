"""Benchmarks: each writes its figures as JSON (``python benchmarks/NAME.py --json OUT``)."""
