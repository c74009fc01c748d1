"""The device's onnxruntime session, FF learner, delta/release bookkeeping and durable state."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from conftest import make_model

from edge_spl.data import load_gas_file
from edge_spl.device.learner import FFLearner
from edge_spl.device.session import OnnxModel
from edge_spl.device.state import load_state, save_state, state_path
from edge_spl.errors import DataError, ModelError
from edge_spl.export.onnx_export import export_model
from edge_spl.model import init_model
from edge_spl.protocol import Release, decode_delta, encode_delta
from edge_spl.spl import forward, standardize

f32 = np.float32


@pytest.fixture(scope="module")
def tiny():
    state = make_model((8, 16, 16, 3))
    exported = export_model(state)
    exported.manifest.onnx_sha256 = "a" * 64   # what ExportedModel.save would fill in
    return state, exported


@pytest.fixture(scope="module")
def tiny_white():
    """`tiny` with its head whitened, as `edge-spl train` leaves a model."""
    rng = np.random.default_rng(7)
    state = make_model((8, 16, 16, 3)).with_whitened_head(rng.standard_normal((300, 8)).astype(f32),
                                                          rng.integers(0, 3, 300), 1e-3)
    exported = export_model(state)
    exported.manifest.onnx_sha256 = "a" * 64
    return state, exported


def stream(n, d=8, seed=0, classes=3):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, d)) * 2
    for i in range(n):
        y = int(rng.integers(classes))
        yield (centers[y] + rng.standard_normal(d)).astype(f32), y


def layers_with(state, protos):
    return state.with_prototypes(protos).layers


# -- onnxruntime session ------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["tiny", "tiny_white"])
def test_session_matches_the_numpy_reference_and_sees_in_place_updates(model, request):
    state, exported = request.getfixturevalue(model)
    model = OnnxModel(exported)
    rng = np.random.default_rng(0)
    protos = [(P.copy(), g.copy()) for P, g in exported.protos]
    z = rng.standard_normal((5, 8)).astype(f32)
    for _ in range(2):
        out = model.run(z, protos)
        logits, hs, rs = forward(layers_with(state, protos), z)
        np.testing.assert_allclose(out["logits"], logits, rtol=1e-5, atol=1e-5)
        for i in (1, 2):
            np.testing.assert_allclose(out[f"h{i}"], hs[i], rtol=1e-5, atol=1e-5)
        for i in (0, 1):
            np.testing.assert_allclose(out[f"r{i}"], rs[i], rtol=1e-5, atol=1e-5)
        for P, g in protos:        # change the fed arrays in place: the next call must see it
            P += rng.standard_normal(P.shape).astype(f32) * 0.5
            g -= 0.3


def test_session_rejects_bad_graphs_and_inputs(tiny):
    _, exported = tiny
    bad = type(exported)(exported.manifest, b"not onnx", exported.protos)
    with pytest.raises(ModelError, match="onnxruntime cannot load"):
        OnnxModel(bad)
    with pytest.raises(ValueError, match=r"float32 \[N, 8\]"):
        OnnxModel(exported).run(np.zeros((2, 7), f32), exported.protos)


# -- per-sample learning --------------------------------------------------------------------------

def test_step_predicts_before_learning(tiny):
    state, exported = tiny
    L = FFLearner(exported, lr_head=0.5, lr_hidden=0.0, alpha=0.0)
    for x, y in stream(20):
        before = [(P.copy(), g.copy()) for P, g in L.protos_]
        z = standardize(x[None], state.mean, state.std)
        logits = forward(layers_with(state, before), z)[0][0]
        pred, conf = L.step(x, y)
        assert pred == int(np.argmax(logits))
        p = np.exp(logits - logits.max())
        assert conf == pytest.approx(float(p.max() / p.sum()), rel=1e-4)
        # only the head learns, from the label
        for (P, g), (bP, bg) in zip(L.protos_[:-1], before[:-1]):
            np.testing.assert_array_equal(P, bP)
        assert not np.array_equal(L.protos_[-1][0], before[-1][0])


def test_a_whitened_model_learns_its_head_in_the_whitened_coordinates(tiny_white):
    """One plain head step (no RMS scaling, no replay) on a whitened model is the FF rule on the
    head's whitened input u T: P -= lr e (u T) / sqrt(d), g += lr e, e = sigmoid(logits) - onehot."""
    state, exported = tiny_white
    L = FFLearner(exported, lr_head=0.3, rms_decay=0.0, replay=0, alpha=0.0)
    x, y = next(stream(1, seed=4))
    P, g = (a.astype(np.float64) for a in L.protos_[-1])
    logits, hs, _ = forward(state.layers, standardize(x[None], state.mean, state.std))
    u = hs[-1][0].astype(np.float64)
    assert not np.allclose(u[:8], standardize(x[None], state.mean, state.std)[0], atol=1e-3)   # not [z, h]
    e = 1.0 / (1.0 + np.exp(-logits[0].astype(np.float64))) - np.eye(3)[y]
    L.step(x, y)
    np.testing.assert_allclose(L.protos_[-1][0], P - 0.3 * np.outer(e, u) / np.sqrt(u.size), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(L.protos_[-1][1], g + 0.3 * e, rtol=1e-4, atol=1e-5)


def test_head_ff_learns_a_labelled_stream(tiny):
    _, exported = tiny
    def accuracy(lr_head):
        L = FFLearner(exported, lr_head=lr_head, lr_hidden=0.0)
        return np.mean([L.step(x, y)[0] == y for x, y in stream(400, seed=1)][-200:])

    frozen, adapted = accuracy(0.0), accuracy(0.2)
    assert adapted > 0.55 and adapted > frozen + 0.2


def test_hidden_ff_moves_only_hidden_layers_without_labels(tiny):
    _, exported = tiny
    L = FFLearner(exported, lr_head=0.1, lr_hidden=0.01, hidden_frac=0.25)
    start = [(P.copy(), g.copy()) for P, g in L.protos_]
    for x, _ in stream(30):
        L.step(x, -1)
    assert not np.array_equal(L.protos_[0][0], start[0][0])
    assert not np.array_equal(L.protos_[1][1], start[1][1])
    np.testing.assert_array_equal(L.protos_[2][0], start[2][0])
    # 4 of 16 units per sample, counted once per sample (not for the negative pass too)
    assert L.counts_[0].sum() == 29 * 4 and L.counts_[2].sum() == 0


def test_step_validates_and_leaves_inputs_alone(tiny):
    _, exported = tiny
    L = FFLearner(exported)
    x = np.arange(8, dtype=f32)
    keep = x.copy()
    L.step(x, 1)
    np.testing.assert_array_equal(x, keep)
    with pytest.raises(DataError, match="8 features"):
        L.step(np.zeros(7, f32))
    with pytest.raises(DataError, match="NaN"):
        L.step(np.full(8, np.nan, f32))
    with pytest.raises(ValueError, match="label index 3"):
        L.step(x, 3)
    with pytest.raises(ValueError, match="lr_head"):
        FFLearner(exported, lr_head=-1)


def test_seeded_learners_agree_and_pickle(tiny):
    _, exported = tiny
    a, b = FFLearner(exported, seed=7, lr_hidden=0.01), FFLearner(exported, seed=7, lr_hidden=0.01)
    data = list(stream(60))
    assert [a.step(x, y) for x, y in data[:40]] == [b.step(x, y) for x, y in data[:40]]
    c = pickle.loads(pickle.dumps(a))
    assert [a.step(x, y) for x, y in data[40:]] == [c.step(x, y) for x, y in data[40:]]


def test_real_gas_stream_with_outliers_stays_finite(gas_dir):
    """Batch 2 holds a feature at ~30,000 (batch 1 averages ~4.5): nothing may blow up."""
    b1 = load_gas_file(os.path.join(gas_dir, "batch1.dat"))
    b2 = load_gas_file(os.path.join(gas_dir, "batch2.dat"))
    state = init_model([128, 32, 32, 6], b1.X.mean(0), b1.X.std(0) + 1e-3, b1.classes(),
                       b1.feature_names, seed=0)
    exported = export_model(state)
    L = FFLearner(exported, lr_head=0.2, lr_hidden=0.01)
    idx = {c: i for i, c in enumerate(b1.classes())}
    for x, y in zip(b2.X[:400], b2.y[:400]):
        L.step(x, idx[y])
    for P, g in L.protos_:
        assert np.all(np.isfinite(P)) and np.all(np.isfinite(g))
    assert np.all(np.isfinite(L.mean_)) and np.all(L.var_ > 0)


# -- deltas and releases --------------------------------------------------------------------------

def learn(L, n, seed=0, label=True):
    for x, y in stream(n, seed=seed):
        L.step(x, y if label else -1)


def release_of(L, protos, version, merged):
    return Release(version, L.manifest.onnx_sha256, [(P.copy(), g.copy()) for P, g in protos], merged)


def test_make_delta_holds_what_was_learned_since_the_last_one(tiny):
    _, exported = tiny
    L = FFLearner(exported, device_id="dev1", lr_hidden=0.0)
    assert L.make_delta() is None
    learn(L, 10)
    d1 = L.make_delta()
    assert (d1.device, d1.seq, d1.base_version) == ("dev1", 1, 0)
    assert [len(x.rows) for x in d1.layers] == [0, 0, 3]
    np.testing.assert_array_equal(d1.layers[2].counts, [10, 10, 10])
    np.testing.assert_allclose(d1.layers[2].dP, L.protos_[2][0] - exported.protos[2][0], atol=1e-6)
    assert L.make_delta() is None          # nothing new learned
    learn(L, 5, seed=1)
    d2 = L.make_delta()
    assert d2.seq == 2 and [d.seq for d in L.outstanding_] == [1, 2]
    np.testing.assert_array_equal(d2.layers[2].counts, [5, 5, 5])
    total = exported.protos[2][0] + d1.layers[2].dP + d2.layers[2].dP
    np.testing.assert_allclose(L.protos_[2][0], total, atol=1e-6)
    again = decode_delta(encode_delta(d2))
    np.testing.assert_array_equal(again.layers[2].dP, d2.layers[2].dP)


def test_adopting_a_release_that_merged_my_delta_keeps_unpushed_learning(tiny):
    _, exported = tiny
    L = FFLearner(exported, device_id="dev1", lr_hidden=0.01)
    learn(L, 20)
    d1 = L.make_delta()
    learn(L, 7, seed=2)                       # unpushed learning
    unpushed = [(P - b[0] - _dense(d1, i, P.shape)[0], g - b[1] - _dense(d1, i, P.shape)[1])
                for i, ((P, g), b) in enumerate(zip(L.protos_, L.base_))]
    # the server merged my delta (and someone else's change) into version 1
    rng = np.random.default_rng(9)
    rel = [(b[0] + _dense(d1, i, b[0].shape)[0] + rng.standard_normal(b[0].shape).astype(f32) * 0.01,
            b[1] + _dense(d1, i, b[0].shape)[1]) for i, b in enumerate(L.base_)]
    fed = [P for P, _ in L.protos_]
    assert L.adopt_release(release_of(L, rel, 1, {"dev1": 1, "other": 4}))
    assert L.outstanding_ == [] and L.base_version_ == 1
    for (P, g), (rP, rg), (uP, ug) in zip(L.protos_, rel, unpushed):
        np.testing.assert_allclose(P, rP + uP, atol=1e-5)
        np.testing.assert_allclose(g, rg + ug, atol=1e-5)
    assert all(P is F for (P, _), F in zip(L.protos_, fed))   # written in place
    for (bP, bg), (rP, rg) in zip(L.base_, rel):
        np.testing.assert_array_equal(bP, rP)
    # the unpushed learning goes out in the next delta, relative to the new base
    d2 = L.make_delta()
    assert d2.seq == 2 and d2.base_version == 1
    np.testing.assert_allclose(d2.layers[0].dP, unpushed[0][0][d2.layers[0].rows], atol=1e-5)


def test_a_release_covering_only_older_deltas_keeps_the_newer_ones(tiny):
    _, exported = tiny
    L = FFLearner(exported, device_id="dev1", lr_hidden=0.0)
    learn(L, 10)
    d1 = L.make_delta()
    learn(L, 10, seed=3)
    d2 = L.make_delta()
    base = [(P.copy(), g.copy()) for P, g in L.base_]
    rel = [(P + _dense(d1, i, P.shape)[0], g + _dense(d1, i, P.shape)[1]) for i, (P, g) in enumerate(base)]
    assert L.adopt_release(release_of(L, rel, 3, {"dev1": 1}))
    assert [d.seq for d in L.outstanding_] == [2]
    np.testing.assert_allclose(L.protos_[2][0], rel[2][0] + d2.layers[2].dP, atol=1e-5)
    # an older or equal version, another model, other shapes: refused, nothing changes
    keep = [(P.copy(), g.copy()) for P, g in L.protos_]
    assert not L.adopt_release(release_of(L, rel, 3, {"dev1": 2}))
    assert not L.adopt_release(release_of(L, rel, 2, {"dev1": 2}))
    other = release_of(L, rel, 9, {})
    other.model_sha256 = "b" * 64
    assert not L.adopt_release(other)
    assert not L.adopt_release(release_of(L, rel[:2], 9, {}))
    assert not L.adopt_release(release_of(L, [(P[:, :4], g) for P, g in rel], 9, {}))
    for (P, g), (kP, kg) in zip(L.protos_, keep):
        np.testing.assert_array_equal(P, kP)
    assert L.base_version_ == 3 and [d.seq for d in L.outstanding_] == [2]


def test_a_release_past_my_sequence_moves_it_on(tiny):
    """A device whose state was lost must not reuse seqs the server has already merged."""
    _, exported = tiny
    L = FFLearner(exported, device_id="dev1")
    assert L.adopt_release(release_of(L, L.protos_, 5, {"dev1": 12}))
    learn(L, 3)
    assert L.make_delta().seq == 13


def _dense(delta, i, shape):
    dP, dg = np.zeros(shape, f32), np.zeros(shape[0], f32)
    L = delta.layers[i]
    dP[L.rows] = L.dP
    dg[L.rows] = L.dg
    return dP, dg


# -- durable state --------------------------------------------------------------------------------

def test_state_round_trip_restores_identical_behaviour(tiny, tmp_path):
    _, exported = tiny
    a = FFLearner(exported, device_id="dev1", lr_hidden=0.01, seed=3)
    data = list(stream(90, seed=5))
    for x, y in data[:40]:
        a.step(x, y)
    a.make_delta()
    for x, y in data[40:60]:
        a.step(x, y)
    save_state(a, str(tmp_path))
    b = FFLearner(exported, device_id="dev1", lr_hidden=0.01, seed=99)   # another seed: RNG restored
    assert load_state(b, str(tmp_path))
    assert [d.seq for d in b.outstanding_] == [1] and b.next_seq_ == 2
    assert [a.step(x, y) for x, y in data[60:]] == [b.step(x, y) for x, y in data[60:]]
    for (P, g), (Q, h) in zip(a.protos_, b.protos_):
        np.testing.assert_array_equal(P, Q)
        np.testing.assert_array_equal(g, h)
    da, db = a.make_delta(), b.make_delta()
    assert encode_delta(da) == encode_delta(db)


def test_missing_corrupt_or_foreign_state(tiny, tmp_path):
    _, exported = tiny
    L = FFLearner(exported, device_id="dev1")
    assert not load_state(L, str(tmp_path))
    learn(L, 5)
    save_state(L, str(tmp_path))
    path = state_path(str(tmp_path))
    data = open(path, "rb").read()

    with open(path, "wb") as f:
        f.write(data[:-100])
    with pytest.raises(ModelError, match=r"device-state\.bin.*corrupt or truncated"):
        load_state(FFLearner(exported, device_id="dev1"), str(tmp_path))
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(flipped))
    with pytest.raises(ModelError, match="corrupt"):
        load_state(FFLearner(exported, device_id="dev1"), str(tmp_path))
    with open(path, "wb") as f:
        f.write(b"hello\n")
    with pytest.raises(ModelError, match="not an edge-spl device state"):
        load_state(FFLearner(exported, device_id="dev1"), str(tmp_path))
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(ModelError, match="device 'dev1', not 'dev2'"):
        load_state(FFLearner(exported, device_id="dev2"), str(tmp_path))


