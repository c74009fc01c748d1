"""A hostile user and a hostile network: bad files, bad streams, forged and oversized MQTT messages,
a device killed mid-sync. Every case must end in a one-line error (CLI) or a counted rejection
(network), never a traceback, and must lose nothing already learned or queued."""
from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import uuid
import zipfile

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from conftest import GAS_DIR, make_model
from test_device_cli import FakeServer, write_csv
from test_server import WAIT, FakeDevice, clear_fleet, fleet_env, random_delta  # noqa: F401 (fixture)

from edge_spl import protocol as P
from edge_spl.cli import broker_address, main
from edge_spl.data import iter_samples, load_csv, load_training_data
from edge_spl.errors import DataError, EdgeSplError, ModelError, ProtocolError
from edge_spl.files import pack_arrays, sha256_hex, unpack_arrays
from edge_spl.manifest import ExportedModel, Manifest

EDGE_SPL = [sys.executable, "-m", "edge_spl"]


# -- payloads an attacker can build ------------------------------------------------------------

def envelope(kind, header: dict | None = None, body: bytes = b"", raw_header: bytes | None = None) -> bytes:
    """A well-formed envelope (valid checksum) around whatever header and body."""
    h = raw_header if raw_header is not None else json.dumps(dict(header, body_sha256=sha256_hex(body))).encode()
    return struct.pack(">4sBBI", P.MAGIC, kind, P.FORMAT, len(h)) + h + body


def npz_claiming(shape, name="rows0") -> bytes:
    """An .npz whose one member's header claims `shape` but holds 16 bytes."""
    d = ("{'descr': '<i4', 'fortran_order': False, 'shape': %r, }" % (shape,)).encode()
    d += b" " * (63 - (10 + len(d)) % 64) + b"\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"{name}.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(d)) + d + b"\0" * 16)
    return buf.getvalue()


