"""The server process: MQTT in and out, one merge round every `merge_every` seconds.

MQTT callbacks run on paho's network thread and only enqueue (topic, payload); decoding,
validation, merging and storing happen in the owner loop (`run`), one round at a time.
A bad message is rejected, logged, counted and acked as rejected; the loop goes on.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_spl.errors import EdgeSplError, ModelError, ProtocolError
from edge_spl.files import atomic_write_bytes
from edge_spl.manifest import ExportedModel
from edge_spl.protocol import (DEFAULT_MAX_PAYLOAD, Release, Topics, ack_payload, decode_delta,
                               encode_release)

from . import merge
from .store import DB_FILE, SQLiteStore, StoredVersion

log = logging.getLogger("edge_spl.server")

STATS_FILE = "stats.json"
PUBLISH_WAIT = 5.0      # seconds to wait for the last publishes before disconnecting


@dataclass
class Stats:
    """Counters of this server process (they start at zero on every start)."""
    messages_received: int = 0
    bytes_received: int = 0
    deltas_merged: int = 0
    deltas_rejected: dict = field(default_factory=dict)   # reason -> count
    versions_published: int = 0
    version: int = 0
    started: float = field(default_factory=time.time)

    def reject(self, reason: str) -> None:
        self.deltas_rejected[reason] = self.deltas_rejected.get(reason, 0) + 1


class Server:
    def __init__(self, broker: tuple[str, int], model_dir: str, state_dir: str, fleet: str = "default",
                 merge_every: float = 1.0, max_row_norm: float = merge.DEFAULT_MAX_ROW_NORM,
                 connect_timeout: float = 30.0, max_payload: int = DEFAULT_MAX_PAYLOAD):
        if not merge_every > 0:
            raise EdgeSplError(f"merge interval must be a positive number of seconds, got {merge_every}")
        self.broker = broker
        self.topics = Topics(fleet)
        self.merge_every = float(merge_every)
        self.max_row_norm = float(max_row_norm)
        self.connect_timeout = float(connect_timeout)
        self.max_payload = int(max_payload)
        self.state_dir = state_dir
        self.model = ExportedModel.load(model_dir)
        if len(self.model.onnx_bytes) > self.max_payload:
            raise ModelError(f"{model_dir}: the ONNX file is {len(self.model.onnx_bytes)} bytes, over "
                             f"the {self.max_payload}-byte payload limit")
        self.shapes = [ps for ps, _ in self.model.manifest.proto_shapes()]
        self.store = SQLiteStore(os.path.join(state_dir, DB_FILE), self.model.manifest, self.model.protos)
        self.current: StoredVersion = self.store.latest()
        self.stats = Stats(version=self.current.version)
        self._release_payload = self._encode_release(self.current)

        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._connect_refused: str | None = None
        # on_connect (network thread) and a round (owner thread) both publish the release; the
        # lock keeps a reconnect from re-publishing an older version after a newer one
        self._publish_lock = threading.RLock()
        self._pending = []          # MQTTMessageInfo of recent publishes, waited for at stop
        self._thread: threading.Thread | None = None

        # A persistent session: deltas sent while the server restarts wait at the broker.
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-spl-server-{fleet}",
                                   clean_session=False, protocol=mqtt.MQTTv311)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)

    @property
    def version(self) -> int:
        return self.current.version

    # -- MQTT callbacks (network thread): no decoding, no merging ------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._connect_refused = str(reason_code)
            log.error("broker refused the connection: %s", reason_code)
            return
        self._connect_refused = None
        client.subscribe(self.topics.all_deltas, qos=1)
        with self._publish_lock:
            self._publish(self.topics.manifest, self.model.manifest.to_json(), retain=True)
            self._publish(self.topics.onnx, self.model.onnx_bytes, retain=True)
            self._publish(self.topics.release, self._release_payload, retain=True)
        self._connected.set()
        log.debug("connected to %s:%d, subscribed to %s", *self.broker, self.topics.all_deltas)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self._connected.clear()
        if not self._stop.is_set():
            log.warning("lost the broker (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, msg):
        self._inbox.put((msg.topic, bytes(msg.payload)))

    # -- lifecycle -------------------------------------------------------------------------------

    def connect(self) -> None:
        """Connect, retrying for `connect_timeout` seconds; then paho's thread keeps the
        connection (and reconnects with backoff)."""
        host, port = self.broker
        deadline = time.monotonic() + self.connect_timeout
        delay = 0.25
        while True:
            try:
                self._client.connect(host, port, keepalive=30)
                break
            except OSError as e:
                if time.monotonic() + delay > deadline:
                    raise EdgeSplError(f"cannot reach MQTT broker {host}:{port}: {e}") from None
                log.info("broker %s:%d not reachable (%s); retrying in %.1fs", host, port, e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._client.loop_start()
        if not self._connected.wait(max(deadline - time.monotonic(), 1.0)):
            self._client.loop_stop()
            why = self._connect_refused or "no answer to CONNECT"
            raise EdgeSplError(f"cannot reach MQTT broker {host}:{port}: {why}")
        log.info("serving model %s (%s) version %d on %s:%d fleet %s", self.model.manifest.model_id,
                 self.model.manifest.onnx_sha256[:12], self.version, host, port, self.topics.fleet)
        self._write_stats()

    def run(self) -> None:
        """Connect, then merge every `merge_every` seconds until stop() (or request_stop()); the
        pending round is finished before disconnecting."""
        self._connect_or_close()
        self.serve()

    def serve(self) -> None:
        try:
            while not self._stop.wait(self.merge_every):
                self.merge_round()
            self.merge_round()
        finally:
            self._shutdown()

    def start(self) -> "Server":
        """Connect here (errors raise here), then run the loop in a background thread."""
        self._connect_or_close()
        self._thread = threading.Thread(target=self.serve, name="edge-spl-server", daemon=True)
        self._thread.start()
        return self

    def _connect_or_close(self) -> None:
        try:
            self.connect()
        except BaseException:
            self.store.close()
            raise

    def request_stop(self) -> None:
        """Safe from a signal handler: only sets a flag the loop checks."""
        self._stop.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("server loop did not stop within %.0fs", timeout)

    def _shutdown(self) -> None:
        deadline = time.monotonic() + PUBLISH_WAIT
        with self._publish_lock:
            pending = list(self._pending)
        for info in pending:
            try:
                info.wait_for_publish(max(deadline - time.monotonic(), 0.01))
            except (ValueError, RuntimeError) as e:
                log.warning("a publish did not complete before stopping: %s", e)
        self._client.disconnect()
        self._client.loop_stop()
        self._write_stats()
        self.store.close()
        log.info("stopped at version %d", self.version)

    # -- the owner loop ------------------------------------------------------------------------

    def merge_round(self) -> int:
        """Merge everything received since the last round. Returns the number of accepted deltas."""
        items = []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        if not items:
            return 0
        base = self.current
        sums = merge.MergeSums(self.shapes)
        accepted = []                    # PrototypeDelta
        in_round = set()
        rejections = []                  # (topic device or None, seq, reason)
        for topic, payload in items:
            self.stats.messages_received += 1
            self.stats.bytes_received += len(payload)
            device = self.topics.device_of(topic, "delta")
            try:
                d = decode_delta(payload, self.max_payload)
            except ProtocolError as e:
                rejections.append((device, -1, "malformed", str(e)))
                continue
            if d.device != device:
                rejections.append((device, d.seq, "device mismatch",
                                   f"delta of {d.device!r} on the topic of {device!r}"))
                continue
            key = (d.device, d.seq)
            if key in in_round or self.store.is_merged(*key):
                rejections.append((device, d.seq, "duplicate", ""))
                continue
            reason = merge.validate_delta(d, self.shapes, base.version, self.max_row_norm)
            if reason is not None:
                rejections.append((device, d.seq, reason, f"base version {d.base_version}"))
                continue
            sums.add_delta(d, base.version)
            in_round.add(key)
            accepted.append(d)

        version = base.version
        if accepted:
            protos = merge.apply(base.protos, sums)
            try:
                new = self.store.commit(base, protos, [(d.device, d.seq) for d in accepted])
            except Exception:
                # Nothing was acked, so the devices send these deltas again.
                log.exception("could not store version %d; its %d deltas are dropped unacked",
                              base.version + 1, len(accepted))
                accepted = []
            else:
                self.current = new
                version = new.version
                payload = self._encode_release(new)
                with self._publish_lock:
                    self._release_payload = payload
                    self._publish(self.topics.release, payload, retain=True)
                self.stats.deltas_merged += len(accepted)
                self.stats.versions_published += 1
                devices = sorted({d.device for d in accepted})
                log.info("version %d: merged %d deltas (%d rows) from %d devices: %s", version,
                         len(accepted), sums.touched_rows(), len(devices), ", ".join(devices))
        for d in accepted:
            self._publish(self.topics.ack(d.device), ack_payload(d.device, d.seq, True, "merged", version))
        for device, seq, reason, detail in rejections:
            self.stats.reject(reason)
            log.warning("rejected delta from %s seq %s: %s%s", device or "?", seq, reason,
                        f" ({detail})" if detail else "")
            if device is not None:
                self._publish(self.topics.ack(device), ack_payload(device, seq, False, reason, version))
        self._write_stats()
        return len(accepted)

    # -- helpers ---------------------------------------------------------------------------------

    def _encode_release(self, v: StoredVersion) -> bytes:
        return encode_release(Release(v.version, self.model.manifest.onnx_sha256, v.protos,
                                      dict(v.merged), v.created), self.max_payload)

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        with self._publish_lock:
            info = self._client.publish(topic, payload, qos=1, retain=retain)
            if info.rc == mqtt.MQTT_ERR_NO_CONN:
                # queued by paho, sent when the connection is back
                log.debug("publish to %s queued until the broker is back", topic)
            elif info.rc != mqtt.MQTT_ERR_SUCCESS:
                log.warning("publish to %s failed: %s", topic, mqtt.error_string(info.rc))
            else:
                # keep only what is still in flight, so the list stays short
                self._pending = [i for i in self._pending if not _published(i)] + [info]

    def _write_stats(self) -> None:
        self.stats.version = self.version
        atomic_write_bytes(os.path.join(self.state_dir, STATS_FILE),
                           json.dumps(asdict(self.stats), indent=1, sort_keys=True).encode())


def _published(info: mqtt.MQTTMessageInfo) -> bool:
    try:
        return info.is_published()
    except (ValueError, RuntimeError):
        return True     # failed: nothing left to wait for
