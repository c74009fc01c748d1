"""`edge-spl device`: predict a sensor stream, adapt with Forward-Forward, sync over MQTT."""
from __future__ import annotations

import csv
import json
import logging
import os
import signal
import sys
import threading
import time
import zlib
from typing import TYPE_CHECKING

import numpy as np

from edge_spl.data import iter_samples
from edge_spl.device.learner import FFLearner
from edge_spl.device.state import load_model, load_state, save_model, save_state
from edge_spl.errors import DataError, EdgeSplError, ModelError, ProtocolError
from edge_spl.files import atomic_write_bytes, lock_folder
from edge_spl.manifest import MANIFEST_FILE, ExportedModel, check_export_dir
from edge_spl.mqtt_auth import MqttAuth
from edge_spl.protocol import LayerDelta, PrototypeDelta, Topics, check_name, split_delta

if TYPE_CHECKING:   # paho-mqtt is imported only with --broker: an offline start skips it
    from edge_spl.device.sync import DeviceSync

log = logging.getLogger("edge_spl.device")
SUMMARY_FILE = "summary.json"
FIRST_RELEASE_WAIT = 3.0   # a fresh device waits this long for the fleet's retained release
LOCAL_MODEL_WAIT = 5.0     # how long a device that has its model waits for the broker before working offline
QUIET_EVERY = 500
# An outstanding delta not covered by a release this long after it was sent goes out again, even
# without a reconnect: the server may have lost it after its PUBACK (a crash before the round was
# stored, a full inbox), and it dedups what it already has.
RESEND_AFTER = 60.0
MAX_UNKNOWN_LABELS = 20
MAX_OUTBOX = 32
SHOWN_REFUSALS = 5   # refused deltas logged one by one; the rest are counted (and at the end, said)


class Counters:
    def __init__(self):
        self.samples = self.labeled = self.correct = self.labels_used = 0
        self.deltas_pushed = 0
        self.versions_adopted: list[int] = []
        self.rejected_seqs: set[int] = set()
        self.t0 = time.perf_counter()
        self.seconds = 0.0

    def line(self, learner: FFLearner) -> str:
        acc = f"{self.correct / self.labeled:.1%}" if self.labeled else "-"
        rate = self.samples / max(self.seconds, 1e-9)
        return (f"{self.samples} samples, accuracy {acc} on {self.labeled} labeled, "
                f"version {learner.base_version_}, {self.deltas_pushed} delta{'' if self.deltas_pushed == 1 else 's'} "
                f"pushed, {rate:.0f} samples/s")


def run(args) -> int:
    check_name("device id", args.id)
    Topics(args.fleet)
    # a file, or a FIFO or serial device to read as a stream; not a folder
    if args.source != "-" and (not os.path.exists(args.source) or os.path.isdir(args.source)):
        raise DataError(f"{args.source}: {'is a folder, expected a file' if os.path.isdir(args.source) else 'no such file'}")
    if args.wait < 0:
        raise EdgeSplError(f"--wait {args.wait:g}: expected a number of seconds >= 0")
    _check_predictions_path(args)
    if args.model:
        check_export_dir(args.model)   # before any broker connection
    auth = MqttAuth.from_args(args)
    verify_key = None
    if getattr(args, "verify_key", None):
        from edge_spl.signing import load_verify_key

        verify_key = load_verify_key(args.verify_key, "--verify-key")
    if auth.given and not args.broker:
        raise EdgeSplError("--username and --tls-* need --broker")
    if auth.username is not None and auth.username != args.id:
        log.warning("--username %r is not the device id %r: the fleet ACL of docs/mosquitto.md lets "
                    "a device publish only under its user name", auth.username, args.id)
    try:
        os.makedirs(args.state, exist_ok=True)
    except OSError as e:
        raise EdgeSplError(f"--state {args.state}: cannot create the folder ({e.strerror})") from None
    # one device per state folder: two would overwrite each other's state and outbox
    lock = lock_folder(args.state, "edge-spl device")
    previous = None
    if threading.current_thread() is threading.main_thread():
        # a service manager stops us with SIGTERM: leave through the same path as Ctrl-C,
        # which saves the state and says goodbye to the broker
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    sync = None
    try:
        if args.broker:
            from edge_spl.device.sync import DeviceSync
            host, port = args.broker
            sync = DeviceSync(host, port, args.fleet, args.id, max_packet=args.max_packet, auth=auth,
                              verify_key=verify_key)
            if verify_key is not None:
                log.info("adopting only releases signed by key %s", verify_key.key_id)
            # with the model at hand, a broker that is down must not keep the sensor data waiting
            # (nor a service in a restart loop): the device works offline and connects later
            have_model = bool(args.model) or os.path.isfile(os.path.join(args.state, MANIFEST_FILE))
            sync.start(min(args.wait, LOCAL_MODEL_WAIT) if have_model else args.wait, required=not have_model)
        return _run(args, sync)
    finally:
        if sync is not None:
            sync.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        lock.close()


