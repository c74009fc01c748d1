"""The `edge-spl` command. Parsers live here; each subcommand's module (and so its role's
dependencies) is imported only when that subcommand runs, so `edge-spl device --help` works on a
device without torch."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from edge_spl import __version__
from edge_spl.errors import EdgeSplError

# subcommand -> (module under edge_spl.cli, extra that provides its dependencies)
COMMANDS = {
    "train": ("train", "train"),
    "export": ("export", "train"),
    "device": ("device", "device"),
    "compile": ("compile", "device"),
    "server": ("server", "server"),
    "keys": ("keys", "server"),
    "status": ("status", "server"),
    "demo": ("demo", "demo"),
    "broker": ("broker", "demo"),
    "bench": ("bench", "bench"),
}


def default_gas_dir() -> str | None:
    """../shared/data/gas-sensor-drift seen from the current folder or from a source checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    for base in (os.getcwd(), os.path.join(here, "..", "..")):
        p = os.path.normpath(os.path.join(base, "..", "shared", "data", "gas-sensor-drift"))
        if os.path.isfile(os.path.join(p, "batch1.dat")):
            return p
    return None


def broker_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):   # an IPv6 address, [::1]:1883
        host = host[1:-1]
    if not sep or not host.strip() or any(c.isspace() for c in host):
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:1883")
    try:
        p = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: port {port!r} is not a number") from None
    if not 0 < p < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: port must be 1-65535")
    return host, p


