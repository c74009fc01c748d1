"""Data sources: the gas drift `.dat` files, the occupancy CSVs, and a user's own CSV sensor log.

Two ways in: `load_*` reads a whole training set (any bad line is an error), `iter_samples`
streams rows for the device from a file or stdin (a bad line is reported and skipped).
Labels are kept as the strings the file holds (gas classes get their gas names).
"""
from __future__ import annotations

import csv
import io
import math
import os
import sys
from dataclasses import dataclass
from typing import Iterator, TextIO

import numpy as np

from .errors import DataError

# The device computes in float32: a reading beyond its range would be inf there.
F32_MAX = float(np.finfo(np.float32).max)
# A streamed line longer than this is skipped unread (a sensor row is a few hundred bytes; a
# stream that never sends a newline must not fill the memory).
MAX_LINE_BYTES = 1 << 20

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
            x[j] = _float(val)
        except ValueError as e:
            why = f"{e}, " if str(e) in _WHY else ""
            raise DataError(f"{where}: bad feature {tok!r} ({why}expected {j + 1}:VALUE)") from None
    return x, GAS_CLASSES[cls - 1]


def load_gas_file(path: str) -> Dataset:
    rows, labels = [], []
    n = 0
    try:
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    x, y = parse_gas_line(line, f"{path}:{n}")
                    rows.append(x)
                    labels.append(y)
    except UnicodeDecodeError:
        raise DataError(f"{path}:{n + 1}: not UTF-8 text; expected gas drift `CLASS i:v ...` lines") from None
    if not rows:
        raise DataError(f"{path}: no samples")
    return Dataset(np.stack(rows), labels, list(GAS_FEATURES), path, list(GAS_CLASSES))


def gas_batch_path(data_dir: str, batch: int) -> str:
    return os.path.join(data_dir, f"batch{batch}.dat")


def load_gas_batches(data_dir: str, batches) -> list[Dataset]:
    return [load_gas_file(gas_batch_path(data_dir, b)) for b in batches]


# -- CSV (occupancy and a user's own log) -----------------------------------------------------

def columns(names: list[str], show: int = 6) -> str:
    """Column names for a message, with their count (brief)."""
    return f"{len(names)} column{'s' if len(names) != 1 else ''}: {brief(names, show)}"


def brief(names: list[str], show: int = 6) -> str:
    """Names for a message: all of a few; of many, the first and the last ones (a label column is
    often last)."""
    q = [repr(c) for c in names]
    if len(q) <= show + 2:
        return ", ".join(q)
    return f"{', '.join(q[:show])}, ..., {', '.join(q[-2:])}"


def _header(reader, where: str) -> list[str]:
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{where}: empty file, expected a CSV header row") from None
    except csv.Error as e:
        raise DataError(f"{where}: not CSV ({e})") from None
    header = [h.strip() for h in header]
    if len(set(header)) != len(header):
        raise DataError(f"{where}: duplicate column names in header {header}{header_hint(header)}")
    return header


def header_hint(header: list[str]) -> str:
    """For a message about a header that lacks what was asked for: a note when it looks like data."""
    if header and all(_is_number(h) for h in header):
        return " (the first row is all numbers: does the file lack its header row of column names?)"
    return ""


_WHY = ("empty", "not a number", "non-finite", "beyond the float32 range")


def _float(v: str) -> float:
    """A feature value: a finite number that float32 holds. The ValueError says which it is not."""
    v = v.strip()
    if not v:
        raise ValueError("empty")
    try:
        x = float(v)
    except ValueError:
        raise ValueError("not a number") from None
    if not math.isfinite(x):
        raise ValueError("non-finite")
    if abs(x) > F32_MAX:
        raise ValueError("beyond the float32 range")
    return x


def _is_number(v: str) -> bool:
    """Whether a cell reads as a number at all (to pick a CSV's numeric columns)."""
    try:
        float(v.strip())
        return True
    except ValueError:
        return False


