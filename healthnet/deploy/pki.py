"""A federation's own certificate authority: one CA, the broker's server certificate, one client
certificate per identity (EC P-256, with the ``cryptography`` library).

Theory of operation. The CA signs nothing but this federation's certificates: its basic
constraints forbid intermediate CAs (``path_length=0``) and its key usage is certificate and CRL
signing only. The broker's certificate is a TLS *server* certificate (extended key usage
serverAuth) whose subject alternative names cover the host clients dial plus ``localhost`` and
the loopback addresses; a client certificate is a TLS *client* certificate (clientAuth only)
whose common name is the broker identity (Mosquitto's ``use_identity_as_username``). So a
hospital's certificate can never pose as the broker, and the broker's key never logs anyone in.
Keys are returned as PEM bytes; writing them with mode 0600 is the caller's job.

No name constraints on the CA: OpenSSL checks a common name that looks like a host name
("cleveland") against DNS name constraints, so constraining the CA to the broker's names would
refuse every client certificate. The CA is trusted only where its file is named explicitly (the
broker's ``cafile``, the clients' ``HEALTHNET_CA_FILE``), never in a system trust store.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertificateAuthority", "IssuedCertificate", "host_names"]

_ORGANIZATION = "healthNET"
_LOOPBACK_NAMES = ("localhost",)
_LOOPBACK_ADDRESSES = ("127.0.0.1", "::1")
# Clocks of the machines in a federation differ a little; a certificate issued "now" must not be
# refused by a broker whose clock is a few minutes behind.
_BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A certificate and its private key, both PEM."""

    certificate: bytes = field(repr=False)
    private_key: bytes = field(repr=False)


def host_names(host: str) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) a server certificate for ``host`` must name, loopback included."""
    dns = list(_LOOPBACK_NAMES)
    ips = list(_LOOPBACK_ADDRESSES)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if host not in dns:
            dns.insert(0, host)
    else:
        if str(address) not in ips:
            ips.insert(0, str(address))
    return dns, ips


class CertificateAuthority:
    """A self-signed CA for one federation; ``issue_*`` sign server and client certificates."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        self._key = key
        self.certificate = certificate

    @classmethod
    def create(cls, federation: str, *, days: int, now: dt.datetime | None = None) -> Self:
        now = now or dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, f"healthNET {federation} CA"),
            ]
        )
        public = key.public_key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def private_key_pem(self) -> bytes:
        return _key_pem(self._key)

    def issue_server(
        self, host: str, *, days: int, now: dt.datetime | None = None
    ) -> IssuedCertificate:
        """The broker's certificate for ``host``, ``localhost`` and the loopback addresses."""
        dns, ips = host_names(host)
        alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
        alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        return self._issue(
            common_name=host,
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            alt_names=alt_names,
            days=days,
            now=now,
        )

    def issue_client(
        self, identity: str, *, federation: str, days: int, now: dt.datetime | None = None
    ) -> IssuedCertificate:
        """A client certificate whose common name is the broker identity.

        It also names ``urn:healthnet:<federation>:<identity>``: RFC 5280 verifiers require a
        subject alternative name, and a URI cannot be mistaken for a host name.
        """
        return self._issue(
            common_name=identity,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            alt_names=[x509.UniformResourceIdentifier(f"urn:healthnet:{federation}:{identity}")],
            days=days,
            now=now,
        )

    def _issue(
        self,
        *,
        common_name: str,
        usage: x509.ObjectIdentifier,
        alt_names: list[x509.GeneralName],
        days: int,
        now: dt.datetime | None,
    ) -> IssuedCertificate:
        now = now or dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        public = key.public_key()
        ca_public = self._key.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
                        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    ]
                )
            )
            .issuer_name(self.certificate.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(
                min(now + dt.timedelta(days=days), self.certificate.not_valid_after_utc)
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False
            )
        )
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        certificate = builder.sign(self._key, hashes.SHA256())
        return IssuedCertificate(
            certificate=certificate.public_bytes(serialization.Encoding.PEM),
            private_key=_key_pem(key),
        )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
