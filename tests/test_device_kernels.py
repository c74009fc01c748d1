"""The device's numba kernels against slow, obvious numpy twins."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_spl.device.kernels import (RMS_EPS, SD_FLOOR, _ema_standardize, _ff_head_step, _ff_hidden_step, _ff_update,
                                    _ff_update_pair, _ff_update_rms, _top_rows, ema_standardize,
                                    ff_update, ff_update_batch, ff_update_rms, ff_update_rms_batch, head_arena,
                                    replay_picks, var_floor)
from edge_spl.spl import Z_CLIP, standardize

f32 = np.float32


# -- numpy twins --------------------------------------------------------------------------------

def ema_twin(x, mean, var, std0, alpha, z_clip):
    x, mean, var, std0 = (np.asarray(a, np.float64) for a in (x, mean, var, std0))
    floor = (SD_FLOOR * std0) ** 2
    sd = np.sqrt(np.maximum(var, floor))
    delta = np.clip(x - mean, -z_clip * sd, z_clip * sd)
    mean = mean + alpha * delta
    var = (1 - alpha) * (var + alpha * delta ** 2)
    z = np.clip((x - mean) / np.sqrt(np.maximum(var, floor)), -z_clip, z_clip)
    return mean, var, z


def ff_twin(h, G, target, P, g, lr, counts):
    P, g, counts = P.astype(np.float64), g.astype(np.float64), counts.astype(np.float64)
    on = target >= 0
    e = lr * (1 / (1 + np.exp(-G.astype(np.float64))) - target)
    P[on] -= np.outer(e[on], h) / np.sqrt(P.shape[1])
    g[on] += e[on]
    counts[on] += 1
    return P, g, counts


def ff_rms_twin(h, G, target, P, g, vP, vg, lr, lr_gate, decay, corr, counts):
    P, g, vP, vg, counts = (a.astype(np.float64) for a in (P, g, vP, vg, counts))
    on = target >= 0
    e = 1 / (1 + np.exp(-G.astype(np.float64))) - target
    grad = np.outer(e, h) / np.sqrt(P.shape[1])
    vP[on] = decay * vP[on] + (1 - decay) * grad[on] ** 2
    P[on] -= lr * grad[on] / np.sqrt(vP[on] / corr + RMS_EPS)
    vg[on] = decay * vg[on] + (1 - decay) * e[on] ** 2
    g[on] += lr_gate * e[on] / np.sqrt(vg[on] / corr + RMS_EPS)
    counts[on] += 1
    return P, g, vP, vg, counts


def ff_loss(h, P, g, target):
    """L_FF of one layer on one sample, in float64, routing recomputed from P and g."""
    G = h @ P.T / np.sqrt(P.shape[1]) - g
    s = 1 / (1 + np.exp(-G))
    return -np.sum(np.log(s[target == 1])) - np.sum(np.log(1 - s[target == 0]))


# -- EMA standardisation --------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), d=st.integers(1, 40), alpha=st.floats(0.0, 0.5),
       scale=st.sampled_from([1e-3, 1.0, 50.0, 3e4]), z_clip=st.sampled_from([1.0, 3.0, Z_CLIP]))
def test_ema_standardize_matches_numpy(seed, d, alpha, scale, z_clip):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(d) * scale).astype(f32)
    mean = rng.standard_normal(d).astype(f32)
    var = rng.uniform(0.01, 4.0, d).astype(f32)
    std0 = rng.uniform(0.01, 300.0, d).astype(f32)   # the floor binds for some features
    want_m, want_v, want_z = ema_twin(x, mean, var, std0, alpha, z_clip)
    z = np.full(d, np.nan, f32)
    _ema_standardize(x, mean, var, var_floor(std0), f32(alpha), f32(z_clip), z)
    np.testing.assert_allclose(mean, want_m, rtol=1e-5, atol=1e-5 * max(1.0, scale))
    np.testing.assert_allclose(var, want_v, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(z, want_z, rtol=1e-4, atol=1e-4)
    assert np.all(np.abs(z) <= z_clip)


def test_ema_standardize_over_a_stream_matches_numpy():
    rng = np.random.default_rng(1)
    d = 12
    mean, var = np.zeros(d, f32), np.ones(d, f32)
    m64, v64 = mean.astype(np.float64), var.astype(np.float64)
    z = np.empty(d, f32)
    for t in range(300):
        x = (rng.standard_normal(d) * 2 + 0.01 * t).astype(f32)   # a slow drift
        _ema_standardize(x, mean, var, var_floor(np.ones(d)), f32(0.05), f32(Z_CLIP), z)
        m64, v64, z64 = ema_twin(x, m64, v64, np.ones(d), 0.05, Z_CLIP)
        np.testing.assert_allclose(z, z64, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(mean, m64, rtol=1e-4, atol=1e-4)
    # the running mean followed the drift
    assert abs(float(mean.mean()) - 0.01 * 280) < 0.5


def test_ema_with_alpha_zero_is_the_models_standardisation():
    rng = np.random.default_rng(2)
    d = 30
    x = (rng.standard_normal(d) * 40).astype(f32)
    mean = rng.standard_normal(d).astype(f32)
    # down to occupancy's HumidityRatio, whose training variance is 7e-7
    std = np.exp(rng.uniform(np.log(5e-4), np.log(3), d)).astype(f32)
    var = np.square(std)
    z = np.empty(d, f32)
    ema_standardize(x, mean.copy(), var.copy(), var_floor(std), 0.0, Z_CLIP, z)
    np.testing.assert_allclose(z, standardize(x[None], mean, std)[0], rtol=1e-5, atol=1e-5)


def test_a_feature_that_stops_moving_is_floored_at_a_fraction_of_its_training_spread():
    mean, var, floor = np.zeros(1, f32), np.full(1, 4e-6, f32), var_floor(np.full(1, 2e-3))
    z = np.empty(1, f32)
    for _ in range(5000):
        ema_standardize(np.zeros(1, f32), mean, var, floor, 0.01, Z_CLIP, z)
    assert var[0] < floor[0]                         # the running variance decayed past the floor
    ema_standardize(np.full(1, 2e-3 * SD_FLOOR, f32), mean, var, floor, 0.0, Z_CLIP, z)
    assert z[0] == pytest.approx(1.0, rel=1e-3)     # one floor-sd away reads as 1, not as huge


def test_one_extreme_outlier_does_not_mute_its_feature():
    mean, var = np.zeros(1, f32), np.ones(1, f32)
    z = np.empty(1, f32)
    floor = var_floor(np.ones(1))
    ema_standardize(np.array([30000.0], f32), mean, var, floor, 0.01, Z_CLIP, z)
    assert z[0] == pytest.approx(Z_CLIP)
    assert var[0] < 2.0 and abs(mean[0]) < 0.2      # winsorised: one sample moves it little
    ema_standardize(np.array([1.0], f32), mean, var, floor, 0.01, Z_CLIP, z)
    assert 0.5 < z[0] < 1.5                         # the next normal sample still reads as normal


def test_ema_wrapper_rejects_bad_arrays():
    d = 4
    ok = np.zeros(d, f32)
    with pytest.raises(TypeError, match="float32"):
        ema_standardize(np.zeros(d), ok.copy(), np.ones(d, f32), np.ones(d, f32), 0.01, 10, ok.copy())
    with pytest.raises(ValueError, match="shape"):
        ema_standardize(np.zeros(d + 1, f32), ok.copy(), np.ones(d, f32), np.ones(d, f32), 0.01, 10, ok.copy())
    with pytest.raises(TypeError, match="C-contiguous"):
        ema_standardize(np.zeros(2 * d, f32)[::2], ok.copy(), np.ones(d, f32), np.ones(d, f32), 0.01, 10, ok.copy())
    with pytest.raises(ValueError, match="alpha"):
        ema_standardize(ok.copy(), ok.copy(), np.ones(d, f32), np.ones(d, f32), 1.5, 10, ok.copy())


# -- Forward-Forward step -------------------------------------------------------------------------

def _layer(rng, d_out, d_in):
    h = rng.standard_normal(d_in).astype(f32)
    P = rng.standard_normal((d_out, d_in)).astype(f32)
    g = rng.standard_normal(d_out).astype(f32)
    G = (h @ P.T / np.sqrt(d_in) - g).astype(f32)
    target = rng.choice(np.array([-1, 0, 1], f32), d_out)
    return h, G, target, P, g


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), d_out=st.integers(1, 20), d_in=st.integers(1, 30),
       lr=st.floats(0.0, 1.0))
def test_ff_update_matches_numpy(seed, d_out, d_in, lr):
    rng = np.random.default_rng(seed)
    h, G, target, P, g = _layer(rng, d_out, d_in)
    counts = rng.integers(0, 5, d_out).astype(f32)
    want_P, want_g, want_c = ff_twin(h, G, target, P, g, lr, counts)
    _ff_update(h, G, target, P, g, f32(lr), counts)
    np.testing.assert_allclose(P, want_P, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(counts, want_c)


def test_ff_update_is_minus_the_analytic_gradient_of_the_ff_loss():
    """With lr = 1 the step is exactly -dL_FF/d(P, g); check it against central differences."""
    rng = np.random.default_rng(3)
    d_out, d_in = 5, 7
    h, G, target, P, g = _layer(rng, d_out, d_in)
    target[:3] = [1, 0, -1]
    P0, g0 = P.astype(np.float64), g.astype(np.float64)
    _ff_update(h, G, target, P, g, f32(1.0), np.zeros(d_out, f32))
    step_P, step_g = P - P0, g - g0

    h64, eps = h.astype(np.float64), 1e-6
    num_P, num_g = np.zeros_like(P0), np.zeros_like(g0)
    for j in range(d_out):
        for k in range(d_in):
            Pp, Pm = P0.copy(), P0.copy()
            Pp[j, k] += eps
            Pm[j, k] -= eps
            num_P[j, k] = (ff_loss(h64, Pp, g0, target) - ff_loss(h64, Pm, g0, target)) / (2 * eps)
        gp, gm = g0.copy(), g0.copy()
        gp[j] += eps
        gm[j] -= eps
        num_g[j] = (ff_loss(h64, P0, gp, target) - ff_loss(h64, P0, gm, target)) / (2 * eps)
    np.testing.assert_allclose(step_P, -num_P, atol=1e-5)
    np.testing.assert_allclose(step_g, -num_g, atol=1e-5)
    assert np.all(step_P[target < 0] == 0) and np.all(step_g[target < 0] == 0)
    assert np.abs(step_P).sum() > 0.1   # the check is not vacuous


def test_small_ff_steps_lower_the_ff_loss_and_count_moved_units():
    rng = np.random.default_rng(4)
    h, _, target, P, g = _layer(rng, 8, 10)
    counts = np.zeros(8, f32)
    before = ff_loss(h.astype(np.float64), P.astype(np.float64), g.astype(np.float64), target)
    for _ in range(20):
        G = (h @ P.T / np.sqrt(10) - g).astype(f32)
        ff_update(h, G, target, P, g, 0.05, counts)
    after = ff_loss(h.astype(np.float64), P.astype(np.float64), g.astype(np.float64), target)
    assert after < before
    np.testing.assert_array_equal(counts, np.where(target >= 0, 20, 0))


def test_ff_wrapper_rejects_bad_arrays():
    rng = np.random.default_rng(5)
    h, G, target, P, g = _layer(rng, 3, 4)
    c = np.zeros(3, f32)
    with pytest.raises(ValueError, match="h has shape"):
        ff_update(h[:3].copy(), G, target, P, g, 0.1, c)
    with pytest.raises(TypeError, match="float32"):
        ff_update(h, G.astype(np.float64), target, P, g, 0.1, c)
    with pytest.raises(TypeError, match="C-contiguous"):
        ff_update(h, G, target, np.asfortranarray(P), g, 0.1, c)


# -- RMS-preconditioned FF step -------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), d_out=st.integers(1, 12), d_in=st.integers(1, 40),
       decay=st.sampled_from([0.0, 0.5, 0.99]), steps=st.integers(1, 5))
def test_ff_update_rms_matches_numpy(seed, d_out, d_in, decay, steps):
    rng = np.random.default_rng(seed)
    P = rng.standard_normal((d_out, d_in)).astype(f32)
    g = rng.standard_normal(d_out).astype(f32)
    vP, vg, counts = np.zeros((d_out, d_in), f32), np.zeros(d_out, f32), np.zeros(d_out, f32)
    want = [a.astype(np.float64) for a in (P, g, vP, vg, counts)]
    for n in range(1, steps + 1):
        h = rng.standard_normal(d_in).astype(f32)
        target = rng.choice([-1.0, 0.0, 1.0], d_out).astype(f32)
        G = (h @ P.T / np.sqrt(d_in) - g).astype(f32)
        corr = 1 - decay ** n if decay > 0 else 1.0
        wP, wg, wvP, wvg, wc = want
        want = ff_rms_twin(h, G, target, wP, wg, wvP, wvg, 0.02, 0.2, decay, corr, wc)
        ff_update_rms(h, G, target, P, g, vP, vg, 0.02, 0.2, decay, corr, counts)
    for got, w in zip((P, g, vP, vg, counts), want):
        np.testing.assert_allclose(got, w, rtol=2e-4, atol=2e-5)


def splitmix64(state: int, count: int) -> tuple[int, list[int]]:
    """The reference SplitMix64 generator (Vigna), in Python ints."""
    mask, out = (1 << 64) - 1, []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return state, out


def test_splitmix64_reference_and_replay_picks():
    # the published first outputs for seed 1234567
    assert splitmix64(1234567, 3)[1] == [6457827717110365317, 3203168211198807973, 9817491932198370423]
    for state, n in ((0, 1), (7, 5), (2**63 + 11, 32), (2**64 - 1, 1000)):
        want_state, z = splitmix64(state, 40)
        got_state, picks = replay_picks(state, n, 40)
        assert got_state == want_state
        np.testing.assert_array_equal(picks, [((v >> 32) * n) >> 32 for v in z])
        assert picks.min() >= 0 and picks.max() < n
    # uniform enough to replay every stored input
    assert set(replay_picks(3, 32, 2000)[1].tolist()) == set(range(32))
    with pytest.raises(ValueError, match="stored inputs"):
        replay_picks(0, 0, 4)


def head_step_twin(h, G, label, P, g, vP, vg, U, Y, st, lr, lr_gate, decay, replay, counts):
    """_ff_head_step the slow, obvious way: float64, routing recomputed with numpy, picks from
    the reference SplitMix64. Returns the new arrays and st."""
    C, d = P.shape
    P, g, vP, vg, counts, U = (a.astype(np.float64) for a in (P, g, vP, vg, counts, U))
    Y, (steps, stored, rng) = Y.copy(), (int(v) for v in st)
    rng %= 1 << 64

    def one(x, routing, y):
        nonlocal P, g, vP, vg, steps
        t = np.eye(C)[y]
        if decay > 0:
            steps += 1
            P, g, vP, vg, _ = ff_rms_twin(x, routing, t, P, g, vP, vg, lr, lr_gate, decay, 1 - decay ** steps,
                                          np.zeros(C))
        else:
            P, g, _ = ff_twin(x, routing, t, P, g, lr, np.zeros(C))

    one(h, G, label)
    counts = counts + 1
    if replay > 0:
        n = min(stored, len(U))
        if n:
            rng, z = splitmix64(rng, replay)
            for v in z:
                i = ((v >> 32) * n) >> 32
                one(U[i], U[i] @ P.T / np.sqrt(d) - g, Y[i])
        U[stored % len(U)] = h
        Y[stored % len(U)] = label
        stored += 1
    return P, g, vP, vg, U, Y, counts, (steps, stored, rng)


@pytest.mark.parametrize("decay,replay,stored,d", [(0.99, 16, 40, 37), (0.99, 16, 3, 37), (0.99, 5, 0, 37),
                                                   (0.0, 7, 40, 37), (0.5, 0, 9, 37), (0.99, 16, 40, 80),
                                                   (0.0, 3, 40, 80)])
def test_ff_head_step_matches_numpy(decay, replay, stored, d):
    """The fused head kernel (own step, replay with in-kernel picks, ring store) on its arena
    against the float64 twin, over 30 labelled samples. float32 arithmetic and an rsqrt with a
    Newton step: within 2e-4 relative. d = 80: the vector loop and its remainder."""
    rng = np.random.default_rng(11)
    C, S = 5, 8
    arena, v = head_arena(C, d, S)
    P, g, vP, vg, U, Y, counts, st = (v[k] for k in ("P", "g", "vP", "vg", "U", "Y", "counts", "st"))
    P[...] = rng.standard_normal((C, d))
    g[...] = rng.standard_normal(C)
    U[...] = rng.standard_normal((S, d))
    Y[...] = rng.integers(0, C, S)
    st[...] = (3, stored, -5)                        # a stream state past 2**63 (as int64 bits)
    v["hp"][...] = (0.03, 0.2, decay, replay)
    want = [P.copy(), g.copy(), vP.copy(), vg.copy(), U.copy(), Y.copy(), counts.copy(), (3, stored, -5)]
    for _ in range(30):
        h = rng.standard_normal(d).astype(f32)
        label = int(rng.integers(C))
        G = (h @ P.T / np.sqrt(d) - g).astype(f32)
        wP, wg, wvP, wvg, wU, wY, wc, wst = want
        want = head_step_twin(h, G, label, wP, wg, wvP, wvg, wU, wY, wst, 0.03, 0.2, decay, replay, wc)
        _ff_head_step(h[None], G[None], label, arena)
    for got, w in zip((P, g, vP, vg, U, counts), (*want[:5], want[6])):
        np.testing.assert_allclose(got, w, rtol=2e-4, atol=2e-5)
    np.testing.assert_array_equal(Y, want[5])
    steps, n, state = want[7]
    assert (int(st[0]), int(st[1]), int(st[2]) % (1 << 64)) == (steps, n, state)
    assert np.all(counts == 30)                        # replayed steps add no count


def test_ff_head_step_bias_correction_after_many_steps():
    """Past ~4,000 steps decay**n is below 2**-54 and the kernel skips its pow: corr is 1 either
    way, so a step is the same as the twin's (and a learner's state file restores the count)."""
    rng = np.random.default_rng(5)
    C, d, S = 4, 24, 4
    for steps in (4000, 4200, 10**7):
        arena, v = head_arena(C, d, S)
        v["P"][...] = rng.standard_normal((C, d))
        v["vP"][...] = rng.random((C, d)) * 1e-3
        v["vg"][...] = rng.random(C) * 1e-3
        v["st"][...] = (steps, 0, 0)
        v["hp"][...] = (0.03, 0.2, 0.99, 0)
        h = rng.standard_normal(d).astype(f32)
        G = (h @ v["P"].T / np.sqrt(d) - v["g"]).astype(f32)
        wP, wg, wvP, wvg, *_ = head_step_twin(h, G, 1, v["P"], v["g"], v["vP"], v["vg"], v["U"], v["Y"],
                                              v["st"], 0.03, 0.2, 0.99, 0, v["counts"])
        _ff_head_step(h[None], G[None], 1, arena)
        for got, w in zip((v["P"], v["g"], v["vP"], v["vg"]), (wP, wg, wvP, wvg)):
            np.testing.assert_allclose(got, w, rtol=2e-4, atol=2e-5)
        assert int(v["st"][0]) == steps + 1


def test_head_arena_is_aligned_and_its_parts_do_not_overlap():
    arena, v = head_arena(6, 384, 32)
    assert arena.ctypes.data % 64 == 0 and arena.dtype == np.uint8 and arena.flags.c_contiguous
    parts = [(k, a) for k, a in v.items() if k not in ("st", "U")]
    spans = sorted((a.ctypes.data, a.ctypes.data + a.nbytes, k) for k, a in parts)
    for (s0, e0, k0), (s1, _, k1) in zip(spans, spans[1:]):
        assert e0 <= s1, (k0, k1)
    for k, a in parts:
        assert a.flags.c_contiguous and a.ctypes.data % 64 == 0 and np.shares_memory(a, arena), k
    assert v["U"].shape == (32, 384) and np.shares_memory(v["U"], v["X"])
    assert v["P"].dtype == f32 and v["Y"].dtype == np.int64 and v["st"].shape == (3,)
    # the kernel checks the sample's buffers against the arena's shape before it indexes raw memory
    with pytest.raises(ValueError, match="head arena"):
        _ff_head_step(np.zeros((1, 383), f32), np.zeros((1, 6), f32), 0, arena)
    with pytest.raises(ValueError, match="head arena"):
        _ff_head_step(np.zeros((1, 384), f32), np.zeros((1, 5), f32), 0, arena)


def test_the_learners_head_arrays_stay_the_kernels_arena(tmp_path):
    """The learner's head arrays are views into the head kernel's arena, so what the kernel
    learns is what onnxruntime, the deltas and the state file see, through every path that
    writes them: a delta, an adopted release, a state restore and a pickle round trip."""
    import pickle

    from conftest import make_model

    from edge_spl.device.learner import FFLearner
    from edge_spl.device.state import load_state, save_state
    from edge_spl.export.onnx_export import export_model
    from edge_spl.protocol import Release

    exported = export_model(make_model((8, 16, 16, 3)))
    exported.manifest.onnx_sha256 = "a" * 64
    rng = np.random.default_rng(0)

    def head_views(L):
        P, g = L.protos_[-1]
        return (P, g, L.vP_, L.vg_, L.replay_u_, L.replay_y_, L.counts_[-1], L.head_state_)

    def check(L):
        for a in head_views(L):
            assert np.shares_memory(a, L._arena)
        P, g = L.protos_[-1]
        before = P.copy()
        x = rng.standard_normal(8).astype(f32)
        L.step(x, 1)      # the kernel's update is seen through the learner's arrays ...
        assert not np.array_equal(P, before)
        out = L.onnx.run(L._z[:1], L.protos_)   # ... and by onnxruntime
        h = out["h2"][0]
        np.testing.assert_allclose(out["logits"][0], h @ P.T / np.sqrt(P.shape[1]) - g, rtol=1e-4, atol=1e-4)

    L = FFLearner(exported, device_id="dev1")
    for _ in range(20):
        L.step(rng.standard_normal(8).astype(f32), int(rng.integers(3)))
    check(L)
    assert L.make_delta() is not None
    check(L)
    assert L.adopt_release(Release(1, L.manifest.onnx_sha256, [(P + 0.01, g.copy()) for P, g in L.protos_], {}))
    check(L)
    save_state(L, str(tmp_path))
    L2 = FFLearner(exported, device_id="dev1")
    assert load_state(L2, str(tmp_path))
    for a, b in zip(head_views(L), head_views(L2)):
        np.testing.assert_array_equal(a, b)
    check(L2)
    L3 = pickle.loads(pickle.dumps(L2))
    for a, b in zip(head_views(L2), head_views(L3)):
        np.testing.assert_array_equal(a, b)
    check(L3)


def test_ff_update_rms_first_step_moves_each_touched_parameter_by_about_lr():
    """After bias correction the first step is lr * sign(grad): the preconditioner's point."""
    rng = np.random.default_rng(3)
    P, g = rng.standard_normal((3, 5)).astype(f32), np.zeros(3, f32)
    P0, g0 = P.copy(), g.copy()
    h = rng.standard_normal(5).astype(f32)
    G = (h @ P.T / np.sqrt(5) - g).astype(f32)
    target = np.array([1, 0, -1], f32)
    ff_update_rms(h, G, target, P, g, np.zeros_like(P), np.zeros(3, f32), 0.01, 0.1, 0.99,
                  1 - 0.99, np.zeros(3, f32))
    np.testing.assert_allclose(np.abs(P - P0)[:2], 0.01, rtol=1e-2)
    np.testing.assert_allclose(np.abs(g - g0)[:2], 0.1, rtol=1e-2)
    assert np.array_equal(P[2], P0[2]) and g[2] == g0[2]


