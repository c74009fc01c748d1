"""The learners `edge-spl bench adapt` compares. Each has `step(x_raw, label) -> predicted class`:
predict the raw sample first, then learn from `label` (-1: not revealed). A learner is made fresh
for every (stream, regime) from the same pretrained model.

The product's learner is built only through `FFLearner(model, **kwargs)`; an ablation is a name
and its kwargs in EDGE_SPL_VARIANTS.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_spl.data import Dataset
from edge_spl.manifest import ExportedModel
from edge_spl.model import ModelState
from edge_spl.spl import forward, standardize

EDGE_SPL_VARIANTS = {
    "edge-spl": {},                               # FFLearner defaults
    "edge-spl:ff-only": {"alpha": 0.0},           # no input re-standardisation
    "edge-spl:norm-only": {"lr_head": 0.0},       # no label-conditioned head step
}
LEARNERS = ["frozen", *EDGE_SPL_VARIANTS, "bp", "slda", "last-label", "river-lr", "river-arf"]
# From-scratch learners have no model without labels; ARF is slow and only asked for with all labels.
ONLY_IN = {"river-lr": ("5pct", "all"), "river-arf": ("all",)}

BP_LR = 0.1           # SGD step of BP fine-tuning: best of 0.003..1 on gas seeds 0-1 (docs/bench-adapt.md)
SLDA_SHRINKAGE = 1e-4  # Hayes & Kanan's default


def runs_in(name: str, regime: str) -> bool:
    return regime in ONLY_IN.get(name, (regime,))


@dataclass
class Context:
    """What every learner may be built from: one pretrained model and its training data."""
    state: ModelState
    exported: ExportedModel
    train: Dataset
    class_names: list[str]
    seed: int


def make_learner(name: str, ctx: Context):
    if name == "frozen":
        return Frozen(ctx.exported)
    if name in EDGE_SPL_VARIANTS:
        return EdgeSpl(ctx.exported, seed=ctx.seed, **EDGE_SPL_VARIANTS[name])
    if name == "bp":
        return BPFineTune(ctx.state, BP_LR)
    if name == "slda":
        return SLDALearner(ctx.state, ctx.train, ctx.class_names, SLDA_SHRINKAGE)
    if name == "last-label":
        return LastLabel(Frozen(ctx.exported))
    if name == "river-lr":
        from river import linear_model, multiclass, preprocessing
        return RiverLearner(preprocessing.StandardScaler()
                            | multiclass.OneVsRestClassifier(linear_model.LogisticRegression()),
                            ctx.state.feature_names)
    if name == "river-arf":
        from river import forest, preprocessing
        return RiverLearner(preprocessing.StandardScaler() | forest.ARFClassifier(seed=ctx.seed),
                            ctx.state.feature_names)
    raise ValueError(f"unknown learner {name!r}; expected one of {LEARNERS}")


class Frozen:
    """The exported model as the device runs it (onnxruntime, one sample per call), never updated,
    on the training standardisation."""

    def __init__(self, exported: ExportedModel):
        from edge_spl.device.session import OnnxModel

        self.onnx = OnnxModel(exported)
        self.protos = exported.protos
        self.mean = np.asarray(exported.manifest.mean, np.float32)
        self.std = np.asarray(exported.manifest.std, np.float32)

    def step(self, x, label: int = -1) -> int:
        z = standardize(x[None, :], self.mean, self.std)
        return int(np.argmax(self.onnx.run(z, self.protos)["logits"][0]))


class EdgeSpl:
    def __init__(self, exported: ExportedModel, **kwargs):
        from edge_spl.device.learner import FFLearner

        self.learner = FFLearner(exported, **kwargs)

    def step(self, x, label: int = -1) -> int:
        return self.learner.step(x, label)[0]


class LastLabel:
    """Persistence: predict the last revealed label; before any, the frozen model's prediction."""

    def __init__(self, fallback):
        self.fallback = fallback
        self.last_ = -1

    def step(self, x, label: int = -1) -> int:
        pred = self.last_ if self.last_ >= 0 else self.fallback.step(x)
        if label >= 0:
            self.last_ = int(label)
        return pred


class BPFineTune:
    """Backprop fine-tuning of every layer's P, g (torch SGD on the cross-entropy of the SPLModel),
    one step per revealed label, on the fixed training standardisation. The hard masks give hidden
    P, g no cross-entropy gradient, so in effect only the head moves; W, b stay as pretrained."""

    def __init__(self, state: ModelState, lr: float):
        import torch

        from edge_spl.export.spl_torch import SPLModel

        self.torch = torch
        self.model = SPLModel.from_state(state).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        params = self.model.routing_parameters() + [self.model.head.P, self.model.head.g]
        for p in params:
            p.requires_grad_(True)
        self.opt = torch.optim.SGD(params, lr=lr)
        self.mean, self.std = state.mean, state.std

    def step(self, x, label: int = -1) -> int:
        torch = self.torch
        z = torch.from_numpy(standardize(x[None, :], self.mean, self.std))
        if label < 0:
            with torch.no_grad():
                return int(self.model(z)[0].argmax())
        logits = self.model(z)
        pred = int(logits[0].argmax())
        self.opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(logits, torch.tensor([int(label)])).backward()
        self.opt.step()
        return pred


