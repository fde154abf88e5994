"""Specification of chunked model broadcast: split a blob, reassemble it in any order, verify it."""

from __future__ import annotations

import hashlib
import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.blobs import ModelDownload, split_blob
from common.errors import IntegrityError
from common.messages import Manifest, ModelSpec, TrainingConfig

BLOB = bytes(range(256)) * 4 + b"tail"  # 1028 bytes: three chunks of 400 with a remainder


def manifest_for(
    blob: bytes,
    *,
    version: int = 1,
    run_id: str = "run-a",
    chunk_size: int = 400,
    sha256: str | None = None,
    blob_bytes: int | None = None,
) -> Manifest:
    """The manifest the aggregator would publish for ``blob`` (fields overridable to lie)."""
    size = len(blob) if blob_bytes is None else blob_bytes
    return Manifest(
        run_id=run_id,
        version=version,
        sha256=sha256 or hashlib.sha256(blob).hexdigest(),
        blob_bytes=size,
        chunk_size=chunk_size,
        chunk_count=max(1, math.ceil(size / chunk_size)),
        model=ModelSpec(name="logreg", kwargs={"in_features": 4}),
        training=TrainingConfig(),
        created_at=0.0,
    )


def feed_chunks(download: ModelDownload, blob: bytes, version: int = 1, size: int = 400) -> None:
    for index, chunk in enumerate(split_blob(blob, size)):
        download.on_chunk(version, index, chunk)


@pytest.mark.parametrize(
    ("blob", "size", "expected"),
    [
        pytest.param(b"abcdef", 2, [b"ab", b"cd", b"ef"], id="exact-multiple"),
        pytest.param(b"abcdefg", 3, [b"abc", b"def", b"g"], id="remainder"),
        pytest.param(b"abc", 10, [b"abc"], id="smaller-than-chunk"),
        pytest.param(b"abc", 1, [b"a", b"b", b"c"], id="one-byte-chunks"),
        pytest.param(b"", 4, [b""], id="empty-blob-one-empty-chunk"),
    ],
)
def test_split_blob_cuts_fixed_size_chunks(blob: bytes, size: int, expected: list[bytes]) -> None:
    """split_blob returns chunk_size pieces, a shorter last one, and one empty chunk for b''."""
    assert split_blob(blob, size) == expected


@pytest.mark.parametrize("size", [pytest.param(0, id="zero"), pytest.param(-1, id="negative")])
def test_split_blob_needs_a_positive_chunk_size(size: int) -> None:
    """A chunk size below one is a programming error."""
    with pytest.raises(ValueError, match="positive"):
        split_blob(b"abc", size)


@given(blob=st.binary(max_size=200), size=st.integers(1, 50))
def test_split_blob_matches_the_manifest_arithmetic(blob: bytes, size: int) -> None:
    """Chunks join to the blob and their number is the manifest's chunk_count."""
    chunks = split_blob(blob, size)
    assert b"".join(chunks) == blob
    assert len(chunks) == max(1, math.ceil(len(blob) / size))
    assert all(len(c) == size for c in chunks[:-1])


def test_manifest_then_chunks_yields_the_blob_once() -> None:
    """Manifest first, then every chunk: take() yields the verified blob, then None."""
    download = ModelDownload(max_blob_bytes=10_000)
    manifest = manifest_for(BLOB)
    download.on_manifest(manifest)
    assert download.take() is None
    feed_chunks(download, BLOB)
    assert download.take() == (manifest, BLOB)
    assert download.take() is None
    feed_chunks(download, BLOB)  # a redelivery of the same version
    assert download.take() is None


def test_chunks_before_manifest_are_kept_until_it_arrives() -> None:
    """Chunks that arrive before their manifest are assembled once it does."""
    download = ModelDownload(max_blob_bytes=10_000)
    feed_chunks(download, BLOB)
    assert download.take() is None
    manifest = manifest_for(BLOB)
    download.on_manifest(manifest)
    assert download.take() == (manifest, BLOB)


