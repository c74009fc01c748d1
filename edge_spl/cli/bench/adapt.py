"""`edge-spl bench adapt`: prequential accuracy under real drift, edge-spl's device learner against
the alternatives, every learner on the same streams in one run.

For each dataset (gas, occupancy) and seed: pretrain an SPL model (holdout 0) and export it in
memory; then for each order (shuffled: every seed; file: seed 0 only), label regime (none, 5pct,
all) and learner: a fresh learner predicts each sample, then learns from its label if revealed.
Writes OUT/bench_adapt.json and OUT/bench_adapt.png, prints the tables. docs/bench-adapt.md
describes every choice.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from edge_spl.errors import EdgeSplError
from edge_spl.files import atomic_write_bytes

from . import learners as L
from .report import plot, print_tables
from .streams import ORDERS, REGIMES, Stream, Task, batch_scores, load_tasks, make_stream, revealed_labels

COSINE_WINDOW = 50


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def data_root(arg: str | None) -> str:
    if arg:
        return arg
    from edge_spl.cli import default_gas_dir

    gas = default_gas_dir()
    if gas is None:
        raise EdgeSplError("no data found at ../shared/data; pass --data DIR (a folder holding "
                           "gas-sensor-drift/ and occupancy/)")
    return os.path.dirname(gas)


def learner_names(only: str | None) -> list[str]:
    if not only:
        return list(L.LEARNERS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in L.LEARNERS]
    if unknown or not names:
        raise EdgeSplError(f"--only {only!r}: unknown learner(s) {unknown}; expected names from "
                           f"{', '.join(L.LEARNERS)}")
    # frozen always runs: it is the reference for "worst batch vs frozen"
    return [n for n in L.LEARNERS if n == "frozen" or n in names]


def prequential(learner, stream: Stream, learn: np.ndarray) -> tuple[np.ndarray, float]:
    """Predict each sample, then learn from its revealed label. Returns (predictions, samples/s)."""
    pred = np.empty(len(stream.y), np.int64)
    X = stream.X
    t0 = time.perf_counter()
    for i in range(len(pred)):
        pred[i] = learner.step(X[i], int(learn[i]))
    return pred, len(pred) / max(time.perf_counter() - t0, 1e-9)


def run_one(run: dict) -> dict:
    rows = run["per_batch"]
    return {"mean_acc": float(np.mean([r["acc"] for r in rows])),
            "mean_f1": float(np.mean([r["f1"] for r in rows]))}


def aggregate(runs: list[dict]) -> dict:
    """Mean over seeds (sd too), per-batch means, and the worst batch vs frozen over all seeds."""
    accs = [r["mean_acc"] for r in runs]
    f1s = [r["mean_f1"] for r in runs]
    ddof = 1 if len(runs) > 1 else 0
    per_batch = []
    for k, row in enumerate(runs[0]["per_batch"]):
        per_batch.append({"batch": row["batch"], "n": row["n"],
                          "acc": float(np.mean([r["per_batch"][k]["acc"] for r in runs])),
                          "f1": float(np.mean([r["per_batch"][k]["f1"] for r in runs]))})
    return {"mean_acc": float(np.mean(accs)), "sd_acc": float(np.std(accs, ddof=ddof)),
            "mean_f1": float(np.mean(f1s)), "sd_f1": float(np.std(f1s, ddof=ddof)),
            "per_batch": per_batch,
            "samples_per_s": float(np.mean([r["samples_per_s"] for r in runs])),
            "worst_vs_frozen": float(min(r["worst_vs_frozen"] for r in runs)),
            "seeds": runs}


def _rounded(obj):
    """Five significant digits: enough for percentages and rates, readable JSON."""
    if isinstance(obj, float):
        return float(f"{obj:.5g}") if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    return obj


def pretrain_models(task: Task, seeds, epochs: int, out_dir: str) -> dict:
    from edge_spl.export.onnx_export import export_model
    from edge_spl.export.pretrain import pretrain

    models = {}
    for seed in seeds:
        t0 = time.perf_counter()
        state, report = pretrain(task.train, hidden=task.hidden, epochs=epochs, holdout=0.0, seed=seed)
        if list(state.class_names) != task.class_names:
            raise EdgeSplError(f"{task.name}: model classes {state.class_names} differ from the stream's")
        state.save(os.path.join(out_dir, "models", f"{task.name}-seed{seed}"))
        models[seed] = (state, export_model(state), report)
        say(f"[{task.name}] pretrained seed {seed}: {state.sizes}, train acc "
            f"{100 * report['train_acc']:.1f}%, active {[round(a, 2) for a in report['active']]} "
            f"({time.perf_counter() - t0:.1f} s)")
    return models


def bench_task(task: Task, models: dict, names: list[str], seeds, limit) -> dict:
    out = {}
    for order in ORDERS:
        runs = {r: {n: [] for n in names if L.runs_in(n, r)} for r in REGIMES}
        for seed in (seeds if order == "shuffled" else [seeds[0]]):
            state, exported, _ = models[seed]
            ctx = L.Context(state, exported, task.train, task.class_names, seed)
            stream = make_stream(task, order, seed, limit)
            for regime in REGIMES:
                learn = revealed_labels(stream.y, regime)
                frozen_acc = None
                for name in runs[regime]:
                    t0 = time.perf_counter()
                    pred, sps = prequential(L.make_learner(name, ctx), stream, learn)
                    rows = batch_scores(pred, stream)
                    accs = np.array([r["acc"] for r in rows])
                    if name == "frozen":
                        frozen_acc = accs
                    run = {"seed": seed, **run_one({"per_batch": rows}), "per_batch": rows,
                           "samples_per_s": sps, "worst_vs_frozen": float(np.min(accs - frozen_acc))}
                    runs[regime][name].append(run)
                    say(f"[{task.name} {order} seed {seed} {regime}] {name}: acc {run['mean_acc']:.1f}%, "
                        f"F1 {run['mean_f1']:.1f}%, worst batch vs frozen {run['worst_vs_frozen']:+.1f}, "
                        f"{sps:.0f} samples/s ({time.perf_counter() - t0:.1f} s)")
        out[order] = {r: {n: aggregate(v) for n, v in runs[r].items()} for r in REGIMES}
    return out


def run(args) -> int:
    import torch

    t_start = time.perf_counter()
    root = data_root(args.data)
    names = learner_names(args.only)
    seeds = list(range(args.seeds))
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    tasks = load_tasks(root)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # fairness: every learner gets one core
    try:
        result, pretrained = {}, {}
        cosine = None
        for task in tasks:
            models = pretrain_models(task, seeds, args.epochs, out_dir)
            pretrained[task.name] = [{k: rep[k] for k in ("sizes", "train_acc", "active", "epochs", "seed", "seconds")}
                                     for _, _, rep in models.values()]
            result[task.name] = bench_task(task, models, names, seeds, args.limit)
            if task.name == "gas":
                from .cosine import ff_bp_cosine

                t0 = time.perf_counter()
                state, exported, _ = models[seeds[0]]
                stream = make_stream(task, "shuffled", seeds[0], args.limit)
                cosine = {"dataset": "gas", "order": "shuffled", "regime": "all", "learner": "edge-spl",
                          **ff_bp_cosine(state, exported, stream, revealed_labels(stream.y, "all"),
                                         seed=seeds[0], window=COSINE_WINDOW)}
                per_sample = ", ".join(f"{c['layer']} {c['kind']} " + ("—" if c["mean_per_sample"] is None
                                       else f"{c['mean_per_sample']:.2f}") for c in cosine["layers"])
                say(f"[gas shuffled seed {seeds[0]} all] FF-vs-BP cosine per sample: {per_sample} "
                    f"({time.perf_counter() - t0:.1f} s)")
    finally:
        torch.set_num_threads(threads)

    seconds = time.perf_counter() - t_start
    result["cosine"] = cosine
    result["meta"] = {
        "seconds": seconds, "seeds": seeds, "limit": args.limit, "epochs": args.epochs,
        "learners": names, "cpus": os.cpu_count(), "label_every": 20,
        "orders": {"shuffled": "each batch shuffled by the seed, batch order kept; mean over seeds",
                   "file": "file order, seed 0 only"},
        "batches": {"gas": "batch2..batch6.dat", "occupancy": "datatest2.txt, one batch per calendar day"},
        "settings": {"bp_lr": L.BP_LR, "slda_shrinkage": L.SLDA_SHRINKAGE,
                     "edge_spl_variants": L.EDGE_SPL_VARIANTS},
        "pretrain": pretrained,
    }
    json_path = os.path.join(out_dir, "bench_adapt.json")
    png_path = os.path.join(out_dir, "bench_adapt.png")
    atomic_write_bytes(json_path, json.dumps(_rounded(result), indent=1).encode())
    plot(result, png_path)
    print_tables(result)
    print(f"total {seconds:.0f} s; wrote {json_path}, {png_path} and the models under {out_dir}/models")
    return 0
