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
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_spl.errors import EdgeSplError, ModelError, ProtocolError
from edge_spl.files import atomic_write_bytes, lock_folder
from edge_spl.manifest import ExportedModel
from edge_spl.mqtt_auth import MqttAuth, connect_error, refusal
from edge_spl.protocol import (DEFAULT_MAX_PAYLOAD, TRANSIENT_REJECTIONS, Signer, Topics, ack_payload,
                               decode_delta, payload_limit)

from . import merge
from .releases import history_of, release_payload
from .store import DB_FILE, SQLiteStore, StoredVersion, StoreError

log = logging.getLogger("edge_spl.server")

STATS_FILE = "stats.json"
PUBLISH_WAIT = 5.0      # seconds to wait for the last publishes before disconnecting
# Bytes of deltas waiting for the next round (counting MESSAGE_OVERHEAD per message); past this a
# flood is dropped on arrival (counted as "overloaded", never acked, so a real device re-sends).
INBOX_BYTES = 256 * 1024 * 1024
MESSAGE_OVERHEAD = 256
LOGGED_REJECTIONS = 20    # per round; the rest are only counted


@dataclass
class Stats:
    """Counters of this server process (they start at zero on every start)."""
    messages_received: int = 0
    bytes_received: int = 0
    deltas_merged: int = 0
    deltas_rejected: dict = field(default_factory=dict)   # reason -> count
    rows_clipped: int = 0    # delta rows whose step or count was bounded (merge.clip_delta)
    versions_published: int = 0
    version: int = 0
    started: float = field(default_factory=time.time)

    def reject(self, reason: str) -> None:
        self.deltas_rejected[reason] = self.deltas_rejected.get(reason, 0) + 1


