"""Workstation role: torch SPL model vs the numpy reference, ONNX vs torch, pretraining, and the
`train` / `export` commands.

Tolerances: torch vs numpy 1e-5 absolute + 1e-5 relative (same float32 math, different matmul
order); onnxruntime vs torch 1e-4 absolute + 1e-4 relative (what `edge-spl export` checks).
Rows where a hidden routing value lies within 1e-4 of 0 are left out of comparisons: there a
rounding difference legitimately flips a hard mask.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import make_model

from edge_spl.data import Dataset, load_training_data
from edge_spl.errors import DataError, ModelError
from edge_spl.export.onnx_export import export_model
from edge_spl.export.pretrain import pretrain, split_stratified, standardisation
from edge_spl.export.spl_torch import SPLModel, mask_oracle
from edge_spl.manifest import ExportedModel, input_names, output_names
from edge_spl.model import ModelState, init_model
from edge_spl.spl import Z_CLIP, forward, standardize

SWITCH_EPS = 1e-4


def random_state(sizes, seed, gate_scale, whiten=False):
    """A random model with gates spread by gate_scale (0: all at 0; large: mostly on or off);
    `whiten`: with a head whitened on random inputs and labels (ModelState.with_whitened_head)."""
    rng = np.random.default_rng(seed)
    d = sizes[0]
    state = init_model(list(sizes), rng.standard_normal(d), rng.uniform(0.5, 2.0, d),
                       [f"c{i}" for i in range(sizes[-1])], [f"f{i}" for i in range(d)], seed=seed)
    for L in state.layers:
        L["g"][:] = rng.standard_normal(L["g"].shape) * gate_scale
        if "b" in L:
            L["b"][:] = rng.standard_normal(L["b"].shape) * 0.5
    if whiten:
        state = state.with_whitened_head(inputs(d, n=400, seed=seed + 100),
                                         rng.integers(0, sizes[-1], 400), 1e-3)
    return state


def inputs(d, n=200, seed=1):
    rng = np.random.default_rng(seed)
    return np.clip(rng.standard_normal((n, d)) * 2.0, -Z_CLIP, Z_CLIP).astype(np.float32)


def clear_rows(rs) -> np.ndarray:
    keep = np.ones(rs[0].shape[0], bool)
    for r in rs:
        keep &= np.abs(np.asarray(r)).min(axis=1) > SWITCH_EPS
    return keep


def torch_trace(state, z):
    with torch.no_grad():
        return SPLModel.from_state(state).trace(torch.from_numpy(z))


def run_onnx(onnx_bytes, z, protos):
    n = len(protos)
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    feed = dict(zip(input_names(n), [z] + [a for P, g in protos for a in (P, g)]))
    return dict(zip(output_names(n), sess.run(output_names(n), feed)))


# -- torch model vs numpy reference ------------------------------------------------------------

@pytest.mark.parametrize("sizes", [(8, 16, 16, 3), (5, 12, 7, 4), (6, 6, 2), (10, 10, 10, 10, 3)])
@pytest.mark.parametrize("gate_scale", [0.0, 0.3, 2.0])
@pytest.mark.parametrize("whiten", [False, True])
def test_torch_forward_matches_numpy_reference(sizes, gate_scale, whiten):
    state = random_state(sizes, seed=len(sizes) * 7 + int(gate_scale * 10), gate_scale=gate_scale,
                         whiten=whiten)
    assert ("T" in state.layers[-1]) == whiten
    z = inputs(sizes[0])
    logits, hs, rs = forward(state.layers, z)
    tr = torch_trace(state, z)
    keep = clear_rows(rs[:-1])
    assert keep.mean() > 0.8
    np.testing.assert_allclose(tr.logits.numpy()[keep], logits[keep], rtol=1e-5, atol=1e-5)
    for i in range(1, len(hs)):
        np.testing.assert_allclose(tr.hs[i].numpy()[keep], hs[i][keep], rtol=1e-5, atol=1e-5)
    for r_t, r_n in zip(tr.rs, rs[:-1]):
        np.testing.assert_allclose(r_t.numpy(), r_n, rtol=1e-5, atol=1e-5)
    # the case mix is real: some units on, some off, and pass-through used where shapes allow
    masks = np.concatenate([(r > 0).ravel() for r in rs[:-1]])
    if gate_scale > 0:
        assert 0.02 < masks.mean() < 0.98


def test_pass_through_keeps_input_of_switched_off_units():
    state = random_state((6, 6, 2), seed=3, gate_scale=0.0)
    state.layers[0]["g"][:] = 1e6          # every hidden unit off
    z = inputs(6, n=20)
    tr = torch_trace(state, z)
    np.testing.assert_array_equal(tr.hs[1].numpy(), np.concatenate([z, z], axis=1))   # [z, h] with h = z


# -- ONNX vs torch -----------------------------------------------------------------------------

@pytest.mark.parametrize("sizes", [(8, 16, 16, 3), (5, 12, 7, 4)])
@pytest.mark.parametrize("whiten", [False, True])
def test_onnx_matches_torch_and_prototypes_are_live_inputs(sizes, whiten):
    state = random_state(sizes, seed=11, gate_scale=0.3, whiten=whiten)
    exported = export_model(state)
    z = inputs(sizes[0], n=300)

    got = run_onnx(exported.onnx_bytes, z, exported.protos)
    tr = torch_trace(state, z)
    keep = clear_rows([r.numpy() for r in tr.rs])
    np.testing.assert_allclose(got["logits"][keep], tr.logits.numpy()[keep], rtol=1e-4, atol=1e-4)
    for i, r in enumerate(tr.rs):
        np.testing.assert_allclose(got[f"r{i}"], r.numpy(), rtol=1e-4, atol=1e-4)
    # the head's input output is what the head reads: whitened when the model whitens
    head_in = f"h{len(sizes) - 2}"
    np.testing.assert_allclose(got[head_in][keep], tr.hs[-1].numpy()[keep], rtol=1e-4, atol=1e-4)

    # new P, g fed as inputs change the output, and torch holding the same P, g agrees
    rng = np.random.default_rng(5)
    protos = [((P + 0.5 * rng.standard_normal(P.shape)).astype(np.float32),
               (g + 0.5 * rng.standard_normal(g.shape)).astype(np.float32)) for P, g in exported.protos]
    got2 = run_onnx(exported.onnx_bytes, z, protos)
    assert np.abs(got2["logits"] - got["logits"]).max() > 0.1
    for i in range(len(protos) - 1):
        assert ((got2[f"r{i}"] > 0) != (got[f"r{i}"] > 0)).mean() > 0.05   # masks moved too
    tr2 = torch_trace(state.with_prototypes(protos), z)
    keep2 = clear_rows([r.numpy() for r in tr2.rs])
    np.testing.assert_allclose(got2["logits"][keep2], tr2.logits.numpy()[keep2], rtol=1e-4, atol=1e-4)


def test_export_check_catches_a_wrong_graph():
    from edge_spl.cli.export import compare

    a, b = random_state((8, 16, 16, 3), 1, 0.3), random_state((8, 16, 16, 3), 2, 0.3)
    z = inputs(8)
    assert compare(a, export_model(a).onnx_bytes, a.prototypes(), z)["ok"]
    assert not compare(a, export_model(b).onnx_bytes, a.prototypes(), z)["ok"]


# -- conversions and gradient paths ------------------------------------------------------------

@pytest.mark.parametrize("whiten", [False, True])
def test_state_round_trip(whiten):
    state = random_state((8, 16, 16, 3), seed=4, gate_scale=0.3, whiten=whiten)
    state.version, state.info = 3, {"note": "x"}
    back = SPLModel.from_state(state).to_state(state)
    for L0, L1 in zip(state.layers, back.layers):
        assert L0.keys() == L1.keys()
        for k in L0:
            np.testing.assert_array_equal(L0[k], L1[k])
    assert (back.class_names, back.feature_names, back.model_id, back.version, back.info) == \
        (state.class_names, state.feature_names, state.model_id, 3, {"note": "x"})
    np.testing.assert_array_equal(back.std, state.std)
    fresh = SPLModel.from_state(state).to_state(mean=state.mean, std=state.std, model_id="m2",
                                                class_names=state.class_names,
                                                feature_names=state.feature_names)
    assert fresh.model_id == "m2" and fresh.sizes == state.sizes
    with pytest.raises(TypeError):
        SPLModel.from_state(state).to_state()


def test_cross_entropy_never_reaches_hidden_routing_and_meta_reaches_only_routing():
    from edge_spl.export.pretrain import meta_loss

    state = random_state((8, 16, 16, 3), seed=6, gate_scale=0.3)
    model = SPLModel.from_state(state)
    z = torch.from_numpy(inputs(8, n=64))
    y = torch.from_numpy(np.random.default_rng(0).integers(0, 3, 64))
    trace = model.trace(z, relax=True)
    ce = torch.nn.functional.cross_entropy(trace.logits, y)
    ce.backward()
    for L in model.hidden:
        assert L.P.grad is None and L.g.grad is None
        assert L.W.grad is not None and L.W.grad.abs().sum() > 0
    assert model.head.P.grad.abs().sum() > 0 and model.head.g.grad.abs().sum() > 0
    oracle = mask_oracle(trace)
    assert all(o.shape == m.shape and (o < 0).any() and (o > 0).any() for o, m in zip(oracle, trace.masks))

    model.zero_grad(set_to_none=True)
    meta_loss(trace, tau=1.0, rho=0.25, fraction_weight=10.0).backward()
    for L in model.hidden:
        assert L.W.grad is None and L.b.grad is None
        assert L.P.grad.abs().sum() > 0 and L.g.grad.abs().sum() > 0
    assert model.head.P.grad is None


def test_oracle_is_the_per_sample_loss_change_of_a_mask():
    # d(sum of per-sample CE)/d(mask[n, j]) must match a finite difference of sample n's loss
    state = random_state((6, 6, 3), seed=2, gate_scale=0.3)
    model = SPLModel.from_state(state).double()
    z = torch.from_numpy(inputs(6, n=5)).double()
    y = torch.tensor([0, 1, 2, 0, 1])
    trace = model.trace(z, relax=True)
    torch.nn.functional.cross_entropy(trace.logits, y, reduction="sum").backward()
    o = mask_oracle(trace)[0]
    L = model.hidden[0]
    with torch.no_grad():
        a = torch.nn.functional.silu(z @ L.W.T + L.b)
        def loss(mask):
            h = a * mask + z * (1 - mask)
            return torch.nn.functional.cross_entropy(model.head(torch.cat([z, h], 1)), y, reduction="none")
        m0 = trace.masks[0].detach()
        for n, j in [(0, 0), (1, 3), (4, 5)]:
            m1 = m0.clone()
            m1[n, j] += 1e-6
            fd = (loss(m1) - loss(m0)) / 1e-6
            assert fd[n].item() == pytest.approx(o[n, j].item(), rel=1e-4, abs=1e-8)
            assert torch.all(fd[torch.arange(5) != n].abs() < 1e-9)   # other samples untouched


# -- pretraining -------------------------------------------------------------------------------

def test_split_and_standardisation():
    y = np.array([0] * 50 + [1] * 10 + [2])
    tr, te = split_stratified(y, 0.2, seed=0)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == len(y)
    assert sorted(np.bincount(y[te], minlength=3)) == [0, 2, 10]       # the lone class stays in training
    assert np.array_equal(split_stratified(y, 0.2, seed=0)[1], te)
    assert len(split_stratified(y, 0.0, seed=0)[1]) == 0
    with pytest.raises(DataError):
        split_stratified(y, 1.0, seed=0)
    X = np.array([[1.0, 5.0], [3.0, 5.0]], np.float32)
    mean, std = standardisation(X)
    assert mean.tolist() == [2.0, 5.0] and std[0] == 1.0 and 0 < std[1] < 1e-4
    # a spread whose square is no float32 (the device's running variance) is named, not saved
    with pytest.raises(DataError, match="feature 'loud' spreads over 1e\\+30"):
        standardisation(np.array([[1.0, 1e30], [3.0, -1e30]], np.float32), ["quiet", "loud"])


def test_pretrain_errors():
    X = np.zeros((10, 3), np.float32)
    with pytest.raises(DataError, match="class"):
        pretrain(Dataset(X, ["a"] * 10, ["x", "y", "z"]), epochs=1)
    with pytest.raises(ModelError, match="hidden"):
        pretrain(Dataset(X, ["a", "b"] * 5, ["x", "y", "z"]), hidden=[0], epochs=1)


def test_pretrain_drops_unlabelled_rows_and_is_deterministic(capsys):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 4)).astype(np.float32)
    y = ["hi" if v > 0 else "lo" for v in X[:, 0]]
    y[::6] = [None] * len(y[::6])
    ds = Dataset(X, y, ["a", "b", "c", "d"], "mine.csv")
    s1, r1 = pretrain(ds, hidden=[16, 16], epochs=5, holdout=0.25, seed=3)
    s2, r2 = pretrain(ds, hidden=[16, 16], epochs=5, holdout=0.25, seed=3, progress=True)
    assert "train" in capsys.readouterr().err               # progress=True: a tqdm bar on stderr
    assert r1["n_train"] + r1["n_heldout"] == 100
    assert s1.model_id == "mine" and s1.class_names == ["hi", "lo"]
    for L1, L2 in zip(s1.layers, s2.layers):
        for k in L1:
            np.testing.assert_array_equal(L1[k], L2[k])
    with pytest.raises(ModelError, match="whiten"):
        pretrain(ds, hidden=[16, 16], epochs=1, whiten=0.0)


def test_a_model_too_big_for_one_mqtt_payload_is_refused_before_training():
    from edge_spl.export.pretrain import check_fits_the_wire

    check_fits_the_wire([128, 256, 256, 6])
    with pytest.raises(ModelError, match="smaller --hidden"):
        check_fits_the_wire([128, 3000, 3000, 6])            # W alone: 36 MB
    # [z, h] of 128 + 1,500: T is 10.6 MB beside 9.8 MB of W, b: over the limit only together
    with pytest.raises(ModelError, match="--no-whiten"):
        check_fits_the_wire([128, 1500, 1500, 6])
    check_fits_the_wire([128, 1500, 1500, 6], whiten=False)
    with pytest.raises(ModelError, match=r"over the 15\.1 MB that fit in one MQTT payload"):
        check_fits_the_wire([128, 3000, 3000, 6])   # the limit enforced: 90 % of the 16.8 MB payload


def test_pretrain_whitens_the_head_without_changing_the_model():
    """Whitening re-expresses the trained head: the same logits as without it (same seed, same
    training), a head input of (nearly) unit within-class covariance, and the hidden layers as
    they were."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((300, 5)).astype(np.float32) @ rng.standard_normal((5, 5)).astype(np.float32)
    y = ["a" if v > 0 else ("b" if v > -1 else "c") for v in X[:, 0] + 0.3 * X[:, 1]]
    ds = Dataset(X, y, list("vwxyz"), "mixed.csv")
    plain, _ = pretrain(ds, hidden=[16, 16], epochs=4, holdout=0.0, seed=2, whiten=None)
    white, report = pretrain(ds, hidden=[16, 16], epochs=4, holdout=0.0, seed=2)
    assert "T" not in plain.layers[-1] and "T" in white.layers[-1] and report["whiten"] > 0
    for L1, L2 in zip(plain.layers[:-1], white.layers[:-1]):
        for k in L1:
            np.testing.assert_array_equal(L1[k], L2[k])
    np.testing.assert_allclose(white.predict_logits(X), plain.predict_logits(X), rtol=1e-4, atol=1e-4)
    z = standardize(X, white.mean, white.std)
    U = forward(white.layers, z)[1][-1].astype(np.float64)
    labels = np.array([{"a": 0, "b": 1, "c": 2}[v] for v in y])
    D = U - np.array([U[labels == c].mean(0) for c in range(3)])[labels]
    w = np.linalg.eigvalsh(D.T @ D / len(U))
    # A^-1/2 S A^-1/2: 1 where S dominates the shrinkage, below it only in near-null directions
    assert w.max() < 1.01 and np.median(w) > 0.9, w


