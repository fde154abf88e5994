"""Chunked model broadcast: split a blob into retained chunks, and reassemble and verify it.

The aggregator publishes a version's chunks first and its manifest last, but a subscriber may see
them in any order (retained messages on a new subscription, a reconnect mid-download). The
:class:`ModelDownload` state machine accepts both orders, keeps chunks of at most a couple of
versions, and yields a blob only once its size and sha256 match the manifest.
"""

from __future__ import annotations

import hashlib

from common.errors import IntegrityError
from common.messages import Manifest

__all__ = ["ModelDownload", "split_blob"]


def split_blob(blob: bytes, chunk_size: int) -> list[bytes]:
    """Split ``blob`` into chunks of ``chunk_size`` bytes (at least one chunk, maybe empty)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    return [blob[i : i + chunk_size] for i in range(0, len(blob), chunk_size)] or [b""]


class ModelDownload:
    """Collects the chunks of the newest announced version and verifies the assembled blob."""

    def __init__(self, *, max_blob_bytes: int, keep_versions: int = 2) -> None:
        self._max_blob_bytes = max_blob_bytes
        self._keep_versions = keep_versions
        self._chunks: dict[int, dict[int, bytes]] = {}
        self._manifest: Manifest | None = None
        self._done_key: tuple[str, int] | None = None

    @property
    def manifest(self) -> Manifest | None:
        return self._manifest

    def on_manifest(self, manifest: Manifest) -> None:
        """Note the latest announced version; older pending chunks are dropped."""
        if manifest.blob_bytes > self._max_blob_bytes:
            raise IntegrityError(
                f"manifest v{manifest.version} announces {manifest.blob_bytes} bytes, "
                f"over the limit of {self._max_blob_bytes}"
            )
        if self._manifest is not None and _newer_or_same(self._manifest, manifest):
            return
        self._manifest = manifest
        for version in [v for v in self._chunks if v < manifest.version]:
            del self._chunks[version]

    def on_chunk(self, version: int, index: int, data: bytes) -> None:
        """Store a chunk; empty payloads (cleared retained chunks) and old versions are ignored."""
        if not data:
            return
        current = self._manifest
        if current is not None:
            if version < current.version or (version == current.version and self._done(current)):
                return
            if version == current.version and index >= current.chunk_count:
                raise IntegrityError(
                    f"chunk {index} of v{version} is beyond its {current.chunk_count} chunks"
                )
        if len(data) > self._max_blob_bytes:
            raise IntegrityError(f"chunk {index} of v{version} is larger than any allowed blob")
        self._chunks.setdefault(version, {})[index] = data
        while len(self._chunks) > self._keep_versions:
            del self._chunks[min(self._chunks)]

    def take(self) -> tuple[Manifest, bytes] | None:
        """Return the announced version's verified blob once, when every chunk is in."""
        manifest = self._manifest
        if manifest is None or self._done(manifest):
            return None
        chunks = self._chunks.get(manifest.version, {})
        # Count only the announced indices: a stray chunk stored before the manifest arrived
        # (when no bound was known) must not make a download look complete.
        have = sum(1 for index in chunks if index < manifest.chunk_count)
        if have < manifest.chunk_count and manifest.blob_bytes > 0:
            return None
        blob = b"".join(chunks.get(i, b"") for i in range(manifest.chunk_count))
        self._chunks.pop(manifest.version, None)
        if len(blob) != manifest.blob_bytes or hashlib.sha256(blob).hexdigest() != manifest.sha256:
            raise IntegrityError(
                f"model v{manifest.version}: assembled {len(blob)} bytes do not match the "
                f"manifest ({manifest.blob_bytes} bytes, sha256 {manifest.sha256[:12]}…)"
            )
        self._done_key = (manifest.run_id, manifest.version)
        return manifest, blob

    def _done(self, manifest: Manifest) -> bool:
        return self._done_key == (manifest.run_id, manifest.version)


def _newer_or_same(current: Manifest, incoming: Manifest) -> bool:
    # A new run restarts numbering, so only compare versions within one run.
    return current.run_id == incoming.run_id and current.version >= incoming.version
