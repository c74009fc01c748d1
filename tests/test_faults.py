"""Faults in real processes: a mosquitto we start (persistence on, in tmp_path) SIGKILLed and
restarted under a server and devices streaming real gas drift samples; devices and the server
SIGKILLed mid-run; state files truncated. What must hold: nothing reaches a state that fails to
load, every delta a device made is merged exactly once, versions only go up."""
from __future__ import annotations

import getpass
import json
import logging
import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from conftest import GAS_DIR, free_port, mosquitto_binary, port_open
from test_device_cli import write_csv

from edge_spl.cli import main
from edge_spl.errors import ModelError
from edge_spl.files import unpack_arrays
from edge_spl.manifest import ExportedModel
from edge_spl.protocol import Topics, decode_ack, decode_delta, decode_release

pytestmark = pytest.mark.slow

EDGE_SPL = [sys.executable, "-m", "edge_spl"]
DEADLINE = 30.0     # seconds any one thing may take before the test calls it hung


# -- the cast: a broker, a server, devices fed through a pipe, an observer ---------------------

@pytest.fixture(scope="module")
def gas_model(tmp_path_factory):
    """An exported 128-32-6 model of the gas drift features (random prototypes, batch 1 statistics):
    small, so a device process starts fast."""
    from edge_spl.data import GAS_CLASSES, GAS_FEATURES, load_gas_file
    from edge_spl.export.onnx_export import export_model
    from edge_spl.model import init_model

    X = load_gas_file(os.path.join(GAS_DIR, "batch1.dat")).X
    state = init_model([128, 32, 6], X.mean(0), X.std(0) + 1e-3, GAS_CLASSES, GAS_FEATURES, seed=0,
                       model_id="gas-faults")
    out = str(tmp_path_factory.mktemp("gas-model"))
    export_model(state).save(out)
    return out


@pytest.fixture(scope="module")
def gas_lines():
    with open(os.path.join(GAS_DIR, "batch2.dat"), "rb") as f:
        lines = [ln for ln in f if ln.strip()]
    random.Random(0).shuffle(lines)
    return lines


class Broker:
    """mosquitto on a fixed port with its persistence in `folder`: restarted on the same port, it
    reloads the sessions (the server's subscription and queue) and retained messages it saved."""

    def __init__(self, folder):
        self.port = free_port()
        self.folder = folder
        folder.mkdir()
        self.conf = folder / "mosquitto.conf"
        # autosave every second: a SIGKILL loses at most the last second of broker state
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                             f"persistence true\npersistence_location {folder}/\nautosave_interval 1\n"
                             f"sys_interval 1\nuser {getpass.getuser()}\n")
        self.proc = None
        self.starts = 0

    def start(self):
        binary = mosquitto_binary()
        if binary is None:
            pytest.fail("no mosquitto binary: apt-get install mosquitto")
        self.starts += 1
        with open(self.folder / f"log{self.starts}.txt", "wb") as log:
            self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", self.port):
            assert self.proc.poll() is None and time.monotonic() < deadline, \
                (self.folder / f"log{self.starts}.txt").read_text()
            time.sleep(0.05)

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def wait_saved(self, cast=None):
        """Until the broker has autosaved after this call: a SIGKILL then keeps the sessions and
        retained messages it holds now (a broker killed within its first second has saved nothing)."""
        since = time.time()
        db = self.folder / "mosquitto.db"
        wait_until(lambda: db.exists() and db.stat().st_mtime > since, "the broker to autosave", cast)

    def persistent_sessions_offline(self) -> int:
        """How many persistent sessions the broker keeps for clients not connected ($SYS)."""
        got = queue.Queue()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        c.on_message = lambda client, userdata, msg: got.put(int(msg.payload))
        c.connect("127.0.0.1", self.port)
        c.subscribe("$SYS/broker/clients/disconnected")
        c.loop_start()
        try:
            return got.get(timeout=5)
        finally:
            c.disconnect()
            c.loop_stop()


