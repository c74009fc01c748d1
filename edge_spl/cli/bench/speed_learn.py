"""The learn step of `edge-spl bench speed`: the device learner's update work for one sample (or a
mini-batch), from inference outputs that are already there, in edge-spl's numba kernels, in plain
numpy and in PyTorch (CPU, 1 thread), with its FLOPs and bytes for the roofline.

Variants (docs/bench-speed.md):
  head    what FFLearner does by default: the label-conditioned, RMS-scaled FF step of the head's
          prototypes and gates (all C rows move: the true class towards, the others away);
  hidden  --lr-hidden > 0: the unsupervised FF of every hidden layer (top 25% units of the
          positive input: target 1 for it, target 0 for the hybrid negative) and then the head.
Batch 1 is FFLearner._learn itself, with the learner's defaults: after the head step on a labelled
sample it replays `replay` head steps on stored recent labelled samples (latent replay). Batch B is
a mini-batch step: the FF gradients of B samples whose routing came from one batched inference,
summed, then one step of the same rule (no replay: a mini-batch already averages B samples).
"""
from __future__ import annotations

import inspect
import math

import numpy as np

from edge_spl.device.kernels import RMS_EPS, _ff_update_batch, _ff_update_rms_batch, replay_picks
from edge_spl.device.learner import FFLearner
from edge_spl.export.onnx_export import export_model
from edge_spl.model import init_model
from edge_spl.spl import layer_dims

# the device learner's defaults, with a hidden step size for the hidden variant
_DEFAULTS = {k: p.default for k, p in inspect.signature(FFLearner).parameters.items()
             if p.default is not inspect.Parameter.empty}
HP = {k: _DEFAULTS[k] for k in ("lr_head", "lr_gate", "rms_decay", "hidden_frac", "replay", "replay_size")}
HP["lr_hidden"] = 0.01
POOL = 64   # distinct samples (or mini-batches) the timed steps cycle through


def make_model(sizes, seed: int = 0):
    """A randomly initialised model of these sizes, exported in memory (speed does not depend on
    what the prototypes learned)."""
    d = sizes[0]
    state = as_trained(init_model(list(sizes), np.zeros(d), np.ones(d), [f"c{i}" for i in range(sizes[-1])],
                                  [f"f{i}" for i in range(d)], seed=seed, model_id="bench"), seed)
    exported = export_model(state)
    exported.manifest.onnx_sha256 = "b" * 64   # what ExportedModel.save would fill in
    return state, exported


def as_trained(state, seed: int = 0):
    """`state` with its head whitened on random inputs and labels, as `edge-spl train` leaves a
    model: the ONNX graph then has the whitening's matmul (what it costs is timed; its values do
    not matter)."""
    if len(state.layers) < 2:
        return state
    rng = np.random.default_rng(seed)
    n = 2 * state.layers[-1]["P"].shape[1]
    return state.with_whitened_head(rng.standard_normal((n, state.sizes[0])).astype(np.float32),
                                    rng.integers(0, state.sizes[-1], n))


def learner_for(exported, hidden: bool, replay: int | None = None) -> FFLearner:
    kw = dict(HP)
    if not hidden:
        kw["lr_hidden"] = 0.0
    if replay is not None:
        kw["replay"] = replay
    return FFLearner(exported, **kw)


def _copy_outs(outs: dict) -> dict:
    return {k: v.copy() for k, v in outs.items()}


