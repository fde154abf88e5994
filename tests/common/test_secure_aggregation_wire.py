"""Specification of secure aggregation on the wire: its events round-trip through envelopes and
the inbound path, the key directory takes only records the federation's CA proves, and the
policy travels in the knobs and the manifest, off by default."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from pydantic import ValidationError

from aggregator.settings import AggregatorSettings
from common.codec import encode, envelope
from common.inbound import Inbound, receive
from common.messages import (
    AggregationRule,
    Body,
    Compression,
    Knobs,
    Quantization,
    SecAggAnswer,
    SecAggKey,
    SecureAggregation,
)
from common.secure_aggregation import KeyRecord, Term, sign_key_record
from common.secure_aggregation.directory import KeyDirectory
from common.secure_aggregation.events import (
    Receipt,
    SealedShare,
    UnmaskAnswer,
    UnmaskRefusal,
    UnmaskRequest,
)
from common.secure_aggregation.wire import (
    WireRefusal,
    WireRefused,
    answer_of,
    key_record_of,
    receipts_of,
    share_of,
    to_answer,
    to_key_record,
    to_receipt,
    to_share,
    to_unmask,
    unmask_of,
)
from common.topics import Topic, TopicTree
from edge_node.secure_keys import SecureAggregationUnavailable, own_key_record
from healthnet.deploy.pki import CertificateAuthority, IssuedCertificate

FEDERATION = "heart"
NOW = dt.datetime(2026, 12, 6, 12, tzinfo=dt.UTC)
DIGEST = "ab" * 32
tree = TopicTree(FEDERATION)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(FEDERATION, days=30, now=NOW)


@pytest.fixture(scope="module")
def issued(ca: CertificateAuthority) -> dict[str, IssuedCertificate]:
    return {
        name: ca.issue_client(name, federation=FEDERATION, days=30, now=NOW)
        for name in ("cleveland", "hungarian")
    }


def record(identity: str, certificate: IssuedCertificate, key: X25519PublicKey) -> KeyRecord:
    return sign_key_record(
        federation=FEDERATION,
        identity=identity,
        public_key=key,
        certificate_pem=certificate.certificate,
        signing_key_pem=certificate.private_key,
    )


def inbound(topic: Topic, body: Body, sender: str) -> Inbound:
    """``body`` as the inbound path hands it over after the broker delivered it on ``topic``."""
    payload = encode(envelope(body, sender=sender, sent_at=1.0))
    received = receive(str(topic), payload, topics=tree, max_bytes=1 << 22)
    assert isinstance(received, Inbound), received
    return received


def raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# -- the events round-trip


def test_a_key_record_round_trips(issued: dict[str, IssuedCertificate]) -> None:
    """A key record comes back from the wire as the record that was published."""
    sent = record("cleveland", issued["cleveland"], X25519PrivateKey.generate().public_key())
    got = key_record_of(inbound(tree.secagg_key("cleveland"), to_key_record(sent), "cleveland"))
    assert got == sent


def test_a_sealed_share_round_trips_even_when_it_travels_out_of_line() -> None:
    """A share of a large model (over 64 KiB: after the envelope's document) comes back whole,
    with the sender the topic and envelope name."""
    share = SealedShare("u-1", "cleveland", "hungarian", DIGEST, bytes(range(256)) * 400)
    got = share_of(
        inbound(tree.secagg_share("hungarian", "cleveland"), to_share(share), "cleveland")
    )
    assert got == share


def test_receipts_unmask_requests_and_answers_round_trip() -> None:
    """Receipts, an unmask request, an answer and a refusal come back as the events sent."""
    receipts = (Receipt("hungarian", "u-1"), Receipt("hungarian", "u-2"))
    topic = tree.secagg_receipt("hungarian")
    assert receipts_of(inbound(topic, to_receipt(DIGEST, receipts), "hungarian")) == (
        DIGEST,
        receipts,
    )
    request = UnmaskRequest("f-1", DIGEST, (Term("u-1", "cleveland", 1024), Term("u-2", "va", 7)))
    got = unmask_of(
        inbound(tree.secagg_unmask("hungarian"), to_unmask(request), "aggregator"), "aggregator"
    )
    assert got == request
    answers: list[UnmaskAnswer | UnmaskRefusal] = [
        UnmaskAnswer("f-1", "hungarian", bytes(range(16))),
        UnmaskRefusal("f-1", "hungarian", "u-1 was released in another sum"),
    ]
    for answer in answers:
        topic = tree.secagg_answer("hungarian")
        assert answer_of(inbound(topic, to_answer(answer), "hungarian")) == answer


def test_one_receipt_message_is_one_holders() -> None:
    """Receipts of two holders cannot be sent as one holder's message."""
    with pytest.raises(ValueError, match="one holder's"):
        to_receipt(DIGEST, (Receipt("hungarian", "u-1"), Receipt("va", "u-2")))


def test_an_answer_has_a_sum_or_a_refusal_never_both_nor_neither() -> None:
    with pytest.raises(ValidationError, match="a share sum, or a refusal"):
        SecAggAnswer(fold_id="f-1")
    with pytest.raises(ValidationError, match="a share sum, or a refusal"):
        SecAggAnswer(fold_id="f-1", share_sum=b"\0" * 4, refusal="no")


# -- the inbound path's refusals


def test_a_message_whose_envelope_names_another_sender_than_its_topic_is_refused(
    issued: dict[str, IssuedCertificate],
) -> None:
    """On every route a hospital writes, the envelope's sender must be the topic's node."""
    key = to_key_record(
        record("cleveland", issued["cleveland"], X25519PrivateKey.generate().public_key())
    )
    share = to_share(SealedShare("u-1", "cleveland", "hungarian", DIGEST, b"\0" * 64))
    cases = [
        key_record_of(inbound(tree.secagg_key("cleveland"), key, "hungarian")),
        share_of(inbound(tree.secagg_share("hungarian", "cleveland"), share, "va")),
        receipts_of(
            inbound(
                tree.secagg_receipt("hungarian"),
                to_receipt(DIGEST, (Receipt("va", "u-1"),)),
                "va",
            )
        ),
        answer_of(
            inbound(
                tree.secagg_answer("hungarian"),
                to_answer(UnmaskAnswer("f", "va", b"\0" * 4)),
                "va",
            )
        ),
    ]
    for refusal in cases:
        assert isinstance(refusal, WireRefusal)
        assert refusal.reason is WireRefused.WRONG_SENDER


def test_a_share_for_another_recipient_than_its_topics_is_refused() -> None:
    """A share sealed for hungarian, delivered on va's share topic, is refused before opening."""
    share = to_share(SealedShare("u-1", "cleveland", "hungarian", DIGEST, b"\0" * 64))
    refusal = share_of(inbound(tree.secagg_share("va", "cleveland"), share, "cleveland"))
    assert refusal == WireRefusal(
        WireRefused.WRONG_RECIPIENT, "a share for 'hungarian' on 'va''s topic"
    )


def test_an_unmask_request_from_anyone_but_the_aggregator_is_refused() -> None:
    request = to_unmask(UnmaskRequest("f-1", DIGEST, (Term("u-1", "cleveland", 1),)))
    refusal = unmask_of(inbound(tree.secagg_unmask("hungarian"), request, "va"), "aggregator")
    assert isinstance(refusal, WireRefusal)
    assert refusal.reason is WireRefused.WRONG_SENDER


def test_a_body_on_another_route_than_its_own_is_refused() -> None:
    """The converters hold each body to its route (the inbound path already does; this is
    their own guard)."""
    answer = inbound(
        tree.secagg_answer("hungarian"), to_answer(UnmaskRefusal("f", "h", "no")), "hungarian"
    )
    for convert in (key_record_of, share_of, receipts_of):
        refusal = convert(answer)
        assert isinstance(refusal, WireRefusal)
        assert refusal.reason is WireRefused.WRONG_ROUTE


def test_a_key_record_body_takes_only_raw_bytes_of_the_right_sizes() -> None:
    """A public key of 31 bytes, or text where bytes belong, never validates."""
    fields = {
        "federation": FEDERATION,
        "identity": "cleveland",
        "public_key": bytes(32),
        "certificate": b"pem",
        "signature": b"sig",
    }
    SecAggKey.model_validate(fields)
    for bad in ({"public_key": bytes(31)}, {"public_key": "x" * 32}, {"certificate": "pem"}):
        with pytest.raises(ValidationError):
            SecAggKey.model_validate(fields | bad)


# -- the key directory


def directory(ca: CertificateAuthority) -> KeyDirectory:
    return KeyDirectory(
        federation=FEDERATION, ca_certificate_pem=ca.certificate_pem, clock=lambda: NOW
    )


def offer(
    keys: KeyDirectory, topic_node: str, sent: KeyRecord, sender: str | None = None
) -> object:
    topic = tree.secagg_key(topic_node)
    return keys.offer(inbound(topic, to_key_record(sent), sender or topic_node))


def test_the_directory_takes_records_its_ca_proves(
    ca: CertificateAuthority, issued: dict[str, IssuedCertificate]
) -> None:
    keys = directory(ca)
    assert keys.missing(("cleveland", "hungarian")) == ("cleveland", "hungarian")
    public = X25519PrivateKey.generate().public_key()
    got = offer(keys, "cleveland", record("cleveland", issued["cleveland"], public))
    assert isinstance(got, X25519PublicKey)
    assert raw(got) == raw(public)
    key = keys.key("cleveland")
    assert key is not None
    assert raw(key) == raw(public)
    assert keys.missing(("cleveland", "hungarian")) == ("hungarian",)
    assert not keys.refusals


def test_a_substituted_key_is_refused_logged_and_counted_and_never_replaces_the_proven_one(
    ca: CertificateAuthority,
    issued: dict[str, IssuedCertificate],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A key whose record a rogue CA's certificate signs (what a broker or aggregator could
    make), a record of another hospital republished on this one's topic, a record whose
    signature was altered, and one that another identity sent: each refused with its reason,
    counted, and the verified key stays."""
    keys = directory(ca)
    public = X25519PrivateKey.generate().public_key()
    offer(keys, "cleveland", record("cleveland", issued["cleveland"], public))
    rogue = CertificateAuthority.create(FEDERATION, days=30, now=NOW)
    forged = rogue.issue_client("cleveland", federation=FEDERATION, days=30, now=NOW)
    attacker = X25519PrivateKey.generate().public_key()
    hungarian = record("hungarian", issued["hungarian"], attacker)
    altered = record("cleveland", issued["cleveland"], attacker)
    altered = KeyRecord(
        altered.federation,
        altered.identity,
        raw(X25519PrivateKey.generate().public_key()),
        altered.certificate,
        altered.signature,
    )
    caplog.set_level(logging.WARNING, "common.secure_aggregation.directory")
    refusals = [
        offer(keys, "cleveland", record("cleveland", forged, attacker)),
        offer(keys, "cleveland", hungarian),
        offer(keys, "cleveland", altered),
        offer(keys, "cleveland", record("cleveland", issued["cleveland"], attacker), "hungarian"),
    ]
    details = [r.detail for r in refusals if isinstance(r, WireRefusal)]
    assert len(details) == 4
    assert "not issued by the federation's CA" in details[0]
    assert "names 'hungarian'" in details[1]
    assert "signature does not verify" in details[2]
    assert keys.refusals == {WireRefused.KEY_NOT_PROVEN: 3, WireRefused.WRONG_SENDER: 1}
    assert (
        caplog.text.count("refused the key record on healthnet/v1/heart/secagg/keys/cleveland") == 4
    )
    key = keys.key("cleveland")
    assert key is not None
    assert raw(key) == raw(public)


def test_a_proven_new_key_replaces_the_old_one(
    ca: CertificateAuthority, issued: dict[str, IssuedCertificate]
) -> None:
    """A hospital that made a new key (its key file was lost) publishes a new record: taken."""
    keys = directory(ca)
    offer(
        keys,
        "cleveland",
        record("cleveland", issued["cleveland"], X25519PrivateKey.generate().public_key()),
    )
    new = X25519PrivateKey.generate().public_key()
    offer(keys, "cleveland", record("cleveland", issued["cleveland"], new))
    key = keys.key("cleveland")
    assert key is not None
    assert raw(key) == raw(new)


def test_an_expired_certificate_is_refused(
    ca: CertificateAuthority, issued: dict[str, IssuedCertificate]
) -> None:
    keys = KeyDirectory(
        federation=FEDERATION,
        ca_certificate_pem=ca.certificate_pem,
        clock=lambda: NOW + dt.timedelta(days=60),
    )
    got = offer(
        keys,
        "cleveland",
        record("cleveland", issued["cleveland"], X25519PrivateKey.generate().public_key()),
    )
    assert isinstance(got, WireRefusal)
    assert "is not valid at" in got.detail


# -- the node's own record


def write_identity(
    tmp_path: Path, ca: CertificateAuthority, certificate: IssuedCertificate
) -> dict[str, Path]:
    paths = {
        "ca_file": tmp_path / "ca.crt",
        "cert_file": tmp_path / "node.crt",
        "key_file": tmp_path / "node.key",
    }
    paths["ca_file"].write_bytes(ca.certificate_pem)
    paths["cert_file"].write_bytes(certificate.certificate)
    paths["key_file"].write_bytes(certificate.private_key)
    return paths


def test_a_node_signs_its_key_with_its_client_certificate(
    tmp_path: Path, ca: CertificateAuthority, issued: dict[str, IssuedCertificate]
) -> None:
    key = X25519PrivateKey.generate()
    paths = write_identity(tmp_path, ca, issued["cleveland"])
    own = own_key_record(
        federation=FEDERATION, identity="cleveland", agreement_key=key, now=NOW, **paths
    )
    got = offer(directory(ca), "cleveland", own)
    assert isinstance(got, X25519PublicKey)
    assert raw(got) == raw(key.public_key())


def test_a_password_mode_node_cannot_take_part_and_says_why(tmp_path: Path) -> None:
    """`deploy init --auth password` issues no client certificates: nothing to sign a key with."""
    with pytest.raises(SecureAggregationUnavailable, match=r"--auth mtls"):
        own_key_record(
            federation=FEDERATION,
            identity="cleveland",
            agreement_key=X25519PrivateKey.generate(),
            cert_file=None,
            key_file=None,
            ca_file=tmp_path / "ca.crt",
            now=NOW,
        )


def test_a_node_with_another_identitys_certificate_fails_at_start(
    tmp_path: Path, ca: CertificateAuthority, issued: dict[str, IssuedCertificate]
) -> None:
    """Its own record would be refused by every peer: the node says so before publishing it."""
    paths = write_identity(tmp_path, ca, issued["hungarian"])
    with pytest.raises(SecureAggregationUnavailable, match="another identity's"):
        own_key_record(
            federation=FEDERATION,
            identity="cleveland",
            agreement_key=X25519PrivateKey.generate(),
            now=NOW,
            **paths,
        )


# -- the policy in the knobs and the manifest


HOLDERS = ("cleveland", "hungarian", "switzerland", "va")


def test_secure_aggregation_is_off_by_default() -> None:
    assert Knobs().secure_aggregation is None


def test_the_policy_in_the_knobs_is_the_cores_policy() -> None:
    """The wire form builds the policy of common.secure_aggregation.policy: same digest."""
    settings = SecureAggregation(holders=HOLDERS, privacy=1)
    knobs = Knobs(buffer_size=3, secure_aggregation=settings)
    assert knobs.secure_aggregation is not None
    policy = knobs.secure_aggregation.policy()
    assert (policy.scheme.threshold, policy.contributors) == (3, 3)
    assert len(policy.digest()) == 64


@pytest.mark.parametrize(
    ("knobs", "reason"),
    [
        pytest.param({"buffer_size": 2}, "below the 3 distinct hospitals", id="buffer-too-small"),
        pytest.param({"buffer_size": 17}, "above the policy's max_terms 16", id="buffer-too-big"),
        pytest.param(
            {"buffer_size": 3, "compression": Compression(top_k=0.1)}, "top-k", id="top-k"
        ),
        pytest.param(
            {"buffer_size": 3, "compression": Compression(quantization=Quantization.INT8)},
            "value quantization",
            id="int8",
        ),
        pytest.param(
            {"buffer_size": 3, "aggregation": AggregationRule.MEDIAN},
            "robust rules",
            id="median",
        ),
    ],
)
def test_knobs_secure_aggregation_cannot_serve_are_refused(
    knobs: dict[str, object], reason: str
) -> None:
    with pytest.raises(ValidationError, match=f"secure_aggregation: .*{reason}"):
        Knobs(secure_aggregation=SecureAggregation(holders=HOLDERS), **knobs)  # type: ignore[arg-type]


def test_a_policy_the_core_refuses_does_not_validate() -> None:
    """A recovery threshold at or below (N + T) / 2 would let a mask be unmasked twice."""
    with pytest.raises(ValidationError, match="unmasked in two different sums"):
        SecureAggregation(holders=HOLDERS, privacy=1, recovery=2)


def test_the_aggregator_takes_the_policy_and_refuses_the_knobs_it_cannot_serve(
    tmp_path: Path,
) -> None:
    """The service folds masked updates (aggregator/service.py); settings the policy cannot
    serve still never validate, even arriving as an environment's JSON."""
    knobs = Knobs(buffer_size=3, secure_aggregation=SecureAggregation(holders=HOLDERS))
    settings = AggregatorSettings(state_dir=tmp_path, knobs=knobs)
    assert settings.knobs.secure_aggregation == SecureAggregation(holders=HOLDERS)
    with pytest.raises(ValidationError, match=r"secure_aggregation: .*robust rules"):
        AggregatorSettings(
            state_dir=tmp_path,
            knobs={  # type: ignore[arg-type]
                "buffer_size": 3,
                "aggregation": "median",
                "secure_aggregation": {"holders": list(HOLDERS)},
            },
        )
