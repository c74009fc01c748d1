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
    "server": ("server", "server"),
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


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return v


def build_parser() -> argparse.ArgumentParser:
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
    t.add_argument("--features", metavar="COL,COL", help="CSV feature columns (default: every numeric column but the label)")
    t.add_argument("--out", required=True, metavar="MODEL_DIR", help="folder to write model.npz and model.json to")
    t.add_argument("--hidden", default="256,256", metavar="N,N", help="hidden layer widths (default 256,256)")
    t.add_argument("--epochs", type=positive_int, default=60, help="training epochs (default 60)")
    t.add_argument("--holdout", type=float, default=0.2, help="fraction held out for the accuracy line (default 0.2)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
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
    d.add_argument("--label", metavar="COLUMN", help="CSV label column (absent or empty = unlabeled)")
    d.add_argument("--label-every", type=positive_int, default=1, metavar="N",
                   help="learn from only every Nth label (simulates sparse labels; default 1 = all)")
    d.add_argument("--fleet", default="default", help="fleet name, the topic namespace (default 'default')")
    d.add_argument("--sync-every", type=positive_int, default=100, metavar="N", help="push a delta every N samples (default 100)")
    d.add_argument("--predictions", metavar="FILE", help="also write index,prediction,label,version CSV here")
    d.add_argument("--quiet", action="store_true", help="a running summary instead of a line per sample")
    d.add_argument("--wait", type=seconds, default=30.0, metavar="SEC", help="how long to wait for the broker and model (default 30)")
    d.add_argument("--lr-head", type=float, default=0.02, metavar="LR",
                   help="step size of the label-driven FF on the class prototypes (default 0.02; 0 = off)")
    d.add_argument("--lr-gate", type=float, default=0.2, metavar="LR",
                   help="step size of the class gates in that step (default 0.2)")
    d.add_argument("--lr-hidden", type=float, default=0.0, metavar="LR",
                   help="step size of the unsupervised FF on hidden layers (default 0 = off)")

    s = sub.add_parser("server", help="merge device deltas and publish prototype versions (needs [server])",
                       description="Publish the model and prototype versions (retained), validate and "
                                   "merge device deltas weighted by sample counts, keep every version in "
                                   "SQLite under --state. Stops on Ctrl-C / SIGTERM.")
    s.add_argument("--broker", type=broker_address, required=True, metavar="HOST:PORT")
    s.add_argument("--model", required=True, metavar="MODEL_DIR", help="exported model folder")
    s.add_argument("--state", required=True, metavar="DIR", help="folder for the version history (server.db)")
    s.add_argument("--fleet", default="default", help="fleet name, the topic namespace (default 'default')")
    s.add_argument("--merge-every", type=positive_seconds, default=1.0, metavar="SEC", help="merge pending deltas this often (default 1)")

    m = sub.add_parser("demo", help="the whole loop on the gas drift data (needs [demo,train,device,server])",
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

    b = sub.add_parser("broker", help="run the embedded MQTT 3.1.1 broker (needs [demo])",
                       description="A small MQTT broker (amqtt) for trying edge-spl without mosquitto. "
                                   "For deployments use mosquitto (docs/deploy.md).")
    b.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    b.add_argument("--port", type=port_number, default=0, help="port (default: a free one, printed at start)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    module, extra = COMMANDS[args.command]
    try:
        run = importlib.import_module(f"edge_spl.cli.{module}").run
    except ImportError as e:
        if (e.name or "").startswith("edge_spl"):
            raise
        print(f"edge-spl {args.command}: missing dependency {e.name!r}; install it with "
              f"pip install 'edge-spl[{extra}]'", file=sys.stderr)
        return 2
    try:
        return run(args) or 0
    except EdgeSplError as e:
        print(f"edge-spl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edge-spl {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        # the file system or the network refused something (a folder where a file should be, a
        # full disk, a port in use): the user's to fix, so one line like any EdgeSplError
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"edge-spl {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"edge-spl {args.command}: error: out of memory", file=sys.stderr)
        return 1
    except Exception as e:
        # a bug: still one line (the traceback with --verbose), never a wall of text
        logging.getLogger("edge_spl").debug("internal error", exc_info=True)
        print(f"edge-spl {args.command}: internal error ({type(e).__name__}: {str(e)[:200]}); "
              f"`edge-spl --verbose {args.command} ...` shows the traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
