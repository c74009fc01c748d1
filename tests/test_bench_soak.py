"""`edge-spl bench soak`: a tiny soak end to end on a mosquitto it starts itself (3 devices, 18 s
of faults, the first a broker restart): every figure is there, no delta is lost or merged twice.
And the audit itself: it does find a lost delta, one merged twice, and reads reconnect times."""
from __future__ import annotations

import json
import time

import pytest
from conftest import GAS_DIR, mosquitto_binary

from edge_spl.cli import main
from edge_spl.cli.bench import soak_audit as A

KEYS = ("deltas_made", "deltas_merged", "deltas_lost", "duplicates_merged", "max_reconnect_s", "faults",
        "broker_restarts", "per_device", "duplicate_checks", "drained", "unexpected_exits")


@pytest.mark.slow
def test_tiny_soak_loses_nothing_and_merges_nothing_twice(tmp_path, capsys):
    if mosquitto_binary() is None:
        pytest.fail("no mosquitto binary: apt-get install mosquitto")
    t0 = time.monotonic()
    rc = main(["bench", "soak", "--devices", "3", "--minutes", "0.3", "--seed", "1", "--data", GAS_DIR,
               "--out", str(tmp_path)])
    res = json.loads((tmp_path / "bench_soak.json").read_text())
    assert all(k in res for k in KEYS), sorted(set(KEYS) - set(res))
    assert res["deltas_lost"] == 0, res["lost_seqs"]
    assert res["duplicates_merged"] == 0, res["duplicate_checks"]
    assert rc == 0
    assert res["faults"]["broker_restart"] >= 1
    assert set(res["faults"]) == {"broker_restart", "device_restart", "server_restart"}
    assert res["max_reconnect_s"] is not None and res["reconnect_incomplete"] == 0, res["broker_restarts"]
    assert res["deltas_made"] > 0
    assert res["deltas_merged"] + res["deltas_in_outbox_unmerged"] == res["deltas_made"]
    assert res["versions_contiguous"] and res["versions"] >= 1
    assert len(res["per_device"]) == 3
    out = capsys.readouterr().out
    assert "deltas_lost" in out and "duplicates_merged" in out
    assert time.monotonic() - t0 < 90


def _device(made, outbox=(), made_ever=0):
    return {"made": made, "outbox": list(outbox), "made_ever": made_ever, "samples": 0, "restarts": 0}


def _store(merged, versions):
    return {"merged": merged, "versions": versions}


NO_LOGS = {"merged": 0, "versions_logged_twice": [], "failed_rounds": 0}


def test_audit_counts_made_merged_and_waiting():
    res = A.audit({"a": _device(3, outbox=[3]), "b": _device(2)},
                  _store({"a": {1: 1, 2: 1}, "b": {1: 1, 2: 1}}, [(0, None, 0), (1, 0, 3), (2, 1, 1)]),
                  dict(NO_LOGS, merged=4), {"deltas_merged": 4})
    assert (res["deltas_made"], res["deltas_merged"], res["deltas_lost"], res["duplicates_merged"]) == (5, 4, 0, 0)
    assert res["deltas_in_outbox_unmerged"] == 1 and res["outbox_unmerged_seqs"] == {"a": [3]}
    assert res["versions"] == 2 and res["versions_contiguous"]


def test_audit_finds_a_lost_delta():
    # seq 2 was made (next_seq says 3 were), is not merged and no longer in the outbox
    res = A.audit({"a": _device(3)}, _store({"a": {1: 1, 3: 1}}, [(0, None, 0), (1, 0, 2)]), NO_LOGS, {})
    assert res["deltas_lost"] == 1 and res["lost_seqs"] == {"a": [2]}


def test_audit_counts_what_a_state_forgot_as_made():
    # the saved state went back from next_seq 5 to 3 (seen after a SIGKILL): 4 was made, never merged
    res = A.audit({"a": _device(2, made_ever=4)}, _store({"a": {1: 1, 2: 1, 3: 1}}, [(0, None, 0), (1, 0, 3)]),
                  NO_LOGS, {})
    assert res["deltas_made"] == 4 and res["lost_seqs"] == {"a": [4]}
    assert res["merged_but_not_made"] == {"a": [3]}


@pytest.mark.parametrize("where", ["rows", "versions", "logs", "counters"])
def test_audit_finds_a_delta_merged_twice(where):
    merged = {"a": {1: 2 if where == "rows" else 1, 2: 1}}
    versions = [(0, None, 0), (1, 0, 3 if where == "versions" else 2)]
    logs = dict(NO_LOGS, merged=3 if where == "logs" else 2)
    counters = {"deltas_merged": 3 if where == "counters" else 2}
    res = A.audit({"a": _device(2)}, _store(merged, versions), logs, counters)
    assert res["duplicates_merged"] == 1, res["duplicate_checks"]


def test_log_scan_reads_connects_as_they_are_written(tmp_path):
    log = tmp_path / "x.log"
    log.write_bytes(b"2026-01-02 03:04:05,250 edge_spl.device.sync INFO connected to 127.0.0.1:1 (fleet f)\n"
                    b"2026-01-02 03:04:06,000 edge_spl.device.sync WARNING lost the broker (x); reconnecting\n"
                    b"2026-01-02 03:04:07,500 edge_spl.server DEBUG connected to 127.0.0.1:1, subs")
    scan = A.LogScan()
    t0 = time.mktime(time.strptime("2026-01-02 03:04:05", "%Y-%m-%d %H:%M:%S"))
    assert scan.connects(str(log)) == [t0 + 0.25]        # the last line is not complete yet
    with open(log, "ab") as f:
        f.write(b"cribed to x\n")
    assert scan.connects(str(log)) == [t0 + 0.25, t0 + 2.5]
    assert scan.first_connect_after(str(log), t0 + 1) == t0 + 2.5
    assert scan.first_connect_after(str(log), t0 + 3) is None