def _check_predictions_path(args) -> None:
    """--predictions is truncated at start: it must not be the source or a file the device keeps."""
    if not args.predictions:
        return
    from edge_spl.device.state import PREV_FILE, STATE_FILE
    from edge_spl.manifest import MANIFEST_FILE, ONNX_FILE, PROTOTYPES_FILE

    kept = [os.path.join(d, n) for d in (args.state, args.model) if d
            for n in (STATE_FILE, PREV_FILE, SUMMARY_FILE, MANIFEST_FILE, ONNX_FILE, PROTOTYPES_FILE)]
    target = os.path.realpath(args.predictions)
    for path in ([args.source] if args.source != "-" else []) + kept:
        if os.path.realpath(path) == target:
            raise EdgeSplError(f"--predictions {args.predictions} would overwrite {path}; write the "
                               f"predictions to another file")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _load_model(args, sync: DeviceSync | None):
    """--model, else the copy kept in --state, else pulled from the broker (and kept)."""
    if args.model:
        return ExportedModel.load(args.model), None
    kept = load_model(args.state)
    if kept is not None:
        return kept, None
    if sync is None:
        raise ModelError(f"no model: give --model MODEL_DIR, or --broker to pull the fleet's model "
                         f"({args.state} holds none yet)")
    model, release = sync.pull_model(args.wait)
    save_model(model, args.state)
    log.info("pulled model %s (release v%d) from the broker", model.manifest.model_id, release.version)
    return model, release


def _check_delta_limit(learner: FFLearner, limit: int, max_packet: int) -> None:
    """Deltas are cut into groups of rows to fit the broker's packet size, but one row of the
    widest layer must fit: say so at start, not at the first sync."""
    widest = max(range(learner.n_layers), key=lambda i: learner.protos_[i][0].shape[1])
    layers = []
    for i, (P, _) in enumerate(learner.protos_):
        k = 1 if i == widest else 0
        layers.append(LayerDelta(np.zeros(k, np.int32), np.zeros((k, P.shape[1]), np.float32),
                                 np.zeros(k, np.float32), np.ones(k, np.float32)))
    try:
        split_delta(PrototypeDelta(learner.device_id, 1, 0, layers, learner.manifest.onnx_sha256), limit)
    except ProtocolError as e:
        raise EdgeSplError(f"--max-packet {max_packet} is too small for this model's deltas ({e})") from None


