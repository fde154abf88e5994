"""Specification of the compressed broadcast chain on a real Mosquitto: nodes that follow every
delta hold the aggregator's broadcast view exactly; a missed delta and a late join are mended by
the retained snapshot."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from common.blobs import ModelDownload
from common.broadcast_chain import ChainFollower, Held, view_blob
from common.broker_url import BrokerEndpoint
from common.codec import decode_tensors, sha256_hex
from common.errors import CompressionError
from common.inbound import Chunk, Inbound, receive
from common.messages import Compression, Knobs, Manifest, ModelDelta, Quantization
from common.mqtt import Message, MqttClient
from common.topics import TopicTree
from edge_node.service import NodeService
from edge_node.settings import NodeSettings
from tests.aggregator.test_service import (
    HEART,
    SHAPES,
    TRAINING_WAIT,
    WAIT,
    Aggregator,
    Peer,
)
from tests.brokers import EmbeddedBroker

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

CHAIN = Compression(top_k=0.25, quantization=Quantization.FP16)
LIMIT = 1 << 20


class Follower:
    """A node's model path and nothing else, on the real broker: the manifest and the delta
    always, the snapshot chunks only while its :class:`ChainFollower` wants them, as
    :class:`~edge_node.service.NodeService` subscribes. ``drop`` loses the deltas it selects."""

    def __init__(
        self,
        url: str,
        tree: TopicTree,
        name: str,
        drop: Callable[[ModelDelta], bool] = lambda _: False,
    ) -> None:
        self.tree = tree
        self.name = name
        self.drop = drop
        self.client = MqttClient(BrokerEndpoint.parse(url), f"{name}-{uuid.uuid4().hex[:8]}")
        self.client.subscribe(tree.manifest())
        self.client.subscribe(tree.delta())
        self.chain = ChainFollower()
        self.download = ModelDownload(max_blob_bytes=LIMIT)
        self.chunks = False
        self.held: list[Manifest] = []  # every version held, in order
        self.bytes = 0

    def __enter__(self) -> Follower:
        self.client.start()
        self._sync()
        return self

    def __exit__(self, *_: object) -> None:
        self.client.close()

    def _sync(self) -> None:
        want = self.chain.wants_snapshot
        if want != self.chunks:
            if want:
                self.client.subscribe(self.tree.all_chunks())
            else:
                self.client.unsubscribe(self.tree.all_chunks())
            self.chunks = want

    def _hold(self, held: Held | None) -> None:
        if held is not None:
            self.held.append(held.manifest)

    def pump(self, timeout: float) -> None:
        try:
            item = self.client.inbox.get(timeout=timeout)
        except queue.Empty:
            return
        if not isinstance(item, Message):
            return
        self.bytes += len(item.payload)
        match receive(item.topic, item.payload, topics=self.tree, max_bytes=LIMIT):
            case Chunk() as chunk:
                self.download.on_chunk(chunk.version, chunk.index, chunk.data)
            case Inbound(body=Manifest() as manifest):
                self.download.on_manifest(manifest)
                self.chain.on_manifest(manifest)
            case Inbound(body=ModelDelta() as delta) if not self.drop(delta):
                # A refusal is counted by the chain, which then wants the snapshot that mends it.
                with contextlib.suppress(CompressionError):
                    self._hold(self.chain.on_delta(delta))
            case _:
                pass
        ready = self.download.take()
        if ready is not None:
            manifest, blob = ready
            self._hold(self.chain.on_snapshot(manifest, decode_tensors(blob)))
        self._sync()

    def version(self) -> int | None:
        held = self.chain.held
        return None if held is None else held.manifest.version

    def wait_version(self, version: int, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while (held := self.version()) is None or held < version:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: holds v{self.version()}, not v{version}")
            self.pump(0.05)


def archived(state_dir: Path, version: int) -> dict[str, np.ndarray]:
    """The version's blob as the aggregator committed it (the broadcast view it announced)."""
    return decode_tensors((state_dir / "models" / f"v{version:08d}.blob").read_bytes())


def assert_holds(follower: Follower, state_dir: Path, version: int) -> None:
    """``follower`` holds ``version`` bit for bit as the aggregator broadcast it."""
    held = follower.chain.held
    assert held is not None
    assert held.manifest.version == version
    blob = (state_dir / "models" / f"v{version:08d}.blob").read_bytes()
    assert sha256_hex(view_blob(held.view, held.manifest.broadcast_dtype)) == sha256_hex(blob)
    for name, value in archived(state_dir, version).items():
        assert held.view[name].tobytes() == np.asarray(value, np.float32).tobytes()


