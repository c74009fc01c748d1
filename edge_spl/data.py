"""Data sources: the gas drift `.dat` files, the occupancy CSVs, and a user's own CSV sensor log.

Two ways in: `load_*` reads a whole training set (any bad line is an error), `iter_samples`
streams rows for the device from a file or stdin (a bad line is reported and skipped).
Labels are kept as the strings the file holds (gas classes get their gas names).
"""
from __future__ import annotations

import csv
import io
import os
import sys
from dataclasses import dataclass
from typing import Iterator, TextIO

import numpy as np

from .errors import DataError

GAS_CLASSES = ["ethanol", "ethylene", "ammonia", "acetaldehyde", "acetone", "toluene"]
GAS_FEATURES = [f"s{s + 1}f{k + 1}" for s in range(16) for k in range(8)]
OCCUPANCY_FEATURES = ["Temperature", "Humidity", "Light", "CO2", "HumidityRatio"]
OCCUPANCY_LABEL = "Occupancy"


@dataclass
class Dataset:
    X: np.ndarray            # n x d float32
    y: list[str | None]      # label per row, None when unlabeled
    feature_names: list[str]
    source: str = ""
    class_names: list[str] | None = None  # the full, ordered class list when the format fixes one

    def __len__(self):
        return len(self.y)

    def classes(self) -> list[str]:
        if self.class_names is not None:
            return list(self.class_names)
        return sorted({v for v in self.y if v is not None}, key=_natural_key)


def _natural_key(s: str):
    try:
        return (0, float(s), s)
    except ValueError:
        return (1, 0.0, s)


# -- gas drift -------------------------------------------------------------------------------

def parse_gas_line(line: str, where: str) -> tuple[np.ndarray, str]:
    parts = line.split()
    if not parts:
        raise DataError(f"{where}: empty line")
    try:
        cls = int(parts[0].split(";")[0])
    except ValueError:
        raise DataError(f"{where}: expected `CLASS i:v ...`, got {line[:40]!r}") from None
    if not 1 <= cls <= len(GAS_CLASSES):
        raise DataError(f"{where}: class {cls} outside 1..{len(GAS_CLASSES)}")
    x = np.empty(len(GAS_FEATURES), np.float32)
    if len(parts) - 1 != len(GAS_FEATURES):
        raise DataError(f"{where}: {len(parts) - 1} features, expected {len(GAS_FEATURES)}")
    for j, tok in enumerate(parts[1:]):
        idx, _, val = tok.partition(":")
        try:
            if int(idx) != j + 1:
                raise ValueError
            x[j] = float(val)
        except ValueError:
            raise DataError(f"{where}: bad feature {tok!r} (expected {j + 1}:VALUE)") from None
    return x, GAS_CLASSES[cls - 1]


def load_gas_file(path: str) -> Dataset:
    rows, labels = [], []
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                x, y = parse_gas_line(line, f"{path}:{n}")
                rows.append(x)
                labels.append(y)
    if not rows:
        raise DataError(f"{path}: no samples")
    return Dataset(np.stack(rows), labels, list(GAS_FEATURES), path, list(GAS_CLASSES))


def gas_batch_path(data_dir: str, batch: int) -> str:
    return os.path.join(data_dir, f"batch{batch}.dat")


def load_gas_batches(data_dir: str, batches) -> list[Dataset]:
    return [load_gas_file(gas_batch_path(data_dir, b)) for b in batches]


# -- CSV (occupancy and a user's own log) -----------------------------------------------------

def _header(reader, where: str) -> list[str]:
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{where}: empty file, expected a CSV header row") from None
    except csv.Error as e:
        raise DataError(f"{where}: not CSV ({e})") from None
    header = [h.strip() for h in header]
    if len(set(header)) != len(header):
        raise DataError(f"{where}: duplicate column names in header {header}")
    return header


def _float(v: str) -> float:
    v = v.strip()
    if not v:
        raise ValueError("empty")
    return float(v)


def load_csv(path: str, label: str | None = None, features: list[str] | None = None) -> Dataset:
    """A CSV with a header row. `features` defaults to every column other than `label` whose
    values are all numbers, except a row counter (whole numbers that rise by one each row).
    Rows with an empty label are unlabeled."""
    with _open_text(path) as f:
        reader = csv.reader(f)
        header = _header(reader, path)
        rows = [r for r in reader if any(c.strip() for c in r)]
    if label is not None and label not in header:
        raise DataError(f"{path}: no label column {label!r}; columns are {header}")
    for n, r in enumerate(rows, 2):
        if len(r) != len(header):
            raise DataError(f"{path}:{n}: {len(r)} fields, header has {len(header)}")
    if features is None:
        features = []
        for j, name in enumerate(header):
            if name == label:
                continue
            try:
                values = np.array([_float(r[j]) for r in rows])
            except ValueError:
                continue
            if len(values) > 1 and np.all(np.diff(values) == 1):
                continue   # a row counter such as the occupancy files' "sno"
            features.append(name)
        if not features:
            raise DataError(f"{path}: no numeric feature columns")
    missing = [c for c in features if c not in header]
    if missing:
        raise DataError(f"{path}: feature columns {missing} not in header {header}")
    cols = [header.index(c) for c in features]
    X = np.empty((len(rows), len(cols)), np.float32)
    for n, r in enumerate(rows):
        for k, j in enumerate(cols):
            try:
                X[n, k] = _float(r[j])
            except ValueError:
                raise DataError(f"{path}:{n + 2}: column {header[j]!r} is {r[j]!r}, not a number") from None
    if not rows:
        raise DataError(f"{path}: no data rows")
    y = [None] * len(rows)
    if label is not None:
        li = header.index(label)
        y = [r[li].strip() or None for r in rows]
    return Dataset(X, y, list(features), path)


