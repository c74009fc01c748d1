"""`edge-spl broker`: an embedded MQTT 3.1.1 broker (amqtt), so the demo runs with nothing else
installed. For a real deployment use mosquitto (see docs/deploy.md)."""
from __future__ import annotations

import asyncio
import logging
import signal
import socket

from edge_spl.errors import EdgeSplError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def broker_config(host: str, port: int) -> dict:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


async def _serve(host: str, port: int) -> None:
    from amqtt.broker import Broker

    broker = Broker(broker_config(host, port))
    try:
        await broker.start()
    except Exception as e:  # amqtt wraps bind errors in its own exception types
        raise EdgeSplError(f"embedded broker cannot listen on {host}:{port} ({e})") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"embedded MQTT broker listening on {host}:{port}", flush=True)
    await stop.wait()
    await broker.shutdown()


def run(args) -> int:
    # amqtt logs every packet at INFO; keep its warnings only.
    logging.getLogger("amqtt").setLevel(logging.WARNING)
    logging.getLogger("transitions").setLevel(logging.WARNING)
    port = args.port or free_port(args.host)
    asyncio.run(_serve(args.host, port))
    return 0
