"""What one device can do to the fleet: clipped steps and counts, the robust merge rules, and
refusals that let the merged marks move on -- the rules pure, then in the real server on the
real broker."""
from __future__ import annotations

import time

import numpy as np
import pytest

from edge_spl.protocol import LayerDelta, PrototypeDelta, encode_delta
from edge_spl.server import merge
from edge_spl.server.service import Server
from edge_spl.server.store import DB_FILE

from test_server import SHAPES, fleet_env, random_delta   # noqa: F401 (fleet_env is a fixture)


def one_row(device, seq, step, count=10.0, base=0, shapes=SHAPES, row=0):
    """A delta moving row `row` of layer 0 by `step` in every coordinate and its gate by `step`."""
    layers = []
    for i, (d_out, d_in) in enumerate(shapes):
        k = 1 if i == 0 else 0
        layers.append(LayerDelta(np.full(k, row, np.int32), np.full((k, d_in), step, np.float32),
                                 np.full(k, step, np.float32), np.full(k, count, np.float32)))
    return PrototypeDelta(device, seq, base, layers)


def test_clip_delta_bounds_each_rows_step_and_count():
    rng = np.random.default_rng(0)
    d = random_delta(rng, scale=30.0)
    d.layers[2].counts[:] = 1e6
    clipped, n = merge.clip_delta(d, clip_norm=5.0, max_count=100.0)
    rows_over = 0
    for L, C in zip(d.layers, clipped.layers):
        norm = np.sqrt((L.dP.astype(np.float64) ** 2).sum(1) + L.dg.astype(np.float64) ** 2)
        new = np.sqrt((C.dP.astype(np.float64) ** 2).sum(1) + C.dg.astype(np.float64) ** 2)
        np.testing.assert_allclose(new, np.minimum(norm, 5.0), rtol=1e-5)
        # scaled, not reshaped: the direction of every row is kept
        np.testing.assert_allclose(C.dP * norm[:, None], L.dP * np.maximum(new, 1e-30)[:, None], rtol=1e-4, atol=1e-4)
        assert np.all(C.counts == np.minimum(L.counts, 100.0))
        rows_over += int(np.sum((norm > 5.0) | (L.counts > 100.0)))
        np.testing.assert_array_equal(C.rows, L.rows)
    assert n == rows_over > 0
    same, n0 = merge.clip_delta(d, clip_norm=1e9, max_count=1e9)
    assert n0 == 0 and all(np.array_equal(a.dP, b.dP) for a, b in zip(same.layers, d.layers))


def test_robust_rules_hold_one_loud_device_to_the_honest_ones():
    protos = [(np.zeros(s, np.float32), np.zeros(s[0], np.float32)) for s in SHAPES]
    honest = [one_row(f"h{k}", 1, 0.1 + 0.01 * k) for k in range(4)]
    loud, _ = merge.clip_delta(one_row("loud", 1, 50.0, count=1e9), clip_norm=100.0, max_count=1e4)
    deltas = honest + [loud]
    sums = merge.MergeSums(SHAPES)
    for d in deltas:
        sums.add_delta(d, 0)
    mean = merge.apply(protos, sums)
    median = merge.robust_apply(protos, [(d, 0) for d in deltas], "median")
    trimmed = merge.robust_apply(protos, [(d, 0) for d in deltas], "trimmed")
    assert mean[0][0][0, 0] > 10               # the count-weighted mean follows the loud one
    np.testing.assert_allclose(median[0][0][0], 0.12, rtol=1e-5)          # the middle honest value
    np.testing.assert_allclose(trimmed[0][0][0], np.mean([0.11, 0.12, 0.13]), rtol=1e-5)
    np.testing.assert_allclose(median[0][1][0], 0.12, rtol=1e-5)          # the gate too
    for rule in (median, trimmed):            # untouched rows and layers stay as they were
        assert np.all(rule[0][0][1:] == 0) and all(np.all(P == 0) for P, _ in rule[1:])
    # a stale delta votes with its staleness weight, as in the mean
    stale = merge.robust_apply(protos, [(one_row("old", 1, 1.0, base=0), 16)], "median")
    np.testing.assert_allclose(stale[0][0][0], 0.5, rtol=1e-6)
    with pytest.raises(ValueError):
        merge.robust_apply(protos, [], "mean")


def wait_inbox(server, n):
    deadline = time.monotonic() + 10
    while server._inbox.qsize() < n:
        assert time.monotonic() < deadline, f"{server._inbox.qsize()} of {n} deltas arrived"
        time.sleep(0.02)


def test_the_server_merges_by_the_median_when_asked(fleet_env):
    dev = fleet_env.device()
    # connected, but rounds by hand, so that all five land in one
    server = Server(fleet_env.broker, fleet_env.model_dir, fleet_env.state, fleet=fleet_env.topics.fleet,
                    connect_timeout=5, merge_rule="median", clip_norm=100.0, max_count=1e4)
    server.connect()
    try:
        base = dev.release()
        for k, step in enumerate([0.1, 0.11, 0.12, 0.13, 50.0]):
            dev.send(f"d{k}", encode_delta(one_row(f"d{k}", 1, step, count=1e9 if step > 1 else 10.0)))
        wait_inbox(server, 5)
        assert server.merge_round() == 5
        rel = dev.release(lambda r: r.version == base.version + 1)
        np.testing.assert_allclose(rel.protos[0][0][0], base.protos[0][0][0] + 0.12, rtol=1e-5)
        assert server.stats.rows_clipped == 1      # the loud one's step and count were bounded
        assert all(a["accepted"] for a in dev.acks(5))
    finally:
        server._shutdown()