def test_without_labels_or_adaptation_the_learner_is_the_frozen_model_on_occupancy(occupancy_dir):
    """alpha = 0 and no labels must reproduce the frozen model exactly, also for occupancy's
    HumidityRatio, whose training variance (7e-7) is below any sensible absolute epsilon."""
    from edge_spl.data import OCCUPANCY_FEATURES, load_occupancy
    from edge_spl.model import init_model

    train, test = load_occupancy(occupancy_dir), load_occupancy(occupancy_dir, "datatest2.txt")
    mean, std = train.X.mean(0), train.X.std(0)
    assert std.min() < 1e-3
    state = init_model([5, 16, 16, 2], mean, std, ["0", "1"], OCCUPANCY_FEATURES, seed=3)
    learner = FFLearner(export_model(state), alpha=0.0)
    X = test.X[:3000]
    want = forward(state.layers, standardize(X, state.mean, state.std))[0].argmax(1)
    got = np.array([learner.step(x)[0] for x in X])
    assert np.array_equal(got, want)
    np.testing.assert_array_equal(learner.var_, np.square(np.asarray(state.std, f32)))


def test_replay_adds_no_samples_and_a_changed_buffer_size_restarts_it(tiny, tmp_path):
    _, exported = tiny
    a = FFLearner(exported, device_id="dev1", replay=8, replay_size=5)
    data = list(stream(30, seed=6))
    for x, y in data:
        a.step(x, y)
    assert a.replay_n_ == 30 and sorted(a.replay_y_) == sorted(y for _, y in data[-5:])
    assert np.all(a.counts_[-1] == 30)                       # 30 samples, not 30 + 29 * 8 steps
    save_state(a, str(tmp_path))
    b = FFLearner(exported, device_id="dev1", replay=8, replay_size=7)
    assert load_state(b, str(tmp_path))
    assert b.replay_n_ == 0 and b.n_samples_ == 30           # the cache restarts, the rest is kept
    for (P, g), (Q, h) in zip(a.protos_, b.protos_):
        np.testing.assert_array_equal(P, Q)


