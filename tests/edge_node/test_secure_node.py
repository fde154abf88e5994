"""The node service's secure aggregation decisions, without a broker: joining a policy, masking
only with every holder's proven key, staging an update's shares before the outbox, holding,
receipting and answering, and refusing what does not come from where it must."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from aggregator.secure_unmask import PendingMasked, plan_fold, unmask
from common.codec import encode, envelope
from common.inbound import Inbound, receive
from common.messages import (
    Manifest,
    ModelSpec,
    SecAggAnswer,
    SecAggReceipt,
    SecAggTerm,
    SecAggUnmask,
    TrainingConfig,
    Update,
)
from common.outbox import Outbox
from common.secure_aggregation import from_bytes
from common.secure_aggregation.events import UnmaskAnswer
from common.secure_aggregation.policy import SecureAggregationPolicy
from common.secure_aggregation.wire import to_share, to_unmask
from common.topics import Route, Topic, TopicTree
from edge_node.secure_keys import SecureAggregationUnavailable
from edge_node.secure_node import (
    MAX_SETTLED,
    OutgoingShares,
    Publish,
    SecureNode,
    Unmasked,
    masked_update,
)
from edge_node.session import Job, JobKind
from edge_node.training import TrainResult
from healthnet.deploy.pki import CertificateAuthority

FEDERATION = "heart"
HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")
POLICY = SecureAggregationPolicy(holders=HOSPITALS)  # T = 1, U = 3
NOW = dt.datetime.now(dt.UTC)
TREE = TopicTree(FEDERATION)
PARAMS = {"w": np.zeros((2, 13), np.float32), "b": np.zeros(2, np.float32)}
SIZE = 28


def creds(root: Path, ca: CertificateAuthority, identity: str) -> dict[str, Path]:
    issued = ca.issue_client(identity, federation=FEDERATION, days=2, now=NOW)
    files = {"cert_file": root / f"{identity}.crt", "key_file": root / f"{identity}.key"}
    files["cert_file"].write_bytes(issued.certificate)
    files["key_file"].write_bytes(issued.private_key)
    files["ca_file"] = root / "ca.crt"
    files["ca_file"].write_bytes(ca.certificate_pem)
    return files


def create(root: Path, ca: CertificateAuthority, identity: str) -> SecureNode:
    return SecureNode.create(
        root / identity,
        topics=TREE,
        identity=identity,
        aggregator="aggregator",
        policy=POLICY,
        size=SIZE,
        now=NOW,
        **creds(root, ca, identity),
    )


def inbound(message: Publish) -> Inbound:
    received = receive(str(message[0]), message[1], topics=TREE, max_bytes=1 << 20)
    assert isinstance(received, Inbound), received
    return received


def pending(update_id: str, delta: np.ndarray, version: int = 3) -> Unmasked:
    manifest = Manifest(
        run_id="run-1",
        version=version,
        sha256="0" * 64,
        blob_bytes=1,
        chunk_size=1,
        chunk_count=1,
        model=ModelSpec(name="logreg", kwargs={"in_features": 13, "num_classes": 2}),
        training=TrainingConfig(),
        created_at=0.0,
    )
    result = TrainResult(params=PARAMS, loss=0.5, accuracy=0.7, seconds=0.1, num_samples=100)
    return Unmasked(
        job=Job(JobKind.TRAIN, manifest, PARAMS),
        result=result,
        delta=delta,
        update_id=update_id,
        encode_seconds=0.0,
    )


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(FEDERATION, days=2, now=NOW)


@pytest.fixture
def nodes(tmp_path: Path, ca: CertificateAuthority) -> Iterator[dict[str, SecureNode]]:
    with ExitStack() as stack:
        yield {h: stack.enter_context(create(tmp_path, ca, h)) for h in HOSPITALS}


def exchange_keys(nodes: dict[str, SecureNode]) -> None:
    records = [node.key_record(now=1.0) for node in nodes.values()]
    for node in nodes.values():
        for record in records:
            assert node.take(inbound(record), now=1.0) == ()


def deliver(nodes: dict[str, SecureNode], messages: tuple[Publish, ...]) -> list[Publish]:
    """Hand each share to its recipient; the receipts published in answer (and the sender's)."""
    out = [m for m in messages if m[0].route is Route.SECAGG_RECEIPT]
    for message in messages:
        if message[0].route is Route.SECAGG_SHARE:
            out += nodes[message[0].recipient or ""].take(inbound(message), now=2.0)
    return out


def test_a_node_without_a_client_certificate_cannot_join_the_policy(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    """A password-mode node has no certificate to sign its key with: it is told to use mTLS."""
    with pytest.raises(SecureAggregationUnavailable, match="--auth mtls"):
        SecureNode.create(
            tmp_path,
            topics=TREE,
            identity="va",
            aggregator="aggregator",
            policy=POLICY,
            size=SIZE,
            cert_file=None,
            key_file=None,
            ca_file=None,
            now=NOW,
        )


def test_a_node_off_the_roster_cannot_join_the_policy(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    with pytest.raises(ValueError, match="not a holder"):
        create(tmp_path, ca, "elsewhere")


def test_a_node_waits_for_every_holders_key_before_it_can_mask(
    nodes: dict[str, SecureNode],
) -> None:
    """Until three proven records arrive the node says whose it waits for and cannot mask."""
    node = nodes["cleveland"]
    assert node.missing() == ("hungarian", "switzerland", "va")
    assert node.status().waiting_for_keys == ("hungarian", "switzerland", "va")
    with pytest.raises(ValueError, match="no verified key"):
        node.mask(pending("u-1", np.zeros(SIZE)))
    node.take(inbound(nodes["hungarian"].key_record(now=1.0)), now=1.0)
    assert node.missing() == ("switzerland", "va")


def test_a_key_record_signed_by_another_hospital_is_refused(
    nodes: dict[str, SecureNode],
) -> None:
    """va's record republished on hungarian's topic is not hungarian's key."""
    _topic, payload = nodes["va"].key_record(now=1.0)
    node = nodes["cleveland"]
    forged = receive(str(TREE.secagg_key("hungarian")), payload, topics=TREE, max_bytes=1 << 20)
    assert isinstance(forged, Inbound)
    node.take(forged, now=1.0)
    assert "hungarian" in node.missing()
    assert sum(node.keys.refusals.values()) == 1


def test_masked_updates_are_held_receipted_and_unmasked_to_their_weighted_sum(
    nodes: dict[str, SecureNode], tmp_path: Path
) -> None:
    """Three hospitals mask and stage an update each; every holder stores and receipts every
    share; three holders' answers to the aggregator's request unmask the weighted sum."""
    exchange_keys(nodes)
    rng = np.random.default_rng(0)
    deltas = {h: rng.uniform(-0.5, 0.5, SIZE) for h in HOSPITALS[:3]}
    uploads = {}
    receipts: dict[str, set[str]] = {}
    for index, (sender, delta) in enumerate(deltas.items()):
        node = nodes[sender]
        outgoing = OutgoingShares(tmp_path / sender / "outgoing", TREE)
        outgoing.open()
        unmasked = pending(f"u-{index}", delta)
        secure = node.mask(unmasked)
        update = masked_update(unmasked, secure)
        assert update.delta == ()
        assert update.masked is not None
        payload = encode(envelope(update, sender=sender, sent_at=2.0))
        for message in deliver(nodes, node.stage(secure, payload, outgoing, now=2.0)):
            receipt = inbound(message)
            assert isinstance(receipt.body, SecAggReceipt)
            for update_id in receipt.body.update_ids:
                receipts.setdefault(update_id, set()).add(receipt.sender)
        uploads[sender] = secure.upload
    assert receipts == {f"u-{i}": set(HOSPITALS) for i in range(3)}
    fold = plan_fold(
        POLICY,
        "f-1",
        [
            PendingMasked(
                u.update_id, u.sender, 1.0, from_bytes(u.masked, SIZE), frozenset(HOSPITALS)
            )
            for u in uploads.values()
        ],
    )
    assert not isinstance(fold, str), fold
    request = encode(envelope(to_unmask(fold.request()), sender="aggregator", sent_at=3.0))
    answers: list[UnmaskAnswer] = []
    for holder in HOSPITALS[1:]:
        (answer,) = nodes[holder].take(inbound((TREE.secagg_unmask(holder), request)), now=3.0)
        answered = inbound(answer).body
        assert isinstance(answered, SecAggAnswer)
        assert answered.share_sum is not None
        answers.append(UnmaskAnswer(fold.fold_id, holder, bytes(answered.share_sum)))
    masked = {u.update_id: from_bytes(u.masked, SIZE) for u in uploads.values()}
    total = unmask(POLICY, fold, masked, answers)
    assert np.allclose(total, sum(deltas.values()), atol=4 * POLICY.plan.resolution)


def test_an_unmask_request_not_from_the_aggregator_is_refused_and_counted(
    nodes: dict[str, SecureNode],
) -> None:
    term = SecAggTerm(update_id="u-1", sender="va", weight=1)
    request = SecAggUnmask(fold_id="f-1", policy_digest=POLICY.digest(), terms=(term,))
    payload = encode(envelope(request, sender="va", sent_at=1.0))
    node = nodes["cleveland"]
    assert node.take(inbound((TREE.secagg_unmask("cleveland"), payload)), now=1.0) == ()
    assert node.refusals == {"wrong_sender": 1}


def test_staged_shares_are_resent_as_first_sent_and_a_lost_outbox_entry_is_recovered(
    nodes: dict[str, SecureNode], tmp_path: Path
) -> None:
    """A crash after the shares are staged and before the outbox entry: recovery puts the same
    update bytes in the outbox, and its shares are those first published, byte for byte."""
    exchange_keys(nodes)
    node = nodes["cleveland"]
    outgoing = OutgoingShares(tmp_path / "outgoing", TREE)
    outgoing.open()
    unmasked = pending("u-9", np.full(SIZE, 0.25))
    secure = node.mask(unmasked)
    payload = encode(envelope(masked_update(unmasked, secure), sender="cleveland", sent_at=2.0))
    published = node.stage(secure, payload, outgoing, now=2.0)
    shares = tuple(m for m in published if m[0].route is Route.SECAGG_SHARE)
    assert len(shares) == 3
    assert node.holder.held() == {"u-9": "cleveland"}

    outbox = Outbox(tmp_path / "outbox")
    outbox.open()
    again = OutgoingShares(tmp_path / "outgoing", TREE)
    again.open()
    assert again.recover(outbox) == ["u-9"]
    assert outbox.read("u-9") == payload
    assert again.shares("u-9", "cleveland") == shares
    assert again.recover(outbox) == []  # already in the outbox
    again.remove("u-9")
    assert again.shares("u-9", "cleveland") == ()


def test_the_same_request_after_a_restart_gets_the_same_answer(
    nodes: dict[str, SecureNode], tmp_path: Path, ca: CertificateAuthority
) -> None:
    exchange_keys(nodes)
    outgoing = OutgoingShares(tmp_path / "outgoing", TREE)
    outgoing.open()
    uploads = []
    for index, sender in enumerate(HOSPITALS[:3]):
        unmasked = pending(f"u-{index}", np.full(SIZE, 0.1 * index))
        secure = nodes[sender].mask(unmasked)
        payload = encode(envelope(masked_update(unmasked, secure), sender=sender, sent_at=2.0))
        deliver(nodes, nodes[sender].stage(secure, payload, outgoing, now=2.0))
        uploads.append(secure.upload)
    fold = plan_fold(
        POLICY,
        "f-2",
        [
            PendingMasked(
                u.update_id, u.sender, 1.0, from_bytes(u.masked, SIZE), frozenset(HOSPITALS)
            )
            for u in uploads
        ],
    )
    assert not isinstance(fold, str), fold
    request = encode(envelope(to_unmask(fold.request()), sender="aggregator", sent_at=3.0))
    topic: Topic = TREE.secagg_unmask("va")
    (first,) = nodes["va"].take(inbound((topic, request)), now=3.0)
    nodes["va"].__exit__(None, None, None)
    with create(tmp_path, ca, "va") as restarted:
        (second,) = restarted.take(inbound((topic, request)), now=4.0)
    one, two = inbound(first).body, inbound(second).body
    assert isinstance(one, SecAggAnswer)
    assert isinstance(two, SecAggAnswer)
    assert one.share_sum is not None
    assert bytes(one.share_sum) == bytes(two.share_sum or b"")


def test_the_masked_update_carries_no_plaintext_and_its_metadata_in_the_clear(
    nodes: dict[str, SecureNode],
) -> None:
    exchange_keys(nodes)
    unmasked = pending("u-5", np.full(SIZE, 0.5))
    update = masked_update(unmasked, nodes["va"].mask(unmasked))
    assert isinstance(update, Update)
    assert (update.base_version, update.num_samples, update.run_id) == (3, 100, "run-1")
    assert update.masked is not None
    assert len(bytes(update.masked.elements)) == 4 * SIZE


def stage_update(
    node: SecureNode, outgoing: OutgoingShares, update_id: str, version: int, value: float = 0.25
) -> tuple[Publish, ...]:
    unmasked = pending(update_id, np.full(SIZE, value), version)
    secure = node.mask(unmasked)
    payload = encode(envelope(masked_update(unmasked, secure), sender=node.identity, sent_at=2.0))
    return node.stage(secure, payload, outgoing, now=2.0)


def test_a_holder_whose_key_arrives_again_gets_its_shares_of_the_updates_in_the_window(
    nodes: dict[str, SecureNode], tmp_path: Path
) -> None:
    """Sent and settled (acked) updates within max_staleness of the newest version give the
    holder back its own shares, as first published; older settled ones are pruned."""
    exchange_keys(nodes)
    node = nodes["cleveland"]
    outgoing = OutgoingShares(tmp_path / "outgoing", TREE)
    outgoing.open()
    first = {
        update_id: stage_update(node, outgoing, update_id, version)
        for update_id, version in (("u-old", 3), ("u-acked", 10), ("u-sent", 25))
    }
    outgoing.settle("u-old", newest=12, window=20)
    outgoing.settle("u-acked", newest=12, window=20)

    again = outgoing.for_holder("va", "cleveland", newest=25, window=20)

    expected = tuple(m for u in ("u-acked", "u-sent") for m in first[u] if m[0].recipient == "va")
    assert len(expected) == 2
    assert again == expected
    assert outgoing.shares("u-old", "cleveland") == ()  # settled and out of the window: gone
    assert outgoing.for_holder("cleveland", "cleveland", newest=25, window=20) == ()
    outbox = Outbox(tmp_path / "outbox")
    outbox.open()
    assert outgoing.recover(outbox) == ["u-sent"]  # a settled update is not sent again


def test_settled_updates_are_kept_at_most_max_settled(tmp_path: Path) -> None:
    """However wide the window, only the newest MAX_SETTLED settled updates keep their shares."""
    outgoing = OutgoingShares(tmp_path / "outgoing", TREE)
    outgoing.open()
    share = (TREE.secagg_share("va", "cleveland"), b"sealed")
    for index in range(MAX_SETTLED + 2):
        outgoing.write(f"u-{index:03d}", b"update", (share,), base_version=index)
        outgoing.settle(f"u-{index:03d}", newest=index, window=1000)
    kept = outgoing.for_holder("va", "cleveland", newest=MAX_SETTLED + 1, window=1000)
    assert len(kept) == MAX_SETTLED
    assert outgoing.shares("u-000", "cleveland") == ()
    assert outgoing.shares("u-001", "cleveland") == ()
    assert outgoing.shares("u-002", "cleveland") == (share,)


def test_a_share_resent_identically_is_receipted_again_and_a_different_one_refused(
    nodes: dict[str, SecureNode], tmp_path: Path
) -> None:
    """The holder stores an identical share once and receipts it again; a second, different
    share for the same update id is refused and counted, and the first stays held."""
    exchange_keys(nodes)
    outgoing = OutgoingShares(tmp_path / "outgoing", TREE)
    outgoing.open()
    published = stage_update(nodes["cleveland"], outgoing, "u-1", 3)
    (to_va,) = (m for m in published if m[0].recipient == "va")
    (receipt,) = nodes["va"].take(inbound(to_va), now=2.0)
    held = (tmp_path / "va").rglob("u-1*")
    stored = {path: path.read_bytes() for path in held}
    assert stored

    (again,) = nodes["va"].take(inbound(to_va), now=3.0)
    assert inbound(again).body == inbound(receipt).body
    assert nodes["va"].holder.held()["u-1"] == "cleveland"
    assert {path: path.read_bytes() for path in stored} == stored

    remasked = nodes["cleveland"].mask(pending("u-1", np.full(SIZE, 0.5)))
    (share,) = (s for s in remasked.shares if s.recipient == "va")
    different = (
        TREE.secagg_share("va", "cleveland"),
        encode(envelope(to_share(share), sender="cleveland", sent_at=4.0)),
    )
    assert nodes["va"].take(inbound(different), now=4.0) == ()
    assert nodes["va"].inbox.refusals == {"share_refused": 1}
    assert {path: path.read_bytes() for path in stored} == stored


def test_a_reconnected_node_receipts_its_own_shares_of_its_recent_updates_again(
    nodes: dict[str, SecureNode], tmp_path: Path
) -> None:
    """The receipt of a node's own share is published once, when the update is staged; after a
    reconnect it goes again for the updates in the window, and only for shares the node keeps."""
    exchange_keys(nodes)
    outgoing = OutgoingShares(tmp_path / "outgoing", TREE)
    outgoing.open()
    stage_update(nodes["cleveland"], outgoing, "u-old", 3)
    stage_update(nodes["cleveland"], outgoing, "u-new", 25)
    outgoing.settle("u-old", newest=25, window=30)

    recent = outgoing.recent(newest=25, window=20)

    assert recent == ("u-new",)
    (receipt,) = nodes["cleveland"].own_receipts((*recent, "u-none"), now=5.0)
    body = inbound(receipt).body
    assert receipt[0] == TREE.secagg_receipt("cleveland")
    assert isinstance(body, SecAggReceipt)
    assert tuple(body.update_ids) == ("u-new",)
    assert nodes["va"].own_receipts(recent, now=5.0) == ()  # va keeps no own share of it