def _run(args, sync: DeviceSync | None) -> int:
    model, pulled_release = _load_model(args, sync)
    try:
        learner = FFLearner(model, device_id=args.id, seed=zlib.crc32(args.id.encode()),
                            lr_head=args.lr_head, lr_gate=args.lr_gate, lr_hidden=args.lr_hidden,
                            replay=args.replay, alpha=args.alpha)
    except ValueError as e:   # "<name> = <value>: expected ...": name the flag instead
        name, _, rest = str(e).partition(" = ")
        raise EdgeSplError(f"--{name.replace('_', '-')} = {rest}") from None
    if sync is not None:
        _check_delta_limit(learner, sync.delta_limit, args.max_packet)
    c = Counters()
    restored = load_state(learner, args.state)
    if restored:
        log.info("restored state from %s: v%d, %d samples seen, %d deltas in the outbox",
                 args.state, learner.base_version_, learner.n_samples_, len(learner.outstanding_))
    if pulled_release is not None and learner.adopt_release(pulled_release):
        c.versions_adopted.append(learner.base_version_)
    last_info = None
    sent_at: dict[int, float] = {}     # seq -> when it was last published
    answered: set[int] = set()         # seqs the server acked (merged or rejected): no timed resend

    def apply(events):
        for ev in events:
            if ev.kind == "release":
                history = learner.base_history_
                if learner.adopt_release(ev.value):
                    c.versions_adopted.append(learner.base_version_)
                    log.debug("adopted release v%d", learner.base_version_)
                    if history and learner.base_history_ != history and learner.outstanding_:
                        sync.resend.set()   # rebased onto a new version history: send them again
                elif ev.value.version == learner.base_version_ and learner.outstanding_:
                    # The server republishes its newest release whenever it (re)connects: after a
                    # restart it may have lost deltas it had PUBACKed but not stored. Re-send the
                    # outbox now rather than RESEND_AFTER later (the server drops duplicates).
                    sync.resend.set()
            elif ev.kind == "ack":
                answered.add(ev.value["seq"])
                learner.note_ack(ev.value["seq"], ev.value["accepted"], ev.value["reason"], ev.value["version"])
                if ev.value["accepted"]:
                    continue
                if ev.value["reason"] == "duplicate":   # a re-sent delta the server already has
                    log.debug("server already has delta seq %s", ev.value["seq"])
                else:
                    c.rejected_seqs.add(ev.value["seq"])
                    if len(c.rejected_seqs) <= SHOWN_REFUSALS:
                        log.warning("server rejected delta seq %s: %s%s", ev.value["seq"], ev.value["reason"],
                                    "; further refusals are only counted" if len(c.rejected_seqs) == SHOWN_REFUSALS
                                    else "")
                    else:
                        log.debug("server rejected delta seq %s: %s", ev.value["seq"], ev.value["reason"])
            elif ev.kind == "manifest" and ev.value.onnx_sha256 != model.manifest.onnx_sha256:
                where = "--model" if args.model else f"its state in {args.state}"
                log.warning("fleet %s runs model %s; this device runs %s (from %s): the server refuses "
                            "its deltas. Give the fleet's model, or run without --model on a new --state "
                            "to pull it", args.fleet, ev.value.onnx_sha256[:12],
                            model.manifest.onnx_sha256[:12], where)

    def flush_outbox():
        nonlocal last_info
        if not sync.connected.is_set():
            return
        every = sync.resend.is_set()   # after a (re)connect: all of them
        sync.resend.clear()
        now = time.monotonic()
        for dlt in learner.outstanding_:
            if every or (dlt.seq not in answered and now - sent_at.get(dlt.seq, now) >= RESEND_AFTER):
                last_info = sync.publish_delta(dlt) or last_info
                sent_at[dlt.seq] = now

    def do_sync():
        nonlocal last_info
        new = []
        if sync is not None:
            apply(sync.poll())
            flush_outbox()
            # offline, learning stays unpushed and goes out as one delta on reconnect; a delta
            # over the broker's packet size goes as several, each a group of rows
            # An outbox that no server answers (the server down, the broker up) stops growing at
            # MAX_OUTBOX: learning goes on, unpushed, and leaves as one delta once it drains.
            if sync.connected.is_set() and len(learner.outstanding_) < MAX_OUTBOX:
                new = learner.make_deltas(sync.delta_limit)
        # Write-ahead: the delta is in the saved outbox before it can reach the server. Saved
        # after the publish, a crash in between would restart without it and give its seq to
        # new learning, which the server would then drop as a duplicate.
        save_state(learner, args.state)
        for dlt in new:
            last_info = sync.publish_delta(dlt) or last_info
            sent_at[dlt.seq] = time.monotonic()
            c.deltas_pushed += 1
        if sync is not None:
            _report(sync, learner)
            sync.publish_status()
        out.flush()   # a reader on a pipe sees predictions at least once per sync

    if sync is not None:
        deadline = time.monotonic() + (0.0 if restored or pulled_release else min(args.wait, FIRST_RELEASE_WAIT))
        while True:
            events = sync.poll(timeout=max(0.0, min(0.2, deadline - time.monotonic())))
            apply(events)
            if any(ev.kind == "release" for ev in events) or time.monotonic() >= deadline:
                break
        flush_outbox()

    names = model.manifest.class_names
    index_of = {n: i for i, n in enumerate(names)}
    unknown: set[str] = set()
    n_labels = 0
    out = sys.stdout
    pred_file = pred_writer = None
    if args.predictions:
        try:
            pred_file = open(args.predictions, "w", newline="", encoding="utf-8")
        except OSError as e:
            raise EdgeSplError(f"--predictions {args.predictions}: cannot write ({e.strerror})") from None
        pred_writer = csv.writer(pred_file)
        pred_writer.writerow(["index", "prediction", "label", "version"])
    interrupted = False
    try:
        c.t0 = time.perf_counter()
        for s in iter_samples(args.source, model.manifest.feature_names, args.label):
            y = -1
            if s.label is not None:
                y = index_of.get(s.label, -1)
                if y < 0 and s.label not in unknown and len(unknown) <= MAX_UNKNOWN_LABELS:
                    # a label column of timestamps or readings would otherwise warn (and be kept)
                    # once per row, forever
                    unknown.add(s.label)
                    if len(unknown) <= MAX_UNKNOWN_LABELS:
                        log.warning("label %r is not one of the model's classes %s; treating it as "
                                    "unlabeled", s.label[:80], names)
                    else:
                        log.warning("more than %d labels that are not model classes; no longer "
                                    "reporting them (is --label the right column?)", MAX_UNKNOWN_LABELS)
            learn = -1
            if y >= 0:
                if n_labels % args.label_every == 0:
                    learn = y
                    c.labels_used += 1
                n_labels += 1
            pred, conf = learner.step(s.x, learn)
            c.samples += 1
            if y >= 0:
                c.labeled += 1
                c.correct += pred == y
            label = s.label if s.label is not None else "-"
            if not args.quiet:
                out.write(f"{s.index} pred={names[pred]} conf={conf:.2f} label={label} "
                          f"version={learner.base_version_}\n")
            if pred_writer is not None:
                pred_writer.writerow([s.index, names[pred], s.label or "", learner.base_version_])
            if c.samples % args.sync_every == 0:
                do_sync()
            if args.quiet and c.samples % QUIET_EVERY == 0:
                c.seconds = time.perf_counter() - c.t0
                print(c.line(learner), flush=True)
        c.seconds = time.perf_counter() - c.t0
        if c.samples == 0:
            log.warning("%s held no samples", "stdin" if args.source == "-" else args.source)
        if sync is not None:
            if not sync.connected.is_set() and any(np.any(n > 0) for n in learner.counts_):
                # learned offline: give the broker up to --wait to come back for the last delta
                log.info("the stream ended while the broker is away; waiting up to %g s for it", args.wait)
                sync.connected.wait(args.wait)
            do_sync()
            _wait_for_cover(args, sync, learner, c, apply, flush_outbox)
            if last_info is not None:
                # is_published() raises too: for a publish paho queued while the broker was gone
                # (rc "no connection"), which it sends after a reconnect
                try:
                    if not last_info.is_published():
                        last_info.wait_for_publish(timeout=min(args.wait, 5.0))
                except (ValueError, RuntimeError) as e:
                    log.warning("last delta may not have reached the broker (%s); it stays in the "
                                "outbox in %s", e, args.state)
            if c.rejected_seqs:
                log.warning("the server refused %d of this device's deltas (the first reasons are above)",
                            len(c.rejected_seqs))
    except KeyboardInterrupt:   # Ctrl-C or the service manager's SIGTERM
        interrupted = True
        raise
    finally:
        if c.seconds == 0.0:
            c.seconds = time.perf_counter() - c.t0
        if pred_file is not None:
            pred_file.close()
        out.flush()
        save_state(learner, args.state)
        _write_summary(args, learner, sync, c)
        if sync is not None:
            _report(sync, learner)   # what the offline status says when the device stops
        if interrupted:
            print(f"stopped after {c.samples} samples: what it learned and its outbox of "
                  f"{len(learner.outstanding_)} deltas are saved in {args.state}", file=sys.stderr, flush=True)
    print(("" if args.quiet else "done: ") + c.line(learner),
          file=sys.stdout if args.quiet else sys.stderr, flush=True)
    return 0


