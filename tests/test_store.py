"""The server's version store: versions kept as changed rows with full snapshots, rebuilt bit for
bit; a schema 1 database (a full copy per version) migrated on open; what a version costs on disk."""
from __future__ import annotations

import json
import os
import sqlite3
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_spl.errors import ModelError
from edge_spl.files import pack_arrays
from edge_spl.manifest import Manifest, protos_to_arrays
from edge_spl.server import store as store_mod
from edge_spl.server.store import (DB_FILE, SCHEMA_VERSION, SNAPSHOT_EVERY, SQLiteStore, StoreError,
                                   changed_rows, decode_rows, encode_rows, protos_sha256)

TINY = (8, 16, 16, 3)          # P shapes (16, 8), (16, 16), (3, 24)
GAS = (128, 256, 256, 6)       # the gas demo model: P shapes (256, 128), (256, 256), (6, 384)


def manifest(sizes=TINY, sha="ab" * 32) -> Manifest:
    d = sizes[0]
    return Manifest("store-test", list(sizes), [f"c{i}" for i in range(sizes[-1])],
                    [f"f{i}" for i in range(d)], [0.0] * d, [1.0] * d, sha, "cd" * 32)


def random_protos(rng, m: Manifest):
    return [(rng.standard_normal(ps).astype(np.float32), rng.standard_normal(gs).astype(np.float32))
            for ps, gs in m.proto_shapes()]


def assert_bits_equal(a, b, what=""):
    assert len(a) == len(b), what
    for i, ((P, g), (P2, g2)) in enumerate(zip(a, b)):
        assert P.dtype == P2.dtype == g.dtype == g2.dtype == np.float32, (what, i)
        assert P.shape == P2.shape and g.shape == g2.shape, (what, i)
        assert np.array_equal(P.view(np.uint32), P2.view(np.uint32)), (what, i, "P")
        assert np.array_equal(g.view(np.uint32), g2.view(np.uint32)), (what, i, "g")


def forms(path) -> dict[int, str]:
    db = sqlite3.connect(path)
    try:
        return dict(db.execute("SELECT version, protos_form FROM versions"))
    finally:
        db.close()


def db_bytes(path) -> int:
    return sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s))


# values that a row may change to, chosen so that bit-exactness is what is tested: -0.0 after 0.0,
# subnormals, the largest allowed magnitude
SPECIAL = np.array([0.0, -0.0, 1e-45, -1e-40, 1e15, -1e15, 1.0, np.float32(1.0) + np.float32(2**-23)],
                   np.float32)


def change(rng, protos, kind):
    """New prototypes from `protos` (never modified): a few random rows, none, or all."""
    out = []
    for P, g in protos:
        P, g = P.copy(), g.copy()
        if kind == "all":
            P += 1.0
            g -= 1.0
        elif kind == "rows":
            for r in rng.choice(P.shape[0], rng.integers(1, max(P.shape[0] // 2, 1) + 1), replace=False):
                what = rng.integers(3)
                if what != 1:   # the P row, partly special values
                    P[r] = rng.standard_normal(P.shape[1]).astype(np.float32)
                    P[r, rng.integers(P.shape[1])] = SPECIAL[rng.integers(len(SPECIAL))]
                if what != 0:   # the gate
                    g[r] = SPECIAL[rng.integers(len(SPECIAL))] if rng.integers(2) else rng.standard_normal()
        out.append((P, g))
    return out


# -- the changed-rows encoding -----------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_layers=st.integers(1, 4))
def test_changed_rows_round_trip_and_rebuild_bit_for_bit(seed, n_layers):
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.integers(1, 9)), int(rng.integers(1, 7))) for _ in range(n_layers)]
    old = [(rng.standard_normal(s).astype(np.float32), rng.standard_normal(s[0]).astype(np.float32))
           for s in shapes]
    old[0][0][0, 0] = 0.0
    new = change(rng, old, ["none", "rows", "all"][seed % 3])
    if seed % 2:
        new[0][0][0, 0] = -0.0   # equal as floats, not as bits: must count as a change
    changes = changed_rows(old, new)
    back = decode_rows(encode_rows(changes), shapes)
    for (r, P, g), (r2, P2, g2), (d_out, d_in) in zip(changes, back, shapes):
        assert r2.dtype == np.int32 and P2.shape == (len(r2), d_in) and g2.shape == (len(r2),)
        assert np.array_equal(r, r2) and np.array_equal(P.view(np.uint32), P2.view(np.uint32))
        assert np.array_equal(g.view(np.uint32), g2.view(np.uint32))
    rebuilt = [(P.copy(), g.copy()) for P, g in old]
    for (P, g), (rows, P_rows, g_rows) in zip(rebuilt, back):
        P[rows], g[rows] = P_rows, g_rows
    assert_bits_equal(rebuilt, new)
    # only rows whose bits differ are kept
    for (P0, g0), (P1, g1), (rows, _, _) in zip(old, new, changes):
        same = np.setdiff1d(np.arange(P0.shape[0]), rows)
        assert np.array_equal(P0[same].view(np.uint32), P1[same].view(np.uint32))
        assert np.array_equal(g0[same].view(np.uint32), g1[same].view(np.uint32))