def sample_pool(learner: FFLearner, batch: int, hidden: bool, seed: int = 0) -> list[dict]:
    """POOL precomputed inputs of the learn step, from the device's own onnxruntime session:
    batch 1: {"outs", "z" [1 or 2 rows], "label"}; batch B: {"pos", "neg", "z", "zn", "labels"}."""
    rng = np.random.default_rng(seed)
    d, C = learner.sizes[0], learner.sizes[-1]
    pool = []
    for _ in range(POOL):
        if batch == 1:
            z = np.clip(rng.standard_normal((2 if hidden else 1, d)), -10, 10).astype(np.float32)
            pool.append({"outs": _copy_outs(learner.onnx.run(z, learner.protos_)), "z": z,
                         "label": int(rng.integers(C))})
        else:
            z = np.clip(rng.standard_normal((batch, d)), -10, 10).astype(np.float32)
            zn = np.clip(rng.standard_normal((batch, d)), -10, 10).astype(np.float32)
            item = {"pos": _copy_outs(learner.onnx.run(z, learner.protos_)), "z": z, "zn": zn,
                    "labels": rng.integers(C, size=batch)}
            if hidden:
                item["neg"] = _copy_outs(learner.onnx.run(zn, learner.protos_))
            pool.append(item)
    return pool


def _layer_inputs(outs: dict, z: np.ndarray, i: int) -> np.ndarray:
    return z if i == 0 else outs[f"h{i}"]


def _top_mask(r: np.ndarray, k: int) -> np.ndarray:
    """[B, d_out] bool: the k most strongly routed units of each row."""
    top = np.argpartition(r, -k, axis=1)[:, -k:]
    m = np.zeros(r.shape, bool)
    np.put_along_axis(m, top, True, axis=1)
    return m


# -- edge-spl: the product's kernels ---------------------------------------------------------------

class EdgeSplLearn:
    """Batch 1: FFLearner._learn, the exact code the device runs. Batch B: the mini-batch kernels."""

    def __init__(self, exported, hidden: bool, batch: int, replay: int | None = None):
        self.learner = learner_for(exported, hidden, replay)
        self.hidden, self.batch = hidden, batch
        L = self.learner
        self.n = L.n_layers
        self.k = list(L._k)
        self._T = np.zeros((batch, L.sizes[-1]), np.float32)
        self._scratch = [np.zeros(s, np.float32) for s in L.sizes[1:]]

    @property
    def protos(self):
        return self.learner.protos_

    def step(self, item: dict) -> None:
        L = self.learner
        if self.batch == 1:
            L._learn(item["outs"], item["z"], item["label"], self.hidden)
            return
        pos, z = item["pos"], item["z"]
        if self.hidden:
            neg, zn = item["neg"], item["zn"]
            lr = L._lr_hidden32
            for i in range(self.n - 1):
                m = _top_mask(pos[f"r{i}"], self.k[i])
                Tp = np.where(m, np.float32(1.0), np.float32(-1.0))
                Tn = np.where(m, np.float32(0.0), np.float32(-1.0))
                P, g = L.protos_[i]
                _ff_update_batch(_layer_inputs(pos, z, i), pos[f"r{i}"], Tp, P, g, lr, L.counts_[i])
                _ff_update_batch(_layer_inputs(neg, zn, i), neg[f"r{i}"], Tn, P, g, lr, self._scratch[i])
        T = self._T
        T.fill(0.0)
        T[np.arange(self.batch), item["labels"]] = 1.0
        P, g = L.protos_[-1]
        L.head_steps_ += 1
        corr = np.float32(1.0 - L.rms_decay ** L.head_steps_)
        _ff_update_rms_batch(_layer_inputs(pos, z, self.n - 1), pos["logits"], T, P, g, L.vP_, L.vg_,
                             L._lr_head32, L._lr_gate32, L._decay32, corr, L.counts_[-1])


class _Replay:
    """FFLearner's replay buffer for the numpy and torch versions: the last replay_size labelled
    head inputs, and `replay` picks among them per labelled sample, drawn from the same
    SplitMix64 stream as the learner's head kernel (kernels.replay_picks, vectorised numpy),
    so all three step the same samples."""

    def __init__(self, d_head: int, zeros, replay: int | None = None):
        self.replay = HP["replay"] if replay is None else replay
        self.U = [zeros(d_head) for _ in range(HP["replay_size"])]
        self.Y = [0] * HP["replay_size"]
        self.n = 0
        self.state = _DEFAULTS["seed"]   # FFLearner's replay_rng_ starts at its seed

    def picks(self) -> list:
        """The (input, label) pairs to replay after a labelled sample's own step."""
        n = min(self.n, HP["replay_size"])
        if self.replay == 0 or n == 0:
            return []
        self.state, idx = replay_picks(self.state, n, self.replay)
        return [(self.U[i], self.Y[i]) for i in idx]

    def store(self, h, label: int) -> None:
        """Keep (h, label), replacing the oldest: after its replay, as the learner does."""
        if self.replay > 0:
            slot = self.n % HP["replay_size"]
            self.U[slot][:] = h
            self.Y[slot] = label
            self.n += 1


