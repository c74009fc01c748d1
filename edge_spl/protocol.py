"""The wire protocol: every topic and every payload that device and server exchange.

Nothing else builds a topic string or a payload. Binary payloads are an envelope:

    b"ESPL" | kind (1 byte) | format (1 byte) | header length (uint32, big-endian) | header | body

where the header is UTF-8 JSON (its `body_sha256` checks the body) and the body an .npz of plain
arrays (never pickle). Every payload is size-checked on encode and on decode.

A signed release is one more envelope around the unsigned one:

    b"ESPL" | 3 | format | header length | {"alg": "ed25519", "key_id", "signature"} | release payload

and the Ed25519 signature covers RELEASE_SIGNING_CONTEXT + the whole inner release payload, byte
for byte: everything a device reads from it is signed, and nothing needs re-encoding to check.

Topics, under `edge-spl/<fleet>/`:
    model/manifest     retained  manifest JSON (shapes, standardisation, class names, ONNX sha256)
    model/onnx         retained  the ONNX file's bytes
    release            retained  the newest prototype version (Release)
    delta/<device>     device -> server, QoS 1 (PrototypeDelta)
    status/<device>    retained  device status JSON; the broker publishes the last will (offline)
    ack/<device>       server -> device (Ack JSON)
"""
from __future__ import annotations

import json
import math
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .errors import ProtocolError
from .files import pack_arrays, sha256_hex, unpack_arrays

