"""Specification of broker URLs: parsing, defaults, and never leaking the password."""

from __future__ import annotations

import dataclasses
from urllib.parse import quote

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from pydantic import ValidationError

from common.broker_url import BrokerEndpoint
from common.errors import ConfigError
from common.settings import ConnectionSettings

SECRET = "s3cr3t-Pa55"  # noqa: S105 - a made-up credential that must never leak


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("mqtt://localhost", BrokerEndpoint("localhost", 1883), id="mqtt-default-port"),
        pytest.param(
            "mqtts://broker.example.org",
            BrokerEndpoint("broker.example.org", 8883, tls=True),
            id="mqtts-default-port",
        ),
        pytest.param("mqtt://127.0.0.1:1884", BrokerEndpoint("127.0.0.1", 1884), id="port"),
        pytest.param("mqtt://[::1]:1884", BrokerEndpoint("::1", 1884), id="ipv6"),
        pytest.param(
            "mqtt://node-a@host", BrokerEndpoint("host", 1883, username="node-a"), id="user-only"
        ),
        pytest.param(
            f"mqtts://node-a:{SECRET}@host:8884",
            BrokerEndpoint("host", 8884, tls=True, username="node-a", password=SECRET),
            id="credentials",
        ),
        pytest.param(
            "mqtt://us%40er%3A1:p%40ss%3Aw%2Fo%25rd%20x@host",
            BrokerEndpoint("host", 1883, username="us@er:1", password="p@ss:w/o%rd x"),  # noqa: S106 - test data
            id="url-escaped-credentials",
        ),
        pytest.param(
            "mqtt://host?protocol=5", BrokerEndpoint("host", 1883, protocol="5"), id="protocol-5"
        ),
        pytest.param(
            "mqtt://host?protocol=3.1.1", BrokerEndpoint("host", 1883), id="protocol-3.1.1"
        ),
    ],
)
def test_broker_urls_parse_into_endpoints(url: str, expected: BrokerEndpoint) -> None:
    """Scheme, host, port (with per-scheme defaults), credentials and protocol are read."""
    endpoint = BrokerEndpoint.parse(url)
    assert endpoint == expected
    assert endpoint.password == expected.password  # excluded from nothing but repr


BAD_URLS = [
    pytest.param(f"http://user:{SECRET}@host", "mqtt:// or mqtts://", id="http-scheme"),
    pytest.param(f"tcp://user:{SECRET}@host:1883", "mqtt:// or mqtts://", id="tcp-scheme"),
    pytest.param(f"user:{SECRET}@host", "mqtt:// or mqtts://", id="no-scheme"),
    pytest.param("", "mqtt:// or mqtts://", id="empty"),
    pytest.param(f"mqtt://user:{SECRET}@", "no host", id="no-host"),
    pytest.param(f"mqtt://user:{SECRET}@:1883", "no host", id="port-without-host"),
    pytest.param(f"mqtt://user:{SECRET}@host:99999", "broker URL", id="port-out-of-range"),
    pytest.param(f"mqtt://user:{SECRET}@host:port", "broker URL", id="port-not-a-number"),
    pytest.param(f"mqtt://user:{SECRET}@host:-1", "broker URL", id="negative-port"),
    pytest.param(f"mqtt://user:{SECRET}@host:0", "port", id="port-zero"),
    pytest.param(f"mqtt://user:{SECRET}@host?protocol=4", "3.1.1 or 5", id="protocol-4"),
    pytest.param(f"mqtt://user:{SECRET}@host?protocol=v5", "3.1.1 or 5", id="protocol-v5"),
]


@pytest.mark.parametrize(("url", "message"), BAD_URLS)
def test_bad_urls_raise_config_error_without_the_password(url: str, message: str) -> None:
    """Bad scheme, host, port or protocol raise ConfigError, whose message hides the password."""
    with pytest.raises(ConfigError, match=message) as info:
        BrokerEndpoint.parse(url)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)


def test_redacted_shows_everything_but_the_password() -> None:
    """redacted() keeps scheme, user, host, port and protocol, and stars the password."""
    endpoint = BrokerEndpoint.parse(f"mqtts://node-a:{SECRET}@host:8884?protocol=5")
    assert endpoint.redacted() == "mqtts://node-a:***@host:8884?protocol=5"


def test_repr_does_not_show_the_password() -> None:
    """An endpoint in a log line or traceback (its repr) does not contain the password."""
    endpoint = BrokerEndpoint.parse(f"mqtt://node-a:{SECRET}@host")
    assert SECRET not in repr(endpoint)
    assert SECRET not in str(endpoint)
    assert "node-a" in repr(endpoint)


@given(
    user=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12),
    password=st.text(
        st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=4, max_size=24
    ),
    tls=st.booleans(),
)
def test_no_password_ever_appears_in_redacted_or_repr(user: str, password: str, tls: bool) -> None:
    """Any escaped credentials parse back, and the password shows in neither redacted() nor repr."""
    scheme = "mqtts" if tls else "mqtt"
    url = f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@broker.local:1999"
    endpoint = BrokerEndpoint.parse(url)
    assert (endpoint.username, endpoint.password) == (user, password)
    visible = f"{scheme}://{user}:***@broker.local:1999?protocol=3.1.1"
    assume(password not in visible)
    assert endpoint.redacted() == visible
    assert password not in endpoint.redacted()
    # Only where the password is not already a word of the repr's other fields ("True", "1999").
    shown = repr(dataclasses.replace(endpoint, password=None))
    assume(password not in shown)
    assert password not in repr(endpoint)


@pytest.mark.parametrize(
    "url",
    [
        pytest.param(f"http://node-a:{SECRET}@broker", id="scheme"),
        pytest.param(f"mqtt://node-a:{SECRET}@:1883", id="no-host"),
        pytest.param(f"mqtt://node-a:{SECRET}@broker:99999", id="port"),
        pytest.param(f"mqtt://node-a:{SECRET}@broker?protocol=4", id="protocol"),
    ],
)
def test_settings_refuse_a_malformed_broker_url_when_built_without_echoing_it(url: str) -> None:
    """ConnectionSettings parse the URL at construction; the error never shows the password."""
    with pytest.raises(ValidationError) as caught:
        ConnectionSettings(broker_url=url)
    assert SECRET not in str(caught.value)
    assert [e["loc"] for e in caught.value.errors()] == [("broker_url",)]


CREDENTIAL = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1)


@given(
    st.builds(
        BrokerEndpoint,
        host=st.sampled_from(["broker.local", "127.0.0.1", "::1"]),
        port=st.integers(1, 65535),
        tls=st.booleans(),
        username=st.none() | CREDENTIAL,
        password=st.none() | CREDENTIAL,
        protocol=st.sampled_from(["3.1.1", "5"]),
    )
)
def test_unredacted_parses_back_into_the_same_endpoint(endpoint: BrokerEndpoint) -> None:
    """unredacted() is the whole endpoint, any credentials escaped: parse() gives it back."""
    assert BrokerEndpoint.parse(endpoint.unredacted()) == endpoint
