"""The dashboard under personalisation, on a real Mosquitto and in the system's headless
Chromium: each hospital's personal accuracy beside the global one."""

from __future__ import annotations

import time

import pytest

from common.messages import NodeTally
from healthnet.dashboard import DashboardServer
from tests.healthnet.test_dashboard import Publisher, feed, publisher, server, tree
from tests.healthnet.test_dashboard_browser import chromium
from tests.samples import status

__all__ = ["chromium", "feed", "publisher", "server", "tree"]  # the fixtures this module uses

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

_PERSONAL = """() => {
  const heads = [...document.querySelectorAll("#nodes thead th")].map(h => h.textContent);
  const at = heads.indexOf("personal");
  return Object.fromEntries([...document.querySelectorAll("#nodes tbody tr")].map(r =>
    [r.dataset.node, {text: r.cells[at].textContent, cls: r.cells[at].className}]));
}"""


def test_the_page_shows_each_hospitals_personal_accuracy(
    chromium: str, server: DashboardServer, publisher: Publisher
) -> None:
    """A personal column beside the accuracy; amber where it is below the global model; the
    personal models' mean under the mean accuracy."""
    from playwright.sync_api import sync_playwright

    tallies = (
        NodeTally(
            node="cleveland", eval_version=5, eval_accuracy=0.75, eval_personal_accuracy=0.85
        ),
        NodeTally(node="hungarian", eval_version=5, eval_accuracy=0.8, eval_personal_accuracy=0.7),
        NodeTally(node="va", eval_version=5, eval_accuracy=0.7),
    )
    publisher.send(
        publisher.tree.aggregator_status(), status(5, nodes=tallies, updated_at=time.time())
    )
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
            cells = page.evaluate(_PERSONAL)
            sub = page.text_content("#mean-accuracy-sub")
        finally:
            browser.close()
    assert errors == []
    assert cells["cleveland"] == {"text": "0.850", "cls": "num"}
    assert cells["hungarian"] == {"text": "0.700", "cls": "num warn"}
    assert cells["va"]["text"] == "\u2013"
    assert sub == "personal models: 0.775"
