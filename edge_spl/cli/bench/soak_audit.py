"""What `edge-spl bench soak` reads back: the durable records its processes left (each device's
saved state, the server's database, the server's counters and every process's log), and the
figures and table made from them. Nothing here trusts what a process said while it ran."""
from __future__ import annotations

import json
import os
import re
import sqlite3
import time

from edge_spl.device.learner import FFLearner
from edge_spl.device.state import load_state
from edge_spl.manifest import ExportedModel

# edge_spl.cli.main's log format, "%(asctime)s %(name)s %(levelname)s %(message)s": a device logs
# this at INFO on every (re)connect (device/sync.py), the server at DEBUG (server/service.py,
# which is why the soak runs it with -v)
_CONNECTED = re.compile(rb"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) edge_spl\.(?:server|device\.sync) "
                        rb"(?:DEBUG|INFO) connected to ")
_MERGED = re.compile(rb" edge_spl\.server INFO version (\d+): merged (\d+) deltas")
_ROUND_FAILED = re.compile(rb"merge round failed|could not store version")


class LogScan:
    """Reads each log only once, as it grows: the (wall-clock) times of its "connected to" lines."""

    def __init__(self):
        self._seen: dict[str, tuple[int, list[float]]] = {}

    def connects(self, path: str) -> list[float]:
        offset, times = self._seen.get(path, (0, []))
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return times
        end = data.rfind(b"\n") + 1        # a line being written is read next time
        for line in data[:end].splitlines():
            m = _CONNECTED.match(line)
            if m:
                times.append(time.mktime(time.strptime(m[1].decode(), "%Y-%m-%d %H:%M:%S")) + int(m[2]) / 1000)
        self._seen[path] = (offset + end, times)
        return times

    def first_connect_after(self, path: str, since: float) -> float | None:
        return next((t for t in self.connects(path) if t >= since), None)


class DeviceStates:
    """Each device's saved state, read with the device's own loader (so a damaged file falls back
    to .prev exactly as a restarted device would)."""

    def __init__(self, model_dir: str):
        self.model = ExportedModel.load(model_dir)
        self._learners: dict[str, FFLearner] = {}

    def read(self, device: str, state_dir: str) -> dict:
        """{"made": the highest seq the device has created (next_seq - 1), "outbox": the seqs still
        in its outbox, "samples": samples it has learned from}; zeros before its first save."""
        if device not in self._learners:
            self._learners[device] = FFLearner(self.model, device_id=device)
        learner = self._learners[device]
        if not load_state(learner, state_dir):
            return {"made": 0, "outbox": [], "samples": 0}
        return {"made": learner.next_seq_ - 1, "outbox": sorted(d.seq for d in learner.outstanding_),
                "samples": learner.n_samples_}


def merged_count(db_path: str) -> int:
    """Distinct (device, seq) in the store now (read-only, beside a running server: WAL)."""
    if not os.path.isfile(db_path):
        return 0
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute("SELECT COUNT(*) FROM (SELECT DISTINCT device, seq FROM merged_deltas)").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return 0


