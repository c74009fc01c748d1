"""Signed releases (Ed25519) and `edge-spl server rollback`: keys and their files, the signed
envelope, a real server and device on the real mosquitto refusing forged releases, and the CLI's
one-line errors."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import uuid

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from edge_spl import protocol as P
from edge_spl.cli import main
from edge_spl.device.learner import FFLearner
from edge_spl.device.sync import DeviceSync
from edge_spl.errors import EdgeSplError, ProtocolError
from edge_spl.files import sha256_hex
from edge_spl.manifest import ExportedModel
from edge_spl.server.service import Server
from edge_spl.server.store import DB_FILE, SQLiteStore
from edge_spl.signing import (PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, generate_key, load_signing_key,
                              load_verify_key, write_key_pair)

EDGE_SPL = [sys.executable, "-m", "edge_spl"]
SHAPES = [(16, 8), (16, 16), (3, 24)]   # the 8-16-16-3 model of conftest; its head sees [z, h]
WAIT = 10.0


def a_release(version=3, merged=None, seed=0, manifest_sha256=""):
    rng = np.random.default_rng(seed)
    protos = [(rng.standard_normal(s).astype(np.float32), rng.standard_normal(s[0]).astype(np.float32))
              for s in SHAPES]
    return P.Release(version, "ab" * 32, protos, merged or {"dev-1": 2}, 12.5, manifest_sha256)


def split_signed(payload):
    """(envelope head + signature header, the signed release payload inside)."""
    _, kind, _, hlen = P._HEAD.unpack_from(payload)
    assert kind == P.KIND_SIGNED_RELEASE
    return payload[:P._HEAD.size + hlen], payload[P._HEAD.size + hlen:]


def assert_protos_equal(a, b):
    assert len(a) == len(b)
    for (P1, g1), (P2, g2) in zip(a, b):
        np.testing.assert_array_equal(P1, P2)
        np.testing.assert_array_equal(g1, g2)


# -- keys ----------------------------------------------------------------------------------------

def test_sign_and_verify_round_trip_and_forgeries():
    key, other = generate_key(), generate_key()
    msg = b"edge-spl release bytes" * 10
    sig = key.sign(msg)
    assert len(sig) == 64 and key.public.verify(msg, sig)
    assert key.key_id == key.public.key_id and len(key.key_id) == 16 and key.key_id != other.key_id
    assert not other.public.verify(msg, sig)                       # another key's check
    assert not key.public.verify(msg, other.sign(msg))             # signed by another key
    for i in (0, len(msg) // 2, len(msg) - 1):                     # the message tampered with
        assert not key.public.verify(msg[:i] + bytes([msg[i] ^ 1]) + msg[i + 1:], sig)
    assert not key.public.verify(msg + b"x", sig) and not key.public.verify(msg[:-1], sig)
    for bad in (sig[:-1], sig[:32], b"", sig + b"\0", bytes(64), bytes([sig[0] ^ 0x80]) + sig[1:]):
        assert not key.public.verify(msg, bad)                     # truncated, empty, altered
    assert not key.public.verify(msg, sig.hex()) and not key.public.verify(None, sig)
    assert key.key_id not in repr(key.private_pem()) and "PRIVATE" not in repr(key)


def test_key_files_round_trip_with_a_private_mode_and_no_silent_overwrite(tmp_path):
    out = tmp_path / "keys"
    priv, pub = write_key_pair(str(out))
    assert os.path.basename(priv) == PRIVATE_KEY_FILE and os.path.basename(pub) == PUBLIC_KEY_FILE
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert open(priv, "rb").read().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert open(pub, "rb").read().startswith(b"-----BEGIN PUBLIC KEY-----")
    key, public = load_signing_key(priv), load_verify_key(pub)
    assert key.key_id == public.key_id and public.verify(b"m", key.sign(b"m"))
    with pytest.raises(EdgeSplError, match="exists; give --force"):
        write_key_pair(str(out))
    assert load_verify_key(pub).key_id == public.key_id            # untouched
    write_key_pair(str(out), force=True)
    assert load_verify_key(pub).key_id != public.key_id
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600


def test_key_files_that_are_missing_or_malformed_are_one_line_errors(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed448

    priv, pub = write_key_pair(str(tmp_path / "k"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN PUBLIC KEY-----\nnot base64 at all\n-----END PUBLIC KEY-----\n")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    big = tmp_path / "big"
    big.write_bytes(b"x" * 100_000)
    k448 = ed448.Ed448PrivateKey.generate()
    other_priv = tmp_path / "ed448.key"
    other_priv.write_bytes(k448.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    other_pub = tmp_path / "ed448.pub"
    other_pub.write_bytes(k448.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(generate_key()._key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    cases = [
        (load_verify_key, str(tmp_path / "nope.pub"), "no such file"),
        (load_verify_key, str(tmp_path), "is a folder"),
        (load_verify_key, str(garbage), "not a PEM public key"),
        (load_verify_key, str(empty), "not a PEM public key"),
        (load_verify_key, str(big), "not a key file"),
        (load_verify_key, priv, "holds a private key"),
        (load_verify_key, str(other_pub), "not an Ed25519 key"),
        (load_signing_key, str(tmp_path / "nope.key"), "no such file"),
        (load_signing_key, str(garbage), "holds a public key"),
        (load_signing_key, str(empty), "not a PEM private key"),
        (load_signing_key, pub, "holds a public key"),
        (load_signing_key, str(other_priv), "not an Ed25519 key"),
        (load_signing_key, str(encrypted), "encrypted"),
    ]
    for load, path, msg in cases:
        with pytest.raises(EdgeSplError, match=msg) as e:
            load(path, "--the-key")
        assert str(e.value).startswith(f"--the-key {path}") and "\n" not in str(e.value)


# -- the signed envelope -------------------------------------------------------------------------

def test_a_signed_release_decodes_only_with_the_right_key_and_exact_bytes():
    key, other = generate_key(), generate_key()
    r = a_release(manifest_sha256="cd" * 32)
    signed = P.encode_release(r, signer=key)
    unsigned = P.encode_release(r)
    assert signed[4] == P.KIND_SIGNED_RELEASE and signed.endswith(unsigned)   # a wrapper of the release
    for verifier in (key.public, None):                 # without a key the signature is not checked
        back = P.decode_release(signed, verifier=verifier)
        assert (back.version, back.merged, back.created, back.manifest_sha256) == (3, {"dev-1": 2}, 12.5, "cd" * 32)
        assert_protos_equal(back.protos, r.protos)
    assert P.decode_release(unsigned).version == 3
    with pytest.raises(ProtocolError, match="not signed"):
        P.decode_release(unsigned, verifier=key.public)
    with pytest.raises(ProtocolError, match=f"signed by key {other.key_id}, not by the trusted key"):
        P.decode_release(P.encode_release(r, signer=other), verifier=key.public)

    # another key that claims the trusted key's id: the signature does not verify
    class Impostor:
        key_id = key.key_id

        def sign(self, message):
            return other.sign(message)

    with pytest.raises(ProtocolError, match="does not verify"):
        P.decode_release(P.encode_release(r, signer=Impostor()), verifier=key.public)
    # the signature of one release on another (a replay onto a higher version)
    spliced = split_signed(signed)[0] + split_signed(P.encode_release(a_release(version=9), signer=key))[1]
    with pytest.raises(ProtocolError, match="does not verify"):
        P.decode_release(spliced, verifier=key.public)
    assert P.decode_release(spliced).version == 9        # (what an unchecking device would take)
    for cut in (1, 64, len(signed) // 2, len(signed) - 20):
        with pytest.raises(ProtocolError):
            P.decode_release(signed[:-cut], verifier=key.public)
    with pytest.raises(ProtocolError, match="kind"):     # a signature of a signed release: no nesting
        P.sign_release_payload(signed, key)
    with pytest.raises(ProtocolError, match="over the"):
        P.encode_release(r, max_bytes=len(unsigned) + 10, signer=key)


@pytest.mark.parametrize("header", [
    {"alg": "ed25519", "key_id": "0" * 16},                                       # no signature
    {"alg": "rsa", "key_id": "0" * 16, "signature": "0" * 128},
    {"alg": "ed25519", "key_id": "0" * 16, "signature": "0" * 127},
    {"alg": "ed25519", "key_id": "ZZ" * 8, "signature": "0" * 128},
    {"alg": "ed25519", "key_id": "0" * 16, "signature": "0" * 128, "extra": 1},
    {"alg": "ed25519", "key_id": 7, "signature": "0" * 128},
])
def test_malformed_signature_headers_are_protocol_errors(header):
    inner = P.encode_release(a_release())
    h = json.dumps(header).encode()
    payload = P._HEAD.pack(P.MAGIC, P.KIND_SIGNED_RELEASE, P.FORMAT, len(h)) + h + inner
    for verifier in (generate_key().public, None):
        with pytest.raises(ProtocolError):
            P.decode_release(payload, verifier=verifier)


_KEY = generate_key()
_SIGNED = P.encode_release(a_release(), signer=_KEY)


@settings(max_examples=150, deadline=None)
@given(pos=st.integers(0, len(_SIGNED) - 1), flip=st.integers(1, 255))
def test_any_altered_byte_of_a_signed_release_is_refused(pos, flip):
    tampered = bytearray(_SIGNED)
    tampered[pos] ^= flip
    with pytest.raises(ProtocolError):
        P.decode_release(bytes(tampered), verifier=_KEY.public)


# -- server and device on the real broker --------------------------------------------------------

def random_delta(rng, device, seq, base, scale=0.05):
    layers = []
    for d_out, d_in in SHAPES:
        r = np.sort(rng.choice(d_out, 3, replace=False)).astype(np.int32)
        layers.append(P.LayerDelta(r, (rng.standard_normal((3, d_in)) * scale).astype(np.float32),
                                   (rng.standard_normal(3) * scale).astype(np.float32),
                                   np.full(3, 5.0, np.float32)))
    return P.PrototypeDelta(device, seq, base, layers)


class Client:
    """A plain paho client on the fleet: a forger, or a fake device that sends deltas."""

    def __init__(self, broker, fleet):
        self.topics = P.Topics(fleet)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311)
        self.client.connect(*broker)
        self.client.loop_start()

    def publish(self, topic, payload, retain=False):
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT)

    def forge_release(self, payload):
        self.publish(self.topics.release, payload, retain=True)

    def send(self, delta):
        self.publish(self.topics.delta(delta.device), P.encode_delta(delta))

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def env(mqtt_broker, fleet, tiny_model_dir, tmp_path):
    """Keys, servers and clients on a fresh fleet; all stopped and the broker cleared after."""
    servers, closers = [], []
    priv, pub = write_key_pair(str(tmp_path / "keys"))

    class Env:
        broker = mqtt_broker
        model_dir = tiny_model_dir
        model = ExportedModel.load(tiny_model_dir)
        topics = P.Topics(fleet)
        state = str(tmp_path / "server")
        key_file, pub_file = priv, pub
        key, public = load_signing_key(priv), load_verify_key(pub)

        def __init__(self):
            self.fleet = fleet

        def server(self, **kw):
            s = Server(mqtt_broker, tiny_model_dir, self.state, fleet=fleet, merge_every=0.1,
                       connect_timeout=5, signing_key=kw.pop("signing_key", self.key), **kw)
            servers.append(s)
            return s.start()

        def client(self):
            c = Client(mqtt_broker, fleet)
            closers.append(c.close)
            return c

        def device(self, device_id="dev1", verify_key="trusted"):
            sync = DeviceSync(*mqtt_broker, fleet, device_id,
                              verify_key=self.public if verify_key == "trusted" else verify_key)
            sync.start(WAIT)
            closers.append(sync.close)
            return sync

    yield Env()
    for s in servers:
        s.stop()
    for close in closers:
        close()
    clear_fleet(mqtt_broker, fleet)


def clear_fleet(broker, fleet):
    t = P.Topics(fleet)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-spl-server-{fleet}",
                    clean_session=True, protocol=mqtt.MQTTv311)
    c.connect(*broker)
    c.loop_start()
    for topic in (t.manifest, t.onnx, t.release):
        c.publish(topic, b"", qos=1, retain=True).wait_for_publish(WAIT)
    c.disconnect()
    c.loop_stop()


def poll_until(sync, learner, cond, what):
    """Feed the device's events to the learner until cond() holds; fails after WAIT s."""
    deadline = time.monotonic() + WAIT
    adopted = []
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {WAIT}s")
        for ev in sync.poll(timeout=0.2):
            if ev.kind == "release" and learner.adopt_release(ev.value):
                adopted.append(ev.value.version)
    return adopted


