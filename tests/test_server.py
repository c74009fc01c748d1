"""The server role: the merge rule (pure), the SQLite store, and the MQTT service against the real
mosquitto (a fake device is a plain paho client)."""
from __future__ import annotations

import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import time
import uuid

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from conftest import free_port, make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from edge_spl.errors import EdgeSplError, ModelError
from edge_spl.files import pack_arrays
from edge_spl.manifest import ExportedModel
from edge_spl.protocol import (LayerDelta, PrototypeDelta, Topics, decode_json, decode_release,
                               encode_delta)
from edge_spl.server import merge
from edge_spl.server.service import STATS_FILE, Server
from edge_spl.server.store import DB_FILE, SQLiteStore, high_water_mark

SHAPES = [(16, 8), (16, 16), (3, 24)]   # the 8-16-16-3 model of conftest; its head sees [z, h]
WAIT = 10.0


def random_delta(rng, device="dev", seq=1, base=0, shapes=SHAPES, rows=None, scale=0.05):
    """A delta touching random rows (or the given rows per layer)."""
    layers = []
    for i, (d_out, d_in) in enumerate(shapes):
        r = np.sort(rng.choice(d_out, rng.integers(0, d_out // 2 + 1), replace=False)) if rows is None \
            else np.asarray(rows[i])
        k = len(r)
        layers.append(LayerDelta(r.astype(np.int32), (rng.standard_normal((k, d_in)) * scale).astype(np.float32),
                                 (rng.standard_normal(k) * scale).astype(np.float32),
                                 rng.integers(1, 50, k).astype(np.float32)))
    return PrototypeDelta(device, seq, base, layers)


def random_protos(rng, shapes=SHAPES):
    return [(rng.standard_normal(s).astype(np.float32), rng.standard_normal(s[0]).astype(np.float32))
            for s in shapes]


def slow_merge(protos, deltas, current_version):
    """The rule written out row by row."""
    out = []
    for i, (P, g) in enumerate(protos):
        P2, g2 = P.astype(np.float64), g.astype(np.float64)
        for r in range(P.shape[0]):
            num_P, num_g, den, top = np.zeros(P.shape[1]), 0.0, 0.0, 0.0
            for d in deltas:
                L = d.layers[i]
                hit = np.flatnonzero(L.rows == r)
                if len(hit):
                    j = hit[0]
                    lag = current_version - d.base_version
                    s = 1.0 if lag <= 8 else 8.0 / lag
                    num_P += L.counts[j] * s * L.dP[j].astype(np.float64)
                    num_g += L.counts[j] * s * float(L.dg[j])
                    den += L.counts[j] * s
                    top = max(top, s)
            if den:
                P2[r] += top * num_P / den
                g2[r] += top * num_g / den
        out.append((P2.astype(np.float32), g2.astype(np.float32)))
    return out


def assert_protos_close(a, b, atol=1e-5):
    assert len(a) == len(b)
    for (P, g), (P2, g2) in zip(a, b):
        np.testing.assert_allclose(P, P2, atol=atol, rtol=1e-5)
        np.testing.assert_allclose(g, g2, atol=atol, rtol=1e-5)


# -- the merge rule ----------------------------------------------------------------------------

def test_merge_equals_the_row_by_row_rule():
    rng = np.random.default_rng(1)
    protos = random_protos(rng)
    current = 20
    def rows():   # random rows, but row 0 of layer 0 is never touched
        return [np.sort(rng.choice(np.arange(i == 0, o), rng.integers(0, o // 2 + 1), replace=False))
                for i, (o, _) in enumerate(SHAPES)]

    deltas = [random_delta(rng, f"d{k}", 1, base=int(rng.integers(0, current + 1)), rows=rows())
              for k in range(6)]
    sums = merge.MergeSums(SHAPES)
    for d in deltas:
        assert merge.validate_delta(d, SHAPES, current) is None
        sums.add_delta(d, current)
    before = [(P.copy(), g.copy()) for P, g in protos]
    got = merge.apply(protos, sums)
    assert_protos_close(got, slow_merge(protos, deltas, current))
    assert_protos_close(protos, before, atol=0)            # inputs untouched
    assert sums.sum_w[0][0] == 0
    assert np.array_equal(got[0][0][0], protos[0][0][0]) and got[0][1][0] == protos[0][1][0]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 7), data=st.data())
def test_merge_is_order_and_grouping_independent(seed, n, data):
    rng = np.random.default_rng(seed)
    protos = random_protos(rng)
    deltas = [random_delta(rng, f"d{k}", 1, base=int(rng.integers(0, 13))) for k in range(n)]
    order = data.draw(st.permutations(range(n)))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(n - 1, 1)), max_size=n)))
    groups = [order[a:b] for a, b in zip([0] + cuts, cuts + [n]) if order[a:b]]

    one = merge.MergeSums(SHAPES)
    for d in deltas:
        one.add_delta(d, 12)
    total = merge.MergeSums(SHAPES)
    for grp in groups:         # partial sums, e.g. from several replicas, added in another order
        part = merge.MergeSums(SHAPES)
        for k in grp:
            part.add_delta(deltas[k], 12)
        total.add(part)
    assert total.n_deltas == n
    assert_protos_close(merge.apply(protos, total), merge.apply(protos, one))


