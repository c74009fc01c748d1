"""Logins, the fleet ACL and TLS against a real mosquitto configured from docs/mosquitto.md.

Every test starts its own mosquitto on free ports with the documented configuration and ACL
(paths, ports and fleet name swapped for the test's), a password file made with
mosquitto_passwd, and the CA and broker certificate made by the documented openssl commands.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from conftest import free_port, mosquitto_binary, port_open

from edge_spl.cli import main
from edge_spl.device.sync import DeviceSync
from edge_spl.errors import EdgeSplError
from edge_spl.manifest import ExportedModel
from edge_spl.mqtt_auth import PASSWORD_ENV, MqttAuth
from edge_spl.protocol import (LayerDelta, PrototypeDelta, Release, Topics, decode_release,
                               encode_delta, encode_release)
from edge_spl.server.service import Server

HERE = os.path.dirname(os.path.abspath(__file__))
DOC = os.path.join(HERE, "..", "docs", "mosquitto.md")
SERVER_USER = "edge-spl-server"
DOC_FLEET = "plant1"


def doc_block(name: str) -> str:
    """The fenced block after `<!-- test: name -->` in docs/mosquitto.md."""
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    m = re.search(rf"<!-- test: {name} -->\n```[a-z]*\n(.*?)```", text, re.S)
    assert m, f"docs/mosquitto.md has no block marked 'test: {name}'"
    return m.group(1)


def write_csv(path, n=40, seed=0):
    rng = np.random.default_rng(seed)
    lines = [",".join(f"f{i}" for i in range(8)) + ",y"]
    for i in range(n):
        lines.append(",".join(f"{v:.4f}" for v in rng.standard_normal(8) + 2 * (i % 3)) + f",c{i % 3}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def one_row_delta(model: ExportedModel, device: str, seq: int, base: int = 0) -> PrototypeDelta:
    layers = []
    for (d_out, d_in), _ in model.manifest.proto_shapes():
        layers.append(LayerDelta(np.array([seq % d_out], np.int32), np.full((1, d_in), 0.01, np.float32),
                                 np.full(1, 0.01, np.float32), np.ones(1, np.float32)))
    return PrototypeDelta(device, seq, base, layers, model.manifest.onnx_sha256)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """CA, broker key and certificate (for 127.0.0.1 and localhost) from the documented commands,
    and a second CA that signed nothing of this broker."""
    d = tmp_path_factory.mktemp("certs")
    script = doc_block("certs")
    script = re.sub(r"^HOST=.*$", "HOST=localhost", script, count=1, flags=re.M)
    script = re.sub(r"^SAN=.*$", 'SAN="DNS:localhost,IP:127.0.0.1"', script, count=1, flags=re.M)
    subprocess.run(["bash", "-euc", script], cwd=d, check=True, capture_output=True, timeout=30)
    other = d / "other"
    other.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=another CA", "-keyout", str(other / "ca.key"),
                    "-out", str(other / "ca.crt")], check=True, capture_output=True, timeout=30)
    return d


class Broker:
    """mosquitto with the documented config: `plain` is the loopback listener, `tls` the TLS one."""

    def __init__(self, root, certs, fleet):
        binary = mosquitto_binary()
        if binary is None or shutil.which("mosquitto_passwd") is None:
            pytest.fail("these tests need mosquitto and mosquitto_passwd: apt-get install mosquitto")
        self.fleet, self.host = fleet, "127.0.0.1"
        self.plain, self.tls = free_port(), free_port()
        self.ca = str(certs / "ca.crt")
        etc, lib, logs = root / "etc", root / "lib", root / "log"
        for p in (etc, lib, logs):
            p.mkdir(parents=True)
        for name in ("ca.crt", "server.crt", "server.key"):
            shutil.copy(certs / name, etc / name)
        self.passwords = {}
        for k, user in enumerate([SERVER_USER, "d1", "d2", "d3"]):
            self.passwords[user] = f"pw-{user}-{k}"
            subprocess.run(["mosquitto_passwd", "-b"] + (["-c"] if k == 0 else []) +
                           [str(etc / "passwd"), user, self.passwords[user]], check=True, timeout=10)
            (root / f"{user}.password").write_text(self.passwords[user] + "\n")
        (etc / "acl").write_text(doc_block("acl").replace(f"edge-spl/{DOC_FLEET}/", f"edge-spl/{fleet}/"))
        conf = (doc_block("conf").replace("/etc/mosquitto/edge-spl", str(etc))
                .replace("/var/lib/mosquitto", str(lib)).replace("/var/log/mosquitto", str(logs))
                .replace("listener 8883\n", f"listener {self.tls}\n")
                .replace("listener 1883 127.0.0.1\n", f"listener {self.plain} 127.0.0.1\n"))
        assert str(self.tls) in conf and str(self.plain) in conf
        if os.geteuid() == 0:
            conf += "user root\n"   # as root, mosquitto would drop to `mosquitto`, who cannot read tmp_path
        (etc / "mosquitto.conf").write_text(conf)
        self.root, self.log = root, logs / "mosquitto.log"
        self.proc = subprocess.Popen([binary, "-c", str(etc / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not (port_open(self.host, self.plain) and port_open(self.host, self.tls)):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"mosquitto did not start: {self.log_text()}")
            time.sleep(0.02)

    def password_file(self, user: str) -> str:
        return str(self.root / f"{user}.password")

    def auth(self, user: str, tls: bool = False) -> MqttAuth:
        return MqttAuth(user, self.passwords[user], self.ca if tls else None)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture
def broker(tmp_path, certs, fleet):
    b = Broker(tmp_path / "broker", certs, fleet)
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def server_on(broker, tiny_model_dir, tmp_path):
    """Start the real server on one of the broker's listeners, logged in as edge-spl-server."""
    started = []

    def start(tls: bool = False) -> Server:
        s = Server((broker.host, broker.tls if tls else broker.plain), tiny_model_dir, str(tmp_path / "srv"),
                   fleet=broker.fleet, merge_every=0.1, connect_timeout=5, auth=broker.auth(SERVER_USER, tls))
        started.append(s.start())
        return s
    yield start
    for s in started:
        s.stop()