def test_a_device_with_the_public_key_adopts_signed_releases_and_refuses_forged_ones(env):
    server = env.server()
    sync = env.device()
    model, release = sync.pull_model(WAIT)
    assert release.version == 0 and release.manifest_sha256 == sha256_hex(env.model.manifest.to_json())
    learner = FFLearner(model, device_id="dev1")
    fake = env.client()
    rng = np.random.default_rng(0)
    fake.send(random_delta(rng, "other", 1, 0))
    assert poll_until(sync, learner, lambda: learner.base_version_ == 1, "release v1") == [1]
    v1 = [(P_.copy(), g.copy()) for P_, g in learner.protos_]
    assert sync.rejected == 0

    sha = env.model.manifest.onnx_sha256
    forged = P.Release(50, sha, [(P_ + 1, g) for P_, g in env.model.protos], {"dev1": 99})
    genuine_v2 = P.encode_release(P.Release(2, sha, env.model.protos, {}, fleet=env.fleet), signer=env.key)
    tampered = bytearray(genuine_v2)
    tampered[-100] ^= 1                         # a byte of the signed release's arrays
    attacks = {
        "unsigned": P.encode_release(forged),
        "signed by another key": P.encode_release(forged, signer=generate_key()),
        "tampered": bytes(tampered),
        "another release under a valid signature": split_signed(genuine_v2)[0] + P.encode_release(forged),
        "malformed": P._HEAD.pack(P.MAGIC, P.KIND_SIGNED_RELEASE, P.FORMAT, 2) + b"{}",
        # signed by the fleet's key, but for another fleet that shares it (replayed from there)
        "another fleet's": P.encode_release(P.Release(60, sha, env.model.protos, {}, fleet="other-fleet"),
                                            signer=env.key),
        "no fleet named": P.encode_release(P.Release(61, sha, env.model.protos, {}), signer=env.key),
        "junk": b"junk",
    }
    for name, payload in attacks.items():
        before = sync.rejected
        fake.forge_release(payload)
        poll_until(sync, learner, lambda: sync.rejected > before, f"rejection of the {name} release")
        assert learner.base_version_ == 1, name
        assert_protos_equal(learner.protos_, v1)
    # signed by the server's key but not newer: decodes, and the learner still refuses it
    for version in (1, 0):
        fake.forge_release(P.encode_release(P.Release(version, sha, env.model.protos, {}, fleet=env.fleet),
                                            signer=env.key))
        seen = []
        deadline = time.monotonic() + WAIT
        while not seen and time.monotonic() < deadline:
            for ev in sync.poll(timeout=0.1):
                assert ev.kind == "release" and ev.value.version == version
                seen.append(learner.adopt_release(ev.value))
        assert seen == [False], version
    assert learner.base_version_ == 1
    assert_protos_equal(learner.protos_, v1)

    # the server goes on: its next release (signed) is adopted
    fake.send(random_delta(rng, "other", 2, 1))
    assert poll_until(sync, learner, lambda: learner.base_version_ == 2, "release v2") == [2]
    # and a restarted server republishes its release signed
    server.stop()
    fake.forge_release(b"")
    server = env.server()
    assert P.decode_release(server._release_payload, verifier=env.public).version == 2