class Proc:
    """An edge-spl process with its stdout and stderr in files; `feed` streams lines to its stdin
    from a thread at `rate` lines per second."""

    def __init__(self, name, argv, folder, stdin=False, rate=150.0):
        self.name, self.argv, self.folder, self.rate = name, argv, folder, rate
        self.runs = 0
        self.start(stdin)

    def start(self, stdin=False):
        self.runs += 1
        self.out = self.folder / f"{self.name}.{self.runs}.out"
        self.err = self.folder / f"{self.name}.{self.runs}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(EDGE_SPL + self.argv, stdout=out, stderr=err,
                                         stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)
        self.lines: queue.Queue = queue.Queue()
        if stdin:
            threading.Thread(target=self._feeder, args=(self.proc, self.lines), daemon=True).start()

    def _feeder(self, proc, lines):
        while True:
            line = lines.get()
            try:
                if line is None:
                    proc.stdin.close()
                    return
                proc.stdin.write(line)
                proc.stdin.flush()
            except OSError:      # killed: the rest of its lines go nowhere
                return
            finally:
                lines.task_done()
            time.sleep(1.0 / self.rate)

    def feed(self, lines, close=False):
        for line in lines:
            self.lines.put(line)
        if close:
            self.lines.put(None)

    def fed(self) -> bool:
        return self.lines.unfinished_tasks == 0

    def stderr(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.folder.glob(f"{self.name}.*.err")))

    def signal(self, sig):
        self.proc.send_signal(sig)

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)

    def wait(self, timeout=DEADLINE) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} did not end within {timeout} s:\n{self.stderr()[-3000:]}")


class Observer:
    """A plain MQTT client on the fleet's release, ack and delta topics: what went over the wire."""

    def __init__(self, port, fleet):
        self.topics = Topics(fleet)
        self.releases: list[tuple[int, dict]] = []     # (version, merged) in arrival order
        self.acks: list[dict] = []
        self.deltas: list[tuple[str, bytes]] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        # a persistent session, like the server's: what is sent while it reconnects waits for it
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"observer-{fleet}",
                                  protocol=mqtt.MQTTv311, clean_session=False)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            [(self.topics.release, 1), (self.topics.base + "/ack/+", 1), (self.topics.all_deltas, 1)])
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg):
        try:
            self._record(msg)
        except Exception as e:    # an exception would end paho's thread: keep it for the test
            self.errors.append(f"{msg.topic}: {type(e).__name__}: {e}")

    def _record(self, msg):
        with self._lock:
            if msg.topic == self.topics.release:
                r = decode_release(msg.payload)
                self.releases.append((r.version, dict(r.merged)))
            elif self.topics.device_of(msg.topic, "ack"):
                self.acks.append(decode_ack(msg.payload))
            else:
                self.deltas.append((msg.topic, bytes(msg.payload)))

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def cast(tmp_path, fleet, gas_model):
    """Start and (always) end the processes of one test."""
    class Cast:
        broker = Broker(tmp_path / "mosquitto")
        procs: list[Proc] = []
        observers: list[Observer] = []

        def server(self, state="server"):
            p = Proc("server", ["server", "--broker", self.broker.address, "--model", gas_model,
                                "--state", str(tmp_path / state), "--fleet", fleet, "--merge-every", "0.5"],
                     tmp_path)
            self.procs.append(p)
            return p

        def device(self, name, *extra):
            p = Proc(name, ["device", "--broker", self.broker.address, "--fleet", fleet, "--id", name,
                            "--source", "-", "--state", str(tmp_path / name), "--model", gas_model,
                            "--sync-every", "20", "--quiet", "--wait", "30", *extra], tmp_path, stdin=True)
            self.procs.append(p)
            return p

        def observer(self):
            o = Observer(self.broker.port, fleet)
            self.observers.append(o)
            return o

        def logs(self) -> str:
            return "\n".join(f"--- {p.name}:\n{p.stderr()[-2500:]}" for p in self.procs)

    c = Cast()
    yield c
    for p in c.procs:
        if p.proc.poll() is None:
            p.kill()
    for o in c.observers:
        o.close()
    if c.broker.proc is not None and c.broker.proc.poll() is None:
        c.broker.kill()


