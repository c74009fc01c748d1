"""The server's durable state: every prototype version and every (device, seq) merged into one.

`Store` is the small interface the server loop uses; `SQLiteStore` is the embedded default
(stdlib sqlite3, STATE_DIR/server.db). A PostgreSQL store for several replicas would implement
the same four methods; the version bump is one transaction either way, so replicas need no
consensus of their own.

A version is stored as the rows that changed against its parent (their indices, new P rows and
g values: `encode_rows`), with a full snapshot (npz) for version 0 and every SNAPSHOT_EVERY
versions; `get(v)` rebuilds v from the nearest snapshot at or before it plus the rows after it,
and checks the result against the sha256 of v's prototypes stored with it.
"""
from __future__ import annotations

import hashlib
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
# 1: every version a full npz copy in `protos`. 2: `protos_form` says what `protos` holds, a full
# copy ('full') or the rows changed against the parent ('rows'); `protos_sha256` of the whole
# prototypes. A schema 1 database is migrated on open: its rows are all full copies already.
SCHEMA_VERSION = 2
# A full copy every 64 versions adds 1/64 of a copy to each version: 6.3 kB for the demo model
# (128-256-256-6), less than one of its versions itself (the 6 head rows, 9.3 kB, when devices
# learn only the head), so such a version costs ~16 kB instead of 407 kB. 256 would save another 4.7 kB a version, but a rebuild reads a
# snapshot and up to K-1 sets of rows, and a damaged set of rows makes the versions after it, up
# to the next snapshot, unreadable (the latest among them, which the server starts from, too).
SNAPSHOT_EVERY = 64
FULL, ROWS = "full", "rows"

_VERSIONS = """
CREATE TABLE versions (
    version      INTEGER PRIMARY KEY,
    parent       INTEGER,
    created      REAL NOT NULL,
    model_sha256 TEXT NOT NULL,
    protos       BLOB NOT NULL,
    merged       TEXT NOT NULL,
    n_deltas     INTEGER NOT NULL,
    protos_form  TEXT NOT NULL DEFAULT 'full',
    protos_sha256 TEXT
)"""
# schema 1 -> 2: the columns schema 2 appends (ADD COLUMN rewrites no row; old rows read as 'full')
_ADDED_COLUMNS = [("protos_form", "TEXT NOT NULL DEFAULT 'full'"), ("protos_sha256", "TEXT")]
_OTHER_TABLES = """
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


def protos_sha256(protos) -> str:
    """sha256 over every layer's P then g, as little-endian float32 bytes."""
    h = hashlib.sha256()
    for P, g in protos:
        h.update(np.ascontiguousarray(P, "<f4"))
        h.update(np.ascontiguousarray(g, "<f4"))
    return h.hexdigest()


