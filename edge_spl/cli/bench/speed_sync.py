"""Sync of `edge-spl bench speed`: bytes per delta and per release against the dense float32
prototype arrays, the error and accuracy cost of lossy encodings of a delta (simulated here; the
wire protocol sends float32 rows), and the server's merge rate and merge-to-publish latency with
simulated devices on the real MQTT broker."""
from __future__ import annotations

import logging
import threading
import time
import uuid

import numpy as np

from edge_spl.device.learner import FFLearner
from edge_spl.protocol import (LayerDelta, PrototypeDelta, Release, Topics, decode_delta,
                               decode_release, encode_delta, encode_release)
from edge_spl.server import merge

ENCODINGS = ("f32", "f16", "i8")


def dense_bytes(protos) -> int:
    return int(sum(P.nbytes + g.nbytes for P, g in protos))


def lossy(delta: PrototypeDelta, encoding: str, wire: int) -> tuple[PrototypeDelta, int, float]:
    """The delta as the server would see it after `encoding`, the payload size it would take and
    the largest error relative to each row's largest |dP|. f32: the protocol as it is; f16: dP
    and dg as float16; i8: dP as int8 with a float32 absmax scale per row, dg as float16. Both
    also carry rows as uint16 and counts as float16, which is exact for layers of up to 65,536
    units and counts up to 2,048 (a delta covers --sync-every samples)."""
    if encoding == "f32":
        return delta, wire, 0.0
    layers, size, err = [], wire, 0.0
    for L in delta.layers:
        dP, dg = np.asarray(L.dP, np.float32), np.asarray(L.dg, np.float32)
        if encoding == "f16":
            qP = dP.astype(np.float16).astype(np.float32)
            size -= dP.nbytes // 2
        else:
            scale = np.abs(dP).max(axis=1, keepdims=True) / 127.0
            scale[scale == 0] = 1.0
            qP = (np.round(dP / scale).astype(np.int8).astype(np.float32) * scale).astype(np.float32)
            size -= dP.nbytes * 3 // 4 - scale.nbytes
        qg = dg.astype(np.float16).astype(np.float32)
        size -= dg.nbytes // 2 + np.asarray(L.rows).nbytes // 2 + np.asarray(L.counts).nbytes // 2
        if dP.size:
            rowmax = np.abs(dP).max(axis=1, keepdims=True)
            rowmax[rowmax == 0] = 1.0
            err = max(err, float((np.abs(qP - dP) / rowmax).max()))
        layers.append(LayerDelta(L.rows, qP, qg, L.counts))
    return PrototypeDelta(delta.device, delta.seq, delta.base_version, layers), size, err


def sync_stream(exported, X: np.ndarray, y: np.ndarray, encoding: str, lr_hidden: float,
                sync_every: int = 100) -> dict:
    """One device streaming (predict, then learn from the label), a delta every `sync_every`
    samples merged by the server's merge rule in process, the release adopted at once."""
    learner = FFLearner(exported, device_id="bench", lr_hidden=lr_hidden)
    sha = exported.manifest.onnx_sha256
    server = [(P.copy(), g.copy()) for P, g in exported.protos]
    shapes = merge.layer_shapes(server)
    version, merged = 0, {}
    correct, wires, errs, releases = 0, [], [], []
    for i in range(len(y)):
        pred, _ = learner.step(X[i], int(y[i]))
        correct += pred == y[i]
        if (i + 1) % sync_every and i + 1 < len(y):
            continue
        d = learner.make_delta()
        if d is None:
            continue
        payload = encode_delta(d)
        got, wire, err = lossy(decode_delta(payload), encoding, len(payload))
        wires.append(wire)
        errs.append(err)
        sums = merge.MergeSums(shapes).add_delta(got, version)
        server = merge.apply(server, sums)
        version += 1
        merged["bench"] = d.seq
        rel = Release(version, sha, server, dict(merged))
        releases.append(len(encode_release(rel)))
        learner.adopt_release(rel)
    dense = dense_bytes(server)
    return {"accuracy": correct / max(1, len(y)), "deltas": len(wires),
            "delta_bytes_mean": float(np.mean(wires)) if wires else 0.0,
            "release_bytes": float(np.mean(releases)) if releases else 0.0,
            "dense_f32_bytes": dense,
            "delta_bytes_ratio": float(np.mean(wires)) / dense if wires else 0.0,
            "max_rel_error": float(max(errs)) if errs else 0.0}


