"""`edge-spl demo`: the whole loop on the gas drift data, in real processes.

train (batch 1) -> export -> broker (embedded unless --broker) -> server process -> N device
processes streaming batches 2..6 in time order (sample i goes to device i mod N), each pulling
the model and prototype versions from the broker, predicting, adapting and pushing deltas ->
per-batch table of frozen vs adapted prequential accuracy, OUT/demo.json and OUT/demo.png.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np

from edge_spl.cli import default_gas_dir
from edge_spl.data import Dataset, load_gas_batches, load_training_data
from edge_spl.errors import DataError, EdgeSplError
from edge_spl.files import atomic_write_bytes
from edge_spl.model import ModelState
from edge_spl.mqtt_session import short_session
from edge_spl.protocol import Topics

STREAM_BATCHES = [2, 3, 4, 5, 6]
LABEL_COLUMN = "gas"
DATASET_HELP = ("the UCI 'Gas Sensor Array Drift Dataset' (id 224, CC BY 4.0): put batch1.dat .. "
                "batch6.dat in a folder and pass --data DIR")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge_spl", *args]


def _wait_broker(host: str, port: int, proc: subprocess.Popen | None, timeout: float, what: str) -> None:
    """Until an MQTT CONNECT is answered (a bare TCP probe would make the broker log an error)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise EdgeSplError(f"{what} exited with code {proc.returncode} before listening")
        try:
            with short_session((host, port), None, "demo-probe", timeout=min(2.0, timeout)):
                return
        except EdgeSplError as e:
            last = str(e)
        time.sleep(0.2)
    raise EdgeSplError(f"{what} did not answer on {host}:{port} within {timeout:.0f} s ({last})")