def test_a_device_pulling_its_model_takes_only_a_verified_release_and_its_manifest(env):
    fake = env.client()
    sha = env.model.manifest.onnx_sha256
    manifest = env.model.manifest.to_json()
    fake.publish(env.topics.manifest, manifest, retain=True)
    fake.publish(env.topics.onnx, env.model.onnx_bytes, retain=True)
    fake.forge_release(P.encode_release(P.Release(7, sha, env.model.protos, {}, 0.0, sha256_hex(manifest))))
    with pytest.raises(EdgeSplError, match="its release was refused .release is not signed"):
        env.device("puller1").pull_model(1.5)
    # a manifest other than the one the signed release names (another standardisation)
    doctored = manifest.replace(b'"model_id": "tiny"', b'"model_id": "evil"')
    assert doctored != manifest
    fake.publish(env.topics.manifest, doctored, retain=True)
    fake.forge_release(P.encode_release(P.Release(7, sha, env.model.protos, {}, 0.0, sha256_hex(manifest),
                                                  env.fleet), signer=env.key))
    with pytest.raises(EdgeSplError, match="do not match"):
        env.device("puller2").pull_model(1.5)
    fake.publish(env.topics.manifest, manifest, retain=True)
    model, release = env.device("puller3").pull_model(WAIT)
    assert release.version == 7 and model.manifest.model_id == "tiny"


