"""The README's figure tables are exactly what benchmarks/figures.py renders from the JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks.figures import README, ROOT, TABLES, main, render_readme, stale_tables

JSON_FILES = sorted(
    [
        *(ROOT / "docs" / "benchmarks").glob("*.json"),
        *(ROOT / "benchmarks" / "results").glob("*.json"),
    ]
)
FULL_REVISION = re.compile(r"[0-9a-f]{40}")


@pytest.fixture(scope="module")
def rendered() -> str:
    """README.md as the generator renders it from the committed JSON."""
    return render_readme(README.read_text(encoding="utf-8"))


def test_readme_tables_equal_what_the_json_renders() -> None:
    """Every marked table in README.md is the generator's output (run `make figures` if not)."""
    assert stale_tables(README.read_text(encoding="utf-8")) == []


def test_a_hand_edited_cell_is_named_as_stale() -> None:
    """Changing one figure inside a table makes the check name that table."""
    text = README.read_text(encoding="utf-8")
    edited = text.replace("| 0.474 | 0.797 |", "| 0.480 | 0.797 |", 1)
    assert edited != text
    assert stale_tables(edited) == ["poisoning"]
    assert render_readme(edited) == text


def test_check_mode_exits_nonzero_on_a_stale_table(tmp_path: Path) -> None:
    """`python -m benchmarks.figures --check` fails on a stale README and passes on a fresh one."""
    readme = tmp_path / "README.md"
    text = README.read_text(encoding="utf-8")
    readme.write_text(text.replace("| 0.474 | 0.797 |", "| 0.480 | 0.797 |"), encoding="utf-8")
    assert main(["--check", "--readme", str(readme)]) == 1
    assert main(["--readme", str(readme)]) == 0
    assert readme.read_text(encoding="utf-8") == text
    assert main(["--check", "--readme", str(readme)]) == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "<!-- figures:nothing -->\n|\n<!-- /figures:nothing -->", "lacks", id="unknown"
        ),
        pytest.param("no markers at all", "no markers", id="missing"),
    ],
)
def test_markers_and_tables_correspond_one_to_one(text: str, message: str) -> None:
    """A marker naming no table, or a table the README does not mark, is refused."""
    with pytest.raises(ValueError, match=message):
        render_readme(text)


def test_every_table_is_marked_once() -> None:
    """Each table the generator knows has exactly one pair of markers in README.md."""
    text = README.read_text(encoding="utf-8")
    for name in TABLES:
        assert text.count(f"<!-- figures:{name} -->") == 1, name
        assert text.count(f"<!-- /figures:{name} -->") == 1, name


@pytest.mark.parametrize("path", JSON_FILES, ids=lambda p: p.name)
def test_every_benchmark_json_records_its_revision_and_machine(path: Path) -> None:
    """Each JSON names the machine and the git revision, or, where no revision was recorded,
    the commit that reported its figures; a historical one says why it is historical."""
    data = json.loads(path.read_text(encoding="utf-8"))
    machine = data["machine"]
    assert machine["cores"] >= 1
    assert machine.get("cpu") or machine.get("description")
    revision = machine["git_revision"]
    if revision is None:
        assert FULL_REVISION.fullmatch(data["reported_in"])
    else:
        assert FULL_REVISION.fullmatch(revision)
    if data.get("historical"):
        assert data["historical_why"]


@pytest.mark.parametrize("path", JSON_FILES, ids=lambda p: p.name)
def test_every_benchmark_json_feeds_a_table(path: Path, rendered: str) -> None:
    """No committed result sits unused: each JSON is named under a generated table."""
    assert f"`{path.relative_to(ROOT).as_posix()}`" in rendered


def test_fold_json_is_the_median_of_the_five_runs() -> None:
    """The committed fold run has the five runs' median dense 11.7 M ratio, and each of its
    ratios lies within the range the five runs span."""
    run = json.loads((ROOT / "docs/benchmarks/fold.json").read_text(encoding="utf-8"))
    runs = json.loads((ROOT / "docs/benchmarks/fold-runs.json").read_text(encoding="utf-8"))
    spans = {(r["model"], r["setting"]): r["ratio_to_numpy_add"] for r in runs["results"]}
    for r in run["results"]:
        ratio = spans[r["model"], r["setting"]]
        assert ratio["min"] - 0.005 <= r["ratio_to_numpy_add"] <= ratio["max"] + 0.005
    dense = next(
        r for r in run["results"] if (r["model"], r["setting"]) == ("resnet18", "dense-fp32")
    )
    assert round(dense["ratio_to_numpy_add"], 2) == spans["resnet18", "dense-fp32"]["median"]
