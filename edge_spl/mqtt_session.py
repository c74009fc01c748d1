"""A short-lived MQTT connection for one-off commands (`edge-spl status`, `edge-spl server
rollback`): a client id of its own and a clean session (taking the server's or a device's id would
take over its session and the messages waiting in it), connect, do one thing, disconnect.

paho-mqtt is imported only when a session opens, so importing this module costs nothing.
"""
from __future__ import annotations

import threading
import time
import uuid
from contextlib import contextmanager

from .errors import EdgeSplError
from .mqtt_auth import MqttAuth, connect_error, refusal


@contextmanager
def short_session(broker: tuple[str, int], auth: MqttAuth | None, role: str, timeout: float = 10.0,
                  on_connect=None):
    """Yield a connected paho client (its network loop running); disconnect on leaving.
    `on_connect(client)` runs in every CONNACK callback, before the wait ends: subscribe there, so
    retained messages are not missed. EdgeSplError when the broker cannot be reached, refuses the
    login, or does not answer within `timeout` seconds."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    auth = auth or MqttAuth()
    host, port = broker
    where = f"MQTT broker {host}:{port}"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-spl-{role}-{uuid.uuid4().hex[:12]}",
                         clean_session=True, protocol=mqtt.MQTTv311)
    auth.apply(client)
    connected = threading.Event()
    refused: list[str] = []

    def _on_connect(c, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            refused.append(refusal(reason_code))
            return
        if on_connect is not None:
            on_connect(c)
        connected.set()

    client.on_connect = _on_connect
    deadline = time.monotonic() + timeout
    try:
        client.connect(host, port, keepalive=30)
    except (OSError, ValueError) as e:
        why, _ = connect_error(e, auth.tls)
        raise EdgeSplError(f"cannot reach {where} ({why})") from None
    client.loop_start()
    try:
        while not connected.wait(0.05):
            if refused:
                raise EdgeSplError(f"{where} refused the connection: {refused[0]}")
            if time.monotonic() > deadline:
                hint = "" if auth.tls else "; if that port speaks TLS, give --tls-ca"
                raise EdgeSplError(f"cannot reach {where} (no CONNACK within {timeout:g} s{hint})")
        yield client
    finally:
        client.disconnect()
        client.loop_stop()