# -- the same math in plain numpy ------------------------------------------------------------------

class NumpyLearn:
    """Vectorised float32 numpy, written as one would: fancy indexing, outer products, matmul."""

    def __init__(self, exported, hidden: bool, batch: int, replay: int | None = None):
        self.protos = [(P.copy(), g.copy()) for P, g in exported.protos]
        sizes = exported.manifest.sizes
        self.n = len(sizes) - 1
        self.hidden, self.batch = hidden, batch
        self.k = [max(1, math.ceil(HP["hidden_frac"] * s)) for s in sizes[1:-1]]
        self.counts = [np.zeros(s, np.float32) for s in sizes[1:]]
        self.vP = np.zeros((sizes[-1], layer_dims(sizes)[-1][0]), np.float32)
        self.vg = np.zeros(sizes[-1], np.float32)
        self.steps = 0
        self.inv = [np.float32(1.0 / math.sqrt(d)) for d, _ in layer_dims(sizes)]
        self.replay = _Replay(layer_dims(sizes)[-1][0], lambda n: np.zeros(n, np.float32), replay)

    def _head(self, gr: np.ndarray, e: np.ndarray, n: int) -> None:
        decay = HP["rms_decay"]
        self.steps += 1
        corr = 1.0 - decay ** self.steps
        P, g = self.protos[-1]
        self.vP *= decay
        self.vP += (1.0 - decay) * gr * gr
        P -= HP["lr_head"] * gr / np.sqrt(self.vP / corr + RMS_EPS)
        self.vg *= decay
        self.vg += (1.0 - decay) * e * e
        g += HP["lr_gate"] * e / np.sqrt(self.vg / corr + RMS_EPS)
        self.counts[-1] += n

    def step(self, item: dict) -> None:
        lr = HP["lr_hidden"]
        if self.batch == 1:
            outs, z = item["outs"], item["z"]
            if self.hidden:
                for i in range(self.n - 1):
                    r, h = outs[f"r{i}"], _layer_inputs(outs, z, i)
                    top = np.argpartition(r[0], -self.k[i])[-self.k[i]:]
                    ep = lr * (1.0 / (1.0 + np.exp(-r[0, top])) - 1.0)
                    en = lr * (1.0 / (1.0 + np.exp(-r[1, top])))
                    P, g = self.protos[i]
                    P[top] -= (np.outer(ep, h[0]) + np.outer(en, h[1])) * self.inv[i]
                    g[top] += ep + en
                    self.counts[i][top] += 1.0
            G = outs["logits"][0]
            e = 1.0 / (1.0 + np.exp(-G))
            e[item["label"]] -= 1.0
            h = _layer_inputs(outs, z, self.n - 1)[0]
            self._head(np.outer(e * self.inv[-1], h), e, 1)
            P, g = self.protos[-1]
            for u, y in self.replay.picks():
                e = 1.0 / (1.0 + np.exp(-(P @ u * self.inv[-1] - g)))
                e[y] -= 1.0
                self._head(np.outer(e * self.inv[-1], u), e, 0)
            self.replay.store(h, item["label"])
            return
        pos, z = item["pos"], item["z"]
        if self.hidden:
            neg, zn = item["neg"], item["zn"]
            for i in range(self.n - 1):
                m = _top_mask(pos[f"r{i}"], self.k[i])
                Ep = lr * (1.0 / (1.0 + np.exp(-pos[f"r{i}"])) - 1.0) * m
                En = lr * (1.0 / (1.0 + np.exp(-neg[f"r{i}"]))) * m
                P, g = self.protos[i]
                P -= (Ep.T @ _layer_inputs(pos, z, i) + En.T @ _layer_inputs(neg, zn, i)) * self.inv[i]
                g += (Ep + En).sum(0)
                self.counts[i] += m.sum(0)
        E = 1.0 / (1.0 + np.exp(-pos["logits"]))
        E[np.arange(self.batch), item["labels"]] -= 1.0
        H = _layer_inputs(pos, z, self.n - 1)
        self._head((E.T @ H) * self.inv[-1], E.sum(0), self.batch)