def _report(sync: DeviceSync, learner: FFLearner) -> None:
    """The figures of the device's next status message."""
    sync.version, sync.samples, sync.outbox = learner.base_version_, learner.n_samples_, len(learner.outstanding_)


def _wait_for_cover(args, sync, learner, c, apply, flush_outbox) -> None:
    """Up to --wait s for a release that merges every delta this device pushed."""
    deadline = time.monotonic() + args.wait
    while True:
        waiting = [d.seq for d in learner.outstanding_ if d.seq not in c.rejected_seqs]
        if not waiting:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            log.warning("no release merged deltas %s within %g s; they stay in the outbox in %s",
                        waiting, args.wait, args.state)
            return
        apply(sync.poll(timeout=min(left, 0.5)))
        flush_outbox()


def _write_summary(args, learner: FFLearner, sync: DeviceSync | None, c: Counters) -> None:
    summary = {
        "device": args.id,
        "samples": c.samples,
        "labeled": c.labeled,
        "correct": c.correct,
        "accuracy": c.correct / c.labeled if c.labeled else None,
        "labels_used": c.labels_used,
        "versions_adopted": c.versions_adopted,
        "version": learner.base_version_,
        "deltas_pushed": c.deltas_pushed,
        "outbox": len(learner.outstanding_),
        "messages_sent": sync.messages_sent if sync else 0,
        "bytes_sent": sync.bytes_sent if sync else 0,
        "messages_received": sync.messages_received if sync else 0,
        "bytes_received": sync.bytes_received if sync else 0,
        "messages_rejected": sync.rejected if sync else 0,
        "seconds": round(c.seconds, 3),
        "samples_per_s": c.samples / c.seconds if c.seconds > 0 else 0.0,
    }
    atomic_write_bytes(os.path.join(args.state, SUMMARY_FILE), json.dumps(summary, indent=1).encode())