def test_a_refused_delta_lets_the_merged_mark_move_on(fleet_env):
    """Refused for good (its content was wrong), a seq must not hold the device's mark below it:
    the device would keep every later delta in its outbox and add it on top of each release that
    already holds it."""
    dev = fleet_env.device()
    server = fleet_env.server()
    dev.release()
    bad = one_row("x", 1, 0.1)
    bad.layers[0].rows[:] = 999                                      # rows out of range
    dev.send("x", encode_delta(bad))
    assert [a["reason"] for a in dev.acks(1)] == ["rows out of range"]
    dev.send("x", encode_delta(one_row("x", 2, 0.1)))
    dev.send("x", encode_delta(one_row("x", 3, 0.1)))
    rel = dev.release(lambda r: r.merged.get("x") == 3)
    assert rel.merged == {"x": 3}
    # a delta on a base the server does not have yet is not refused for good: the mark waits
    dev.send("x", encode_delta(one_row("x", 4, 0.1, base=10 ** 6)))
    dev.send("y", encode_delta(one_row("y", 1, 0.1)))
    rel = dev.release(lambda r: "y" in r.merged)
    assert rel.merged == {"x": 3, "y": 1}
    import sqlite3
    db = sqlite3.connect(f"{fleet_env.state}/{DB_FILE}")
    assert db.execute("SELECT device, seq, reason FROM refused_deltas").fetchall() == [("x", 1, "rows out of range")]
    db.close()


def test_a_stale_delta_is_merged_down_weighted_and_reverts_nothing(fleet_env):
    """Deltas are steps, not values: one made on version 0 and arriving at version 10 moves its
    rows by 8/10 of its step (merge.staleness), next to a fresh one in the same round, and leaves
    every row it does not touch as the newer versions made it."""
    dev = fleet_env.device()
    server = Server(fleet_env.broker, fleet_env.model_dir, fleet_env.state, fleet=fleet_env.topics.fleet,
                    connect_timeout=5)
    server.connect()
    try:
        v0 = dev.release()
        for seq in range(1, 11):                      # ten versions of fresh work on row 0
            dev.send("fresh", encode_delta(one_row("fresh", seq, 0.1, base=server.version)))
            wait_inbox(server, 1)
            assert server.merge_round() == 1
        assert server.version == v0.version + 10
        v10 = dev.release(lambda r: r.version == server.version)
        dev.send("old", encode_delta(one_row("old", 1, 1.0, base=v0.version, row=1)))
        dev.send("fresh", encode_delta(one_row("fresh", 11, 0.1, base=server.version, row=2)))
        wait_inbox(server, 2)
        assert server.merge_round() == 2
        v11 = dev.release(lambda r: r.version == v10.version + 1)
        P0, P10, P11 = v0.protos[0][0], v10.protos[0][0], v11.protos[0][0]
        np.testing.assert_allclose(P10[0], P0[0] + 1.0, rtol=1e-5)          # ten steps of 0.1
        np.testing.assert_array_equal(P11[0], P10[0])                       # not reverted
        np.testing.assert_allclose(P11[1], P10[1] + 0.8, rtol=1e-5)         # stale: 8/10 of its step
        np.testing.assert_allclose(P11[2], P10[2] + 0.1, rtol=1e-5)         # fresh, same round
        assert v11.merged == {"fresh": 11, "old": 1}
    finally:
        server._shutdown()


def test_refusals_under_made_up_names_do_not_grow_the_release(fleet_env):
    dev = fleet_env.device()
    server = fleet_env.server()
    dev.release()
    for k in range(5):                                   # junk from names nothing was merged from
        junk = one_row(f"junk{k}", 1, 0.1)
        junk.layers = junk.layers[:2]                    # refused: layer count
        dev.send(f"junk{k}", encode_delta(junk))
    assert {a["reason"] for a in dev.acks(5)} == {"layer count"}
    dev.send("real", encode_delta(one_row("real", 1, 0.1)))
    rel = dev.release(lambda r: "real" in r.merged)
    assert rel.merged == {"real": 1}


def test_a_version_whose_release_would_not_fit_is_not_stored(fleet_env, tmp_path):
    """The merged marks grow with the fleet; once the release would be over the broker's packet
    size the round stores nothing (no version is ever stored that cannot be published) and acks
    nothing, so the devices send their deltas again once the limit is raised."""
    import sqlite3

    from edge_spl.protocol import payload_limit

    probe = fleet_env.server()
    release_bytes = len(probe._release_payload)
    probe.stop()
    max_packet = release_bytes + 200          # room for a few more names in the marks, not many
    assert payload_limit(max_packet, fleet_env.topics.release) >= release_bytes + 64
    server = Server(fleet_env.broker, fleet_env.model_dir, fleet_env.state, fleet=fleet_env.topics.fleet,
                    connect_timeout=5, max_packet=max_packet)
    server.connect()
    dev = fleet_env.device()
    try:
        published = []
        for k in range(40):
            name = f"device-with-a-long-name-{k:03d}"
            dev.send(name, encode_delta(one_row(name, 1, 0.01)))
            wait_inbox(server, 1)
            merged = server.merge_round()
            if not merged:
                break
            published.append(dev.release(lambda r: r.version == server.version).version)
        assert 0 < len(published) < 40, "the marks never outgrew the limit"
        assert dev.inbox["ack"].qsize() == len(published)      # the refused round acked nothing
        db = sqlite3.connect(f"{fleet_env.state}/{DB_FILE}")
        stored = db.execute("SELECT MAX(version) FROM versions").fetchone()[0]
        db.close()
        assert stored == server.version == published[-1]       # nothing stored past what was published
    finally:
        server._shutdown()
