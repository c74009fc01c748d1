"""The device's kernels as plain Python loops over C-contiguous float32 arrays, writing in place.

This module imports no numba: `edge_spl.device.kernels` turns every function marked `@kernel`
into a numba JIT kernel (with the flags in `kernel_flags`), or loads the same source compiled
ahead of time (`edge_spl.device.aot`), so a device with the AOT module never loads numba and
LLVM. The kernels call one another by their module-level names; compiling them rebinds those
names to the compiled kernels, so the calls resolve to compiled code. Do not import the
functions from here: take them from `edge_spl.device.kernels`.

Each `@kernel` carries the explicit signature the AOT module is built with; the learner calls
them with exactly these types (an AOT kernel does not check its arguments).
"""
from __future__ import annotations

import math

import numpy as np

KERNELS: dict = {}   # name -> (function, signature or None, fast)


def kernel(signature: str | None = None, fast: bool = False):
    """Mark a function as a kernel. signature: its AOT signature (None: called only by other
    kernels, compiled into them). fast: float32 fast-math (see kernel_flags)."""
    def mark(f):
        KERNELS[f.__name__] = (f, signature, fast)
        return f
    return mark


def kernel_flags(fast: bool) -> dict:
    """numba flags of every kernel. error_model="numpy": a float division by zero gives inf
    instead of raising, so the inner loops carry no per-element ZeroDivisionError branch and
    LLVM vectorises them (the RMS step runs ~3x faster). No kernel divides by zero: every divisor
    is >= 1 or a square root of something >= a positive epsilon.
    fast (the head step only): reassociation, contraction and approximate functions, so LLVM
    vectorises the float32 loops, uses FMAs and turns x / sqrt(y) into x * rsqrt(y) with a
    Newton step (relative error ~1e-7 instead of 0.5 ulp). No nnan/ninf: NaN and inf keep their
    meaning. The head step also keeps the GIL (~10 us a call; releasing and taking it back costs
    ~70 ns of it), as the AOT module's kernels do."""
    flags = {"cache": True, "nogil": not fast, "error_model": "numpy"}
    if fast:
        flags["fastmath"] = {"nsz", "arcp", "contract", "afn", "reassoc"}
    return flags


# A feature's running standard deviation is floored at this fraction of its training one, so a
# feature that stops moving does not divide by ~0. Relative, not absolute: occupancy's
# HumidityRatio has a training variance of 7e-7, which an absolute 1e-6 would more than double.
SD_FLOOR = 0.01

@kernel("void(f4[::1], f4[::1], f4[::1], f4[::1], f4, f4, f4[::1])")
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


@kernel("void(f4[::1], f4[::1], f4[::1], f4[:, ::1], f4[::1], f4, f4[::1])")
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


@kernel("void(f4[::1], f4[::1], f4[::1], f4[:, ::1], f4[::1], f4[:, ::1], f4[::1], f4, f4, f4, f4, f4[::1])")
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


# -- the default learner's head step, fused with latent replay, in float32 --------------------

# float32 constants: a float64 literal would promote the loops to float64
_ONE32 = np.float32(1.0)
_ZERO32 = np.float32(0.0)
_EPS32 = np.float32(RMS_EPS)

# SplitMix64 (Steele, Lea & Flood 2014; Vigna's reference constants): the replay picks' random
# stream. Its state is one 64-bit counter, kept with the learner's saved state, and the n-th
# draw is a pure function of state + n * golden, so a numpy twin can draw the same picks
# vectorised (kernels.replay_picks).
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S27, _S30, _S31, _S32 = np.uint64(27), np.uint64(30), np.uint64(31), np.uint64(32)


@kernel()
def _pick(s, n):
    """The next SplitMix64 draw from state s (uint64), mapped to 0..n-1 by multiply-shift
    (Lemire), which needs n < 2**32. Returns (the new state, the pick)."""
    s = s + _GOLDEN
    z = s
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    z = z ^ (z >> _S31)
    return s, np.int64(((z >> _S32) * np.uint64(n)) >> _S32)