# -- the same math in PyTorch (CPU, 1 thread) ------------------------------------------------------

class TorchLearn:
    """The numpy version's math with torch tensors, in place where torch allows it."""

    def __init__(self, exported, hidden: bool, batch: int, replay: int | None = None):
        import torch
        self.t = torch
        self.protos = [(torch.tensor(P), torch.tensor(g)) for P, g in exported.protos]
        sizes = exported.manifest.sizes
        self.n = len(sizes) - 1
        self.hidden, self.batch = hidden, batch
        self.k = [max(1, math.ceil(HP["hidden_frac"] * s)) for s in sizes[1:-1]]
        self.counts = [torch.zeros(s) for s in sizes[1:]]
        self.vP = torch.zeros((sizes[-1], layer_dims(sizes)[-1][0]))
        self.vg = torch.zeros(sizes[-1])
        self.steps = 0
        self.inv = [1.0 / math.sqrt(d) for d, _ in layer_dims(sizes)]
        self.replay = _Replay(layer_dims(sizes)[-1][0], torch.zeros, replay)

    def convert(self, pool: list[dict]) -> list[dict]:
        """The pool as tensors, converted before timing (a torch device would have them so)."""
        t = self.t

        def conv(v):
            if isinstance(v, dict):
                return {k: conv(x) for k, x in v.items()}
            if isinstance(v, np.ndarray):
                return t.from_numpy(np.ascontiguousarray(v))
            return v
        return [conv(item) for item in pool]

    def _head(self, gr, e, n: int) -> None:
        t, decay = self.t, HP["rms_decay"]
        self.steps += 1
        corr = 1.0 - decay ** self.steps
        P, g = self.protos[-1]
        self.vP.mul_(decay).addcmul_(gr, gr, value=1.0 - decay)
        P.addcdiv_(gr, t.sqrt(self.vP / corr + RMS_EPS), value=-HP["lr_head"])
        self.vg.mul_(decay).addcmul_(e, e, value=1.0 - decay)
        g.addcdiv_(e, t.sqrt(self.vg / corr + RMS_EPS), value=HP["lr_gate"])
        self.counts[-1] += n

    def step(self, item: dict) -> None:
        t, lr = self.t, HP["lr_hidden"]
        if self.batch == 1:
            outs, z = item["outs"], item["z"]
            if self.hidden:
                for i in range(self.n - 1):
                    r, h = outs[f"r{i}"], _layer_inputs(outs, z, i)
                    top = t.topk(r[0], self.k[i]).indices
                    ep = lr * (t.sigmoid(r[0, top]) - 1.0)
                    en = lr * t.sigmoid(r[1, top])
                    P, g = self.protos[i]
                    P.index_add_(0, top, (t.outer(ep, h[0]) + t.outer(en, h[1])) * self.inv[i], alpha=-1.0)
                    g.index_add_(0, top, ep + en)
                    self.counts[i].index_add_(0, top, t.ones(len(top)))
            e = t.sigmoid(outs["logits"][0])
            e[item["label"]] -= 1.0
            h = _layer_inputs(outs, z, self.n - 1)[0]
            self._head(t.outer(e * self.inv[-1], h), e, 1)
            P, g = self.protos[-1]
            for u, y in self.replay.picks():
                e = t.sigmoid(P @ u * self.inv[-1] - g)
                e[y] -= 1.0
                self._head(t.outer(e * self.inv[-1], u), e, 0)
            self.replay.store(h, item["label"])
            return
        pos, z = item["pos"], item["z"]
        if self.hidden:
            neg, zn = item["neg"], item["zn"]
            for i in range(self.n - 1):
                r = pos[f"r{i}"]
                m = t.zeros_like(r).scatter_(1, t.topk(r, self.k[i], dim=1).indices, 1.0)
                Ep = lr * (t.sigmoid(r) - 1.0) * m
                En = lr * t.sigmoid(neg[f"r{i}"]) * m
                P, g = self.protos[i]
                P.sub_((Ep.T @ _layer_inputs(pos, z, i) + En.T @ _layer_inputs(neg, zn, i)) * self.inv[i])
                g.add_((Ep + En).sum(0))
                self.counts[i].add_(m.sum(0))
        E = t.sigmoid(pos["logits"])
        E[t.arange(self.batch), item["labels"]] -= 1.0
        H = _layer_inputs(pos, z, self.n - 1)
        self._head((E.T @ H) * self.inv[-1], E.sum(0), self.batch)