def server_rate(model_dir: str, state_dir: str, broker: tuple[str, int], template: PrototypeDelta,
                n_devices: int, per_device: int, timeout: float = 60.0) -> dict:
    """The real server (edge_spl.server.service.Server, merge every 50 ms) and one MQTT client
    publishing `per_device` deltas for each of `n_devices` simulated devices (QoS 1, one topic
    each), on a fleet of its own. Returns deltas merged per second end to end (first publish to
    the release covering the last delta), merge-only rate, and merge-to-publish latency (round
    start to the release arriving at a subscriber)."""
    import paho.mqtt.client as mqtt

    from edge_spl.server.service import Server

    fleet = "bench" + uuid.uuid4().hex[:12]
    topics = Topics(fleet)
    srv = Server(broker, model_dir, state_dir, fleet=fleet, merge_every=0.05, connect_timeout=10.0)
    quiet = logging.getLogger("edge_spl.server")
    level = quiet.level
    quiet.setLevel(logging.WARNING)   # a line per version naming 200 devices says nothing here
    rounds = []
    plain_round = srv.merge_round

    def timed_round():
        t0 = time.perf_counter()
        n = plain_round()
        rounds.append((t0, time.perf_counter(), n, srv.version))
        return n
    srv.merge_round = timed_round   # measuring only: the round itself is the server's own

    arrivals: dict[int, float] = {}
    got_release = threading.Event()

    def on_release(client, userdata, msg):
        if msg.payload:
            try:
                arrivals.setdefault(decode_release(bytes(msg.payload)).version, time.perf_counter())
            except Exception:   # a payload of another benchmark would be a bug; ignore, keep timing
                return
            got_release.set()

    total = n_devices * per_device
    payloads = [(topics.delta(f"sim{d:04d}"),
                 encode_delta(PrototypeDelta(f"sim{d:04d}", s, 0, template.layers)))
                for s in range(1, per_device + 1) for d in range(n_devices)]
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{fleet}-sub", protocol=mqtt.MQTTv311)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{fleet}-pub", protocol=mqtt.MQTTv311)
    pub.max_inflight_messages_set(100)
    pub.max_queued_messages_set(0)
    sub.on_message = on_release
    srv.start()
    t0 = t_done = None
    try:
        sub.connect(*broker)
        sub.subscribe(topics.release, qos=1)
        sub.loop_start()
        got_release.wait(5.0)   # the retained version 0
        pub.connect(*broker)
        pub.loop_start()
        t0 = time.perf_counter()
        infos = [pub.publish(t, p, qos=1) for t, p in payloads]
        deadline = t0 + timeout
        while srv.stats.deltas_merged < total and time.perf_counter() < deadline:
            time.sleep(0.005)
        final = srv.version
        while final not in arrivals and time.perf_counter() < deadline:
            time.sleep(0.002)
        t_done = arrivals.get(final, time.perf_counter())
        for info in infos[-1:]:
            info.wait_for_publish(1.0)
    finally:
        srv.stop()
        quiet.setLevel(level)
        for t in (topics.manifest, topics.onnx, topics.release):   # leave no retained messages
            pub.publish(t, b"", qos=1, retain=True).wait_for_publish(2.0)
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()
    merged = srv.stats.deltas_merged
    busy = sum(t1 - ts for ts, t1, n, _ in rounds if n > 0)
    lat = [arrivals[v] - ts for ts, _, n, v in rounds if n > 0 and v in arrivals]
    return {"devices": n_devices, "deltas_sent": total, "deltas_merged": merged,
            "delta_bytes": len(payloads[0][1]),
            "merged_per_s": merged / max(t_done - t0, 1e-9) if t0 is not None else 0.0,
            "merge_only_per_s": merged / busy if busy > 0 else 0.0,
            "rounds": sum(1 for r in rounds if r[2] > 0),
            "merge_to_publish_p50_ms": float(np.percentile(lat, 50)) * 1e3 if lat else None,
            "merge_to_publish_p99_ms": float(np.percentile(lat, 99)) * 1e3 if lat else None,
            "complete": merged >= total}
