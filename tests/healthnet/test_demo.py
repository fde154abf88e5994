"""Specification of the demo's choice of sites and versions, checked before anything starts."""

from __future__ import annotations

import pytest
from rich.console import Console

from healthnet.demo import DemoConfig, DemoError, DemoResult, first_sites, render, run_demo
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


def test_the_summary_gives_wire_and_dense_bytes_per_update_the_right_way_round() -> None:
    """A heart-disease run, whose updates outweigh their 112 dense bytes, is not called smaller."""
    result = DemoResult(
        mean_accuracy=0.8,
        pooled_accuracy=0.8,
        per_node={"cleveland": 0.8},
        versions=60,
        updates_folded=180,
        wall_seconds=10.0,
        mode="fedbuff",
        buffer_size=3,
        federation="heart-disease",
        broker="mosquitto",
        min_staleness_factor={},
        updates_per_node={},
        bytes_per_update=559.0,
        dense_bytes_per_update=112.0,
        compression_ratio=112 / 559,
    )
    console = Console(record=True, width=200, color_system=None)
    render(result, console)
    text = console.export_text()
    assert (
        "per update: 559 bytes on the wire, 112 as dense float32 (5.0x larger than dense)" in text
    )
    assert "smaller" not in text
    assert result.to_json()["dense_bytes_per_update"] == 112.0