def device_cli(capsys, broker, tmp_path, *extra, user="d1", port=None, wait="10"):
    """`edge-spl device` in this process, pulling its model from the broker; (code, stderr)."""
    argv = ["device", "--broker", f"{broker.host}:{port or broker.plain}", "--fleet", broker.fleet,
            "--id", user, "--source", write_csv(tmp_path / f"{user}.csv"), "--state", str(tmp_path / user),
            "--label", "y", "--sync-every", "10", "--quiet", "--wait", wait, *extra]
    code = main(argv)
    return code, capsys.readouterr().err


def summary(tmp_path, user="d1") -> dict:
    return json.loads((tmp_path / user / "summary.json").read_text())


def test_a_wrong_password_is_a_one_line_error(broker, tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.password"
    bad.write_text("not-the-password\n")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "edge_spl", "device",
                        "--broker", f"{broker.host}:{broker.plain}", "--fleet", broker.fleet,
                        "--id", "d1", "--username", "d1", "--password-file", str(bad),
                        "--source", write_csv(tmp_path / "s.csv"), "--state", str(tmp_path / "st"),
                        "--model", tiny_model_dir, "--wait", "20"],
                       capture_output=True, text=True, timeout=60)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0] == (f"edge-spl device: error: MQTT broker {broker.host}:{broker.plain} refused the "
                        f"connection: not authorized (check --username and --password-file)")
    assert time.monotonic() - t0 < 15   # a refusal ends it at once, not after --wait
    # the server likewise, and without any login at all
    for auth in (MqttAuth(SERVER_USER, "nope"), MqttAuth()):
        s = Server((broker.host, broker.plain), tiny_model_dir, str(tmp_path / "srv"), fleet=broker.fleet,
                   connect_timeout=20, auth=auth)
        t0 = time.monotonic()
        with pytest.raises(EdgeSplError, match="refused the connection: not authorized"):
            s.start()
        assert time.monotonic() - t0 < 5