def wait_until(cond, what, cast=None, timeout=DEADLINE, detail=lambda: ""):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what} {detail()}" + (f"\n{cast.logs()}" if cast else ""))
        time.sleep(0.05)


def merged_pairs(state) -> dict[str, list[int]]:
    """device -> its merged seqs, from the server's database (read while the server runs: WAL)."""
    path = os.path.join(state, "server.db")
    if not os.path.isfile(path):
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        pairs = {}
        for device, seq in db.execute("SELECT device, seq FROM merged_deltas ORDER BY device, seq"):
            pairs.setdefault(device, []).append(seq)
        return pairs
    except sqlite3.OperationalError:
        return {}
    finally:
        db.close()


def stored_versions(state) -> list[tuple[int, int | None, dict]]:
    db = sqlite3.connect(f"file:{os.path.join(state, 'server.db')}?mode=ro", uri=True, timeout=5)
    try:
        return [(v, p, json.loads(m)) for v, p, m in
                db.execute("SELECT version, parent, merged FROM versions ORDER BY version")]
    finally:
        db.close()


def state_meta(folder) -> dict:
    """The JSON record of a device's saved state (its next seq, its outbox size)."""
    data = (folder / "device-state.bin").read_bytes()
    return json.loads(unpack_arrays(data[data.index(b"\n") + 1:])["meta"].tobytes())


def check_each_delta_merged_once(state_dir, devices):
    """Every device's seqs 1..N (N = the last it made) are merged, each once, and no other seq."""
    pairs = merged_pairs(state_dir)
    for name, folder in devices.items():
        last = state_meta(folder)["next_seq"] - 1
        assert last >= 3, (name, last)
        assert pairs.get(name) == list(range(1, last + 1)), (name, pairs.get(name), last)
    db = sqlite3.connect(os.path.join(state_dir, "server.db"))
    dup = db.execute("SELECT device, seq, COUNT(*) FROM merged_deltas GROUP BY device, seq HAVING COUNT(*) > 1").fetchall()
    db.close()
    assert dup == []


def check_versions(state_dir):
    """Versions 0..V, each the child of the one before, merged marks never going back."""
    versions = stored_versions(state_dir)
    assert [v for v, _, _ in versions] == list(range(len(versions)))
    assert all(p == v - 1 for v, p, _ in versions[1:])
    for (_, _, m0), (_, _, m1) in zip(versions, versions[1:]):
        assert all(m1.get(d, 0) >= s for d, s in m0.items())
    return versions[-1][0]


def finish(cast, devices):
    """Close the devices' streams; each must end cleanly with an empty outbox."""
    for d in devices:
        d.feed([], close=True)
    for d in devices:
        assert d.wait() == 0, cast.logs()
    for d in devices:
        summary = json.loads((d.folder / d.name / "summary.json").read_text())
        assert summary["outbox"] == 0, (d.name, summary, cast.logs())
    return {d.name: json.loads((d.folder / d.name / "summary.json").read_text()) for d in devices}


# -- 1. the broker dies mid-stream and comes back on the same port ----------------------------