def test_ff_update_rms_rejects_bad_shapes():
    P = np.zeros((3, 4), f32)
    with pytest.raises(ValueError, match="vP"):
        ff_update_rms(np.zeros(4, f32), np.zeros(3, f32), np.zeros(3, f32), P, np.zeros(3, f32),
                      np.zeros((4, 3), f32), np.zeros(3, f32), 0.1, 0.1, 0.9, 0.1, np.zeros(3, f32))


# -- hidden layers: top k and the fused positive/negative step -------------------------------------

def top_twin(r, k):
    """The top-k set when it is unique (None when entries equal to the k-th largest straddle it)."""
    if np.isnan(r).any():
        return None
    kth = np.sort(r)[::-1][k - 1]
    if (r > kth).sum() + (r == kth).sum() != k:
        return None
    return set(np.flatnonzero(r >= kth).tolist())


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 70), frac=st.floats(0.01, 1.0),
       levels=st.sampled_from([0, 3, 8]))
def test_top_rows_matches_numpy(seed, n, frac, levels):
    rng = np.random.default_rng(seed)
    # levels > 0: few distinct values, so ties at the k-th value are common
    r = (rng.integers(0, levels, n) if levels else rng.standard_normal(n)).astype(f32)
    k = max(1, min(n, int(round(frac * n))))
    rows, work = np.full(n, -7, np.int64), np.zeros(n, f32)
    got = _top_rows(r, k, rows, work)
    want = top_twin(r, k)
    if want is None:
        assert got == -1
    else:
        assert got == k and set(rows[:k].tolist()) == want
        # the set argpartition picks, as the learner did before
        assert want == set(np.argpartition(r, -k)[-k:].tolist())