def test_with_the_right_logins_the_loop_works(broker, server_on, tmp_path, capsys):
    server = server_on()
    code, err = device_cli(capsys, broker, tmp_path, "--username", "d1", "--password-file",
                           broker.password_file("d1"))
    assert code == 0, err
    s = summary(tmp_path)
    # it pulled the model and release v0, pushed deltas, and adopted the release that merged them
    assert s["deltas_pushed"] >= 1 and s["outbox"] == 0 and s["versions_adopted"], s
    assert server.store.is_merged("d1", 1) and server.stats.deltas_merged == s["deltas_pushed"]
    assert server.stats.deltas_rejected == {}


def test_the_acl_keeps_a_device_to_its_own_topics(broker, server_on, tiny_model_dir):
    server = server_on()
    model = ExportedModel.load(tiny_model_dir)
    topics = Topics(broker.fleet)
    seen, lock = [], threading.Lock()

    def on_message(client, userdata, msg):
        with lock:
            seen.append(decode_release(bytes(msg.payload)).version)
    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="watcher", protocol=mqtt.MQTTv311)
    broker.auth("d3").apply(watcher)
    watcher.on_message = on_message
    watcher.connect(broker.host, broker.plain)
    watcher.subscribe(topics.release, qos=1)
    watcher.loop_start()
    d1 = DeviceSync(broker.host, broker.plain, broker.fleet, "d1", auth=broker.auth("d1"))
    try:
        d1.start(5)
        # logged in as d1: a delta in d2's name and a forged release (the broker acks both under
        # MQTT 3.1.1, and drops them), then d1's own delta
        forged = encode_release(Release(99, model.manifest.onnx_sha256, model.protos, {"d1": 50}))
        for topic, payload in ((topics.release, forged),
                               (topics.delta("d2"), encode_delta(one_row_delta(model, "d2", 1)))):
            d1.client.publish(topic, payload, qos=1, retain=topic == topics.release).wait_for_publish(5)
        d1.publish_delta(one_row_delta(model, "d1", 1)).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while not (server.version == 1 and 1 in seen) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        d1.close()
        watcher.disconnect()
        watcher.loop_stop()
    # messages from one client reach a subscriber in order: had the broker passed the delta of d2,
    # the server would have had it before d1's; had it passed the release, the watcher would
    # have seen v99 before the server's v1
    assert server.version == 1 and server.stats.messages_received == 1
    assert server.store.is_merged("d1", 1) and not server.store.is_merged("d2", 1)
    assert seen == [0, 1]
    fresh = DeviceSync(broker.host, broker.plain, broker.fleet, "d2", auth=broker.auth("d2"))
    try:
        fresh.start(5)
        release = next(ev.value for events in iter(lambda: fresh.poll(timeout=5), [])
                       for ev in events if ev.kind == "release")
    finally:
        fresh.close()
    assert release.version == 1 and release.merged == {"d1": 1}


def test_tls_listener(broker, server_on, certs, tmp_path, capsys):
    server = server_on(tls=True)
    code, err = device_cli(capsys, broker, tmp_path, "--username", "d1", "--password-file",
                           broker.password_file("d1"), "--tls-ca", broker.ca, port=broker.tls)
    assert code == 0, err
    assert summary(tmp_path)["outbox"] == 0 and server.store.is_merged("d1", 1)

    login = ["--username", "d2", "--password-file", broker.password_file("d2")]
    # plain MQTT to the TLS port: the broker hangs up; a clear line within --wait
    t0 = time.monotonic()
    code, err = device_cli(capsys, broker, tmp_path, *login, user="d2", port=broker.tls, wait="2")
    assert code == 2 and time.monotonic() - t0 < 5
    assert err.strip().splitlines()[-1] == (
        f"edge-spl device: error: MQTT broker {broker.host}:{broker.tls} closed the connection without "
        f"answering within 2 s; if that port speaks TLS, give --tls-ca")
    # a CA that did not sign the broker's certificate; TLS to the plain port: at once
    for port, ca, why in ((broker.tls, certs / "other" / "ca.crt", "certificate verify failed"),
                          (broker.plain, broker.ca, "does that port speak TLS?")):
        t0 = time.monotonic()
        code, err = device_cli(capsys, broker, tmp_path, *login, "--tls-ca", str(ca), user="d2", port=port)
        line = err.strip().splitlines()[-1]
        assert code == 2 and time.monotonic() - t0 < 5, err
        assert line.startswith(f"edge-spl device: error: cannot connect to MQTT broker {broker.host}:{port}: "
                               f"TLS handshake failed: ") and why in line, line