def load_occupancy(data_dir: str, name: str = "datatraining.txt") -> Dataset:
    return load_csv(os.path.join(data_dir, name), OCCUPANCY_LABEL, OCCUPANCY_FEATURES)


# -- training data from --data DIR|FILE ------------------------------------------------------

def load_training_data(path: str, label: str | None = None, features=None) -> Dataset:
    """What `edge-spl train --data` accepts: the gas drift folder (trains on batch 1), the
    occupancy folder (datatraining.txt), a gas `.dat` file, or a CSV file (needs --label)."""
    if os.path.isdir(path):
        if os.path.isfile(gas_batch_path(path, 1)):
            return load_gas_file(gas_batch_path(path, 1))
        if os.path.isfile(os.path.join(path, "datatraining.txt")):
            return load_occupancy(path)
        raise DataError(f"{path}: no batch1.dat (gas drift) or datatraining.txt (occupancy) in this folder")
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    if path.endswith(".dat"):
        return load_gas_file(path)
    if label is None:
        raise DataError(f"{path}: a CSV needs --label COLUMN to name its label column")
    return load_csv(path, label, features)


# -- streaming for the device -----------------------------------------------------------------

@dataclass
class Sample:
    index: int               # 0-based sample number in the stream
    x: np.ndarray            # float32, in the model's feature order
    label: str | None


def iter_samples(source: str, feature_names: list[str], label: str | None = None,
                 on_bad=None) -> Iterator[Sample]:
    """Stream samples from a path or '-' (stdin). A gas `.dat` stream carries its labels; a CSV
    must have a header naming the model's feature columns. A row that cannot be parsed or
    holds a non-finite value is passed to `on_bad(where, reason)` and skipped."""
    on_bad = on_bad or (lambda where, why: print(f"skipping {where}: {why}", file=sys.stderr))
    name = "<stdin>" if source == "-" else source
    f = sys.stdin if source == "-" else _open_text(source)
    try:
        first = f.readline()
        if not first:
            return
        is_gas = source.endswith(".dat") or (first[:1].isdigit() and ":" in first.split()[1:2][0]
                                                if len(first.split()) > 1 else False)
        index = 0
        if is_gas:
            if feature_names != GAS_FEATURES:
                raise DataError(f"{name}: gas drift lines do not fit this model's {len(feature_names)} features")
            for n, line in enumerate(_chain(first, f), 1):
                if not line.strip():
                    continue
                try:
                    x, y = parse_gas_line(line, f"{name}:{n}")
                except DataError as e:
                    on_bad(f"{name}:{n}", str(e).split(": ", 1)[-1])
                    continue
                if not np.all(np.isfinite(x)):
                    on_bad(f"{name}:{n}", "non-finite value")
                    continue
                yield Sample(index, x, y)
                index += 1
            return
        header = _header(csv.reader(io.StringIO(first)), name)
        missing = [c for c in feature_names if c not in header]
        if missing:
            raise DataError(f"{name}: CSV header lacks the model's feature columns {missing[:5]}"
                            f"{' ...' if len(missing) > 5 else ''}; header is {header[:8]}")
        if label is not None and label not in header:
            raise DataError(f"{name}: no label column {label!r}; columns are {header[:8]}")
        cols = [header.index(c) for c in feature_names]
        li = header.index(label) if label is not None else None
        for n, row in enumerate(csv.reader(f), 2):
            if not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                on_bad(f"{name}:{n}", f"{len(row)} fields, header has {len(header)}")
                continue
            try:
                x = np.array([_float(row[j]) for j in cols], np.float32)
            except ValueError:
                on_bad(f"{name}:{n}", "a feature is not a number")
                continue
            if not np.all(np.isfinite(x)):
                on_bad(f"{name}:{n}", "non-finite value")
                continue
            y = row[li].strip() or None if li is not None else None
            yield Sample(index, x, y)
            index += 1
    finally:
        if f is not sys.stdin:
            f.close()


def _chain(first: str, rest: TextIO):
    yield first
    yield from rest


def _open_text(path: str) -> TextIO:
    try:
        return open(path, encoding="utf-8", newline="")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None