def test_top_rows_refuses_nan_and_keeps_every_row_when_k_is_n():
    work, rows = np.zeros(4, f32), np.zeros(4, np.int64)
    assert _top_rows(np.array([1, np.nan, 0, 2], f32), 2, rows, work) == -1
    assert _top_rows(np.array([3, 3, 3, 3], f32), 4, rows, work) == 4 and set(rows) == {0, 1, 2, 3}
    assert _top_rows(np.array([3, 3, 3, 3], f32), 2, rows, work) == -1


def pair_twin(hp, Gp, hn, Gn, rows, P, g, lr, counts):
    """The positive then the negative FF step on `rows`, through the plain twin."""
    tp = np.full(len(g), -1.0, f32)
    tp[rows] = 1.0
    tn = np.full(len(g), -1.0, f32)
    tn[rows] = 0.0
    P, g, counts = ff_twin(hp, Gp, tp, P, g, lr, counts)
    P, g, _ = ff_twin(hn, Gn, tn, P, g, lr, counts.copy())
    return P, g, counts


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), d_out=st.integers(1, 24), d_in=st.integers(1, 30),
       lr=st.floats(0.0, 1.0))
def test_ff_update_pair_is_the_two_plain_steps_bit_for_bit(seed, d_out, d_in, lr):
    rng = np.random.default_rng(seed)
    hp, Gp, _, P, g = _layer(rng, d_out, d_in)
    hn, Gn = rng.standard_normal(d_in).astype(f32), rng.standard_normal(d_out).astype(f32)
    rows = rng.permutation(d_out)[:max(1, d_out // 3)].astype(np.int64)
    counts = rng.integers(0, 5, d_out).astype(f32)
    want = pair_twin(hp, Gp, hn, Gn, rows, P, g, lr, counts)
    # the kernel the learner used before, run twice: the fused one must give the same bits
    P2, g2, c2 = P.copy(), g.copy(), counts.copy()
    tp = np.full(d_out, -1.0, f32)
    tp[rows] = 1.0
    tn = np.full(d_out, -1.0, f32)
    tn[rows] = 0.0
    _ff_update(hp, Gp, tp, P2, g2, f32(lr), c2)
    _ff_update(hn, Gn, tn, P2, g2, f32(lr), np.zeros(d_out, f32))
    _ff_update_pair(hp, Gp, hn, Gn, rows, len(rows), P, g, f32(lr), counts)
    np.testing.assert_array_equal(P, P2)
    np.testing.assert_array_equal(g, g2)
    np.testing.assert_array_equal(counts, c2)
    np.testing.assert_allclose(P, want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g, want[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(counts, want[2])


def test_ff_hidden_step_updates_the_top_rows_or_nothing_on_ties():
    rng = np.random.default_rng(6)
    hp, Gp, _, P, g = _layer(rng, 10, 6)
    hn, Gn = rng.standard_normal(6).astype(f32), rng.standard_normal(10).astype(f32)
    rows, work, counts = np.zeros(10, np.int64), np.zeros(10, f32), np.zeros(10, f32)
    want = pair_twin(hp, Gp, hn, Gn, np.argpartition(Gp, -3)[-3:], P, g, 0.1, counts)
    h, G = np.stack([hp, hn]), np.stack([Gp, Gn])
    assert _ff_hidden_step(h, G, 3, P, g, f32(0.1), counts, rows, work) == 3
    for got, w in zip((P, g, counts), want):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)
    tied = np.array([5, 5, 5, 1, 0, 0, 0, 0, 0, 0], f32)
    P0, g0 = P.copy(), g.copy()
    assert _ff_hidden_step(h, np.stack([tied, Gn]), 2, P, g, f32(0.1), counts, rows, work) == -1
    np.testing.assert_array_equal(P, P0)
    np.testing.assert_array_equal(g, g0)


# -- mini-batch steps --------------------------------------------------------------------------------

def _batch(rng, b, d_out, d_in):
    H = rng.standard_normal((b, d_in)).astype(f32)
    P = rng.standard_normal((d_out, d_in)).astype(f32)
    g = rng.standard_normal(d_out).astype(f32)
    G = (H @ P.T / np.sqrt(d_in) - g).astype(f32)
    T = rng.choice(np.array([-1, 0, 1], f32), (b, d_out))
    return H, G, T, P, g


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 9), d_out=st.integers(1, 12),
       d_in=st.integers(1, 30), lr=st.floats(0.0, 1.0))
def test_ff_update_batch_is_the_sum_of_per_sample_steps(seed, b, d_out, d_in, lr):
    """The per-sample update depends on G, not on P, so B samples' steps add: the mini-batch
    step equals B plain steps (routing from one forward pass) up to rounding."""
    rng = np.random.default_rng(seed)
    H, G, T, P, g = _batch(rng, b, d_out, d_in)
    counts = np.zeros(d_out, f32)
    wP, wg, wc = P.astype(np.float64), g.astype(np.float64), counts.astype(np.float64)
    for s in range(b):
        wP, wg, wc = ff_twin(H[s], G[s], T[s], wP, wg, lr, wc)
    ff_update_batch(H, G, T, P, g, lr, counts)
    np.testing.assert_allclose(P, wP, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g, wg, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(counts, wc)


def rms_batch_twin(H, G, T, P, g, vP, vg, lr, lr_gate, decay, corr, counts):
    P, g, vP, vg, counts = (a.astype(np.float64) for a in (P, g, vP, vg, counts))
    on = T >= 0
    E = np.where(on, 1 / (1 + np.exp(-G.astype(np.float64))) - T, 0.0)
    grad = E.T @ H.astype(np.float64) / np.sqrt(P.shape[1])
    esum = E.sum(0)
    rows = on.any(0)
    vP[rows] = decay * vP[rows] + (1 - decay) * grad[rows] ** 2
    P[rows] -= lr * grad[rows] / np.sqrt(vP[rows] / corr + RMS_EPS)
    vg[rows] = decay * vg[rows] + (1 - decay) * esum[rows] ** 2
    g[rows] += lr_gate * esum[rows] / np.sqrt(vg[rows] / corr + RMS_EPS)
    counts += on.sum(0)
    return P, g, vP, vg, counts


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 9), d_out=st.integers(1, 10),
       d_in=st.integers(1, 30), decay=st.sampled_from([0.0, 0.5, 0.99]))