def test_staleness_weighs_a_stale_delta_less_and_never_shrinks_a_fresh_one():
    assert merge.staleness(0) == merge.staleness(8) == 1.0
    assert merge.staleness(16) == 0.5 and merge.staleness(80) == 0.1
    rng = np.random.default_rng(2)
    protos = random_protos(rng)
    rows = [[3], [], []]
    stale = random_delta(rng, "old", 1, base=0, rows=rows)
    fresh = random_delta(rng, "new", 1, base=16, rows=rows)
    # a lone delta 16 versions old moves its row half as far
    got = merge.apply(protos, merge.MergeSums(SHAPES).add_delta(stale, 16))
    np.testing.assert_allclose(got[0][0][3] - protos[0][0][3], 0.5 * stale.layers[0].dP[0], atol=1e-6)
    # with a fresh delta on the same row: the mean weighted by c * s, (c1 0.5 d1 + c2 d2) / (c1 0.5 + c2)
    got = merge.apply(protos, merge.MergeSums(SHAPES).add_delta(stale, 16).add_delta(fresh, 16))
    c1, c2 = stale.layers[0].counts[0], fresh.layers[0].counts[0]
    want = (c1 * 0.5 * stale.layers[0].dP[0] + c2 * fresh.layers[0].dP[0]) / (c1 * 0.5 + c2)
    np.testing.assert_allclose(got[0][0][3] - protos[0][0][3], want, atol=1e-6)
    # a stale delta that agrees with a fresh one, however many samples it claims, leaves its step
    # as it is (the rule once shrank it: only its numerator was down-weighted)
    same = [LayerDelta(np.array([3], np.int32), np.ones((1, 8), np.float32), np.ones(1, np.float32),
                       np.array([c], np.float32)) for c in (100.0, 5000.0)]
    empty = [LayerDelta(np.zeros(0, np.int32), np.zeros((0, d_in), np.float32), np.zeros(0, np.float32),
                        np.zeros(0, np.float32)) for _, d_in in SHAPES[1:]]
    sums = merge.MergeSums(SHAPES).add_delta(PrototypeDelta("new", 1, 40, [same[0]] + empty), 40)
    sums.add_delta(PrototypeDelta("old", 1, 0, [same[1]] + empty), 40)
    got = merge.apply(protos, sums)
    np.testing.assert_allclose(got[0][0][3] - protos[0][0][3], 1.0, rtol=1e-6)


