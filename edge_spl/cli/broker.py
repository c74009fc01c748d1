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


def check_listen(host: str, port: int) -> int:
    """Bind (host, port) once, as the broker will, so a bad address or a port in use is one clear
    line here rather than amqtt's logged traceback. Returns the port (a free one for 0)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
            return s.getsockname()[1]
    except OSError as e:
        why = e.strerror or str(e)
        raise EdgeSplError(f"embedded broker cannot listen on {host}:{port} ({why})") from None


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
    port = check_listen(args.host, args.port)
    asyncio.run(_serve(args.host, port))
    return 0