@given(order=st.permutations(range(4)), manifest_at=st.integers(0, 4))
def test_any_arrival_order_assembles_the_same_blob(order: list[int], manifest_at: int) -> None:
    """Chunks in any order, with the manifest before, between or after them, give the blob."""
    download = ModelDownload(max_blob_bytes=10_000)
    chunks = split_blob(BLOB, 300)
    assert len(chunks) == 4
    manifest = manifest_for(BLOB, chunk_size=300)
    results = []
    for position, index in enumerate(order):
        if position == manifest_at:
            download.on_manifest(manifest)
            results.append(download.take())
        download.on_chunk(1, index, chunks[index])
        results.append(download.take())
    if manifest_at == len(order):
        download.on_manifest(manifest)
        results.append(download.take())
    assert [r for r in results if r is not None] == [(manifest, BLOB)]
    assert results[-1] == (manifest, BLOB)


def test_an_empty_blob_is_complete_with_its_manifest_alone() -> None:
    """A zero-byte blob has one empty chunk, which a cleared retained chunk cannot be told from."""
    download = ModelDownload(max_blob_bytes=100)
    manifest = manifest_for(b"")
    download.on_manifest(manifest)
    assert download.take() == (manifest, b"")


def test_empty_chunks_are_ignored_as_cleared_retained_messages() -> None:
    """A zero-length chunk payload (a cleared retained chunk) neither counts nor overwrites."""
    download = ModelDownload(max_blob_bytes=10_000)
    download.on_manifest(manifest_for(BLOB))
    feed_chunks(download, BLOB)
    download.on_chunk(1, 0, b"")
    download.on_chunk(1, 99, b"")  # not even out of range: it is nothing
    assert download.take() is not None


def test_an_empty_chunk_does_not_complete_a_download() -> None:
    """Empty payloads for missing indices leave the download incomplete."""
    download = ModelDownload(max_blob_bytes=10_000)
    download.on_manifest(manifest_for(BLOB))
    chunks = split_blob(BLOB, 400)
    download.on_chunk(1, 0, chunks[0])
    download.on_chunk(1, 1, chunks[1])
    download.on_chunk(1, 2, b"")
    assert download.take() is None
    download.on_chunk(1, 2, chunks[2])
    assert download.take() is not None


def test_a_newer_manifest_supersedes_a_pending_download() -> None:
    """When v2 is announced mid-download, v1's chunks are dropped and v2 is assembled."""
    new_blob = b"version two" * 50
    download = ModelDownload(max_blob_bytes=10_000)
    download.on_manifest(manifest_for(BLOB, version=1))
    download.on_chunk(1, 0, split_blob(BLOB, 400)[0])
    v2 = manifest_for(new_blob, version=2)
    download.on_manifest(v2)
    feed_chunks(download, new_blob, version=2)
    assert download.take() == (v2, new_blob)


def test_chunks_of_versions_older_than_the_manifest_are_dropped() -> None:
    """Chunks stored for v1 are discarded once v2 is announced; they are not kept for later."""
    download = ModelDownload(max_blob_bytes=10_000)
    feed_chunks(download, BLOB, version=1)
    download.on_manifest(manifest_for(b"two", version=2))
    # A new run that restarts at v1 with the very same blob must fetch it again.
    download.on_manifest(manifest_for(BLOB, version=1, run_id="run-b"))
    assert download.take() is None


def test_chunks_of_older_versions_are_ignored_after_the_manifest() -> None:
    """A late chunk of an older version is ignored, even one out of the current range."""
    download = ModelDownload(max_blob_bytes=10_000)
    v2 = manifest_for(b"two", version=2)
    download.on_manifest(v2)
    download.on_chunk(1, 0, b"stale")
    download.on_chunk(1, 99, b"stale")  # beyond v2's single chunk, but not v2's: no error
    download.on_chunk(2, 0, b"two")
    assert download.take() == (v2, b"two")


def test_an_older_manifest_of_the_same_run_is_ignored() -> None:
    """A retained v1 manifest seen after v2 (same run) does not roll the download back."""
    download = ModelDownload(max_blob_bytes=10_000)
    v2 = manifest_for(b"two", version=2)
    download.on_manifest(v2)
    download.on_manifest(manifest_for(BLOB, version=1))
    assert download.manifest == v2
    download.on_chunk(2, 0, b"two")
    assert download.take() == (v2, b"two")