def test_validate_delta_reasons():
    rng = np.random.default_rng(3)
    ok = random_delta(rng, rows=[[0, 15], [1], [2]])
    assert merge.validate_delta(ok, SHAPES, 0) is None

    def with_layer0(**kw):
        L = ok.layers[0]
        new = LayerDelta(**{**dict(rows=L.rows, dP=L.dP, dg=L.dg, counts=L.counts), **kw})
        return PrototypeDelta("dev", 1, 0, [new] + ok.layers[1:])

    cases = {
        "layer count": PrototypeDelta("dev", 1, 0, ok.layers[:2]),
        "future base version": PrototypeDelta("dev", 1, 1, ok.layers),
        "seq out of range": PrototypeDelta("dev", 0, 0, ok.layers),
        "rows out of range": with_layer0(rows=np.array([0, 16], np.int32)),
        "d_in mismatch": with_layer0(dP=np.zeros((2, 9), np.float32)),
        "norm too large": with_layer0(dP=np.full((2, 8), 1e3, np.float32)),
        "non-finite": with_layer0(dg=np.array([0, np.nan], np.float32)),
        "bad counts": with_layer0(counts=np.array([1, 0], np.float32)),
        "repeated rows": with_layer0(rows=np.array([4, 4], np.int32)),
        "empty": PrototypeDelta("dev", 1, 0, [LayerDelta(np.zeros(0, np.int32), np.zeros((0, i), np.float32),
                                                         np.zeros(0, np.float32), np.zeros(0, np.float32))
                                              for _, i in SHAPES]),
        "no change": PrototypeDelta("dev", 1, 0, [LayerDelta(L.rows, np.zeros_like(L.dP), np.zeros_like(L.dg),
                                                             L.counts) for L in ok.layers]),
    }
    for reason, d in cases.items():
        assert merge.validate_delta(d, SHAPES, 0) == reason
    assert merge.validate_delta(with_layer0(dP=np.full((2, 8), 1.0, np.float32)), SHAPES, 0,
                                max_row_norm=2.0) == "norm too large"


# -- the store ---------------------------------------------------------------------------------

def test_high_water_mark_is_contiguous():
    assert high_water_mark(0, []) == 0
    assert high_water_mark(0, [2, 3]) == 0
    assert high_water_mark(0, [3, 1, 2, 5]) == 3
    assert high_water_mark(3, [4, 6, 7]) == 4


def test_store_versions_persist_and_a_commit_is_one_transaction(tiny_model_dir, tmp_path):
    model = ExportedModel.load(tiny_model_dir)
    path = str(tmp_path / "state" / DB_FILE)
    store = SQLiteStore(path, model.manifest, model.protos)
    v0 = store.latest()
    assert v0.version == 0 and v0.parent is None and v0.merged == {}
    assert_protos_close(v0.protos, model.protos, atol=0)
    protos1 = [(P + 1, g - 1) for P, g in model.protos]
    v1 = store.commit(v0, protos1, [("a", 1), ("a", 3), ("b", 2)])
    assert v1.version == 1 and v1.merged == {"a": 1}
    v2 = store.commit(v1, protos1, [("a", 2), ("b", 1)])
    assert v2.merged == {"a": 3, "b": 2}
    # (a, 2) is already merged: the whole version is rolled back
    with pytest.raises(sqlite3.IntegrityError):
        store.commit(v2, model.protos, [("c", 1), ("a", 2)])
    assert not store.is_merged("c", 1) and store.is_merged("a", 2)
    store.close()

    store = SQLiteStore(path, model.manifest, model.protos)   # reopen: nothing of v0 re-inserted
    latest = store.latest()
    assert latest.version == 2 and latest.parent == 1 and latest.n_deltas == 2
    assert latest.merged == {"a": 3, "b": 2}
    assert_protos_close(latest.protos, protos1, atol=0)
    store.close()