def test_acks_let_a_release_take_merged_deltas_out_of_the_outbox_past_a_gap(tiny, tmp_path):
    """Seqs 2 and 3 merged, seq 1 not (yet): the release's contiguous mark stays at 0, but the acks
    say 2 and 3 are in it, so they are not added on top of it a second time."""
    _, exported = tiny
    L = FFLearner(exported, device_id="dev1")
    deltas = []
    for k in range(3):
        learn(L, 5, seed=k)
        deltas.append(L.make_delta())
    base = [(P.copy(), g.copy()) for P, g in L.base_]
    rel = [(P + _dense(deltas[1], i, P.shape)[0] + _dense(deltas[2], i, P.shape)[0],
            g + _dense(deltas[1], i, P.shape)[1] + _dense(deltas[2], i, P.shape)[1]) for i, (P, g) in enumerate(base)]
    L.note_ack(2, True, "merged", 4)
    L.note_ack(3, False, "duplicate", 4)   # a re-send of one already merged
    L.note_ack(9, True, "merged", 4)       # not ours: ignored
    save_state(L, str(tmp_path))           # the acks survive a restart
    L2 = FFLearner(exported, device_id="dev1")
    assert load_state(L2, str(tmp_path)) and L2.settled_ == {2: 4, 3: 4}
    assert L2.adopt_release(release_of(L2, rel, 4, {}))
    assert [d.seq for d in L2.outstanding_] == [1]
    for i, ((P, g), (rP, rg)) in enumerate(zip(L2.protos_, rel)):
        dP, dg = _dense(deltas[0], i, P.shape)
        np.testing.assert_allclose(P, rP + dP, atol=1e-5)     # the release + seq 1 only
        np.testing.assert_allclose(g, rg + dg, atol=1e-5)
    # an ack for a version later than the release says nothing about this release
    learn(L2, 5, seed=7)
    d4 = L2.make_delta()
    L2.note_ack(d4.seq, True, "merged", 9)
    assert L2.adopt_release(release_of(L2, rel, 5, {}))
    assert [d.seq for d in L2.outstanding_] == [1, d4.seq]
    # refused for good: dropped (its learning with it); a transient rejection keeps it
    L2.note_ack(1, False, "norm too large", 5)
    L2.note_ack(d4.seq, False, "future base version", 5)
    assert L2.adopt_release(release_of(L2, rel, 6, {}))
    assert [d.seq for d in L2.outstanding_] == [d4.seq]