class StreamingLDA:
    """Streaming linear discriminant analysis (Hayes & Kanan, CVPR-W 2020): running class means and
    one shared covariance, predicting with the inverse of the covariance shrunk towards I:
        score_k(h) = mu_k' L h - mu_k' L mu_k / 2,  L = ((1 - s) Sigma + s I)^-1.
    The covariance is the pooled within-class covariance, kept as a scatter sum updated with each
    class's own count (Welford), so N streaming updates equal one batch computation exactly;
    Hayes & Kanan's streaming step weighs by the total count instead, an approximation of this."""

    def __init__(self, n_classes: int, dim: int, shrinkage: float = SLDA_SHRINKAGE):
        if not 0.0 < shrinkage <= 1.0:
            raise ValueError(f"shrinkage {shrinkage}: expected a number in (0, 1]")
        self.n_classes, self.dim, self.shrinkage = int(n_classes), int(dim), float(shrinkage)
        self.means_ = np.zeros((n_classes, dim))
        self.counts_ = np.zeros(n_classes)
        self.scatter_ = np.zeros((dim, dim))
        self._weights = None   # (W [dim, C], c [C]), recomputed after learning

    def fit_base(self, H: np.ndarray, y: np.ndarray) -> "StreamingLDA":
        """Initialise from a batch (the pretraining data's features)."""
        H = np.asarray(H, np.float64)
        for k in range(self.n_classes):
            Hk = H[y == k]
            if len(Hk):
                self.means_[k] = Hk.mean(axis=0)
                self.counts_[k] = len(Hk)
                D = Hk - self.means_[k]
                self.scatter_ += D.T @ D
        self._weights = None
        return self

    def learn_one(self, h: np.ndarray, y: int) -> None:
        n = self.counts_[y]
        d = np.asarray(h, np.float64) - self.means_[y]
        self.scatter_ += (n / (n + 1.0)) * np.outer(d, d)
        self.means_[y] += d / (n + 1.0)
        self.counts_[y] = n + 1.0
        self._weights = None

    @property
    def covariance_(self) -> np.ndarray:
        return self.scatter_ / max(self.counts_.sum(), 1.0)

    def _solve(self):
        import torch   # one-threaded LAPACK; numpy's OpenBLAS threads thrash on a busy 2-core box

        s = self.shrinkage
        A = torch.from_numpy((1.0 - s) * self.covariance_ + s * np.eye(self.dim))
        B = torch.from_numpy(np.ascontiguousarray(self.means_.T))
        try:
            W = torch.cholesky_solve(B, torch.linalg.cholesky(A)).numpy()
        except RuntimeError:   # not positive definite by rounding: fall back to a general solve
            W = torch.linalg.solve(A, B).numpy()
        c = 0.5 * np.sum(self.means_.T * W, axis=0)
        c[self.counts_ == 0] = np.inf   # a class never seen is never predicted
        return W, c

    def scores(self, h: np.ndarray) -> np.ndarray:
        if self._weights is None:
            self._weights = self._solve()
        W, c = self._weights
        return np.asarray(h, np.float64) @ W - c

    def predict_one(self, h: np.ndarray) -> int:
        return int(np.argmax(self.scores(h)))


def last_hidden(state: ModelState, X_raw: np.ndarray) -> np.ndarray:
    """The frozen model's last hidden features with its input, [z, h] (the head's input before
    any whitening: SLDA has a full covariance of its own), on the training standardisation."""
    layers = state.layers[:-1] + [{k: v for k, v in state.layers[-1].items() if k != "T"}]
    _, hs, _ = forward(layers, standardize(X_raw, state.mean, state.std))
    return hs[-1]


class SLDALearner:
    """Streaming LDA on the frozen model's last hidden features, initialised from the pretraining
    data; learns only from revealed labels."""

    def __init__(self, state: ModelState, train: Dataset, class_names: list[str], shrinkage: float):
        self.state = state
        labelled = np.array([v is not None for v in train.y])
        index = {c: k for k, c in enumerate(class_names)}
        y = np.array([index[v] for v in train.y if v is not None], np.int64)
        H = last_hidden(state, np.asarray(train.X, np.float32)[labelled])
        self.lda = StreamingLDA(len(class_names), H.shape[1], shrinkage).fit_base(H, y)

    def step(self, x, label: int = -1) -> int:
        h = last_hidden(self.state, x[None, :])[0]
        pred = self.lda.predict_one(h)
        if label >= 0:
            self.lda.learn_one(h, label)
        return pred


class RiverLearner:
    """A river classifier from scratch on raw features; learns only from revealed labels. Before
    its first label it has no prediction (counted as wrong)."""

    def __init__(self, model, feature_names: list[str]):
        self.model = model
        self.names = list(feature_names)

    def step(self, x, label: int = -1) -> int:
        d = dict(zip(self.names, x.tolist()))
        p = self.model.predict_one(d)
        if label >= 0:
            self.model.learn_one(d, int(label))
        return -1 if p is None else int(p)