# -- the command line ----------------------------------------------------------------------------

def write_csv(path, n=60, seed=0, label=True):
    rng = np.random.default_rng(seed)
    lines = [",".join(f"f{i}" for i in range(8)) + (",y" if label else "")]
    for i in range(n):
        y = i % 3
        lines.append(",".join(f"{v:.4f}" for v in rng.standard_normal(8) + 2 * y) + (f",c{y}" if label else ""))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_device_cli_with_verify_key_adopts_signed_releases_and_counts_forged_ones(env, tmp_path, capsys):
    server = env.server()
    state = tmp_path / "dev"
    common = ["device", "--broker", "%s:%d" % env.broker, "--fleet", env.fleet, "--id", "d1",
              "--state", str(state), "--verify-key", env.pub_file, "--label", "y", "--sync-every", "20",
              "--wait", "10", "--quiet"]
    code, _, err = run_cli(capsys, *common, "--source", write_csv(tmp_path / "a.csv", n=40))
    assert code == 0, err
    summary = json.loads((state / "summary.json").read_text())
    assert summary["messages_rejected"] == 0 and summary["outbox"] == 0
    assert summary["version"] == server.version >= 1
    # a forged release is retained now; the device restarts, refuses it and follows the server
    fake = env.client()
    fake.forge_release(P.encode_release(P.Release(99, env.model.manifest.onnx_sha256, env.model.protos,
                                                  {"d1": 1000})))
    code, _, err = run_cli(capsys, *common, "--source", write_csv(tmp_path / "b.csv", n=40, seed=1))
    assert code == 0, err
    summary = json.loads((state / "summary.json").read_text())
    assert summary["messages_rejected"] >= 1 and 99 not in summary["versions_adopted"]
    assert summary["version"] == server.version and summary["outbox"] == 0