def test_store_refuses_another_model_and_corrupt_files(tiny_model_dir, tmp_path):
    from edge_spl.export.onnx_export import export_model

    model = ExportedModel.load(tiny_model_dir)
    path = str(tmp_path / DB_FILE)
    SQLiteStore(path, model.manifest, model.protos).close()
    other_dir = str(tmp_path / "other")
    export_model(make_model(seed=1)).save(other_dir)
    other = ExportedModel.load(other_dir)
    with pytest.raises(ModelError, match="another --state folder for a new model"):
        SQLiteStore(path, other.manifest, other.protos)

    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ModelError, match="not a readable server database"):
        SQLiteStore(str(junk), model.manifest, model.protos)

    # a stored version whose arrays do not fit the manifest
    db = sqlite3.connect(path)
    db.execute("UPDATE versions SET protos = ? WHERE version = 0",
               (pack_arrays({"P0": np.zeros((2, 2), np.float32)}),))
    db.commit()
    db.close()
    store = SQLiteStore(path, model.manifest, model.protos)
    with pytest.raises(ModelError, match="version 0"):
        store.latest()
    store.close()


# -- the MQTT service --------------------------------------------------------------------------

class FakeDevice:
    """A plain paho client that records everything under the fleet's topics, one queue per kind
    (release, ack, other), so waiting for one kind never drops another."""

    def __init__(self, broker, fleet):
        self.topics = Topics(fleet)
        self.inbox = {"release": queue.Queue(), "ack": queue.Queue(), "other": queue.Queue()}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311)
        self.client.on_message = self._on_message
        self.client.connect(*broker)
        self.client.loop_start()
        info = self.client.subscribe([(self.topics.base + "/#", 1)])
        assert info[0] == mqtt.MQTT_ERR_SUCCESS

    def _on_message(self, client, userdata, m):
        kind = ("release" if m.topic == self.topics.release
                else "ack" if m.topic.startswith(self.topics.base + "/ack/") else "other")
        self.inbox[kind].put((m.topic, bytes(m.payload)))

    def send(self, device_topic, payload):
        self.client.publish(self.topics.delta(device_topic), payload, qos=1).wait_for_publish(WAIT)

    def next(self, kind, pred, what):
        """The next message (topic, payload) of this kind for which pred holds (skipping the others
        of that kind); fails after WAIT seconds."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                topic, payload = self.inbox[kind].get(timeout=0.2)
            except queue.Empty:
                continue
            if pred(topic, payload):
                return topic, payload
        pytest.fail(f"no {what} within {WAIT}s")

    def release(self, pred=lambda r: True):
        _, p = self.next("release", lambda t, p: p and pred(decode_release(p)), "release")
        return decode_release(p)

    def acks(self, n):
        return [decode_json(self.next("ack", lambda t, p: True, "ack")[1]) for _ in range(n)]

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def fleet_env(mqtt_broker, fleet, tiny_model_dir, tmp_path):
    """Starts servers and fake devices on a fresh fleet; stops them and clears the broker after."""
    servers, devices = [], []

    class Env:
        broker = mqtt_broker
        model_dir = tiny_model_dir
        model = ExportedModel.load(tiny_model_dir)
        topics = Topics(fleet)
        state = str(tmp_path / "state")

        def server(self, **kw):
            s = Server(mqtt_broker, tiny_model_dir, kw.pop("state", self.state), fleet=fleet,
                       merge_every=0.1, connect_timeout=5, **kw)
            servers.append(s)
            return s.start()

        def device(self):
            d = FakeDevice(mqtt_broker, fleet)
            devices.append(d)
            return d

    yield Env()
    for s in servers:
        s.stop()
    for d in devices:
        d.close()
    clear_fleet(mqtt_broker, fleet)


def clear_fleet(broker, fleet):
    t = Topics(fleet)
    # connecting with the server's client id and a clean session drops its persistent session
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-spl-server-{fleet}",
                    clean_session=True, protocol=mqtt.MQTTv311)
    c.connect(*broker)
    c.loop_start()
    for topic in (t.manifest, t.onnx, t.release):
        c.publish(topic, b"", qos=1, retain=True).wait_for_publish(WAIT)
    c.disconnect()
    c.loop_stop()


def test_server_publishes_the_model_and_merges_deltas(fleet_env):
    dev = fleet_env.device()
    server = fleet_env.server()
    model, t = fleet_env.model, fleet_env.topics
    _, manifest = dev.next("other", lambda topic, p: topic == t.manifest, "manifest")
    assert manifest == model.manifest.to_json()
    _, onnx = dev.next("other", lambda topic, p: topic == t.onnx, "onnx")
    assert onnx == model.onnx_bytes
    v0 = dev.release()
    assert v0.version == 0 and v0.merged == {} and v0.model_sha256 == model.manifest.onnx_sha256
    assert_protos_close(v0.protos, model.protos, atol=0)

    rng = np.random.default_rng(4)
    # disjoint rows, so the result is the same whether the two land in one round or two
    da = random_delta(rng, "a", 1, 0, rows=[[0, 2, 5], [1], []])
    db = random_delta(rng, "b", 1, 0, rows=[[1, 3], [4, 7], [0, 2]])
    dev.send("a", encode_delta(da))
    dev.send("b", encode_delta(db))
    acks = dev.acks(2)
    assert {(a["device"], a["seq"], a["accepted"]) for a in acks} == {("a", 1, True), ("b", 1, True)}
    rel = dev.release(lambda r: r.merged == {"a": 1, "b": 1})
    assert rel.version == server.version >= 1
    want = merge.apply(model.protos, merge.MergeSums(SHAPES).add_delta(da, 0).add_delta(db, 0))
    assert_protos_close(rel.protos, want)
    assert_protos_close(rel.protos, slow_merge(model.protos, [da, db], 0))

    # redelivery of (a, 1): rejected as a duplicate, nothing changes
    published = server.stats.versions_published
    dev.send("a", encode_delta(da))
    (ack,) = dev.acks(1)
    assert ack == {"device": "a", "seq": 1, "accepted": False, "reason": "duplicate", "version": rel.version}
    assert server.version == rel.version and server.stats.versions_published == published

    # seq 3 before seq 2: merged at once, but the high-water mark waits for seq 2
    dev.send("a", encode_delta(random_delta(rng, "a", 3, rel.version, rows=[[9], [], []])))
    assert dev.acks(1)[0]["accepted"]
    assert dev.release(lambda r: r.version > rel.version).merged == {"a": 1, "b": 1}
    dev.send("a", encode_delta(random_delta(rng, "a", 2, rel.version, rows=[[9], [], []])))
    assert dev.acks(1)[0]["accepted"]
    assert dev.release(lambda r: r.merged.get("a") == 3).merged == {"a": 3, "b": 1}


def test_bad_deltas_are_rejected_counted_and_acked(fleet_env):
    dev = fleet_env.device()
    server = fleet_env.server()
    dev.release()
    rng = np.random.default_rng(5)

    def delta(device, **kw):
        d = random_delta(rng, device, kw.pop("seq", 1), kw.pop("base", 0), rows=[[1, 2], [3], [0]])
        for k, v in kw.items():
            setattr(d.layers[0], k, v)
        return d

    nan = delta("nan")
    nan.layers[0].dP[0, 0] = np.nan
    two_layers = delta("layers")
    two_layers.layers = two_layers.layers[:2]
    cases = [  # topic device, payload, reason
        ("junk", b"junk", "malformed"),
        ("nan", encode_delta(nan), "malformed"),
        ("shape", encode_delta(delta("shape", dP=np.zeros((2, 9), np.float32))), "d_in mismatch"),
        ("rows", encode_delta(delta("rows", rows=np.array([1, 16], np.int32))), "rows out of range"),
        ("layers", encode_delta(two_layers), "layer count"),
        ("victim", encode_delta(delta("forger")), "device mismatch"),
        ("future", encode_delta(delta("future", base=5)), "future base version"),
        ("huge", encode_delta(delta("huge", dP=np.full((2, 8), 1e4, np.float32))), "norm too large"),
        ("zero", encode_delta(delta("zero", seq=0)), "seq out of range"),
    ]
    for device, payload, _ in cases:
        dev.send(device, payload)
    acks = {a["device"]: a for a in dev.acks(len(cases))}
    for device, _, reason in cases:
        assert acks[device]["accepted"] is False and acks[device]["reason"] == reason, device
        assert acks[device]["version"] == 0
    assert acks["junk"]["seq"] == -1
    assert server.version == 0

    # the server goes on: a good delta still merges
    good = delta("good")
    dev.send("good", encode_delta(good))
    assert dev.acks(1)[0] == {"device": "good", "seq": 1, "accepted": True, "reason": "merged", "version": 1}
    server.stop()
    stats = json.loads(open(os.path.join(fleet_env.state, STATS_FILE)).read())
    reasons = {}
    for _, _, r in cases:
        reasons[r] = reasons.get(r, 0) + 1
    assert stats["deltas_rejected"] == reasons
    assert stats["messages_received"] == len(cases) + 1
    assert stats["bytes_received"] == sum(len(p) for _, p, _ in cases) + len(encode_delta(good))
    assert stats["deltas_merged"] == 1 and stats["versions_published"] == 1 and stats["version"] == 1


def test_restart_keeps_the_version_and_the_dedup_set(fleet_env):
    dev = fleet_env.device()
    first = fleet_env.server()
    rng = np.random.default_rng(6)
    a1 = random_delta(rng, "a", 1, 0)
    dev.send("a", encode_delta(a1))
    assert dev.acks(1)[0]["accepted"]
    v1 = dev.release(lambda r: r.version == 1)
    first.stop()
    # drop the retained release, so the one we see next is the restarted server's own
    dev.client.publish(fleet_env.topics.release, b"", qos=1, retain=True).wait_for_publish(WAIT)

    second = fleet_env.server()
    assert second.version == 1
    again = dev.release()
    assert again.version == 1 and again.merged == {"a": 1}
    assert_protos_close(again.protos, v1.protos, atol=0)
    dev.send("a", encode_delta(a1))
    assert dev.acks(1)[0]["reason"] == "duplicate"
    a2 = random_delta(rng, "a", 2, 1)
    dev.send("a", encode_delta(a2))
    assert dev.acks(1)[0] == {"device": "a", "seq": 2, "accepted": True, "reason": "merged", "version": 2}
    v2 = dev.release(lambda r: r.version == 2)
    assert v2.merged == {"a": 2}
    assert_protos_close(v2.protos, slow_merge(v1.protos, [a2], 1))


def test_unreachable_broker_is_a_clear_error(tiny_model_dir, tmp_path):
    port = free_port()
    server = Server(("127.0.0.1", port), tiny_model_dir, str(tmp_path / "state"), connect_timeout=0.5)
    with pytest.raises(EdgeSplError, match=f"cannot reach MQTT broker 127.0.0.1:{port}"):
        server.start()


def test_cli_server_merges_and_stops_cleanly_on_sigterm(mqtt_broker, fleet, tiny_model_dir, tmp_path):
    state = str(tmp_path / "state")
    exe = os.path.join(os.path.dirname(sys.executable), "edge-spl")
    proc = subprocess.Popen([exe, "server", "--broker", "%s:%d" % mqtt_broker, "--model", tiny_model_dir,
                             "--state", state, "--fleet", fleet, "--merge-every", "0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dev = FakeDevice(mqtt_broker, fleet)
    try:
        assert dev.release().version == 0
        dev.send("a", encode_delta(random_delta(np.random.default_rng(7), "a", 1, 0)))
        assert dev.release(lambda r: r.version == 1).merged == {"a": 1}
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err
        assert "serving model tiny" in err and f"version 0 on {mqtt_broker[0]}" in err and fleet in err
        assert "version 1: merged 1 deltas" in err
        stats = json.loads(open(os.path.join(state, STATS_FILE)).read())
        assert stats["deltas_merged"] == 1 and stats["version"] == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        dev.close()
        clear_fleet(mqtt_broker, fleet)
