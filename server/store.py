"""The server's durable state: every prototype version and every (device, seq) merged into one.

`Store` is the small interface the server loop uses; `SQLiteStore` is the embedded default
(stdlib sqlite3, STATE_DIR/server.db). A PostgreSQL store for several replicas would implement
the same four methods; the version bump is one transaction either way, so replicas need no
consensus of their own.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field

import numpy as np

from edge_spl.errors import ModelError
from edge_spl.files import pack_arrays, unpack_arrays
from edge_spl.manifest import Manifest, protos_from_arrays, protos_to_arrays

class StoreError(ModelError):
    """The database is damaged under a running server (a page gone bad): not the fault of any
    delta, and not something the next round heals. (A full disk or a lock is sqlite3's
    OperationalError: that round fails, and the next may not.)"""


def _damage(e: sqlite3.DatabaseError, what: str) -> Exception:
    """StoreError for a damaged database (sqlite3 raises the bare DatabaseError for a malformed
    image); any other error (a full disk or a lock: OperationalError; a constraint) as it is."""
    return StoreError(f"{what} ({e})") if type(e) is sqlite3.DatabaseError else e


DB_FILE = "server.db"
MIN_DB_BYTES = 512    # SQLite's smallest page: every database it wrote is at least one
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    version      INTEGER PRIMARY KEY,
    parent       INTEGER,
    created      REAL NOT NULL,
    model_sha256 TEXT NOT NULL,
    protos       BLOB NOT NULL,
    merged       TEXT NOT NULL,
    n_deltas     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS merged_deltas (
    device  TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    version INTEGER NOT NULL REFERENCES versions(version),
    PRIMARY KEY (device, seq)
);
CREATE TABLE IF NOT EXISTS refused_deltas (
    device  TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    reason  TEXT NOT NULL,
    PRIMARY KEY (device, seq)
);
"""


@dataclass
class StoredVersion:
    version: int
    parent: int | None
    created: float
    model_sha256: str
    protos: list[tuple[np.ndarray, np.ndarray]]
    # device -> contiguous high-water mark: seqs 1..mark are all merged or refused for good
    merged: dict[str, int] = field(default_factory=dict)
    n_deltas: int = 0


