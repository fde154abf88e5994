"""Specification of secure aggregation's keys: records signed by the federation's PKI, sealed
shares, and the rules a share holder keeps."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from common.secure_aggregation import (
    KeyRecord,
    KeyRefused,
    ShareContext,
    ShareRefused,
    Term,
    minimum_contributors,
    open_share,
    release_refusal,
    seal_share,
    sign_key_record,
    sum_digest,
    verify_key_record,
)
from healthnet.deploy.pki import CertificateAuthority, IssuedCertificate

FEDERATION = "heart"
NOW = dt.datetime(2026, 12, 6, 12, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create(FEDERATION, days=30, now=NOW)


@pytest.fixture(scope="module")
def certificates(ca: CertificateAuthority) -> dict[str, IssuedCertificate]:
    return {
        name: ca.issue_client(name, federation=FEDERATION, days=30, now=NOW)
        for name in ("cleveland", "hungarian")
    }


def record_for(
    identity: str, issued: IssuedCertificate, key: X25519PrivateKey | None = None
) -> KeyRecord:
    return sign_key_record(
        federation=FEDERATION,
        identity=identity,
        public_key=(key or X25519PrivateKey.generate()).public_key(),
        certificate_pem=issued.certificate,
        signing_key_pem=issued.private_key,
    )


def raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def verify(record: KeyRecord, ca: CertificateAuthority, **overrides: object) -> X25519PublicKey:
    fields: dict[str, object] = {
        "ca_certificate_pem": ca.certificate_pem,
        "federation": FEDERATION,
        "identity": "cleveland",
        "now": NOW,
    }
    fields.update(overrides)
    return verify_key_record(record, **fields)  # type: ignore[arg-type]


# -- key records


def test_a_record_signed_by_the_hospitals_certificate_is_accepted(
    ca: CertificateAuthority, certificates: dict[str, IssuedCertificate]
) -> None:
    """The verified key is the hospital's own X25519 public key."""
    key = X25519PrivateKey.generate()
    record = record_for("cleveland", certificates["cleveland"], key)
    assert raw(verify(record, ca)) == raw(key.public_key())


def test_a_substituted_public_key_is_refused(
    ca: CertificateAuthority, certificates: dict[str, IssuedCertificate]
) -> None:
    """The broker swaps the key in a genuine record for its own: the signature no longer fits."""
    record = record_for("cleveland", certificates["cleveland"])
    forged = dataclasses.replace(record, public_key=raw(X25519PrivateKey.generate().public_key()))
    with pytest.raises(KeyRefused, match="signature"):
        verify(forged, ca)


def test_a_key_signed_by_another_hospital_is_refused(
    ca: CertificateAuthority, certificates: dict[str, IssuedCertificate]
) -> None:
    """Hungarian signs a key in cleveland's name with its own, valid certificate: refused."""
    forged = record_for("cleveland", certificates["hungarian"])
    with pytest.raises(KeyRefused, match="another identity"):
        verify(forged, ca)


def test_a_key_signed_by_a_certificate_from_another_ca_is_refused(ca: CertificateAuthority) -> None:
    """The aggregator makes its own CA and a 'cleveland' certificate: not the federation's CA."""
    rogue = CertificateAuthority.create(FEDERATION, days=30, now=NOW)
    forged = record_for(
        "cleveland", rogue.issue_client("cleveland", federation=FEDERATION, days=30, now=NOW)
    )
    with pytest.raises(KeyRefused, match="not issued by the federation's CA"):
        verify(forged, ca)


def test_an_unsigned_record_is_refused(
    ca: CertificateAuthority, certificates: dict[str, IssuedCertificate]
) -> None:
    """A record with no signature proves nothing."""
    record = dataclasses.replace(record_for("cleveland", certificates["cleveland"]), signature=b"")
    with pytest.raises(KeyRefused, match="signature"):
        verify(record, ca)


def test_a_record_with_no_certificate_is_refused(
    ca: CertificateAuthority, certificates: dict[str, IssuedCertificate]
) -> None:
    """A record without a parseable certificate is refused with a reason."""
    record = dataclasses.replace(
        record_for("cleveland", certificates["cleveland"]), certificate=b""
    )
    with pytest.raises(KeyRefused, match="does not parse"):
        verify(record, ca)


def test_a_record_for_another_identity_or_federation_than_expected_is_refused(
    ca: CertificateAuthority, certificates: dict[str, IssuedCertificate]
) -> None:
    """A genuine record of hungarian, retained on cleveland's topic, is not cleveland's key."""
    record = record_for("hungarian", certificates["hungarian"])
    with pytest.raises(KeyRefused, match="expected 'cleveland'"):
        verify(record, ca)
    with pytest.raises(KeyRefused, match="expected 'hungarian' of 'pneumonia'"):
        verify(record, ca, identity="hungarian", federation="pneumonia")


def test_a_certificate_of_another_federation_is_refused(ca: CertificateAuthority) -> None:
    """The same CA's certificate for cleveland in another federation does not sign for this."""
    other = ca.issue_client("cleveland", federation="pneumonia", days=30, now=NOW)
    with pytest.raises(KeyRefused, match="not for federation 'heart'"):
        verify(record_for("cleveland", other), ca)


def test_an_expired_certificate_is_refused(
    ca: CertificateAuthority, certificates: dict[str, IssuedCertificate]
) -> None:
    """A record checked after its certificate expired is refused."""
    record = record_for("cleveland", certificates["cleveland"])
    with pytest.raises(KeyRefused, match="not valid"):
        verify(record, ca, now=NOW + dt.timedelta(days=31))


def test_the_brokers_server_certificate_cannot_sign_a_hospitals_key(
    ca: CertificateAuthority,
) -> None:
    """A server certificate named like a hospital is not a client signing certificate."""
    server = ca.issue_server("cleveland", days=30, now=NOW)
    with pytest.raises(KeyRefused):
        verify(record_for("cleveland", server), ca)


