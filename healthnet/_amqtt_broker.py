"""Run amqtt as the embedded broker's pure-Python fallback: ``python -m healthnet._amqtt_broker``.

:mod:`healthnet.broker` starts this module in a child process when mosquitto is not installed. It
serves one plain TCP listener (MQTT 3.1.1; no websockets, whose listener would cap messages at
1 MiB), lets anonymous clients in, publishes no ``$SYS`` topics, logs to stderr (which the parent
points at the broker log) and shuts down cleanly on SIGTERM or SIGINT.

amqtt 0.12 notes: the broker is configured with its ``BrokerConfig`` dataclass and a ``plugins``
mapping (the older ``auth``/``topic-check`` sections are deprecated); over TCP it reads a packet of
any length the MQTT remaining-length field allows, so there is no message size to raise; retained
messages and sessions live in memory only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from amqtt.broker import Broker
from amqtt.contexts import BrokerConfig, ListenerConfig, ListenerType
from amqtt.errors import AMQTTError

__all__ = ["broker_config", "main", "serve"]

_log = logging.getLogger(__name__)

_ANONYMOUS_PLUGIN = "amqtt.plugins.authentication.AnonymousAuthPlugin"


def broker_config(host: str, port: int) -> BrokerConfig:
    """Return amqtt's config for one anonymous TCP listener on ``host:port``."""
    bind_host = f"[{host}]" if ":" in host else host
    return BrokerConfig(
        listeners={"default": ListenerConfig(type=ListenerType.TCP, bind=f"{bind_host}:{port}")},
        # Only anonymous authentication: the defaults would also load the packet and event loggers
        # and the $SYS publisher, which cost time on every large message and help nobody here.
        plugins={_ANONYMOUS_PLUGIN: {"allow_anonymous": True}},
    )


async def serve(host: str, port: int) -> None:
    """Serve MQTT on ``host:port`` until SIGTERM or SIGINT, then shut the broker down."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    broker = Broker(broker_config(host, port))
    await broker.start()
    _log.info("amqtt broker listening on %s:%d", host, port)
    try:
        await stop.wait()
    finally:
        _log.info("amqtt broker shutting down")
        await broker.shutdown()


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the broker; exit status 1 when it cannot start."""
    parser = argparse.ArgumentParser(prog="python -m healthnet._amqtt_broker", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="TCP port to bind")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    # amqtt's state machines log every transition callback at INFO; keep the log about clients.
    logging.getLogger("transitions").setLevel(logging.WARNING)
    try:
        asyncio.run(serve(args.host, args.port))
    except AMQTTError:
        _log.exception("amqtt broker failed on %s:%d", args.host, args.port)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
