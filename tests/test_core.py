"""The core: SPL reference math, model files, data loaders, manifest, wire protocol, packaging."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_model
from edge_spl import protocol as P
from edge_spl.data import (GAS_CLASSES, GAS_FEATURES, OCCUPANCY_FEATURES, iter_samples, load_csv,
                           load_gas_file, load_training_data)
from edge_spl.errors import DataError, ModelError, ProtocolError
from edge_spl.manifest import ExportedModel, Manifest
from edge_spl.model import ModelState
from edge_spl.spl import forward, head_whitening, spl_forward, standardize


# -- SPL math --------------------------------------------------------------------------------

def test_spl_mask_is_hard_and_passes_through_when_square():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    W, P = rng.standard_normal((2, 6, 6)).astype(np.float32)
    b = np.zeros(6, np.float32)
    g_off = np.full(6, 1e6, np.float32)       # every unit off: pure pass-through
    out, r = spl_forward(x, W, b, P, g_off)
    assert np.all(r < 0) and np.array_equal(out, x)
    g_on = np.full(6, -1e6, np.float32)       # every unit on: pure silu(xW^T+b)
    out, _ = spl_forward(x, W, b, P, g_on)
    z = x @ W.T + b
    np.testing.assert_allclose(out, z / (1 + np.exp(-z)), rtol=1e-6)


def test_forward_returns_layer_inputs_and_routings():
    state = make_model()
    z = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    logits, hs, rs = forward(state.layers, z)
    # the head sees [z, h]: 8 + 16 inputs
    assert logits.shape == (4, 3) and [h.shape[1] for h in hs] == [8, 16, 24]
    np.testing.assert_array_equal(hs[-1][:, :8], z)
    head = state.layers[-1]
    np.testing.assert_allclose(logits, hs[-1] @ head["P"].T / np.sqrt(24) - head["g"], rtol=1e-5, atol=1e-6)
    assert rs[-1] is logits


def test_head_whitening_is_the_shrunk_within_class_inverse_square_root():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 500)
    U = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6)) * [1, 2, 3, 4, 50, 1e-3] + 5.0 * y[:, None]
    T, T_inv = head_whitening(U, y, shrink=1e-3)
    np.testing.assert_allclose(T, T.T, atol=1e-9)
    np.testing.assert_allclose(T @ T_inv, np.eye(6), atol=1e-8)
    D = U - np.array([U[y == c].mean(0) for c in range(3)])[y]
    S = D.T @ D / len(U)
    A = (1 - 1e-3) * S + 1e-3 * np.trace(S) / 6 * np.eye(6)
    np.testing.assert_allclose(T_inv @ T_inv, A, rtol=1e-8, atol=1e-10)
    # the class means move it not at all: only the spread within classes counts
    T2, _ = head_whitening(U + 100.0 * (y == 1)[:, None], y, shrink=1e-3)
    np.testing.assert_allclose(T2, T, rtol=1e-9)
    # classes of identical rows: nothing to whiten by, whether S is 0 or what rounding leaves of
    # it (T would be ~1e10); a small but real spread still whitens
    assert head_whitening(np.tile(np.arange(6.0), (4, 1)), np.array([0, 0, 1, 1])) is None
    means = rng.standard_normal((3, 6)) * 3.0
    noise = rng.standard_normal((500, 6))
    assert head_whitening(means[y] + 1e-9 * noise, y) is None
    small = head_whitening(means[y] + 1e-2 * noise, y)
    assert small is not None and np.all(np.isfinite(small[0]))
    with pytest.raises(ValueError):
        head_whitening(U, y, shrink=0.0)
    with pytest.raises(ValueError):
        head_whitening(U, y[:10])


def test_a_whitened_head_keeps_the_model_and_its_files():
    state = make_model()
    rng = np.random.default_rng(4)
    z = rng.standard_normal((200, 8)).astype(np.float32)
    white = state.with_whitened_head(z, rng.integers(0, 3, 200))
    head = white.layers[-1]
    assert head["T"].shape == (24, 24) and head["T"].dtype == np.float32
    x = rng.standard_normal((30, 8)) * 2
    np.testing.assert_allclose(white.predict_logits(x), state.predict_logits(x), rtol=1e-4, atol=1e-4)
    _, hs, _ = forward(white.layers, z)
    _, hs0, _ = forward(state.layers, z)
    np.testing.assert_allclose(hs[-1], hs0[-1] @ head["T"], rtol=1e-5, atol=1e-5)
    assert white.prototypes()[-1][0].shape == (3, 24)   # P, g only: T is part of the graph
    # new prototypes keep the whitening
    assert "T" in white.with_prototypes(white.prototypes()).layers[-1]


def test_whitening_rows_that_do_not_vary_within_classes_is_refused():
    state = make_model()
    z = np.repeat(np.random.default_rng(7).standard_normal((3, 8)), 20, axis=0).astype(np.float32)
    with pytest.raises(ModelError, match="hardly vary within classes"):
        state.with_whitened_head(z, np.repeat(np.arange(3), 20))


def test_model_files_keep_the_whitening_and_format_2_still_loads(tmp_path):
    import json

    state = make_model()
    white = state.with_whitened_head(np.random.default_rng(5).standard_normal((100, 8)).astype(np.float32),
                                     np.arange(100) % 3)
    white.save(tmp_path / "w")
    back = ModelState.load(tmp_path / "w")
    np.testing.assert_array_equal(back.layers[-1]["T"], white.layers[-1]["T"])
    assert json.loads((tmp_path / "w" / "model.json").read_text())["format"] == 3
    # a format 2 model (no T, written by an earlier edge-spl) reads as it always did
    state.save(tmp_path / "old")
    meta_path = tmp_path / "old" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["format"] = 2
    meta_path.write_text(json.dumps(meta))
    old = ModelState.load(tmp_path / "old")
    assert "T" not in old.layers[-1]
    x = np.random.default_rng(6).standard_normal((5, 8))
    np.testing.assert_array_equal(old.predict_logits(x), state.predict_logits(x))
    meta["format"] = 4
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="format 4"):
        ModelState.load(tmp_path / "old")


def test_model_files_with_arrays_their_format_does_not_have_are_refused(tmp_path):
    import json

    from edge_spl.files import pack_arrays, sha256_file

    white = make_model().with_whitened_head(np.random.default_rng(5).standard_normal((100, 8)).astype(np.float32),
                                            np.arange(100) % 3)

    def forged(name, format, **more):
        white.save(tmp_path / name)
        (tmp_path / name / "model.npz").write_bytes(pack_arrays({**white.arrays(), **more}))
        meta_path = tmp_path / name / "model.json"
        meta = json.loads(meta_path.read_text())
        meta.update(format=format, sha256=sha256_file(tmp_path / name / "model.npz"))
        meta_path.write_text(json.dumps(meta))
        return tmp_path / name

    assert "T" in ModelState.load(forged("ok", 3)).layers[-1]
    with pytest.raises(ModelError, match=r"holds arrays \['T2'\] that a format 2"):
        ModelState.load(forged("old", 2))   # format 2 never had a whitening
    with pytest.raises(ModelError, match=r"holds arrays \['T0'\]"):
        ModelState.load(forged("stray", 3, T0=np.eye(8, dtype=np.float32)))


def test_whitening_shapes_are_checked():
    state = make_model()
    layers = [dict(L) for L in state.layers]
    layers[-1]["T"] = np.eye(23, dtype=np.float32)
    with pytest.raises(ModelError, match="layer 2 T"):
        ModelState(layers, state.mean, state.std, state.class_names, state.feature_names)
    layers[-1]["T"] = np.full((24, 24), np.nan, np.float32)
    with pytest.raises(ModelError, match="non-finite"):
        ModelState(layers, state.mean, state.std, state.class_names, state.feature_names)
    # a T that is no whitening: zero, singular, negative definite, not symmetric
    rng = np.random.default_rng(8)
    M = rng.standard_normal((24, 24))
    for T in (np.zeros((24, 24)), np.diag([1.0] * 23 + [0.0]), -np.eye(24), np.eye(24) + np.triu(M, 1)):
        layers[-1]["T"] = T.astype(np.float32)
        with pytest.raises(ModelError, match="layer 2 T is not a whitening"):
            ModelState(layers, state.mean, state.std, state.class_names, state.feature_names)
    flat = make_model((8, 3))
    with pytest.raises(ModelError, match="cannot whiten"):
        flat.with_whitened_head(np.zeros((6, 8), np.float32), np.arange(6) % 3)
    layers = [dict(flat.layers[0], T=np.eye(8, dtype=np.float32))]
    with pytest.raises(ModelError, match="expected"):
        ModelState(layers, flat.mean, flat.std, flat.class_names, flat.feature_names)


def test_standardize_clips_extreme_outliers():
    z = standardize(np.array([[30000.0, 4.5]]), np.array([4.5, 4.5]), np.array([1.0, 1.0]))
    assert z.dtype == np.float32 and z[0, 0] == 10.0 and z[0, 1] == 0.0


# -- model files -----------------------------------------------------------------------------

def test_model_round_trip_and_corruption(tmp_path):
    state = make_model()
    state.save(tmp_path)
    back = ModelState.load(tmp_path)
    x = np.random.default_rng(2).standard_normal((3, 8))
    np.testing.assert_array_equal(state.predict_logits(x), back.predict_logits(x))
    assert back.class_names == state.class_names and back.sizes == [8, 16, 16, 3]
    data = (tmp_path / "model.npz").read_bytes()
    (tmp_path / "model.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="sha256"):
        ModelState.load(tmp_path)
    with pytest.raises(ModelError, match="not found"):
        ModelState.load(tmp_path / "nowhere")


def test_model_rejects_inconsistent_shapes():
    state = make_model()
    layers = [dict(L) for L in state.layers]
    layers[1]["P"] = layers[1]["P"][:, :5]
    with pytest.raises(ModelError, match="layer 1"):
        ModelState(layers, state.mean, state.std, state.class_names, state.feature_names)


def test_exported_model_checks_its_files(tiny_model_dir):
    em = ExportedModel.load(tiny_model_dir)
    assert em.manifest.sizes == [8, 16, 16, 3] and len(em.protos) == 3
    with open(os.path.join(tiny_model_dir, "model.onnx"), "ab") as f:
        f.write(b"x")
    with pytest.raises(ModelError, match="sha256"):
        ExportedModel.load(tiny_model_dir)


def test_manifest_rejects_bad_json():
    with pytest.raises(ModelError):
        Manifest.from_json(b"[1, 2]")
    with pytest.raises(ModelError):
        Manifest.from_json(b'{"model_id": "x"}')


# -- data ------------------------------------------------------------------------------------

def test_gas_batches_match_source_counts(gas_dir):
    counts = {1: 445, 2: 1244, 3: 1586, 4: 161, 5: 197, 6: 2300}
    for b, n in counts.items():
        ds = load_gas_file(os.path.join(gas_dir, f"batch{b}.dat"))
        assert ds.X.shape == (n, 128) and len(ds.y) == n
    assert set(ds.y) == set(GAS_CLASSES) and ds.classes() == GAS_CLASSES


def test_training_data_from_folders(gas_dir, occupancy_dir):
    assert len(load_training_data(gas_dir)) == 445
    occ = load_training_data(occupancy_dir)
    assert occ.X.shape == (8143, 5) and occ.feature_names == OCCUPANCY_FEATURES
    assert occ.classes() == ["0", "1"]


def test_csv_errors_are_clear(tmp_path):
    f = tmp_path / "log.csv"
    f.write_text("a,b,label\n1,2,x\n3,oops,y\n")
    with pytest.raises(DataError, match=r"log.csv:3: column 'b'"):
        load_csv(str(f), "label", ["a", "b"])
    with pytest.raises(DataError, match="no label column 'lab'"):
        load_csv(str(f), "lab")
    with pytest.raises(DataError, match="needs --label"):
        load_training_data(str(f))
    with pytest.raises(DataError, match="no such file"):
        load_training_data(str(tmp_path / "missing.csv"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty file"):
        load_csv(str(tmp_path / "empty.csv"), "label")


def test_csv_default_features_are_the_numeric_columns(tmp_path):
    f = tmp_path / "log.csv"
    f.write_text("when,a,b,label\nmon,1,2,x\ntue,3,4,\n")
    ds = load_csv(str(f), "label")
    assert ds.feature_names == ["a", "b"] and ds.y == ["x", None]


def test_gas_line_errors(tmp_path):
    f = tmp_path / "bad.dat"
    f.write_text("7 1:0.5\n")
    with pytest.raises(DataError, match="bad.dat:1: class 7"):
        load_gas_file(str(f))


def test_iter_samples_skips_bad_rows_and_keeps_going(tmp_path):
    f = tmp_path / "stream.csv"
    f.write_text("b,a,label\n1,2,x\n1,nan,y\nfoo,1,y\n1,2\n\n5,6,\n")
    bad = []
    got = list(iter_samples(str(f), ["a", "b"], "label", on_bad=lambda w, why: bad.append(why)))
    assert [s.index for s in got] == [0, 1]
    np.testing.assert_array_equal(got[0].x, [2, 1])   # reordered to the model's feature order
    assert got[0].label == "x" and got[1].label is None
    assert len(bad) == 3


def test_iter_samples_rejects_a_header_without_the_model_features(tmp_path):
    f = tmp_path / "stream.csv"
    f.write_text("x,y\n1,2\n")
    with pytest.raises(DataError, match="lacks 2 of the model.s 2 feature columns"):
        list(iter_samples(str(f), ["a", "b"]))


def test_iter_samples_reads_gas_dat(gas_dir):
    got = list(iter_samples(os.path.join(gas_dir, "batch4.dat"), GAS_FEATURES))
    assert len(got) == 161 and got[0].x.shape == (128,) and got[0].label in GAS_CLASSES


# -- protocol --------------------------------------------------------------------------------

def _delta(seed=0, device="dev-1", seq=1):
    rng = np.random.default_rng(seed)
    return P.PrototypeDelta(device, seq, 0, [
        P.LayerDelta(np.array([0, 3], np.int32), rng.standard_normal((2, 8)).astype(np.float32),
                     rng.standard_normal(2).astype(np.float32), np.array([1, 4], np.float32)),
        P.LayerDelta(np.zeros(0, np.int32), np.zeros((0, 16), np.float32), np.zeros(0, np.float32),
                     np.zeros(0, np.float32)),
    ])


def test_delta_round_trip():
    d = _delta()
    back = P.decode_delta(P.encode_delta(d))
    assert (back.device, back.seq, back.base_version) == (d.device, d.seq, d.base_version)
    for a, b in zip(d.layers, back.layers):
        for k in ("rows", "dP", "dg", "counts"):
            np.testing.assert_array_equal(getattr(a, k), getattr(b, k))


def test_release_round_trip():
    state = make_model()
    r = P.Release(5, "ab" * 32, state.prototypes(), {"dev-1": 3}, 12.5)
    back = P.decode_release(P.encode_release(r))
    assert back.version == 5 and back.merged == {"dev-1": 3} and back.model_sha256 == r.model_sha256
    for (p1, g1), (p2, g2) in zip(r.protos, back.protos):
        np.testing.assert_array_equal(p1, p2)
        np.testing.assert_array_equal(g1, g2)


def test_payload_limits_and_kinds():
    data = P.encode_delta(_delta())
    with pytest.raises(ProtocolError, match="over the"):
        P.encode_delta(_delta(), max_bytes=100)
    with pytest.raises(ProtocolError, match="over the"):
        P.decode_delta(data, max_bytes=100)
    with pytest.raises(ProtocolError, match="kind"):
        P.decode_release(data)


def test_delta_with_nan_or_unsorted_rows_is_rejected():
    d = _delta()
    d.layers[0].dP[0, 0] = np.nan
    with pytest.raises(ProtocolError, match="non-finite"):
        P.decode_delta(P.encode_delta(d))
    d = _delta()
    d.layers[0].rows = np.array([3, 0], np.int32)
    with pytest.raises(ProtocolError, match="increasing"):
        P.decode_delta(P.encode_delta(d))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_corrupted_payloads_raise_protocol_error_only(data):
    payload = bytearray(P.encode_delta(_delta()))
    i = data.draw(st.integers(0, len(payload) - 1))
    payload[i] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(payload)))
    try:
        P.decode_delta(bytes(payload[:cut]))
    except ProtocolError:
        pass   # every corruption is caught as a protocol error (or, rarely, still valid)


def test_topic_names_refuse_wildcards_and_separators():
    t = P.Topics("fleet-1")
    assert t.delta("dev.1") == "edge-spl/fleet-1/delta/dev.1"
    assert t.device_of("edge-spl/fleet-1/delta/dev.1", "delta") == "dev.1"
    assert t.device_of("edge-spl/other/delta/dev.1", "delta") is None
    for bad in ("a/b", "+", "#", "", "x" * 65):
        with pytest.raises(ProtocolError):
            t.delta(bad)
    with pytest.raises(ProtocolError):
        P.Topics("a/b")


# -- packaging -------------------------------------------------------------------------------

def test_device_and_server_import_without_torch():
    """The device and server roles (and their CLI entry points) must run where torch is absent."""
    code = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'onnx'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "import edge_spl.cli.device, edge_spl.cli.server, edge_spl.device, edge_spl.server\n"
        "from edge_spl.cli import main\n"
        "assert main(['device', '--help']) == 0\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    # argparse's --help exits via SystemExit(0)
    assert r.returncode == 0, r.stderr
    assert "--broker" in r.stdout
    assert "torch" not in r.stderr


def test_no_generic_top_level_modules_are_installed():
    import edge_spl.device
    import edge_spl.server

    assert edge_spl.device.__name__ == "edge_spl.device"
    for generic in ("device", "server", "export"):
        try:
            __import__(generic)
        except ImportError:
            continue
        pytest.fail(f"a top-level module {generic!r} is importable")


def test_csv_default_features_skip_a_row_counter(occupancy_dir):
    ds = load_csv(os.path.join(occupancy_dir, "datatest.txt"), "Occupancy")
    assert ds.feature_names == OCCUPANCY_FEATURES


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    from edge_spl.files import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "f.bin", b"abc")
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").read_bytes() == b"abc"
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644


def test_csv_stream_skips_blank_lines_before_its_header_and_errors_name_columns_briefly(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("\n  \na,b,y\n1,2,c0\n\n3,4,\n")
    got = list(iter_samples(str(p), ["a", "b"], "y"))
    assert [(s.x.tolist(), s.label) for s in got] == [([1.0, 2.0], "c0"), ([3.0, 4.0], None)]
    names = [f"f{i}" for i in range(128)] + ["gas"]
    p.write_text(",".join(names) + "\n")
    for kwargs in ({"feature_names": ["x"]}, {"feature_names": ["f0"], "label": "label"}):
        with pytest.raises(DataError) as e:
            list(iter_samples(str(p), **kwargs))
        msg = str(e.value)
        # the count, the first names and the last ones (where a label column usually is), not all 129
        assert "129 columns" in msg and "'f0'" in msg and "'gas'" in msg and "..." in msg and len(msg) < 300
