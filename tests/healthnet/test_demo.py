"""Specification of the demo's choice of sites and versions, checked before anything starts."""

from __future__ import annotations

import pytest

from healthnet.demo import DemoConfig, DemoError, first_sites, run_demo
from healthnet.federations import HEART_DISEASE, PNEUMONIA


def test_nodes_keeps_the_first_sites_and_lowers_k_to_fit() -> None:
    """--nodes 3 keeps hospital-1..3, and the federation's K = 4 becomes 3."""
    cut = first_sites(PNEUMONIA, 3, None)
    assert [site.node_id for site in cut.sites] == ["hospital-1", "hospital-2", "hospital-3"]
    assert cut.knobs.buffer_size == 3
    assert cut.knobs.training == PNEUMONIA.knobs.training


def test_nodes_above_k_keep_the_federations_k() -> None:
    """With more nodes than K, K stays the federation's."""
    assert first_sites(PNEUMONIA, 6, None).knobs.buffer_size == PNEUMONIA.knobs.buffer_size


def test_no_nodes_means_every_site_unchanged() -> None:
    """Without --nodes the federation is used as defined."""
    assert first_sites(HEART_DISEASE, None, None) is HEART_DISEASE
    assert first_sites(PNEUMONIA, 8, 8) is PNEUMONIA


@pytest.mark.parametrize(
    ("nodes", "buffer_size", "message"),
    [
        pytest.param(0, None, r"must be 1\.\.8", id="no-nodes"),
        pytest.param(9, None, r"must be 1\.\.8", id="too-many-nodes"),
        pytest.param(2, 3, "exceeds the 2 nodes", id="k-above-nodes"),
        pytest.param(None, 9, "exceeds the 8 nodes", id="k-above-sites"),
    ],
)
def test_impossible_site_choices_are_refused(
    nodes: int | None, buffer_size: int | None, message: str
) -> None:
    """A node count outside the federation, or a K no version could fill, is a DemoError."""
    with pytest.raises(DemoError, match=message):
        first_sites(PNEUMONIA, nodes, buffer_size)


def test_run_demo_refuses_bad_nodes_before_starting_anything() -> None:
    """run_demo checks --nodes before it starts a broker or a process."""
    with pytest.raises(DemoError, match=r"must be 1\.\.4"):
        run_demo(DemoConfig(federation="heart-disease", nodes=5, broker_url="mqtt://127.0.0.1:1"))