def test_options_are_checked_before_connecting(tmp_path, certs, tiny_model_dir, capsys, monkeypatch):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\r\n")
    args = SimpleNamespace(username="d1", password_file=str(pw), tls_ca=str(certs / "ca.crt"),
                           tls_cert=None, tls_key=None)
    auth = MqttAuth.from_args(args)
    assert auth.password == "s3cret" and auth.tls and "s3cret" not in repr(auth)
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    assert MqttAuth.from_args(SimpleNamespace(username="d1")).password == "from-env"
    assert MqttAuth.from_args(SimpleNamespace()).password is None   # no user name: not used

    (tmp_path / "empty").write_text("\n")
    bad = [
        (dict(password_file=str(tmp_path / "nope")), "--password-file .*nope: cannot read it"),
        (dict(password_file=str(tmp_path / "empty")), "is empty"),
        (dict(username=None), "--password-file needs --username"),
        (dict(tls_ca=str(tmp_path / "nope.crt")), "--tls-ca .*nope.crt: no such file"),
        (dict(tls_ca=str(pw)), "--tls-ca .*: no certificate"),
        (dict(tls_cert=str(certs / "server.crt")), "--tls-cert and --tls-key go together"),
        (dict(tls_ca=None, tls_cert=str(certs / "server.crt"), tls_key=str(certs / "server.key")),
         "--tls-cert needs --tls-ca"),
        (dict(tls_cert=str(certs / "server.crt"), tls_key=str(certs / "ca.key")), "--tls-cert .*--tls-key"),
    ]
    for change, message in bad:
        with pytest.raises(EdgeSplError, match=message):
            MqttAuth.from_args(SimpleNamespace(**{**vars(args), **change}))
    # a client certificate that fits its key loads
    MqttAuth.from_args(SimpleNamespace(**{**vars(args), "tls_cert": str(certs / "server.crt"),
                                          "tls_key": str(certs / "server.key")}))

    # through the CLI: one line, before any broker is tried
    code = main(["device", "--id", "d1", "--source", write_csv(tmp_path / "s.csv"), "--state",
                 str(tmp_path / "st"), "--model", tiny_model_dir, "--broker", "127.0.0.1:1",
                 "--username", "d1", "--tls-ca", str(tmp_path / "nope.crt")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("nope.crt: no such file")


def test_a_device_cannot_take_the_servers_client_id(broker, server_on, tiny_model_dir):
    """Under another id (the server's, with a clean session) a device would kick the server off and
    wipe its persistent session; the documented config gives every client its user name as id."""
    server = server_on()
    model = ExportedModel.load(tiny_model_dir)
    impostor = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edge-spl-server-{broker.fleet}",
                           clean_session=True, protocol=mqtt.MQTTv311)
    broker.auth("d1").apply(impostor)
    impostor.connect(broker.host, broker.plain)
    impostor.loop_start()
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            assert server._connected.is_set(), broker.log_text()[-2000:]
            time.sleep(0.05)
        d1 = DeviceSync(broker.host, broker.plain, broker.fleet, "d1", auth=broker.auth("d1"))
        d1.start(5)
        try:
            d1.publish_delta(one_row_delta(model, "d1", 1)).wait_for_publish(5)
            deadline = time.monotonic() + 10
            while server.version < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            d1.close()
    finally:
        impostor.disconnect()
        impostor.loop_stop()
    assert server.version == 1 and server._connected.is_set()
    log = broker.log_text()
    assert f"Client {SERVER_USER} already connected" not in log and "as d1" in log   # the impostor was d1