def changed_rows(old, new) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per layer (rows, P[rows], g[rows]) of `new` where its bits differ from `old` (so -0.0 after
    0.0 is a change: applying the result to `old` gives `new` bit for bit)."""
    out = []
    for (P0, g0), (P1, g1) in zip(old, new):
        diff = (P0.view(np.uint32) != P1.view(np.uint32)).any(axis=1) | (g0.view(np.uint32) != g1.view(np.uint32))
        rows = np.flatnonzero(diff).astype(np.int32)
        out.append((rows, P1[rows], g1[rows]))
    return out


_ROWS_MAGIC = b"ESR1"


def encode_rows(changes) -> bytes:
    """Changed rows (`changed_rows`) to bytes: a magic, then per layer the row count (uint32), the
    rows (int32), their P rows and their g values (float32), all little-endian. No npz: its ~250
    bytes of headers per array would outweigh a version that changes a row or two."""
    parts = [_ROWS_MAGIC]
    for rows, P, g in changes:
        parts += [np.uint32(len(rows)).astype("<u4").tobytes(), np.asarray(rows, "<i4").tobytes(),
                  np.ascontiguousarray(P, "<f4").tobytes(), np.ascontiguousarray(g, "<f4").tobytes()]
    return b"".join(parts)


def decode_rows(data: bytes, shapes) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`encode_rows` back, for layers of P shapes `shapes`; ValueError when the bytes are not rows
    of those shapes (wrong length, rows unsorted, repeated or out of range)."""
    if data[:4] != _ROWS_MAGIC:
        raise ValueError("not a set of changed rows")
    pos, out = 4, []
    for i, (d_out, d_in) in enumerate(shapes):
        if len(data) < pos + 4:
            raise ValueError(f"layer {i}: truncated")
        k = int(np.frombuffer(data, "<u4", 1, pos)[0])
        pos += 4
        if k > d_out or len(data) < pos + 4 * k * (d_in + 2):
            raise ValueError(f"layer {i}: {k} rows of {d_out}, or truncated")
        rows = np.frombuffer(data, "<i4", k, pos).astype(np.int32)
        P = np.frombuffer(data, "<f4", k * d_in, pos + 4 * k).astype(np.float32).reshape(k, d_in)
        g = np.frombuffer(data, "<f4", k, pos + 4 * k * (d_in + 1)).astype(np.float32)
        pos += 4 * k * (d_in + 2)
        if k and (rows[0] < 0 or rows[-1] >= d_out or np.any(np.diff(rows) <= 0)):
            raise ValueError(f"layer {i}: rows unsorted, repeated or out of range")
        out.append((rows, P, g))
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} bytes after the last layer")
    return out


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
        """Stored version `version` (a ModelError when there is none, a StoreError when it is
        stored but damaged)."""
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
    def __init__(self, path: str, manifest: Manifest, initial_protos, snapshot_every: int = SNAPSHOT_EVERY):
        """Open (or create, with version 0 = `initial_protos`) the database at `path`, migrating a
        schema 1 one. Refuses a database holding versions of another model. `snapshot_every`: a
        full copy of the prototypes every that many versions (the rest store their changed rows)."""
        if int(snapshot_every) < 1:
            raise ValueError(f"snapshot_every must be at least 1, not {snapshot_every}")
        self.path = path
        self.manifest = manifest
        self.snapshot_every = int(snapshot_every)
        self._shapes = [ps for ps, _ in manifest.proto_shapes()]
        self._full_bytes = 4 * sum(o * i + o for o, i in self._shapes)
        self._head: tuple[int, str] | None = None   # (version, protos sha256) of the newest one seen
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
            if user_version not in (0, 1, SCHEMA_VERSION):
                raise ModelError(f"{path}: database schema {user_version}, this edge-spl uses {SCHEMA_VERSION}")
            # a damaged page (not a truncation) would otherwise show only later, as every delta
            # failing or every round not storing
            problems = [line.strip() for r in self._db.execute("PRAGMA quick_check(3)")
                        for line in str(r[0]).splitlines() if line.strip() and not line.startswith("***")]
            if problems != ["ok"]:
                raise ModelError(f"{path} is damaged ({'; '.join(problems)[:200]}); restore it from a backup, "
                                 f"or delete it to start a new version history")
            if user_version != SCHEMA_VERSION:
                self._create_or_migrate()
            row = self._db.execute("SELECT model_sha256 FROM versions ORDER BY version DESC LIMIT 1").fetchone()
        except sqlite3.DatabaseError as e:
            raise ModelError(f"{path}: not a readable server database ({e})") from None
        if row is None:
            manifest.check_prototypes(initial_protos)
            protos = _float32(initial_protos)
            sha = protos_sha256(protos)
            self._insert(StoredVersion(0, None, time.time(), manifest.onnx_sha256, protos), [],
                         FULL, pack_arrays(protos_to_arrays(protos)), sha)
            self._head = (0, sha)
        elif row[0] != manifest.onnx_sha256:
            raise ModelError(
                f"{path} holds versions of model {row[0][:12]}, not of the given model "
                f"{manifest.onnx_sha256[:12]} ({manifest.model_id}); give the --model these versions were made with, or "
                f"another --state folder for a new model")

    def _create_or_migrate(self) -> None:
        """A new database's tables, or a schema 1 one's new columns, and the schema number, in one
        transaction (a crash leaves the database as it was)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(versions)")}
            if not columns:
                self._db.execute(_VERSIONS)
            else:
                for name, decl in _ADDED_COLUMNS:
                    if name not in columns:
                        self._db.execute(f"ALTER TABLE versions ADD COLUMN {name} {decl}")
            for sql in _OTHER_TABLES.split(";"):
                if sql.strip():
                    self._db.execute(sql)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException as e:
            self._db.execute("ROLLBACK")
            if isinstance(e, sqlite3.OperationalError):   # a full disk, a read-only file
                raise ModelError(f"{self.path}: could not bring the database to schema {SCHEMA_VERSION} "
                                 f"({e}); it is unchanged") from None
            raise

    def _insert(self, v: StoredVersion, pairs, form: str, blob: bytes, sha: str, check=None) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(
                "INSERT INTO versions (version, parent, created, model_sha256, protos, merged, n_deltas, "
                "protos_form, protos_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (v.version, v.parent, v.created, v.model_sha256, blob,
                 json.dumps(v.merged, sort_keys=True), v.n_deltas, form, sha))
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

    def latest(self) -> StoredVersion:
        try:
            (last,) = self._db.execute("SELECT MAX(version) FROM versions").fetchone()
            if last is None:
                raise ModelError(f"{self.path} holds no version")
            v, sha = self._rebuild(last)
        except sqlite3.DatabaseError as e:   # a damaged page under the newest versions' rows
            raise ModelError(f"{self.path}: not a readable server database ({e})") from None
        self._head = (v.version, sha)
        return v

    def get(self, version: int) -> StoredVersion:
        try:
            return self._rebuild(int(version))[0]
        except sqlite3.DatabaseError as e:
            raise ModelError(f"{self.path}: not a readable server database ({e})") from None

    _COLUMNS = "version, parent, created, model_sha256, protos, merged, n_deltas, protos_form, protos_sha256"

    def _rebuild(self, version: int) -> tuple[StoredVersion, str]:
        """Version `version` from the nearest full copy at or before it and the rows stored after
        that, checked against its sha256; with that sha256. A ModelError when there is no such
        version, a StoreError (damage) when it cannot be rebuilt."""
        snap = self._db.execute("SELECT version FROM versions WHERE version <= ? AND protos_form = ? "
                                "ORDER BY version DESC LIMIT 1", (version, FULL)).fetchone()
        protos, prev, row = None, None, None
        if snap is not None:
            for row in self._db.execute(f"SELECT {self._COLUMNS} FROM versions WHERE version >= ? AND "
                                        f"version <= ? ORDER BY version", (snap[0], version)):
                v, parent, form, blob = row[0], row[1], row[7], row[4]
                try:
                    if form == FULL:
                        protos = protos_from_arrays(unpack_arrays(blob), self.manifest.n_layers)
                        self.manifest.check_prototypes(protos)
                    elif form == ROWS and prev is not None and parent == prev == v - 1:
                        for (P, g), (rows, P_rows, g_rows) in zip(protos, decode_rows(blob, self._shapes)):
                            P[rows], g[rows] = P_rows, g_rows
                    else:
                        raise ValueError(f"{form!r} prototypes on parent {parent}, after version {prev}")
                except (ValueError, TypeError, ModelError) as e:
                    raise StoreError(f"{self.path}: stored version {v} is unusable ({e})") from None
                prev = v
        if row is None or row[0] != version:
            if self._db.execute("SELECT 1 FROM versions WHERE version = ?", (version,)).fetchone():
                raise StoreError(f"{self.path}: stored version {version} is unusable (no full copy "
                                 f"at or before it, or a version missing since)")
            first, last = self._db.execute("SELECT MIN(version), MAX(version) FROM versions").fetchone()
            raise ModelError(f"{self.path} has no version {version} (it holds {first}..{last})")
        version, parent, created, model_sha, _, merged, n_deltas, _, stored_sha = row
        try:
            self.manifest.check_prototypes(protos)
            sha = protos_sha256(protos)
            if stored_sha is not None and sha != stored_sha:   # (schema 1 rows have none)
                raise ValueError("its prototypes do not match their sha256")
            merged = json.loads(merged)
        except (ValueError, TypeError, ModelError) as e:
            raise StoreError(f"{self.path}: stored version {version} is unusable ({e})") from None
        return StoredVersion(version, parent, created, model_sha, protos, merged, n_deltas), sha

    def is_merged(self, device: str, seq: int) -> bool:
        try:
            return self._db.execute("SELECT 1 FROM merged_deltas WHERE device = ? AND seq = ?",
                                    (device, seq)).fetchone() is not None
        except sqlite3.DatabaseError as e:
            raise _damage(e, f"{self.path}: reading the merged deltas failed") from None

    def commit(self, parent: StoredVersion, protos, merged_pairs, check=None) -> StoredVersion:
        self.manifest.check_prototypes(protos)
        protos = _float32(protos)
        v = StoredVersion(parent.version + 1, parent.version, time.time(), parent.model_sha256,
                          protos, dict(parent.merged), len(merged_pairs))
        sha = protos_sha256(protos)
        try:
            changes = encode_rows(changed_rows(self._stored_protos(parent), protos))
            if v.version % self.snapshot_every == 0 or len(changes) >= self._full_bytes:
                form, blob = FULL, pack_arrays(protos_to_arrays(protos))
            else:
                form, blob = ROWS, changes
            self._insert(v, merged_pairs, form, blob, sha, check)
        except sqlite3.DatabaseError as e:
            raise _damage(e, f"{self.path}: storing version {v.version} failed") from None
        self._head = (v.version, sha)
        return v

    def _stored_protos(self, parent: StoredVersion):
        """The stored prototypes of `parent.version`, which the new version's rows are taken
        against: `parent.protos` when they hash to what was stored (the server's case: it commits
        on the version it got from the store), else rebuilt from the database."""
        if len(parent.protos) == self.manifest.n_layers and self._head is not None \
                and self._head[0] == parent.version:
            given = _float32(parent.protos)
            if all(P.shape == ps for (P, _), ps in zip(given, self._shapes)) \
                    and protos_sha256(given) == self._head[1]:
                return given
        return self._rebuild(parent.version)[0].protos

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


def _float32(protos) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.ascontiguousarray(P, np.float32), np.ascontiguousarray(g, np.float32)) for P, g in protos]
