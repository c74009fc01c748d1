"""The broker's maximum packet size: what fits is computed exactly (checked against mosquitto's
max_packet_size), deltas over it go as several, a model or release that cannot fit is a clear
error at start."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_spl.errors import ModelError, ProtocolError
from edge_spl.export.onnx_export import export_model
from edge_spl.protocol import (LayerDelta, PrototypeDelta, Release, Topics, encode_delta, encode_release,
                               payload_limit, split_delta)
from edge_spl.server import merge
from edge_spl.server.service import Server

from conftest import make_model

EDGE_SPL = [sys.executable, "-m", "edge_spl"]


class Client:
    def __init__(self, broker):
        self.got, self.disconnected = [], threading.Event()
        c = self.c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        c.on_message = lambda cl, u, msg: self.got.append(len(msg.payload))
        c.on_disconnect = lambda *a: self.disconnected.set()
        c.reconnect_delay_set(30, 60)   # a refused publish must not come back during the test
        c.connect(*broker)
        c.loop_start()

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


@pytest.mark.parametrize("max_packet", [300, 20_000])
def test_payload_limit_is_exactly_what_mosquitto_takes(own_mosquitto, max_packet):
    broker = own_mosquitto(f"max_packet_size {max_packet}")
    topic = "edge-spl/limit-test/delta/some-device"
    limit = payload_limit(max_packet, topic)
    sub, pub = Client(broker), Client(broker)
    try:
        sub.c.subscribe(topic, qos=1)
        time.sleep(0.3)
        pub.c.publish(topic, b"x" * limit, qos=1).wait_for_publish(10)
        deadline = time.monotonic() + 10
        while not sub.got and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sub.got == [limit] and not pub.disconnected.is_set()
        # The limit counts the whole packet, as MQTT 5 defines Maximum Packet Size; mosquitto
        # (2.0) leaves out the remaining length's own 1-4 bytes, so it takes up to that much more.
        # Past that it hangs up.
        pub.c.publish(topic, b"x" * (limit + 5), qos=1)
        assert pub.disconnected.wait(10)
        time.sleep(0.3)
        assert sub.got == [limit]
    finally:
        sub.close()
        pub.close()


def a_delta(sizes=(8, 16, 16, 3), rows_per_layer=(16, 16, 3), seed=0) -> PrototypeDelta:
    rng = np.random.default_rng(seed)
    dims = list(zip(sizes[:-2], sizes[1:-1])) + [(sizes[0] + sizes[-2], sizes[-1])]
    layers = []
    for (d_in, d_out), k in zip(dims, rows_per_layer):
        rows = np.sort(rng.choice(d_out, k, replace=False)).astype(np.int32)
        layers.append(LayerDelta(rows, rng.standard_normal((k, d_in)).astype(np.float32),
                                 rng.standard_normal(k).astype(np.float32),
                                 rng.integers(1, 50, k).astype(np.float32)))
    return PrototypeDelta("dev", 7, 2, layers, "c" * 64)


def test_split_delta_parts_fit_and_merge_to_the_whole():
    d = a_delta((8, 64, 64, 3), (40, 64, 3))     # ~22 kB, of which ~3 kB is the npz's own
    whole = len(encode_delta(d))
    # measured at the largest seq a header can hold: a few bytes of room for the real ones
    groups = split_delta(d, whole + 40)
    assert len(groups) == 1 and groups[0] is d.layers
    for limit in (whole - 1, whole // 2, whole // 5):
        groups = split_delta(d, limit)
        assert len(groups) >= 2
        parts = [PrototypeDelta(d.device, d.seq + k, d.base_version, g, d.model_sha256)
                 for k, g in enumerate(groups)]
        assert all(len(encode_delta(p)) <= limit for p in parts)
        for i, L in enumerate(d.layers):       # every row exactly once, with its own values
            rows = np.concatenate([g[i].rows for g in groups])
            assert sorted(rows.tolist()) == L.rows.tolist()
        shapes = [(64, 8), (64, 64), (3, 72)]
        a = merge.MergeSums(shapes).add_delta(d, 3)
        b = merge.MergeSums(shapes)
        for p in parts:
            b.add_delta(p, 3)
        for x, y in zip(a.sum_wdP + a.sum_wdg + a.sum_w + a.max_s, b.sum_wdP + b.sum_wdg + b.sum_w + b.max_s):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ProtocolError, match="one row of layer"):
        split_delta(d, 600)


@pytest.fixture
def wide_model(tmp_path):
    """64-64-64-3: its deltas are tens of kB."""
    state = make_model((64, 64, 64, 3))
    folder = tmp_path / "wide"
    state.save(folder)
    exported = export_model(state)
    exported.save(str(folder))
    release = encode_release(Release(10 ** 6, exported.manifest.onnx_sha256, exported.protos, {"dev": 10 ** 6},
                                     time.time(), "d" * 64))
    return str(folder), exported, len(release)


def csv_stream(path, n, d=64, seed=0):
    rng = np.random.default_rng(seed)
    lines = [",".join(f"f{i}" for i in range(d)) + ",y"]
    for i in range(n):
        lines.append(",".join(f"{v:.3f}" for v in rng.standard_normal(d) + i % 3) + f",c{i % 3}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_deltas_over_the_packet_size_go_in_parts(own_mosquitto, wide_model, tmp_path, fleet):
    folder, exported, release_bytes = wide_model
    # the release just fits; a delta touching every row is a little larger (rows and counts): it
    # has to go in two
    max_packet = release_bytes + 200
    broker = own_mosquitto(f"max_packet_size {max_packet}")
    server = Server(broker, folder, str(tmp_path / "srv"), fleet=fleet, merge_every=0.2,
                    max_packet=max_packet).start()
    try:
        dev = subprocess.run(EDGE_SPL + ["device", "--broker", f"{broker[0]}:{broker[1]}", "--fleet", fleet,
                                         "--id", "dev", "--source", csv_stream(tmp_path / "s.csv", 200),
                                         "--state", str(tmp_path / "dev"), "--label", "y", "--lr-hidden", "0.05",
                                         "--sync-every", "50", "--max-packet", str(max_packet), "--quiet",
                                         "--wait", "20"],
                             capture_output=True, text=True, timeout=120)
        assert dev.returncode == 0, dev.stderr
        assert "lost the broker" not in dev.stderr and "not sent" not in dev.stderr, dev.stderr
        summary = json.loads((tmp_path / "dev" / "summary.json").read_text())
        assert summary["outbox"] == 0
        # 4 syncs and the last one; some cut in parts
        assert summary["deltas_pushed"] > 5, summary
        db = sqlite3.connect(tmp_path / "srv" / "server.db")
        seqs = [s for (s,) in db.execute("SELECT seq FROM merged_deltas WHERE device = 'dev' ORDER BY seq")]
        db.close()
        assert seqs == list(range(1, summary["deltas_pushed"] + 1))
    finally:
        server.stop()


def test_a_model_or_release_over_the_packet_size_is_refused_at_start(own_mosquitto, wide_model, tmp_path):
    folder, exported, release_bytes = wide_model
    with pytest.raises(ModelError, match="--max-packet"):
        Server(("127.0.0.1", 1), folder, str(tmp_path / "a"), max_packet=release_bytes // 2)
    got = subprocess.run(EDGE_SPL + ["server", "--broker", "127.0.0.1:1", "--model", folder, "--state",
                                     str(tmp_path / "b"), "--max-packet", str(release_bytes // 2)],
                         capture_output=True, text=True, timeout=60)
    assert got.returncode == 2 and len(got.stderr.strip().splitlines()) == 1 and "--max-packet" in got.stderr

    # a device whose single prototype row would not fit says so at start
    broker = own_mosquitto()
    got = subprocess.run(EDGE_SPL + ["device", "--broker", f"{broker[0]}:{broker[1]}", "--id", "dev",
                                     "--model", folder, "--source", csv_stream(tmp_path / "s.csv", 5),
                                     "--state", str(tmp_path / "dev"), "--max-packet", "1024", "--wait", "5"],
                         capture_output=True, text=True, timeout=60)
    assert got.returncode == 2 and "--max-packet 1024 is too small" in got.stderr, got.stderr
    assert "Traceback" not in got.stderr


def test_the_cli_default_packet_size_is_the_protocol_default():
    from edge_spl.cli import DEFAULT_MAX_PACKET
    from edge_spl.protocol import DEFAULT_MAX_PAYLOAD

    assert DEFAULT_MAX_PACKET == DEFAULT_MAX_PAYLOAD


def test_a_refused_start_releases_the_state_folder(wide_model, tmp_path):
    folder, exported, release_bytes = wide_model
    state = str(tmp_path / "srv")
    with pytest.raises(ModelError, match="a release is"):
        Server(("127.0.0.1", 1), folder, state, max_packet=release_bytes - 1000)
    # the lock and the database are let go: a second try on the same folder gets the same answer,
    # not "in use by another edge-spl server"
    with pytest.raises(ModelError, match="a release is"):
        Server(("127.0.0.1", 1), folder, state, max_packet=release_bytes - 1000)