# The head arena: one 64-byte aligned uint8 array that holds everything `_ff_head_step` reads
# and writes besides the sample's own inputs, so a call passes 4 arguments instead of 13 (each
# costs ~60 ns of Python->numba call overhead). `kernels.head_arena` makes it and the learner keeps
# its P, g, vP, vg, replay ring and counters as views into it. It starts with HEAD_SLOTS int64
# slots: the counters (RMS head steps, inputs ever stored, the SplitMix64 state), the ring's
# length, the head's shape (C classes, d inputs), then the byte offset of each part (each 64-byte
# aligned), in HEAD_PARTS order.
HEAD_STEPS, HEAD_STORED, HEAD_RNG, HEAD_RING, HEAD_C, HEAD_D, HEAD_OFFSETS = 0, 1, 2, 3, 4, 5, 6
HEAD_SLOTS = 16
# name, dtype (f4 or i8), shape in terms of C (classes), d (head input), R (ring length).
# X: the ring's R inputs, then (row R) a copy of this sample's, so every step reads its input as
# a row of one array
HEAD_PARTS = (("P", "f4", "C d"), ("vP", "f4", "C d"), ("X", "f4", "R+1 d"), ("g", "f4", "C"), ("vg", "f4", "C"),
              ("counts", "f4", "C"), ("hp", "f4", "4"), ("e", "f4", "C"), ("Y", "i8", "R"))
_P, _VP, _X, _G, _VG, _COUNTS, _HP, _E, _Y = (HEAD_OFFSETS + i for i in range(len(HEAD_PARTS)))
assert HEAD_OFFSETS + len(HEAD_PARTS) <= HEAD_SLOTS


