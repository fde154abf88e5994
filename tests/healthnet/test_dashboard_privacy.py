"""The dashboard under differential privacy, on a real Mosquitto: each hospital's epsilon against
its budget, in the snapshot and drawn as a bar in the system's headless Chromium."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from common.messages import NodeState, NodeStatus, NodeTally, PrivacySpend
from healthnet.dashboard import DashboardServer
from tests.healthnet.test_dashboard import (
    Publisher,
    eventually,
    feed,
    get,
    publisher,
    server,
    tree,
)
from tests.healthnet.test_dashboard_browser import chromium
from tests.samples import privacy_spend, status

__all__ = ["chromium", "feed", "publisher", "server", "tree"]  # the fixtures this module uses

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


def ledger(epsilon: float, budget: float) -> PrivacySpend:
    return privacy_spend(epsilon=epsilon, epsilon_budget=budget, steps=30, versions=3)


def publish_private_run(publisher: Publisher) -> None:
    """Three hospitals: one reporting its ledger itself, one known by the aggregator's tally
    only, one without DP."""
    tree = publisher.tree
    tallies = (
        NodeTally(node="cleveland", accepted=3, epsilon=1.0, epsilon_budget=4.0),
        NodeTally(node="hungarian", accepted=2, epsilon=1.5, epsilon_budget=2.0),
        NodeTally(node="va", accepted=1),
    )
    spent = status(3, nodes=tallies, updated_at=time.time()).model_copy(
        update={"budgets_spent": True}
    )
    publisher.send(tree.aggregator_status(), spent)
    own = NodeStatus(state=NodeState.BUDGET_SPENT, version=3, privacy=ledger(3.98, 4.0))
    publisher.send(tree.node_status("cleveland"), own, "cleveland")


def private_rows(url: str) -> dict[str, Any] | None:
    _, _, body = get(url + "api/snapshot")
    rows = {n["node"]: n for n in json.loads(body)["nodes"]}
    if set(rows) != {"cleveland", "hungarian", "va"} or rows["cleveland"]["epsilon"] != 3.98:
        return None
    return rows


def test_the_snapshot_shows_the_epsilon_each_hospital_reported(
    server: DashboardServer, publisher: Publisher
) -> None:
    """The node's own ledger when its status carries one, else the aggregator's tally."""
    publish_private_run(publisher)
    rows = eventually(lambda: private_rows(server.url), "every hospital's epsilon")
    got = {node: (row["epsilon"], row["epsilon_budget"]) for node, row in rows.items()}
    assert got == {"cleveland": (3.98, 4.0), "hungarian": (1.5, 2.0), "va": (None, None)}
    assert rows["cleveland"]["state"] == "budget_spent"


_BUDGETS = """() => Object.fromEntries([...document.querySelectorAll("#nodes tbody tr")].map(r => {
  const cell = r.cells[r.cells.length - 1];
  const bar = cell.querySelector(".meter > div");
  return [r.dataset.node, {text: cell.querySelector("span")?.textContent ?? cell.textContent,
    width: bar ? bar.style.width : null, meter: bar ? bar.parentElement.className : null,
    title: cell.title}];
}))"""


def test_the_page_draws_a_budget_bar_per_hospital(
    chromium: str, server: DashboardServer, publisher: Publisher
) -> None:
    """Each DP hospital's row ends with epsilon / budget and a bar filled to their ratio."""
    from playwright.sync_api import sync_playwright

    publish_private_run(publisher)
    eventually(lambda: private_rows(server.url), "every hospital's epsilon")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url)
            page.wait_for_function(
                "() => document.querySelectorAll('#nodes tbody tr').length === 3",
                timeout=30_000,
                polling=100,
            )
            budgets = page.evaluate(_BUDGETS)
            buffer_note = page.text_content("#buffer-sub")
        finally:
            browser.close()
    assert errors == []
    assert buffer_note == "every hospital's privacy budget is spent"
    assert budgets["cleveland"]["text"] == "3.98 / 4"
    assert budgets["cleveland"]["width"] == "99.5%"
    assert budgets["cleveland"]["meter"] == "meter spent"  # its status says budget_spent
    assert "trains no more" in budgets["cleveland"]["title"]
    assert budgets["hungarian"]["text"] == "1.50 / 2"
    assert (budgets["hungarian"]["width"], budgets["hungarian"]["meter"]) == ("75%", "meter")
    assert budgets["va"] == {"text": "\u2013", "width": None, "meter": None, "title": ""}