def test_decode_rows_refuses_what_is_not_rows_of_those_shapes():
    shapes = [(4, 3), (2, 5)]
    rows = [(np.array([1, 3], np.int32), np.ones((2, 3), np.float32), np.ones(2, np.float32)),
            (np.array([0], np.int32), np.ones((1, 5), np.float32), np.ones(1, np.float32))]
    good = encode_rows(rows)
    assert len(good) == 4 + (4 + 2 * 4 * 5) + (4 + 1 * 4 * 7)
    decode_rows(good, shapes)
    bad = {
        "truncated": good[:-1],
        "extra": good + b"\0",
        "magic": b"XXXX" + good[4:],
        "other shapes": good,
        "unsorted": encode_rows([(np.array([3, 1], np.int32),) + rows[0][1:], rows[1]]),
        "out of range": encode_rows([(np.array([1, 4], np.int32),) + rows[0][1:], rows[1]]),
        "too many rows": encode_rows([(np.arange(5, dtype=np.int32), np.ones((5, 3), np.float32),
                                       np.ones(5, np.float32)), rows[1]]),
    }
    for name, data in bad.items():
        with pytest.raises(ValueError):
            decode_rows(data, [(4, 3), (2, 6)] if name == "other shapes" else shapes)


# -- every version rebuilt exactly -------------------------------------------------------------

STEP = st.one_of(st.sampled_from(["rows", "rows", "rows", "none", "all", "in place"]),
                 st.tuples(st.just("rollback"), st.integers(0, 10**6)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), every=st.sampled_from([1, 2, 3, 5, SNAPSHOT_EVERY]),
       steps=st.lists(STEP, min_size=1, max_size=30))
