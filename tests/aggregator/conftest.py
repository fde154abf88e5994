"""The service harness's fixtures (a running aggregator and a fake node) for every module here."""

from tests.aggregator.test_service import node, running, start, tree

__all__ = ["node", "running", "start", "tree"]
