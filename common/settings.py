"""Settings every role shares: where the broker is and which federation to join.

Each service has one pydantic-settings class that extends :class:`ConnectionSettings`; values come
from flags (passed by the CLI), ``HEALTHNET_*`` environment variables and a ``.env`` file, in that
order of precedence. Tests construct settings directly. The broker URL is parsed into a
:class:`BrokerEndpoint` when the settings are built, so a bad one stops a command at once with one
line, and no caller parses it again.

Settings cross a process boundary whole. A parent that starts a service as a child process (the
demo, the tests, the benchmarks) builds the child's settings object and hands it over as the
child's environment: :meth:`ConnectionSettings.to_env` writes every field as the ``HEALTHNET_*``
variable that reads it back (nested models as one JSON object, ``None`` as ``null``), and the child
builds its settings from its environment as any service does. The environment rather than flags,
because a command line is world-readable (``ps``, ``/proc/*/cmdline``) and the broker URL may carry
a password, and because a flag per field is a list that falls behind the fields; rather than a
file, because a file holding the password would outlive a killed parent, while a process's
environment is readable by its own user only and goes with it.
"""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import BeforeValidator, Field, SecretStr, SerializationInfo, field_serializer
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from common.broker_url import BrokerEndpoint, TlsFiles
from common.errors import ConfigError

__all__ = ["NONE_IN_ENV", "REVEAL_SECRETS", "SETTINGS_CONFIG", "ConnectionSettings"]

# How None is spelled in a HEALTHNET_* variable (and so in a .env file): HEALTHNET_CA_FILE=null.
NONE_IN_ENV = "null"
# model_dump(context={REVEAL_SECRETS: True}) writes the broker URL with its password; without it the
# password is starred, so that a dumped settings object can be logged.
REVEAL_SECRETS = "reveal_secrets"

SETTINGS_CONFIG = SettingsConfigDict(
    env_prefix="HEALTHNET_",
    env_file=".env",
    env_file_encoding="utf-8",
    env_nested_delimiter="__",
    env_parse_none_str=NONE_IN_ENV,
    extra="ignore",
    frozen=True,
    # A ValidationError's text would otherwise quote the broker URL, password and all.
    hide_input_in_errors=True,
)


def _parse_broker_url(value: object) -> object:
    """A URL (plain, or a SecretStr) becomes its endpoint; anything else is validated as given."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not isinstance(value, str):
        return value
    try:
        return BrokerEndpoint.parse(value)
    except ConfigError as exc:
        # The message is already redacted; pydantic wants a ValueError to report it.
        raise ValueError(str(exc)) from None


# NoDecode: a URL in the environment is a string to parse, not JSON to decode.
BrokerUrl = Annotated[BrokerEndpoint, NoDecode, BeforeValidator(_parse_broker_url)]


class ConnectionSettings(BaseSettings):
    model_config = SETTINGS_CONFIG

    broker_url: BrokerUrl = Field(
        default=BrokerEndpoint("127.0.0.1", 1883),
        description="mqtt://[user[:password]@]host[:port][?protocol=5], or mqtts:// for TLS",
    )
    federation: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    connect_timeout: float = Field(default=15.0, gt=0)
    keepalive: int = Field(
        default=30,
        ge=1,
        le=65535,
        description="MQTT keep-alive, seconds: the broker drops a silent client after 1.5 times "
        "this and publishes its Last Will",
    )

    @field_serializer("broker_url")
    def _dump_broker_url(self, endpoint: BrokerEndpoint, info: SerializationInfo) -> str:
        context = info.context
        if isinstance(context, dict) and context.get(REVEAL_SECRETS):
            return endpoint.unredacted()
        return endpoint.redacted()

    def tls_files(self) -> TlsFiles:
        return TlsFiles(ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file)

    def to_env(self) -> dict[str, str]:
        """Every field as the ``HEALTHNET_*`` variable that reads it back into these settings.

        For a child process's environment only: it holds the broker password, so it is never
        logged, printed, written to a file or put on a command line.
        """
        prefix = self.model_config.get("env_prefix", "")
        env: dict[str, str] = {}
        for name, value in self.model_dump(mode="json", context={REVEAL_SECRETS: True}).items():
            if value == NONE_IN_ENV:
                raise ConfigError(
                    f"{name} {NONE_IN_ENV!r} cannot be passed in the environment: it reads back "
                    "as None"
                )
            env[f"{prefix}{name}".upper()] = value if isinstance(value, str) else json.dumps(value)
        return env