class Server:
    def __init__(self, broker: tuple[str, int], model_dir: str, state_dir: str, fleet: str = "default",
                 merge_every: float = 1.0, max_row_norm: float = merge.DEFAULT_MAX_ROW_NORM,
                 connect_timeout: float = 30.0, max_packet: int = DEFAULT_MAX_PAYLOAD,
                 signing_key: Signer | None = None, auth: MqttAuth | None = None,
                 merge_rule: str = "mean", clip_norm: float = merge.DEFAULT_CLIP_NORM,
                 max_count: float = merge.DEFAULT_MAX_COUNT):
        if not 0 < merge_every < 1e9:
            raise EdgeSplError(f"merge interval must be a positive number of seconds, got {merge_every}")
        self.broker = broker
        self.topics = Topics(fleet)
        self.merge_every = float(merge_every)
        self.max_row_norm = float(max_row_norm)
        if merge_rule not in merge.MERGE_RULES:
            raise EdgeSplError(f"merge rule {merge_rule!r}: expected one of {', '.join(merge.MERGE_RULES)}")
        if not (0 < clip_norm <= self.max_row_norm and 1 <= max_count < 1e15):
            raise EdgeSplError(f"clip norm {clip_norm} must be in (0, {self.max_row_norm:g}] and the count "
                               f"cap {max_count} at least 1")
        self.merge_rule = merge_rule
        self.clip_norm = float(clip_norm)
        self.max_count = float(max_count)
        self.connect_timeout = float(connect_timeout)
        # the broker's maximum packet size: deltas larger than it cannot arrive, and nothing larger
        # may be sent (a broker disconnects the sender, paho resends after the reconnect, forever)
        self.max_payload = int(max_packet)
        self.state_dir = state_dir
        try:
            os.makedirs(state_dir, exist_ok=True)
        except OSError as e:
            raise EdgeSplError(f"--state {state_dir}: cannot create the folder ({e.strerror})") from None
        self.model = ExportedModel.load(model_dir)
        self._check_fits(model_dir, "the ONNX file", len(self.model.onnx_bytes), self.topics.onnx)
        self._check_fits(model_dir, "the manifest", len(self.model.manifest.to_json()), self.topics.manifest)
        self.shapes = [ps for ps, _ in self.model.manifest.proto_shapes()]
        # one server per state folder: a second one would fork the version history
        self.signing_key = signing_key     # signs every release, the republish on reconnect too
        self._lock = lock_folder(state_dir, "edge-spl server")
        self.store = None
        try:
            self.store = SQLiteStore(os.path.join(state_dir, DB_FILE), self.model.manifest, self.model.protos)
            self.current: StoredVersion = self.store.latest()
            self.history = history_of(self.store)
            _check_not_behind(os.path.join(state_dir, STATS_FILE), self.store.path, self.current.version)
            # (a model's releases all weigh the same, less a few header bytes: the first one tells)
            self._check_fits(model_dir, "a release", self._release_size(self.current), self.topics.release)
            self._release_payload = self._encode_release(self.current)
        except BaseException:
            if self.store is not None:
                self.store.close()
            self._lock.close()
            raise
        self.stats = Stats(version=self.current.version)
        self.fatal: str | None = None   # why the loop stopped by itself (a damaged database)

        self._inbox: queue.Queue[tuple[str, bytes | None, int]] = queue.Queue()
        self._inbox_bytes = 0          # guarded by _inbox_lock
        self._inbox_lock = threading.Lock()
        self.inbox_limit = INBOX_BYTES
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._connect_refused: str | None = None
        self._connected_once = False
        # on_connect (network thread) and a round (owner thread) both publish the release; the
        # lock keeps a reconnect from re-publishing an older version after a newer one
        self._publish_lock = threading.RLock()
        self._pending = []          # MQTTMessageInfo of recent publishes, waited for at stop
        self._thread: threading.Thread | None = None
        self._dropped = 0               # messages not even queued (guarded by _inbox_lock)

        # A persistent session: deltas sent while the server restarts wait at the broker.
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-spl-server-{fleet}",
                                   clean_session=False, protocol=mqtt.MQTTv311)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.auth = auth or MqttAuth()
        self.auth.apply(self._client)

    @property
    def version(self) -> int:
        return self.current.version

    # -- MQTT callbacks (network thread): no decoding, no merging ------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._connect_refused = refusal(reason_code)
            if self._connected_once:   # before, connect() raises with the reason: no second line
                log.error("broker refused the connection: %s", self._connect_refused)
            return
        self._connect_refused = None
        client.subscribe(self.topics.all_deltas, qos=1)
        with self._publish_lock:
            self._publish(self.topics.manifest, self.model.manifest.to_json(), retain=True)
            self._publish(self.topics.onnx, self.model.onnx_bytes, retain=True)
            self._publish(self.topics.release, self._release_payload, retain=True)
        self._connected.set()
        self._connected_once = True
        log.debug("connected to %s:%d, subscribed to %s", *self.broker, self.topics.all_deltas)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self._connected.clear()
        if not self._stop.is_set() and self._connected_once:
            log.warning("lost the broker (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, msg):
        n = len(msg.payload)
        # An oversized payload is not kept (it is counted and rejected in the round); past the
        # inbox budget a message is only counted: the network thread never holds a flood.
        payload = bytes(msg.payload) if n <= self.max_payload else None
        with self._inbox_lock:
            cost = (n if payload is not None else 0) + MESSAGE_OVERHEAD
            if self._inbox_bytes + cost > self.inbox_limit:
                payload, cost = b"", MESSAGE_OVERHEAD   # an empty marker: "overloaded"
                if self._inbox_bytes + cost > self.inbox_limit:
                    self._dropped += 1
                    return
            self._inbox_bytes += cost
        self._inbox.put((msg.topic, payload, n))

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
            except (OSError, ValueError) as e:
                why, permanent = connect_error(e, self.auth.tls)
                if permanent:   # a failed TLS handshake
                    raise EdgeSplError(f"cannot connect to MQTT broker {host}:{port}: {why}") from None
                if time.monotonic() + delay > deadline:
                    raise EdgeSplError(f"cannot reach MQTT broker {host}:{port}: {e}") from None
                log.info("broker %s:%d not reachable (%s); retrying in %.1fs", host, port, e, delay)
                # a stop request (SIGTERM, Ctrl-C) ends the retries at once, not after the timeout
                if self._stop.wait(delay):
                    raise KeyboardInterrupt
                delay = min(delay * 2, 5.0)
        self._client.loop_start()
        answer_by = max(deadline, time.monotonic() + 1.0)
        while not self._connected.wait(0.1):
            # a refusal (bad credentials) does not heal by waiting: give up at once
            if self._stop.is_set() or self._connect_refused or time.monotonic() > answer_by:
                self._client.loop_stop()
                if self._stop.is_set():
                    raise KeyboardInterrupt
                if self._connect_refused:
                    raise EdgeSplError(f"MQTT broker {host}:{port} refused the connection: "
                                       f"{self._connect_refused}")
                hint = "" if self.auth.tls else "; if that port speaks TLS, give --tls-ca"
                raise EdgeSplError(f"cannot reach MQTT broker {host}:{port}: no answer to CONNECT{hint}")
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
                self._round_or_log()
            if not self.fatal:
                self._round_or_log()
        finally:
            self._shutdown()

    def _round_or_log(self) -> None:
        # A round that fails (a full disk under stats.json, a locked database) must not end the
        # server: what it did not store was not acked, and the devices send it again. A damaged
        # database does end it: no round would ever store again.
        try:
            self.merge_round()
        except StoreError as e:
            log.error("%s; stopping: restore server.db from a backup, or delete it to start a new "
                      "version history", e)
            self.fatal = str(e)
            self._stop.set()
        except Exception:
            log.exception("merge round failed; the server goes on")

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
            self._lock.close()
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
        self._lock.close()
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
        with self._inbox_lock:
            self._inbox_bytes = max(0, self._inbox_bytes - sum(
                (len(p) if p else 0) + MESSAGE_OVERHEAD for _, p, _ in items))
            dropped, self._dropped = self._dropped, 0
        if dropped:
            self.stats.messages_received += dropped
            self.stats.deltas_rejected["overloaded"] = self.stats.deltas_rejected.get("overloaded", 0) + dropped
            log.warning("inbox full: dropped %d messages unread", dropped)
        if not items:
            if dropped:
                self._write_stats()
            return 0
        base = self.current
        sums = merge.MergeSums(self.shapes)
        accepted = []                    # PrototypeDelta, as clipped
        in_round = set()
        rejections = []                  # (topic device or None, seq, reason)
        for topic, payload, size in items:
            self.stats.messages_received += 1
            self.stats.bytes_received += size
            device = self.topics.device_of(topic, "delta")
            if payload is None:
                rejections.append((device, -1, "malformed", f"payload of {size} bytes is over the "
                                                           f"{self.max_payload}-byte limit"))
                continue
            if size and not payload:
                rejections.append((device, -1, "overloaded", "inbox full"))
                continue
            try:
                rejection = self._check(device, payload, base.version, in_round)
            except (StoreError, sqlite3.Error):   # the database, not the delta: no acks this round
                raise
            except Exception as e:   # a validation bug must not end the server: reject and go on
                log.exception("checking a delta from %s failed", device or "?")
                rejection = (device, -1, "malformed", f"{type(e).__name__}: {e}")
            if isinstance(rejection, tuple):
                rejections.append(rejection)
                continue
            d, clipped = merge.clip_delta(rejection, self.clip_norm, self.max_count)
            self.stats.rows_clipped += clipped
            if self.merge_rule == "mean":
                sums.add_delta(d, base.version)
            in_round.add((d.device, d.seq))
            accepted.append(d)

        refused = [(dev, seq, reason) for dev, seq, reason, _ in rejections
                   if dev is not None and seq >= 1 and reason not in TRANSIENT_REJECTIONS]
        try:
            self.store.refuse(refused)
        except Exception:   # only the marks wait: the devices resend, and are refused again
            log.exception("could not record %d refused deltas", len(refused))
        version = base.version
        if accepted:
            if self.merge_rule == "mean":
                protos = merge.apply(base.protos, sums)
            else:
                protos = merge.robust_apply(base.protos, [(d, base.version) for d in accepted], self.merge_rule)
            encoded = []

            def publishable(v):   # in the commit's transaction: a version never published is never stored
                encoded.append(self._encode_release(v))

            try:
                new = self.store.commit(base, protos, [(d.device, d.seq) for d in accepted], check=publishable)
            except StoreError:
                raise
            except ProtocolError as e:
                # The release outgrew the broker's packet size (its merged marks grow with the
                # fleet). Nothing was stored or acked: the devices send these deltas again.
                log.error("version %d not stored: %s (the release's merged marks name %d devices); raise "
                          "the broker's max_packet_size and --max-packet", base.version + 1, e,
                          len(base.merged) + 1)
                accepted = []
            except Exception:
                # Nothing was acked, so the devices send these deltas again.
                log.exception("could not store version %d; its %d deltas are dropped unacked",
                              base.version + 1, len(accepted))
                accepted = []
            else:
                self.current = new
                version = new.version
                payload = encoded[-1]
                with self._publish_lock:
                    self._release_payload = payload
                    self._publish(self.topics.release, payload, retain=True)
                self.stats.deltas_merged += len(accepted)
                self.stats.versions_published += 1
                devices = sorted({d.device for d in accepted})
                log.info("version %d: merged %d deltas (%d rows) from %d device(s): %s", version,
                         len(accepted), merge.touched_rows(accepted), len(devices), ", ".join(devices))
        for d in accepted:
            self._publish(self.topics.ack(d.device), ack_payload(d.device, d.seq, True, "merged", version))
        for k, (device, seq, reason, detail) in enumerate(rejections):
            self.stats.reject(reason)
            if k < LOGGED_REJECTIONS:
                log.warning("rejected delta from %s seq %s: %s%s", device or "?", seq, reason,
                            f" ({detail[:200]})" if detail else "")
            if device is not None:
                self._publish(self.topics.ack(device), ack_payload(device, seq, False, reason, version))
        if len(rejections) > LOGGED_REJECTIONS:
            # a flood of junk must not become a flood of log lines
            log.warning("... and %d more rejected deltas in this round (counts in %s)",
                        len(rejections) - LOGGED_REJECTIONS, STATS_FILE)
        self._write_stats()
        return len(accepted)

    def _check(self, device, payload: bytes, version: int, in_round: set):
        """The decoded delta when it may be merged at `version`, else a rejection tuple."""
        try:
            d = decode_delta(payload, self.max_payload)
        except ProtocolError as e:
            return (device, -1, "malformed", str(e))
        if d.device != device:
            return (device, d.seq, "device mismatch", f"delta of {d.device!r} on the topic of {device!r}")
        if d.model_sha256 and d.model_sha256 != self.model.manifest.onnx_sha256:
            return (device, d.seq, "other model", f"learned on model {d.model_sha256[:12]}")
        if d.history and d.history != self.history:
            # made on a version history this server does not have (its database was replaced):
            # the device renumbers and rebases it once it takes a release of this history
            return (device, d.seq, "other history", f"history {d.history}, this server's is {self.history}")
        if (d.device, d.seq) in in_round or self.store.is_merged(d.device, d.seq):
            return (device, d.seq, "duplicate", "")
        reason = merge.validate_delta(d, self.shapes, version, self.max_row_norm)
        if reason is not None:
            return (device, d.seq, reason, f"base version {d.base_version}")
        return d

    # -- helpers ---------------------------------------------------------------------------------

    def _check_fits(self, model_dir: str, what: str, size: int, topic: str) -> None:
        limit = payload_limit(self.max_payload, topic)
        if size > limit:
            raise ModelError(f"{model_dir}: {what} is {size} bytes, over the {limit} bytes a message on "
                             f"{topic} can carry within the broker's maximum packet size of "
                             f"{self.max_payload} bytes (--max-packet); raise the broker's limit and "
                             f"--max-packet, or use a smaller model")

    def _release_size(self, v: StoredVersion) -> int:
        # +64: room for the version and merged counters to grow by some digits (each new device
        # in `merged` adds its name and seq: a fleet of thousands grows a release by tens of kB)
        return len(self._encode_release(v, limit=1 << 62)) + 64

    def _encode_release(self, v: StoredVersion, limit: int | None = None) -> bytes:
        return release_payload(self.model, v, self.topics.fleet, self.history, self.signing_key,
                               payload_limit(self.max_payload, self.topics.release) if limit is None else limit)

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


def _check_not_behind(stats_path: str, db_path: str, version: int) -> None:
    """stats.json is rewritten after each version is stored, so it never names a newer one than
    the database holds, unless the database lost stored versions (a truncated or replaced file, a
    lost -wal). Going on would publish version numbers the devices already have: they would
    refuse every release from then on."""
    try:
        with open(stats_path, "rb") as f:
            published = json.loads(f.read()).get("version")
    except (OSError, ValueError, AttributeError):
        return    # no stats yet, or unreadable: nothing to compare with
    if isinstance(published, int) and published > version:
        raise ModelError(f"{db_path} holds versions up to {version}, but this server already "
                         f"published version {published} ({stats_path}): the database lost versions; "
                         f"restore it from a backup, or delete both files to start a new version history")


def _published(info: mqtt.MQTTMessageInfo) -> bool:
    try:
        return info.is_published()
    except (ValueError, RuntimeError):
        return True     # failed: nothing left to wait for