def one_line_error(*argv, timeout=60):
    p = subprocess.run(EDGE_SPL + list(argv), capture_output=True, text=True, timeout=timeout)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(lines) == 1, p.stderr
    return lines[0]


def test_cli_key_errors_are_one_line(tmp_path, tiny_model_dir):
    priv, pub = write_key_pair(str(tmp_path / "keys"))
    bad = tmp_path / "bad.pem"
    bad.write_text("hello\n")
    src = write_csv(tmp_path / "s.csv", n=5)
    device = ["device", "--id", "d", "--source", src, "--state", str(tmp_path / "st"), "--model", tiny_model_dir,
              "--broker", "127.0.0.1:1", "--wait", "1"]
    assert "--verify-key" in one_line_error(*device, "--verify-key", str(tmp_path / "nope.pub"))
    assert "no such file" in one_line_error(*device, "--verify-key", str(tmp_path / "nope.pub"))
    assert "not a PEM public key" in one_line_error(*device, "--verify-key", str(bad))
    assert "holds a private key" in one_line_error(*device, "--verify-key", priv)
    server = ["server", "--broker", "127.0.0.1:1", "--model", tiny_model_dir, "--state", str(tmp_path / "sv")]
    assert "--signing-key" in one_line_error(*server, "--signing-key", str(tmp_path / "nope.key"))
    assert "not a PEM private key" in one_line_error(*server, "--signing-key", str(bad))
    assert "holds a public key" in one_line_error(*server, "--signing-key", pub)
    msg = one_line_error("keys", "--out", str(tmp_path / "keys"))
    assert "exists; give --force" in msg
    # serving still needs its three options; rollback does not take --merge-every's place
    p = subprocess.run(EDGE_SPL + ["server", "--model", tiny_model_dir], capture_output=True, text=True)
    assert p.returncode == 2 and "required: --broker, --state" in p.stderr


def test_keys_command_writes_a_pair(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "keys", "--out", str(tmp_path / "k"))
    assert code == 0 and "release.key" in out and "release.pub" in out
    key, public = load_signing_key(str(tmp_path / "k" / "release.key")), load_verify_key(str(tmp_path / "k" / "release.pub"))
    assert key.key_id == public.key_id and key.key_id in out
    code, _, err = run_cli(capsys, "keys", "--out", str(tmp_path / "k"))
    assert code == 2 and "--force" in err
    code, _, _ = run_cli(capsys, "keys", "--out", str(tmp_path / "k"), "--force")
    assert code == 0 and load_verify_key(str(tmp_path / "k" / "release.pub")).key_id != key.key_id


# -- rollback ------------------------------------------------------------------------------------