def read_store(db_path: str) -> dict:
    """The merged (device, seq) rows with how often each occurs, and the version chain."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT device, seq, COUNT(*) FROM merged_deltas GROUP BY device, seq").fetchall()
        versions = db.execute("SELECT version, parent, n_deltas FROM versions ORDER BY version").fetchall()
    finally:
        db.close()
    merged: dict[str, dict[int, int]] = {}
    for device, seq, n in rows:
        merged.setdefault(device, {})[seq] = n
    return {"merged": merged, "versions": versions}


def read_server_logs(paths: list[str]) -> dict:
    """Over every server run: the deltas each logged version merged, versions logged by more than
    one run (a forked history), and failed rounds."""
    logged: dict[int, list[int]] = {}
    failed = 0
    for run, path in enumerate(paths):
        with open(path, "rb") as f:
            for line in f:
                m = _MERGED.search(line)
                if m:
                    logged.setdefault(int(m[1]), []).append(int(m[2]))
                elif _ROUND_FAILED.search(line):
                    failed += 1
    return {"merged": sum(n for ns in logged.values() for n in ns),
            "versions_logged_twice": sorted(v for v, ns in logged.items() if len(ns) > 1),
            "failed_rounds": failed}


def audit(devices: dict[str, dict], store: dict, server_logs: dict, server_counters: dict) -> dict:
    """The soak's figures. `devices`: name -> {"made", "outbox", "made_ever", ...} from the final
    saved states (made_ever: the highest made seen in any read, e.g. right after a SIGKILL)."""
    merged = store["merged"]
    per_device, lost, unmerged, beyond = [], {}, {}, {}
    for name, d in sorted(devices.items()):
        made = max(d["made"], d["made_ever"])
        got = merged.get(name, {})
        outbox = set(d["outbox"])
        gone = [s for s in range(1, made + 1) if s not in got and s not in outbox]
        waiting = sorted(s for s in outbox if s not in got)
        extra = sorted(s for s in got if s > d["made"])    # merged, yet the state says never made
        if gone:
            lost[name] = gone
        if waiting:
            unmerged[name] = waiting
        if extra:
            beyond[name] = extra
        per_device.append({"device": name, "made": made, "merged": len(got), "lost": len(gone),
                           "in_outbox_unmerged": len(waiting), "samples": d["samples"],
                           "restarts": d["restarts"], "exit_code": d.get("exit_code")})
    distinct = sum(len(s) for s in merged.values())
    in_versions = sum(n for v, _, n in store["versions"] if v > 0)
    # the primary key (device, seq) makes a second row impossible, so a merge applied twice would
    # show in the counts of what was merged instead: each version row's n_deltas (written in the
    # same transaction), every server run's log lines and its stats.json (these two may miss a
    # round that a SIGKILL cut short after its commit: they undercount, never overcount)
    checks = {"store_rows_twice": sum(n - 1 for s in merged.values() for n in s.values() if n > 1),
              "versions_n_deltas_minus_distinct": in_versions - distinct,
              "logged_merges_minus_distinct": server_logs["merged"] - distinct,
              "server_counters_minus_distinct": server_counters.get("deltas_merged", 0) - distinct}
    chain = [v for v, _, _ in store["versions"]]
    return {
        "deltas_made": sum(r["made"] for r in per_device),
        "deltas_merged": distinct,
        "deltas_lost": sum(r["lost"] for r in per_device),
        "duplicates_merged": max(0, *checks.values()),
        "deltas_in_outbox_unmerged": sum(r["in_outbox_unmerged"] for r in per_device),
        "lost_seqs": lost,
        "outbox_unmerged_seqs": unmerged,
        "merged_but_not_made": beyond,
        "duplicate_checks": checks,
        "versions": len(chain) - 1,
        "versions_contiguous": chain == list(range(len(chain))),
        "versions_logged_twice": server_logs["versions_logged_twice"],
        "failed_merge_rounds": server_logs["failed_rounds"],
        "server_counters": server_counters,
        "per_device": per_device,
    }


def add_counters(total: dict, stats_path: str) -> None:
    """Add one server run's stats.json (its counters start at zero on every start) to `total`."""
    try:
        with open(stats_path, "rb") as f:
            s = json.loads(f.read())
    except (OSError, ValueError):
        return
    for key in ("messages_received", "deltas_merged", "versions_published"):
        total[key] = total.get(key, 0) + int(s.get(key, 0))
    rej = total.setdefault("deltas_rejected", {})
    for reason, n in (s.get("deltas_rejected") or {}).items():
        rej[reason] = rej.get(reason, 0) + int(n)


# -- the table ---------------------------------------------------------------------------------

def _table(title: str, head: list, rows: list) -> None:
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)   # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    print(f"\n{title}")
    print(line(head))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))


def _s(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def print_tables(res: dict) -> None:
    f = res["faults"]
    print(f"edge-spl bench soak: {res['devices']} devices for {res['minutes']:g} min (seed {res['seed']}), "
          f"{res['seconds']:.0f} s in all; faults: {f['broker_restart']} broker, {f['device_restart']} device, "
          f"{f['server_restart']} server restarts (SIGKILL)")
    _table("Broker restarts (reconnect: from the new broker listening to the last live process "
           "logging 'connected to')",
           ["at s", "down s", "reconnect s", "slowest", "not reconnected"],
           [[f"{b['at_s']:.0f}", f"{b['down_s']:.1f}", _s(b["reconnect_s"]), b["slowest"] or "-",
             ",".join(b["not_reconnected"]) or "-"] for b in res["broker_restarts"]])
    _table("Devices (seqs from each device's saved state, merges from the server's database)",
           ["device", "restarts", "samples", "made", "merged", "in outbox", "lost", "exit"],
           [[d["device"], d["restarts"], d["samples"], d["made"], d["merged"], d["in_outbox_unmerged"],
             d["lost"], "-" if d["exit_code"] is None else d["exit_code"]] for d in res["per_device"]])
    ok = lambda good: "ok" if good else "FAIL"   # noqa: E731
    rows = [["deltas_made", res["deltas_made"], ""],
            ["deltas_merged", res["deltas_merged"], ""],
            ["deltas_lost", res["deltas_lost"], ok(res["deltas_lost"] == 0)],
            ["duplicates_merged", res["duplicates_merged"], ok(res["duplicates_merged"] == 0)],
            ["left in outboxes, unmerged", res["deltas_in_outbox_unmerged"],
             "" if res["drained"] else "not drained"],
            ["re-sent deltas dropped by dedup", res["server_counters"].get("deltas_rejected", {}).get("duplicate", 0),
             "(server stats.json, summed over its runs)"],
            ["max_reconnect_s", _s(res["max_reconnect_s"]), ""],
            ["versions", res["versions"], "" if res["versions_contiguous"] else "NOT CONTIGUOUS"],
            ["unexpected exits", len(res["unexpected_exits"]), ""],
            ["samples fed / dropped", f"{res['samples_fed']} / {res['samples_dropped']}", ""]]
    _table("Result", ["figure", "value", ""], rows)
    for key, what in (("lost_seqs", "LOST (made, never merged, not in the outbox)"),
                      ("merged_but_not_made", "merged seqs beyond the device's saved next_seq"),
                      ("outbox_unmerged_seqs", "still in an outbox, unmerged")):
        for device, seqs in res[key].items():
            print(f"{what}: {device} seqs {seqs}")
    for e in res["unexpected_exits"]:
        print(f"unexpected exit: {e['process']} code {e['code']} at {e['at_s']:.0f} s ({e['log']})")