def test_every_version_rebuilds_bit_for_bit_across_snapshots_and_reopen(seed, every, steps):
    rng = np.random.default_rng(seed)
    m = manifest()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, DB_FILE)
        store = SQLiteStore(path, m, random_protos(rng, m), snapshot_every=every)
        cur = store.latest()
        want = {0: [(P.copy(), g.copy()) for P, g in cur.protos]}
        for k, step in enumerate(steps):
            if isinstance(step, tuple):              # a rollback: an earlier version's prototypes
                new = [(P.copy(), g.copy()) for P, g in want[step[1] % len(want)]]
            else:
                new = change(rng, cur.protos, "rows" if step == "in place" else step)
            want[cur.version + 1] = [(P.copy(), g.copy()) for P, g in new]
            if step == "in place":
                # a caller that updates its parent's arrays in place: the parent it passes holds
                # the new prototypes, not the stored ones, and the version is still stored exactly
                for (P, g), (P_new, g_new) in zip(cur.protos, new):
                    P[:], g[:] = P_new, g_new
                new = cur.protos
            cur = store.commit(cur, new, [("d", k + 1)])
        last = cur.version
        for v, protos in want.items():
            got = store.get(v)
            assert got.version == v and got.parent == (None if v == 0 else v - 1)
            assert_bits_equal(got.protos, protos, f"version {v}")
        store.close()

        kinds = forms(path)
        assert all(kinds[v] == "full" for v in range(0, last + 1, every))
        assert set(kinds.values()) <= {"full", "rows"}

        store = SQLiteStore(path, m, random_protos(rng, m), snapshot_every=every)
        latest = store.latest()
        assert latest.version == last and latest.merged == {"d": last}
        assert_bits_equal(latest.protos, want[last], "latest after reopen")
        for v in rng.permutation(last + 1):
            assert_bits_equal(store.get(int(v)).protos, want[int(v)], f"version {v} after reopen")
        new = change(rng, latest.protos, "rows")
        assert store.commit(latest, new, [("d", last + 1)]).version == last + 1
        assert_bits_equal(store.get(last + 1).protos, new, "the version after reopen")
        with pytest.raises(ModelError, match=f"no version {last + 2}"):
            store.get(last + 2)
        store.close()


def test_the_default_store_snapshots_every_64_versions_and_rebuilds_them_all(tmp_path):
    rng = np.random.default_rng(8)
    m = manifest()
    path = str(tmp_path / DB_FILE)
    store = SQLiteStore(path, m, random_protos(rng, m))
    cur = store.latest()
    want = [cur.protos]
    for k in range(2 * SNAPSHOT_EVERY + 3):
        cur = store.commit(cur, change(rng, cur.protos, "rows"), [("a", k + 1)])
        want.append(cur.protos)
    store.close()
    kinds = forms(path)
    assert [v for v, f in sorted(kinds.items()) if f == "full"] == [0, SNAPSHOT_EVERY, 2 * SNAPSHOT_EVERY]
    store = SQLiteStore(path, m, want[0])
    assert_bits_equal(store.latest().protos, want[-1])
    for v, protos in enumerate(want):
        assert_bits_equal(store.get(v).protos, protos, f"version {v}")
    store.close()


def test_a_version_that_changes_most_rows_is_stored_whole(tmp_path):
    rng = np.random.default_rng(9)
    m = manifest()
    path = str(tmp_path / DB_FILE)
    store = SQLiteStore(path, m, random_protos(rng, m))
    v0 = store.latest()
    v1 = store.commit(v0, change(rng, v0.protos, "all"), [])
    v2 = store.commit(v1, v1.protos, [])            # nothing changed: a few bytes
    store.close()
    assert forms(path) == {0: "full", 1: "full", 2: "rows"}
    db = sqlite3.connect(path)
    assert db.execute("SELECT length(protos) FROM versions WHERE version = 2").fetchone()[0] == 4 + 4 * 3
    db.close()
    store = SQLiteStore(path, m, v0.protos)
    assert_bits_equal(store.get(2).protos, v2.protos)
    store.close()


