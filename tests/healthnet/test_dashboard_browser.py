"""The web dashboard in a real browser (the system's headless Chromium) against a live demo run."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from healthnet.broker import EmbeddedBroker
from healthnet.federations import HEART_DISEASE

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(300)]

HOSPITALS = sorted(site.node_id for site in HEART_DISEASE.sites)
MIN_POINTS = 5  # accuracy points per hospital before the picture counts as live
MIN_VERSION = 40

# True once the accuracy chart holds MIN_POINTS for every hospital, the node table lists them
# all and the run has reached MIN_VERSION. Reads uPlot's own series, not the snapshot.
_READY = """([hospitals, minPoints, minVersion]) => {
  const h = window.healthnet;
  if (!h || !h.snapshot || !h.charts.accuracy) return false;
  const chart = h.charts.accuracy;
  const labels = chart.series.slice(1).map((s) => s.label);
  const plotted = hospitals.every((n) => {
    const i = labels.indexOf(n);
    return i >= 0 && chart.data[i + 1].filter((v) => v != null).length >= minPoints;
  });
  const rows = [...document.querySelectorAll("#nodes tbody tr")].map((r) => r.dataset.node);
  return plotted && hospitals.every((n) => rows.includes(n)) && h.snapshot.version >= minVersion;
}"""

_PICTURE = """() => {
  const chart = window.healthnet.charts.accuracy;
  const points = {};
  chart.series.slice(1).forEach((s, i) => {
    points[s.label] = chart.data[i + 1].filter((v) => v != null).length;
  });
  const rows = [...document.querySelectorAll("#nodes tbody tr")].map(
    (r) => [...r.cells].map((c) => c.textContent));
  const bars = window.healthnet.charts.staleness.data[1].reduce((a, b) => a + b, 0);
  return {points, rows, bars, version: document.getElementById("version").textContent,
    link: document.getElementById("link").textContent,
    run: document.getElementById("run-id").textContent,
    size: document.getElementById("bytes-sub").textContent};
}"""


def _chromium() -> str | None:
    for candidate in (os.environ.get("HEALTHNET_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


@pytest.fixture
def chromium() -> str:
    """The system's Chromium; CI sets HEALTHNET_REQUIRE_CHROMIUM=1 so that its absence fails."""
    path = _chromium()
    missing = None
    if path is None:
        missing = "no chromium on PATH (apt-get install chromium, or set HEALTHNET_CHROMIUM)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "the playwright package is not installed (pip install -e '.[dev]')"
    if missing is not None:
        if os.environ.get("HEALTHNET_REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"HEALTHNET_REQUIRE_CHROMIUM=1 but {missing}")
        pytest.skip(missing)
    assert path is not None
    return path


class DemoProcess:
    """`healthnet demo` as a child process whose stderr is read line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "healthnet", "demo", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._url: str | None = None
        self._found = threading.Event()
        self._reader = threading.Thread(target=self._read, name="demo-stderr", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if match := re.search(r"dashboard: (http://\S+)", line):
                self._url = match.group(1)
                self._found.set()
        self._found.set()

    def dashboard_url(self, timeout: float) -> str:
        self._found.wait(timeout)
        if self._url is None:
            raise AssertionError("the demo printed no dashboard URL:\n" + "".join(self.lines))
        return self._url

    def interrupt(self) -> None:
        """Ctrl-C, as a user would: the demo stops its processes on the way out."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture
def demo(mosquitto: EmbeddedBroker, tmp_path: Path) -> Iterator[DemoProcess]:
    """A long demo run (the test stops it) on the session Mosquitto, dashboard on a free port."""
    process = DemoProcess(
        "--broker-url", mosquitto.url,
        "--versions", "2000",
        "--dashboard-port", "0",
        "--workdir", str(tmp_path / "demo"),
        "--timeout", "280",
    )  # fmt: skip
    try:
        yield process
    finally:
        process.interrupt()


def test_dashboard_draws_every_hospital_live(
    chromium: str, demo: DemoProcess, tmp_path: Path
) -> None:
    """The page charts accuracy points for all four hospitals and lists them in the node table."""
    from playwright.sync_api import sync_playwright

    url = demo.dashboard_url(timeout=60)
    assert url.startswith("http://127.0.0.1:")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)
            page.wait_for_function(
                _READY, arg=[HOSPITALS, MIN_POINTS, MIN_VERSION], timeout=180_000, polling=250
            )
            page.wait_for_timeout(500)  # let the last push paint
            picture = page.evaluate(_PICTURE)
            screenshot = tmp_path / "dashboard.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert {n: picture["points"][n] >= MIN_POINTS for n in HOSPITALS} == dict.fromkeys(
        HOSPITALS, True
    ), picture["points"]
    assert picture["points"]["mean"] >= 1
    assert sorted(row[0] for row in picture["rows"]) == HOSPITALS
    assert picture["bars"] > 0, "the staleness histogram is empty"
    assert picture["link"] == "live"
    assert " · status " in picture["run"], picture["run"]  # the status's age
    # Heart disease: a logistic regression's update outweighs its dense float32 bytes.
    size = r"per update: [\d,]+ bytes on the wire, [\d,]+ as dense float32 \([\d.]+x larger "
    assert re.fullmatch(size + r"than dense\)", picture["size"]), picture["size"]
    assert screenshot.stat().st_size > 10_000
    if keep := os.environ.get("HEALTHNET_SCREENSHOT_DIR"):
        shutil.copy(screenshot, Path(keep) / "dashboard.png")
