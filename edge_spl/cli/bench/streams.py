"""The streams of `edge-spl bench adapt`: the two drift datasets cut into batches, the two
stream orders, the three label regimes, and the per-batch scores.

Gas drift: pretrain on batch1.dat, stream batch2..batch6.dat (one batch per file).
Occupancy: pretrain on datatraining.txt, stream datatest2.txt split into calendar days (the file
is in time order; a day is a batch, so per-batch scores show the week day by day).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

from edge_spl.data import Dataset, load_gas_batches, load_gas_file, load_occupancy
from edge_spl.errors import DataError

GAS_DIR = "gas-sensor-drift"
OCCUPANCY_DIR = "occupancy"
GAS_STREAM = [2, 3, 4, 5, 6]
DATASETS = ("gas", "occupancy")
ORDERS = ("shuffled", "file")
REGIMES = ("none", "5pct", "all")
LABEL_EVERY = 20   # regime 5pct: samples 0, 20, 40, ... of the stream, like `edge-spl device --label-every 20`


@dataclass
class Batch:
    name: str
    X: np.ndarray   # raw features, float32 [n, d]
    y: np.ndarray   # class index, int64 [n]


@dataclass
class Task:
    """One dataset of the benchmark: what to pretrain on and the batches to stream."""
    name: str
    train: Dataset
    class_names: list[str]
    batches: list[Batch]
    hidden: list[int]       # hidden widths to pretrain
    batch_kind: str         # what a batch is, for tables and the plot


@dataclass
class Stream:
    """One pass over a task's batches in one order: the samples, their labels and batch numbers."""
    X: np.ndarray           # float32 [n, d]
    y: np.ndarray           # int64 [n]
    batch: np.ndarray       # int64 [n], index into names
    names: list[str]


def _indices(labels, class_names: list[str], where: str) -> np.ndarray:
    index = {c: k for k, c in enumerate(class_names)}
    try:
        return np.array([index[v] for v in labels], np.int64)
    except KeyError as e:
        raise DataError(f"{where}: label {e.args[0]!r} is not among the training classes {class_names}") from None


def load_gas_task(data_dir: str) -> Task:
    folder = os.path.join(data_dir, GAS_DIR)
    train = load_gas_file(os.path.join(folder, "batch1.dat"))
    classes = train.classes()
    batches = [Batch(str(b), ds.X, _indices(ds.y, classes, ds.source))
               for b, ds in zip(GAS_STREAM, load_gas_batches(folder, GAS_STREAM))]
    return Task("gas", train, classes, batches, [256, 256], "gas batch")


def _csv_column(path: str, name: str) -> list[str]:
    """One column of a CSV, skipping blank rows as `edge_spl.data.load_csv` does."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader)]
        if name not in header:
            raise DataError(f"{path}: no {name!r} column; columns are {header}")
        j = header.index(name)
        return [r[j].strip() for r in reader if any(c.strip() for c in r)]


def load_occupancy_task(data_dir: str) -> Task:
    folder = os.path.join(data_dir, OCCUPANCY_DIR)
    train = load_occupancy(folder, "datatraining.txt")
    classes = train.classes()
    test = load_occupancy(folder, "datatest2.txt")
    days = [d[:10] for d in _csv_column(test.source, "date")]
    if len(days) != len(test):
        raise DataError(f"{test.source}: {len(days)} dates for {len(test)} rows")
    y = _indices(test.y, classes, test.source)
    batches, start = [], 0
    for i in range(1, len(days) + 1):
        if i == len(days) or days[i] != days[start]:
            batches.append(Batch(days[start][5:], test.X[start:i], y[start:i]))
            start = i
    return Task("occupancy", train, classes, batches, [32, 32], "day")


def load_tasks(data_dir: str) -> list[Task]:
    need = {GAS_DIR: ["batch1.dat"] + [f"batch{b}.dat" for b in GAS_STREAM],
            OCCUPANCY_DIR: ["datatraining.txt", "datatest2.txt"]}
    for sub, files in need.items():
        missing = [f for f in files if not os.path.isfile(os.path.join(data_dir, sub, f))]
        if missing:
            raise DataError(f"{os.path.join(data_dir, sub)}: missing {', '.join(missing)}; --data must be a "
                            f"folder holding {GAS_DIR}/ (UCI gas sensor array drift, batch1..6.dat) and "
                            f"{OCCUPANCY_DIR}/ (UCI occupancy detection, datatraining.txt, datatest2.txt)")
    return [load_gas_task(data_dir), load_occupancy_task(data_dir)]


def make_stream(task: Task, order: str, seed: int = 0, limit: int | None = None) -> Stream:
    """Batches in their order; within a batch, file order or a permutation drawn from `seed`.
    `limit` keeps the first N samples of each (ordered) batch."""
    if order not in ORDERS:
        raise ValueError(f"order {order!r}: expected one of {ORDERS}")
    rng = np.random.default_rng(seed)
    Xs, ys, bs = [], [], []
    for k, b in enumerate(task.batches):
        idx = rng.permutation(len(b.y)) if order == "shuffled" else np.arange(len(b.y))
        idx = idx[:limit] if limit else idx
        Xs.append(b.X[idx])
        ys.append(b.y[idx])
        bs.append(np.full(len(idx), k, np.int64))
    return Stream(np.ascontiguousarray(np.concatenate(Xs), np.float32), np.concatenate(ys),
                  np.concatenate(bs), [b.name for b in task.batches])


def revealed_labels(y: np.ndarray, regime: str) -> np.ndarray:
    """The label each step may learn from (-1: not revealed). Labels come after the prediction;
    the prequential loop sees to that."""
    out = np.full(len(y), -1, np.int64)
    if regime == "all":
        out[:] = y
    elif regime == "5pct":
        out[::LABEL_EVERY] = y[::LABEL_EVERY]
    elif regime != "none":
        raise ValueError(f"regime {regime!r}: expected one of {REGIMES}")
    return out


def macro_f1(pred: np.ndarray, y: np.ndarray) -> float:
    """Mean F1 (%) over the classes present in y; predictions of absent classes count as false
    positives of nothing but lower the recall of the class they were drawn from."""
    f1s = []
    for c in np.unique(y):
        tp = np.sum((pred == c) & (y == c))
        fp = np.sum((pred == c) & (y != c))
        fn = np.sum((pred != c) & (y == c))
        f1s.append(2.0 * tp / (2.0 * tp + fp + fn))
    return 100.0 * float(np.mean(f1s)) if f1s else float("nan")


def batch_scores(pred: np.ndarray, stream: Stream) -> list[dict]:
    rows = []
    for k, name in enumerate(stream.names):
        sel = stream.batch == k
        if not np.any(sel):
            continue
        p, y = pred[sel], stream.y[sel]
        rows.append({"batch": name, "n": int(sel.sum()), "acc": 100.0 * float(np.mean(p == y)),
                     "f1": macro_f1(p, y)})
    return rows
