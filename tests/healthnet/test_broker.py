"""The embedded broker starts where asked, speaks MQTT, restarts in place and cleans up."""

from __future__ import annotations

import contextlib
import queue
import socket
from collections.abc import Iterator
from pathlib import Path

# paho is banned outside common/mqtt.py; these tests prove the broker with a real, independent MQTT
# client instead of our own adapter, so that a bug there cannot hide one here.
import paho.mqtt.client as mqtt  # noqa: TID251
import pytest
from paho.mqtt.enums import CallbackAPIVersion  # noqa: TID251
from paho.mqtt.reasoncodes import ReasonCode  # noqa: TID251

import healthnet.broker
from healthnet.broker import (
    BrokerConfig,
    BrokerImplementation,
    BrokerProcessError,
    EmbeddedBroker,
    find_mosquitto,
)

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]

WAIT = 10.0  # seconds; every wait in this module is bounded by it
LOOPBACK_HEX = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it

IMPLEMENTATIONS = [
    pytest.param(
        "mosquitto",
        id="mosquitto",
        marks=pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed"),
    ),
    pytest.param("amqtt", id="amqtt"),
]


@contextlib.contextmanager
def mqtt_client(
    broker: EmbeddedBroker, client_id: str
) -> Iterator[tuple[mqtt.Client, queue.Queue[mqtt.MQTTMessage]]]:
    """Yield a connected MQTT 3.1.1 paho client and the queue its received messages land in."""
    inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    connacks: queue.Queue[ReasonCode] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    client.on_connect = lambda _c, _u, _flags, reason, _props: connacks.put(reason)
    client.on_message = lambda _c, _u, message: inbox.put(message)
    client.connect("127.0.0.1", broker.port, keepalive=30)
    client.loop_start()
    try:
        reason = connacks.get(timeout=WAIT)
        assert not reason.is_failure, f"CONNACK {reason}"
        yield client, inbox
    finally:
        client.disconnect()
        client.loop_stop()


def subscribe(client: mqtt.Client, topic: str) -> None:
    """Subscribe at QoS 1 and return once the broker has granted it."""
    granted: queue.Queue[list[ReasonCode]] = queue.Queue()
    client.on_subscribe = lambda _c, _u, _mid, codes, _props: granted.put(codes)
    result, _mid = client.subscribe(topic, qos=1)
    assert result == mqtt.MQTT_ERR_SUCCESS
    codes = granted.get(timeout=WAIT)
    assert [code.value for code in codes] == [1]


def publish(client: mqtt.Client, topic: str, payload: bytes, *, retain: bool = False) -> None:
    """Publish at QoS 1 and return once the broker has acknowledged it."""
    info = client.publish(topic, payload, qos=1, retain=retain)
    info.wait_for_publish(timeout=WAIT)
    assert info.is_published()


def listening_addresses(port: int) -> set[str]:
    """Return the local addresses (as /proc/net/tcp* writes them) with a listener on ``port``."""
    found = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A is TCP_LISTEN
                found.add(address)
    return found


