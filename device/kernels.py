"""The device's kernels, and validating wrappers of them for tests and one-off use.

The kernels themselves (plain loops over C-contiguous float32 arrays, writing in place) are in
`kernel_code`. This module binds them from one of two builds of that same source:
  - aot: the extension module `edge_spl.device.aot` compiled ahead of time for this kernel
    source, Python, numpy and machine, when there is one in the kernel folder: numba and LLVM are
    then never imported (they take ~110 MB of RSS at run time; docs/bench-speed.md);
  - jit: numba's JIT with its on-disk cache, otherwise.
EDGE_SPL_KERNELS=jit or =aot forces one (aot raises when the module is missing or stale).

The private kernels are called by `edge_spl.device.learner.FFLearner`, which owns the arrays,
checks their shapes and dtypes once, and calls them per sample with exactly the types of their
signatures: an AOT kernel does not check its arguments. Every kernel has a numpy twin in
tests/test_device_kernels.py.
"""
from __future__ import annotations

import os

import numpy as np

from . import kernel_code as _code
from .kernel_code import _GOLDEN, _MIX1, _MIX2, RMS_EPS, SD_FLOOR  # noqa: F401  (re-exported)
from .kernel_code import HEAD_C, HEAD_D, HEAD_OFFSETS, HEAD_PARTS, HEAD_RING, HEAD_SLOTS

__all__ = ["BACKEND", "RMS_EPS", "SD_FLOOR", "check_f32", "ema_standardize", "ff_update", "ff_update_batch",
           "ff_update_rms", "ff_update_rms_batch", "head_arena", "replay_picks", "var_floor"]


def _bind():
    want = os.environ.get("EDGE_SPL_KERNELS", "auto")
    if want not in ("auto", "aot", "jit"):
        raise ValueError(f"EDGE_SPL_KERNELS={want!r}: expected auto, aot or jit")
    if want != "jit":
        from . import aot
        mod = aot.load(required=want == "aot")
        if mod is not None:
            return mod, "aot"
    _code.compile_jit()
    return _code, "jit"


_impl, BACKEND = _bind()
_ema_standardize = _impl._ema_standardize
_ff_update = _impl._ff_update
_ff_update_rms = _impl._ff_update_rms
_ff_head_step = _impl._ff_head_step
_top_rows = _impl._top_rows
_ff_update_pair = _impl._ff_update_pair
_ff_hidden_step = _impl._ff_hidden_step
_ff_update_batch = _impl._ff_update_batch
_ff_update_rms_batch = _impl._ff_update_rms_batch


def head_arena(C: int, d: int, R: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A zeroed head arena for `_ff_head_step` (kernel_code.HEAD_PARTS): a C x d head and a replay
    ring of R inputs. Returns (arena, views): the uint8 arena, 64-byte aligned, and a C-contiguous
    view of every part by name, plus "U", the ring (X[:R]), and "st", the int64 counters (RMS head
    steps, inputs ever stored, the replay stream's state)."""
    dims = {"C": C, "d": d, "R": R, "R+1": R + 1, "4": 4}
    layout, off = [], 8 * HEAD_SLOTS
    for name, dtype, shape in HEAD_PARTS:
        shape = tuple(dims[k] for k in shape.split())
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        layout.append((name, dtype, shape, off, nbytes))
        off += -(-nbytes // 64) * 64
    raw = np.zeros(off + 64, np.uint8)
    start = -raw.ctypes.data % 64
    arena = raw[start:start + off]
    slots = arena[:8 * HEAD_SLOTS].view(np.int64)
    slots[HEAD_RING], slots[HEAD_C], slots[HEAD_D] = R, C, d
    views = {"st": slots[:HEAD_RING]}
    for i, (name, dtype, shape, o, nbytes) in enumerate(layout):
        slots[HEAD_OFFSETS + i] = o
        views[name] = arena[o:o + nbytes].view(dtype).reshape(shape)
    views["U"] = views["X"][:R]
    return arena, views


def replay_picks(state: int, n: int, count: int) -> tuple[int, np.ndarray]:
    """The replay picks of `_ff_head_step` in plain numpy: `count` draws in 0..n-1 from the
    SplitMix64 stream at `state` (an unsigned 64-bit int). Returns (the new state, the picks)."""
    if not 0 < n < 1 << 32:
        raise ValueError(f"n = {n}: expected 1..2**32 - 1 stored inputs")
    s = (np.uint64(state) + _GOLDEN * np.arange(1, count + 1, dtype=np.uint64))   # wraps mod 2**64
    z = (s ^ (s >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z ^= z >> np.uint64(31)
    picks = (((z >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32)).astype(np.int64)
    return (int(state) + count * int(_GOLDEN)) % (1 << 64), picks


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
