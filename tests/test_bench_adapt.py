"""`edge-spl bench adapt`: one small-slice run end to end (real data, real pretraining, real
onnxruntime), checked for structure and sanity; and each baseline's update rule against a slow
numpy twin."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import SHARED_DATA, make_model

from edge_spl.cli.bench import learners as L
from edge_spl.cli.bench.cosine import ff_direction
from edge_spl.cli.bench.streams import (DATASETS, LABEL_EVERY, ORDERS, REGIMES, load_tasks, macro_f1,
                                        make_stream, revealed_labels)
from edge_spl.errors import EdgeSplError
from edge_spl.model import ModelState
from edge_spl.spl import forward, softmax, standardize

LIMIT = 40
N_BATCHES = {"gas": 5, "occupancy": 8}


@pytest.fixture(scope="module")
def tasks():
    return {t.name: t for t in load_tasks(SHARED_DATA)}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-adapt")
    proc = subprocess.run([sys.executable, "-m", "edge_spl", "bench", "adapt", "--data", SHARED_DATA,
                           "--out", str(out), "--limit", str(LIMIT), "--seeds", "1", "--epochs", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "bench_adapt.json") as f:
        result = json.load(f)
    return out, result, proc.stdout, proc.stderr


# -- the small-slice run -------------------------------------------------------------------------

def test_json_has_every_dataset_order_regime_learner(small_run):
    out, res, stdout, stderr = small_run
    assert os.path.getsize(out / "bench_adapt.png") > 10_000
    for ds in DATASETS:
        for order in ORDERS:
            for regime in REGIMES:
                block = res[ds][order][regime]
                want = [n for n in L.LEARNERS if L.runs_in(n, regime)]
                assert list(block) == want, (ds, order, regime)
                for name, e in block.items():
                    for key in ("mean_acc", "mean_f1", "per_batch", "samples_per_s", "worst_vs_frozen", "seeds"):
                        assert key in e, (ds, order, regime, name, key)
                    assert 0.0 <= e["mean_acc"] <= 100.0 and 0.0 <= e["mean_f1"] <= 100.0
                    assert e["samples_per_s"] > 0
                    assert len(e["per_batch"]) == N_BATCHES[ds]
                    assert all(b["n"] == LIMIT and 0 <= b["acc"] <= 100 for b in e["per_batch"])
                    accs = [b["acc"] for b in e["per_batch"]]
                    assert e["mean_acc"] == pytest.approx(np.mean(accs), abs=0.01)
                    assert len(e["seeds"]) == 1 and e["seeds"][0]["seed"] == 0
                    assert e["worst_vs_frozen"] <= (0.0 if name == "frozen" else 100.0)
                # a progress line per (dataset, order, regime, learner)
                for name in block:
                    assert f"[{ds} {order} seed 0 {regime}] {name}: acc" in stderr
    assert "gas drift" in stdout and "occupancy" in stdout and "bench_adapt.json" in stdout
    assert res["meta"]["seeds"] == [0] and res["meta"]["limit"] == LIMIT


def test_frozen_equals_numpy_evaluation(small_run, tasks):
    """The bench's frozen learner (onnxruntime, one sample a call) scores what a direct numpy
    forward of the saved model scores on the same samples; with no labels, BP and last-label
    never move away from it."""
    out, res, _, _ = small_run
    for ds in DATASETS:
        state = ModelState.load(str(out / "models" / f"{ds}-seed0"))
        for order in ORDERS:
            stream = make_stream(tasks[ds], order, 0, LIMIT)
            pred = forward(state.layers, standardize(stream.X, state.mean, state.std))[0].argmax(axis=1)
            want = [100.0 * np.mean(pred[stream.batch == k] == stream.y[stream.batch == k])
                    for k in range(len(stream.names))]
            for regime in REGIMES:
                got = [b["acc"] for b in res[ds][order][regime]["frozen"]["per_batch"]]
                assert got == pytest.approx(want, abs=1e-6), (ds, order, regime)
            for name in ("bp", "last-label"):
                got = [b["acc"] for b in res[ds][order]["none"][name]["per_batch"]]
                assert got == pytest.approx(want, abs=1e-6), (ds, order, name)


def test_last_label_is_high_in_file_order_with_all_labels(small_run):
    # file order groups each gas batch by class, and occupancy persists minute to minute
    _, res, _, _ = small_run
    for ds in DATASETS:
        assert res[ds]["file"]["all"]["last-label"]["mean_acc"] > 85.0, ds


def test_cosine_report(small_run):
    _, res, stdout, _ = small_run
    cos = res["cosine"]
    assert cos["dataset"] == "gas" and cos["regime"] == "all" and cos["order"] == "shuffled"
    # the cosine is measured at the input the learner really saw
    assert cos["learner_input_check"] >= 0.99
    layers = cos["layers"]
    assert [c["kind"] for c in layers] == ["hidden", "hidden", "head", "head-rule"]
    for c in layers:
        for key in ("per_sample", "window_sum", "batch_sum"):
            assert len(c[key]) == N_BATCHES["gas"]
            assert all(v is None or -1.0 <= v <= 1.0 for v in c[key])
    # the plain head FF rule and the CE gradient agree in sign class by class: always positive
    assert all(v > 0 for v in layers[-1]["per_sample"])
    assert all(v is not None for v in layers[2]["per_sample"])   # the learner moved its head
    assert "FF update vs -grad" in stdout


def test_bad_data_folder_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edge_spl", "bench", "adapt", "--data", str(tmp_path),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "gas-sensor-drift" in proc.stderr and "Traceback" not in proc.stderr


# -- streams ---------------------------------------------------------------------------------------

def test_streams_keep_batch_order_and_shuffle_within_batches(tasks):
    for task in tasks.values():
        file = make_stream(task, "file")
        assert np.array_equal(file.X, np.concatenate([b.X for b in task.batches]))
        a, b = make_stream(task, "shuffled", 1), make_stream(task, "shuffled", 1)
        c = make_stream(task, "shuffled", 2)
        assert np.array_equal(a.X, b.X) and not np.array_equal(a.X, c.X)
        assert np.array_equal(a.batch, file.batch)   # batch order kept
        for k, batch in enumerate(task.batches):
            sel = a.batch == k
            assert np.array_equal(np.sort(a.y[sel]), np.sort(batch.y))
            assert np.allclose(np.sort(a.X[sel], axis=0), np.sort(batch.X, axis=0))
        small = make_stream(task, "shuffled", 1, 7)
        assert np.bincount(small.batch).tolist() == [min(7, len(b.y)) for b in task.batches]
        assert np.array_equal(small.X[:7], a.X[:7])
    occ = tasks["occupancy"]
    assert [b.name for b in occ.batches][:2] == ["02-11", "02-12"] and sum(len(b.y) for b in occ.batches) == 9752


def test_label_regimes():
    y = np.arange(100) % 3
    assert np.all(revealed_labels(y, "none") == -1)
    assert np.array_equal(revealed_labels(y, "all"), y)
    five = revealed_labels(y, "5pct")
    assert np.flatnonzero(five >= 0).tolist() == list(range(0, 100, LABEL_EVERY))
    assert np.array_equal(five[five >= 0], y[::LABEL_EVERY])


def test_macro_f1_over_present_classes():
    y = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])       # class 2 is absent: it is not averaged, only costs class 0
    f0, f1 = 2 * 1 / (2 * 1 + 0 + 1), 1.0
    assert macro_f1(pred, y) == pytest.approx(100 * (f0 + f1) / 2)
    assert macro_f1(y, y) == 100.0


def test_only_validates_names():
    from edge_spl.cli.bench.adapt import learner_names

    assert learner_names("slda,edge-spl") == ["frozen", "edge-spl", "slda"]
    with pytest.raises(EdgeSplError, match="unknown learner"):
        learner_names("slda,nope")


# -- baseline update rules vs numpy twins ----------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_lda_equals_batch_computation(seed):
    rng = np.random.default_rng(seed)
    C, d, n0, n = 3, 6, 30, 90
    H = rng.standard_normal((n, d)) * rng.uniform(0.5, 3, d) + rng.standard_normal(d)
    y = rng.integers(0, C, n)
    y[:C] = np.arange(C)
    lda = L.StreamingLDA(C, d, shrinkage=0.05).fit_base(H[:n0], y[:n0])
    for h, k in zip(H[n0:], y[n0:]):
        lda.learn_one(h, int(k))
    means = np.stack([H[y == k].mean(axis=0) for k in range(C)])
    resid = H - means[y]
    cov = resid.T @ resid / n          # pooled within-class covariance, one batch computation
    assert np.allclose(lda.means_, means) and np.allclose(lda.covariance_, cov)
    assert lda.counts_.tolist() == np.bincount(y, minlength=C).tolist()
    # prediction: the slow textbook LDA with the same shrinkage
    Lam = np.linalg.inv(0.95 * cov + 0.05 * np.eye(d))
    X = rng.standard_normal((50, d)) * 2
    slow = X @ Lam @ means.T - 0.5 * np.einsum("kd,de,ke->k", means, Lam, means)
    assert np.allclose([lda.scores(x) for x in X], slow, atol=1e-8)
    assert [lda.predict_one(x) for x in X] == slow.argmax(axis=1).tolist()


def test_streaming_lda_never_predicts_an_unseen_class():
    lda = L.StreamingLDA(3, 2).fit_base(np.array([[0.0, 0.0], [1.0, 1.0]]), np.array([0, 1]))
    assert all(lda.predict_one(x) in (0, 1) for x in np.random.default_rng(0).standard_normal((20, 2)) * 5)


class Constant:
    def __init__(self, value):
        self.value, self.calls = value, 0

    def step(self, x, label=-1):
        self.calls += 1
        return self.value


def test_last_label():
    fallback = Constant(4)
    ll = L.LastLabel(fallback)
    x = np.zeros(3, np.float32)
    preds = [ll.step(x, lab) for lab in [-1, -1, 2, -1, 5, 1, -1]]
    assert preds == [4, 4, 4, 2, 2, 5, 1]
    assert fallback.calls == 3   # only until the first label


@pytest.mark.parametrize("whiten", [False, True])
def test_bp_step_equals_numpy_head_gradient(whiten):
    state = make_model((8, 16, 16, 3), seed=3)
    rng = np.random.default_rng(0)
    if whiten:   # the gradient is w.r.t. the whitened head's P, on its whitened input
        state = state.with_whitened_head(rng.standard_normal((200, 8)).astype(np.float32),
                                         rng.integers(0, 3, 200), 1e-3)
    bp = L.BPFineTune(state, lr=0.2)
    x, label = rng.standard_normal(8).astype(np.float32) * 2, 1
    z = standardize(x[None], state.mean, state.std)
    logits, hs, _ = forward(state.layers, z)
    P, g = state.layers[-1]["P"].astype(np.float64), state.layers[-1]["g"].astype(np.float64)
    e = softmax(logits[0].astype(np.float64)) - np.eye(3)[label]        # dCE/dlogits
    h = hs[-1][0].astype(np.float64)
    P_want = P - 0.2 * np.outer(e, h) / math.sqrt(h.size)
    g_want = g + 0.2 * e
    assert bp.step(x, label) == int(np.argmax(logits[0]))
    after = bp.model.layer_arrays()
    assert np.allclose(after[-1]["P"], P_want, atol=1e-5) and np.allclose(after[-1]["g"], g_want, atol=1e-6)
    for L0, L1 in zip(state.layers[:-1], after[:-1]):   # hidden P, g get no CE gradient; W, b are not trained
        for k in ("W", "b", "P", "g"):
            assert np.array_equal(L0[k], L1[k])
    before = bp.model.layer_arrays()
    bp.step(x, -1)                                      # no label: predict only
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(before, bp.model.layer_arrays()) for k in a)


def test_ff_direction_equals_the_device_kernel():
    from edge_spl.device.kernels import ff_update

    rng = np.random.default_rng(5)
    for _ in range(5):
        d_in, d_out = rng.integers(2, 20, 2)
        h = rng.standard_normal(d_in).astype(np.float32)
        G = rng.standard_normal(d_out).astype(np.float32) * 3
        t = rng.choice([-1.0, 0.0, 1.0], d_out).astype(np.float32)
        P = rng.standard_normal((d_out, d_in)).astype(np.float32)
        g = rng.standard_normal(d_out).astype(np.float32)
        P1, g1 = P.copy(), g.copy()
        ff_update(h, G, t, P1, g1, 1.0, np.zeros(d_out, np.float32))
        dP, dg = ff_direction(h, G, t)
        assert np.allclose(P1 - P, dP, atol=1e-5) and np.allclose(g1 - g, dg, atol=1e-5)


def test_river_learner_learns_only_from_revealed_labels():
    from river import linear_model, multiclass, preprocessing

    rl = L.RiverLearner(preprocessing.StandardScaler()
                        | multiclass.OneVsRestClassifier(linear_model.LogisticRegression()), ["a", "b"])
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 2)).astype(np.float32)
    assert [rl.step(x, -1) for x in X] == [-1] * 60          # no label, no model, no prediction
    y = (X[:, 0] > 0).astype(int)
    for x, k in zip(X, y):
        rl.step(x, int(k))
    assert np.mean([rl.step(x, -1) == k for x, k in zip(X, y)]) > 0.8


def test_slda_reads_the_head_input_before_whitening():
    """SLDA keeps a full covariance of its own: it is fed [z, h] as the frozen model computes it,
    whether or not the model's head whitens it."""
    state = make_model((8, 16, 16, 3), seed=5)
    rng = np.random.default_rng(2)
    white = state.with_whitened_head(rng.standard_normal((200, 8)).astype(np.float32),
                                     rng.integers(0, 3, 200), 1e-3)
    X = rng.standard_normal((6, 8)).astype(np.float32)
    plain = forward(state.layers, standardize(X, state.mean, state.std))[1][-1]
    np.testing.assert_array_equal(L.last_hidden(white, X), plain)
    assert not np.allclose(forward(white.layers, standardize(X, white.mean, white.std))[1][-1], plain, atol=1e-3)
