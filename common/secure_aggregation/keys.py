"""Key records signed by a hospital's deployment identity, and shares sealed end to end.

Theory of operation (docs/secure-aggregation.md#sharing-the-mask). Each hospital has an X25519
key-agreement key. Its key record names the federation, the hospital and the public key, and is
signed (ECDSA P-256, SHA-256) with the private key of the hospital's client certificate, which the
record carries. :func:`verify_key_record` accepts a record only when that certificate was issued
by the federation's CA, is valid at ``now``, is a client certificate for signing whose common
name and ``urn:healthnet:{federation}:{identity}`` name are the hospital the caller expects, and
the signature verifies; anything else raises :class:`KeyRefused` saying why. So a key made up by
the broker or the aggregator, or a record signed by another hospital, is refused.

Two hospitals derive the key of a share from their X25519 keys (HKDF-SHA256, bound to the
federation, the sender and the recipient, in that order); a share is sealed with
ChaCha20-Poly1305 under a random 96-bit nonce, with the federation, sender, recipient and update
id as associated data, so it opens only for its recipient, only as that update's share, and only
when its claimed sender sealed it.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ProtocolError
from common.secure_aggregation.field import RandomBytes

__all__ = [
    "PUBLIC_KEY_BYTES",
    "KeyRecord",
    "KeyRefused",
    "ShareContext",
    "ShareRefused",
    "open_share",
    "seal_share",
    "sign_key_record",
    "verify_key_record",
]

PUBLIC_KEY_BYTES = 32
_NONCE_BYTES = 12
_KEY_DOMAIN = b"healthnet secure aggregation key record v1"
_PAIR_DOMAIN = b"healthnet secure aggregation pair key v1"
_SHARE_DOMAIN = b"healthnet secure aggregation share v1"


class KeyRefused(ProtocolError):
    """A key record does not prove that its key belongs to the hospital it names."""


class ShareRefused(ProtocolError):
    """A sealed share does not open: not for us, not from its claimed sender, or altered."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A hospital's X25519 public key, signed with its client certificate's key."""

    federation: str
    identity: str
    public_key: bytes
    certificate: bytes = field(repr=False)
    signature: bytes = field(repr=False)

    def signed_bytes(self) -> bytes:
        return _signed_bytes(self.federation, self.identity, self.public_key)


def sign_key_record(
    *,
    federation: str,
    identity: str,
    public_key: X25519PublicKey,
    certificate_pem: bytes,
    signing_key_pem: bytes,
) -> KeyRecord:
    """The key record of ``public_key``, signed with the certificate's private key (PEM)."""
    signing_key = serialization.load_pem_private_key(signing_key_pem, password=None)
    if not isinstance(signing_key, ec.EllipticCurvePrivateKey):
        raise TypeError("a hospital's certificate key is an EC key")
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KeyRecord(
        federation=federation,
        identity=identity,
        public_key=raw,
        certificate=certificate_pem,
        signature=signing_key.sign(
            _signed_bytes(federation, identity, raw), ec.ECDSA(hashes.SHA256())
        ),
    )