def test_a_release_of_a_new_version_history_is_adopted_and_the_outbox_rebased(tiny):
    _, exported = tiny
    L = FFLearner(exported, device_id="dev1")
    old = release_of(L, L.base_, 7, {})
    old.history = "a1"
    assert L.adopt_release(old) and L.base_history_ == "a1"
    for k in range(3):
        learn(L, 5, seed=k)
        d = L.make_delta()
    assert d.seq == 3 and d.base_version == 7 and d.history == "a1"
    L.adopt_release(release_of(L, L.base_, 8, {"dev1": 2}))   # the old server merged seqs 1 and 2
    L.base_history_ = "a1"
    L.note_ack(d.seq, True, "merged", 9)             # acked by the old server: means nothing now
    older_same = release_of(L, L.base_, 3, {})
    older_same.history = "a1"
    assert not L.adopt_release(older_same)           # the same history: older is older
    fresh = release_of(L, exported.protos, 0, {})
    fresh.history = "b2"                             # the server's database was replaced
    assert L.adopt_release(fresh)
    assert L.base_version_ == 0 and L.base_history_ == "b2"
    # seq 3 goes again as seq 1 of the new history, on its version 0
    assert [(x.seq, x.base_version, x.history) for x in L.outstanding_] == [(1, 0, "b2")]
    assert L.next_seq_ == 2 and L.settled_ == {}
    learn(L, 5, seed=9)
    assert (L.make_delta().seq, L.outstanding_[-1].history) == (2, "b2")
