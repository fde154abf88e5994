// The healthNET dashboard page: renders the server's snapshots (GET /api/snapshot, then the
// /api/events stream). Every value is written with textContent, never as HTML.
"use strict";

(function () {
  const PALETTE = ["#2f6fdb", "#e4572e", "#17a398", "#f2a541", "#8e5ad8", "#c2185b",
    "#4e8f2f", "#795548", "#00838f", "#5c6bc0"];
  const $ = (id) => document.getElementById(id);
  const state = { snapshot: null, charts: { accuracy: null, staleness: null }, nodes: "" };
  window.healthnet = state;

  function fmtBytes(n) {
    if (n == null) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
  }
  function fmtAge(s) {
    if (s == null) return "–";
    if (s < 1) return "now";
    if (s < 90) return s.toFixed(0) + " s ago";
    if (s < 5400) return (s / 60).toFixed(0) + " min ago";
    return (s / 3600).toFixed(1) + " h ago";
  }
  const fmt = (v, digits) => (v == null ? "–" : v.toFixed(digits));
  function text(id, value) { $(id).textContent = value; }
  function cell(row, value, cls) {
    const td = row.insertCell();
    td.textContent = value;
    if (cls) td.className = cls;
    return td;
  }
  function setBadge(id, label, cls) {
    const el = $(id);
    el.textContent = label;
    el.className = "badge " + (cls || "");
  }
  function colour(i) { return PALETTE[i % PALETTE.length]; }
  function width(el) { return Math.max(240, el.clientWidth); }

  // -- charts

  function accuracyChart(nodes) {
    const el = $("accuracy-chart");
    if (state.charts.accuracy) state.charts.accuracy.destroy();
    const series = [{ label: "version" }];
    nodes.forEach((node, i) => series.push({
      label: node, stroke: colour(i), width: 2, spanGaps: true,
      points: { show: true, size: 4, fill: colour(i) },
      value: (u, v) => fmt(v, 3),
    }));
    series.push({ label: "mean", stroke: "#1d2330", width: 2.5, dash: [8, 5], spanGaps: true,
      points: { show: false }, value: (u, v) => fmt(v, 3) });
    state.charts.accuracy = new uPlot({
      width: width(el), height: 300,
      scales: { x: { time: false }, y: { range: [0, 1] } },
      axes: [{ label: "global version" }, { label: "test accuracy" }],
      legend: { live: true },
      series,
    }, [[], ...series.slice(1).map(() => [])], el);
  }

  function stalenessChart() {
    const el = $("staleness-chart");
    state.charts.staleness = new uPlot({
      width: width(el), height: 240,
      scales: { x: { time: false, range: (u, lo, hi) => [lo - 0.6, hi + 0.6] },
        y: { range: (u, lo, hi) => [0, Math.max(1, hi) * 1.1] } },
      axes: [{ label: "staleness (versions)", incrs: [1, 2, 5, 10, 20, 50] },
        { label: "updates" }],
      legend: { show: false },
      series: [{}, { label: "updates", fill: "#2f6fdb99", stroke: "#2f6fdb",
        paths: uPlot.paths.bars({ size: [0.7, 60] }), points: { show: false } }],
    }, [[], []], el);
  }

  function updateCharts(s) {
    const acc = s.accuracy;
    const nodes = Object.keys(acc.nodes).sort();
    const key = nodes.join(",");
    if (!state.charts.accuracy || key !== state.nodes) {
      state.nodes = key;
      accuracyChart(nodes);
    }
    state.charts.accuracy.setData([acc.versions, ...nodes.map((n) => acc.nodes[n]), acc.mean]);
    const counts = s.staleness_counts.length ? s.staleness_counts : [0];
    state.charts.staleness.setData([counts.map((_, i) => i), counts]);
  }

  // -- tables and cards

  // Under differential privacy: the epsilon a hospital has spent, as a bar against its budget.
  function budgetCell(row, n) {
    const td = row.insertCell();
    td.className = "num budget";
    if (n.epsilon == null) {
      td.textContent = "–";
      return;
    }
    const label = document.createElement("span");
    label.textContent = n.epsilon.toFixed(2) +
      (n.epsilon_budget == null ? "" : " / " + n.epsilon_budget);
    td.append(label);
    if (!n.epsilon_budget) return;
    const share = n.epsilon / n.epsilon_budget;
    const spent = share >= 1 || n.state === "budget_spent";
    const meter = document.createElement("div");
    meter.className = "meter" + (spent ? " spent" : share > 0.8 ? " near" : "");
    const bar = document.createElement("div");
    bar.style.width = Math.min(100, 100 * share).toFixed(1) + "%";
    meter.append(bar);
    td.append(meter);
    td.title = (100 * share).toFixed(0) + "% of the privacy budget spent" +
      (spent ? "; the hospital trains no more" : "");
  }

  function renderNodes(s) {
    const body = $("nodes").tBodies[0];
    const nodes = Object.keys(s.accuracy.nodes).sort();
    body.replaceChildren();
    for (const n of s.nodes) {
      const row = body.insertRow();
      row.dataset.node = n.node;
      const name = cell(row, n.node);
      const i = nodes.indexOf(n.node);
      if (i >= 0) {
        const sw = document.createElement("span");
        sw.className = "swatch";
        sw.style.background = colour(i);
        name.prepend(sw);
      }
      cell(row, n.state, "state-" + n.state);
      cell(row, n.version == null ? "–" : "v" + n.version, "num");
      cell(row, n.lag == null ? "–" : String(n.lag), "num" + (n.lag > 5 ? " warn" : ""));
      cell(row, fmtAge(n.last_seen_seconds), "num");
      cell(row, String(n.accepted), "num");
      const reasons = Object.entries(n.rejections).map(([r, c]) => r + " " + c).join(", ");
      const rej = cell(row, String(n.rejected), "num" + (n.rejected ? " bad" : ""));
      if (reasons) rej.title = reasons;
      cell(row, String(n.folded), "num");
      cell(row, fmtBytes(n.bytes_sent), "num");
      cell(row, n.last_staleness == null ? "–" : String(n.last_staleness), "num");
      cell(row, n.accuracy == null ? "–" : n.accuracy.toFixed(3) + " @v" + n.eval_version, "num");
      // Under personalisation: the hospital's own model on the same test split and version.
      const personal = cell(row, n.personal_accuracy == null ? "–" : n.personal_accuracy.toFixed(3),
        "num" + (n.personal_accuracy != null && n.accuracy != null &&
          n.personal_accuracy < n.accuracy ? " warn" : ""));
      if (n.personal_accuracy != null) personal.title = "personal model at v" + n.eval_version;
      budgetCell(row, n);
    }
  }

  function renderKnobs(s) {
    const body = $("knobs").tBodies[0];
    body.replaceChildren();
    const flat = [];
    for (const [k, v] of Object.entries(s.knobs)) {
      if (v !== null && typeof v === "object") {
        for (const [k2, v2] of Object.entries(v)) flat.push([k + "." + k2, v2]);
      } else {
        flat.push([k, v]);
      }
    }
    for (const [k, v] of flat) {
      const row = body.insertRow();
      cell(row, k);
      cell(row, v === null ? "–" : String(v), "num");
    }
  }

  function renderVersions(s) {
    const body = $("versions").tBodies[0];
    body.replaceChildren();
    for (const v of [...s.recent_versions].reverse().slice(0, 12)) {
      const row = body.insertRow();
      cell(row, "v" + v.version, "num");
      cell(row, v.nodes.join(", "));
      cell(row, v.mean_staleness.toFixed(1), "num");
      cell(row, fmtBytes(v.bytes), "num");
      cell(row, (1000 * v.fold_seconds).toFixed(1), "num");
      cell(row, v.train_loss.toFixed(3), "num");
      cell(row, v.reason.replace("_", " ") + (v.secure ? " · secure" : ""));
    }
  }

  function render(s) {
    state.snapshot = s;
    text("federation", s.federation);
    setBadge("run-state", s.state || "no status yet", s.state || "");
    if (!s.connected) setBadge("link", "broker lost", "lost");
    text("version", s.version == null ? "–" : "v" + s.version);
    text("run-id", (s.run_id || "") +
      (s.status_age_seconds == null ? "" : " · status " + fmtAge(s.status_age_seconds)));
    text("rate", fmt(s.versions_per_minute, 1));
    text("mean-accuracy", fmt(s.latest_mean_accuracy, 3));
    text("mean-accuracy-sub", s.latest_mean_personal_accuracy == null
      ? "latest of every hospital"
      : "personal models: " + fmt(s.latest_mean_personal_accuracy, 3));
    const k = s.buffer_size;
    text("buffer", k == null ? "–" : s.buffer_fill + " / " + k);
    text("buffer-sub", s.budgets_spent ? "every hospital's privacy budget is spent" : "");
    $("buffer-bar").style.width = k ? Math.min(100, (100 * s.buffer_fill) / k) + "%" : "0";
    const c = s.counters;
    text("updates", String(c.accepted));
    text("updates-sub", c.received + " received, " + c.rejected + " rejected, " +
      c.duplicates + " duplicates");
    text("bytes", fmtBytes(c.bytes_received));
    text("bytes-sub", s.update_size ? "per update: " + s.update_size : "");
    updateCharts(s);
    renderNodes(s);
    renderKnobs(s);
    renderVersions(s);
  }

  function connect() {
    const events = new EventSource("/api/events");
    events.addEventListener("snapshot", (e) => {
      const s = JSON.parse(e.data);
      if (s.connected) setBadge("link", "live", "live");
      render(s);
    });
    events.onerror = () => {
      // The browser retries on its own; keep showing the last picture meanwhile.
      setBadge("link", "reconnecting…", "reconnecting");
    };
  }

  stalenessChart();
  fetch("/api/snapshot").then((r) => r.json()).then(render).catch(() => {}).finally(connect);
  window.addEventListener("resize", () => {
    for (const [id, chart] of [["accuracy-chart", state.charts.accuracy],
      ["staleness-chart", state.charts.staleness]]) {
      if (chart) chart.setSize({ width: width($(id)), height: chart.height });
    }
  });
})();
