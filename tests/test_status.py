"""Device status (retained, with the broker's last will) and `edge-spl status`, on the real broker
with the real server and real device processes."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_spl.errors import ProtocolError
from edge_spl.protocol import Topics, decode_status, status_payload
from edge_spl.server.service import Server

from test_device_cli import write_csv

EDGE_SPL = [sys.executable, "-m", "edge_spl"]


def test_status_round_trip_and_rejections():
    s = decode_status(status_payload("pi-1", True, 7, 1200, 2, at=1.7e9))
    assert s == {"device": "pi-1", "online": True, "version": 7, "samples": 1200, "outbox": 2, "time": 1.7e9,
                 "lost": False}
    assert decode_status(status_payload("pi-1", False, lost=True))["lost"] is True
    assert abs(decode_status(status_payload("pi-1", False))["time"] - time.time()) < 60
    old = json.dumps({"device": "d", "online": False, "version": -1, "samples": 0, "outbox": 0}).encode()
    assert decode_status(old)["time"] is None                  # devices from before the time field
    base = {"device": "d", "online": True, "version": 1, "samples": 3, "outbox": 0, "time": 1.0}
    for bad in ({"device": "a/b"}, {"online": 1}, {"version": -2}, {"samples": True}, {"outbox": 1.5},
                {"time": "now"}, {"time": -1}, {"device": None}, {"lost": "yes"}):
        with pytest.raises(ProtocolError):
            decode_status(json.dumps({**base, **bad}).encode())
    for junk in (b"", b"[1]", b"\xff\xfe", b"{" * 5000):
        with pytest.raises(ProtocolError):
            decode_status(junk)


def status_cli(broker, fleet, *extra):
    return subprocess.run(EDGE_SPL + ["status", "--broker", f"{broker[0]}:{broker[1]}", "--fleet", fleet,
                                      "--wait", "1", *extra], capture_output=True, text=True, timeout=60)


def device(broker, fleet, name, tmp_path, source, *extra):
    return subprocess.Popen(EDGE_SPL + ["device", "--broker", f"{broker[0]}:{broker[1]}", "--fleet", fleet,
                                        "--id", name, "--source", source, "--state", str(tmp_path / name),
                                        "--label", "y", "--sync-every", "10", "--quiet", "--wait", "20", *extra],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(cond, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def rows(out: str) -> dict:
    """device -> the cells of its table row (cells are at least two spaces apart)."""
    lines = out.splitlines()
    head = next((i for i, line in enumerate(lines) if line.startswith("device")), None)
    if head is None:
        return {}
    cells = [re.split(r"\s{2,}", line.strip()) for line in lines[head + 1:]]
    return {c[0]: c for c in cells if len(c) == 6}


def states(broker, fleet) -> dict:
    return {k: v[1] for k, v in rows(status_cli(broker, fleet).stdout).items()}


def test_status_shows_online_offline_and_killed_devices(tmp_path, tiny_model_dir, mqtt_broker, fleet):
    server = Server(mqtt_broker, tiny_model_dir, str(tmp_path / "srv"), fleet=fleet, merge_every=0.2).start()
    try:
        assert "no device" in status_cli(mqtt_broker, fleet).stdout

        # done: streams a file to the end and says goodbye (offline, with its figures)
        done = device(mqtt_broker, fleet, "done", tmp_path, write_csv(tmp_path / "a.csv", n=40))
        assert done.wait(60) == 0, done.stderr.read()
        # live: stdin kept open; killed: SIGKILLed, so the broker publishes its last will
        live = device(mqtt_broker, fleet, "live", tmp_path, "-")
        killed = device(mqtt_broker, fleet, "killed", tmp_path, "-")
        header = ",".join(f"f{i}" for i in range(8)) + ",y\n"
        for p in (live, killed):
            p.stdin.write(header + "".join(f"{','.join(['0.5'] * 8)},c{i % 3}\n" for i in range(25)))
            p.stdin.flush()
        wait_for(lambda: {k: v for k, v in states(mqtt_broker, fleet).items() if k != "done"}
                 == {"live": "online", "killed": "online"}, "live and killed to report online")
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        # the broker notices after 1.5 keepalives (30 s), or at once when the socket closes
        wait_for(lambda: states(mqtt_broker, fleet).get("killed") == "lost",
                 "the last will of the killed device", timeout=60)

        got = status_cli(mqtt_broker, fleet)
        assert got.returncode == 0, got.stderr
        table = rows(got.stdout)
        assert table["done"][:2] == ["done", "offline"]
        assert table["done"][3] == "40" and table["done"][2].startswith("v")   # its last health record
        assert table["done"][5].endswith("s ago")
        # its goodbye says what it ended with, after the last release covered its outbox
        summary = json.loads((tmp_path / "done" / "summary.json").read_text())
        assert table["done"][2].split()[0] == f"v{summary['version']}" and table["done"][4] == "0" == str(summary["outbox"])
        assert table["live"][1] == "online" and int(table["live"][3]) >= 20
        assert table["killed"][1:3] == ["lost", "-"] and table["killed"][5] == "-"   # the will has no figures
        assert f"release v{server.version}" in got.stdout.splitlines()[0]
        assert "3 devices: 1 online, 1 offline, 1 lost" in got.stdout

        # a forged status is ignored and counted, not shown
        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        c.connect(*mqtt_broker)
        c.loop_start()
        t = Topics(fleet)
        c.publish(t.status("forged"), b'{"device": "forged", "online": "yes"}', qos=1, retain=True).wait_for_publish(10)
        c.publish(t.status("other"), status_payload("someone-else", True), qos=1, retain=True).wait_for_publish(10)
        out = status_cli(mqtt_broker, fleet, "--json")
        found = json.loads(out.stdout)
        assert set(found["devices"]) == {"done", "live", "killed"} and found["malformed"] == 2
        assert found["release"]["version"] == server.version and found["release"]["signed"] is False
        for topic in (t.status("forged"), t.status("other")):
            c.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)
        c.loop_stop()
        c.disconnect()

        live.stdin.close()
        assert live.wait(60) == 0
    finally:
        for p in ("live", "killed"):
            proc = locals().get(p)
            if proc is not None and proc.poll() is None:
                proc.kill()
        server.stop()
        for topic in [Topics(fleet).status(n) for n in ("done", "live", "killed")]:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
            c.connect(*mqtt_broker)
            c.loop_start()
            c.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)
            c.loop_stop()
            c.disconnect()


def test_status_errors_are_one_line(tmp_path):
    from conftest import free_port

    got = subprocess.run(EDGE_SPL + ["status", "--broker", f"127.0.0.1:{free_port()}"], capture_output=True,
                         text=True, timeout=60)
    assert got.returncode == 2 and len(got.stderr.strip().splitlines()) == 1
    assert "cannot reach MQTT broker" in got.stderr and "Traceback" not in got.stderr


def test_an_online_status_that_stopped_beating_is_silent():
    from edge_spl.cli.status import SILENT_AFTER, table

    now = time.time()
    found = {"release": None, "malformed": 0, "devices": {
        "fresh": decode_status(status_payload("fresh", True, 3, 10, 0, at=now - 5)),
        "gone": decode_status(status_payload("gone", True, 3, 10, 0, at=now - SILENT_AFTER - 1)),
        "bye": decode_status(status_payload("bye", False, 3, 10, 0, at=now - 9)),
        "will": decode_status(status_payload("will", False, lost=True, at=now - 99))}}
    got = {k: v[1] for k, v in rows(table("f", ("h", 1), found, now)).items()}
    assert got == {"fresh": "online", "gone": "silent", "bye": "offline", "will": "lost"}
