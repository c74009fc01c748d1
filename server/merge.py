"""The merge rule: pure functions over arrays and counts, no I/O.

A delta from a device says "starting from version b, I moved P[rows] by dP and g[rows] by dg,
learning from `counts` samples per row". The server applies deltas as differences onto its
current version (that is the rebase): every touched row moves by the weighted mean of its deltas'
steps, each weighted by its sample count times its staleness weight, and the mean is scaled by
the freshest weight among them:

    new_row = cur_row + max_d s_d * sum_d c_d s_d dP_d / sum_d c_d s_d

with s_d = staleness(current_version - b_d): 1 for a lag up to STALE_LAG versions, STALE_LAG / lag
beyond. So a stale delta counts less against fresher ones on the same row (and, beside a fresh
one that agrees with it, does not shrink it), a row only stale deltas touch moves by s of their
mean (its learning may already be in the versions it missed), and nothing blocks on a stale delta.

The per-row sums (sum c s, sum c s dP, sum c s dg) add and the per-row max s is a max, so deltas
can be accumulated in any order and grouping, and partial results of several replicas combine to
the same one.
"""
from __future__ import annotations

import numpy as np

from edge_spl.protocol import LayerDelta, PrototypeDelta

STALE_LAG = 8
# A per-row step this large is not learning, it is a bug or an attack: the delta is refused.
DEFAULT_MAX_ROW_NORM = 1e3
# Below that, what one delta can do is bounded instead: each row's step ||[dP, dg]|| is scaled
# down to CLIP_NORM and its sample count capped at MAX_COUNT. The device learner's rows move
# by at most ~55 in a delta of 100 samples (gas drift and occupancy, every label: p99 35 and 54).
DEFAULT_CLIP_NORM = 100.0
DEFAULT_MAX_COUNT = 10_000.0
MERGE_RULES = ("mean", "trimmed", "median")
TRIM = 0.2    # the trimmed mean drops this fraction of the values at each end


def clip_delta(delta: PrototypeDelta, clip_norm: float = DEFAULT_CLIP_NORM,
               max_count: float = DEFAULT_MAX_COUNT) -> tuple[PrototypeDelta, int]:
    """The delta with every row's step scaled to a norm of at most `clip_norm` and every count
    capped at `max_count` (a validated delta; the input is untouched), and how many rows were
    clipped or capped."""
    layers, n = [], 0
    for L in delta.layers:
        dP = np.asarray(L.dP, np.float64)
        dg = np.asarray(L.dg, np.float64)
        norm = np.sqrt(np.einsum("ij,ij->i", dP, dP) + dg * dg)
        scale = np.minimum(1.0, clip_norm / np.maximum(norm, 1e-300))
        counts = np.minimum(np.asarray(L.counts, np.float32), np.float32(max_count))
        n += int(np.sum((scale < 1.0) | (counts < L.counts)))
        layers.append(LayerDelta(L.rows, (dP * scale[:, None]).astype(np.float32),
                                 (dg * scale).astype(np.float32), counts))
    return PrototypeDelta(delta.device, delta.seq, delta.base_version, layers, delta.model_sha256), n


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
    if not any(np.any(L.dP) or np.any(L.dg) for L in delta.layers):
        return "no change"   # the same, with rows that did not move
    return None