def step(node: Peer, version: int, rng: np.random.Generator) -> None:
    """One update from ``version`` (buffer_size 1 folds it into the next)."""
    delta = {n: rng.normal(0, 0.05, s).astype(np.float32) for n, s in SHAPES.items()}
    node.send(node.update(version, delta=delta))
    node.record(version + 1)


@pytest.fixture
def followers(mosquitto: EmbeddedBroker, tree: TopicTree) -> Iterator[Callable[..., Follower]]:
    opened: list[Follower] = []

    def _open(name: str, drop: Callable[[ModelDelta], bool] = lambda _: False) -> Follower:
        follower = Follower(mosquitto.url, tree, name, drop).__enter__()
        opened.append(follower)
        return follower

    yield _open
    for follower in opened:
        follower.__exit__()


def test_nodes_that_follow_every_delta_hold_the_broadcast_view_and_gaps_take_the_snapshot(
    start: Callable[..., Aggregator],
    node: Peer,
    followers: Callable[..., Follower],
    tmp_path: Path,
) -> None:
    """Three nodes on one chain: one follows every delta (one snapshot, then deltas only), one
    loses the delta of v2 (its next delta names a base it lacks: it takes the snapshot), one
    joins at v3 (the retained snapshot, then deltas). All hold v5 exactly as broadcast."""
    aggregator = start(knobs=Knobs(buffer_size=1, broadcast_compression=CHAIN))
    node.aggregator = aggregator
    state_dir = tmp_path / "aggregator"
    node.model(0)
    steady = followers("steady")
    lossy = followers("lossy", drop=lambda d: d.manifest.version == 2)
    steady.wait_version(0)
    lossy.wait_version(0)
    rng = np.random.default_rng(0)
    for version in range(3):
        step(node, version, rng)
    late = followers("late")
    for version in range(3, 5):
        step(node, version, rng)
    for follower in (steady, lossy, late):
        follower.wait_version(5)
        assert_holds(follower, state_dir, 5)
    assert (steady.chain.snapshots, steady.chain.applied) == (1, 5)
    assert [m.version for m in steady.held] == [0, 1, 2, 3, 4, 5]
    assert lossy.chain.snapshots == 2  # v0, and the snapshot that mended the gap
    assert 2 not in [m.version for m in lossy.held]  # its delta was lost; the snapshot is later
    assert late.chain.snapshots == 1
    assert late.held[0].version >= 3
    assert late.held[-1].version == 5
    # Every manifest a node held is the one the aggregator logged for the version.
    logged = {
        r.version: r.model_sha256 for r in aggregator.service.journal.store.versions_backwards()
    }
    for manifest in steady.held[1:]:
        assert manifest.sha256 == logged[manifest.version]
    # The snapshot the run publishes is the view: a node that only downloads snapshots agrees.
    manifest, snapshot = node.model(5)
    assert manifest.broadcast_compression == CHAIN
    held = steady.chain.held
    assert held is not None
    for name, value in snapshot.items():
        assert held.view[name].tobytes() == np.asarray(value, np.float32).tobytes()


def test_a_real_node_follows_the_chain_trains_on_the_view_and_reports_what_it_received(
    start: Callable[..., Aggregator], node: Peer, mosquitto: EmbeddedBroker, tmp_path: Path
) -> None:
    """A hospital's node service takes v0's snapshot, then every version from its delta alone,
    trains on each, and its evaluations report the model bytes it received."""
    aggregator = start(
        model=HEART, knobs=Knobs(buffer_size=1, max_versions=4, broadcast_compression=CHAIN)
    )
    node.aggregator = aggregator
    node.model(0)
    hospital = NodeService(
        NodeSettings(
            broker_url=mosquitto.url,  # type: ignore[arg-type]
            federation=node.tree.federation,
            node_id="va",
            data="heart-disease:va",
            state_dir=tmp_path / "va",
            torch_threads=1,
        )
    )
    stop = threading.Event()
    thread = threading.Thread(target=hospital.run, args=(stop,), name="va")
    thread.start()
    try:
        node.record(4, timeout=TRAINING_WAIT)
        deadline = time.monotonic() + WAIT
        while hospital.session.version != 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(WAIT)
    chain = hospital._chain
    assert chain.held is not None
    assert chain.held.manifest.version == 4
    assert (chain.snapshots, chain.applied, chain.refused) == (1, 4, 0)
    assert_holds_view(chain.held, tmp_path / "aggregator", 4)


def assert_holds_view(held: Held, state_dir: Path, version: int) -> None:
    blob = (state_dir / "models" / f"v{version:08d}.blob").read_bytes()
    assert held.manifest.sha256 == sha256_hex(blob)
    assert sha256_hex(view_blob(held.view, held.manifest.broadcast_dtype)) == sha256_hex(blob)
