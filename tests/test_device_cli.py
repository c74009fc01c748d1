"""`edge-spl device` end to end: offline on a CSV, against the real mosquitto with the test acting
as the server, and its one-line errors."""
from __future__ import annotations

import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt

from edge_spl.cli import main
from edge_spl.manifest import ExportedModel
from edge_spl.protocol import Release, Topics, decode_delta, decode_json, encode_release

EDGE_SPL = [sys.executable, "-m", "edge_spl"]


def write_csv(path, n=60, seed=0, extra_rows=()):
    """Columns f0..f7 of the tiny model plus a label column y (classes c0..c2)."""
    rng = np.random.default_rng(seed)
    lines = [",".join(f"f{i}" for i in range(8)) + ",y"]
    for i in range(n):
        y = i % 3
        lines.append(",".join(f"{v:.4f}" for v in rng.standard_normal(8) + 2 * y) + f",c{y}")
    lines += list(extra_rows)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def wait_until_online(broker, fleet, device, timeout=30.0) -> None:
    """Until the device's retained status is on the broker: it publishes it as it connects. A
    device that has its model starts offline and connects in the background; what a test feeds
    it before then is learned unpushed, not sent as deltas."""
    seen = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.on_message = lambda client, userdata, msg: msg.payload and seen.set()
    c.connect(*broker)
    c.subscribe(Topics(fleet).status(device), qos=1)
    c.loop_start()
    try:
        assert seen.wait(timeout), f"{device} did not come online within {timeout:.0f} s"
    finally:
        c.disconnect()
        c.loop_stop()


