"""`edge-spl bench speed`: the smoke run (tiny sizes) end to end on the real broker, and the
correctness its comparisons rest on (the alternatives compute the same thing). Timings are never
asserted: only that every figure is there."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edge_spl.cli import main
from edge_spl.cli.bench import speed_infer as SI
from edge_spl.cli.bench import speed_learn as SL
from edge_spl.cli.bench import speed_sync as SY
from edge_spl.device.session import OnnxModel

f32 = np.float32


def test_quick_run_writes_every_figure(tmp_path, mqtt_broker, capsys):
    host, port = mqtt_broker
    assert main(["bench", "speed", "--quick", "--out", str(tmp_path), "--broker", f"{host}:{port}"]) == 0
    res = json.loads((tmp_path / "bench_speed.json").read_text())
    for m in ("demo", "large"):
        for b in ("1", "32"):
            for key in ("learn_step_per_s", "learn_step_hidden_per_s"):
                assert set(res[key][m][b]) == {"edge-spl", "numpy", "torch"}
                assert all(v > 0 for v in res[key][m][b].values())
            assert res["roofline_fraction"][m][b]["edge-spl"] > 0
            for variant in ("head", "hidden"):
                # numpy and torch do the same math as the product's kernels
                assert max(res["learn_step"][m][variant][b]["max_abs_diff_vs_edge_spl"].values()) < 1e-3
        assert {"edge-spl", "ort_baked", "torch"} <= set(res["inference_p50_us"][m])
        assert max(res["inference"][m]["max_abs_logit_diff_vs_edge_spl"].values()) < 1e-3
    for key in ("warm_start_s", "cold_start_s", "device_peak_rss_mb"):
        assert res[key] > 0
    assert 0 < res["delta_bytes_ratio"]
    for env in ("dev_env", "device_install"):
        assert res["startup"][env]["imports"]["torch_imported"] is False
    assert res["startup"]["device_install"]["imports"]["scipy_imported"] is False
    aot = res["startup"]["device_aot"]
    if "skipped" not in aot:   # built here (a C compiler is there): the device ran without numba
        assert aot["kernels"] == "aot" and aot["imports"]["numba_imported"] is False
        assert res["device_peak_rss_from"] == "device_aot" and res["aot_start_s"] > 0
    assert res["server"]["complete"] and res["server"]["deltas_merged"] == res["server"]["deltas_sent"]
    assert all("met" in t for t in res["targets"].values())
    out = capsys.readouterr().out
    assert "Learn step" in out and "Inference" in out and "Targets" in out


@pytest.fixture(scope="module")
def tiny():
    return SL.make_model([12, 20, 16, 4])


@pytest.mark.parametrize("hidden", [False, True])
@pytest.mark.parametrize("batch", [1, 5])
def test_numpy_and_torch_learn_steps_match_the_kernels(tiny, hidden, batch):
    _, exported = tiny
    pool = SL.sample_pool(SL.learner_for(exported, hidden), batch, hidden)
    impls = [SL.EdgeSplLearn(exported, hidden, batch), SL.NumpyLearn(exported, hidden, batch),
             SL.TorchLearn(exported, hidden, batch)]
    pools = [pool, pool, impls[2].convert(pool)]
    start = [P.copy() for P, _ in exported.protos]
    for j in range(10):
        for impl, p in zip(impls, pools):
            impl.step(p[j])
    for other in impls[1:]:
        assert SL.max_diff(impls[0].protos, other.protos) < 1e-4
    moved = [not np.array_equal(P, P0) for (P, _), P0 in zip(impls[0].protos, start)]
    assert moved == ([True] * len(moved) if hidden else [False] * (len(moved) - 1) + [True])


def test_work_counts_grow_with_what_the_step_touches():
    small, wide = SL.work([8, 16, 16, 4], False, 1), SL.work([8, 16, 64, 4], False, 1)
    # the head sees [z, h]: 8 + 16 = 24 inputs against 8 + 64 = 72, three times as many; the
    # per-class terms (sigmoids, of the step and of each replayed step) do not grow with d
    per_class = 4 * 10 * (1 + SL.HP["replay"])
    assert wide["flops"] == 3 * small["flops"] - 2 * per_class and wide["bytes"] > 2.5 * small["bytes"]
    assert SL.work([8, 16, 16, 4], True, 1)["flops"] > small["flops"]


def test_baked_graph_computes_what_the_live_one_does(tiny):
    state, exported = tiny
    protos = [(P + 0.1, g - 0.05) for P, g in exported.protos]
    protos = [(np.ascontiguousarray(P, f32), np.ascontiguousarray(g, f32)) for P, g in protos]
    z = np.random.default_rng(0).standard_normal((3, 12)).astype(f32)
    live = OnnxModel(exported).run(z, protos)
    baked = SI.BakedModel(exported.onnx_bytes, protos, exported.manifest.sizes, 3).run(z)
    plain = SI.PlainRunModel(exported.onnx_bytes, exported.manifest.n_layers).run(z, protos)
    for name, got in zip(SI.output_names(exported.manifest.n_layers), plain):
        np.testing.assert_allclose(baked[name], live[name], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got, live[name], rtol=1e-5, atol=1e-5)


def test_device_session_follows_in_place_updates_and_replaced_arrays(tiny):
    """The session binds the live arrays once: it must see in-place changes, and rebind when
    the caller hands other arrays (a restored or unpickled learner)."""
    _, exported = tiny
    model = OnnxModel(exported)
    protos = [(P.copy(), g.copy()) for P, g in exported.protos]
    z = np.random.default_rng(1).standard_normal((1, 12)).astype(f32)
    first = model.run(z, protos)["logits"].copy()
    protos[-1][1][:] += 1.0                       # in place: every logit drops by 1
    np.testing.assert_allclose(model.run(z, protos)["logits"], first - 1.0, rtol=1e-5, atol=1e-5)
    fresh = [(P.copy(), g.copy()) for P, g in exported.protos]
    np.testing.assert_allclose(model.run(z, fresh)["logits"], first, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        model.run(z, [(np.asfortranarray(P), g) for P, g in fresh])


def test_lossy_encodings_shrink_deltas_within_their_error(tiny):
    _, exported = tiny
    L = SL.learner_for(exported, True)
    rng = np.random.default_rng(3)
    for _ in range(30):
        L.step(rng.standard_normal(12).astype(f32), int(rng.integers(4)))
    d = L.make_delta()
    wire = len(SY.encode_delta(d))
    same, size, err = SY.lossy(d, "f32", wire)
    assert same is d and size == wire and err == 0.0
    for enc, bound in (("f16", 1e-3), ("i8", 1.0 / 254 + 1e-6)):
        got, size, err = SY.lossy(d, enc, wire)
        assert size < wire and 0 < err <= bound
        for a, b in zip(d.layers, got.layers):
            np.testing.assert_array_equal(a.rows, b.rows)
            assert np.abs(a.dP - b.dP).max() <= bound * np.abs(a.dP).max() + 1e-12