ROOT = "edge-spl"
FORMAT = 1
MAGIC = b"ESPL"
KIND_DELTA = 1
KIND_RELEASE = 2
KIND_SIGNED_RELEASE = 3
SIGNATURE_ALG = "ed25519"
# Signed before the release payload, so a signature made over anything else never passes as one
# over a release.
RELEASE_SIGNING_CONTEXT = b"edge-spl release signature v1\x00"
_KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_SIGNATURE_RE = re.compile(r"^[0-9a-f]{128}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HISTORY_RE = re.compile(r"^[0-9a-f]{1,32}$")
# mosquitto accepts up to 256 MB by default but brokers are often set lower; a delta or release
# of the demo model is ~0.5 MB, the ONNX file ~1 MB.
DEFAULT_MAX_PAYLOAD = 16 * 1024 * 1024
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HEAD = struct.Struct(">4sBBI")
# Sequence and version numbers: whole numbers JSON, SQLite and float64 all hold exactly.
MAX_COUNTER = 2**53
MAX_LAYERS = 64


# Ack reasons that say nothing against the delta itself: it may be merged when it comes again (or
# is not the sender's at all). Every other rejection is for good: the server never merges that
# (device, seq), its merged marks pass over it, and the device drops it from its outbox.
TRANSIENT_REJECTIONS = frozenset({"duplicate", "overloaded", "malformed", "device mismatch",
                                  "future base version", "other history"})


def payload_limit(max_packet: int, topic: str) -> int:
    """The largest payload a QoS 1 PUBLISH on `topic` carries within a broker's maximum packet
    size (mosquitto's max_packet_size): a broker disconnects a client that sends a larger packet,
    and paho then sends it again after every reconnect, forever. The packet is a fixed-header
    byte, the remaining length (1-4 bytes, 7 bits each), the topic with its 2-byte length, the
    2-byte packet id and the payload."""
    for n in range(1, 5):
        remaining = int(max_packet) - 1 - n
        if remaining < 128 ** n:
            return remaining - 2 - len(topic.encode()) - 2
    raise ValueError(f"max_packet {max_packet} is over MQTT's largest packet")


def check_name(kind: str, name: str) -> str:
    """Device ids and fleet names become topic levels: no '/', '+', '#', nothing empty."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ProtocolError(f"{kind} {name!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return name


@dataclass(frozen=True)
class Topics:
    fleet: str = "default"

    def __post_init__(self):
        check_name("fleet", self.fleet)

    @property
    def base(self) -> str:
        return f"{ROOT}/{self.fleet}"

    @property
    def manifest(self) -> str:
        return f"{self.base}/model/manifest"

    @property
    def onnx(self) -> str:
        return f"{self.base}/model/onnx"

    @property
    def release(self) -> str:
        return f"{self.base}/release"

    def delta(self, device: str) -> str:
        return f"{self.base}/delta/{check_name('device id', device)}"

    @property
    def all_deltas(self) -> str:
        return f"{self.base}/delta/+"

    def status(self, device: str) -> str:
        return f"{self.base}/status/{check_name('device id', device)}"

    @property
    def all_status(self) -> str:
        return f"{self.base}/status/+"

    def ack(self, device: str) -> str:
        return f"{self.base}/ack/{check_name('device id', device)}"

    def device_of(self, topic: str, kind: str) -> str | None:
        """The device id in `<base>/<kind>/<device>`, or None when the topic is not of that form."""
        prefix = f"{self.base}/{kind}/"
        if not topic.startswith(prefix):
            return None
        dev = topic[len(prefix):]
        return dev if _NAME_RE.match(dev) else None


# -- envelope ---------------------------------------------------------------------------------

def _encode(kind: int, header: dict, arrays: dict, max_bytes: int) -> bytes:
    body = pack_arrays(arrays)
    header = dict(header, body_sha256=sha256_hex(body))
    h = json.dumps(header, separators=(",", ":")).encode()
    out = _HEAD.pack(MAGIC, kind, FORMAT, len(h)) + h + body
    if len(out) > max_bytes:
        raise ProtocolError(f"payload is {len(out)} bytes, over the {max_bytes}-byte limit")
    return out


def _open(payload: bytes, max_bytes: int, kinds: tuple[int, ...]) -> tuple[int, bytes, bytes]:
    """(kind, header bytes, body) of an envelope of one of these kinds."""
    if len(payload) > max_bytes:
        raise ProtocolError(f"payload is {len(payload)} bytes, over the {max_bytes}-byte limit")
    if len(payload) < _HEAD.size:
        raise ProtocolError(f"payload of {len(payload)} bytes is too short")
    magic, k, fmt, hlen = _HEAD.unpack_from(payload)
    if magic != MAGIC:
        raise ProtocolError("not an edge-spl payload (bad magic)")
    if fmt != FORMAT:
        raise ProtocolError(f"payload format {fmt}, this edge-spl speaks {FORMAT}")
    if k not in kinds:
        raise ProtocolError(f"payload kind {k}, expected {' or '.join(map(str, kinds))}")
    if _HEAD.size + hlen > len(payload):
        raise ProtocolError("header length runs past the payload")
    return k, payload[_HEAD.size:_HEAD.size + hlen], payload[_HEAD.size + hlen:]


def _decode(kind: int, payload: bytes, max_bytes: int) -> tuple[dict, dict]:
    _, h, body = _open(payload, max_bytes, (kind,))
    header = _json_object(h, "header")
    if header.get("body_sha256") != sha256_hex(body):
        raise ProtocolError("body checksum mismatch")
    try:
        # the arrays may not unpack to more than the payload limit (no zip bombs)
        arrays = unpack_arrays(body, max_bytes=max_bytes, max_arrays=4 * MAX_LAYERS)
    except ValueError as e:
        raise ProtocolError(str(e)) from None
    return header, arrays


def _json_object(data: bytes, what: str) -> dict:
    """JSON from the network: any failure, including a nesting bomb (RecursionError) or an
    integer of thousands of digits (ValueError), is a ProtocolError."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ProtocolError(f"{what} is not JSON ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return obj


def _field(header: dict, name: str, typ):
    v = header.get(name)
    if typ is int and isinstance(v, bool) or not isinstance(v, typ):
        raise ProtocolError(f"header field {name!r} missing or not {typ.__name__}")
    return v


def _counter(header: dict, name: str, lo: int = 0, hi: int = MAX_COUNTER) -> int:
    v = _field(header, name, int)
    if not lo <= v <= hi:
        raise ProtocolError(f"header field {name!r} = {v} outside {lo}..{hi}")
    return v


def _array(arrays: dict, name: str, dtype, ndim: int) -> np.ndarray:
    a = arrays.get(name)
    if a is None:
        raise ProtocolError(f"array {name!r} missing")
    if a.dtype != dtype or a.ndim != ndim:
        raise ProtocolError(f"array {name!r} is {a.dtype}[{a.ndim}d], expected {np.dtype(dtype)}[{ndim}d]")
    return np.ascontiguousarray(a)


# -- deltas -----------------------------------------------------------------------------------

@dataclass
class LayerDelta:
    """Touched rows of one layer: P[rows] += dP, g[rows] += dg, learned from `counts` samples."""
    rows: np.ndarray     # int32 [k], strictly increasing
    dP: np.ndarray       # float32 [k, d_in]
    dg: np.ndarray       # float32 [k]
    counts: np.ndarray   # float32 [k], > 0


@dataclass
class PrototypeDelta:
    device: str
    seq: int
    base_version: int
    layers: list[LayerDelta]
    # the model (ONNX sha256) the rows were learned on: another model of the same shapes (a
    # retrained one) must not take them. "" = not stated (deltas of older devices).
    model_sha256: str = ""
    # the version history base_version counts in (Release.history): a server with another history
    # (its database replaced) leaves the delta for the device to renumber and rebase. "" = not stated.
    history: str = ""

    @property
    def samples(self) -> float:
        return float(max((L.counts.max() for L in self.layers if len(L.counts)), default=0.0))


def encode_delta(d: PrototypeDelta, max_bytes: int = DEFAULT_MAX_PAYLOAD) -> bytes:
    check_name("device id", d.device)
    arrays = {}
    for i, L in enumerate(d.layers):
        arrays[f"rows{i}"] = np.asarray(L.rows, np.int32)
        arrays[f"dP{i}"] = np.asarray(L.dP, np.float32)
        arrays[f"dg{i}"] = np.asarray(L.dg, np.float32)
        arrays[f"counts{i}"] = np.asarray(L.counts, np.float32)
    header = {"device": d.device, "seq": int(d.seq), "base_version": int(d.base_version),
              "n_layers": len(d.layers)}
    if d.model_sha256:
        header["model_sha256"] = d.model_sha256
    if d.history:
        header["history"] = d.history
    return _encode(KIND_DELTA, header, arrays, max_bytes)


def split_delta(d: PrototypeDelta, max_bytes: int) -> list[list[LayerDelta]]:
    """The rows of `d` cut into groups, each group's layers encoding (with d's header, at any seq)
    within `max_bytes`: [d.layers] when it fits whole. Merging is per row and additive, so the
    groups, sent as deltas of their own, merge to what `d` would have. ProtocolError when a single
    row does not fit."""
    items = [(i, j) for i, L in enumerate(d.layers) for j in range(len(L.rows))]
    # measured at the largest seq and version a header can hold, so every part's real one fits
    probe = PrototypeDelta(d.device, MAX_COUNTER, MAX_COUNTER, d.layers, d.model_sha256, d.history)

    def part(sel) -> list[LayerDelta]:
        picks = [[] for _ in d.layers]
        for i, j in sel:
            picks[i].append(j)
        return [LayerDelta(L.rows[k], L.dP[k], L.dg[k], L.counts[k])
                for L, k in zip(d.layers, (np.asarray(p, np.int64) for p in picks))]

    def size(layers) -> int:
        probe.layers = layers
        return len(encode_delta(probe, max_bytes=MAX_COUNTER))

    groups = []

    def cut(sel) -> None:
        layers = part(sel)
        n = size(layers)
        if n <= max_bytes:
            groups.append(layers)
        elif len(sel) == 1:
            i, j = sel[0]
            raise ProtocolError(f"one row of layer {i} makes a {n}-byte delta, over the {max_bytes}-byte "
                                f"limit")
        else:
            cut(sel[:len(sel) // 2])
            cut(sel[len(sel) // 2:])

    if size(d.layers) <= max_bytes:
        return [d.layers]
    cut(items)
    return groups


def decode_delta(payload: bytes, max_bytes: int = DEFAULT_MAX_PAYLOAD) -> PrototypeDelta:
    """Structural checks only (types, shapes agree, finite, rows sorted, counts positive); the
    server checks the shapes against its model."""
    header, arrays = _decode(KIND_DELTA, payload, max_bytes)
    device = check_name("device id", _field(header, "device", str))
    seq = _counter(header, "seq")
    base = _counter(header, "base_version")
    n = _counter(header, "n_layers", 1, MAX_LAYERS)
    model = header.get("model_sha256", "")
    if not isinstance(model, str) or len(model) > 128:
        raise ProtocolError("header field 'model_sha256' is not a sha256")
    history = header.get("history", "")
    if not isinstance(history, str) or history and not _HISTORY_RE.match(history):
        raise ProtocolError("header field 'history' is not a history id")
    layers = []
    for i in range(n):
        rows = _array(arrays, f"rows{i}", np.int32, 1)
        dP = _array(arrays, f"dP{i}", np.float32, 2)
        dg = _array(arrays, f"dg{i}", np.float32, 1)
        counts = _array(arrays, f"counts{i}", np.float32, 1)
        k = len(rows)
        if dP.shape[0] != k or dg.shape != (k,) or counts.shape != (k,):
            raise ProtocolError(f"layer {i}: rows, dP, dg, counts disagree in length")
        if k and (rows[0] < 0 or np.any(np.diff(rows) <= 0)):
            raise ProtocolError(f"layer {i}: rows must be non-negative and strictly increasing")
        if not (np.all(np.isfinite(dP)) and np.all(np.isfinite(dg)) and np.all(np.isfinite(counts))):
            raise ProtocolError(f"layer {i}: non-finite values")
        if np.any(counts <= 0):
            raise ProtocolError(f"layer {i}: sample counts must be positive")
        layers.append(LayerDelta(rows, dP, dg, counts))
    return PrototypeDelta(device, seq, base, layers, model, history)


# -- releases ---------------------------------------------------------------------------------

@dataclass
class Release:
    """A prototype version published by the server: (P, g) for every layer."""
    version: int
    model_sha256: str                    # which model (ONNX file) these prototypes belong to
    protos: list[tuple[np.ndarray, np.ndarray]]
    merged: dict[str, int] = field(default_factory=dict)   # device -> highest seq merged so far
    created: float = 0.0
    # sha256 of the manifest JSON the server publishes: with a signed release, a device that pulls
    # its model takes only that manifest (its standardisation and class names are not in the ONNX
    # file the model sha256 names). "" = not stated (older servers).
    manifest_sha256: str = ""
    # The fleet it was made for (inside the signed bytes: a release signed for one fleet cannot be
    # replayed into another that shares the key) and the version history it belongs to (a new
    # history, after the server's database was replaced, starts again at version 0: devices follow
    # it instead of refusing its "older" versions). "" = not stated (older servers).
    fleet: str = ""
    history: str = ""


class Signer(Protocol):
    """Signs release payloads (edge_spl.signing.SigningKey)."""
    key_id: str

    def sign(self, message: bytes) -> bytes: ...


class Verifier(Protocol):
    """Checks release signatures (edge_spl.signing.VerifyKey)."""
    key_id: str

    def verify(self, message: bytes, signature: bytes) -> bool: ...


def encode_release(r: Release, max_bytes: int = DEFAULT_MAX_PAYLOAD, signer: Signer | None = None) -> bytes:
    """The release payload; with `signer`, wrapped with its signature (sign_release_payload)."""
    arrays = {}
    for i, (P, g) in enumerate(r.protos):
        arrays[f"P{i}"] = np.asarray(P, np.float32)
        arrays[f"g{i}"] = np.asarray(g, np.float32)
    header = {"version": int(r.version), "model_sha256": r.model_sha256, "n_layers": len(r.protos),
              "merged": {k: int(v) for k, v in r.merged.items()}, "created": float(r.created)}
    if r.manifest_sha256:
        header["manifest_sha256"] = r.manifest_sha256
    for name in ("fleet", "history"):
        if getattr(r, name):
            header[name] = getattr(r, name)
    payload = _encode(KIND_RELEASE, header, arrays, max_bytes)
    return payload if signer is None else sign_release_payload(payload, signer, max_bytes)


def sign_release_payload(payload: bytes, signer: Signer, max_bytes: int = DEFAULT_MAX_PAYLOAD) -> bytes:
    """Wrap an unsigned release payload in the signed envelope (see the module docstring)."""
    _open(payload, max_bytes, (KIND_RELEASE,))      # only a release gets signed, never a wrapper
    signature = bytes(signer.sign(RELEASE_SIGNING_CONTEXT + payload))
    key_id = str(signer.key_id)
    if not _KEY_ID_RE.match(key_id) or len(signature) != 64:
        raise ValueError(f"signer {signer!r} gave key id {key_id!r} and a {len(signature)}-byte "
                         f"signature; expected 16 hex digits and 64 bytes (Ed25519)")
    h = encode_json({"alg": SIGNATURE_ALG, "key_id": key_id, "signature": signature.hex()})
    out = _HEAD.pack(MAGIC, KIND_SIGNED_RELEASE, FORMAT, len(h)) + h + payload
    if len(out) > max_bytes:
        raise ProtocolError(f"payload is {len(out)} bytes, over the {max_bytes}-byte limit")
    return out


def is_signed_release(payload: bytes) -> bool:
    """Whether a release payload is in the signed envelope (says nothing of the signature)."""
    return len(payload) > _HEAD.size and payload[:4] == MAGIC and payload[4] == KIND_SIGNED_RELEASE


def _signed_inner(h: bytes, inner: bytes, verifier: Verifier | None) -> bytes:
    """The release payload inside a signed envelope; with `verifier`, only when its key signed
    exactly these bytes."""
    sig = _json_object(h, "signature header")
    if set(sig) != {"alg", "key_id", "signature"}:
        raise ProtocolError("signature header must hold exactly alg, key_id and signature")
    alg = _field(sig, "alg", str)
    if alg != SIGNATURE_ALG:
        raise ProtocolError(f"signature algorithm {alg[:20]!r}, expected {SIGNATURE_ALG!r}")
    key_id = _field(sig, "key_id", str)
    signature = _field(sig, "signature", str)
    if not _KEY_ID_RE.match(key_id) or not _SIGNATURE_RE.match(signature):
        raise ProtocolError("signature header: key_id must be 16 and signature 128 hex digits")
    if verifier is not None:
        if key_id != verifier.key_id:
            raise ProtocolError(f"release signed by key {key_id}, not by the trusted key {verifier.key_id}")
        if not verifier.verify(RELEASE_SIGNING_CONTEXT + inner, bytes.fromhex(signature)):
            raise ProtocolError(f"release signature of key {key_id} does not verify (forged or altered)")
    return inner


def decode_release(payload: bytes, max_bytes: int = DEFAULT_MAX_PAYLOAD,
                   verifier: Verifier | None = None) -> Release:
    """A release, signed or not. With `verifier`, only one signed by its key: an unsigned release,
    one signed by another key, or one whose signature does not cover exactly its bytes is a
    ProtocolError (checked before the release itself is unpacked). Without, the signature of a
    signed release is not checked."""
    kind, h, body = _open(payload, max_bytes, (KIND_RELEASE, KIND_SIGNED_RELEASE))
    if kind == KIND_SIGNED_RELEASE:
        payload = _signed_inner(h, body, verifier)
    elif verifier is not None:
        raise ProtocolError(f"release is not signed (only releases signed by key {verifier.key_id} "
                            f"are accepted)")
    header, arrays = _decode(KIND_RELEASE, payload, max_bytes)
    version = _counter(header, "version")
    sha = _field(header, "model_sha256", str)
    n = _counter(header, "n_layers", 1, MAX_LAYERS)
    merged = _field(header, "merged", dict)
    if not all(isinstance(k, str) and _NAME_RE.match(k) and isinstance(v, int)
               and not isinstance(v, bool) and 0 <= v <= MAX_COUNTER for k, v in merged.items()):
        raise ProtocolError("merged must map device ids to sequence numbers")
    created = header.get("created", 0.0)
    if isinstance(created, bool) or not isinstance(created, (int, float)) or not math.isfinite(created):
        raise ProtocolError("header field 'created' is not a finite number")
    protos = []
    for i in range(n):
        P = _array(arrays, f"P{i}", np.float32, 2)
        g = _array(arrays, f"g{i}", np.float32, 1)
        if g.shape[0] != P.shape[0]:
            raise ProtocolError(f"layer {i}: P has {P.shape[0]} rows, g has {g.shape[0]}")
        if not (np.all(np.isfinite(P)) and np.all(np.isfinite(g))):
            raise ProtocolError(f"layer {i}: non-finite values")
        protos.append((P, g))
    manifest_sha = header.get("manifest_sha256", "")
    if not isinstance(manifest_sha, str) or manifest_sha and not _SHA256_RE.match(manifest_sha):
        raise ProtocolError("header field 'manifest_sha256' is not a sha256")
    fleet, history = header.get("fleet", ""), header.get("history", "")
    if not isinstance(fleet, str) or fleet and not _NAME_RE.match(fleet):
        raise ProtocolError("header field 'fleet' is not a fleet name")
    if not isinstance(history, str) or history and not _HISTORY_RE.match(history):
        raise ProtocolError("header field 'history' is not a history id")
    return Release(version, sha, protos, dict(merged), float(created), manifest_sha, fleet, history)


# -- small JSON messages ----------------------------------------------------------------------

def encode_json(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_json(payload: bytes, max_bytes: int = 1 << 20) -> dict:
    if len(payload) > max_bytes:
        raise ProtocolError(f"JSON payload of {len(payload)} bytes is over {max_bytes}")
    return _json_object(payload, "payload")


# A connected device says its status at least this often (seconds), even when its stream is idle;
# an "online" status much older than that is a device gone without a will (edge-spl status).
STATUS_HEARTBEAT = 60.0


def status_payload(device: str, online: bool, version: int = -1, samples: int = 0,
                   outbox: int = 0, at: float | None = None, lost: bool = False) -> bytes:
    """A device's health record: its release version (-1: none yet), samples seen, deltas in its
    outbox, and when it said so (unix seconds, the device's clock). lost=True marks the last will,
    which the broker publishes when the device vanishes: its time is when the device connected."""
    obj = {"device": device, "online": online, "version": version, "samples": samples,
           "outbox": outbox, "time": round(time.time() if at is None else at, 3)}
    if lost:
        obj["lost"] = True
    return encode_json(obj)


def decode_status(payload: bytes) -> dict:
    """A status as status_payload writes it (anything else is a ProtocolError: any client may
    publish on a status topic the ACL lets it reach). "time" is None when absent (older devices)."""
    obj = decode_json(payload, max_bytes=4096)
    check_name("device id", _field(obj, "device", str))
    if not isinstance(obj.get("online"), bool):
        raise ProtocolError("status field 'online' missing or not a boolean")
    lost = obj.get("lost", False)
    if not isinstance(lost, bool):
        raise ProtocolError("status field 'lost' is not a boolean")
    out = {"device": obj["device"], "online": obj["online"], "version": _counter(obj, "version", -1),
           "samples": _counter(obj, "samples"), "outbox": _counter(obj, "outbox"), "time": None,
           "lost": lost}
    t = obj.get("time")
    if t is not None:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < 1e11:
            raise ProtocolError("status field 'time' is not a time in unix seconds")
        out["time"] = float(t)
    return out


def ack_payload(device: str, seq: int, accepted: bool, reason: str, version: int) -> bytes:
    return encode_json({"device": device, "seq": seq, "accepted": accepted, "reason": reason,
                        "version": version})


def decode_ack(payload: bytes) -> dict:
    """An ack as the server writes it; anything else is a ProtocolError, so a forged ack cannot
    put odd types into the device's bookkeeping. seq is -1 for a delta that did not decode."""
    obj = decode_json(payload, max_bytes=4096)
    check_name("device id", _field(obj, "device", str))
    if not isinstance(obj.get("accepted"), bool):
        raise ProtocolError("ack field 'accepted' missing or not a boolean")
    _counter(obj, "seq", -1)
    _counter(obj, "version")
    _field(obj, "reason", str)
    return {k: obj[k] for k in ("device", "seq", "accepted", "reason", "version")}