def run_cli(capsys, *argv):
    code = main(["device", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_offline_run_prints_predictions_and_writes_state_and_summary(tmp_path, tiny_model_dir, capsys, caplog):
    caplog.set_level(logging.INFO, logger="edge_spl")
    src = write_csv(tmp_path / "s.csv", n=30, extra_rows=[
        "1,2,3,nan,5,6,7,8,c1",      # skipped: non-finite
        "1,2,x,4,5,6,7,8,c1",        # skipped: not a number
        "1,2,3,4,5,6,7,8,c9",        # unknown label: predicted, treated as unlabeled
        "1,2,3,4,5,6,7,8,"])         # unlabeled
    state = tmp_path / "state"
    preds = tmp_path / "p.csv"
    code, out, err = run_cli(capsys, "--id", "dev1", "--source", src, "--state", str(state),
                             "--model", tiny_model_dir, "--label", "y", "--label-every", "2",
                             "--sync-every", "7", "--predictions", str(preds))
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 32
    assert lines[0].startswith("0 pred=c") and " conf=" in lines[0] and lines[0].endswith("label=c0 version=0")
    assert lines[-2].split()[3] == "label=c9" and lines[-1].split()[3] == "label=-"
    assert "non-finite" in err and "not a number" in err and "'c9'" in caplog.text
    summary = json.loads((state / "summary.json").read_text())
    assert summary["samples"] == 32 and summary["labeled"] == 30 and summary["labels_used"] == 15
    assert 0 <= summary["correct"] <= 30 and summary["deltas_pushed"] == 0
    assert summary["versions_adopted"] == [] and summary["samples_per_s"] > 0
    rows = preds.read_text().splitlines()
    assert rows[0] == "index,prediction,label,version" and len(rows) == 33
    assert os.path.isfile(state / "device-state.bin")

    # a restart continues from the saved state (quiet: one summary line)
    code, out, err = run_cli(capsys, "--id", "dev1", "--source", src, "--state", str(state),
                             "--model", tiny_model_dir, "--label", "y", "--quiet")
    assert code == 0 and out.splitlines()[-1].startswith("32 samples, accuracy")
    assert "restored state" in caplog.text


class FakeServer:
    """Plays the server on the real broker: publishes the retained model and release v1, and for
    every delta it receives publishes the next release with that delta added."""

    def __init__(self, broker, fleet, model: ExportedModel, answer: bool = True):
        self.topics = Topics(fleet)
        self.answer = answer
        self.model = model
        self.protos = [(P.copy(), g.copy()) for P, g in model.protos]
        self.version = 1
        self.deltas, self.status = queue.Queue(), []
        self.lock = threading.Lock()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fake-server-{fleet}",
                        protocol=mqtt.MQTTv311)
        c.on_message = self.on_message
        c.connect(*broker)
        c.loop_start()
        c.subscribe([(self.topics.all_deltas, 1), (self.topics.all_status, 1)])
        self.client = c
        infos = [c.publish(self.topics.manifest, model.manifest.to_json(), qos=1, retain=True),
                 c.publish(self.topics.onnx, model.onnx_bytes, qos=1, retain=True),
                 c.publish(self.topics.release, self.release_bytes({}), qos=1, retain=True)]
        for info in infos:
            info.wait_for_publish(timeout=10)

    def release_bytes(self, merged):
        return encode_release(Release(self.version, self.model.manifest.onnx_sha256, self.protos, merged))

    def on_message(self, client, userdata, msg):
        if self.topics.device_of(msg.topic, "status"):
            if msg.payload:
                self.status.append(decode_json(msg.payload))
            return
        d = decode_delta(msg.payload)
        if not self.answer:
            self.deltas.put(d)
            return
        with self.lock:
            for (P, g), L in zip(self.protos, d.layers):
                P[L.rows] += L.dP
                g[L.rows] += L.dg
            self.version += 1
            client.publish(self.topics.release, self.release_bytes({d.device: d.seq}), qos=1, retain=True)
        self.deltas.put(d)

    def close(self, device):
        t = self.topics
        for topic in (t.manifest, t.onnx, t.release, t.status(device)):
            self.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(timeout=5)
        self.client.disconnect()
        self.client.loop_stop()


def test_device_pulls_the_model_pushes_deltas_and_adopts_releases(tmp_path, tiny_model_dir, mqtt_broker,
                                                                  fleet, capsys):
    server = FakeServer(mqtt_broker, fleet, ExportedModel.load(tiny_model_dir))
    try:
        src = write_csv(tmp_path / "s.csv", n=50)
        state = tmp_path / "state"
        code, out, err = run_cli(capsys, "--broker", "%s:%d" % mqtt_broker, "--fleet", fleet, "--id", "dev1",
                                 "--source", src, "--state", str(state), "--label", "y",
                                 "--sync-every", "20", "--wait", "10", "--quiet", "--lr-hidden", "0.001")
        assert code == 0, err
        first = server.deltas.get(timeout=5)
        assert (first.device, first.seq, first.base_version) == ("dev1", 1, 1)
        assert first.layers[-1].counts.max() == 20          # 20 labelled samples reached the head
        assert len(first.layers[0].rows) > 0                 # and the hidden layers learned too
        seqs = [first.seq] + [server.deltas.get(timeout=5).seq for _ in range(2)]
        assert seqs == [1, 2, 3]                             # 20 + 20 + the last 10
        summary = json.loads((state / "summary.json").read_text())
        assert summary["deltas_pushed"] == 3 and summary["outbox"] == 0
        assert summary["versions_adopted"][0] == 1 and summary["versions_adopted"][-1] == 4
        assert summary["messages_sent"] == 3 and summary["bytes_sent"] > 0
        assert summary["messages_received"] >= 4 and summary["bytes_received"] > len(server.model.onnx_bytes)
        assert wait_until(lambda: server.status and server.status[-1]["online"] is False)
        assert any(s["online"] for s in server.status)
        # the pulled model is kept in the state folder: a restart needs no broker
        assert (state / "model.onnx").is_file()
        code, out, err = run_cli(capsys, "--id", "dev1", "--source", src, "--state", str(state), "--quiet")
        assert code == 0 and "version 4" in out.splitlines()[-1]
    finally:
        server.close("dev1")


def test_unreleased_deltas_survive_a_restart_and_are_sent_again(tmp_path, tiny_model_dir, mqtt_broker,
                                                                fleet, capsys):
    server = FakeServer(mqtt_broker, fleet, ExportedModel.load(tiny_model_dir), answer=False)
    try:
        state = tmp_path / "state"
        common = ["--broker", "%s:%d" % mqtt_broker, "--fleet", fleet, "--id", "dev2", "--state", str(state),
                  "--model", tiny_model_dir, "--label", "y", "--sync-every", "20", "--wait", "1", "--quiet"]
        code, _, _ = run_cli(capsys, "--source", write_csv(tmp_path / "a.csv", n=40), *common)
        assert code == 0
        summary = json.loads((state / "summary.json").read_text())
        assert summary["versions_adopted"] == [1] and summary["outbox"] == 2   # no release covered them
        code, _, _ = run_cli(capsys, "--source", write_csv(tmp_path / "b.csv", n=10, seed=1), *common)
        assert code == 0
        assert [server.deltas.get(timeout=5).seq for _ in range(2)] == [1, 2]   # the first run's
        again = []
        while 3 not in again:
            again.append(server.deltas.get(timeout=5).seq)
        # the outbox went out again after the restart, then the new delta; MQTT QoS 1 is at least
        # once, and a reconnect re-sends the outbox, so a delta may come twice
        assert set(again) == {1, 2, 3}, again
        assert json.loads((state / "summary.json").read_text())["outbox"] == 3
    finally:
        server.close("dev2")


def wait_until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def one_line_error(*argv, timeout=60):
    p = subprocess.run(EDGE_SPL + ["device", *argv], capture_output=True, text=True, timeout=timeout)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(lines) == 1, p.stderr
    return lines[0]


def test_errors_are_one_line_without_traceback(tmp_path, tiny_model_dir):
    src = write_csv(tmp_path / "s.csv", n=5)
    state = str(tmp_path / "state")
    msg = one_line_error("--id", "d", "--source", str(tmp_path / "nope.csv"), "--state", state,
                         "--model", tiny_model_dir)
    assert "nope.csv: no such file" in msg
    # without a model at hand the device needs the broker to pull one
    msg = one_line_error("--id", "d", "--source", src, "--state", state, "--broker", "127.0.0.1:1",
                         "--wait", "2")
    assert "cannot reach MQTT broker 127.0.0.1:1" in msg
    msg = one_line_error("--id", "d", "--source", src, "--state", state)
    assert "no model" in msg and "--model" in msg
    msg = one_line_error("--id", "a/b", "--source", src, "--state", state, "--model", tiny_model_dir)
    assert "device id" in msg


def test_corrupt_state_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    src = write_csv(tmp_path / "s.csv", n=5)
    state = tmp_path / "state"
    code, _, _ = run_cli(capsys, "--id", "d", "--source", src, "--state", str(state), "--model", tiny_model_dir)
    assert code == 0
    path = state / "device-state.bin"
    path.write_bytes(path.read_bytes()[:-50])
    code, _, err = run_cli(capsys, "--id", "d", "--source", src, "--state", str(state), "--model", tiny_model_dir)
    assert code == 2 and "device-state.bin" in err and "corrupt" in err


def test_a_device_with_its_model_starts_while_the_broker_is_down_and_syncs_when_it_comes(
        tmp_path, tiny_model_dir, own_mosquitto, fleet):
    """A device that has its model works offline while the broker is down (a service must not sit
    in a restart loop with its sensor data waiting), then connects in the background and sends what
    it learned."""
    from conftest import free_port
    from edge_spl.server.service import Server

    port = free_port()
    state = tmp_path / "state"
    dev = subprocess.Popen(EDGE_SPL + ["device", "--broker", f"127.0.0.1:{port}", "--fleet", fleet, "--id", "d1",
                                       "--source", "-", "--state", str(state), "--model", tiny_model_dir,
                                       "--label", "y", "--sync-every", "10", "--quiet", "--wait", "20"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = open(write_csv(tmp_path / "s.csv", n=60)).read().splitlines(keepends=True)
    dev.stdin.write("".join(lines[:31]))       # header + 30 samples, learned offline
    dev.stdin.flush()
    deadline = time.monotonic() + 30
    while not (state / "device-state.bin").exists():
        assert dev.poll() is None and time.monotonic() < deadline, dev.stderr.read()
        time.sleep(0.1)
    broker = own_mosquitto(port=port)
    server = Server(broker, tiny_model_dir, str(tmp_path / "srv"), fleet=fleet, merge_every=0.2).start()
    try:
        dev.stdin.write("".join(lines[31:]))
        dev.stdin.close()
        assert dev.wait(60) == 0
        err = dev.stderr.read()
        assert "working offline" in err and "connected to" in err, err
        summary = json.loads((state / "summary.json").read_text())
        assert summary["samples"] == 60 and summary["outbox"] == 0 and summary["versions_adopted"], summary
        assert server.version >= 1
    finally:
        if dev.poll() is None:
            dev.kill()
        server.stop()


def test_devices_follow_a_server_that_starts_a_new_version_history(tmp_path, tiny_model_dir, mqtt_broker, fleet):
    """The documented remedy for a lost server.db is to delete it (and stats.json): the new server
    starts again at version 0. Its releases name a new history, so the device takes them instead of
    refusing them as older, and sends its outbox again on the new base: nothing is stuck at
    `future base version`."""
    import sqlite3

    from edge_spl.server.service import Server
    from test_faults import state_meta

    srv = tmp_path / "srv"
    server = Server(mqtt_broker, tiny_model_dir, str(srv), fleet=fleet, merge_every=0.2).start()
    dev = subprocess.Popen(EDGE_SPL + ["device", "--broker", "%s:%d" % mqtt_broker, "--fleet", fleet, "--id", "d1",
                                       "--source", "-", "--state", str(tmp_path / "d1"), "--model", tiny_model_dir,
                                       "--label", "y", "--sync-every", "10", "--quiet", "--wait", "20"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = open(write_csv(tmp_path / "s.csv", n=200)).read().splitlines(keepends=True)
    sent = 1
    try:
        dev.stdin.write(lines[0])
        # until the device runs a version of the first history (it takes releases in at its syncs)
        deadline = time.monotonic() + 30
        while not (tmp_path / "d1" / "device-state.bin").exists() or state_meta(tmp_path / "d1")["base_version"] < 1:
            assert time.monotonic() < deadline and dev.poll() is None and sent < 150
            dev.stdin.write("".join(lines[sent:sent + 10]))
            dev.stdin.flush()
            sent += 10
            time.sleep(0.3)
        server.stop()
        (srv / "server.db").unlink()
        (srv / "stats.json").unlink()
        for extra in ("server.db-wal", "server.db-shm"):
            if (srv / extra).exists():
                (srv / extra).unlink()
        server = Server(mqtt_broker, tiny_model_dir, str(srv), fleet=fleet, merge_every=0.2).start()
        dev.stdin.write("".join(lines[sent:]))
        dev.stdin.close()
        assert dev.wait(60) == 0
        err = dev.stderr.read()
        assert "new version history" in err and "future base version" not in err, err
        summary = json.loads((tmp_path / "d1" / "summary.json").read_text())
        assert summary["outbox"] == 0 and summary["version"] == server.version >= 1, summary
        db = sqlite3.connect(srv / "server.db")
        seqs = [s for (s,) in db.execute("SELECT seq FROM merged_deltas WHERE device = 'd1'")]
        db.close()
        assert seqs, "the new history merged nothing of the device"
    finally:
        if dev.poll() is None:
            dev.kill()
        server.stop()


def test_a_fifo_is_a_source(tmp_path, tiny_model_dir):
    """A sensor reader writing into a named pipe (or a serial device) is read as a stream."""
    fifo = tmp_path / "sensor.fifo"
    os.mkfifo(fifo)
    dev = subprocess.Popen(EDGE_SPL + ["device", "--id", "d1", "--source", str(fifo), "--state", str(tmp_path / "s"),
                                       "--model", tiny_model_dir, "--label", "y", "--quiet"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with open(fifo, "w") as f:
        f.write(open(write_csv(tmp_path / "x.csv", n=12)).read())
    out, err = dev.communicate(timeout=60)
    assert dev.returncode == 0, err
    assert out.strip().splitlines()[-1].startswith("12 samples")


def test_with_no_server_the_outbox_stops_growing_and_nothing_is_lost(tmp_path, tiny_model_dir, mqtt_broker, fleet):
    import sqlite3

    from edge_spl.cli.device import MAX_OUTBOX
    from edge_spl.server.service import Server
    from test_faults import state_meta

    state = tmp_path / "d1"
    dev = subprocess.Popen(EDGE_SPL + ["device", "--broker", "%s:%d" % mqtt_broker, "--fleet", fleet, "--id", "d1",
                                       "--source", "-", "--state", str(state), "--model", tiny_model_dir,
                                       "--label", "y", "--sync-every", "2", "--quiet", "--wait", "30"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = open(write_csv(tmp_path / "s.csv", n=200)).read().splitlines(keepends=True)
    server = None
    try:
        wait_until_online(mqtt_broker, fleet, "d1")       # (offline, it would make no deltas)
        dev.stdin.write("".join(lines[:161]))           # 80 syncs, and no server to answer
        dev.stdin.flush()
        deadline = time.monotonic() + 30
        while not state.joinpath("device-state.bin").exists() or state_meta(state)["n_samples"] < 160:
            assert time.monotonic() < deadline and dev.poll() is None
            time.sleep(0.1)
        assert state_meta(state)["n_outstanding"] == MAX_OUTBOX
        server = Server(mqtt_broker, tiny_model_dir, str(tmp_path / "srv"), fleet=fleet, merge_every=0.2).start()
        dev.stdin.write("".join(lines[161:]))
        dev.stdin.close()
        assert dev.wait(60) == 0, dev.stderr.read()
        summary = json.loads((state / "summary.json").read_text())
        assert summary["outbox"] == 0 and summary["samples"] == 200
        db = sqlite3.connect(tmp_path / "srv" / "server.db")
        seqs = sorted(s for (s,) in db.execute("SELECT seq FROM merged_deltas WHERE device = 'd1'"))
        db.close()
        assert seqs == list(range(1, summary["deltas_pushed"] + 1)) and len(seqs) < 100
    finally:
        if dev.poll() is None:
            dev.kill()
        if server is not None:
            server.stop()


def test_sigterm_saves_the_state_and_says_so(tmp_path, tiny_model_dir):
    """The service manager's stop (SIGTERM) mid-stream: exit 130, every sample read so far kept in
    the saved state, and a line saying where."""
    import signal

    from test_faults import state_meta

    state = tmp_path / "st"
    dev = subprocess.Popen(EDGE_SPL + ["device", "--id", "d", "--source", "-", "--state", str(state),
                                       "--model", tiny_model_dir, "--label", "y", "--sync-every", "10", "--quiet"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = open(write_csv(tmp_path / "s.csv", n=30)).read()
    try:
        dev.stdin.write(lines)
        dev.stdin.flush()                       # the pipe stays open: the device waits for more
        deadline = time.monotonic() + 30
        while not state.joinpath("device-state.bin").exists() or state_meta(state)["n_samples"] < 30:
            assert time.monotonic() < deadline and dev.poll() is None
            time.sleep(0.1)
        dev.send_signal(signal.SIGTERM)
        _, err = dev.communicate(timeout=30)
    finally:
        if dev.poll() is None:
            dev.kill()
    assert dev.returncode == 130, err
    assert f"stopped after 30 samples: what it learned and its outbox of 0 deltas are saved in {state}" in err
    assert err.strip().splitlines()[-1] == "edge-spl device: interrupted"
    assert state_meta(state)["n_samples"] == 30


def test_a_device_on_another_model_logs_a_few_refusals_then_counts_them(tmp_path, tiny_model_dir, mqtt_broker,
                                                                          fleet):
    """Every delta of a device on the wrong model is refused: the first few reasons are logged,
    the rest only counted, and the end says how many."""
    from conftest import make_model

    from edge_spl.export.onnx_export import export_model
    from edge_spl.server.service import Server

    other = tmp_path / "other"
    state = make_model(seed=7)
    state.save(other)
    export_model(state).save(str(other))
    server = Server(mqtt_broker, tiny_model_dir, str(tmp_path / "srv"), fleet=fleet, merge_every=0.2).start()
    try:
        r = subprocess.run(EDGE_SPL + ["device", "--broker", "%s:%d" % mqtt_broker, "--fleet", fleet, "--id", "d1",
                                       "--source", write_csv(tmp_path / "s.csv", n=200), "--state", str(tmp_path / "d"),
                                       "--model", str(other), "--label", "y", "--sync-every", "10", "--quiet",
                                       "--wait", "10"], capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    assert r.returncode == 0, r.stderr
    shown = [line for line in r.stderr.splitlines() if "server rejected delta" in line]
    assert len(shown) == 5 and "further refusals are only counted" in shown[-1], r.stderr
    total = re.search(r"the server refused (\d+) of this device's deltas", r.stderr)
    assert total and int(total.group(1)) > 5, r.stderr
