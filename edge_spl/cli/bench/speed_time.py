"""Timing for `edge-spl bench speed`: alternatives interleaved round by round, medians over
rounds; and this machine's 1-core roofline (peak fp32 GEMM FLOP/s, cache bandwidth by working-set
size), measured in the same run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Callable

import numpy as np
from numba import njit

BLOCK_S = 0.03          # one timed block of calls lasts about this long (--quick: a tenth)


def calibrate(fn: Callable[[], object], block_s: float) -> int:
    """Calls per timed block, so a block lasts about `block_s` (after a warm-up)."""
    for _ in range(3):
        fn()
    n, t = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
        if t >= block_s / 4 or n >= 1 << 20:
            return max(1, int(n * block_s / max(t, 1e-9)))
        n *= 4


def per_call(alts: dict[str, Callable[[], object]], rounds: int, block_s: float = BLOCK_S) -> dict[str, float]:
    """Median over rounds of each alternative's mean seconds per call; every round runs every
    alternative once (in turn), so a slow phase of the machine hits all of them alike."""
    counts = {k: calibrate(f, block_s) for k, f in alts.items()}
    times: dict[str, list[float]] = {k: [] for k in alts}
    for _ in range(rounds):
        for k, f in alts.items():
            n = counts[k]
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            times[k].append((time.perf_counter() - t0) / n)
    return {k: float(np.median(v)) for k, v in times.items()}


def latencies(alts: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, dict]:
    """p50/p99 of single calls (microseconds), `calls` per alternative per round, interleaved."""
    for f in alts.values():
        for _ in range(min(50, calls)):
            f()
    samples: dict[str, list[int]] = {k: [] for k in alts}
    clock = time.perf_counter_ns
    for _ in range(rounds):
        for k, f in alts.items():
            out = samples[k]
            for _ in range(calls):
                t0 = clock()
                f()
                out.append(clock() - t0)
    return {k: {"p50_us": float(np.percentile(v, 50)) / 1e3, "p99_us": float(np.percentile(v, 99)) / 1e3}
            for k, v in samples.items()}


# -- the roofline ---------------------------------------------------------------------------------

_GEMM_CHILD = r"""
import json, os, sys, time
n, reps = int(sys.argv[1]), int(sys.argv[2])
out = {}
import numpy as np
a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
c = np.empty((n, n), np.float32)
np.matmul(a, b, out=c)
best = min((lambda t0: (np.matmul(a, b, out=c), time.perf_counter() - t0)[1])(time.perf_counter())
           for _ in range(reps))
out["numpy"] = 2 * n ** 3 / best
try:
    import ctypes, glob
    for lib in glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "*openblas*")):
        h = ctypes.CDLL(lib)
        for name in ("scipy_openblas_get_config64_", "openblas_get_config64_", "openblas_get_config"):
            if hasattr(h, name):
                f = getattr(h, name)
                f.restype = ctypes.c_char_p
                out["numpy_blas"] = f().decode()
                break
        for name in ("scipy_openblas_get_corename64_", "openblas_get_corename64_", "openblas_get_corename"):
            if hasattr(h, name):
                f = getattr(h, name)
                f.restype = ctypes.c_char_p
                out["numpy_blas_core"] = f().decode()
                break
except Exception as e:
    out["numpy_blas"] = f"unknown ({e})"
try:
    import torch
    torch.set_num_threads(1)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    tc = torch.empty((n, n))
    torch.mm(ta, tb, out=tc)
    best = min((lambda t0: (torch.mm(ta, tb, out=tc), time.perf_counter() - t0)[1])(time.perf_counter())
               for _ in range(reps))
    out["torch"] = 2 * n ** 3 / best
except ImportError:
    pass
print(json.dumps(out))
"""


def peak_gemm_flops(n: int = 1024, reps: int = 5) -> dict:
    """Peak fp32 FLOP/s of one core: the best of numpy (OpenBLAS) and torch sgemm, n x n, one
    thread, in a child process where OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are unset (they pin
    an older, slower kernel on some machines; see the env README) and every pool has 1 thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _GEMM_CHILD, str(n), str(reps)], env=env,
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"GEMM peak child failed: {r.stderr.strip()[-500:]}")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    best = max((k for k in ("numpy", "torch") if k in got), key=lambda k: got[k])
    got["peak_flops"] = got[best]
    got["peak_from"] = best
    got["n"] = n
    return got


@njit(cache=True, fastmath=True, nogil=True)
def _rmw(y, a, b, reps):
    """Read-modify-write stream over y, reps times: the access pattern of an FF row update."""
    for _ in range(reps):
        for i in range(y.shape[0]):
            y[i] = y[i] * a + b


def bandwidth(nbytes: int, min_s: float = 0.02) -> float:
    """Best read+write bytes/s of one core streaming over a float32 working set of `nbytes`
    (it lives in L1, L2, L3 or DRAM by its size); 8 bytes moved per element and pass."""
    n = max(16, nbytes // 4)
    y = np.ones(n, np.float32)
    a, b = np.float32(0.999), np.float32(0.001)
    _rmw(y, a, b, 1)
    reps = 1
    while True:
        t0 = time.perf_counter()
        _rmw(y, a, b, reps)
        t = time.perf_counter() - t0
        if t >= min_s / 5:
            break
        reps *= 4
    best = min(_timed(_rmw, y, a, b, reps) for _ in range(5))
    return 8.0 * n * reps / best


def _timed(f, *args) -> float:
    t0 = time.perf_counter()
    f(*args)
    return time.perf_counter() - t0


class Roofline:
    """t_min = max(flops / peak_flops, bytes / bandwidth(working set)); bandwidths are measured
    once per working-set size and kept."""

    def __init__(self, peak: dict, min_s: float = 0.02):
        self.peak = peak
        self.peak_flops = float(peak["peak_flops"])
        self.min_s = min_s
        self.bw: dict[int, float] = {}

    def bandwidth(self, ws_bytes: int) -> float:
        # round to a power of two so nearby sizes share one measurement
        key = 1 << max(12, int(ws_bytes - 1).bit_length())
        if key not in self.bw:
            self.bw[key] = bandwidth(key, self.min_s)
        return self.bw[key]

    def t_min(self, flops: float, nbytes: float, ws_bytes: int) -> float:
        return max(flops / self.peak_flops, nbytes / self.bandwidth(ws_bytes))

    def table(self) -> dict:
        return {"peak_fp32_gflops": self.peak_flops / 1e9, "peak_from": self.peak.get("peak_from"),
                "gemm": {k: v for k, v in self.peak.items() if k not in ("peak_flops",)},
                "bandwidth_gbs_by_working_set": {str(k): v / 1e9 for k, v in sorted(self.bw.items())}}
