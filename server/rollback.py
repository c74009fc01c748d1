"""`edge-spl server rollback`: go back to an earlier version's prototypes.

Devices adopt only a release newer than theirs, so going back is going forward: the rollback
stores version latest+1 whose prototypes are version TO's and whose `merged` high-water marks are
the latest ones (the deltas they cover stay merged, and devices do not send them again). It holds
the state folder's lock, as the server does, so it never races a running server's commits.
"""
from __future__ import annotations

import os
import time

from edge_spl.errors import EdgeSplError
from edge_spl.files import lock_folder
from edge_spl.manifest import ExportedModel
from edge_spl.mqtt_session import short_session
from edge_spl.protocol import DEFAULT_MAX_PAYLOAD, Topics, payload_limit

from .releases import history_of
from .store import DB_FILE, SQLiteStore, StoredVersion


def roll_back(model_dir: str, state_dir: str, to: int) -> tuple[StoredVersion, StoredVersion, ExportedModel, str]:
    """Store the new version; returns (new version, the latest before it, the model, the history id)."""
    if not os.path.isdir(state_dir):
        raise EdgeSplError(f"--state {state_dir}: no such folder")
    db = os.path.join(state_dir, DB_FILE)
    if not os.path.isfile(db):
        raise EdgeSplError(f"--state {state_dir} holds no {DB_FILE}: not the --state folder of an "
                           f"edge-spl server")
    model = ExportedModel.load(model_dir)
    lock = lock_folder(state_dir, "edge-spl server")
    try:
        store = SQLiteStore(db, model.manifest, model.protos)
        try:
            latest = store.latest()
            if to == latest.version:
                raise EdgeSplError(f"version {to} is the latest version already; nothing to roll back")
            target = store.get(to)
            new = store.commit(latest, [(P.copy(), g.copy()) for P, g in target.protos], [])
            history = history_of(store)
        finally:
            store.close()
    finally:
        lock.close()
    return new, latest, model, history


def publish_release(broker: tuple[str, int], fleet: str, model: ExportedModel, release: bytes,
                    auth=None, timeout: float = 10.0, max_packet: int = DEFAULT_MAX_PAYLOAD) -> None:
    """Publish manifest, ONNX and `release` retained (QoS 1), as the server does on connect, and
    wait for the broker to take them (a short session of its own: never the server's id, whose
    persistent session holds the deltas waiting for it)."""
    host, port = broker
    topics = Topics(fleet)
    for what, payload, topic in (("the ONNX file", model.onnx_bytes, topics.onnx),
                                 ("the release", release, topics.release)):
        if len(payload) > payload_limit(max_packet, topic):
            raise EdgeSplError(f"{what} is {len(payload)} bytes, over what a message on {topic} can "
                               f"carry within the broker's maximum packet size of {max_packet} bytes "
                               f"(--max-packet)")
    deadline = time.monotonic() + timeout
    with short_session(broker, auth, "rollback", timeout) as client:
        infos = [client.publish(topics.manifest, model.manifest.to_json(), qos=1, retain=True),
                 client.publish(topics.onnx, model.onnx_bytes, qos=1, retain=True),
                 client.publish(topics.release, release, qos=1, retain=True)]
        for info in infos:
            try:
                info.wait_for_publish(max(0.01, deadline - time.monotonic()))
            except (ValueError, RuntimeError) as e:
                raise EdgeSplError(f"publishing to MQTT broker {host}:{port} failed: {e}") from None
            if not info.is_published():
                raise EdgeSplError(f"MQTT broker {host}:{port} did not take the release within {timeout:g} s")