def test_a_damaged_stored_version_is_named_and_the_next_snapshot_still_reads(tmp_path):
    rng = np.random.default_rng(10)
    m = manifest()
    path = str(tmp_path / DB_FILE)
    store = SQLiteStore(path, m, random_protos(rng, m), snapshot_every=4)
    cur = store.latest()
    want = [cur.protos]
    for k in range(6):
        cur = store.commit(cur, change(rng, cur.protos, "rows"), [])
        want.append(cur.protos)
    store.close()
    db = sqlite3.connect(path)
    (blob,) = db.execute("SELECT protos FROM versions WHERE version = 2").fetchone()
    flipped = bytearray(blob)
    flipped[-1] ^= 0x01          # the last byte of a g value: a valid set of rows, a wrong value
    db.execute("UPDATE versions SET protos = ? WHERE version = 2", (bytes(flipped),))
    db.commit()
    db.close()
    store = SQLiteStore(path, m, want[0], snapshot_every=4)
    with pytest.raises(StoreError, match="version 2 is unusable.*sha256"):
        store.get(2)
    try:          # rebuilt through version 2: refused, unless version 3 wrote that row again
        assert_bits_equal(store.get(3).protos, want[3])
    except StoreError as e:
        assert "version 3 is unusable" in str(e)
    assert_bits_equal(store.get(1).protos, want[1])
    assert_bits_equal(store.get(4).protos, want[4])       # a snapshot: untouched
    assert_bits_equal(store.latest().protos, want[6])
    store.close()

    db = sqlite3.connect(path)
    db.execute("UPDATE versions SET protos = substr(protos, 1, length(protos) - 3) WHERE version = 5")
    db.commit()
    db.close()
    store = SQLiteStore(path, m, want[0], snapshot_every=4)
    with pytest.raises(StoreError, match="version 5 is unusable"):
        store.latest()
    store.close()


# -- what a version costs ----------------------------------------------------------------------

def test_two_hundred_versions_of_a_few_rows_cost_a_fraction_of_full_copies(tmp_path):
    """The gas demo's shapes: a full copy is ~400 kB; 200 versions that each change 2 rows per
    layer must cost their rows, 4 snapshots and SQLite's page slack, not 200 copies."""
    rng = np.random.default_rng(11)
    m = manifest(GAS)
    path = str(tmp_path / DB_FILE)
    store = SQLiteStore(path, m, random_protos(rng, m))
    cur = store.latest()
    full = len(pack_arrays(protos_to_arrays(cur.protos)))
    assert full > 400_000
    n, rows_bytes, want = 200, 0, [cur.protos]
    for k in range(n):
        new = []
        for P, g in cur.protos:
            P, g = P.copy(), g.copy()
            r = rng.choice(P.shape[0], 2, replace=False)
            P[r] += np.float32(0.01)
            g[r] -= np.float32(0.01)
            rows_bytes += 2 * 4 * (P.shape[1] + 2) + 4
            new.append((P, g))
        cur = store.commit(cur, new, [("a", k + 1)])
        want.append(cur.protos)
    store.close()
    size = db_bytes(path)
    snapshots = n // SNAPSHOT_EVERY + 1
    # the bound: the payload (snapshots + rows) plus 25 % and 64 kB for pages and the other tables
    assert size < 1.25 * (snapshots * full + rows_bytes) + 65536, size
    assert size < (n + 1) * full / 20, (size, (n + 1) * full)
    store = SQLiteStore(path, m, want[0])
    for v in (0, 1, 63, 64, 65, 127, 128, 199, 200):
        assert_bits_equal(store.get(v).protos, want[v], f"version {v}")
    store.close()


# -- a schema 1 database -----------------------------------------------------------------------

# server/store.py's tables before the changed-rows layout, exactly (PRAGMA user_version 1)
SCHEMA_1 = """
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


def write_schema_1(path, m: Manifest, rng, n_versions: int, user_version: int = 1):
    """A server.db as the schema 1 code wrote it: every version a full npz copy. Returns the
    prototypes of each version."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA_1)
    db.execute(f"PRAGMA user_version = {user_version}")
    protos = random_protos(rng, m)
    history = []
    for v in range(n_versions):
        if v:
            protos = change(rng, protos, "rows")
        history.append(protos)
        merged = {"a": v} if v else {}
        db.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (v, v - 1 if v else None, 1000.0 + v, m.onnx_sha256, pack_arrays(protos_to_arrays(protos)),
                    json.dumps(merged), 1 if v else 0))
        if v:
            db.execute("INSERT INTO merged_deltas VALUES ('a', ?, ?)", (v, v))
    db.execute("INSERT INTO refused_deltas VALUES ('a', ?, 'norm too large')", (n_versions + 1,))
    db.commit()
    db.close()
    return history