class MergeSums:
    """Per-layer, per-row partial sums of a merge round. Adding deltas or other MergeSums is
    commutative and associative (up to float rounding, kept small by float64)."""

    def __init__(self, shapes: list[tuple[int, int]]):
        self.shapes = [tuple(s) for s in shapes]
        self.sum_w = [np.zeros(o, np.float64) for o, _ in self.shapes]       # sum c s
        self.sum_wdP = [np.zeros((o, i), np.float64) for o, i in self.shapes]
        self.sum_wdg = [np.zeros(o, np.float64) for o, _ in self.shapes]
        self.max_s = [np.zeros(o, np.float64) for o, _ in self.shapes]
        self.n_deltas = 0

    def add_delta(self, delta: PrototypeDelta, current_version: int) -> "MergeSums":
        """Accumulate one validated delta (see validate_delta) as of `current_version`."""
        s = staleness(current_version - delta.base_version)
        for i, L in enumerate(delta.layers):
            rows = np.asarray(L.rows, np.int64)
            w = np.asarray(L.counts, np.float64) * s
            # rows are unique within a layer, so fancy-indexed += adds each row once
            self.sum_w[i][rows] += w
            self.sum_wdP[i][rows] += w[:, None] * np.asarray(L.dP, np.float64)
            self.sum_wdg[i][rows] += w * np.asarray(L.dg, np.float64)
            self.max_s[i][rows] = np.maximum(self.max_s[i][rows], s)
        self.n_deltas += 1
        return self

    def add(self, other: "MergeSums") -> "MergeSums":
        """Fold another partial sum (another group of deltas, another replica) into this one."""
        if other.shapes != self.shapes:
            raise ValueError(f"cannot add sums of shapes {other.shapes} to {self.shapes}")
        for i in range(len(self.shapes)):
            self.sum_w[i] += other.sum_w[i]
            self.sum_wdP[i] += other.sum_wdP[i]
            self.sum_wdg[i] += other.sum_wdg[i]
            np.maximum(self.max_s[i], other.max_s[i], out=self.max_s[i])
        self.n_deltas += other.n_deltas
        return self



def touched_rows(deltas: list[PrototypeDelta]) -> int:
    """How many distinct (layer, row) the deltas move."""
    return len({(i, r) for d in deltas for i, L in enumerate(d.layers) for r in np.asarray(L.rows).tolist()})


def apply(protos, sums: MergeSums) -> list[tuple[np.ndarray, np.ndarray]]:
    """New prototype arrays (float32; the inputs are untouched): every touched row moves by the
    weighted mean of its deltas' steps, scaled by the freshest staleness weight among them (see
    the module docstring)."""
    if layer_shapes(protos) != sums.shapes:
        raise ValueError(f"prototype shapes {layer_shapes(protos)} differ from the sums' {sums.shapes}")
    out = []
    for (P, g), w, wdP, wdg, top in zip(protos, sums.sum_w, sums.sum_wdP, sums.sum_wdg, sums.max_s):
        P2 = np.array(P, np.float32, copy=True, order="C")
        g2 = np.array(g, np.float32, copy=True, order="C")
        t = np.flatnonzero(w > 0)
        if len(t):
            k = top[t] / w[t]
            P2[t] = (P2[t].astype(np.float64) + wdP[t] * k[:, None]).astype(np.float32)
            g2[t] = (g2[t].astype(np.float64) + wdg[t] * k).astype(np.float32)
        out.append((P2, g2))
    return out


def robust_apply(protos, deltas: list[tuple[PrototypeDelta, int]], rule: str):
    """New prototype arrays from one round's deltas, each (delta, current_version), by a robust
    rule: every touched row moves by the coordinate-wise median (`median`) or 20%-trimmed mean
    (`trimmed`) of the staleness-weighted steps of the deltas touching it -- one vote per delta,
    whatever counts it claims, so a few devices cannot drag a row far. Unlike the mean it is not a
    sum: it needs the round's deltas together (one server process), and a row touched by one or
    two deltas moves as the mean would (clip_delta still bounds it)."""
    if rule not in ("median", "trimmed"):
        raise ValueError(f"merge rule {rule!r}: expected median or trimmed")
    out = []
    for i, (P, g) in enumerate(protos):
        steps: dict[int, list[np.ndarray]] = {}
        for d, current in deltas:
            s = staleness(current - d.base_version)
            L = d.layers[i]
            for r, dP, dg in zip(np.asarray(L.rows).tolist(), L.dP, L.dg):
                steps.setdefault(r, []).append(s * np.append(np.asarray(dP, np.float64), float(dg)))
        P2 = np.array(P, np.float32, copy=True, order="C")
        g2 = np.array(g, np.float32, copy=True, order="C")
        for r, vs in steps.items():
            V = np.sort(np.stack(vs), axis=0)
            if rule == "median":
                step = np.median(V, axis=0)
            else:
                k = int(TRIM * len(V))
                step = V[k:len(V) - k].mean(axis=0)
            P2[r] = (P2[r].astype(np.float64) + step[:-1]).astype(np.float32)
            g2[r] = np.float32(float(g2[r]) + step[-1])
        out.append((P2, g2))
    return out