def test_broker_restart_mid_stream(cast, gas_lines, tmp_path):
    b = cast.broker
    b.start()
    server = cast.server()
    devs = [cast.device("dev0"), cast.device("dev1")]
    for k, d in enumerate(devs):
        d.feed(gas_lines[k * 300:k * 300 + 100])
    wait_until(lambda: all(len(merged_pairs(tmp_path / "server").get(d.name, [])) >= 3 for d in devs),
               "deltas of both devices merged", cast)
    before = stored_versions(tmp_path / "server")[-1][0]

    b.kill()
    for k, d in enumerate(devs):     # learning while the broker is gone
        d.feed(gas_lines[k * 300 + 100:k * 300 + 160])
    wait_until(lambda: all(d.fed() for d in devs), "the outage's samples read", cast)
    wait_until(lambda: all("lost the broker" in p.stderr() for p in [server] + devs),
               "every process to notice the broker is gone", cast)
    b.start()
    wait_until(lambda: all(d.stderr().count("connected to") >= 2 for d in devs),
               "the devices to reconnect", cast)
    for k, d in enumerate(devs):
        d.feed(gas_lines[k * 300 + 160:k * 300 + 230])
    wait_until(lambda: all(d.fed() for d in devs), "the samples read", cast)

    # Once more, and the broker comes back without its persistence (a new broker): the server's
    # subscription and the retained model and release exist only if it re-subscribes and
    # republishes on reconnect.
    b.kill()
    # (the restarted broker may not have autosaved yet: then there is no file, and it is new anyway)
    (b.folder / "mosquitto.db").unlink(missing_ok=True)
    b.start()
    wait_until(lambda: all(d.stderr().count("connected to") >= 3 for d in devs), "the devices to reconnect", cast)
    for k, d in enumerate(devs):
        d.feed(gas_lines[k * 300 + 230:k * 300 + 300])
    summaries = finish(cast, devs)

    for name, s in summaries.items():
        assert s["samples"] == 300
        # a version made after the restart reached every device (re-subscribed on reconnect)
        assert max(s["versions_adopted"]) > before, (name, s)
    assert server.proc.poll() is None, cast.logs()
    check_each_delta_merged_once(tmp_path / "server", {d.name: tmp_path / d.name for d in devs})
    check_versions(tmp_path / "server")
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


# -- 2. the outbox is durable: broker down, a device SIGKILLed and restarted, the server late ----

def test_outbox_survives_broker_outage_device_kill_and_redelivery(cast, gas_lines, tmp_path):
    b = cast.broker
    b.start()
    server = cast.server()
    devs = [cast.device("dev0"), cast.device("dev1")]
    dev0, dev1 = devs
    obs = cast.observer()

    def lines(d, lo, hi):
        k = 300 * devs.index(d)
        return gas_lines[k + lo:k + hi]

    def feed_all(lo, hi):           # and wait until both devices saved a state that has them
        for d in devs:
            d.feed(lines(d, lo, hi))
        wait_until(lambda: all((tmp_path / d.name / "device-state.bin").exists()
                               and state_meta(tmp_path / d.name)["n_samples"] == hi for d in devs),
                   f"both devices to save after {hi} samples", cast)

    feed_all(0, 100)
    wait_until(lambda: all(len(merged_pairs(tmp_path / "server").get(d.name, [])) >= 3 for d in devs),
               "deltas of both devices merged", cast)
    server.signal(signal.SIGSTOP)    # deltas sent now stay outstanding: no release covers them
    try:
        feed_all(100, 140)
        b.wait_saved(cast)           # the server's session must outlive the kill: it cannot renew it
        b.kill()
        feed_all(140, 180)           # learning while the broker is gone, saved at every sync
        dev0.kill()                  # SIGKILL, broker still down
        saved = state_meta(tmp_path / "dev0")
        assert saved["n_samples"] == 180 and saved["n_outstanding"] >= 2, saved
        outbox = set(range(saved["next_seq"] - saved["n_outstanding"], saved["next_seq"]))
        dev0.start(stdin=True)       # same --state; it waits for the broker (--wait 30)
        dev0.feed(lines(dev0, 180, 220))

        # The server is still stopped: the devices reconnect and send first, and their deltas
        # wait in the server's persistent session, which the broker reloaded from its file.
        seen = len(obs.deltas)
        b.start()
        wait_until(obs.client.is_connected, "the observer to reconnect", cast)
        wait_until(lambda: b.persistent_sessions_offline() == 1, "the server's session reloaded", cast)
        # a device sends again at its first sync after the reconnect (its loop is paced by samples)
        wait_until(lambda: dev1.stderr().count("connected to") >= 2, "dev1 to reconnect", cast)
        dev1.feed(lines(dev1, 180, 200))

        def sent_again():
            got = [decode_delta(p) for _, p in obs.deltas[seen:]]
            return {d.seq for d in got if d.device == "dev0"} >= outbox and any(d.device == "dev1" for d in got)
        wait_until(sent_again, "the outbox sent again after the restarts", cast)
    finally:
        server.signal(signal.SIGCONT)
    dev0.feed(lines(dev0, 220, 300))
    dev1.feed(lines(dev1, 200, 300))
    summaries = finish(cast, devs)
    assert "restored state" in dev0.stderr()
    assert summaries["dev0"]["samples"] == 120 and summaries["dev1"]["samples"] == 300
    check_each_delta_merged_once(tmp_path / "server", {d.name: tmp_path / d.name for d in devs})

    # The broker (or a device) delivers every delta once more: each is acked as a duplicate and
    # changes nothing.
    before = merged_pairs(tmp_path / "server"), stored_versions(tmp_path / "server")
    again = {}
    for topic, payload in obs.deltas:
        again[topic, payload] = True
    acks = len(obs.acks)
    for topic, payload in again:
        obs.client.publish(topic, payload, qos=1)
    wait_until(lambda: len(obs.acks) - acks >= len(again), "acks of the redelivered deltas", cast)
    assert {a["reason"] for a in obs.acks[acks:]} == {"duplicate"}
    assert not any(a["accepted"] for a in obs.acks[acks:])
    time.sleep(0.6)                  # one more merge round
    assert (merged_pairs(tmp_path / "server"), stored_versions(tmp_path / "server")) == before
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    stats = json.loads((tmp_path / "server" / "stats.json").read_text())
    assert stats["deltas_rejected"].get("duplicate", 0) >= len(again)


