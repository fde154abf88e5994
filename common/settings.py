"""Settings every role shares: where the broker is and which federation to join.

Each service has one pydantic-settings class that extends :class:`ConnectionSettings`; values come
from flags (passed by the CLI), ``HEALTHNET_*`` environment variables and a ``.env`` file, in that
order of precedence. Tests construct settings directly.
"""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.broker_url import BrokerEndpoint, TlsFiles
from common.errors import ConfigError

__all__ = ["SETTINGS_CONFIG", "ConnectionSettings"]

SETTINGS_CONFIG = SettingsConfigDict(
    env_prefix="HEALTHNET_",
    env_file=".env",
    env_file_encoding="utf-8",
    env_nested_delimiter="__",
    extra="ignore",
    frozen=True,
    # A ValidationError's text would otherwise quote the broker URL, password and all.
    hide_input_in_errors=True,
)


class ConnectionSettings(BaseSettings):
    model_config = SETTINGS_CONFIG

    broker_url: SecretStr = Field(
        default=SecretStr("mqtt://127.0.0.1:1883"),
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

    @field_validator("broker_url")
    @classmethod
    def _broker_url_parses(cls, value: SecretStr) -> SecretStr:
        # Checked here, when the settings are built, so that a bad URL stops a service before it
        # locks its state directory or builds a model, not when it first connects.
        try:
            BrokerEndpoint.parse(value.get_secret_value())
        except ConfigError as exc:
            # The message is already redacted; pydantic wants a ValueError to report it.
            raise ValueError(str(exc)) from None
        return value

    def endpoint(self) -> BrokerEndpoint:
        return BrokerEndpoint.parse(self.broker_url.get_secret_value())

    def tls_files(self) -> TlsFiles:
        return TlsFiles(ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file)
