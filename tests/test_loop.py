"""The whole loop in real processes on a slice of the real gas drift data: pretrain -> ONNX ->
server + devices over a real broker (mosquitto, and the embedded amqtt broker) -> a device adopts
a prototype version that the server made from device deltas."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def run_demo(out, gas_dir, *extra, timeout=300):
    cmd = [sys.executable, "-m", "edge_spl", "demo", "--data", gas_dir, "--out", str(out),
           "--devices", "2", "--limit", "60", "--epochs", "15", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def check_loop(out):
    res = json.loads((out / "demo.json").read_text())
    assert [b["batch"] for b in res["batches"]] == [2, 3, 4, 5, 6]
    assert all(b["n"] == 60 for b in res["batches"])
    for key in ("mean_frozen_acc", "mean_adapted_acc", "versions_published", "deltas_merged"):
        assert key in res
    assert res["deltas_merged"] >= 2 and res["versions_published"] >= 1
    # the server made versions >= 1 from device deltas ...
    db = sqlite3.connect(out / "server" / "server.db")
    made = {v for (v,) in db.execute("SELECT version FROM versions WHERE version > 0 AND n_deltas > 0")}
    db.close()
    assert made
    # ... and every device adopted at least one of them
    for k in range(2):
        summary = json.loads((out / "devices" / f"dev{k}" / "summary.json").read_text())
        assert set(summary["versions_adopted"]) & made, summary
        assert summary["samples"] == 150
    assert (out / "demo.png").stat().st_size > 10_000


def test_loop_with_mosquitto(tmp_path, gas_dir, mqtt_broker):
    host, port = mqtt_broker
    r = run_demo(tmp_path, gas_dir, "--broker", f"{host}:{port}")
    assert r.returncode == 0, r.stderr[-3000:]
    check_loop(tmp_path)
    assert "mean" in r.stdout and "demo.json" in r.stdout


def test_loop_with_embedded_broker(tmp_path, gas_dir):
    r = run_demo(tmp_path, gas_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    check_loop(tmp_path)


def test_demo_without_data_says_where_to_get_it(tmp_path):
    r = subprocess.run([sys.executable, "-m", "edge_spl", "demo", "--data", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "batch1.dat missing" in r.stderr and "Gas Sensor Array Drift" in r.stderr


def test_demo_with_unreachable_broker_fails_cleanly(tmp_path, gas_dir):
    r = subprocess.run([sys.executable, "-m", "edge_spl", "demo", "--data", gas_dir, "--out",
                        str(tmp_path), "--broker", "127.0.0.1:1", "--epochs", "1", "--limit", "5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "127.0.0.1:1" in r.stderr.strip().splitlines()[-1]


def test_demo_plot_curve_is_a_trailing_mean_without_edge_dips():
    from edge_spl.cli.demo import trailing_mean

    v = np.array([1, 0, 1, 1, 0, 1, 1, 1], float)
    want = [np.mean(v[max(0, i - 2):i + 1]) for i in range(len(v))]
    np.testing.assert_allclose(trailing_mean(v, 3), want)
    assert trailing_mean(np.ones(50), 100).min() == 1.0      # all right stays 100% to the last point