# -- 3. crash safety of the state files ----------------------------------------------------------

def _learn(learner, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
        learner.step((rng.standard_normal(8) + 2 * (i % 3)).astype(np.float32), i % 3)


def test_a_damaged_state_file_falls_back_to_the_previous_save(tiny_model_dir, tmp_path, caplog, capsys):
    from edge_spl.device.learner import FFLearner
    from edge_spl.device.state import load_state, save_state

    model = ExportedModel.load(tiny_model_dir)
    state = tmp_path / "state"
    main_file, prev_file = state / "device-state.bin", state / "device-state.bin.prev"
    a = FFLearner(model, device_id="d", seed=1)
    _learn(a, 30, 0)
    a.make_delta()
    save_state(a, str(state))
    assert not prev_file.exists()
    first = main_file.read_bytes()
    _learn(a, 30, 1)
    a.make_delta()
    save_state(a, str(state))
    assert prev_file.read_bytes() == first           # the save before the last one
    good = main_file.read_bytes()
    head = good.index(b"\n") + 1
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x40

    for damaged in [good[:n] for n in (0, 1, 30, head - 1, head, head + 100, len(good) // 2, len(good) - 1)] + [bytes(flipped)]:
        main_file.write_bytes(damaged)
        b = FFLearner(model, device_id="d", seed=1)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edge_spl"):
            assert load_state(b, str(state))
        assert b.next_seq_ == 2 and [d.seq for d in b.outstanding_] == [1], len(damaged)   # the first save
        warning = caplog.text
        assert f"{main_file}: " in warning and f"loading the previous save {prev_file}" in warning
        assert "truncated" in warning or "corrupt" in warning

    # saving after a fallback keeps the good .prev rather than the damaged file
    save_state(b, str(state))
    assert prev_file.read_bytes() == first
    c = FFLearner(model, device_id="d", seed=1)
    assert load_state(c, str(state)) and c.next_seq_ == 2

    # both damaged: one line naming both files and what to do
    main_file.write_bytes(good[:100])
    prev_file.write_bytes(first[:-1])
    with pytest.raises(ModelError) as e:
        load_state(FFLearner(model, device_id="d", seed=1), str(state))
    msg = str(e.value)
    assert "\n" not in msg and f"{main_file}: " in msg and f"{prev_file}: " in msg and "delete both" in msg
    src = write_csv(tmp_path / "s.csv", n=5)
    assert main(["device", "--id", "d", "--source", src, "--state", str(state), "--model", tiny_model_dir]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "delete both" in err[0] and "Traceback" not in err[0]


def test_device_sigkilled_at_random_moments_always_loads(tmp_path, gas_model):
    """SIGKILL while the device streams and saves (every 3 samples): its state always loads, and
    the temp files of interrupted writes do not pile up."""
    from edge_spl.device.learner import FFLearner
    from edge_spl.device.state import load_state

    state = tmp_path / "state"
    path = state / "device-state.bin"
    argv = ["device", "--id", "k", "--state", str(state), "--model", gas_model, "--sync-every", "3", "--quiet"]
    model = ExportedModel.load(gas_model)
    rng = random.Random(7)
    seen = []
    p = None
    try:
        for run in range(6):
            before = path.stat().st_mtime_ns if path.exists() else None
            if p is None:
                p = Proc("k", argv + ["--source", os.path.join(GAS_DIR, "batch3.dat")], tmp_path)
            else:
                p.start()
            wait_until(lambda: (path.exists() and path.stat().st_mtime_ns != before) or p.proc.poll() is not None,
                       "the device to save", detail=p.stderr)
            time.sleep(rng.uniform(0.0, 0.3))
            assert p.proc.poll() is None, p.stderr()     # still streaming when killed
            p.kill()
            # an interrupted write leaves its temp file; the next start sweeps it (at most one here)
            assert len([n for n in os.listdir(state) if n.startswith(".tmp-")]) <= 1
            learner = FFLearner(model, device_id="k")
            assert load_state(learner, str(state)), run
            seen.append(learner.n_samples_)
        assert seen == sorted(seen) and seen[-1] > seen[0]      # each run went on from the last
        p.argv = argv + ["--source", os.path.join(GAS_DIR, "batch4.dat")]
        p.start()
        assert p.wait() == 0, p.stderr()
        assert "restored state" in p.err.read_text()
        assert not [n for n in os.listdir(state) if n.startswith(".tmp-")]
        assert (state / "device-state.bin.prev").is_file()
    finally:
        if p is not None and p.proc.poll() is None:
            p.kill()


def test_a_delta_queued_while_the_broker_is_gone_does_not_end_the_device(tmp_path, tiny_model_dir, mqtt_broker,
                                                                         fleet, monkeypatch, caplog):
    """paho returns rc "no connection" for a publish made in the moment it has lost the socket but
    on_disconnect has not run yet (it sends it after the reconnect); at the end of the stream
    is_published() raised on it, and the device stopped with an internal error."""
    from edge_spl.device.sync import DeviceSync

    publish = DeviceSync.publish_delta

    def publish_while_the_socket_is_gone(self, delta):
        info = publish(self, delta)
        info.rc = mqtt.MQTT_ERR_NO_CONN
        return info

    monkeypatch.setattr(DeviceSync, "publish_delta", publish_while_the_socket_is_gone)
    caplog.set_level(logging.WARNING, logger="edge_spl")
    src = write_csv(tmp_path / "s.csv", n=40)
    code = main(["device", "--broker", "%s:%d" % mqtt_broker, "--fleet", fleet, "--id", "d", "--source", src,
                 "--state", str(tmp_path / "st"), "--model", tiny_model_dir, "--label", "y",
                 "--sync-every", "20", "--wait", "0.5", "--quiet"])
    assert code == 0
    assert "may not have reached the broker" in caplog.text


def test_server_sigkilled_mid_run_goes_on_from_its_last_version(cast, gas_lines, tmp_path):
    b = cast.broker
    b.start()
    server = cast.server()
    devs = [cast.device("dev0"), cast.device("dev1")]
    obs = cast.observer()
    for k, d in enumerate(devs):
        d.feed(gas_lines[k * 300:k * 300 + 300])
    wait_until(lambda: len(obs.releases) >= 3 and obs.releases[-1][0] >= 2, "version 2", cast)
    # SIGKILL halfway to the next round: the deltas received since the last one were PUBACKed to
    # the broker but not stored, so only their devices still have them
    time.sleep(0.25)
    server.kill()
    with obs._lock:
        acked = {(a["device"], a["seq"], a["version"]) for a in obs.acks if a["accepted"]}
        last_release = max(v for v, _ in obs.releases)
    assert acked
    time.sleep(0.3)
    server.start()                   # the same --state
    wait_until(lambda: "serving model" in server.err.read_text(), "the server to start again", cast)
    restarted_at = int(server.err.read_text().split(" version ")[1].split()[0])
    assert restarted_at >= last_release

    finish(cast, devs)               # every delta merged: those lost in the crash were sent again
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    check_each_delta_merged_once(tmp_path / "server", {d.name: tmp_path / d.name for d in devs})
    last = check_versions(tmp_path / "server")
    assert last > restarted_at
    db = sqlite3.connect(tmp_path / "server" / "server.db")
    stored = set(db.execute("SELECT device, seq, version FROM merged_deltas"))
    db.close()
    assert acked <= stored           # nothing acked as merged was lost
    versions = [v for v, _ in obs.releases]
    assert versions == sorted(versions)     # versions only go up, across the restart too


def test_a_truncated_server_db_is_a_one_line_error(tmp_path, gas_model):
    from edge_spl.server.service import Server
    from edge_spl.server.store import SQLiteStore

    model = ExportedModel.load(gas_model)

    def history(folder, n):
        store = SQLiteStore(str(folder / "server.db"), model.manifest, model.protos)
        cur = store.latest()
        for k in range(n):
            cur = store.commit(cur, [(P + 0.01, g) for P, g in cur.protos], [("a", k + 1)])
        store.close()
        return (folder / "server.db").read_bytes()

    state = tmp_path / "srv"
    good = history(state, 4)
    (state / "stats.json").write_text(json.dumps({"version": 4}))
    cases = {n: good[:n] for n in (0, 1, 100, 4096, len(good) // 2, len(good) - 1)}
    cases["versions lost"] = history(tmp_path / "older", 2)     # an older copy put back
    for name, data in cases.items():
        (state / "server.db").write_bytes(data)
        with pytest.raises(ModelError) as e:
            Server(("127.0.0.1", 1), gas_model, str(state))
        msg = str(e.value)
        assert "\n" not in msg and "server.db" in msg, (name, msg)
        if name == "versions lost":
            assert "lost versions" in msg and "published version 4" in msg
    for n in (0, len(good) // 2):
        (state / "server.db").write_bytes(good[:n])
        r = subprocess.run(EDGE_SPL + ["server", "--broker", "127.0.0.1:1", "--model", gas_model, "--state",
                                       str(state)], capture_output=True, text=True, timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert lines[0].startswith("edge-spl server: error: ") and "server.db" in lines[0]


def test_a_damaged_page_in_server_db_is_a_one_line_error(tmp_path, gas_model):
    """Not truncated, the same length, one page of zeros: found at start, not by every delta failing."""
    from edge_spl.server.service import Server
    from edge_spl.server.store import SQLiteStore

    model = ExportedModel.load(gas_model)
    state = tmp_path / "srv"
    store = SQLiteStore(str(state / "server.db"), model.manifest, model.protos)
    cur = store.latest()
    for k in range(4):
        cur = store.commit(cur, [(P + 0.01, g) for P, g in cur.protos], [("a", k + 1), ("b", k + 1)])
    store.close()
    db = state / "server.db"
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) > 6 * page
    for n in (2, 3, 4):        # the tables' and the index's first pages
        damaged = data[:n * page] + bytes(page) + data[(n + 1) * page:]
        db.write_bytes(bytes(damaged))
        with pytest.raises(ModelError) as e:
            Server(("127.0.0.1", 1), gas_model, str(state))
        assert "\n" not in str(e.value) and "server.db" in str(e.value), (n, str(e.value))
    db.write_bytes(bytes(data))
    SQLiteStore(str(db), model.manifest, model.protos).close()   # the good one opens
