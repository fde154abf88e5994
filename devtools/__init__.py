"""Test tooling kept out of the shipped packages: the chaos harness and the update reconciliation.

Imported from the repository root by the tests and the benchmarks; not installed for users (see
``[tool.setuptools.packages.find]`` in pyproject.toml).
"""