# -- work counted for the roofline -----------------------------------------------------------------

def work(sizes, hidden: bool, batch: int, pool: list[dict] | None = None, replay: int | None = None) -> dict:
    """FLOPs, bytes and working set of one learn step (minimum traffic: every touched P and vP
    element read and written once, every input read once; exp/sqrt/div count as one FLOP).
    head, per element of the C x d head: gradient 1, v 4, step 6 (v/corr, +eps, sqrt, lr*gr, /, -)
    plus the mini-batch's 2 per sample; at batch 1, each replayed step adds the routing of its
    stored input (2 per element) and the same step (11 per element), and reads that input;
    hidden, per element of a touched row: 2 per sample and pass (multiply, subtract)."""
    d, C = layer_dims(sizes)[-1]
    B = batch
    flops = C * d * (11 if B == 1 else 10 + 2 * B) + B * C * 10
    nbytes = C * d * 16 + B * d * 4 + B * C * 8 + C * 12
    ws = C * d * 8 + B * d * 4
    R = HP["replay"] if replay is None else replay
    if B == 1 and R > 0:
        flops += R * (C * d * 13 + C * 10)
        nbytes += R * d * 4 + d * 4            # the replayed inputs read, this one stored
        ws += HP["replay_size"] * d * 4
    if hidden:
        for i, (d_in, d_out) in enumerate(zip(sizes[:-2], sizes[1:-1])):
            k = max(1, math.ceil(HP["hidden_frac"] * d_out))
            rows = k if B == 1 else _rows_touched(pool, i, k)
            flops += 2 * 2 * B * k * d_in + (0 if B == 1 else 2 * rows * d_in) + 2 * B * k * 10
            nbytes += rows * d_in * 8 + 2 * B * d_in * 4 + 2 * B * d_out * 4 + rows * 8
            ws += d_out * d_in * 4 + 2 * B * d_in * 4
    return {"flops": float(flops), "bytes": float(nbytes), "working_set_bytes": int(ws)}


def _rows_touched(pool, i: int, k: int) -> float:
    """Mean number of units some sample of a mini-batch is positive for."""
    if not pool:
        return 0.0
    return float(np.mean([_top_mask(item["pos"][f"r{i}"], k).any(0).sum() for item in pool]))


def max_diff(a_protos, b_protos) -> float:
    """Largest |difference| between two implementations' prototypes and gates."""
    out = 0.0
    for (P, g), (Q, h) in zip(a_protos, b_protos):
        Q, h = (np.asarray(v.numpy() if hasattr(v, "numpy") else v) for v in (Q, h))
        out = max(out, float(np.abs(P - Q).max()), float(np.abs(g - h).max()))
    return out