def seconds(text: str) -> float:
    """A finite, non-negative number of seconds (nan or inf would make every wait endless)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= v < 1e9:    # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds, 0 or more")
    return v


def positive_seconds(text: str) -> float:
    v = seconds(text)
    if v < 0.001:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds of at least 0.001")
    return v


def positive_minutes(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of minutes") from None
    if not 0.01 <= v < 1e6:    # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of minutes, at least 0.01")
    return v


def port_number(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= v < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: port must be 0-65535 (0 = a free one)")
    return v


MAX_DEMO_DEVICES = 32   # each is a process with its own onnxruntime; thousands would take the machine down


def demo_devices(text: str) -> int:
    v = positive_int(text)
    if v > MAX_DEMO_DEVICES:
        raise argparse.ArgumentTypeError(f"{text!r}: the demo runs at most {MAX_DEMO_DEVICES} device processes")
    return v


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < v < 1e15:    # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return v


def add_broker_auth(p: argparse.ArgumentParser, user_help: str) -> None:
    """The broker's credentials and TLS, the same for every command that connects
    (edge_spl.mqtt_auth.MqttAuth.from_args reads them; docs/mosquitto.md sets up a broker)."""
    g = p.add_argument_group("broker login and TLS (docs/mosquitto.md)")
    g.add_argument("--username", metavar="NAME", help=user_help)
    g.add_argument("--password-file", metavar="FILE",
                   help="file holding the MQTT password (less a trailing newline); or set "
                        "$EDGE_SPL_MQTT_PASSWORD. Never on the command line")
    g.add_argument("--tls-ca", metavar="FILE",
                   help="connect with TLS and trust the broker certificate this CA (PEM) signed; "
                        "the host name in --broker must match the certificate")
    g.add_argument("--tls-cert", metavar="FILE", help="client certificate (PEM), for brokers that require one")
    g.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert (PEM, unencrypted)")


DEFAULT_MAX_PACKET = 16 * 1024 * 1024   # edge_spl.protocol.DEFAULT_MAX_PAYLOAD (a test holds them equal)


def packet_size(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bytes") from None
    if not 1024 <= v <= 268_435_455:   # MQTT's largest packet
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1024 to 268435455 bytes")
    return v


def add_max_packet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-packet", type=packet_size, default=DEFAULT_MAX_PACKET, metavar="BYTES",
                   help="the broker's maximum packet size (mosquitto: max_packet_size; EMQX defaults to "
                        "1 MB): nothing larger is sent -- deltas are cut to fit, a model or release that "
                        f"cannot is a clear error -- or taken (default {DEFAULT_MAX_PACKET})")


def version_number(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a version number") from None
    if not 0 <= v <= 2**53:
        raise argparse.ArgumentTypeError(f"{text!r}: a version number is 0 or more")
    return v


def build_parser(with_rollback: bool = True) -> argparse.ArgumentParser:
    """with_rollback=False leaves out `server rollback`: an optional sub-command takes the first
    stray word, so a mistyped option of `edge-spl server` would be reported as a bad ACTION."""
    p = argparse.ArgumentParser(
        prog="edge-spl",
        description="Sparse ProtoLinear models for sensor streams: pretrain and export on a "
                    "workstation, adapt on the device with Forward-Forward, sync prototypes over MQTT.")
    p.add_argument("--version", action="version", version=f"edge-spl {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train", help="pretrain an SPL model with backprop (workstation, needs [train])",
                       description="Pretrain an SPL model with backprop: the task loss trains W, b; "
                                   "a SARS-style meta loss trains prototypes P and gates g.")
    t.add_argument("--data", required=True, metavar="DIR|FILE",
                   help="gas drift folder (trains on batch1.dat), occupancy folder "
                        "(datatraining.txt), a gas .dat file, or a CSV file with --label")
    t.add_argument("--label", metavar="COLUMN", help="label column of a CSV file")
    t.add_argument("--features", metavar="COL,COL",
                   help="CSV feature columns (default: every column of mostly numbers but the label and "
                        "a row counter; train prints them)")
    t.add_argument("--out", required=True, metavar="MODEL_DIR", help="folder to write model.npz and model.json to")
    t.add_argument("--hidden", default="256,256", metavar="N,N", help="hidden layer widths (default 256,256)")
    t.add_argument("--epochs", type=positive_int, default=60, help="training epochs (default 60)")
    t.add_argument("--holdout", type=float, default=0.2, help="fraction held out for the accuracy line (default 0.2)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--no-whiten", action="store_true",
                   help="keep the head's input as it is; by default it is whitened after training (the same "
                        "model, in coordinates the device's head step learns better in: docs/pretraining.md)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("export", help="export a trained model to ONNX + manifest.json (needs [train])",
                       description="Write MODEL_DIR/model.onnx (prototypes and gates as graph inputs), "
                                   "prototypes.npz and manifest.json, and check onnxruntime against torch.")
    e.add_argument("model_dir", metavar="MODEL_DIR")
    e.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-torch check")

    d = sub.add_parser("device", help="run the device: predict a sensor stream, adapt, sync (needs [device])",
                       description="Stream samples from a file or stdin, print a prediction per sample, "
                                   "adapt prototypes and gates with Forward-Forward, and sync them with the "
                                   "server over MQTT. State survives restarts in --state.")
    d.add_argument("--broker", type=broker_address, metavar="HOST:PORT",
                   help="MQTT broker; without it the device runs offline (needs --model)")
    d.add_argument("--id", required=True, metavar="NAME", help="device id (A-Z a-z 0-9 _ . -)")
    d.add_argument("--source", required=True, metavar="FILE|-", help="CSV with header (or gas .dat) file, or - for stdin")
    d.add_argument("--state", required=True, metavar="DIR", help="folder for the device's durable state")
    d.add_argument("--model", metavar="MODEL_DIR", help="exported model folder; default: pull it from the broker")
    d.add_argument("--label", metavar="COLUMN", help="CSV label column; an empty cell is an unlabeled sample (without --label every sample is)")
    d.add_argument("--label-every", type=positive_int, default=1, metavar="N",
                   help="learn from only every Nth label (simulates sparse labels; default 1 = all)")
    d.add_argument("--fleet", default="default", help="fleet name, the topic namespace (default 'default')")
    d.add_argument("--sync-every", type=positive_int, default=100, metavar="N", help="push a delta every N samples (default 100)")
    d.add_argument("--predictions", metavar="FILE", help="also write index,prediction,label,version CSV here")
    d.add_argument("--quiet", action="store_true", help="a running summary instead of a line per sample")
    d.add_argument("--wait", type=seconds, default=30.0, metavar="SEC", help="how long to wait for the broker and model (default 30)")
    d.add_argument("--lr-head", type=float, default=0.03, metavar="LR",
                   help="step size of the label-driven FF on the class prototypes (default 0.03; 0 = off)")
    d.add_argument("--lr-gate", type=float, default=0.2, metavar="LR",
                   help="step size of the class gates in that step (default 0.2)")
    d.add_argument("--lr-hidden", type=float, default=0.0, metavar="LR",
                   help="step size of the unsupervised FF on hidden layers (default 0 = off)")
    d.add_argument("--verify-key", metavar="FILE",
                   help="adopt only releases signed by this Ed25519 public key (release.pub of "
                        "`edge-spl keys`); unsigned or mis-signed ones are refused and counted")
    d.add_argument("--replay", type=int, default=16, metavar="N",
                   help="after each label, replay N head steps on recent labelled samples (default 16; 0 = off)")
    d.add_argument("--alpha", type=float, default=0.003, metavar="RATE",
                   help="rate of the running re-standardisation of the inputs (default 0.003); 0 keeps "
                        "the training statistics, better for a stream that dwells in one state for "
                        "hours, such as room occupancy (docs/device.md)")
    add_max_packet(d)
    add_broker_auth(d, "MQTT user name: the device id (--id), which the fleet ACL of docs/mosquitto.md expects")

    c = sub.add_parser("compile", help="build the device kernels ahead of time: less memory, faster start (needs [device], gcc)",
                       description="Compile the device's numba kernels ahead of time into a small extension "
                                   "module, once per machine, so `edge-spl device` runs them without numba or "
                                   "LLVM in memory (peak RSS ~70 MB instead of ~190 MB, start-up ~0.2 s). Needs "
                                   "a C compiler and the Python headers (apt install gcc python3-dev). A new "
                                   "edge-spl, Python or numpy makes the module stale: the device then runs on "
                                   "numba's JIT until you compile again.")
    c.add_argument("--dir", metavar="DIR",
                   help="where to keep the module (default $EDGE_SPL_KERNEL_DIR, else ~/.cache/edge-spl/kernels); "
                        "the device looks there too")
    c.add_argument("--check", action="store_true", help="only say whether a current module is there (exit 1 if not)")
    c.add_argument("--force", action="store_true",
                   help="build even when a current module is there (by default that is a quick no-op, so "
                        "a service can run `edge-spl compile` before every start)")

    s = sub.add_parser("server", help="merge device deltas and publish prototype versions (needs [server])",
                       usage="edge-spl server --broker HOST:PORT --model MODEL_DIR --state DIR [options]\n"
                             "       edge-spl server rollback --to VERSION --model MODEL_DIR --state DIR "
                             "[--broker HOST:PORT] [options]",
                       description="Publish the model and prototype versions (retained), validate and "
                                   "merge device deltas weighted by sample counts, keep every version in "
                                   "SQLite under --state. Stops on Ctrl-C / SIGTERM. "
                                   "`edge-spl server rollback --help`: go back to an earlier version.")
    # not required=True: `server rollback` needs no --broker (main() checks them for serving)
    s.add_argument("--broker", type=broker_address, metavar="HOST:PORT", help="MQTT broker (required)")
    s.add_argument("--model", metavar="MODEL_DIR", help="exported model folder (required)")
    s.add_argument("--state", metavar="DIR", help="folder for the version history, server.db (required)")
    s.add_argument("--fleet", default="default", help="fleet name, the topic namespace (default 'default')")
    s.add_argument("--merge-every", type=positive_seconds, default=1.0, metavar="SEC", help="merge pending deltas this often (default 1)")
    s.add_argument("--wait", type=seconds, default=30.0, metavar="SEC",
                   help="how long to keep trying to reach the broker at start (default 30)")
    s.add_argument("--signing-key", metavar="FILE",
                   help="sign every release with this Ed25519 private key (release.key of `edge-spl "
                        "keys`); devices check them with --verify-key release.pub")
    g = s.add_argument_group("what one device can do to the fleet (docs/sync.md)")
    g.add_argument("--merge", choices=["mean", "trimmed", "median"], default="mean",
                   help="how a round's deltas combine per row: the sample-count-weighted mean (default), "
                        "or one vote per delta: a 20%%-trimmed mean or the median of the steps")
    g.add_argument("--clip-norm", type=positive_float, default=100.0, metavar="N",
                   help="scale each delta row's step down to this norm (default 100; the device's "
                        "rows move by at most ~55 per 100 samples)")
    g.add_argument("--max-count", type=positive_float, default=10000.0, metavar="N",
                   help="cap each delta row's sample count, its weight in the mean (default 10000)")
    add_max_packet(s)
    add_broker_auth(s, "MQTT user name of the server (edge-spl-server in docs/mosquitto.md)")
    s.set_defaults(server_action=None)
    p.server_parser = s   # main() checks what serving needs
    if with_rollback:
        _add_rollback(s)

    k = sub.add_parser("keys", help="make the Ed25519 key pair that signs releases (needs [server])",
                       description="Write DIR/release.key, the private key (mode 0600; for `edge-spl "
                                   "server --signing-key`), and DIR/release.pub, the public key (for every "
                                   "device's --verify-key). Keep release.key on the server only.")
    k.add_argument("--out", required=True, metavar="DIR", help="folder to write the two files to (made if missing)")
    k.add_argument("--force", action="store_true",
                   help="replace an existing key pair (devices holding the old release.pub then refuse "
                        "new releases until they get the new one)")

    st = sub.add_parser("status", help="the fleet as a table: every device's state, version, samples, outbox",
                        description="Read the fleet's retained messages on the broker and print one row "
                                    "per device and the fleet's current release. A device is online (it "
                                    "reported within 3 heartbeats of 60 s), silent (it says online but has "
                                    "not reported for longer: gone without a will), offline (it said "
                                    "goodbye) or lost (the broker published its last will); then the "
                                    "release version it runs, samples seen, deltas in its outbox, when it "
                                    "last reported. Exits 1 when the fleet has neither a release nor a device.")
    st.add_argument("--broker", type=broker_address, required=True, metavar="HOST:PORT", help="MQTT broker")
    st.add_argument("--fleet", default="default", help="fleet name, the topic namespace (default 'default')")
    st.add_argument("--wait", type=positive_seconds, default=2.0, metavar="SEC",
                    help="how long to collect the retained statuses (default 2)")
    st.add_argument("--json", action="store_true", help="print JSON instead of the table")
    st.add_argument("--verify-key", metavar="FILE",
                    help="check the release's signature with this public key (release.pub); one that "
                         "does not verify counts as malformed")
    add_broker_auth(st, "MQTT user name (one that may read the fleet's status and release topics)")

    m = sub.add_parser("demo", help="the whole loop on the gas drift data (needs [demo])",
                       description="Train on gas drift batch 1, export, start the server and N device "
                                   "processes that stream batches 2..6, and report frozen vs adapted accuracy.")
    m.add_argument("--data", default=None, metavar="DIR", help="gas drift folder (default ../shared/data/gas-sensor-drift)")
    m.add_argument("--out", default="edge-spl-demo", metavar="DIR", help="output folder (default ./edge-spl-demo)")
    m.add_argument("--broker", type=broker_address, metavar="HOST:PORT", help="use this broker instead of the embedded one")
    m.add_argument("--devices", type=demo_devices, default=3, help=f"device processes (default 3, at most {MAX_DEMO_DEVICES})")
    m.add_argument("--label-every", type=positive_int, default=1, metavar="N",
                   help="devices learn from every Nth label (default 1 = every label, after its prediction)")
    m.add_argument("--epochs", type=positive_int, default=60, help="pretraining epochs (default 60)")
    m.add_argument("--limit", type=positive_int, metavar="N",
                   help="stream only the first N samples of each batch (a quick try)")
    m.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    bench = sub.add_parser("bench", help="benchmarks that print tables and compare alternatives (needs [bench])",
                           description="Benchmarks: each prints a table, writes JSON and a plot, and "
                                       "compares alternatives in the same run.")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    ba = bsub.add_parser("adapt", help="accuracy under real drift: edge-spl's device learner vs the alternatives",
                         description="Prequential accuracy and macro-F1 on gas drift (pretrain batch 1, "
                                     "stream 2..6) and occupancy (pretrain datatraining, stream datatest2), "
                                     "three label regimes, shuffled and file order, for: frozen model, "
                                     "edge-spl (and its ablations), BP fine-tuning of P and g, streaming "
                                     "SLDA, last-label, river LR and ARF; plus the cosine between FF "
                                     "updates and BP gradients.")
    ba.add_argument("--data", default=None, metavar="DIR",
                    help="folder holding gas-sensor-drift/ and occupancy/ (default ../shared/data)")
    ba.add_argument("--out", default="bench-adapt", metavar="DIR", help="output folder (default ./bench-adapt)")
    ba.add_argument("--seeds", type=positive_int, default=3, help="shuffle/pretraining seeds (default 3)")
    ba.add_argument("--limit", type=positive_int, metavar="N", help="stream only N samples per batch (smoke run)")
    ba.add_argument("--epochs", type=positive_int, default=60, help="pretraining epochs (default 60)")
    ba.add_argument("--only", metavar="NAME,NAME", help="run only these learners (default: all)")
    bs = bsub.add_parser("speed", help="device speed and footprint against the alternatives and this machine's limits",
                         description="Learn step (edge-spl's numba kernels vs numpy vs torch, and the fraction "
                                     "of the 1-core roofline), inference (live P, g vs baked, torch eager), the "
                                     "whole device step, start-up and peak RSS of `edge-spl device`, delta and "
                                     "release bytes, the server's merge rate; interleaved, medians over rounds. "
                                     "docs/bench-speed.md explains every figure.")
    bs.add_argument("--out", default="bench-speed", metavar="DIR", help="output folder (default ./bench-speed)")
    bs.add_argument("--rounds", type=positive_int, metavar="N", help="timing rounds (default 7; --quick 2)")
    bs.add_argument("--quick", action="store_true", help="tiny sizes and few rounds: a smoke run, figures mean nothing")
    bs.add_argument("--broker", type=broker_address, metavar="HOST:PORT",
                    help="MQTT broker for the server figures (default 127.0.0.1:1883)")
    bk = bsub.add_parser("soak", help="the fleet under random broker, device and server kills: is any delta lost or merged twice?",
                         description="Start a mosquitto (persistence on), the server and N device processes "
                                     "streaming gas drift samples, each with its own --state; for M minutes "
                                     "SIGKILL and restart, at seeded random times, the broker (same port and "
                                     "persistence file), devices (same --state) and the server (same --state). "
                                     "Then drain, stop everything cleanly and audit the durable records: deltas "
                                     "made (device states), merged (server.db), lost, merged twice, the longest "
                                     "reconnect after a broker restart. Writes OUT/bench_soak.json, prints a "
                                     "table; exits 1 if a delta was lost or merged twice. docs/bench-soak.md "
                                     "explains every figure.")
    bk.add_argument("--devices", type=positive_int, default=20, metavar="N", help="device processes (default 20, at most 64)")
    bk.add_argument("--minutes", type=positive_minutes, default=3.0, metavar="M",
                    help="how long faults are injected (default 3; the drain and start-up come on top)")
    bk.add_argument("--out", default="bench-soak", metavar="DIR",
                    help="output folder (default ./bench-soak); DIR/run keeps every process's state and log")
    bk.add_argument("--seed", type=int, default=0, help="seed of the fault schedule and the sample order (default 0)")
    bk.add_argument("--data", default=None, metavar="DIR",
                    help="gas drift folder, batch1..6.dat (default ../shared/data/gas-sensor-drift)")

    b = sub.add_parser("broker", help="run the embedded MQTT 3.1.1 broker (needs [demo])",
                       description="A small MQTT broker (amqtt) for trying edge-spl without mosquitto. "
                                   "For deployments use mosquitto (docs/deploy.md).")
    b.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    b.add_argument("--port", type=port_number, default=0, help="port (default: a free one, printed at start)")
    _finish(p)
    return p


def _add_rollback(s: argparse.ArgumentParser) -> None:
    actions = s.add_subparsers(dest="server_action", metavar="ACTION", required=False)
    # argument_default=SUPPRESS: an option given before `rollback` is not reset by its default here
    r = actions.add_parser("rollback", help="publish an earlier version's prototypes as a new version",
                           prog="edge-spl server rollback", argument_default=argparse.SUPPRESS,
                           description="Store a new version (the latest + 1, so devices take it as newer) "
                                       "whose prototypes are those of version --to, keeping the latest "
                                       "merged marks (devices do not resend deltas already merged). With "
                                       "--broker it is published (retained) at once; otherwise the next "
                                       "`edge-spl server` on --state publishes it. Refuses while a server "
                                       "runs on --state.")
    r.add_argument("--to", type=version_number, required=True, metavar="VERSION",
                   help="the version whose prototypes to go back to")
    r.add_argument("--state", required=True, metavar="DIR", help="the server's --state folder")
    r.add_argument("--model", required=True, metavar="MODEL_DIR", help="the server's exported model folder")
    r.add_argument("--broker", type=broker_address, metavar="HOST:PORT",
                   help="publish the new version there now (default: the next server start does)")
    r.add_argument("--fleet", metavar="NAME", help="fleet name (default 'default')")
    r.add_argument("--signing-key", metavar="FILE", help="sign the release with this private key")
    add_broker_auth(r, "MQTT user name of the server")


def _finish(p: argparse.ArgumentParser) -> None:
    """On every (sub)parser: -v after the command too, and no abbreviated options (a prefix such
    as --lab would otherwise be taken for --label without a word)."""
    stack = [p]
    while stack:
        q = stack.pop()
        q.allow_abbrev = False
        if q is not p:
            q.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                           help="log debug messages")
        for a in q._actions:
            if isinstance(a, argparse._SubParsersAction):
                stack.extend(a.choices.values())


def _command_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The innermost (sub)parser that parsed `args`."""
    q = parser
    for dest in ("command", "bench_command", "server_action"):
        name = getattr(args, dest, None)
        sub = next((a for a in q._actions if isinstance(a, argparse._SubParsersAction) and a.dest == dest), None)
        if name is None or sub is None:
            continue
        q = sub.choices[name]
    return q


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(with_rollback="rollback" in argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:   # said by the command's own parser, with its usage, not the top-level one
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "server" and args.server_action is None:
        missing = [o for o in ("--broker", "--model", "--state") if getattr(args, o[2:]) is None]
        if missing:
            parser.server_parser.error(f"the following arguments are required: {', '.join(missing)}")
    # edge-spl's own INFO lines; other libraries' only from WARNING up (setuptools logs each gcc
    # call of `compile` at INFO, torch its tracing), unless --verbose
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("edge_spl").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    module, extra = COMMANDS[args.command]
    name = f"{args.command} {args.server_action}" if getattr(args, "server_action", None) else args.command
    try:
        run = importlib.import_module(f"edge_spl.cli.{module}").run
    except ImportError as e:
        if (e.name or "").startswith("edge_spl"):
            raise
        print(f"edge-spl {name}: missing dependency {e.name!r}; install it with "
              f"pip install 'edge-spl[{extra}]'", file=sys.stderr)
        return 2
    try:
        return run(args) or 0
    except ModuleNotFoundError as e:
        if (e.name or "edge_spl").split(".")[0] == "edge_spl":
            raise
        print(f"edge-spl {name}: missing dependency {e.name!r}; install it with "
              f"pip install 'edge-spl[{extra}]'", file=sys.stderr)
        return 2
    except EdgeSplError as e:
        print(f"edge-spl {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edge-spl {name}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        # the file system or the network refused something (a folder where a file should be, a
        # full disk, a port in use): the user's to fix, so one line like any EdgeSplError
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"edge-spl {name}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"edge-spl {name}: error: out of memory", file=sys.stderr)
        return 1
    except Exception as e:
        # a bug: still one line (the traceback with --verbose), never a wall of text
        logging.getLogger("edge_spl").debug("internal error", exc_info=True)
        print(f"edge-spl {name}: internal error ({type(e).__name__}: {str(e)[:200]}); "
              f"`edge-spl --verbose {name} ...` shows the traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