@kernel("void(f4[:, ::1], f4[:, ::1], i8, u1[::1])", fast=True)
def _ff_head_step(H, G, label, A):
    """The default learner's whole head update for one labelled sample, in one call:
      1. the head step on H[0] (the head's input) with routing G[0] (the logits) and `label`;
         counts += 1 on every class row;
      2. latent replay: `replay` more head steps, each on a stored input X[i] with its label
         Y[i], i drawn uniformly (with replacement) from the min(stored, R) stored ones by
         the SplitMix64 stream, routing recomputed from the current P, g; a replayed step adds
         no count (it is not a new sample for the merge weights);
      3. when replay > 0, H[0] and label are stored in the ring X, Y at slot stored % R.
    A is the head arena (HEAD_PARTS): P, g, vP, vg (float32 [C, d], [C]), the ring X, Y
    (float32 [R + 1, d], int64 [R]), counts (float32 [C]), hp (float32 [4]: lr_head, lr_gate,
    rms_decay, replay, a whole number), e (float32 [C] scratch: the next step's errors) and the
    int64 counters (RMS steps taken, inputs ever stored, the random stream's state as int64
    bits), updated in place.

    A head step is label-conditioned FF: every class row moves, target 1 for the label and 0 for
    the others. With decay > 0 it is the rule of `_ff_update_rms`, bias-corrected by
    corr = 1 - decay**n after n steps (decay**n a running product: at most one pow per call);
    with decay = 0 the rule of `_ff_update`. float32 arithmetic; the second moment is written
    v + (1 - decay) (gr**2 - v), the same 4 FLOPs as decay v + (1 - decay) gr**2 with one vector
    instruction fewer (two of them fuse into FMAs). While a row is updated, the routing of the
    next step's input on the updated row is accumulated (so a step needs no pass of its own over
    P), and turned into that row's error for the next step at once.

    The steps make no array views and call no function that takes arrays: each array passed or
    viewed costs an atomic reference count, which waits for the stores before it to drain
    (~0.1 us a step, when the step was a function of 14 arguments)."""
    # A view or a reshape costs ~25 ns per call: the small parts are slices of two views of
    # the arena. P, vP and X are 2-d views of their own (the row loop vectorises behind one
    # runtime overlap check; as flat slices of one view it does not vectorise at all)
    F = A.view(np.float32)
    st = A.view(np.int64)
    C = st[HEAD_C]
    d = st[HEAD_D]
    R = st[HEAD_RING]
    if H.shape[1] != d or G.shape[1] != C:   # the arena is raw memory: never index past it
        raise ValueError("H or G does not fit the head arena")
    P = F[st[_P] // 4:st[_P] // 4 + C * d].reshape((C, d))
    vP = F[st[_VP] // 4:st[_VP] // 4 + C * d].reshape((C, d))
    X = F[st[_X] // 4:st[_X] // 4 + (R + 1) * d].reshape((R + 1, d))
    g = F[st[_G] // 4:st[_G] // 4 + C]
    vg = F[st[_VG] // 4:st[_VG] // 4 + C]
    counts = F[st[_COUNTS] // 4:st[_COUNTS] // 4 + C]
    hp = F[st[_HP] // 4:st[_HP] // 4 + 4]
    e = F[st[_E] // 4:st[_E] // 4 + C]
    Y = st[st[_Y] // 8:st[_Y] // 8 + R]
    lr, lr_gate, decay = hp[0], hp[1], hp[2]
    replay = np.int64(hp[3])
    inv_sqrt = np.float32(1.0 / math.sqrt(d))
    keep = _ONE32 - decay
    for k in range(d):   # this sample's input as row R of X
        X[R, k] = H[0, k]
    steps = st[HEAD_STEPS]
    power = 0.0
    # decay**steps, the bias correction's: once it is below 2**-54, 1 - it is 1.0 in float64 and
    # corr is exactly 1, so the pow (~0.1 us) is skipped (the same bits: e**-42 < 2**-60)
    if decay > 0 and steps * math.log(decay) > -42.0:
        power = float(decay) ** steps
    n = min(st[HEAD_STORED], R) if replay > 0 else 0
    todo = replay if n > 0 else 0
    s = np.uint64(st[HEAD_RNG])
    for j in range(C):   # the first step's errors, from the logits
        e[j] = _ONE32 / (_ONE32 + math.exp(-G[0, j])) - (_ONE32 if j == label else _ZERO32)
    # The next step's input is drawn before each step, so that the step accumulates its routing
    # on each row as it updates it and turns it into that row's error for the next step at once
    # (the exp overlaps the next row's update)
    x = R   # the row of X of this step's input (nx: the next step's)
    for r in range(todo + 1):
        nx, ny = R, -1   # the last step: no next step
        if r < todo:
            s, nx = _pick(s, n)
            ny = Y[nx]
        if decay > 0:
            power *= decay
            inv_corr = np.float32(1.0 / (1.0 - power))
            for j in range(C):
                ej = e[j]
                c = ej * inv_sqrt
                acc = _ZERO32
                for k in range(d):
                    gr = c * X[x, k]
                    w = vP[j, k]
                    v = w + keep * (gr * gr - w)
                    vP[j, k] = v
                    p = P[j, k] - lr * gr / math.sqrt(v * inv_corr + _EPS32)
                    P[j, k] = p
                    acc += X[nx, k] * p
                v = decay * vg[j] + keep * ej * ej
                vg[j] = v
                g[j] += lr_gate * ej / math.sqrt(v * inv_corr + _EPS32)
                if ny >= 0:
                    Gj = acc * inv_sqrt - g[j]
                    e[j] = _ONE32 / (_ONE32 + math.exp(-Gj)) - (_ONE32 if j == ny else _ZERO32)
            steps += 1
        else:
            for j in range(C):
                c = lr * e[j] * inv_sqrt
                acc = _ZERO32
                for k in range(d):
                    p = P[j, k] - c * X[x, k]
                    P[j, k] = p
                    acc += X[nx, k] * p
                g[j] += lr * e[j]
                if ny >= 0:
                    Gj = acc * inv_sqrt - g[j]
                    e[j] = _ONE32 / (_ONE32 + math.exp(-Gj)) - (_ONE32 if j == ny else _ZERO32)
        x = nx
    for j in range(C):
        counts[j] += 1.0
    if todo > 0:
        st[HEAD_RNG] = np.int64(s)
    if replay > 0:
        slot = st[HEAD_STORED] % R
        for k in range(d):   # a loop, not a slice assignment: that costs ~1 s of compile
            X[slot, k] = X[R, k]
        Y[slot] = label
        st[HEAD_STORED] += 1
    st[HEAD_STEPS] = steps


@kernel("i8(f4[::1], i8, i8[::1], f4[::1])")
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


@kernel("void(f4[::1], f4[::1], f4[::1], f4[::1], i8[::1], i8, f4[:, ::1], f4[::1], f4, f4[::1])")
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


@kernel("i8(f4[:, ::1], f4[:, ::1], i8, f4[:, ::1], f4[::1], f4, f4[::1], i8[::1], f4[::1])")
def _ff_hidden_step(h, G, k, P, g, lr, counts, rows, work):
    """Unsupervised FF of one hidden layer on one sample: h, G [2, ...] hold the positive input
    (row 0) and the negative (row 1) and their routing. The k units most strongly routed for the
    positive are pushed on for it and off for the negative. Returns k, or -1 (nothing done) when
    the top k is not unique (see _top_rows)."""
    n = _top_rows(G[0], k, rows, work)
    if n > 0:
        _ff_update_pair(h[0], G[0], h[1], G[1], rows, n, P, g, lr, counts)
    return n


@kernel()
def _batch_grad(H, G, T, j, scale, inv_sqrt, acc):
    """Unit j's FF gradient summed over a mini-batch, for the two batch kernels: acc (float64)
    gets sum_s c_sj H[s] with e_sj = scale * (sigmoid(G[s, j]) - T[s, j]), c = e / sqrt(d_in),
    over the samples with T[s, j] >= 0. Returns (their number, sum_s e_sj)."""
    n = 0
    esum = 0.0
    for s in range(H.shape[0]):
        t = T[s, j]
        if t < 0.0:
            continue
        e = scale * (1.0 / (1.0 + math.exp(-G[s, j])) - t)
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
    return n, esum


@kernel("void(f4[:, ::1], f4[:, ::1], f4[:, ::1], f4[:, ::1], f4[::1], f4, f4[::1])")
def _ff_update_batch(H, G, T, P, g, lr, counts):
    """Mini-batch FF step: the FF gradients of B samples (rows of H, G, T, routing from one
    forward pass) summed, then one step. Per unit j: P[j] -= sum_s c_sj H[s] with c as in
    _ff_update, accumulated in float64 and rounded once; g[j] += sum_s e_sj; counts[j] += the
    samples with T[s, j] >= 0. Equal to B calls of _ff_update up to float rounding."""
    inv_sqrt = 1.0 / math.sqrt(P.shape[1])
    acc = np.empty(P.shape[1], np.float64)
    for j in range(P.shape[0]):
        n, esum = _batch_grad(H, G, T, j, lr, inv_sqrt, acc)
        if n == 0:
            continue
        Pj = P[j]
        for k in range(acc.shape[0]):
            Pj[k] -= acc[k]
        g[j] += esum
        counts[j] += n


@kernel("void(f4[:, ::1], f4[:, ::1], f4[:, ::1], f4[:, ::1], f4[::1], f4[:, ::1], f4[::1], f4, f4, f4, f4, f4[::1])")
def _ff_update_rms_batch(H, G, T, P, g, vP, vg, lr, lr_gate, decay, corr, counts):
    """Mini-batch RMS-scaled FF step: the FF gradients of B samples summed (float64), then one
    step of the _ff_update_rms rule with that gradient."""
    inv_sqrt = 1.0 / math.sqrt(P.shape[1])
    keep = 1.0 - decay
    acc = np.empty(P.shape[1], np.float64)
    for j in range(P.shape[0]):
        n, esum = _batch_grad(H, G, T, j, 1.0, inv_sqrt, acc)
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


def compile_jit() -> None:
    """Rebind every kernel's name in this module to its numba JIT kernel (once; imports numba)."""
    from numba import njit
    from numba.core.registry import CPUDispatcher
    for name, (f, _, fast) in KERNELS.items():
        if not isinstance(globals()[name], CPUDispatcher):
            globals()[name] = njit(**kernel_flags(fast))(f)