def test_rollback_makes_a_newer_version_with_old_prototypes_that_devices_adopt(env, tmp_path, capsys):
    server = env.server()
    sync = env.device("dev1")
    model, release = sync.pull_model(WAIT)
    learner = FFLearner(model, device_id="dev1")
    fake = env.client()
    rng = np.random.default_rng(3)
    fake.send(random_delta(rng, "a", 1, 0))
    poll_until(sync, learner, lambda: learner.base_version_ == 1, "release v1")
    fake.send(random_delta(rng, "b", 1, 1))
    fake.send(random_delta(rng, "a", 2, 1))
    poll_until(sync, learner, lambda: server.version >= 2 and learner.base_version_ == server.version,
               "release v2")
    latest = server.version
    rollback = ["server", "rollback", "--to", "0", "--state", env.state, "--model", env.model_dir,
                "--broker", "%s:%d" % env.broker, "--fleet", env.fleet, "--signing-key", env.key_file]
    # not while a server runs on the folder
    code, _, err = run_cli(capsys, *rollback)
    assert code == 2 and "in use by another edge-spl server" in err and len(err.strip().splitlines()) == 1
    merged = dict(server.current.merged)
    assert merged == {"a": 2, "b": 1}
    server.stop()

    code, out, err = run_cli(capsys, *rollback)
    assert code == 0, err
    new = latest + 1
    assert f"stored version {new}" in out and "the prototypes of version 0" in out
    assert f"published version {new}" in out and env.key.key_id in out
    store = SQLiteStore(os.path.join(env.state, DB_FILE), env.model.manifest, env.model.protos)
    try:
        v = store.latest()
        assert v.version == new and v.parent == latest and v.n_deltas == 0 and v.merged == merged
        assert_protos_equal(v.protos, store.get(0).protos)
        assert_protos_equal(v.protos, env.model.protos)
    finally:
        store.close()
    # the device (it checks signatures) follows at once: the exported model's prototypes again
    assert poll_until(sync, learner, lambda: learner.base_version_ == new, f"release v{new}") == [new]
    assert_protos_equal(learner.protos_, env.model.protos)
    assert sync.rejected == 0
    # a fresh device pulls it, signature checked
    state = tmp_path / "fresh"
    code, _, err = run_cli(capsys, "device", "--broker", "%s:%d" % env.broker, "--fleet", env.fleet,
                           "--id", "d9", "--state", str(state), "--verify-key", env.pub_file, "--quiet",
                           "--source", write_csv(tmp_path / "u.csv", n=5, label=False), "--wait", "10")
    assert code == 0, err
    assert json.loads((state / "summary.json").read_text())["version"] == new
    # the next server start publishes the rolled-back version and merges on top of it
    server = env.server()
    assert server.version == new and server.current.merged == merged
    fake.send(random_delta(rng, "a", 3, new))
    poll_until(sync, learner, lambda: learner.base_version_ == new + 1, f"release v{new + 1}")
    assert server.current.merged == {"a": 3, "b": 1}


def test_rollback_errors_are_one_line(env, tmp_path, capsys):
    server = env.server()
    server.stop()
    base = ["server", "rollback", "--model", env.model_dir]
    for argv, msg in [
        (["--to", "5", "--state", env.state], "has no version 5 (it holds 0..0)"),
        (["--to", "0", "--state", env.state], "version 0 is the latest version already"),
        (["--to", "0", "--state", str(tmp_path / "nope")], "no such folder"),
        (["--to", "0", "--state", str(tmp_path)], f"holds no {DB_FILE}"),
        (["--to", "0", "--state", env.state, "--signing-key", env.pub_file], "holds a public key"),
    ]:
        code, out, err = run_cli(capsys, *base, *argv)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert err.startswith("edge-spl server rollback: error: "), err
    assert not os.path.exists(tmp_path / "nope")
    for to in ("x", "-1"):
        with pytest.raises(SystemExit):      # argparse: usage and a one-line error, exit 2
            main([*base, "--to", to, "--state", env.state])
        assert "--to" in capsys.readouterr().err
    # nothing was stored by the failed attempts
    store = SQLiteStore(os.path.join(env.state, DB_FILE), env.model.manifest, env.model.protos)
    try:
        assert store.latest().version == 0
    finally:
        store.close()


def test_a_device_that_verifies_says_the_unsigned_release_was_refused(env, tmp_path, capsys):
    """An unsigned fleet and a device with --verify-key that must pull its model: the one-line
    error names the refused release and why, not a missing one."""
    env.server(signing_key=None)
    code, _, err = run_cli(capsys, "device", "--broker", "%s:%d" % env.broker, "--fleet", env.fleet, "--id", "d1",
                           "--state", str(tmp_path / "dev"), "--verify-key", env.pub_file, "--wait", "3",
                           "--source", write_csv(tmp_path / "a.csv", n=5))
    last = err.strip().splitlines()[-1]
    assert code == 2 and "its release was refused (" in last and "not signed" in last, err
