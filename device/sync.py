"""The device's MQTT side (paho-mqtt 2.x, MQTT 3.1.1 so amqtt's broker works too).

paho's network thread only enqueues raw (topic, payload); the main loop calls `poll()`, which
decodes (a bad payload is logged, counted and dropped) and hands back events to apply. The
inbox is bounded, since the main loop may poll only every few minutes: an oversized payload is
dropped on arrival, of the retained topics (manifest, ONNX, release) only the newest payload is
kept, and at most MAX_QUEUED acks wait. Deltas
are re-published after every (re)connect: the server dedups by (device, seq), and the learner's
outstanding deltas are the durable outbox.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from edge_spl.errors import EdgeSplError, ModelError, ProtocolError
from edge_spl.files import sha256_hex
from edge_spl.manifest import ExportedModel, Manifest
from edge_spl.mqtt_auth import MqttAuth, connect_error, refusal
from edge_spl.protocol import (DEFAULT_MAX_PAYLOAD, STATUS_HEARTBEAT, PrototypeDelta, Release, Topics, Verifier,
                               decode_ack, decode_release, encode_delta, payload_limit, status_payload)

log = logging.getLogger("edge_spl.device.sync")
MAX_QUEUED = 1000          # acks waiting for the main loop; more are dropped (and counted)
MAX_ACK_BYTES = 4096


@dataclass
class Event:
    kind: str          # "manifest" | "onnx" | "release" | "ack"
    value: object      # Manifest | bytes | Release | dict
    sha256: str = ""   # of a manifest: the hash of the JSON as received (a release names it)


class DeviceSync:
    def __init__(self, host: str, port: int, fleet: str, device_id: str,
                 max_packet: int = DEFAULT_MAX_PAYLOAD, auth: MqttAuth | None = None,
                 verify_key: Verifier | None = None):
        """max_packet: the broker's maximum packet size (mosquitto's max_packet_size). What this
        device receives is limited to it, and what it sends to it less the PUBLISH overhead."""
        self.host, self.port = host, port
        # with a key, a release not signed by it is rejected like one that does not decode, so
        # neither the main loop nor pull_model() ever sees it
        self.verify_key = verify_key
        self.auth = auth or MqttAuth()
        self.topics = Topics(fleet)
        self.device_id = device_id
        self.max_payload = int(max_packet)   # the receive limit
        # what a delta may weigh: deltas are cut to fit (FFLearner.make_deltas)
        self.delta_limit = payload_limit(max_packet, self.topics.delta(device_id))
        self.inbox: queue.Queue[tuple[str, bytes | None]] = queue.Queue()
        self._latest: dict[str, bytes] = {}   # retained topic -> newest payload not yet polled
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self._closing = threading.Event()
        self.resend = threading.Event()   # set on every (re)connect: re-publish the outbox
        self.messages_sent = self.bytes_sent = 0
        self.messages_received = self.bytes_received = 0
        self.rejected = 0
        self.last_rejected: dict[str, str] = {}   # topic -> why its last message was rejected
        self.refused: str | None = None   # the broker's reason when it refused the connection
        self.closed_unanswered = False    # the broker hung up before any CONNACK (a TLS port?)
        self.started = False              # start() succeeded
        self.version = -1       # reported in the status message
        self.samples = 0
        self.outbox = 0
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edge-spl-device-{device_id}",
                        protocol=mqtt.MQTTv311, clean_session=True)
        c.will_set(self.topics.status(device_id), status_payload(device_id, False, lost=True), qos=1, retain=True)
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        self.auth.apply(c)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self.client = c

    # -- network thread: enqueue only ----------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.refused = refusal(reason_code)
            if self.started:   # before, start() raises with the reason: no second line
                log.warning("broker %s:%d refused the connection: %s", self.host, self.port, self.refused)
            return
        t = self.topics
        client.subscribe([(t.manifest, 1), (t.onnx, 1), (t.release, 1), (t.ack(self.device_id), 1)])
        client.publish(t.status(self.device_id), self._status(True), qos=1, retain=True)
        self.resend.set()
        self.connected.set()
        log.info("connected to %s:%d (fleet %s)", self.host, self.port, t.fleet)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        was_up = self.connected.is_set()
        if not was_up and self.refused is None:
            self.closed_unanswered = True
        self.connected.clear()
        if reason_code != 0 and (was_up or self.started):
            log.warning("lost the broker (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, msg):
        t, topic, payload = self.topics, msg.topic, bytes(msg.payload)
        with self._lock:
            if topic in (t.manifest, t.onnx, t.release):
                limit = self.max_payload
            else:
                limit = MAX_ACK_BYTES if self.inbox.qsize() < MAX_QUEUED else -1
            if len(payload) > limit:
                # counted here: the main loop never sees it
                self.messages_received += 1
                self.bytes_received += len(payload)
                self.rejected += 1
                log.warning("dropped a message of %d bytes on %s (%s)", len(payload), topic,
                            "inbox full" if limit < 0 else f"over {limit} bytes")
                return
            if topic in (t.manifest, t.onnx, t.release):
                if topic not in self._latest:
                    self.inbox.put((topic, None))   # a token: poll() takes the newest payload
                self._latest[topic] = payload
            else:
                self.inbox.put((topic, payload))

    # -- main loop -----------------------------------------------------------------------------

    def _status(self, online: bool) -> bytes:
        return status_payload(self.device_id, online, self.version, self.samples, self.outbox)

    def start(self, wait: float, required: bool = True) -> None:
        """Connect, retrying until `wait` seconds have passed; then paho's thread keeps the
        connection up (reconnecting with backoff). With required=False (the device has its model
        already), a broker that is not there yet is no error: paho's thread goes on trying in the
        background and the device works offline meanwhile. A refused login or a failed TLS
        handshake is an error either way: waiting does not heal it."""
        deadline = time.monotonic() + wait
        last = None
        where = f"MQTT broker {self.host}:{self.port}"
        while True:
            try:
                self.client.connect(self.host, self.port, keepalive=30)
                break
            except (OSError, ValueError) as e:   # refused, unreachable, unresolvable, timeout, TLS
                first = last is None
                last, permanent = connect_error(e, self.auth.tls)
                if permanent:
                    raise EdgeSplError(f"cannot connect to {where}: {last}") from None
                if first and wait >= 5:   # a silent wait that long looks like a hang
                    log.info("%s not reachable (%s); trying for up to %g s", where, last, wait)
            if time.monotonic() >= deadline:
                if required:
                    raise EdgeSplError(f"cannot reach {where} ({last})")
                log.warning("cannot reach %s (%s); working offline and connecting in the background",
                            where, last)
                self.client.connect_async(self.host, self.port, keepalive=30)
                self.client.loop_start()
                self.started = True
                threading.Thread(target=self._beat, name="edge-spl-heartbeat", daemon=True).start()
                return
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        self.client.loop_start()
        answer_by = max(deadline, time.monotonic() + 0.5)
        # a refusal (bad credentials) does not heal by waiting: give up at once
        while not self.connected.wait(0.05) and self.refused is None and time.monotonic() < answer_by:
            pass
        if not self.connected.is_set() and not required and not self.refused and not self.closed_unanswered:
            log.warning("no answer from %s within %g s; working offline until it answers", where, wait)
        elif not self.connected.is_set():
            self.close(publish_offline=False)
            if self.refused:
                raise EdgeSplError(f"{where} refused the connection: {self.refused}")
            if self.closed_unanswered:
                hint = ("; if that port speaks TLS, give --tls-ca" if not self.auth.tls else
                        "; does it require a client certificate (--tls-cert, --tls-key)?"
                        if self.auth.tls_cert is None else "")
                raise EdgeSplError(f"{where} closed the connection without answering within {wait:g} s"
                                   f"{hint}")
            raise EdgeSplError(f"cannot reach {where} (no CONNACK within {wait:g} s)")
        self.started = True
        threading.Thread(target=self._beat, name="edge-spl-heartbeat", daemon=True).start()

    def poll(self, timeout: float = 0.0) -> list[Event]:
        """Decode what has arrived (waiting up to `timeout` for the first message)."""
        events = []
        try:
            item = self.inbox.get(timeout=timeout) if timeout > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return events
        while True:
            topic, payload = item
            with self._lock:
                if payload is None:
                    payload = self._latest.pop(topic)
                self.messages_received += 1
                self.bytes_received += len(payload)
            ev = self._decode(topic, payload)
            if ev is not None:
                events.append(ev)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return events

    def _decode(self, topic: str, payload: bytes) -> Event | None:
        if not payload:
            return None   # a cleared retained message
        t = self.topics
        try:
            if topic == t.release:
                r = decode_release(payload, self.max_payload, self.verify_key)
                # a release made for another fleet (signed with a key two fleets share) is not ours
                if r.fleet != t.fleet and (r.fleet or self.verify_key is not None):
                    raise ProtocolError(f"release v{r.version} is for fleet {r.fleet or '(unnamed)'!r}, "
                                        f"not {t.fleet!r}")
                return Event("release", r)
            if topic == t.manifest:
                return Event("manifest", Manifest.from_json(payload), sha256_hex(payload))
            if topic == t.onnx:
                return Event("onnx", payload)
            if topic == t.ack(self.device_id):
                return Event("ack", decode_ack(payload))
            return None
        except (ProtocolError, ModelError) as e:
            reason = str(e)
        except Exception as e:   # a decoder bug must not stop the device: reject what hit it
            log.debug("decoding a message on %s failed", topic, exc_info=True)
            reason = f"{type(e).__name__}: {e}"
        with self._lock:
            self.rejected += 1
            self.last_rejected[topic] = reason[:200]
        log.warning("rejected message on %s: %s", topic, reason[:200])
        return None

    def publish_delta(self, delta: PrototypeDelta) -> mqtt.MQTTMessageInfo | None:
        try:
            payload = encode_delta(delta, self.delta_limit)
        except ProtocolError as e:
            log.error("delta seq %d not sent: %s", delta.seq, e)
            return None
        info = self.client.publish(self.topics.delta(self.device_id), payload, qos=1)
        self.messages_sent += 1
        self.bytes_sent += len(payload)
        return info

    def publish_status(self) -> None:
        if self.connected.is_set():
            self.client.publish(self.topics.status(self.device_id), self._status(True), qos=1, retain=True)

    def pull_model(self, wait: float) -> tuple[ExportedModel, Release]:
        """The fleet's model from its retained messages: manifest and ONNX (checked against the
        manifest's sha256), then a release of that model's prototypes. A release that names its
        manifest's sha256 takes only that manifest; with a verify key the release must be signed
        (poll() drops any other) and name it, so everything pulled is covered by the signature."""
        deadline = time.monotonic() + wait
        manifest = onnx = release = None
        manifest_sha = ""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                t = self.topics
                refused = {n: self.last_rejected.get(topic) for n, topic in
                           (("manifest", t.manifest), ("onnx", t.onnx), ("release", t.release))}
                missing = [n for n, v in (("manifest", manifest), ("onnx", onnx), ("release", release))
                           if v is None]
                if any(refused[n] for n in missing):
                    n = next(n for n in missing if refused[n])
                    raise EdgeSplError(f"no model from MQTT broker {self.host}:{self.port} fleet {t.fleet!r}: "
                                       f"its {n} was refused ({refused[n]}); give --model, or fix what "
                                       f"the server publishes")
                why = (f"missing {', '.join(missing)}" if missing else
                       "manifest, ONNX and release do not match")
                raise EdgeSplError(f"no model on MQTT broker {self.host}:{self.port} fleet "
                                   f"{t.fleet!r} within {wait:g} s ({why}): "
                                   f"start the server or give --model")
            for ev in self.poll(timeout=min(left, 0.5)):
                if ev.kind == "manifest":
                    manifest, manifest_sha = ev.value, ev.sha256
                elif ev.kind == "onnx":
                    onnx = ev.value
                elif ev.kind == "release":
                    release = ev.value
            if manifest is None or onnx is None:
                continue
            if sha256_hex(onnx) != manifest.onnx_sha256:
                continue   # one of the two is being replaced; the matching one follows
            if release is None or release.model_sha256 != manifest.onnx_sha256:
                continue
            if self.verify_key is not None and not release.manifest_sha256:
                self.rejected += 1
                log.warning("release v%d is signed but names no manifest: its standardisation and "
                            "class names would be unchecked; waiting for another", release.version)
                release = None
                continue
            if release.manifest_sha256 and release.manifest_sha256 != manifest_sha:
                continue   # not the manifest the release names: that one follows, or is forged
            model = ExportedModel(manifest, onnx, [(P.copy(), g.copy()) for P, g in release.protos])
            try:
                manifest.check_prototypes(model.protos)
            except ModelError as e:
                self.rejected += 1
                log.warning("release v%d does not fit the manifest: %s", release.version, e)
                release = None
                continue
            return model, release

    def _beat(self) -> None:
        """The status again every STATUS_HEARTBEAT seconds while connected, whatever the stream does: a
        status older than a few heartbeats says the device is gone, even when no will was
        published for it (a broker restarted from its persistence after the device died)."""
        while not self._closing.wait(STATUS_HEARTBEAT):
            try:
                self.publish_status()
            except Exception:   # never the end of the device: the next beat tries again
                log.debug("heartbeat status not sent", exc_info=True)

    def close(self, publish_offline: bool = True) -> None:
        """Retained offline status (what the last will would say), then a clean disconnect."""
        self._closing.set()
        try:
            if publish_offline and self.connected.is_set():
                info = self.client.publish(self.topics.status(self.device_id), self._status(False),
                                           qos=1, retain=True)
                try:
                    info.wait_for_publish(timeout=2.0)
                except (ValueError, RuntimeError):
                    pass
            self.client.disconnect()
        finally:
            self.client.loop_stop()