def load_csv(path: str, label: str | None = None, features: list[str] | None = None) -> Dataset:
    """A CSV with a header row. `features` defaults to every column other than `label` whose
    cells are mostly numbers (a cell in such a column that is empty or not a number is an error
    naming its line, not a reason to drop the column), except a row counter (whole numbers that
    rise by one each row). Rows with an empty label are unlabeled."""
    reader = None
    try:
        with _open_text(path) as f:
            reader = csv.reader(f)
            header = _header(reader, path)
            numbered = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    except (UnicodeDecodeError, csv.Error) as e:
        line = max(1, reader.line_num if reader is not None else 1)
        why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else f"not CSV ({e})"
        raise DataError(f"{path}:{line}: {why}; expected a CSV file with a header row") from None
    if label is not None and label not in header:
        raise DataError(f"{path}: no label column {label!r}; the header has {columns(header)}"
                        f"{header_hint(header)}")
    for n, r in numbered:
        if len(r) != len(header):
            raise DataError(f"{path}:{n}: {len(r)} fields, header has {len(header)}")
    rows = [r for _, r in numbered]
    if not rows:
        raise DataError(f"{path}: no data rows")
    if features is None:
        features = []
        for j, name in enumerate(header):
            if name == label:
                continue
            numbers = sum(_is_number(r[j]) for r in rows)
            if 2 * numbers <= len(rows):
                continue   # text: a date, a name
            if numbers == len(rows):
                values = np.array([float(r[j]) for r in rows])
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
    for i, (n, r) in enumerate(numbered):
        for k, j in enumerate(cols):
            try:
                X[i, k] = _float(r[j])
            except ValueError as e:
                raise DataError(f"{path}:{n}: column {header[j]!r} is {r[j][:40]!r}: {e}; expected "
                                f"a finite number") from None
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
    holds a non-finite value is passed to `on_bad(where, reason)` and skipped.

    A stream is read line by line as bytes: one CSV row per line (no quoted newlines), bytes that
    are not UTF-8 become U+FFFD (so such a row fails as "not a number" instead of ending the
    stream), and a line over MAX_LINE_BYTES is skipped without being held in memory."""
    on_bad = on_bad or (lambda where, why: print(f"skipping {where}: {why}", file=sys.stderr))
    name = "<stdin>" if source == "-" else source
    f = getattr(sys.stdin, "buffer", sys.stdin) if source == "-" else _open_binary(source)
    try:
        lines = _lines(f, name, on_bad)
        n, first = next(((k, t) for k, t in lines if t.strip()), (0, ""))   # blank lines before the header
        if not first:
            return
        first = first.lstrip("\ufeff")   # a byte-order mark, as spreadsheet programs write
        is_gas = source.endswith(".dat") or (first[:1].isdigit() and ":" in first.split()[1:2][0]
                                                if len(first.split()) > 1 else False)
        index = 0
        if is_gas:
            if feature_names != GAS_FEATURES:
                raise DataError(f"{name}: gas drift lines do not fit this model's {len(feature_names)} features")
            for n, line in _chain((n, first), lines):
                if not line.strip():
                    continue
                try:
                    x, y = parse_gas_line(line, f"{name}:{n}")
                except DataError as e:
                    on_bad(f"{name}:{n}", str(e).split(": ", 1)[-1])
                    continue
                yield Sample(index, x, y)
                index += 1
            return
        header = _header(csv.reader([first]), name)
        missing = [c for c in feature_names if c not in header]
        if missing:
            raise DataError(f"{name}: CSV header lacks {len(missing)} of the model's {len(feature_names)} "
                            f"feature columns ({columns(missing)}); the header has {columns(header)}"
                            f"{header_hint(header)}")
        if label is not None and label not in header:
            raise DataError(f"{name}: no label column {label!r}; the header has {columns(header)}"
                            f"{header_hint(header)}")
        cols = [header.index(c) for c in feature_names]
        li = header.index(label) if label is not None else None
        for n, line in lines:
            if not line.strip():
                continue
            try:
                row = next(csv.reader([line]), [])
            except csv.Error as e:
                on_bad(f"{name}:{n}", f"not a CSV row ({e})")
                continue
            if not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                on_bad(f"{name}:{n}", f"{len(row)} fields, header has {len(header)}")
                continue
            x = np.empty(len(cols), np.float32)
            try:
                for k, j in enumerate(cols):
                    x[k] = _float(row[j])
            except ValueError as e:
                on_bad(f"{name}:{n}", f"column {header[j]!r} is {row[j][:40]!r}: {e}")
                continue
            y = row[li].strip() or None if li is not None else None
            yield Sample(index, x, y)
            index += 1
    finally:
        if source != "-":
            f.close()


def _lines(f, name: str, on_bad) -> Iterator[tuple[int, str]]:
    """(line number, text) of a binary (or text) stream, skipping over-long lines."""
    n = 0
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        n += 1
        nl = b"\n" if isinstance(line, bytes) else "\n"
        if len(line) > MAX_LINE_BYTES and not line.endswith(nl):
            while line and not line.endswith(nl):
                line = f.readline(MAX_LINE_BYTES)
            on_bad(f"{name}:{n}", f"line longer than {MAX_LINE_BYTES} bytes")
            continue
        yield n, line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line


def _chain(first, rest):
    yield first
    yield from rest


def _open_binary(path: str):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None


def _open_text(path: str) -> TextIO:
    try:
        # utf-8-sig: a leading byte-order mark (spreadsheet exports) is not part of the header
        return open(path, encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None

