"""The merge rule: pure functions over arrays and counts, no I/O.

A delta from a device says "starting from version b, I moved P[rows] by dP and g[rows] by dg,
learning from `counts` samples per row". The server applies deltas as differences onto its
current version (that is the rebase) and averages them per row, weighted by sample counts:

    new_row = cur_row + sum_d c_d * s_d * dP_d / sum_d c_d

where s_d = staleness(current_version - b_d) is 1 for a lag up to STALE_LAG versions and
STALE_LAG / lag beyond. Only the numerator is down-weighted, so a stale delta moves its rows less
but still counts as evidence, and it never blocks fresher deltas.

The per-row sums (sum c, sum c*s*dP, sum c*s*dg) just add, so deltas can be accumulated in any
order and grouping, and partial sums from several replicas add up to the same result.
"""
from __future__ import annotations

import numpy as np

from edge_spl.protocol import PrototypeDelta

STALE_LAG = 8
# A per-row step this large is not learning, it is a bug or an attack; real FF steps are ~1e-2.
DEFAULT_MAX_ROW_NORM = 1e3


def staleness(lag: int) -> float:
    """Weight of a delta made `lag` versions ago: 1 up to STALE_LAG, then STALE_LAG / lag."""
    return 1.0 if lag <= STALE_LAG else STALE_LAG / lag


def layer_shapes(protos) -> list[tuple[int, int]]:
    """(d_out, d_in) of every layer of a prototype list [(P, g), ...]."""
    return [tuple(P.shape) for P, _ in protos]


def validate_delta(delta: PrototypeDelta, shapes: list[tuple[int, int]], current_version: int,
                   max_row_norm: float = DEFAULT_MAX_ROW_NORM) -> str | None:
    """None when the delta fits a model of these (d_out, d_in) layer shapes at this version, else
    a short reason (it is also the name the server counts rejections under)."""
    if delta.seq < 1:
        return "seq out of range"
    if len(delta.layers) != len(shapes):
        return "layer count"
    if delta.base_version > current_version:
        return "future base version"
    if delta.base_version < 0:
        return "negative base version"
    for L, (d_out, d_in) in zip(delta.layers, shapes):
        rows, dP, dg, counts = (np.asarray(a) for a in (L.rows, L.dP, L.dg, L.counts))
        k = rows.shape[0] if rows.ndim == 1 else -1
        if k < 0 or dP.ndim != 2 or dg.shape != (k,) or counts.shape != (k,) or dP.shape[0] != k:
            return "shape mismatch"
        if dP.shape[1] != d_in:
            return "d_in mismatch"
        if k == 0:
            continue
        if rows.min() < 0 or rows.max() >= d_out:
            return "rows out of range"
        if len(np.unique(rows)) != k:
            return "repeated rows"
        if not (np.isfinite(dP).all() and np.isfinite(dg).all() and np.isfinite(counts).all()):
            return "non-finite"
        if (counts <= 0).any():
            return "bad counts"
        if (np.linalg.norm(dP.astype(np.float64), axis=1) > max_row_norm).any() \
                or (np.abs(dg) > max_row_norm).any():
            return "norm too large"
    if not any(len(L.rows) for L in delta.layers):
        # a device sends a delta only when it learned something; an empty one would still cost a
        # stored version, and a flood of them a version per round
        return "empty"
    return None


class MergeSums:
    """Per-layer, per-row partial sums of a merge round. Adding deltas or other MergeSums is
    commutative and associative (up to float rounding, kept small by float64)."""

    def __init__(self, shapes: list[tuple[int, int]]):
        self.shapes = [tuple(s) for s in shapes]
        self.sum_c = [np.zeros(o, np.float64) for o, _ in self.shapes]
        self.sum_cdP = [np.zeros((o, i), np.float64) for o, i in self.shapes]
        self.sum_cdg = [np.zeros(o, np.float64) for o, _ in self.shapes]
        self.n_deltas = 0

    def add_delta(self, delta: PrototypeDelta, current_version: int) -> "MergeSums":
        """Accumulate one validated delta (see validate_delta) as of `current_version`."""
        s = staleness(current_version - delta.base_version)
        for i, L in enumerate(delta.layers):
            rows = np.asarray(L.rows, np.int64)
            c = np.asarray(L.counts, np.float64)
            # rows are unique within a layer, so fancy-indexed += adds each row once
            self.sum_c[i][rows] += c
            self.sum_cdP[i][rows] += (c * s)[:, None] * np.asarray(L.dP, np.float64)
            self.sum_cdg[i][rows] += c * s * np.asarray(L.dg, np.float64)
        self.n_deltas += 1
        return self

    def add(self, other: "MergeSums") -> "MergeSums":
        """Fold another partial sum (another group of deltas, another replica) into this one."""
        if other.shapes != self.shapes:
            raise ValueError(f"cannot add sums of shapes {other.shapes} to {self.shapes}")
        for i in range(len(self.shapes)):
            self.sum_c[i] += other.sum_c[i]
            self.sum_cdP[i] += other.sum_cdP[i]
            self.sum_cdg[i] += other.sum_cdg[i]
        self.n_deltas += other.n_deltas
        return self

    def touched_rows(self) -> int:
        return int(sum((c > 0).sum() for c in self.sum_c))


def apply(protos, sums: MergeSums) -> list[tuple[np.ndarray, np.ndarray]]:
    """New prototype arrays (float32; the inputs are untouched): every touched row moves by the
    count-weighted mean of its deltas."""
    if layer_shapes(protos) != sums.shapes:
        raise ValueError(f"prototype shapes {layer_shapes(protos)} differ from the sums' {sums.shapes}")
    out = []
    for (P, g), c, cdP, cdg in zip(protos, sums.sum_c, sums.sum_cdP, sums.sum_cdg):
        P2 = np.array(P, np.float32, copy=True, order="C")
        g2 = np.array(g, np.float32, copy=True, order="C")
        t = np.flatnonzero(c > 0)
        if len(t):
            P2[t] = (P2[t].astype(np.float64) + cdP[t] / c[t, None]).astype(np.float32)
            g2[t] = (g2[t].astype(np.float64) + cdg[t] / c[t]).astype(np.float32)
        out.append((P2, g2))
    return out
