"""The device's numba kernels: plain loops over C-contiguous float32 arrays, writing in place.

They are private; `edge_spl.device.learner.FFLearner` owns the arrays, checks their shapes and
dtypes once, and calls these per sample. Every kernel has a numpy twin in
tests/test_device_kernels.py. All numba flags live here.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

# A feature's running standard deviation is floored at this fraction of its training one, so a
# feature that stops moving does not divide by ~0. Relative, not absolute: occupancy's
# HumidityRatio has a training variance of 7e-7, which an absolute 1e-6 would more than double.
SD_FLOOR = 0.01

# The flags of every kernel. error_model="numpy": a float division by zero gives inf instead of
# raising, so the inner loops carry no per-element ZeroDivisionError branch and LLVM vectorises
# them (the RMS step runs ~3x faster). No kernel divides by zero: every divisor is >= 1 or a
# square root of something >= a positive epsilon, so results are bit-for-bit the same.
_jit = njit(cache=True, nogil=True, error_model="numpy")


@_jit
def _ema_standardize(x, mean, var, var_floor, alpha, z_clip, z_out):
    """Running input re-standardisation. Updates the exponential moving mean/variance with x,
    then writes z = clip((x - mean) / sqrt(max(var, var_floor)), +-z_clip). With alpha = 0 this
    is exactly the training standardisation (var_floor is below the training variance).

    The step that updates mean and var is winsorised at z_clip standard deviations: one extreme
    outlier (gas batch 2 has a feature at ~30,000 where batch 1 averages ~4.5) would otherwise
    inflate the variance by orders of magnitude and mute that feature for a thousand samples,
    while real drift, which moves many samples the same way, still gets through at a rate of up
    to alpha * z_clip standard deviations per sample (and the variance can double per sample)."""
    for j in range(x.shape[0]):
        sd = math.sqrt(max(var[j], var_floor[j]))
        delta = x[j] - mean[j]
        lim = z_clip * sd
        if delta > lim:
            delta = lim
        elif delta < -lim:
            delta = -lim
        mean[j] += alpha * delta
        # West's incremental exponentially weighted variance
        var[j] = (1.0 - alpha) * (var[j] + alpha * delta * delta)
        z = (x[j] - mean[j]) / math.sqrt(max(var[j], var_floor[j]))
        if z > z_clip:
            z = z_clip
        elif z < -z_clip:
            z = -z_clip
        z_out[j] = z


@_jit
def _ff_update(h, G, target, P, g, lr, counts):
    """One Forward-Forward step of one layer on one sample.

    G[j] = h . P[j] / sqrt(d_in) - g[j] is unit j's goodness (its routing). For units with
    target[j] >= 0 this takes a gradient step on
        L_FF = -sum_{target=1} log sigmoid(G) - sum_{target=0} log(1 - sigmoid(G)),
    whose derivative in G is e = sigmoid(G) - target; dG/dP[j] = h / sqrt(d_in), dG/dg[j] = -1.
    Units with target -1 are left alone. counts[j] += 1 for every unit that moved."""
    inv_sqrt = 1.0 / math.sqrt(P.shape[1])
    for j in range(P.shape[0]):
        t = target[j]
        if t < 0.0:
            continue
        s = 1.0 / (1.0 + math.exp(-G[j]))
        e = lr * (s - t)
        c = e * inv_sqrt
        for k in range(P.shape[1]):
            P[j, k] -= c * h[k]
        g[j] += e
        counts[j] += 1.0


RMS_EPS = 1e-6


@_jit
def _ff_update_rms(h, G, target, P, g, vP, vg, lr, lr_gate, decay, corr, counts):
    """The same Forward-Forward step as `_ff_update`, preconditioned per parameter by a running
    mean of its squared gradient (RMSprop): a diagonal second-order scaling, so a prototype
    coordinate that rarely moves takes a full step when it does, and a few labels suffice.

    grad = dL_FF/dP[j,k] = e_j h_k / sqrt(d_in), dL_FF/dg[j] = -e_j with e = sigmoid(G) - target;
    v <- decay v + (1 - decay) grad^2;  param -= lr grad / sqrt(v / corr + eps), where
    corr = 1 - decay^n is the bias correction after n steps. Gates take step size lr_gate."""
    inv_sqrt = 1.0 / math.sqrt(P.shape[1])
    keep = 1.0 - decay
    for j in range(P.shape[0]):
        t = target[j]
        if t < 0.0:
            continue
        e = 1.0 / (1.0 + math.exp(-G[j])) - t
        c = e * inv_sqrt
        for k in range(P.shape[1]):
            gr = c * h[k]
            v = decay * vP[j, k] + keep * gr * gr
            vP[j, k] = v
            P[j, k] -= lr * gr / math.sqrt(v / corr + RMS_EPS)
        v = decay * vg[j] + keep * e * e
        vg[j] = v
        g[j] += lr_gate * e / math.sqrt(v / corr + RMS_EPS)
        counts[j] += 1.0


@_jit
def _ff_replay(U, Y, picks, P, g, vP, vg, lr, lr_gate, decay, steps, counts, G, T):
    """Latent replay on the head: one label-conditioned FF step (RMS-scaled when decay > 0, as in
    `_ff_update_rms`; plain `_ff_update` otherwise) on each stored head input U[i] with its
    label Y[i], for i in picks, in order, with routing recomputed from the current P, g.
    `steps` is the number of RMS steps taken so far (for the bias correction); returns the new
    count. counts is incremented per step as in the single-step kernels (the learner passes a
    scratch array: a replayed step is not a new sample for the merge weights). G, T: float32
    work buffers of len(g)."""
    inv_sqrt = 1.0 / math.sqrt(P.shape[1])
    for i in picks:
        u = U[i]
        for j in range(P.shape[0]):
            acc = 0.0
            for k in range(P.shape[1]):
                acc += u[k] * P[j, k]
            G[j] = acc * inv_sqrt - g[j]
            T[j] = 0.0
        T[Y[i]] = 1.0
        if decay > 0.0:
            steps += 1
            corr = np.float32(1.0 - float(decay) ** steps)
            _ff_update_rms(u, G, T, P, g, vP, vg, lr, lr_gate, decay, corr, counts)
        else:
            _ff_update(u, G, T, P, g, lr, counts)
    return steps


@_jit
def _top_rows(r, k, rows, work):
    """The indices of the k largest entries of r, written to rows[:k]; returns k. Returns -1
    (rows undefined) when that set is not unique -- entries equal to the k-th largest both inside
    and outside it, or a NaN -- so the caller can pick with np.argpartition as before.

    Quickselect on a copy in `work` (float32, len(r)), expected O(len(r))."""
    n = r.shape[0]
    for j in range(n):
        v = r[j]
        if v != v:
            return -1
        work[j] = v
    want = n - k   # position of the k-th largest in ascending order
    lo, hi = 0, n - 1
    while lo < hi:
        a, b, c = work[lo], work[(lo + hi) // 2], work[hi]
        if a > b:
            a, b = b, a
        if b > c:
            b = c
        if a > b:
            b = a
        pivot = b   # median of three
        i, j = lo, hi
        while i <= j:
            while work[i] < pivot:
                i += 1
            while work[j] > pivot:
                j -= 1
            if i <= j:
                t = work[i]
                work[i] = work[j]
                work[j] = t
                i += 1
                j -= 1
        if want <= j:
            hi = j
        elif want >= i:
            lo = i
        else:
            break
    kth = work[want]
    m = 0
    eq = 0
    for j in range(n):
        if r[j] > kth:
            m += 1
        elif r[j] == kth:
            eq += 1
    if m + eq != k:
        return -1
    m = 0
    for j in range(n):
        if r[j] >= kth:
            rows[m] = j
            m += 1
    return k


@_jit
def _ff_update_pair(hp, Gp, hn, Gn, rows, n_rows, P, g, lr, counts):
    """The hidden-layer FF step on one sample: target 1 for the positive input hp and target 0
    for the negative hn, on the units rows[:n_rows]; counts once per unit. Bit for bit the same as
    _ff_update(hp, Gp, t1, ...) then _ff_update(hn, Gn, t0, ...), in one pass over each row."""
    inv_sqrt = 1.0 / math.sqrt(P.shape[1])
    n = P.shape[1]
    # the inputs as float64 once (exact), not once per row
    hp64 = np.empty(n, np.float64)
    hn64 = np.empty(n, np.float64)
    for k in range(n):
        hp64[k] = hp[k]
        hn64[k] = hn[k]
    for r in range(n_rows):
        j = rows[r]
        sp = 1.0 / (1.0 + math.exp(-Gp[j]))
        ep = lr * (sp - 1.0)
        cp = ep * inv_sqrt
        sn = 1.0 / (1.0 + math.exp(-Gn[j]))
        en = lr * (sn - 0.0)
        cn = en * inv_sqrt
        Pj = P[j]
        for k in range(n):
            Pj[k] -= cp * hp64[k]   # rounded to float32 here, as the positive pass stored it
            Pj[k] -= cn * hn64[k]
        g[j] += ep
        g[j] += en
        counts[j] += 1.0


@_jit
def _ff_hidden_step(h, G, k, P, g, lr, counts, rows, work):
    """Unsupervised FF of one hidden layer on one sample: h, G [2, ...] hold the positive input
    (row 0) and the negative (row 1) and their routing. The k units most strongly routed for the
    positive are pushed on for it and off for the negative. Returns k, or -1 (nothing done) when
    the top k is not unique (see _top_rows)."""
    n = _top_rows(G[0], k, rows, work)
    if n > 0:
        _ff_update_pair(h[0], G[0], h[1], G[1], rows, n, P, g, lr, counts)
    return n


@_jit
def _ff_update_batch(H, G, T, P, g, lr, counts):
    """Mini-batch FF step: the FF gradients of B samples (rows of H, G, T, routing from one
    forward pass) summed, then one step. Per unit j: P[j] -= sum_s c_sj H[s] with c as in
    _ff_update, accumulated in float64 and rounded once; g[j] += sum_s e_sj; counts[j] += the
    samples with T[s, j] >= 0. Equal to B calls of _ff_update up to float rounding."""
    inv_sqrt = 1.0 / math.sqrt(P.shape[1])
    acc = np.empty(P.shape[1], np.float64)
    for j in range(P.shape[0]):
        n = 0
        esum = 0.0
        for s in range(H.shape[0]):
            t = T[s, j]
            if t < 0.0:
                continue
            e = lr * (1.0 / (1.0 + math.exp(-G[s, j])) - t)
            c = e * inv_sqrt
            Hs = H[s]
            if n == 0:
                for k in range(acc.shape[0]):
                    acc[k] = c * Hs[k]
            else:
                for k in range(acc.shape[0]):
                    acc[k] += c * Hs[k]
            esum += e
            n += 1
        if n == 0:
            continue
        Pj = P[j]
        for k in range(acc.shape[0]):
            Pj[k] -= acc[k]
        g[j] += esum
        counts[j] += n


@_jit
def _ff_update_rms_batch(H, G, T, P, g, vP, vg, lr, lr_gate, decay, corr, counts):
    """Mini-batch RMS-scaled FF step: the FF gradients of B samples summed (float64), then one
    step of the _ff_update_rms rule with that gradient."""
    inv_sqrt = 1.0 / math.sqrt(P.shape[1])
    keep = 1.0 - decay
    acc = np.empty(P.shape[1], np.float64)
    for j in range(P.shape[0]):
        n = 0
        esum = 0.0
        for s in range(H.shape[0]):
            t = T[s, j]
            if t < 0.0:
                continue
            e = 1.0 / (1.0 + math.exp(-G[s, j])) - t
            c = e * inv_sqrt
            Hs = H[s]
            if n == 0:
                for k in range(acc.shape[0]):
                    acc[k] = c * Hs[k]
            else:
                for k in range(acc.shape[0]):
                    acc[k] += c * Hs[k]
            esum += e
            n += 1
        if n == 0:
            continue
        Pj = P[j]
        vPj = vP[j]
        for k in range(acc.shape[0]):
            gr = acc[k]
            v = decay * vPj[k] + keep * gr * gr
            vPj[k] = v
            Pj[k] -= lr * gr / math.sqrt(v / corr + RMS_EPS)
        v = decay * vg[j] + keep * esum * esum
        vg[j] = v
        g[j] += lr_gate * esum / math.sqrt(v / corr + RMS_EPS)
        counts[j] += n


def check_f32(name: str, a, shape) -> np.ndarray:
    """Kernels take C-contiguous float32 arrays of a known shape; say clearly when they are not."""
    if not isinstance(a, np.ndarray) or a.dtype != np.float32 or not a.flags.c_contiguous:
        raise TypeError(f"{name} must be a C-contiguous float32 array, got "
                        f"{getattr(a, 'dtype', type(a).__name__)}")
    if a.shape != tuple(shape):
        raise ValueError(f"{name} has shape {a.shape}, expected {tuple(shape)}")
    return a


def var_floor(std) -> np.ndarray:
    """The variance floor of `_ema_standardize` for features of training std `std` (> 0)."""
    return np.maximum(np.square(SD_FLOOR * np.asarray(std, np.float64)),
                      np.finfo(np.float32).tiny).astype(np.float32)


def ema_standardize(x, mean, var, floor, alpha: float, z_clip: float, z_out) -> np.ndarray:
    """Validating wrapper of `_ema_standardize` (tests and one-off use; the learner calls the
    kernel directly on arrays it has checked once)."""
    d = mean.shape[0] if isinstance(mean, np.ndarray) else -1
    for name, a in (("x", x), ("mean", mean), ("var", var), ("floor", floor), ("z_out", z_out)):
        check_f32(name, a, (d,))
    if not 0.0 <= alpha <= 1.0 or z_clip <= 0 or not np.all(floor > 0):
        raise ValueError(f"alpha {alpha} must be in [0, 1], z_clip {z_clip} and the floor positive")
    _ema_standardize(x, mean, var, floor, np.float32(alpha), np.float32(z_clip), z_out)
    return z_out


def ff_update(h, G, target, P, g, lr: float, counts) -> None:
    """Validating wrapper of `_ff_update`."""
    if not isinstance(P, np.ndarray) or P.ndim != 2:
        raise ValueError("P must be a 2-d array [d_out, d_in]")
    d_out, d_in = P.shape
    check_f32("P", P, (d_out, d_in))
    check_f32("h", h, (d_in,))
    for name, a in (("G", G), ("target", target), ("g", g), ("counts", counts)):
        check_f32(name, a, (d_out,))
    _ff_update(h, G, target, P, g, np.float32(lr), counts)


def ff_update_rms(h, G, target, P, g, vP, vg, lr: float, lr_gate: float, decay: float, corr: float,
                  counts) -> None:
    """Validating wrapper of `_ff_update_rms`."""
    if not isinstance(P, np.ndarray) or P.ndim != 2:
        raise ValueError("P must be a 2-d array [d_out, d_in]")
    d_out, d_in = P.shape
    check_f32("P", P, (d_out, d_in))
    check_f32("vP", vP, (d_out, d_in))
    check_f32("h", h, (d_in,))
    for name, a in (("G", G), ("target", target), ("g", g), ("vg", vg), ("counts", counts)):
        check_f32(name, a, (d_out,))
    if not (0.0 <= decay < 1.0 and 0.0 < corr <= 1.0):
        raise ValueError(f"decay {decay} must be in [0, 1) and corr {corr} in (0, 1]")
    _ff_update_rms(h, G, target, P, g, vP, vg, np.float32(lr), np.float32(lr_gate),
                   np.float32(decay), np.float32(corr), counts)


def _check_batch(H, G, T, P, g, counts):
    if not isinstance(P, np.ndarray) or P.ndim != 2 or not isinstance(H, np.ndarray) or H.ndim != 2:
        raise ValueError("P and H must be 2-d arrays: P [d_out, d_in], H [batch, d_in]")
    (d_out, d_in), b = P.shape, H.shape[0]
    check_f32("P", P, (d_out, d_in))
    check_f32("H", H, (b, d_in))
    check_f32("G", G, (b, d_out))
    check_f32("T", T, (b, d_out))
    check_f32("g", g, (d_out,))
    check_f32("counts", counts, (d_out,))
    return d_out, d_in


def ff_update_batch(H, G, T, P, g, lr: float, counts) -> None:
    """Validating wrapper of `_ff_update_batch`."""
    _check_batch(H, G, T, P, g, counts)
    _ff_update_batch(H, G, T, P, g, np.float32(lr), counts)


def ff_update_rms_batch(H, G, T, P, g, vP, vg, lr: float, lr_gate: float, decay: float, corr: float,
                        counts) -> None:
    """Validating wrapper of `_ff_update_rms_batch`."""
    d_out, d_in = _check_batch(H, G, T, P, g, counts)
    check_f32("vP", vP, (d_out, d_in))
    check_f32("vg", vg, (d_out,))
    if not (0.0 <= decay < 1.0 and 0.0 < corr <= 1.0):
        raise ValueError(f"decay {decay} must be in [0, 1) and corr {corr} in (0, 1]")
    _ff_update_rms_batch(H, G, T, P, g, vP, vg, np.float32(lr), np.float32(lr_gate),
                         np.float32(decay), np.float32(corr), counts)