def _clear_fleet(broker: tuple[str, int], fleet: str, n_devices: int) -> None:
    """Leave nothing of the demo on a broker that outlives it: the retained model, release and
    statuses, and the server's persistent session (ended by a clean connect under its id)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    t = Topics(fleet)
    try:
        with short_session(broker, None, "demo-cleanup") as c:
            for topic in [t.manifest, t.onnx, t.release] + [t.status(f"dev{k}") for k in range(n_devices)]:
                c.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-spl-server-{fleet}", clean_session=True,
                        protocol=mqtt.MQTTv311)
        c.connect(*broker)
        c.disconnect()
    except (EdgeSplError, OSError, RuntimeError, ValueError) as e:
        say(f"      could not clear fleet {fleet}'s retained messages from the broker ({e})")


def _stop(proc: subprocess.Popen | None, timeout: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _write_device_sources(out_dir: str, batches, n_devices: int):
    """Split the stream by sample index (i mod N) into one CSV per device. Returns, per device,
    the batch number of each of its rows, in order."""
    feature_names = batches[0].feature_names
    files = [open(os.path.join(out_dir, f"dev{k}.csv"), "w", newline="") for k in range(n_devices)]
    writers = [csv.writer(f) for f in files]
    for w in writers:
        w.writerow(feature_names + [LABEL_COLUMN])
    batch_of = [[] for _ in range(n_devices)]
    i = 0
    for b, ds in zip(STREAM_BATCHES, batches):
        for x, y in zip(ds.X, ds.y):
            k = i % n_devices
            writers[k].writerow([repr(float(v)) for v in x] + [y])
            batch_of[k].append(b)
            i += 1
    for f in files:
        f.close()
    return batch_of


def _read_predictions(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return max(0, sum(1 for _ in f) - 1)
    except FileNotFoundError:
        return 0


def run(args) -> int:
    t_start = time.monotonic()
    data_dir = args.data or default_gas_dir()
    if data_dir is None:
        raise DataError(f"no gas drift data found at ../shared/data/gas-sensor-drift; get {DATASET_HELP}")
    for b in [1] + STREAM_BATCHES:
        if not os.path.isfile(os.path.join(data_dir, f"batch{b}.dat")):
            raise DataError(f"{data_dir}: batch{b}.dat missing; the demo needs {DATASET_HELP}")
    if args.broker:   # fail before minutes of work, not after
        _wait_broker(*args.broker, None, 5, f"MQTT broker {args.broker[0]}:{args.broker[1]}")
    out = os.path.abspath(args.out)
    model_dir, dev_dir = os.path.join(out, "model"), os.path.join(out, "devices")
    os.makedirs(dev_dir, exist_ok=True)

    # 1. pretrain on batch 1 and export (workstation role, in this process)
    from edge_spl.export.onnx_export import export_model
    from edge_spl.export.pretrain import pretrain

    say(f"[1/5] pretraining on {os.path.join(data_dir, 'batch1.dat')}")
    state, report = pretrain(load_training_data(data_dir), hidden=[256, 256], epochs=args.epochs,
                             holdout=0.2, seed=args.seed, progress=True)
    state.save(model_dir)
    export_model(state).save(model_dir)
    say(f"      held-out accuracy {report['heldout_acc']:.3f}; exported {model_dir}/model.onnx")

    batches = load_gas_batches(data_dir, STREAM_BATCHES)
    if args.limit:
        batches = [Dataset(ds.X[:args.limit], ds.y[:args.limit], ds.feature_names, ds.source)
                   for ds in batches]
    batch_of = _write_device_sources(dev_dir, batches, args.devices)
    n_total = sum(len(b) for b in batch_of)

    broker_proc = server_proc = None
    devices: list[subprocess.Popen] = []
    fleet = "demo-" + uuid.uuid4().hex[:8]
    logs = []
    try:
        # 2. broker
        if args.broker:
            host, port = args.broker
            say(f"[2/5] using MQTT broker {host}:{port}")
        else:
            from edge_spl.cli.broker import free_port

            host, port = "127.0.0.1", free_port()
            log = open(os.path.join(out, "broker.log"), "w")
            logs.append(log)
            broker_proc = subprocess.Popen(_cmd("broker", "--port", str(port)), stdout=log, stderr=log)
            _wait_broker(host, port, broker_proc, 20, "embedded broker")
            say(f"[2/5] embedded MQTT broker on {host}:{port}")
        broker = f"{host}:{port}"

        # 3. server
        log = open(os.path.join(out, "server.log"), "w")
        logs.append(log)
        server_state = os.path.join(out, "server")
        server_proc = subprocess.Popen(
            _cmd("server", "--broker", broker, "--model", model_dir, "--state", server_state,
                 "--fleet", fleet, "--merge-every", "0.5"), stdout=log, stderr=log)
        say(f"[3/5] server started (fleet {fleet}, history in {server_state}/server.db)")

        # 4. devices: each pulls manifest, ONNX and the latest release from the broker
        for k in range(args.devices):
            state_dir = os.path.join(dev_dir, f"dev{k}")
            log = open(os.path.join(dev_dir, f"dev{k}.log"), "w")
            logs.append(log)
            devices.append(subprocess.Popen(
                _cmd("device", "--broker", broker, "--id", f"dev{k}", "--fleet", fleet,
                     "--source", os.path.join(dev_dir, f"dev{k}.csv"), "--state", state_dir,
                     "--label", LABEL_COLUMN, "--label-every", str(args.label_every),
                     "--sync-every", "50", "--quiet", "--wait", "60",
                     "--predictions", os.path.join(dev_dir, f"dev{k}.predictions.csv")),
                stdout=log, stderr=log))
        say(f"[4/5] {args.devices} devices streaming batches 2..6 ({n_total} samples)")
        pred_files = [os.path.join(dev_dir, f"dev{k}.predictions.csv") for k in range(args.devices)]
        # on a terminal one line that counts up; in a log, a line every 10 s
        tty, last = sys.stderr.isatty(), time.monotonic()
        while any(p.poll() is None for p in devices):
            if server_proc.poll() is not None:
                raise EdgeSplError(f"server exited with code {server_proc.returncode}; see {out}/server.log")
            if tty:
                done = sum(_count_lines(p) for p in pred_files)
                print(f"\r      {done}/{n_total} samples", end="", file=sys.stderr, flush=True)
            elif time.monotonic() - last >= 10.0:
                last = time.monotonic()
                print(f"      {sum(_count_lines(p) for p in pred_files)}/{n_total} samples", file=sys.stderr, flush=True)
            time.sleep(0.5)
        print(("\r" if tty else "") + f"      {n_total}/{n_total} samples", file=sys.stderr, flush=True)
        failed = [k for k, p in enumerate(devices) if p.returncode != 0]
        if failed:
            raise EdgeSplError(f"device(s) {failed} failed; see {dev_dir}/dev<k>.log")
        time.sleep(1.0)   # let the server finish its last round
    finally:
        for p in devices:
            _stop(p)
        _stop(server_proc)
        _stop(broker_proc)
        if args.broker:
            _clear_fleet(args.broker, fleet, args.devices)
        for f in logs:
            f.close()

    # 5. report
    say("[5/5] report")
    result = _report(state, batches, batch_of, pred_files, dev_dir, os.path.join(out, "server"),
                     args, time.monotonic() - t_start)
    stream = result.pop("stream")
    atomic_write_bytes(os.path.join(out, "demo.json"), json.dumps(result, indent=2).encode())
    _plot(stream, os.path.join(out, "demo.png"))
    _print_table(result)
    print(f"wrote {out}/demo.json and {out}/demo.png")
    return 0


def _report(state: ModelState, batches, batch_of, pred_files, dev_dir, server_dir, args, seconds):
    class_index = {c: i for i, c in enumerate(state.class_names)}
    frozen_pred = {b: state.predict_logits(ds.X).argmax(1) for b, ds in zip(STREAM_BATCHES, batches)}
    truth = {b: np.array([class_index[y] for y in ds.y]) for b, ds in zip(STREAM_BATCHES, batches)}
    # sample i of the stream went to device i % N as its (i // N)-th row
    n_dev = len(pred_files)
    preds = [_read_predictions(p) for p in pred_files]
    rows, stream, i = [], [], 0
    for b, ds in zip(STREAM_BATCHES, batches):
        fz, ad = [], []
        for j in range(len(ds)):
            k, r = i % n_dev, i // n_dev
            rec = preds[k][r] if r < len(preds[k]) else None
            if rec is not None:
                ok = class_index.get(rec["prediction"]) == truth[b][j]
                ad.append(ok)
                fz.append(frozen_pred[b][j] == truth[b][j])
                stream.append((b, bool(fz[-1]), bool(ok)))
            i += 1
        rows.append({"batch": b, "n": len(ad), "frozen_acc": 100.0 * float(np.mean(fz)) if fz else None,
                     "adapted_acc": 100.0 * float(np.mean(ad)) if ad else None})
    summaries = []
    for k in range(n_dev):
        p = os.path.join(dev_dir, f"dev{k}", "summary.json")
        with open(p) as f:
            summaries.append(json.load(f))
    server_stats = {}
    sp = os.path.join(server_dir, "stats.json")
    if os.path.isfile(sp):
        with open(sp) as f:
            server_stats = json.load(f)
    n = sum(r["n"] for r in rows)
    return {
        "batches": rows,
        "mean_frozen_acc": float(np.mean([r["frozen_acc"] for r in rows])),
        "mean_adapted_acc": float(np.mean([r["adapted_acc"] for r in rows])),
        "samples": n,
        "devices": n_dev,
        "label_every": args.label_every,
        "versions_published": int(server_stats.get("versions_published", 0)),
        "deltas_merged": int(server_stats.get("deltas_merged", 0)),
        "deltas_rejected": server_stats.get("deltas_rejected", {}),
        "messages_synced": int(sum(s.get("messages_sent", 0) + s.get("messages_received", 0) for s in summaries)),
        "bytes_synced": int(sum(s.get("bytes_sent", 0) + s.get("bytes_received", 0) for s in summaries)),
        "device_samples_per_s": [round(float(s.get("samples_per_s", 0.0)), 1) for s in summaries],
        "versions_adopted": [s.get("versions_adopted", []) for s in summaries],
        "seconds": round(seconds, 1),
        "stream": stream,
    }


def _print_table(res) -> None:
    print(f"{'batch':>5} {'samples':>8} {'frozen %':>9} {'adapted %':>10}")
    for r in res["batches"]:
        print(f"{r['batch']:>5} {r['n']:>8} {r['frozen_acc']:>9.1f} {r['adapted_acc']:>10.1f}")
    print(f"{'mean':>5} {res['samples']:>8} {res['mean_frozen_acc']:>9.1f} {res['mean_adapted_acc']:>10.1f}")
    print(f"labels: every {res['label_every']}. prototype versions published: {res['versions_published']}, "
          f"deltas merged: {res['deltas_merged']}, synced {res['messages_synced']} messages / "
          f"{res['bytes_synced'] / 1e6:.1f} MB, device samples/s: {res['device_samples_per_s']}, "
          f"total {res['seconds']:.0f} s")


def trailing_mean(v: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last `window` values at each point (fewer at the start): no zero padding, so
    the curve does not dip at either end."""
    c = np.concatenate([[0.0], np.cumsum(v, dtype=float)])
    i = np.arange(1, len(v) + 1)
    lo = np.maximum(i - window, 0)
    return (c[i] - c[lo]) / (i - lo)


def _plot(stream, path: str, window: int = 100) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = np.array([s[0] for s in stream])
    fz = np.array([s[1] for s in stream], float)
    ad = np.array([s[2] for s in stream], float)
    x = np.arange(len(stream))
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(x, trailing_mean(fz, window) * 100, label="frozen model")
    ax.plot(x, trailing_mean(ad, window) * 100, label="adapted on the devices (FF + sync)")
    for pos in np.flatnonzero(np.diff(b)) + 1:
        ax.axvline(pos, color="grey", lw=0.5)
    # above the plot, staggered: short batches (4 and 5 hold ~200 samples) would overlap
    for k, batch in enumerate(np.unique(b)):
        ax.text(np.flatnonzero(b == batch).mean(), 101 + 4 * (k % 2), f"batch {batch}", ha="center",
                va="bottom", fontsize=8, clip_on=False)
    ax.set_xlabel("sample in stream (time order)")
    ax.set_ylabel(f"accuracy, rolling {window} (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower left")
    ax.set_title("edge-spl demo: gas sensor drift, batches 2-6", pad=22)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
