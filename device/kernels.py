"""The device's numba kernels: plain loops over C-contiguous float32 arrays, writing in place.

They are private; `edge_spl.device.learner.FFLearner` owns the arrays, checks their shapes and
dtypes once, and calls these per sample. Every kernel has a numpy twin in
tests/test_device_kernels.py. All numba flags live here.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

VAR_EPS = 1e-6  # keeps a feature that stops moving from dividing by ~0


@njit(cache=True, nogil=True)
def _ema_standardize(x, mean, var, alpha, z_clip, z_out):
    """Running input re-standardisation. Updates the exponential moving mean/variance with x,
    then writes z = clip((x - mean) / sqrt(var + eps), +-z_clip).

    The step that updates mean and var is winsorised at z_clip standard deviations: one extreme
    outlier (gas batch 2 has a feature at ~30,000 where batch 1 averages ~4.5) would otherwise
    inflate the variance by orders of magnitude and mute that feature for a thousand samples,
    while real drift, which moves many samples the same way, still gets through at a rate of up
    to alpha * z_clip standard deviations per sample (and the variance can double per sample)."""
    for j in range(x.shape[0]):
        sd = math.sqrt(var[j] + VAR_EPS)
        delta = x[j] - mean[j]
        lim = z_clip * sd
        if delta > lim:
            delta = lim
        elif delta < -lim:
            delta = -lim
        mean[j] += alpha * delta
        # West's incremental exponentially weighted variance
        var[j] = (1.0 - alpha) * (var[j] + alpha * delta * delta)
        z = (x[j] - mean[j]) / math.sqrt(var[j] + VAR_EPS)
        if z > z_clip:
            z = z_clip
        elif z < -z_clip:
            z = -z_clip
        z_out[j] = z


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
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


def check_f32(name: str, a, shape) -> np.ndarray:
    """Kernels take C-contiguous float32 arrays of a known shape; say clearly when they are not."""
    if not isinstance(a, np.ndarray) or a.dtype != np.float32 or not a.flags.c_contiguous:
        raise TypeError(f"{name} must be a C-contiguous float32 array, got "
                        f"{getattr(a, 'dtype', type(a).__name__)}")
    if a.shape != tuple(shape):
        raise ValueError(f"{name} has shape {a.shape}, expected {tuple(shape)}")
    return a


def ema_standardize(x, mean, var, alpha: float, z_clip: float, z_out) -> np.ndarray:
    """Validating wrapper of `_ema_standardize` (tests and one-off use; the learner calls the
    kernel directly on arrays it has checked once)."""
    d = mean.shape[0] if isinstance(mean, np.ndarray) else -1
    for name, a in (("x", x), ("mean", mean), ("var", var), ("z_out", z_out)):
        check_f32(name, a, (d,))
    if not 0.0 <= alpha <= 1.0 or z_clip <= 0:
        raise ValueError(f"alpha {alpha} must be in [0, 1] and z_clip {z_clip} positive")
    _ema_standardize(x, mean, var, np.float32(alpha), np.float32(z_clip), z_out)
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
