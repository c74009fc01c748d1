"""`edge-spl bench soak`: the fleet under faults for minutes, then an audit of every delta.

Starts its own mosquitto (persistence on, in OUT/run/broker), `edge-spl server` and N `edge-spl
device` processes, each with its own --state, fed real gas drift samples (batches 2..6, a seeded
shuffle per device) through stdin at a steady rate. For --minutes it injects faults at seeded
random times, one at a time: SIGKILL the broker and restart it on the same port and persistence
file; SIGKILL one or more devices and restart them on the same --state; SIGKILL the server and
restart it on the same --state. The first fault is always a broker restart. Then it closes the
devices' input, lets them drain (each waits up to DEVICE_WAIT s for a release covering its
outbox, then exits), stops the server and the broker cleanly, and audits the durable records
(soak_audit.py). Writes OUT/bench_soak.json, prints the tables; exits 1 when a delta was lost or
merged twice. docs/bench-soak.md says how each figure is measured.
"""
from __future__ import annotations

import getpass
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import numpy as np

from edge_spl.errors import DataError, EdgeSplError
from edge_spl.files import atomic_write_bytes

from . import soak_audit as A

MAX_DEVICES = 64
RATE = 10.0             # samples per second each device is fed
SYNC_EVERY = 20         # so a device pushes a delta every 2 s of stream
MERGE_EVERY = 0.5
DEVICE_WAIT = 60.0      # device --wait: for the broker at start, and for a covering release at the end
GAP_S = (3.0, 10.0)     # between one fault's end and the next fault
BROKER_DOWN_S = (0.5, 5.0)
SERVER_DOWN_S = (0.5, 3.0)
DEVICE_DOWN_S = (0.0, 2.0)
KINDS, WEIGHTS = ("device", "broker", "server"), (0.5, 0.3, 0.2)
START_WAIT = 180.0      # for the whole fleet's first connect (N processes importing on few cores)
RECONNECT_WAIT = 60.0   # after a broker restart, before the next fault
PROGRESS_EVERY = 10.0
BACKLOG = 64 * 1024     # bytes of samples held for a device not reading (restarting); beyond, dropped
STREAM_BATCHES = (2, 3, 4, 5, 6)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _edge_spl(*args: str) -> list[str]:
    return [sys.executable, "-m", "edge_spl", *args]


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)
    if found is None:
        raise EdgeSplError("bench soak starts its own mosquitto, and none is installed "
                           "(apt-get install mosquitto)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Proc:
    """A child process restarted in place; run k logs stdout and stderr to FOLDER/NAME.k.log."""

    def __init__(self, name: str, argv: list[str], folder: str, stdin: bool = False):
        self.name, self.argv, self.folder, self.stdin = name, argv, folder, stdin
        self.proc: subprocess.Popen | None = None
        self.logs: list[str] = []
        self.meant_to_run = False      # False: its exit is ours (killed, stopped, drained)
        self.started_at = 0.0

    def start(self) -> None:
        self.logs.append(os.path.join(self.folder, f"{self.name}.{len(self.logs) + 1}.log"))
        with open(self.logs[-1], "wb") as log:
            # its own session: a Ctrl-C on the bench reaches the bench only, which stops the rest
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         stdin=subprocess.PIPE if self.stdin else subprocess.DEVNULL)
        self.meant_to_run = True
        self.started_at = time.time()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        self.meant_to_run = False
        if self.alive:
            self.proc.kill()
        self._reap(10.0)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (a device saves its state, the server finishes its round), SIGKILL if it hangs."""
        self.meant_to_run = False
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self._reap(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self._reap(10.0)

    def _reap(self, timeout: float) -> None:
        if self.proc is None:
            return
        self.proc.wait(timeout)
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass


class Feeder(threading.Thread):
    """Writes a gas sample to every device's stdin RATE times a second, never blocking on one:
    a device that does not read (restarting, waiting for the broker) gets up to BACKLOG bytes
    held for it; beyond that its sensor's samples are dropped and counted."""

    def __init__(self, lines: list[bytes], n: int, rate: float, seed: int):
        super().__init__(name="soak-feeder", daemon=True)
        self.lines, self.rate = lines, rate
        rng = np.random.default_rng(seed)
        self.order = [rng.permutation(len(lines)) for _ in range(n)]
        self.next = [0] * n
        self.fds: list[int | None] = [None] * n
        self.pending = [bytearray() for _ in range(n)]
        self.fed = self.dropped = 0
        self.lock = threading.Lock()
        self.halt = threading.Event()

    def attach(self, k: int, proc: subprocess.Popen) -> None:
        fd = proc.stdin.fileno()
        os.set_blocking(fd, False)
        with self.lock:
            self.dropped += self.pending[k].count(b"\n")   # the tail of a line is no sample
            self.pending[k].clear()
            self.fds[k] = fd

    def detach(self, k: int) -> None:
        """Before its process is killed and its pipe closed: the fd number is reused after."""
        with self.lock:
            self.fds[k] = None

    def run(self) -> None:
        t = time.monotonic()
        while not self.halt.wait(max(0.0, t - time.monotonic())):
            t = max(t + 1.0 / self.rate, time.monotonic() - 1.0)   # late: no burst to catch up
            with self.lock:
                for k in range(len(self.fds)):
                    self._produce(k)
                    self._write(k)

    def _produce(self, k: int) -> None:
        if len(self.pending[k]) >= BACKLOG:
            self.dropped += 1
            return
        order = self.order[k]
        self.pending[k] += self.lines[order[self.next[k] % len(order)]]
        self.next[k] += 1

    def _write(self, k: int) -> None:
        fd, buf = self.fds[k], self.pending[k]
        if fd is None or not buf:
            return
        try:
            n = os.write(fd, buf)
        except BlockingIOError:
            return
        except OSError:          # the device died: its restart attaches a new pipe
            self.fds[k] = None
            return
        self.fed += buf[:n].count(b"\n")
        del buf[:n]

    def close(self, procs: list[Proc]) -> None:
        """Stop feeding and close every device's stdin: it ends its stream and drains."""
        self.halt.set()
        self.join(5.0)
        with self.lock:
            for k, p in enumerate(procs):
                self.fds[k] = None
                if p.alive and p.proc.stdin is not None:
                    try:
                        p.proc.stdin.close()
                    except OSError:
                        pass


