"""`edge-spl status`: the fleet as a table, from the broker's retained messages: every device's
last status (online, silent, offline or lost -- the broker publishes a device's last will when it
vanishes --, release version, samples seen, outbox length, age) and the fleet's current release."""
from __future__ import annotations

import json
import threading
import time

from edge_spl.errors import ProtocolError
from edge_spl.mqtt_auth import MqttAuth
from edge_spl.mqtt_session import short_session
from edge_spl.protocol import STATUS_HEARTBEAT, Topics, decode_release, decode_status, is_signed_release

MAX_DEVICES = 100_000   # statuses kept; a flood of forged topics must not take the memory


def collect(broker, fleet: str, auth: MqttAuth, wait: float, timeout: float = 10.0, verify_key=None) -> dict:
    """{"release": {...} | None, "devices": {id: status}, "malformed": n}, from what arrives
    within `wait` seconds of subscribing (retained messages come at once). With `verify_key`, a
    release not signed by it counts as malformed."""
    topics = Topics(fleet)
    lock = threading.Lock()
    seen: dict = {"release": None, "devices": {}, "malformed": 0}

    def on_message(client, userdata, msg):
        with lock:
            try:
                if msg.topic == topics.release:
                    r = decode_release(bytes(msg.payload), verifier=verify_key)
                    signed = is_signed_release(bytes(msg.payload))
                    seen["release"] = {"version": r.version, "model_sha256": r.model_sha256,
                                       "devices_merged": len(r.merged), "created": r.created,
                                       "signed": signed, "verified": signed and verify_key is not None}
                    return
                device = topics.device_of(msg.topic, "status")
                if device is None or not msg.payload:   # an empty retained message clears a status
                    return
                s = decode_status(bytes(msg.payload))
                if s["device"] != device:
                    raise ProtocolError(f"status of {s['device']!r} on the topic of {device!r}")
                if device in seen["devices"] or len(seen["devices"]) < MAX_DEVICES:
                    seen["devices"][device] = s
            except ProtocolError:
                seen["malformed"] += 1

    def subscribe(client):
        client.subscribe([(topics.all_status, 1), (topics.release, 1)])

    with short_session(broker, auth, "status", timeout, on_connect=subscribe) as client:
        client.on_message = on_message
        time.sleep(wait)
    with lock:
        return {"release": seen["release"], "devices": dict(seen["devices"]), "malformed": seen["malformed"]}


# online: said so within a few heartbeats; silent: says online, but has not for longer (gone
# without a will: the broker died first, or the network); offline: said goodbye; lost: its will
STATES = ("online", "silent", "offline", "lost")
SILENT_AFTER = 3 * STATUS_HEARTBEAT + 30


def _state(s: dict, now: float) -> str:
    if s["online"]:
        return "silent" if s["time"] is not None and now - s["time"] > SILENT_AFTER else "online"
    return "lost" if s["lost"] else "offline"


def _age(t, now: float) -> str:
    if t is None:
        return "-"
    s = now - t
    if s < -5:
        return "clock ahead"
    s = max(s, 0.0)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.1f} h ago"


def table(fleet: str, broker, found: dict, now: float) -> str:
    host, port = broker
    r = found["release"]
    lines = []
    if r is None:
        lines.append(f"fleet {fleet} on {host}:{port}: no release (is the server running, and is --fleet right?)")
    else:
        signed = ("signed, verified" if r["verified"] else "signed, not checked: give --verify-key" if r["signed"]
                  else "unsigned")
        lines.append(f"fleet {fleet} on {host}:{port}: release v{r['version']} ({signed}, model "
                     f"{r['model_sha256'][:12]}, deltas of {r['devices_merged']} device{'' if r['devices_merged'] == 1 else 's'} merged, "
                     f"{_age(r['created'] or None, now)})")
    devices = found["devices"]
    if devices:
        rows = [("device", "state", "version", "samples", "outbox", "updated")]
        for name in sorted(devices):
            s = devices[name]
            known = s["version"] >= 0
            behind = r is not None and known and s["version"] < r["version"]
            rows.append((name, _state(s, now),
                         (f"v{s['version']}" + (" (behind)" if behind else "")) if known else "-",
                         str(s["samples"]) if known or s["samples"] else "-",
                         str(s["outbox"]) if known or s["outbox"] else "-",
                         "-" if s["lost"] else _age(s["time"], now)))
        widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
        for row in rows:
            lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
        states = [_state(s, now) for s in devices.values()]
        counts = ", ".join(f"{states.count(k)} {k}" for k in STATES if states.count(k))
        lines.append(f"{len(devices)} devices: {counts}")
    else:
        lines.append("no device has reported a status on this fleet")
    if found["malformed"]:
        lines.append(f"ignored {found['malformed']} malformed status or release messages")
    return "\n".join(lines)


def run(args) -> int:
    auth = MqttAuth.from_args(args)
    verify_key = None
    if args.verify_key:
        from edge_spl.signing import load_verify_key

        verify_key = load_verify_key(args.verify_key, "--verify-key")
    found = collect(args.broker, args.fleet, auth, args.wait, verify_key=verify_key)
    if args.json:
        print(json.dumps({"fleet": args.fleet, **found}, indent=1, sort_keys=True))
    else:
        print(table(args.fleet, args.broker, found, time.time()))
    return 0 if found["release"] is not None or found["devices"] else 1