def zip_bomb(inflated: int = 8 << 20, name="rows0") -> bytes:
    """A deflated .npz member of `inflated` zero bytes: a few kB on the wire."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        b = io.BytesIO()
        np.save(b, np.zeros(inflated // 4, np.int32))
        z.writestr(f"{name}.npy", b.getvalue())
    return buf.getvalue()


DELTA_HEADER = {"device": "a", "seq": 1, "base_version": 0, "n_layers": 1}
RELEASE_HEADER = {"version": 1, "model_sha256": "x", "n_layers": 1, "merged": {}}
ONE_LAYER = pack_arrays({"P0": np.zeros((2, 2), np.float32), "g0": np.zeros(2, np.float32)})
ONE_ROW = pack_arrays({"rows0": np.zeros(1, np.int32), "dP0": np.zeros((1, 2), np.float32),
                       "dg0": np.zeros(1, np.float32), "counts0": np.ones(1, np.float32)})
DEPTH_BOMB = b"[" * 100_000 + b"]" * 100_000

HOSTILE_DELTAS = {
    "nested header": envelope(P.KIND_DELTA, raw_header=DEPTH_BOMB),
    "huge integer": envelope(P.KIND_DELTA, raw_header=b'{"seq": ' + b"9" * 5000 + b"}"),
    "seq 2**70": envelope(P.KIND_DELTA, dict(DELTA_HEADER, seq=2**70), ONE_ROW),
    "base 2**64": envelope(P.KIND_DELTA, dict(DELTA_HEADER, base_version=2**64), ONE_ROW),
    "array claims 400 GB": envelope(P.KIND_DELTA, DELTA_HEADER, npz_claiming((10**11,))),
    "zip bomb": envelope(P.KIND_DELTA, DELTA_HEADER, zip_bomb()),
}
HOSTILE_RELEASES = {
    "nested header": envelope(P.KIND_RELEASE, raw_header=DEPTH_BOMB),
    "version 2**70": envelope(P.KIND_RELEASE, dict(RELEASE_HEADER, version=2**70), ONE_LAYER),
    "merged 2**70": envelope(P.KIND_RELEASE, dict(RELEASE_HEADER, merged={"a": 2**70}), ONE_LAYER),
    "merged odd id": envelope(P.KIND_RELEASE, dict(RELEASE_HEADER, merged={"a/#": 1}), ONE_LAYER),
    "created text": envelope(P.KIND_RELEASE, dict(RELEASE_HEADER, created="x"), ONE_LAYER),
    "created list": envelope(P.KIND_RELEASE, dict(RELEASE_HEADER, created=[]), ONE_LAYER),
    "zip bomb": envelope(P.KIND_RELEASE, RELEASE_HEADER, zip_bomb(name="P0")),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_DELTAS))
def test_hostile_deltas_are_protocol_errors(name):
    # a bomb is refused for its size, before it is inflated (not later, for what it holds)
    with pytest.raises(ProtocolError, match="more than" if "bomb" in name else None):
        P.decode_delta(HOSTILE_DELTAS[name], max_bytes=1 << 20)


@pytest.mark.parametrize("name", sorted(HOSTILE_RELEASES))
def test_hostile_releases_are_protocol_errors(name):
    with pytest.raises(ProtocolError, match="more than" if "bomb" in name else None):
        P.decode_release(HOSTILE_RELEASES[name], max_bytes=1 << 20)


def test_hostile_json_messages_are_protocol_errors():
    good = P.ack_payload("d1", 3, False, "norm too large", 7)
    assert P.decode_ack(good) == json.loads(good)
    assert P.decode_ack(P.ack_payload("d1", -1, False, "malformed", 0))["seq"] == -1
    for bad in (DEPTH_BOMB, b'{"a": ' + b"9" * 5000 + b"}", b'{"accepted": false, "seq": [1]}',
                b'{"device": "d1", "seq": 1, "accepted": "no", "reason": "x", "version": 1}',
                b'{"device": "d/#", "seq": 1, "accepted": false, "reason": "x", "version": 1}',
                b'{"device": "d1", "seq": 2e3, "accepted": false, "reason": "x", "version": 1}'):
        with pytest.raises(ProtocolError):
            P.decode_ack(bad)
    with pytest.raises(ProtocolError):
        P.decode_json(DEPTH_BOMB)


def test_unpack_arrays_checks_sizes_before_allocating():
    a = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "f": np.asfortranarray(np.eye(3, dtype=np.float32))}
    got = unpack_arrays(pack_arrays(a))
    np.testing.assert_array_equal(got["x"], a["x"])
    np.testing.assert_array_equal(got["f"], a["f"])
    assert got["x"].flags.writeable
    for bad in (npz_claiming((10**11,)), npz_claiming((3,)), zip_bomb(8 << 20)):
        with pytest.raises(ValueError, match="not a valid array container"):
            unpack_arrays(bad, max_bytes=1 << 20)
    obj = io.BytesIO()
    np.savez(obj, o=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError):
        unpack_arrays(obj.getvalue())


# -- files a user (or an attacker with the model folder) can hand over --------------------------

def _manifest(tiny_model_dir, **changes) -> bytes:
    obj = json.loads(open(os.path.join(tiny_model_dir, "manifest.json")).read())
    obj.update(changes)
    return json.dumps(obj).encode()


def test_manifest_fields_are_checked(tiny_model_dir):
    Manifest.from_json(_manifest(tiny_model_dir))
    bad = [
        {"z_clip": -1}, {"z_clip": "10"}, {"sizes": [8, 16, 16, True]}, {"sizes": "8,3"},
        {"mean": [1e39] + [0.0] * 7}, {"std": [1e-50] * 8}, {"mean": ["a"] * 8}, {"std": [None] * 8},
        {"feature_names": list(range(8))}, {"class_names": ["c0", "c0", "c1"]}, {"dtype": "float64"},
        {"onnx_sha256": 5}, {"std": [1e20] * 8},   # a std whose square (the running variance) is inf
    ]
    for change in bad:
        with pytest.raises(ModelError):
            Manifest.from_json(_manifest(tiny_model_dir, **change))
    with pytest.raises(ModelError):
        Manifest.from_json(DEPTH_BOMB)


def test_prototypes_with_nan_are_refused(tiny_model_dir, tmp_path):
    em = ExportedModel.load(tiny_model_dir)
    em.protos[1][0][3, 2] = np.nan
    with pytest.raises(ModelError, match="NaN"):
        em.manifest.check_prototypes(em.protos)
    em.save(str(tmp_path))
    with pytest.raises(ModelError, match="prototypes.npz.*NaN"):
        ExportedModel.load(str(tmp_path))


def test_an_onnx_graph_that_does_not_fit_its_manifest_is_refused_at_load(tmp_path):
    """The sha256 says the file is the one the manifest names, not that its shapes fit."""
    from edge_spl.device.session import OnnxModel
    from edge_spl.export.onnx_export import export_model

    small, wide = export_model(make_model()), export_model(make_model(sizes=(8, 32, 16, 3)))
    forged = ExportedModel(small.manifest, wide.onnx_bytes, small.protos)
    forged.save(str(tmp_path))
    loaded = ExportedModel.load(str(tmp_path))      # files consistent with each other
    with pytest.raises(ModelError, match="does not run with the manifest's shapes"):
        OnnxModel(loaded)


@pytest.mark.parametrize("name, value", [("T", np.nan), ("Wt0", np.inf), ("Wt1", 3e38)])
def test_an_onnx_graph_with_damaged_baked_weights_is_refused_at_load(tmp_path, name, value):
    """NaN in T, inf in W, or weights whose products overflow: each found by the load-time run,
    not by NaN predictions on the stream (a zero row alone misses T and W: x = 0)."""
    import onnx
    from onnx import numpy_helper

    from edge_spl.device.session import OnnxModel
    from edge_spl.export.onnx_export import export_model

    rng = np.random.default_rng(0)
    state = make_model().with_whitened_head(rng.standard_normal((200, 8)).astype(np.float32),
                                            rng.integers(0, 3, 200))
    exported = export_model(state)
    OnnxModel(exported)
    graph = onnx.load_from_string(exported.onnx_bytes)
    for k, init in enumerate(graph.graph.initializer):
        if init.name == name:
            a = numpy_helper.to_array(init).copy()
            a.flat[::7] = value
            graph.graph.initializer[k].CopyFrom(numpy_helper.from_array(a, name))
            break
    else:
        raise AssertionError(f"no initializer {name}")
    ExportedModel(exported.manifest, graph.SerializeToString(), exported.protos).save(str(tmp_path))
    loaded = ExportedModel.load(str(tmp_path))      # files consistent with each other
    with pytest.raises(ModelError, match="NaN or infinite .*baked weights are damaged"):
        OnnxModel(loaded)


def test_model_json_of_the_wrong_shape_is_a_model_error(tmp_path):
    from edge_spl.model import ModelState

    make_model().save(tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    for bad in ([], {**meta, "class_names": 5}, {**meta, "sizes": None}, {**meta, "feature_names": [1] * 8}):
        (tmp_path / "model.json").write_text(json.dumps(bad))
        with pytest.raises(ModelError):
            ModelState.load(tmp_path)


def test_training_files_that_are_not_text_or_csv_are_data_errors(tmp_path):
    rng = np.random.default_rng(0)
    garbage = bytes(rng.integers(0, 256, 3000, dtype=np.uint8))
    (tmp_path / "g.csv").write_bytes(garbage)
    (tmp_path / "g.dat").write_bytes(garbage)
    with pytest.raises(DataError, match="not UTF-8"):
        load_training_data(str(tmp_path / "g.csv"), "y")
    with pytest.raises(DataError, match="not UTF-8"):
        load_training_data(str(tmp_path / "g.dat"))
    (tmp_path / "wide.csv").write_text("a,y\n" + "9" * 200_000 + ",x\n")
    with pytest.raises(DataError, match="wide.csv:2"):
        load_csv(str(tmp_path / "wide.csv"), "y")
    for value, why in (("1e39", "float32"), ("inf", "non-finite"), ("nan", "non-finite")):
        (tmp_path / "v.csv").write_text(f"a,b,y\n1,2,x\n3,{value},z\n")
        with pytest.raises(DataError, match=f"v.csv:3: column 'b' .*{why}"):
            load_csv(str(tmp_path / "v.csv"), "y")
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfa,b,y\n1,2,x\n3,4,z\n")
    assert load_csv(str(tmp_path / "bom.csv"), "y").feature_names == ["a", "b"]


def test_a_stream_survives_garbage_lines(tmp_path):
    good = [b"1,2,x\n", b"3,4,\n", b"5,6,y\n"]
    lines = [b"\xef\xbb\xbfa,b,label\n", good[0],
             bytes(range(128, 256)) + b"\n",            # not UTF-8
             b'"unterminated,2,x\n',                     # not a CSV row
             b"1,2\x00,x\n",                             # NUL
             b"9" * 200_000 + b",1,x\n",                 # a field over csv's limit
             b"7" * (3 << 20) + b"\n",                   # a line over MAX_LINE_BYTES
             good[1], b"1e39,1,x\n", b"-inf,1,x\n", good[2]]
    f = tmp_path / "stream.csv"
    f.write_bytes(b"".join(lines))
    bad = []
    got = list(iter_samples(str(f), ["a", "b"], "label", on_bad=lambda w, why: bad.append((w, why))))
    assert [s.x.tolist() for s in got] == [[1, 2], [3, 4], [5, 6]]
    assert [s.label for s in got] == ["x", None, "y"]
    assert len(bad) == 7 and {w for w, _ in bad} == {f"{f}:{n}" for n in (3, 4, 5, 6, 7, 9, 10)}
    assert any("float32" in why for _, why in bad) and any("non-finite" in why for _, why in bad)
    whys = dict(bad)
    assert whys[f"{f}:9"] == "column 'a' is '1e39': beyond the float32 range"
    assert whys[f"{f}:10"] == "column 'a' is '-inf': non-finite"
    f.write_bytes(b"a,b,label\n1,,x\n1,two,x\n")
    bad.clear()
    assert list(iter_samples(str(f), ["a", "b"], "label", on_bad=lambda w, why: bad.append((w, why)))) == []
    assert [why for _, why in bad] == ["column 'b' is '': empty", "column 'b' is 'two': not a number"]


# -- the command line ----------------------------------------------------------------------------

def one_line(capsys, argv, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_cli_refuses_endless_waits_and_odd_addresses(capsys, tmp_path, tiny_model_dir):
    common = ["--id", "d", "--source", "x.csv", "--state", str(tmp_path), "--model", tiny_model_dir]
    for argv in (["device", *common, "--wait", "nan"], ["device", *common, "--wait", "inf"],
                 ["server", "--broker", "h:1", "--model", "m", "--state", "s", "--merge-every", "inf"],
                 ["server", "--broker", "h:1", "--model", "m", "--state", "s", "--merge-every", "nan"],
                 ["broker", "--port", "99999"], ["device", *common, "--broker", "a b:1883"],
                 ["demo", "--devices", "100000"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert "Traceback" not in capsys.readouterr().err
    assert broker_address("[::1]:1883") == ("::1", 1883)


def test_cli_errors_stay_one_line(capsys, tmp_path, tiny_model_dir):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    msg = one_line(capsys, ["server", "--broker", "127.0.0.1:1", "--model", tiny_model_dir,
                            "--state", str(a_file)])
    assert "--state" in msg and str(a_file) in msg
    msg = one_line(capsys, ["broker", "--host", "no-such-host.invalid"])
    assert "cannot listen" in msg
    rng = np.random.default_rng(1)
    (tmp_path / "garbage.dat").write_bytes(bytes(rng.integers(0, 256, 2000, dtype=np.uint8)))
    msg = one_line(capsys, ["device", "--id", "d", "--source", str(tmp_path / "garbage.dat"),
                            "--state", str(tmp_path / "st"), "--model", tiny_model_dir])
    assert "garbage.dat" in msg
    model_dir = tmp_path / "model"
    make_model().save(model_dir)
    (model_dir / "model.json").write_text("[]")
    assert "model.json" in one_line(capsys, ["export", str(model_dir)])
    msg = one_line(capsys, ["train", "--data", write_csv(tmp_path / "s.csv", n=9), "--label", "y",
                            "--out", str(tmp_path / "m2"), "--hidden", "1000000", "--quiet"])
    assert "MQTT payload" in msg and "--hidden" in msg
    # a folder where a file should be, deep in a command: one line, not an OSError traceback
    msg = one_line(capsys, ["demo", "--data", GAS_DIR, "--out", str(a_file)])
    assert str(a_file) in msg


def test_a_model_folder_without_an_export_says_what_it_is_before_any_connection(capsys, tmp_path):
    """--model of a missing folder, of a model not yet exported, of a server's state folder: each
    one line saying what to give, at once (the broker named here listens nowhere, --wait 60)."""
    trained = tmp_path / "trained"
    make_model().save(trained)
    server_state = tmp_path / "srv"
    server_state.mkdir()
    (server_state / "server.db").write_bytes(b"")
    for folder, words in ((tmp_path / "none", "no such folder"), (trained, "run `edge-spl export"),
                          (server_state, "a server's --state folder"), (tmp_path, "made by `edge-spl train`")):
        t0 = time.monotonic()
        msg = one_line(capsys, ["device", "--broker", "127.0.0.1:1", "--wait", "60", "--id", "d",
                                "--source", write_csv(tmp_path / "s.csv", n=3), "--state", str(tmp_path / "st"),
                                "--model", str(folder)])
        assert words in msg and str(folder) in msg and time.monotonic() - t0 < 30


def test_device_stdin_with_garbage_bytes_keeps_going(tmp_path, tiny_model_dir):
    src = write_csv(tmp_path / "s.csv", n=6)
    rows = open(src, "rb").read().splitlines(keepends=True)
    stream = rows[:3] + [bytes(range(128, 256)) + b"\n", b'"open,1\n', b"9" * 200_000 + b"\n"] + rows[3:]
    p = subprocess.run(EDGE_SPL + ["device", "--id", "d", "--source", "-", "--state", str(tmp_path / "st"),
                                   "--model", tiny_model_dir, "--label", "y"],
                       input=b"".join(stream), capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    assert len(p.stdout.decode().splitlines()) == 6
    assert b"Traceback" not in p.stderr and p.stderr.count(b"skipping <stdin>") == 3


# -- the server under attack -----------------------------------------------------------------------

def test_server_survives_hostile_deltas_and_counts_them(fleet_env):
    dev = fleet_env.device()
    server = fleet_env.server(max_packet=1 << 20)
    dev.release()
    rng = np.random.default_rng(3)
    attacks = dict(HOSTILE_DELTAS)
    attacks["oversized"] = P.MAGIC + bytes(rng.integers(0, 256, (1 << 20) + 10, dtype=np.uint8))
    attacks["random"] = bytes(rng.integers(0, 256, 500, dtype=np.uint8))
    for k, payload in enumerate(attacks.values()):
        dev.send(f"x{k}", payload)
    for k in range(200):   # a flood of junk
        dev.client.publish(fleet_env.topics.delta(f"f{k % 20}"), b"junk", qos=0)
    shapes = [P_.shape for P_, _ in fleet_env.model.protos]
    good = random_delta(rng, "good", 1, 0, rows=[[1], [2], [0]], shapes=shapes)
    dev.send("good", P.encode_delta(good))
    ack = dev.next("ack", lambda t, p: t.endswith("/ack/good"), "ack of the good delta")[1]
    assert json.loads(ack) == {"device": "good", "seq": 1, "accepted": True, "reason": "merged", "version": 1}
    deadline = time.monotonic() + WAIT
    while server.stats.deltas_rejected.get("malformed", 0) < len(attacks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server._thread.is_alive() and server.version == 1
    assert server.stats.deltas_merged == 1
    assert server.stats.deltas_rejected.get("malformed", 0) >= len(attacks)   # + the junk that arrived


def test_server_inbox_is_bounded(mqtt_broker, fleet, tiny_model_dir, tmp_path):
    """Deltas wait in memory between rounds; a flood past the budget is counted, not kept."""
    from edge_spl.server.service import Server

    server = Server(mqtt_broker, tiny_model_dir, str(tmp_path / "state"), fleet=fleet, connect_timeout=5)
    server.inbox_limit = 200_000
    server.connect()          # the network thread runs, the merge loop does not
    dev = FakeDevice(mqtt_broker, fleet)
    try:
        payload = b"x" * 10_000
        for k in range(60):
            dev.client.publish(server.topics.delta("flood"), payload, qos=1)
        deadline = time.monotonic() + WAIT
        while server._inbox.qsize() + server._dropped < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server._inbox_bytes <= 200_000
        server.merge_round()
        rejected = server.stats.deltas_rejected
        assert server.stats.messages_received == 60
        assert rejected.get("overloaded", 0) > 0 and rejected["overloaded"] + rejected["malformed"] == 60
    finally:
        server._shutdown()
        dev.close()
        clear_fleet(mqtt_broker, fleet)


# -- the device under attack -----------------------------------------------------------------------

def test_device_sync_rejects_hostile_messages_and_keeps_only_the_newest_release(mqtt_broker, fleet,
                                                                             tiny_model_dir):
    from edge_spl.device.sync import DeviceSync

    model = ExportedModel.load(tiny_model_dir)
    sync = DeviceSync(*mqtt_broker, fleet, "d1", max_packet=1 << 20)
    sync.start(5)
    t = sync.topics
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"attacker-{uuid.uuid4().hex[:6]}",
                    protocol=mqtt.MQTTv311)
    c.connect(*mqtt_broker)
    c.loop_start()
    try:
        hostile = [(t.release, p) for p in HOSTILE_RELEASES.values()] + [
            (t.manifest, DEPTH_BOMB), (t.manifest, b"\xff\xfe" * 50),
            (t.ack("d1"), DEPTH_BOMB), (t.ack("d1"), b'{"accepted": false, "seq": [1], "reason": []}'),
            (t.ack("d1"), b"{" + b" " * 10_000 + b"}"),   # over the ack size limit
        ]
        events = []
        for k, (topic, payload) in enumerate(hostile, 1):
            c.publish(topic, payload, qos=1).wait_for_publish(WAIT)
            deadline = time.monotonic() + WAIT
            while sync.rejected < k and time.monotonic() < deadline:
                events += sync.poll(timeout=0.1)      # must not raise
            assert sync.rejected == k, (k, topic)
        assert events == []
        for v in range(1, 21):     # a burst of (large) releases: only the newest need be kept
            c.publish(t.release, P.encode_release(P.Release(v, model.manifest.onnx_sha256, model.protos)),
                      qos=1).wait_for_publish(WAIT)
        time.sleep(0.5)            # the main loop is busy; the burst arrives meanwhile
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            events += sync.poll(timeout=0.2)
            if any(e.kind == "release" and e.value.version == 20 for e in events):
                break
        releases = [e.value.version for e in events if e.kind == "release"]
        assert releases[-1] == 20 and len(releases) < 20
    finally:
        c.disconnect()
        c.loop_stop()
        sync.close()


def test_device_resends_an_unanswered_delta_without_a_reconnect(tmp_path, tiny_model_dir, mqtt_broker,
                                                                fleet, capsys, monkeypatch):
    """The server may lose a delta after its PUBACK (a crash before the round is stored): the device
    must send it again while still connected, not only after a reconnect."""
    from edge_spl.cli import device as device_cli

    monkeypatch.setattr(device_cli, "RESEND_AFTER", 0.5)
    server = FakeServer(mqtt_broker, fleet, ExportedModel.load(tiny_model_dir), answer=False)
    seen = []

    def cover_on_second_copy():
        d = server.deltas.get(timeout=WAIT)
        seen.append(d.seq)
        d = server.deltas.get(timeout=WAIT)      # the same delta again: now "store" it
        seen.append(d.seq)
        server.version += 1
        server.client.publish(server.topics.release, server.release_bytes({d.device: d.seq}), qos=1,
                              retain=True)

    helper = threading.Thread(target=cover_on_second_copy, daemon=True)
    helper.start()
    try:
        code = main(["device", "--broker", "%s:%d" % mqtt_broker, "--fleet", fleet, "--id", "dev5",
                     "--source", write_csv(tmp_path / "s.csv", n=10), "--state", str(tmp_path / "st"),
                     "--model", tiny_model_dir, "--label", "y", "--sync-every", "100",
                     "--wait", "8", "--quiet"])
        helper.join(WAIT)
        assert code == 0 and seen == [1, 1]
        summary = json.loads((tmp_path / "st" / "summary.json").read_text())
        assert summary["outbox"] == 0 and summary["deltas_pushed"] == 1
    finally:
        server.close("dev5")


def test_a_delta_is_in_the_saved_outbox_before_it_is_published(tmp_path, tiny_model_dir, mqtt_broker,
                                                                fleet, monkeypatch):
    """Write-ahead outbox. Saved only after the publish, a crash in between restarts the device
    without the delta and gives its seq to new learning, which the server drops as a duplicate.
    (Checked at the moment of every publish; the SIGKILL test below races with the save.)"""
    from edge_spl.device.state import state_path
    from edge_spl.device.sync import DeviceSync

    state = str(tmp_path / "st")
    original, checked = DeviceSync.publish_delta, []

    def publish_delta(self, delta):
        saved = set()
        if os.path.isfile(state_path(state)):
            arrays = unpack_arrays(open(state_path(state), "rb").read().split(b"\n", 1)[1])
            meta = json.loads(arrays["meta"].tobytes())
            saved = {P.decode_delta(arrays[f"out{k}"].tobytes()).seq for k in range(meta["n_outstanding"])}
        checked.append((delta.seq, delta.seq in saved))
        return original(self, delta)

    monkeypatch.setattr(DeviceSync, "publish_delta", publish_delta)
    server = FakeServer(mqtt_broker, fleet, ExportedModel.load(tiny_model_dir))
    try:
        assert main(["device", "--broker", "%s:%d" % mqtt_broker, "--fleet", fleet, "--id", "dev6",
                     "--source", write_csv(tmp_path / "s.csv", n=30), "--state", state,
                     "--model", tiny_model_dir, "--label", "y", "--sync-every", "10", "--wait", "5",
                     "--quiet"]) == 0
        assert [seq for seq, _ in checked][:3] == [1, 2, 3]
        assert all(ok for _, ok in checked), checked
    finally:
        server.close("dev6")


def test_a_device_killed_mid_stream_resends_and_each_delta_merges_once(tmp_path, mqtt_broker, fleet,
                                                                       tiny_model_dir):
    """SIGKILL the device the moment its first delta reaches the broker, restart it on the same
    state with other samples: the delta must come back unchanged (not replaced by new learning
    under the same seq), and the real server must merge every seq exactly once."""
    from edge_spl.server.service import Server

    state = str(tmp_path / "dev")
    server = Server(mqtt_broker, tiny_model_dir, str(tmp_path / "srv"), fleet=fleet, merge_every=0.1,
                    connect_timeout=5).start()
    got: queue.Queue = queue.Queue()
    victim = {}

    def on_message(client, userdata, m):
        got.put(bytes(m.payload))
        if "proc" in victim and victim["proc"].poll() is None:
            victim["proc"].send_signal(signal.SIGKILL)

    spy = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"spy-{uuid.uuid4().hex[:6]}",
                      protocol=mqtt.MQTTv311)
    spy.on_message = on_message
    spy.connect(*mqtt_broker)
    spy.loop_start()
    spy.subscribe(server.topics.delta("d9"), qos=1)
    def argv(source):
        return EDGE_SPL + ["device", "--broker", "%s:%d" % mqtt_broker, "--fleet", fleet, "--id", "d9",
                           "--source", source, "--state", state, "--model", tiny_model_dir, "--label", "y",
                           "--sync-every", "20", "--wait", "10", "--quiet"]

    def content(payload):
        d = P.decode_delta(payload)   # (re-encoding changes the zip's timestamps, not the content)
        return (d.seq, d.base_version) + tuple(a.tobytes() for L in d.layers
                                               for a in (L.rows, L.dP, L.dg, L.counts))
    try:
        victim["proc"] = subprocess.Popen(argv(write_csv(tmp_path / "a.csv", n=60)),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        first = got.get(timeout=30)
        victim["proc"].wait(timeout=10)
        assert victim["proc"].returncode == -signal.SIGKILL
        del victim["proc"]
        # the restart streams other samples: new learning must get new seqs
        again = subprocess.run(argv(write_csv(tmp_path / "b.csv", n=60, seed=1)), capture_output=True,
                               timeout=60)
        assert again.returncode == 0, again.stderr.decode()
        sent = [first]
        while True:
            try:
                sent.append(got.get(timeout=0.5))
            except queue.Empty:
                break
        by_seq = {}
        for payload in sent:
            by_seq.setdefault(P.decode_delta(payload).seq, set()).add(content(payload))
        assert by_seq[1] == {content(first)}                  # re-sent unchanged, never replaced
        server.stop()
        db = sqlite3.connect(os.path.join(tmp_path, "srv", "server.db"))
        seqs = [s for (s,) in db.execute("SELECT seq FROM merged_deltas WHERE device = 'd9' ORDER BY seq")]
        db.close()
        assert seqs == list(range(1, max(by_seq) + 1))        # every delta merged exactly once
        summary = json.loads(open(os.path.join(state, "summary.json")).read())
        assert summary["outbox"] == 0
    finally:
        if "proc" in victim and victim["proc"].poll() is None:
            victim["proc"].kill()
        server.stop()
        spy.disconnect()
        spy.loop_stop()
        clear_fleet(mqtt_broker, fleet)
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        c.connect(*mqtt_broker)
        c.loop_start()
        c.publish(server.topics.status("d9"), b"", qos=1, retain=True).wait_for_publish(WAIT)
        c.disconnect()
        c.loop_stop()


def test_predictions_never_overwrite_the_source_or_the_state(tmp_path, tiny_model_dir, capsys):
    src = write_csv(tmp_path / "log.csv", n=5)
    before = open(src).read()
    state = tmp_path / "st"
    for target in (src, str(tmp_path / "." / "log.csv"), str(state / "device-state.bin"),
                   os.path.join(tiny_model_dir, "manifest.json")):
        msg = one_line(capsys, ["device", "--id", "d", "--source", src, "--state", str(state),
                                "--model", tiny_model_dir, "--predictions", target])
        assert "would overwrite" in msg
    assert open(src).read() == before


def test_a_release_with_absurd_values_is_refused(tiny_model_dir):
    """Finite but huge prototypes overflow the routing to inf/NaN, and a learner that saved NaN
    could not load its own state again (its outbox lost with it)."""
    from edge_spl.device.learner import FFLearner

    model = ExportedModel.load(tiny_model_dir)
    learner = FFLearner(model, "d1")
    huge = [(np.full_like(P, 3e38), np.full_like(g, -3e38)) for P, g in model.protos]
    assert not learner.adopt_release(P.Release(1, model.manifest.onnx_sha256, huge))
    assert learner.base_version_ == 0
    with pytest.raises(ModelError, match="beyond"):
        model.manifest.check_prototypes(huge)
    fine = [(P * 10, g * 10) for P, g in model.protos]
    assert learner.adopt_release(P.Release(1, model.manifest.onnx_sha256, fine))


def test_the_server_stops_at_once_when_asked_while_the_broker_is_down(tiny_model_dir, tmp_path):
    from conftest import free_port
    from edge_spl.server.service import Server

    server = Server(("127.0.0.1", free_port()), tiny_model_dir, str(tmp_path / "state"), connect_timeout=120)
    outcome = []

    def run():
        try:
            server.run()
        except BaseException as e:
            outcome.append(type(e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    time.sleep(0.5)
    server.request_stop()      # what SIGTERM / Ctrl-C do
    t.join(10)                 # far below the 120 s connect timeout
    assert not t.is_alive() and outcome == [KeyboardInterrupt]


def test_a_state_file_with_odd_metadata_is_a_clear_error(tmp_path, tiny_model_dir):
    from edge_spl.device.learner import FFLearner
    from edge_spl.device.state import load_state, save_state, state_path

    model = ExportedModel.load(tiny_model_dir)
    save_state(FFLearner(model, "d1"), str(tmp_path))
    data = open(state_path(str(tmp_path)), "rb").read()
    arrays = unpack_arrays(data.split(b"\n", 1)[1])
    for meta in (b"[]", DEPTH_BOMB):
        body = pack_arrays(dict(arrays, meta=np.frombuffer(meta, np.uint8)))
        open(state_path(str(tmp_path)), "wb").write(b"EDGE-SPL-DEVICE-STATE 1 %s\n" % sha256_hex(body).encode() + body)
        with pytest.raises(ModelError, match="device-state.bin"):
            load_state(FFLearner(model, "d1"), str(tmp_path))


def test_one_process_per_state_folder(tmp_path, tiny_model_dir, capsys):
    """Two servers on one state fork the version history; two devices overwrite each other's
    outbox. The second gets a one-line error; a killed holder leaves no stale lock."""
    from edge_spl.files import lock_folder
    from edge_spl.server.service import Server

    state = tmp_path / "st"
    state.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from edge_spl.files import lock_folder; "
                               "held = lock_folder(sys.argv[1], 'test'); print('locked', flush=True); time.sleep(60)",
                               str(state)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        msg = one_line(capsys, ["device", "--id", "d", "--source", write_csv(tmp_path / "s.csv", n=3),
                                "--state", str(state), "--model", tiny_model_dir])
        assert "in use by another" in msg
        with pytest.raises(EdgeSplError, match="in use by another"):
            Server(("127.0.0.1", 1), tiny_model_dir, str(state))
    finally:
        holder.kill()
        holder.wait()
    lock_folder(state, "test").close()         # the kill released it
    first = Server(("127.0.0.1", 1), tiny_model_dir, str(tmp_path / "srv"))
    with pytest.raises(EdgeSplError, match="in use by another edge-spl server"):
        Server(("127.0.0.1", 1), tiny_model_dir, str(tmp_path / "srv"))
    first.store.close()
    first._lock.close()


def test_a_label_column_of_unique_values_warns_a_bounded_number_of_times(tmp_path, tiny_model_dir, capsys,
                                                                         caplog):
    from edge_spl.cli.device import MAX_UNKNOWN_LABELS

    lines = [",".join(f"f{i}" for i in range(8)) + ",y"] + [",".join(["1"] * 8) + f",t{k}" for k in range(200)]
    (tmp_path / "s.csv").write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING", logger="edge_spl"):
        assert main(["device", "--id", "d", "--source", str(tmp_path / "s.csv"), "--state", str(tmp_path / "st"),
                     "--model", tiny_model_dir, "--label", "y", "--quiet"]) == 0
    warnings = [r for r in caplog.records if "not one of the model's classes" in r.getMessage()
                or "no longer reporting" in r.getMessage()]
    assert len(warnings) == MAX_UNKNOWN_LABELS + 1


def test_deltas_learned_on_another_model_of_the_same_shapes_are_refused(fleet_env):
    """A retrained model keeps its shapes: a device still on the old one must not merge into it."""
    from edge_spl.device.learner import FFLearner

    learner = FFLearner(fleet_env.model, "d1")
    learner.step(np.ones(fleet_env.model.manifest.sizes[0], np.float32), 1)
    mine = learner.make_delta()
    assert mine.model_sha256 == fleet_env.model.manifest.onnx_sha256
    assert P.decode_delta(P.encode_delta(mine)).model_sha256 == mine.model_sha256
    dev = fleet_env.device()
    server = fleet_env.server()
    dev.release()
    other = random_delta(np.random.default_rng(8), "old", 1, 0, rows=[[1], [2], [0]],
                         shapes=[P_.shape for P_, _ in fleet_env.model.protos])
    other.model_sha256 = "0" * 64
    dev.send("old", P.encode_delta(other))
    ack = json.loads(dev.next("ack", lambda t, p: t.endswith("/ack/old"), "ack")[1])
    assert ack["accepted"] is False and ack["reason"] == "other model" and server.version == 0
    dev.send("d1", P.encode_delta(mine))
    ack = json.loads(dev.next("ack", lambda t, p: t.endswith("/ack/d1"), "ack")[1])
    assert ack["accepted"] is True and ack["version"] == 1


def test_cli_parsing_mistakes_name_themselves(tmp_path, tiny_model_dir):
    def run(*argv):
        return subprocess.run([sys.executable, "-m", "edge_spl", *argv], capture_output=True, text=True, timeout=60)

    # a mistyped option of `server` is not taken for its optional ACTION (rollback)
    p = run("server", "--broker", "127.0.0.1:1", "--model", tiny_model_dir, "--state", str(tmp_path / "s"),
            "--merge-evry", "2")
    assert p.returncode == 2 and "unrecognized arguments: --merge-evry 2" in p.stderr
    assert "usage: edge-spl server" in p.stderr and "invalid choice" not in p.stderr
    # no abbreviations: --lab is not --label
    p = run("device", "--id", "d", "--source", "-", "--state", str(tmp_path / "d"), "--lab", "y")
    assert p.returncode == 2 and "unrecognized arguments: --lab y" in p.stderr and "usage: edge-spl device" in p.stderr
    # -v after the command too
    assert "-v, --verbose" in run("status", "--help").stdout


@pytest.mark.parametrize("command", ["train", "export"])
def test_a_missing_role_dependency_is_named_with_its_extra(tmp_path, gas_dir, tiny_model_dir, command):
    argv = (["train", "--data", gas_dir, "--out", str(tmp_path / "m"), "--epochs", "1"] if command == "train"
            else ["export", tiny_model_dir])
    code = ("import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None\n"
            f"from edge_spl.cli import main; sys.exit(main({argv!r}))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "missing dependency" in p.stderr and "pip install 'edge-spl[train]'" in p.stderr
    assert "internal error" not in p.stderr and "Traceback" not in p.stderr
