"""Broker addresses: ``mqtt://[user[:password]@]host[:port][?protocol=5]``; ``mqtts://`` is TLS."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qs, quote, unquote, urlsplit

from common.errors import ConfigError

__all__ = ["BrokerEndpoint", "TlsFiles"]

Protocol = Literal["3.1.1", "5"]


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Certificates for ``mqtts://``; with no CA file the system trust store is used."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True, slots=True)
class BrokerEndpoint:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    protocol: Protocol = "3.1.1"

    @classmethod
    def parse(cls, url: str) -> BrokerEndpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ConfigError(
                f"broker URL must start with mqtt:// or mqtts://, got {_redact(url)!r}"
            )
        if not parts.hostname:
            raise ConfigError(f"broker URL {_redact(url)!r} has no host")
        try:
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"broker URL {_redact(url)!r}: {exc}") from exc
        if port == 0:
            raise ConfigError(f"broker URL {_redact(url)!r}: port 0 is not a broker port")
        query = parse_qs(parts.query)
        protocol = query.get("protocol", ["3.1.1"])[-1]
        if protocol not in ("3.1.1", "5"):
            raise ConfigError(f"broker URL protocol must be 3.1.1 or 5, got {protocol!r}")
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname,
            port=port if port is not None else (8883 if tls else 1883),
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            protocol=protocol,  # type: ignore[arg-type]
        )

    def redacted(self) -> str:
        """The URL without the password: the only form that may be logged."""
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}:***@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}?protocol={self.protocol}"

    def unredacted(self) -> str:
        """The URL, password and all, that :meth:`parse` reads back into this endpoint.

        Only for handing the endpoint whole to a child process's environment: never log it,
        print it or put it on a command line.
        """
        scheme = "mqtts" if self.tls else "mqtt"
        user = quote(self.username or "", safe="")
        if self.password is not None:
            user += ":" + quote(self.password, safe="")
        userinfo = f"{user}@" if user else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{userinfo}{host}:{self.port}?protocol={self.protocol}"


_USERINFO_PASSWORD = re.compile(r":[^:@/]*@")


def _redact(url: str) -> str:
    """Hide anything that looks like ``:password@``, whether or not the URL parses."""
    return _USERINFO_PASSWORD.sub(":***@", url)