class Soak:
    def __init__(self, args, work: str, model_dir: str, lines: list[bytes]):
        self.args, self.work, self.model_dir = args, work, model_dir
        self.rng = random.Random(args.seed)
        self.fleet = "soak-" + uuid.uuid4().hex[:8]
        self.port = free_port()
        self.broker_dir = os.path.join(work, "broker")
        os.makedirs(self.broker_dir)
        conf = os.path.join(self.broker_dir, "mosquitto.conf")
        # autosave every second: a SIGKILL loses at most the last second of the broker's state
        # (sessions, queued messages, retained ones); `user`: mosquitto started as root drops to
        # a "mosquitto" user otherwise, which may not write here
        with open(conf, "w") as f:
            f.write(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                    f"persistence_location {self.broker_dir}/\nautosave_interval 1\n"
                    f"user {getpass.getuser()}\n")
        self.broker = Proc("broker", [mosquitto_binary(), "-c", conf], self.broker_dir)
        address = f"127.0.0.1:{self.port}"
        self.server_state = os.path.join(work, "server")
        # -v: the server logs each (re)connect at DEBUG only, and max_reconnect_s reads it
        self.server = Proc("server", _edge_spl("-v", "server", "--broker", address, "--model", model_dir,
                                               "--state", self.server_state, "--fleet", self.fleet,
                                               "--merge-every", str(MERGE_EVERY)), work)
        dev_dir = os.path.join(work, "devices")
        os.makedirs(dev_dir)
        self.names = [f"soak{k:02d}" for k in range(args.devices)]
        self.state_dirs = {n: os.path.join(dev_dir, n) for n in self.names}
        self.devices = [Proc(n, _edge_spl("device", "--broker", address, "--fleet", self.fleet, "--id", n,
                                          "--source", "-", "--state", self.state_dirs[n], "--model", model_dir,
                                          "--sync-every", str(SYNC_EVERY), "--quiet", "--wait", str(DEVICE_WAIT)),
                             dev_dir, stdin=True) for n in self.names]
        self.feeder = Feeder(lines, args.devices, RATE, args.seed)
        self.scan = A.LogScan()
        self.states = A.DeviceStates(model_dir)
        self.made_ever = {n: 0 for n in self.names}
        self.server_counters: dict = {}
        self.faults = {"broker_restart": 0, "device_restart": 0, "server_restart": 0}
        self.events: list[dict] = []
        self.broker_restarts: list[dict] = []
        self.unexpected: list[dict] = []
        self.t0 = time.monotonic()
        self.next_progress = 0.0

    # -- processes -------------------------------------------------------------------------------

    def start_broker(self) -> float:
        """Start it and wait until it listens; returns the wall-clock time it was spawned."""
        spawned = time.time()
        self.broker.start()
        deadline = time.monotonic() + 10.0
        while not listening(self.port):
            if not self.broker.alive or time.monotonic() > deadline:
                raise EdgeSplError(f"mosquitto did not listen on port {self.port}; see {self.broker.logs[-1]}")
            time.sleep(0.02)
        return spawned

    def start_device(self, k: int) -> None:
        self.devices[k].start()
        self.feeder.attach(k, self.devices[k].proc)

    def kill_device(self, k: int) -> None:
        self.feeder.detach(k)
        self.devices[k].kill()
        self._note_made(self.names[k])

    def stop_server(self, kill: bool) -> None:
        self.server.kill() if kill else self.server.stop()
        A.add_counters(self.server_counters, os.path.join(self.server_state, "stats.json"))

    def _note_made(self, name: str) -> int:
        """The highest seq its saved state says it made; kept as the maximum ever read, so a state
        that went back (and would reuse seqs) still counts what was made before."""
        made = self.states.read(name, self.state_dirs[name])["made"]
        self.made_ever[name] = max(self.made_ever[name], made)
        return made

    def live(self) -> list[Proc]:
        return [p for p in [self.server] + self.devices if p.meant_to_run]

    def watch(self) -> None:
        """A process that ended on its own is noted and restarted (with its state)."""
        for k, p in enumerate([self.broker, self.server] + self.devices):
            if p.meant_to_run and not p.alive:
                self.unexpected.append({"process": p.name, "code": p.proc.returncode, "at_s": self.elapsed(),
                                        "log": p.logs[-1]})
                say(f"  {p.name} exited on its own (code {p.proc.returncode}); restarting it ({p.logs[-1]})")
                if p is self.broker:
                    self.start_broker()
                elif p is self.server:
                    A.add_counters(self.server_counters, os.path.join(self.server_state, "stats.json"))
                    p.start()
                else:
                    self.feeder.detach(k - 2)
                    p._reap(1.0)
                    self.start_device(k - 2)

    # -- the clock -------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def idle(self, seconds: float, until=None, progress: bool = True) -> bool:
        """Wait `seconds` (or until `until()` holds), watching the processes and printing progress."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if until is not None and until():
                return True
            self.watch()
            if progress:
                self.progress()
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return until is not None and until()

    def progress(self, force: bool = False) -> None:
        if not force and time.monotonic() < self.next_progress:
            return
        self.next_progress = time.monotonic() + PROGRESS_EVERY
        made = sum(self._note_made(n) for n in self.names)
        merged = A.merged_count(os.path.join(self.server_state, "server.db"))
        f = self.faults
        say(f"  {self.elapsed():5.0f} s: faults {sum(f.values())} (broker {f['broker_restart']}, device "
            f"{f['device_restart']}, server {f['server_restart']}), deltas made {made}, merged {merged}, "
            f"samples fed {self.feeder.fed}")

    # -- phases ----------------------------------------------------------------------------------

    def start(self) -> None:
        self.start_broker()
        self.server.start()
        for k in range(len(self.devices)):
            self.start_device(k)
        connected = lambda: all(self.scan.connects(p.logs[-1]) for p in self.live())   # noqa: E731
        if not self.idle(START_WAIT, connected, progress=False):
            slow = [p.name for p in self.live() if not self.scan.connects(p.logs[-1])]
            raise EdgeSplError(f"not connected within {START_WAIT:.0f} s: {', '.join(slow)} (logs in {self.work})")
        self.feeder.start()      # now: samples fed while N processes import would only pile up
        say(f"  fleet up in {self.elapsed():.0f} s: broker 127.0.0.1:{self.port}, fleet {self.fleet}, "
            f"{len(self.devices)} devices at {RATE:g} samples/s each")

    def inject(self) -> None:
        self.t0 = time.monotonic()
        self.next_progress = 0.0
        duration = self.args.minutes * 60.0
        end = self.t0 + duration
        next_fault = self.t0 + min(self.rng.uniform(*GAP_S), duration / 3)
        kind = "broker"      # the first: every soak covers a broker restart
        while True:
            self.idle(max(0.0, min(next_fault, end) - time.monotonic()))
            if time.monotonic() >= end:
                break
            getattr(self, f"fault_{kind}")()
            kind = self.rng.choices(KINDS, WEIGHTS)[0]
            next_fault = time.monotonic() + self.rng.uniform(*GAP_S)
        self.progress(force=True)

    def fault_broker(self) -> None:
        at, down = self.elapsed(), self.rng.uniform(*BROKER_DOWN_S)
        self.broker.kill()
        self.faults["broker_restart"] += 1
        say(f"  {at:5.0f} s: broker SIGKILLed, restarting it in {down:.1f} s")
        self.idle(down)
        spawned = self.start_broker()
        up = time.time()
        # a connect logged after the new broker was spawned can only be to the new broker
        back = lambda: all(self.scan.first_connect_after(p.logs[-1], spawned) for p in self.live())   # noqa: E731
        self.idle(RECONNECT_WAIT, back)
        times = {p.name: self.scan.first_connect_after(p.logs[-1], spawned) for p in self.live()}
        missing = sorted(n for n, t in times.items() if t is None)
        slowest = max((n for n in times if times[n] is not None), key=times.get, default=None)
        rec = {"at_s": at, "down_s": down, "not_reconnected": missing, "slowest": slowest,
               "reconnect_s": None if missing or slowest is None else max(0.0, times[slowest] - up)}
        self.broker_restarts.append(rec)
        self.events.append({"kind": "broker", "at_s": at, "down_s": down})
        say(f"  {self.elapsed():5.0f} s: every process reconnected "
            + (f"{rec['reconnect_s']:.2f} s after the broker listened ({slowest} last)" if not missing
               else f"EXCEPT {', '.join(missing)} within {RECONNECT_WAIT:.0f} s"))

    def fault_device(self) -> None:
        at = self.elapsed()
        k_max = max(1, len(self.devices) // 5)
        victims = sorted(self.rng.sample(range(len(self.devices)), self.rng.randint(1, k_max)))
        down = self.rng.uniform(*DEVICE_DOWN_S)
        names = [self.names[k] for k in victims]
        for k in victims:
            self.kill_device(k)
        self.faults["device_restart"] += len(victims)
        say(f"  {at:5.0f} s: {', '.join(names)} SIGKILLed, restarting in {down:.1f} s")
        self.idle(down)
        for k in victims:
            self.start_device(k)
        self.events.append({"kind": "device", "at_s": at, "down_s": down, "devices": names})

    def fault_server(self) -> None:
        at, down = self.elapsed(), self.rng.uniform(*SERVER_DOWN_S)
        self.stop_server(kill=True)
        self.faults["server_restart"] += 1
        say(f"  {at:5.0f} s: server SIGKILLed, restarting it in {down:.1f} s")
        self.idle(down)
        self.server.start()
        self.events.append({"kind": "server", "at_s": at, "down_s": down})

    def drain(self) -> dict:
        """Close the devices' input; each pushes its last delta and exits once a release covers
        its outbox (or after DEVICE_WAIT s). Then the server and the broker stop cleanly."""
        t = time.monotonic()
        self.feeder.close(self.devices)
        for p in self.devices:
            p.meant_to_run = False       # their exit is the drain's end now
        self.idle(DEVICE_WAIT + 20.0, lambda: not any(p.alive for p in self.devices))
        hung = [p.name for p in self.devices if p.alive]
        for p in self.devices:
            p.stop()
        codes = {p.name: p.proc.returncode for p in self.devices}
        drain_s = time.monotonic() - t
        self.stop_server(kill=False)
        self.broker.stop()
        return {"drain_s": drain_s, "hung": hung, "exit_codes": codes}

    def shutdown(self) -> None:
        """Whatever happened: no process of ours outlives the bench."""
        self.feeder.halt.set()
        for p in self.devices + [self.server, self.broker]:
            if p.alive:
                p.stop(5.0)


# -- setup ----------------------------------------------------------------------------------------

def make_model(data_dir: str, model_dir: str) -> None:
    """A 128-32-6 gas model: random prototypes, batch 1's input statistics (no training: the soak
    measures delivery, not accuracy, and a small model starts fast)."""
    from edge_spl.data import GAS_CLASSES, GAS_FEATURES, load_gas_file
    from edge_spl.export.onnx_export import export_model
    from edge_spl.model import init_model

    X = load_gas_file(os.path.join(data_dir, "batch1.dat")).X
    state = init_model([128, 32, 6], X.mean(0), X.std(0) + 1e-3, GAS_CLASSES, GAS_FEATURES, seed=0,
                       model_id="bench-soak")
    export_model(state).save(model_dir)


def stream_lines(data_dir: str) -> list[bytes]:
    lines = []
    for b in STREAM_BATCHES:
        with open(os.path.join(data_dir, f"batch{b}.dat"), "rb") as f:
            lines += [ln if ln.endswith(b"\n") else ln + b"\n" for ln in f if ln.strip()]
    return lines


def run(args) -> int:
    from edge_spl.cli import default_gas_dir

    if not 1 <= args.devices <= MAX_DEVICES:
        raise EdgeSplError(f"--devices {args.devices}: expected 1 to {MAX_DEVICES} device processes")
    data_dir = args.data or default_gas_dir()
    if data_dir is None:
        raise DataError("no gas drift data found at ../shared/data/gas-sensor-drift; pass --data DIR")
    for b in (1,) + STREAM_BATCHES:
        if not os.path.isfile(os.path.join(data_dir, f"batch{b}.dat")):
            raise DataError(f"{data_dir}: batch{b}.dat missing (the UCI gas sensor drift data, batches 1..6)")
    mosquitto_binary()
    out = os.path.abspath(args.out)
    work = os.path.join(out, "run")      # the processes' states and logs, kept for a post-mortem
    if os.path.isdir(work):
        shutil.rmtree(work)
    os.makedirs(work)
    t_start = time.monotonic()
    model_dir = os.path.join(work, "model")
    make_model(data_dir, model_dir)
    say(f"bench soak: {args.devices} devices, {args.minutes:g} min of faults, seed {args.seed}; logs in {work}")
    soak = Soak(args, work, model_dir, stream_lines(data_dir))
    try:
        soak.start()
        soak.inject()
        say("  draining: input closed, waiting for every outbox to be merged ...")
        end = soak.drain()
    finally:
        soak.shutdown()

    devices = {}
    for n, p in zip(soak.names, soak.devices):
        st = soak.states.read(n, soak.state_dirs[n])
        devices[n] = dict(st, made_ever=soak.made_ever[n], restarts=len(p.logs) - 1,
                          exit_code=end["exit_codes"][n])
    res = {"devices": args.devices, "minutes": args.minutes, "seed": args.seed, "rate_per_device": RATE,
           "sync_every": SYNC_EVERY, "faults": soak.faults}
    res.update(A.audit(devices, A.read_store(os.path.join(soak.server_state, "server.db")),
                       A.read_server_logs(soak.server.logs), soak.server_counters))
    done = [b["reconnect_s"] for b in soak.broker_restarts if b["reconnect_s"] is not None]
    res.update({
        "max_reconnect_s": max(done) if done else None,
        "reconnect_incomplete": sum(1 for b in soak.broker_restarts if b["reconnect_s"] is None),
        "broker_restarts": soak.broker_restarts,
        "fault_events": soak.events,
        "unexpected_exits": soak.unexpected,
        "drained": not end["hung"] and res["deltas_in_outbox_unmerged"] == 0,
        "drain_s": end["drain_s"],
        "device_exit_codes": end["exit_codes"],
        "samples_fed": soak.feeder.fed,
        "samples_dropped": soak.feeder.dropped,
        "work_dir": work,
        "seconds": time.monotonic() - t_start,
    })
    path = os.path.join(out, "bench_soak.json")
    atomic_write_bytes(path, json.dumps(res, indent=1).encode())
    A.print_tables(res)
    print(f"\nwrote {path}")
    return 1 if res["deltas_lost"] or res["duplicates_merged"] else 0
