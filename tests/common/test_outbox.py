"""Specification of the node's outbox: updates persist on disk until acked, oldest first."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.outbox import Outbox


def opened(directory: Path) -> Outbox:
    outbox = Outbox(directory)
    outbox.open()
    return outbox


def test_open_creates_the_directory(tmp_path: Path) -> None:
    """open() creates a missing outbox directory (and its parents); a new outbox is empty."""
    outbox = opened(tmp_path / "a" / "outbox")
    assert (tmp_path / "a" / "outbox").is_dir()
    assert outbox.pending() == []
    assert len(outbox) == 0


def test_put_then_pending_then_remove(tmp_path: Path) -> None:
    """A put update is pending with its exact bytes until removed; remove says if it existed."""
    outbox = opened(tmp_path)
    outbox.put("u-1", b"\x00payload\xff")
    assert outbox.pending() == [("u-1", b"\x00payload\xff")]
    assert len(outbox) == 1
    assert outbox.remove("u-1") is True
    assert outbox.pending() == []
    assert outbox.remove("u-1") is False


def test_putting_the_same_id_again_replaces_it(tmp_path: Path) -> None:
    """One entry per update id: a second put overwrites, it does not duplicate."""
    outbox = opened(tmp_path)
    outbox.put("u-1", b"old")
    outbox.put("u-1", b"new")
    assert outbox.pending() == [("u-1", b"new")]


def test_pending_updates_survive_reopening(tmp_path: Path) -> None:
    """A new Outbox on the same directory (a restarted node) sees every unacked update."""
    first = opened(tmp_path)
    first.put("u-1", b"one")
    first.put("u-2", b"two")
    first.remove("u-1")
    again = opened(tmp_path)
    assert again.pending() == [("u-2", b"two")]


def test_stale_temp_files_are_removed_on_open(tmp_path: Path) -> None:
    """A .tmp left by a crash mid-write is deleted on open and never reported as pending."""
    outbox = opened(tmp_path)
    outbox.put("u-1", b"whole")
    (tmp_path / "u-2.update.tmp").write_bytes(b"half")
    assert outbox.pending() == [("u-1", b"whole")]
    opened(tmp_path)
    assert not (tmp_path / "u-2.update.tmp").exists()
    assert opened(tmp_path).pending() == [("u-1", b"whole")]


def test_foreign_files_are_ignored(tmp_path: Path) -> None:
    """Only `<id>.update` files are updates; anything else in the directory is left alone."""
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    (tmp_path / "-bad.update").write_bytes(b"x")
    outbox = opened(tmp_path)
    outbox.put("u-1", b"one")
    assert outbox.pending() == [("u-1", b"one")]
    assert len(outbox) == 1
    assert (tmp_path / "notes.txt").exists()


@pytest.mark.parametrize(
    "update_id",
    [
        pytest.param("", id="empty"),
        pytest.param("../escape", id="parent-directory"),
        pytest.param("a/b", id="slash"),
        pytest.param(".hidden", id="leading-dot"),
        pytest.param("-dash", id="leading-dash"),
        pytest.param("a b", id="space"),
        pytest.param("a" * 65, id="too-long"),
        pytest.param("a\n", id="newline"),
        pytest.param("ü", id="non-ascii"),
    ],
)
def test_invalid_update_ids_are_rejected(tmp_path: Path, update_id: str) -> None:
    """put and remove refuse ids that are not safe file names, and write nothing."""
    outbox = opened(tmp_path / "outbox")
    with pytest.raises(ValueError, match="invalid update id"):
        outbox.put(update_id, b"x")
    with pytest.raises(ValueError, match="invalid update id"):
        outbox.remove(update_id)
    assert list(tmp_path.rglob("*")) == [tmp_path / "outbox"]


def test_pending_lists_the_oldest_first(tmp_path: Path) -> None:
    """Updates come back in the order they were put, even when put in quick succession."""
    outbox = opened(tmp_path)
    ids = [f"u{i:02d}-{name}" for i, name in enumerate("zyxwvutsrqponmlkjihgfedcba")]
    for update_id in ids:
        outbox.put(update_id, update_id.encode())
    assert [update_id for update_id, _ in outbox.pending()] == ids
    assert [update_id for update_id, _ in opened(tmp_path).pending()] == ids


def test_ids_list_pending_updates_oldest_first_and_read_returns_their_bytes(tmp_path: Path) -> None:
    """ids() lists without reading payloads; read() gives a kept payload, None once removed."""
    outbox = opened(tmp_path)
    outbox.put("b", b"first")
    outbox.put("a", b"second")
    assert outbox.ids() == ["b", "a"]
    assert outbox.read("a") == b"second"
    outbox.remove("a")
    assert outbox.read("a") is None
