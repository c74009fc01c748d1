"""The device's durable state, so a reboot loses neither learning nor unsent deltas.

STATE_DIR/device-state.bin is one file, replaced atomically on every save:
    b"EDGE-SPL-DEVICE-STATE <format> <sha256 of the rest>\n" + npz of plain arrays
holding the live and base prototypes, per-row counts, the outbox (each outstanding delta as its
wire encoding, uint8), running input mean/variance, the head's running squared gradients, the
previous input (for negatives) and a
JSON record (versions, sequence numbers, sample count, RNG states as ints).

A device that pulled its model from the broker also keeps manifest.json, model.onnx and
prototypes.npz here, so it restarts without the broker.

Each save first makes the file it replaces (when its checksum holds) device-state.bin.prev, a hard
link, so no extra write. The atomic replace already means a crash or SIGKILL never leaves a torn
file; .prev is for a file damaged afterwards (a worn SD card, a stray truncate): load_state then
warns and loads .prev, losing only the learning since that one save.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np

from edge_spl.errors import ModelError, ProtocolError
from edge_spl.files import atomic_write_bytes, pack_arrays, sha256_hex, unpack_arrays
from edge_spl.manifest import MANIFEST_FILE, ExportedModel
from edge_spl.protocol import decode_delta, encode_delta

from .learner import FFLearner

log = logging.getLogger("edge_spl.device.state")

STATE_FILE = "device-state.bin"
PREV_FILE = STATE_FILE + ".prev"   # the save before the last one
FORMAT = 1
_MAGIC = b"EDGE-SPL-DEVICE-STATE"


class _Damaged(Exception):
    """The file is not what save_state wrote (empty, truncated, corrupt): try the previous save."""


def state_path(state_dir: str) -> str:
    return os.path.join(state_dir, STATE_FILE)


def save_state(learner: FFLearner, state_dir: str) -> None:
    arrays = {"mean": learner.mean_, "var": learner.var_, "prev_z": learner.prev_z_,
              "vP": learner.vP_, "vg": learner.vg_,
              "replay_u": learner.replay_u_, "replay_y": learner.replay_y_}
    for i, ((P, g), (bP, bg), c) in enumerate(zip(learner.protos_, learner.base_, learner.counts_)):
        arrays.update({f"P{i}": P, f"g{i}": g, f"bP{i}": bP, f"bg{i}": bg, f"counts{i}": c})
    for k, dlt in enumerate(learner.outstanding_):
        arrays[f"out{k}"] = np.frombuffer(encode_delta(dlt), np.uint8)
    meta = {
        "format": FORMAT,
        "device_id": learner.device_id,
        "model_sha256": learner.manifest.onnx_sha256,
        "base_version": learner.base_version_,
        "next_seq": learner.next_seq_,
        "n_samples": learner.n_samples_,
        "head_steps": learner.head_steps_,
        "replay_n": learner.replay_n_,
        "has_prev": learner.has_prev_,
        "n_outstanding": len(learner.outstanding_),
        "rng": learner.rng_.bit_generator.state,   # PCG64: plain (big) ints, JSON keeps them exact
        "replay_rng": learner.replay_rng_,         # the replay picks' SplitMix64 state, 0..2**64-1
        "base_history": learner.base_history_,
        "settled": {str(q): v for q, v in learner.settled_.items()},
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    body = pack_arrays(arrays)
    head = b"%s %d %s\n" % (_MAGIC, FORMAT, sha256_hex(body).encode())
    path = state_path(state_dir)
    _keep_previous(path)
    atomic_write_bytes(path, head + body)


def _keep_previous(path: str) -> None:
    """Make PATH.prev the current PATH before PATH is replaced. A damaged PATH is not kept: it
    would push out a good .prev."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        _check(data, path)
    except (FileNotFoundError, _Damaged, ModelError):
        return
    prev = os.path.join(os.path.dirname(path), PREV_FILE)
    # ".tmp-": what lock_folder sweeps, should a crash leave the link behind
    tmp = os.path.join(os.path.dirname(path), f".tmp-prev-{os.getpid()}")
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.link(path, tmp)
        os.replace(tmp, prev)   # the folder is fsynced after the replace of PATH that follows
    except OSError:             # no hard links here (FAT): a copy
        atomic_write_bytes(prev, data)


def load_state(learner: FFLearner, state_dir: str) -> bool:
    """Restore `learner` from STATE_DIR. False when there is no saved state yet. A damaged
    (corrupt, truncated) device-state.bin is logged and the previous save, .prev, loaded instead;
    ModelError when both are damaged, or the state is of another format, model or device."""
    path = state_path(state_dir)
    prev = os.path.join(state_dir, PREV_FILE)
    if not os.path.isfile(path) and not os.path.isfile(prev):
        return False
    try:
        arrays, meta = _read(path)
    except _Damaged as e:
        if not os.path.isfile(prev):
            raise ModelError(f"{path}: {e} (delete it to start afresh)") from None
        try:
            arrays, meta = _read(prev)
        except _Damaged as e2:
            raise ModelError(f"{path}: {e}; {prev}: {e2}; delete both to start afresh") from None
        log.warning("%s: %s; loading the previous save %s instead (the learning since that save "
                    "is lost)", path, e, prev)
        path = prev
    try:
        _restore(learner, arrays, meta, path)
    except ModelError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError, ProtocolError) as e:
        raise ModelError(f"{path}: unreadable state ({type(e).__name__}: {e})") from None
    return True