def verify_key_record(
    record: KeyRecord,
    *,
    ca_certificate_pem: bytes,
    federation: str,
    identity: str,
    now: dt.datetime,
) -> X25519PublicKey:
    """The X25519 key of ``identity`` in ``federation``, once ``record`` proves it; else
    :class:`KeyRefused`."""
    if (record.federation, record.identity) != (federation, identity):
        raise KeyRefused(
            f"the record names {record.identity!r} of {record.federation!r}, "
            f"expected {identity!r} of {federation!r}"
        )
    if len(record.public_key) != PUBLIC_KEY_BYTES:
        raise KeyRefused(f"{identity}: a public key of {len(record.public_key)} bytes")
    certificate = _issued_certificate(record, ca_certificate_pem, now)
    _check_names(certificate, federation, identity)
    signer = certificate.public_key()
    if not isinstance(signer, ec.EllipticCurvePublicKey):
        raise KeyRefused(f"{identity}: the certificate's key is not an EC key")
    try:
        signer.verify(record.signature, record.signed_bytes(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise KeyRefused(f"{identity}: the signature does not verify") from exc
    return X25519PublicKey.from_public_bytes(record.public_key)


def _issued_certificate(
    record: KeyRecord, ca_certificate_pem: bytes, now: dt.datetime
) -> x509.Certificate:
    try:
        certificate = x509.load_pem_x509_certificate(record.certificate)
    except ValueError as exc:
        raise KeyRefused(f"{record.identity}: the certificate does not parse") from exc
    ca = x509.load_pem_x509_certificate(ca_certificate_pem)
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise KeyRefused(
            f"{record.identity}: the certificate was not issued by the federation's CA"
        ) from exc
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise KeyRefused(f"{record.identity}: the certificate is not valid at {now.isoformat()}")
    return certificate


def _check_names(certificate: x509.Certificate, federation: str, identity: str) -> None:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [name.value for name in names] != [identity]:
        raise KeyRefused(f"{identity}: the certificate is another identity's")
    try:
        alt = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        key_usage = certificate.extensions.get_extension_for_class(x509.KeyUsage)
    except x509.ExtensionNotFound as exc:
        raise KeyRefused(f"{identity}: the certificate is not a hospital's") from exc
    uris = alt.value.get_values_for_type(x509.UniformResourceIdentifier)
    if f"urn:healthnet:{federation}:{identity}" not in uris:
        raise KeyRefused(f"{identity}: the certificate is not for federation {federation!r}")
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usage.value or not key_usage.value.digital_signature:
        raise KeyRefused(f"{identity}: the certificate is not a client signing certificate")


@dataclass(frozen=True, slots=True)
class ShareContext:
    """Who sends one update's share to whom: the key and the associated data of its seal."""

    federation: str
    sender: str
    recipient: str
    update_id: str

    def associated_data(self) -> bytes:
        return _framed(_SHARE_DOMAIN, self.federation, self.sender, self.recipient, self.update_id)


def seal_share(
    own_key: X25519PrivateKey,
    recipient_key: X25519PublicKey,
    context: ShareContext,
    plaintext: bytes,
    random_bytes: RandomBytes = os.urandom,
) -> bytes:
    """``nonce || ciphertext`` of ``plaintext`` for ``context.recipient``."""
    nonce = random_bytes(_NONCE_BYTES)
    aead = ChaCha20Poly1305(_pair_key(own_key, recipient_key, context))
    return nonce + aead.encrypt(nonce, plaintext, context.associated_data())


def open_share(
    own_key: X25519PrivateKey,
    sender_key: X25519PublicKey,
    context: ShareContext,
    sealed: bytes,
) -> bytes:
    """The plaintext of a share sealed by ``context.sender`` for us, or :class:`ShareRefused`."""
    if len(sealed) < _NONCE_BYTES + 16:
        raise ShareRefused(f"{context.sender}: a sealed share of {len(sealed)} bytes")
    aead = ChaCha20Poly1305(_pair_key(own_key, sender_key, context))
    try:
        return aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], context.associated_data())
    except InvalidTag as exc:
        raise ShareRefused(
            f"{context.sender}: the share of update {context.update_id} does not open"
        ) from exc


def _pair_key(own: X25519PrivateKey, peer: X25519PublicKey, context: ShareContext) -> bytes:
    try:
        secret = own.exchange(peer)
    except ValueError as exc:  # a low-order point: no shared secret
        raise ShareRefused(f"{context.sender} -> {context.recipient}: an unusable key") from exc
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=_framed(_PAIR_DOMAIN, context.federation, context.sender, context.recipient),
    ).derive(secret)


def _signed_bytes(federation: str, identity: str, public_key: bytes) -> bytes:
    return _framed(_KEY_DOMAIN, federation, identity) + _frame(public_key)


def _framed(domain: bytes, *parts: str) -> bytes:
    """``domain`` and each part with its length: no two lists of parts frame alike."""
    return _frame(domain) + b"".join(_frame(part.encode()) for part in parts)


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data