def test_ff_update_rms_batch_matches_numpy(seed, b, d_out, d_in, decay):
    rng = np.random.default_rng(seed)
    H, G, T, P, g = _batch(rng, b, d_out, d_in)
    vP = rng.uniform(0, 0.1, (d_out, d_in)).astype(f32)
    vg = rng.uniform(0, 0.1, d_out).astype(f32)
    counts = np.zeros(d_out, f32)
    corr = 1 - decay ** 3 if decay > 0 else 1.0
    want = rms_batch_twin(H, G, T, P, g, vP, vg, 0.02, 0.2, decay, corr, counts)
    ff_update_rms_batch(H, G, T, P, g, vP, vg, 0.02, 0.2, decay, corr, counts)
    for got, w in zip((P, g, vP, vg, counts), want):
        np.testing.assert_allclose(got, w, rtol=2e-4, atol=2e-5)


def test_ff_update_rms_batch_of_one_is_the_per_sample_step():
    rng = np.random.default_rng(7)
    H, G, T, P, g = _batch(rng, 1, 5, 9)
    vP, vg = np.zeros((5, 9), f32), np.zeros(5, f32)
    P2, g2, vP2, vg2 = P.copy(), g.copy(), vP.copy(), vg.copy()
    c1, c2 = np.zeros(5, f32), np.zeros(5, f32)
    ff_update_rms_batch(H, G, T, P, g, vP, vg, 0.02, 0.2, 0.9, 0.1, c1)
    ff_update_rms(H[0], G[0], T[0], P2, g2, vP2, vg2, 0.02, 0.2, 0.9, 0.1, c2)
    np.testing.assert_allclose(P, P2, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g, g2, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(c1, c2)


def test_batch_wrappers_reject_bad_arrays():
    rng = np.random.default_rng(8)
    H, G, T, P, g = _batch(rng, 3, 4, 5)
    c = np.zeros(4, f32)
    with pytest.raises(ValueError, match="T has shape"):
        ff_update_batch(H, G, T[:2].copy(), P, g, 0.1, c)
    with pytest.raises(TypeError, match="float32"):
        ff_update_batch(H.astype(np.float64), G, T, P, g, 0.1, c)
    with pytest.raises(ValueError, match="vP has shape"):
        ff_update_rms_batch(H, G, T, P, g, np.zeros((5, 4), f32), np.zeros(4, f32), 0.1, 0.1, 0.9, 0.1, c)
    with pytest.raises(ValueError, match="decay"):
        ff_update_rms_batch(H, G, T, P, g, np.zeros((4, 5), f32), np.zeros(4, f32), 0.1, 0.1, 1.5, 0.1, c)