class Store:
    """What the server needs from its state."""

    def latest(self) -> StoredVersion:
        raise NotImplementedError

    def get(self, version: int) -> StoredVersion:
        """Stored version `version` (a ModelError when there is none)."""
        raise NotImplementedError

    def is_merged(self, device: str, seq: int) -> bool:
        raise NotImplementedError

    def commit(self, parent: StoredVersion, protos, merged_pairs: list[tuple[str, int]],
               check=None) -> StoredVersion:
        """Store version parent.version + 1 with these prototypes and the (device, seq) pairs merged
        into it, all in one transaction; returns it with its new high-water marks. `check(version)`,
        when given, runs inside the transaction once the marks are known: if it raises, nothing is
        stored (the server checks that the release still fits the broker's packet size)."""
        raise NotImplementedError

    def refuse(self, refusals: list[tuple[str, int, str]]) -> None:
        """Record (device, seq, reason) of deltas refused for good (their content, not their
        timing, was wrong): the high-water marks of the next version pass over them, so the
        device drops them from its outbox instead of holding, and re-adding, every later delta."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def high_water_mark(start: int, seqs) -> int:
    """The highest s such that start+1 .. s are all in `seqs` (start when start+1 is missing)."""
    s = start
    for q in sorted(seqs):
        if q == s + 1:
            s = q
        elif q > s + 1:
            break
    return s


class SQLiteStore(Store):
    def __init__(self, path: str, manifest: Manifest, initial_protos):
        """Open (or create, with version 0 = `initial_protos`) the database at `path`. Refuses a
        database holding versions of another model."""
        self.path = path
        self.manifest = manifest
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        except OSError as e:
            raise ModelError(f"{path}: cannot create its folder ({e.strerror})") from None
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size is not None and size < MIN_DB_BYTES:
            # SQLite takes a file shorter than its header for a new database: a truncated
            # server.db would silently start the version history again at 0
            raise ModelError(f"{path} is {size} bytes long, a truncated server database; restore it "
                             f"from a backup, or delete it to start a new version history")
        try:
            # The server loop is the only user, but it may run in another thread than the one that
            # opened the store (tests, a future thread pool); sqlite3 serialises access itself.
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a version that was published (and acked) must survive a power cut
            self._db.execute("PRAGMA synchronous=FULL")
            user_version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if user_version not in (0, SCHEMA_VERSION):
                raise ModelError(f"{path}: database schema {user_version}, this edge-spl uses {SCHEMA_VERSION}")
            # a damaged page (not a truncation) would otherwise show only later, as every delta
            # failing or every round not storing
            problems = [line.strip() for r in self._db.execute("PRAGMA quick_check(3)")
                        for line in str(r[0]).splitlines() if line.strip() and not line.startswith("***")]
            if problems != ["ok"]:
                raise ModelError(f"{path} is damaged ({'; '.join(problems)[:200]}); restore it from a backup, "
                                 f"or delete it to start a new version history")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            row = self._db.execute("SELECT model_sha256 FROM versions ORDER BY version DESC LIMIT 1").fetchone()
        except sqlite3.DatabaseError as e:
            raise ModelError(f"{path}: not a readable server database ({e})") from None
        if row is None:
            manifest.check_prototypes(initial_protos)
            self._insert(StoredVersion(0, None, time.time(), manifest.onnx_sha256,
                                       [(np.asarray(P, np.float32), np.asarray(g, np.float32))
                                        for P, g in initial_protos]), [])
        elif row[0] != manifest.onnx_sha256:
            raise ModelError(
                f"{path} holds versions of model {row[0][:12]}, not of the given model "
                f"{manifest.onnx_sha256[:12]} ({manifest.model_id}); use another --state folder "
                f"rather than mixing models")

    def _insert(self, v: StoredVersion, pairs, check=None) -> None:
        blob = pack_arrays(protos_to_arrays(v.protos))
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(
                "INSERT INTO versions (version, parent, created, model_sha256, protos, merged, n_deltas) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (v.version, v.parent, v.created, v.model_sha256, blob,
                 json.dumps(v.merged, sort_keys=True), v.n_deltas))
            self._db.executemany("INSERT INTO merged_deltas (device, seq, version) VALUES (?, ?, ?)",
                                 [(d, s, v.version) for d, s in pairs])
            # High-water marks move only over contiguous seqs, merged or refused; a seq that
            # arrived early (its predecessor still on the way) is already in a table and is
            # picked up here.
            # Refusals move the marks only of devices with something merged: a stream of refused
            # deltas under made-up names must not grow every release by their names.
            devices = {d for d, _ in pairs} | {r[0] for r in self._db.execute(
                "SELECT DISTINCT device FROM refused_deltas r WHERE EXISTS "
                "(SELECT 1 FROM merged_deltas m WHERE m.device = r.device)")}
            for device in sorted(devices):
                start = v.merged.get(device, 0)
                seqs = [r[0] for r in self._db.execute(
                    "SELECT seq FROM merged_deltas WHERE device = ? AND seq > ? UNION "
                    "SELECT seq FROM refused_deltas WHERE device = ? AND seq > ? ORDER BY seq",
                    (device, start, device, start))]
                hwm = high_water_mark(start, seqs)
                if hwm > 0:
                    v.merged[device] = hwm
            self._db.execute("UPDATE versions SET merged = ? WHERE version = ?",
                             (json.dumps(v.merged, sort_keys=True), v.version))
            if check is not None:
                check(v)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    _COLUMNS = "version, parent, created, model_sha256, protos, merged, n_deltas"

    def latest(self) -> StoredVersion:
        try:
            row = self._db.execute(f"SELECT {self._COLUMNS} FROM versions ORDER BY version DESC LIMIT 1").fetchone()
        except sqlite3.DatabaseError as e:   # a damaged page under the newest version's row
            raise ModelError(f"{self.path}: not a readable server database ({e})") from None
        return self._version(row)

    def get(self, version: int) -> StoredVersion:
        row = self._db.execute(f"SELECT {self._COLUMNS} FROM versions WHERE version = ?",
                               (int(version),)).fetchone()
        if row is None:
            first, last = self._db.execute("SELECT MIN(version), MAX(version) FROM versions").fetchone()
            raise ModelError(f"{self.path} has no version {version} (it holds {first}..{last})")
        return self._version(row)

    def _version(self, row) -> StoredVersion:
        version, parent, created, sha, blob, merged, n_deltas = row
        try:
            protos = protos_from_arrays(unpack_arrays(blob), self.manifest.n_layers)
            self.manifest.check_prototypes(protos)
            merged = json.loads(merged)
        except (ValueError, TypeError, ModelError) as e:
            raise ModelError(f"{self.path}: stored version {version} is unusable ({e})") from None
        return StoredVersion(version, parent, created, sha, protos, merged, n_deltas)

    def is_merged(self, device: str, seq: int) -> bool:
        try:
            return self._db.execute("SELECT 1 FROM merged_deltas WHERE device = ? AND seq = ?",
                                    (device, seq)).fetchone() is not None
        except sqlite3.DatabaseError as e:
            raise _damage(e, f"{self.path}: reading the merged deltas failed") from None

    def commit(self, parent: StoredVersion, protos, merged_pairs, check=None) -> StoredVersion:
        self.manifest.check_prototypes(protos)
        v = StoredVersion(parent.version + 1, parent.version, time.time(), parent.model_sha256,
                          protos, dict(parent.merged), len(merged_pairs))
        try:
            self._insert(v, merged_pairs, check)
        except sqlite3.DatabaseError as e:
            raise _damage(e, f"{self.path}: storing version {v.version} failed") from None
        return v

    def refuse(self, refusals) -> None:
        if not refusals:
            return
        try:
            self._db.executemany("INSERT OR IGNORE INTO refused_deltas (device, seq, reason) VALUES (?, ?, ?)",
                                 [(d, int(s), r) for d, s, r in refusals])
        except sqlite3.DatabaseError as e:
            raise _damage(e, f"{self.path}: recording refused deltas failed") from None

    def close(self) -> None:
        self._db.close()
