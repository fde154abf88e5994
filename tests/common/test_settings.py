"""Specification of the shared settings: the broker URL parsed once, and settings that cross a
process boundary whole through the environment."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from common.broker_url import BrokerEndpoint
from common.errors import ConfigError
from common.messages import Knobs, TrainingConfig
from common.settings import ConnectionSettings

SECRET = "s3cr3t-Pa55"  # noqa: S105 - a made-up credential that must never leak


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An empty working directory (no .env) and no HEALTHNET_ variable."""
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("HEALTHNET_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_the_broker_url_is_an_endpoint_once_the_settings_are_built(
    clean_env: pytest.MonkeyPatch,
) -> None:
    """A URL from the environment is parsed when the settings load; callers read its fields."""
    clean_env.setenv("HEALTHNET_BROKER_URL", f"mqtts://node-a:{SECRET}@broker:8884?protocol=5")
    endpoint = ConnectionSettings().broker_url
    assert endpoint == BrokerEndpoint(
        "broker", 8884, tls=True, username="node-a", password=SECRET, protocol="5"
    )


def test_a_bad_broker_url_in_the_environment_is_refused_when_the_settings_load(
    clean_env: pytest.MonkeyPatch,
) -> None:
    """One error, on broker_url, saying what is wrong and never showing the password."""
    clean_env.setenv("HEALTHNET_BROKER_URL", f"http://node-a:{SECRET}@broker")
    with pytest.raises(ValidationError) as caught:
        ConnectionSettings()
    (error,) = caught.value.errors()
    assert error["loc"] == ("broker_url",)
    assert "mqtt:// or mqtts://" in error["msg"]
    assert SECRET not in str(caught.value)


def test_a_dump_or_repr_of_settings_stars_the_password() -> None:
    """Settings in a log line (repr, model_dump, JSON) never show the broker password."""
    settings = ConnectionSettings(broker_url=f"mqtt://node-a:{SECRET}@broker")
    assert settings.model_dump()["broker_url"] == "mqtt://node-a:***@broker:1883?protocol=3.1.1"
    assert SECRET not in settings.model_dump_json()
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)


def test_settings_come_back_whole_from_their_environment(clean_env: pytest.MonkeyPatch) -> None:
    """to_env() writes every field, None and the password included, as the variable that reads
    it back; a .env file in the child's directory cannot fill a field the parent left as None."""
    settings = ConnectionSettings(
        broker_url=f"mqtts://n%40a:{SECRET}%2F@[::1]:8884?protocol=5",
        federation="fed-1",
        ca_file="/etc/healthnet/ca.crt",
        connect_timeout=2.5,
        keepalive=7,
    )
    env = settings.to_env()
    assert set(env) == {f"HEALTHNET_{name.upper()}" for name in ConnectionSettings.model_fields}
    assert env["HEALTHNET_CERT_FILE"] == "null"
    Path(".env").write_text("HEALTHNET_CERT_FILE=/parent/cert.pem\n", encoding="utf-8")
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert ConnectionSettings() == settings


def test_a_string_that_reads_back_as_none_is_refused() -> None:
    """A value "null" would come back as None: to_env refuses it rather than change it."""
    settings = ConnectionSettings(ca_file="null")
    with pytest.raises(ConfigError, match="ca_file 'null'"):
        settings.to_env()


class _WithKnobs(ConnectionSettings):
    knobs: Knobs = Knobs()


def test_nested_values_travel_as_one_json_object(clean_env: pytest.MonkeyPatch) -> None:
    """A nested model is one variable holding JSON (no HEALTHNET_X__Y), read back whole."""
    settings = _WithKnobs(knobs=Knobs(training=TrainingConfig(optimizer="adam", momentum=0.5)))
    env = settings.to_env()
    assert json.loads(env["HEALTHNET_KNOBS"])["training"]["optimizer"] == "adam"
    assert not [name for name in env if "__" in name]
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert _WithKnobs() == settings