def can_listen(port: int) -> bool:
    """Whether a new listener could bind 127.0.0.1:port now (as a restarted broker would)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_starts_on_a_free_port_bound_to_loopback_only(implementation: BrokerImplementation) -> None:
    """With port 0 the broker picks a free port and listens on 127.0.0.1 and nowhere else."""
    with EmbeddedBroker(BrokerConfig(implementation=implementation)) as broker:
        assert broker.implementation == implementation
        assert broker.port > 0
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        assert broker.pid is not None
        if Path("/proc/net/tcp").exists():
            assert listening_addresses(broker.port) == {LOOPBACK_HEX}
        with mqtt_client(broker, "connack-check"):
            pass


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_round_trips_an_8_mib_message(implementation: BrokerImplementation) -> None:
    """An 8 MiB QoS 1 message published by one client reaches a subscriber byte for byte."""
    payload = bytes(range(256)) * (8 * 1024 * 1024 // 256)
    with (
        EmbeddedBroker(BrokerConfig(implementation=implementation)) as broker,
        mqtt_client(broker, "receiver") as (receiver, inbox),
        mqtt_client(broker, "sender") as (sender, _),
    ):
        subscribe(receiver, "healthnet/v1/test/updates/a")
        publish(sender, "healthnet/v1/test/updates/a", payload)
        message = inbox.get(timeout=WAIT)
    assert message.topic == "healthnet/v1/test/updates/a"
    assert message.payload == payload


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_restart_comes_back_on_the_same_port(implementation: BrokerImplementation) -> None:
    """restart() replaces the process and serves MQTT again on the port clients already know."""
    with EmbeddedBroker(BrokerConfig(implementation=implementation)) as broker:
        port, pid = broker.port, broker.pid
        broker.restart()
        assert (broker.port, broker.url) == (port, f"mqtt://127.0.0.1:{port}")
        assert broker.pid not in (None, pid)
        with mqtt_client(broker, "after-restart"):
            pass


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_retained_message_survives_restart_with_persistence() -> None:
    """With persistence on, mosquitto saves retained messages on stop and restores them."""
    config = BrokerConfig(implementation="mosquitto", persistence=True)
    with EmbeddedBroker(config) as broker:
        with mqtt_client(broker, "aggregator") as (client, _):
            publish(client, "healthnet/v1/test/model/manifest", b"version 7", retain=True)
        broker.restart()
        with mqtt_client(broker, "late-node") as (client, inbox):
            subscribe(client, "healthnet/v1/test/model/manifest")
            message = inbox.get(timeout=WAIT)
    assert (message.payload, message.retain) == (b"version 7", True)


def test_amqtt_refuses_persistence() -> None:
    """amqtt keeps everything in memory, so asking it for persistence fails before it starts."""
    broker = EmbeddedBroker(BrokerConfig(implementation="amqtt", persistence=True))
    with pytest.raises(BrokerProcessError, match="persistence needs mosquitto"):
        broker.start()
    assert broker.pid is None


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_stop_frees_the_port_and_removes_the_temporary_folder(
    implementation: BrokerImplementation,
) -> None:
    """stop() ends the process, frees the port and deletes the folder it created; twice is fine."""
    broker = EmbeddedBroker(BrokerConfig(implementation=implementation))
    broker.start()
    workdir = broker.log_path.parent
    assert workdir.is_dir()
    broker.stop()
    assert broker.pid is None
    assert not workdir.exists()
    assert can_listen(broker.port)
    broker.stop()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_configured_workdir_is_kept_with_its_log(
    implementation: BrokerImplementation, tmp_path: Path
) -> None:
    """A work folder the caller chose survives stop(), with the broker's log in it."""
    config = BrokerConfig(implementation=implementation, workdir=tmp_path / "broker")
    with EmbeddedBroker(config) as broker:
        pass
    assert broker.log_path == tmp_path / "broker" / "broker.log"
    assert broker.log_path.read_text(encoding="utf-8").strip()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_busy_port_raises_broker_error(implementation: BrokerImplementation) -> None:
    """A port another process listens on is refused up front, naming the port."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = EmbeddedBroker(BrokerConfig(implementation=implementation, port=port))
        with pytest.raises(BrokerProcessError, match=f"port 127.0.0.1:{port} is in use"):
            broker.start()
    assert broker.pid is None


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_kill_leaves_the_folder_and_restart_recovers(implementation: BrokerImplementation) -> None:
    """kill() ends the broker like a crash; restart() brings it back on the same port."""
    broker = EmbeddedBroker(BrokerConfig(implementation=implementation))
    try:
        broker.start()
        port = broker.port
        broker.kill()
        assert broker.pid is None
        assert broker.log_path.exists()
        broker.restart()
        assert broker.port == port
        with mqtt_client(broker, "after-crash"):
            pass
    finally:
        broker.stop()
    assert not broker.log_path.parent.exists()


def test_a_startup_timeout_raises_with_the_log_path() -> None:
    """A broker that does not answer CONNACK in time is stopped and the error names its log."""
    broker = EmbeddedBroker(BrokerConfig(implementation="amqtt", startup_timeout=0.01))
    try:
        with pytest.raises(BrokerProcessError, match="did not answer an MQTT CONNECT") as caught:
            broker.start()
        assert str(broker.log_path) in str(caught.value)
        assert broker.pid is None
    finally:
        broker.stop()


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_a_broker_that_exits_raises_with_the_end_of_its_log(tmp_path: Path) -> None:
    """When the child dies during start-up, the error carries the tail of the broker log."""
    (tmp_path / "persistence").mkdir()
    (tmp_path / "persistence" / "mosquitto.db").write_bytes(b"this is not a mosquitto database")
    broker = EmbeddedBroker(
        BrokerConfig(implementation="mosquitto", workdir=tmp_path, persistence=True)
    )
    with pytest.raises(BrokerProcessError, match="exited with status") as caught:
        broker.start()
    assert f"log {tmp_path / 'broker.log'} ends with:" in str(caught.value)
    assert "Error:" in str(caught.value)  # mosquitto's own complaint about the store


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_auto_picks_mosquitto_when_it_is_installed() -> None:
    """implementation="auto" runs mosquitto when find_mosquitto() finds it."""
    with EmbeddedBroker(BrokerConfig()) as broker:
        assert broker.implementation == "mosquitto"


def test_auto_falls_back_to_amqtt_without_mosquitto(monkeypatch: pytest.MonkeyPatch) -> None:
    """implementation="auto" runs amqtt when no mosquitto binary is found."""
    monkeypatch.setattr(healthnet.broker, "find_mosquitto", lambda: None)
    with EmbeddedBroker(BrokerConfig()) as broker:
        assert broker.implementation == "amqtt"


def test_mosquitto_required_but_missing_says_where_it_looked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Asking for mosquitto on a machine without it fails with the folders that were searched."""
    monkeypatch.setattr(healthnet.broker, "find_mosquitto", lambda: None)
    broker = EmbeddedBroker(BrokerConfig(implementation="mosquitto"))
    with pytest.raises(
        BrokerProcessError, match=r"mosquitto was not found on PATH or in /usr/sbin"
    ):
        broker.start()


def test_find_mosquitto_looks_in_sbin_beyond_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PATH without sbin (as for most non-root users) still finds an installed mosquitto."""
    installed = find_mosquitto()
    if installed is None or str(installed.parent) not in ("/usr/sbin", "/usr/local/sbin"):
        pytest.skip("needs mosquitto installed in /usr/sbin or /usr/local/sbin")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert find_mosquitto() == installed


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("port", 70_000, id="port-too-large"),
        pytest.param("host", "", id="empty-host"),
        pytest.param("host", "127.0.0.1\nallow_anonymous true", id="host-injects-config"),
        pytest.param("max_packet_bytes", 10, id="tiny-packet-limit"),
        pytest.param("startup_timeout", 0.0, id="no-startup-time"),
    ],
)
def test_config_rejects_nonsense(field: str, value: object) -> None:
    """BrokerConfig refuses values that no broker could run with."""
    with pytest.raises(ValueError, match=field):
        BrokerConfig(**{field: value})  # type: ignore[arg-type]