# -- sealed shares

CONTEXT = ShareContext(
    federation=FEDERATION, sender="cleveland", recipient="hungarian", update_id="u-1"
)


def test_a_sealed_share_opens_for_its_recipient_only() -> None:
    """The recipient opens it with its key and the sender's; a third hospital cannot."""
    sender, recipient, third = (X25519PrivateKey.generate() for _ in range(3))
    sealed = seal_share(sender, recipient.public_key(), CONTEXT, b"share bytes")
    assert b"share bytes" not in sealed
    assert open_share(recipient, sender.public_key(), CONTEXT, sealed) == b"share bytes"
    with pytest.raises(ShareRefused, match="does not open"):
        open_share(third, sender.public_key(), CONTEXT, sealed)


@pytest.mark.parametrize(
    "context",
    [
        pytest.param(dataclasses.replace(CONTEXT, update_id="u-2"), id="another-update"),
        pytest.param(dataclasses.replace(CONTEXT, sender="va"), id="another-sender"),
        pytest.param(dataclasses.replace(CONTEXT, federation="pneumonia"), id="another-federation"),
    ],
)
def test_a_sealed_share_does_not_open_as_another_updates_or_senders(context: ShareContext) -> None:
    """The broker cannot replay a share as another update's or pass it off as another sender's."""
    sender, recipient = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    sealed = seal_share(sender, recipient.public_key(), CONTEXT, b"share bytes")
    with pytest.raises(ShareRefused):
        open_share(recipient, sender.public_key(), context, sealed)


def test_an_altered_or_truncated_share_is_refused() -> None:
    """One flipped bit or a short message: refused, never returned."""
    sender, recipient = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    sealed = bytearray(seal_share(sender, recipient.public_key(), CONTEXT, b"share bytes"))
    sealed[-1] ^= 1
    with pytest.raises(ShareRefused, match="does not open"):
        open_share(recipient, sender.public_key(), CONTEXT, bytes(sealed))
    with pytest.raises(ShareRefused, match="bytes"):
        open_share(recipient, sender.public_key(), CONTEXT, bytes(sealed[:20]))


def test_a_low_order_key_is_refused() -> None:
    """An all-zero public key yields no shared secret: the share is refused, not sealed."""
    with pytest.raises(ShareRefused, match="unusable"):
        seal_share(
            X25519PrivateKey.generate(),
            X25519PublicKey.from_public_bytes(bytes(32)),
            CONTEXT,
            b"x",
        )


# -- the holder's rules

TERMS = [Term("a-1", "cleveland", 3), Term("b-1", "hungarian", 1), Term("c-1", "va", 2)]
HELD = {"a-1", "b-1", "c-1", "d-1"}


def refusal(
    terms: list[Term],
    *,
    released: dict[str, str] | None = None,
    fold_id: str = "f-1",
    held: set[str] = HELD,
) -> str | None:
    return release_refusal(fold_id, terms, held=held, released=released or {}, min_contributors=3)


def test_a_holder_answers_a_sum_of_enough_hospitals_it_holds_shares_of() -> None:
    """Three distinct hospitals, all shares held, nothing released before: answer."""
    assert refusal(TERMS) is None


def test_a_holder_answers_the_same_sum_again() -> None:
    """The aggregator that crashed after asking asks again the same sum: answered again."""
    released = {t.update_id: sum_digest("f-1", TERMS) for t in TERMS}
    assert refusal(TERMS, released=released) is None


@pytest.mark.parametrize(
    ("terms", "released", "fold_id", "reason"),
    [
        pytest.param(TERMS[:2], {}, "f-1", "fewer than 3", id="too-few-hospitals"),
        pytest.param(
            [*TERMS[:2], Term("a-2", "cleveland", 1)], {}, "f-1", "fewer than 3", id="same-hospital"
        ),
        pytest.param([*TERMS, TERMS[0]], {}, "f-1", "twice", id="duplicate-update"),
        pytest.param([*TERMS[:2], Term("c-1", "va", 0)], {}, "f-1", "outside", id="zero-weight"),
        pytest.param(
            [*TERMS[:2], Term("e-1", "va", 1)], {}, "f-1", "no share held for e-1", id="not-held"
        ),
        pytest.param(
            TERMS, {"a-1": sum_digest("f-0", TERMS)}, "f-1", "another sum: a-1", id="other-fold"
        ),
        pytest.param(
            [Term("a-1", "cleveland", 4), *TERMS[1:]],
            {t.update_id: sum_digest("f-1", TERMS) for t in TERMS},
            "f-1",
            "another sum: a-1",
            id="same-fold-other-weights",
        ),
        pytest.param(
            [TERMS[0], TERMS[1], Term("d-1", "va", 2)],
            {t.update_id: sum_digest("f-1", TERMS) for t in TERMS},
            "f-2",
            "another sum: a-1, b-1",
            id="same-masks-other-partners",
        ),
    ],
)
def test_a_holder_refuses_a_sum_that_could_reveal_a_mask(
    terms: list[Term], released: dict[str, str], fold_id: str, reason: str
) -> None:
    """A sum too small, a mask released in another sum, or a share it does not hold: refused,
    saying which."""
    got = refusal(terms, released=released, fold_id=fold_id)
    assert got is not None
    assert reason in got


def test_the_minimum_number_of_contributors_keeps_two_honest_hospitals_in_every_sum() -> None:
    """T colluders plus two, never below 2 nor the buffer size."""
    assert minimum_contributors(privacy=1) == 3
    assert minimum_contributors(privacy=2) == 4
    assert minimum_contributors(privacy=1, buffer_size=5) == 5