def test_pretrain_does_not_whiten_on_too_few_rows():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((40, 4)).astype(np.float32)
    ds = Dataset(X, ["a" if v > 0 else "b" for v in X[:, 0]], list("wxyz"), "few.csv")
    state, report = pretrain(ds, hidden=[40, 40], epochs=2, holdout=0.0, seed=0)   # 44 head inputs
    assert "T" not in state.layers[-1] and report["whiten"] is None
    assert "40 labelled rows for 44 head inputs" in report["whiten_note"]
    # 34 head inputs: 40 rows - 2 classes will do, held-out rows included (logits do not change)
    state, report = pretrain(ds, hidden=[30, 30], epochs=2, holdout=0.5, seed=0)
    assert "T" in state.layers[-1] and report["whiten_note"] is None and report["n_train"] == 20


def test_a_whitening_that_will_be_skipped_does_not_count_against_the_payload():
    """2,000 features and 60 rows: T (2,008^2 floats, 16 MB) would not fit, but the rows are too
    few to whiten anyway, so the model trains (as it would with --no-whiten)."""
    rng = np.random.default_rng(4)
    X = rng.standard_normal((60, 2000)).astype(np.float32)
    ds = Dataset(X, ["a" if v > 0 else "b" for v in X[:, 0]], [f"f{i}" for i in range(2000)], "wide.csv")
    state, report = pretrain(ds, hidden=[8], epochs=1, holdout=0.0, seed=0)
    assert "T" not in state.layers[-1] and "60 labelled rows for 2008 head inputs" in report["whiten_note"]