def test_the_same_version_of_a_new_run_is_fetched_again() -> None:
    """After run-a v1 was taken, run-b's v1 is a different model and is assembled anew."""
    download = ModelDownload(max_blob_bytes=10_000)
    download.on_manifest(manifest_for(BLOB, version=1))
    feed_chunks(download, BLOB)
    assert download.take() is not None
    other = b"run b weights" * 10
    run_b = manifest_for(other, version=1, run_id="run-b")
    download.on_manifest(run_b)
    assert download.manifest == run_b
    assert download.take() is None
    feed_chunks(download, other)
    assert download.take() == (run_b, other)


def test_a_stray_chunk_beyond_the_count_does_not_complete_a_download() -> None:
    """take() waits for every index below chunk_count, whatever stray indices arrived earlier."""
    download = ModelDownload(max_blob_bytes=10_000)
    chunks = split_blob(BLOB, 400)
    download.on_chunk(1, 0, chunks[0])
    download.on_chunk(1, 1, chunks[1])
    download.on_chunk(1, 7, b"left over from an older run's bigger v1")
    download.on_manifest(manifest_for(BLOB))
    assert download.take() is None
    download.on_chunk(1, 2, chunks[2])
    assert download.take() == (manifest_for(BLOB), BLOB)


def test_a_sha256_mismatch_raises_integrity_error() -> None:
    """Chunks whose bytes do not hash to the manifest's sha256 are refused."""
    download = ModelDownload(max_blob_bytes=10_000)
    download.on_manifest(manifest_for(BLOB, sha256=hashlib.sha256(b"other").hexdigest()))
    feed_chunks(download, BLOB)
    with pytest.raises(IntegrityError, match=r"v1: assembled 1028 bytes do not match"):
        download.take()


def test_a_size_mismatch_raises_integrity_error() -> None:
    """Chunks that add up to fewer bytes than announced are refused."""
    download = ModelDownload(max_blob_bytes=10_000)
    short = BLOB[:-1]
    download.on_manifest(manifest_for(short, blob_bytes=len(BLOB), sha256="0" * 64))
    feed_chunks(download, short)
    with pytest.raises(IntegrityError, match=r"1027 bytes do not match the manifest \(1028 bytes"):
        download.take()


def test_a_tampered_chunk_raises_integrity_error() -> None:
    """Same size, one byte changed: the sha256 check catches it."""
    download = ModelDownload(max_blob_bytes=10_000)
    download.on_manifest(manifest_for(BLOB))
    tampered = bytearray(BLOB)
    tampered[500] ^= 0xFF
    feed_chunks(download, bytes(tampered))
    sha = manifest_for(BLOB).sha256
    reason = (
        f"model v1: assembled 1028 bytes do not match the manifest (1028 bytes, sha256 {sha[:12]}"
    )
    with pytest.raises(IntegrityError, match=f"^{re.escape(reason)}"):
        download.take()


def test_a_manifest_over_the_size_limit_is_refused() -> None:
    """A manifest announcing more than max_blob_bytes raises and is not adopted."""
    download = ModelDownload(max_blob_bytes=1000)
    with pytest.raises(IntegrityError, match="over the limit of 1000"):
        download.on_manifest(manifest_for(BLOB))
    assert download.manifest is None


def test_a_chunk_larger_than_any_blob_is_refused() -> None:
    """A single chunk over max_blob_bytes raises even before a manifest arrives."""
    download = ModelDownload(max_blob_bytes=10)
    with pytest.raises(IntegrityError, match="larger than any allowed blob"):
        download.on_chunk(1, 0, b"x" * 11)


def test_a_chunk_index_beyond_the_count_raises() -> None:
    """Chunk index >= chunk_count of the announced version is an integrity error."""
    download = ModelDownload(max_blob_bytes=10_000)
    download.on_manifest(manifest_for(BLOB))
    with pytest.raises(IntegrityError, match="chunk 3 of v1 is beyond its 3 chunks"):
        download.on_chunk(1, 3, b"extra")