def _read(path: str) -> tuple[dict, dict]:
    """The arrays and JSON record of a state file; _Damaged when it is not what save_state wrote."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise _Damaged("missing") from None
    body = _check(data, path)
    try:
        arrays = unpack_arrays(body)
        return arrays, json.loads(arrays["meta"].tobytes())
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise _Damaged(f"unreadable state ({type(e).__name__}: {e})") from None


def _check(data: bytes, path: str) -> bytes:
    """The body of a state file whose header and checksum hold."""
    if not data:
        raise _Damaged("empty file, the state file is truncated")
    nl = data.find(b"\n")
    parts = data[:nl].split(b" ") if 0 < nl < 200 else []
    if len(parts) != 3 or parts[0] != _MAGIC:
        raise _Damaged("not an edge-spl device state file, or one truncated in its header")
    if parts[1] != str(FORMAT).encode():
        raise ModelError(f"{path}: state format {parts[1].decode(errors='replace')}, this edge-spl reads {FORMAT}")
    body = data[nl + 1:]
    if sha256_hex(body).encode() != parts[2]:
        raise _Damaged("checksum mismatch, the state file is corrupt or truncated")
    return body


def _restore(learner: FFLearner, arrays: dict, meta: dict, path: str) -> None:
    if meta.get("format") != FORMAT:
        raise ModelError(f"{path}: state format {meta.get('format')!r}, this edge-spl reads {FORMAT}")
    if meta["model_sha256"] != learner.manifest.onnx_sha256:
        raise ModelError(f"{path}: this state belongs to model {meta['model_sha256'][:12]}, not to the "
                         f"model being run ({learner.manifest.onnx_sha256[:12]}); use another --state folder")
    if meta["device_id"] != learner.device_id:
        raise ModelError(f"{path}: this state belongs to device {meta['device_id']!r}, not "
                         f"{learner.device_id!r}; use another --state folder")

    def get(name, like):
        a = arrays[name]
        if a.dtype != np.float32 or a.shape != like.shape or not np.all(np.isfinite(a)):
            raise ModelError(f"{path}: array {name} is {a.dtype}{list(a.shape)}, expected "
                             f"finite float32{list(like.shape)}")
        return a

    # check everything before touching the learner, so a bad file leaves it as it was
    protos = [(get(f"P{i}", P), get(f"g{i}", g)) for i, (P, g) in enumerate(learner.protos_)]
    base = [(get(f"bP{i}", P).copy(), get(f"bg{i}", g).copy()) for i, (P, g) in enumerate(learner.protos_)]
    counts = [get(f"counts{i}", c) for i, c in enumerate(learner.counts_)]
    mean, var, prev_z = get("mean", learner.mean_), get("var", learner.var_), get("prev_z", learner.prev_z_)
    vP, vg = get("vP", learner.vP_), get("vg", learner.vg_)
    outstanding = [decode_delta(arrays[f"out{k}"].tobytes()) for k in range(int(meta["n_outstanding"]))]
    rng = np.random.default_rng()
    rng.bit_generator.state = meta["rng"]
    # saved since the replay picks moved into the head kernel; an older file starts the stream
    # from the seed
    replay_rng = meta.get("replay_rng", learner.seed)
    if not isinstance(replay_rng, int) or not 0 <= replay_rng < 1 << 64:
        raise ModelError(f"{path}: replay_rng {replay_rng!r} is not a 64-bit unsigned int")
    # (both saved since version histories and acks count; older files have neither)
    history = meta.get("base_history", "")
    settled = meta.get("settled", {})
    if not isinstance(history, str) or len(history) > 32 or not isinstance(settled, dict) or not all(
            isinstance(q, str) and q.isdigit() and isinstance(v, int) and not isinstance(v, bool) and v >= -1
            for q, v in settled.items()):
        raise ModelError(f"{path}: base_history or settled acks are malformed")
    # the replay buffer is a cache of recent labelled inputs: kept when it fits this learner's
    # settings, else started afresh (a changed --replay-size is not an error)
    ru, ry = arrays.get("replay_u"), arrays.get("replay_y")
    replay_n = int(meta.get("replay_n", 0))
    if (ru is None or ry is None or ru.shape != learner.replay_u_.shape or ry.shape != learner.replay_y_.shape
            or ry.dtype != np.int64):
        ru, ry, replay_n = None, None, 0
    else:
        ru = get("replay_u", learner.replay_u_)
        if replay_n < 0 or np.any((ry < 0) | (ry >= learner.sizes[-1])):
            raise ModelError(f"{path}: replay labels or count out of range")

    # in place: the session is fed these very arrays
    for (P, g), (sP, sg) in zip(learner.protos_, protos):
        P[...] = sP
        g[...] = sg
    for c, sc in zip(learner.counts_, counts):
        c[...] = sc
    learner.mean_[...] = mean
    learner.var_[...] = var
    learner.prev_z_[...] = prev_z
    learner.vP_[...] = vP
    learner.vg_[...] = vg
    learner.head_steps_ = int(meta["head_steps"])
    if ru is not None:
        learner.replay_u_[...] = ru
        learner.replay_y_[...] = ry
    else:
        learner.replay_u_[...] = 0.0
    learner.replay_n_ = replay_n
    learner.base_ = base
    learner.outstanding_ = outstanding
    learner.base_version_ = int(meta["base_version"])
    learner.base_history_ = history
    learner.settled_ = {int(q): v for q, v in settled.items()}
    learner.next_seq_ = int(meta["next_seq"])
    learner.n_samples_ = int(meta["n_samples"])
    learner.has_prev_ = bool(meta["has_prev"])
    learner.rng_ = rng
    learner.replay_rng_ = replay_rng


def save_model(exported: ExportedModel, state_dir: str) -> None:
    exported.save(state_dir)


def load_model(state_dir: str) -> ExportedModel | None:
    """The model kept in STATE_DIR by an earlier run that pulled it, or None."""
    if not os.path.isfile(os.path.join(state_dir, MANIFEST_FILE)):
        return None
    return ExportedModel.load(state_dir)