def test_classes_of_identical_rows_train_unwhitened_and_export(tmp_path):
    """Rows that do not vary within their classes leave nothing to whiten by (T would be ~1e10
    and the exported graph disagree with torch once P moves): trained without T, saying why."""
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((3, 4)).astype(np.float32) * 3.0
    y = np.repeat(np.arange(3), 40)
    ds = Dataset(centres[y], [f"c{k}" for k in y], list("wxyz"), "same.csv")
    state, report = pretrain(ds, hidden=[8], epochs=3, holdout=0.0, seed=0)
    assert "T" not in state.layers[-1] and report["whiten"] is None
    assert "hardly vary within classes" in report["whiten_note"]
    exported = export_model(state)
    moved = [(P + 0.1 * rng.standard_normal(P.shape).astype(np.float32), g) for P, g in state.prototypes()]
    z = inputs(4, n=20)
    want = forward(state.with_prototypes(moved).layers, z)[0]
    np.testing.assert_allclose(run_onnx(exported.onnx_bytes, z, moved)["logits"], want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_pretrain_gas_batch1(gas_dir):
    ds = load_training_data(gas_dir)
    epochs_seen = []
    state, report = pretrain(ds, epochs=15, seed=0, progress=lambda e, s: epochs_seen.append(e))
    assert epochs_seen == list(range(1, 16))
    assert report["heldout_acc"] > 0.8, report            # chance is about 0.2
    assert state.model_id == "gas-drift" and state.sizes == [128, 256, 256, 6]
    assert all(0.02 < a < 0.6 for a in report["active"]), report["active"]
    init = init_model(state.sizes, state.mean, state.std, state.class_names, state.feature_names, seed=0)
    for L, L0 in zip(state.layers[:-1], init.layers[:-1]):
        assert np.abs(L["P"] - L0["P"]).max() > 0.01      # the meta loss moved prototypes
        assert np.abs(L["g"] - L0["g"]).max() > 0.01      # and gates
    # the trained state is the numpy reference's model: its accuracy matches the report
    assert state.info["heldout_acc"] == report["heldout_acc"]


@pytest.mark.slow
def test_pretrain_occupancy(occupancy_dir):
    state, report = pretrain(load_training_data(occupancy_dir), epochs=4, seed=0)
    assert state.model_id == "occupancy" and state.sizes == [5, 256, 256, 2]
    assert report["heldout_acc"] > 0.9, report            # the majority class is about 0.79


# -- the commands ------------------------------------------------------------------------------

def edge_spl(*args, cwd):
    return subprocess.run([sys.executable, "-m", "edge_spl", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_cli_train_then_export(gas_dir, tmp_path):
    out = str(tmp_path / "gas")
    r = edge_spl("train", "--data", gas_dir, "--out", out, "--epochs", "10", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "held-out accuracy" in r.stdout and "saved" in r.stdout
    assert r.stderr.strip() == ""                          # --quiet: no progress bar
    state = ModelState.load(out)
    assert state.sizes == [128, 256, 256, 6]

    r = edge_spl("export", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "max |logit diff|" in r.stdout and len(r.stdout.strip().splitlines()) == 1
    model = ExportedModel.load(out)
    assert model.manifest.model_id == "gas-drift" and model.manifest.sizes == state.sizes
    for (P, g), L in zip(model.protos, state.layers):
        np.testing.assert_array_equal(P, L["P"])
        np.testing.assert_array_equal(g, L["g"])
    np.testing.assert_array_equal(np.float32(model.manifest.std), state.std)

    # retraining into the folder removes the old export, which would be served as the new model
    r = edge_spl("train", "--data", gas_dir, "--out", out, "--epochs", "2", "--quiet", "--seed", "1", cwd=tmp_path)
    assert r.returncode == 0 and "removed the export" in r.stdout, r.stderr
    assert not any((tmp_path / "gas" / f).exists() for f in ("manifest.json", "model.onnx", "prototypes.npz"))
    r = edge_spl("export", out, cwd=tmp_path)
    assert r.returncode == 0 and ExportedModel.load(out).manifest.onnx_sha256 != model.manifest.onnx_sha256


@pytest.mark.parametrize("args, words", [
    (["--data", "/nonexistent"], "no such file"),
    (["--data", "GAS", "--hidden", "abc"], "--hidden"),
    (["--data", "GAS", "--holdout", "1.5"], "--holdout"),
])
def test_cli_train_bad_input_is_one_line(args, words, gas_dir, tmp_path):
    args = [gas_dir if a == "GAS" else a for a in args]
    r = edge_spl("train", *args, "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("edge-spl train: error:")
    assert not os.path.exists(tmp_path / "x")


def test_cli_train_whitens_unless_told_or_the_rows_are_too_few(tmp_path):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((60, 4))
    csv = tmp_path / "few.csv"
    csv.write_text("a,b,c,d,label\n" + "".join(",".join(f"{v:.4f}" for v in r) + ("," + ("hi" if r[0] > 0 else "lo")) + "\n"
                                              for r in X))
    for hidden, extra, whitened in (("16,16", [], True), ("16,16", ["--no-whiten"], False), ("64,64", [], False)):
        out = tmp_path / f"m{hidden}{extra}"
        r = edge_spl("train", "--data", str(csv), "--label", "label", "--hidden", hidden, "--epochs", "2",
                     "--quiet", "--out", str(out), *extra, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert ("T" in ModelState.load(out).layers[-1]) == whitened
        # asked for but not possible: said on stdout (60 rows, 68 head inputs)
        assert ("head not whitened: 60 labelled rows for 68 head inputs" in r.stdout) == (hidden == "64,64")


def test_cli_export_missing_model_is_one_line(tmp_path):
    r = edge_spl("export", str(tmp_path / "nothing"), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_an_export_that_fails_its_check_is_removed(tmp_path):
    """A forged head (T scaled by 1e6: symmetric positive definite, finite, but float32 cannot
    keep onnxruntime and torch together on it) fails the check, and no export is left behind to
    be served: neither the new one nor the one that was there."""
    rng = np.random.default_rng(0)
    good = make_model().with_whitened_head(rng.standard_normal((200, 8)).astype(np.float32),
                                           rng.integers(0, 3, 200))
    good.save(tmp_path / "m")
    assert edge_spl("export", str(tmp_path / "m"), cwd=tmp_path).returncode == 0
    bad = good.with_prototypes(good.prototypes())
    bad.layers[-1]["T"] = bad.layers[-1]["T"] * np.float32(1e6)
    bad.save(tmp_path / "m")
    r = edge_spl("export", str(tmp_path / "m"), cwd=tmp_path)
    assert r.returncode == 2 and "disagree" in r.stderr and "the export was removed" in r.stderr
    assert sorted(os.listdir(tmp_path / "m")) == ["model.json", "model.npz"]


def test_cli_train_names_its_features_and_doubts_a_measurement_as_label(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((120, 3))
    csv = tmp_path / "t.csv"
    csv.write_text("when,temp,hum,co2,occ\n" + "".join(
        f"2015-02-{1 + i % 28:02d},{r[0]:.3f},{r[1]:.3f},{r[2]:.3f},{int(r[0] > 0)}\n" for i, r in enumerate(X)))
    r = edge_spl("train", "--data", str(csv), "--label", "occ", "--hidden", "8", "--epochs", "1", "--quiet",
                 "--out", str(tmp_path / "m"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "120 labelled rows, features 3 columns: 'temp', 'hum', 'co2'; 2 classes '0', '1'" in r.stdout
    assert "warning" not in r.stdout
    r = edge_spl("train", "--data", str(csv), "--label", "temp", "--hidden", "8", "--epochs", "1", "--quiet",
                 "--out", str(tmp_path / "m2"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert re.search(r"warning: 1[12]\d classes with 1\.0 rows each on average: is the label column a "
                     r"measurement\?", r.stdout), r.stdout


def test_a_numeric_column_with_a_bad_cell_is_an_error_not_a_dropped_feature(tmp_path):
    csv = tmp_path / "t.csv"
    rows = [f"{i},{20 + i % 3},{30 + i % 5},{i % 2}" for i in range(1, 40)]
    rows[9] = "10,21,,1"          # an empty humidity cell, on line 12 (a blank line before it)
    csv.write_text("n,temp,hum,occ\n\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"t\.csv:12: column 'hum' is '': empty"):
        load_training_data(str(csv), "occ")
    rows[9] = "10,21,NA,1"
    csv.write_text("n,temp,hum,occ\n\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"t\.csv:12: column 'hum' is 'NA': not a number"):
        load_training_data(str(csv), "occ")
    # a text column is still no feature, nor is the row counter n
    csv.write_text("n,day,temp,occ\n" + "".join(f"{i},Mon,{i % 7},{i % 2}\n" for i in range(1, 20)))
    assert load_training_data(str(csv), "occ").feature_names == ["temp"]
    # a file without its header row says it may lack one
    csv.write_text("".join(f"{i % 7},{i % 3},{i % 2}\n" for i in range(1, 20)))
    with pytest.raises(DataError, match="does the file lack its header row"):
        load_training_data(str(csv), "occ")