def user_version(path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


@pytest.mark.parametrize("old_user_version", [1, 0])
def test_a_schema_1_database_is_migrated_and_keeps_every_version(tmp_path, old_user_version):
    rng = np.random.default_rng(12)
    m = manifest()
    path = str(tmp_path / DB_FILE)
    history = write_schema_1(path, m, rng, 5, old_user_version)

    store = SQLiteStore(path, m, history[0], snapshot_every=4)
    assert user_version(path) == SCHEMA_VERSION == 2
    latest = store.latest()
    assert (latest.version, latest.parent, latest.created, latest.merged, latest.n_deltas) == (4, 3, 1004.0, {"a": 4}, 1)
    for v, protos in enumerate(history):
        assert_bits_equal(store.get(v).protos, protos, f"old version {v}")
    assert store.is_merged("a", 3) and not store.is_merged("a", 5)
    # new versions go on from the old ones: rows against an old full copy, the marks pass the
    # refused seq 6 once seq 5 is merged
    cur = latest
    for k in range(5, 10):
        new = change(rng, cur.protos, "rows")
        cur = store.commit(cur, new, [("a", k)])
        history.append(new)
    assert cur.merged == {"a": 9}
    store.close()
    assert forms(path) == {**{v: "full" for v in range(5)}, 5: "rows", 6: "rows", 7: "rows", 8: "full", 9: "rows"}

    store = SQLiteStore(path, m, history[0], snapshot_every=4)   # reopen: nothing migrated again
    assert_bits_equal(store.latest().protos, history[-1])
    for v, protos in enumerate(history):
        assert_bits_equal(store.get(v).protos, protos, f"version {v} after reopen")
    store.close()


def test_a_migration_that_fails_changes_nothing(tmp_path, monkeypatch):
    rng = np.random.default_rng(13)
    m = manifest()
    path = str(tmp_path / DB_FILE)
    history = write_schema_1(path, m, rng, 3)
    # the second column cannot be added (NOT NULL without a default), after the first was
    monkeypatch.setattr(store_mod, "_ADDED_COLUMNS", store_mod._ADDED_COLUMNS[:1] + [("broken", "TEXT NOT NULL")])
    with pytest.raises(ModelError, match="could not bring the database to schema 2.*it is unchanged"):
        SQLiteStore(path, m, history[0])
    db = sqlite3.connect(path)
    columns = [r[1] for r in db.execute("PRAGMA table_info(versions)")]
    assert columns == ["version", "parent", "created", "model_sha256", "protos", "merged", "n_deltas"]
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    db.close()
    monkeypatch.undo()
    store = SQLiteStore(path, m, history[0])
    assert_bits_equal(store.latest().protos, history[-1])
    store.close()


def test_a_newer_schema_is_refused(tmp_path):
    m = manifest()
    path = str(tmp_path / DB_FILE)
    SQLiteStore(path, m, random_protos(np.random.default_rng(14), m)).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(ModelError, match=f"database schema {SCHEMA_VERSION + 1}, this edge-spl uses {SCHEMA_VERSION}"):
        SQLiteStore(path, m, random_protos(np.random.default_rng(14), m))


def test_the_stored_sha256_is_of_the_prototypes(tmp_path):
    rng = np.random.default_rng(15)
    m = manifest()
    path = str(tmp_path / DB_FILE)
    store = SQLiteStore(path, m, random_protos(rng, m))
    v1 = store.commit(store.latest(), change(rng, store.latest().protos, "rows"), [])
    store.close()
    db = sqlite3.connect(path)
    (sha,) = db.execute("SELECT protos_sha256 FROM versions WHERE version = 1").fetchone()
    db.close()
    flat = b"".join(P.astype("<f4").tobytes() + g.astype("<f4").tobytes() for P, g in v1.protos)
    import hashlib
    assert sha == protos_sha256(v1.protos) == hashlib.sha256(flat).hexdigest()
