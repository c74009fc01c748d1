"""The device learner: prequential prediction plus Forward-Forward adaptation of prototypes and
gates, and the bookkeeping that lets local learning and server releases be combined.

Per sample (`FFLearner.step`):
  1. re-standardise the raw input with running (EMA) mean/variance, clipped to +-z_clip;
  2. one onnxruntime call on two rows: the real z and a hybrid negative (each feature from z or
     from the previous sample's z, by a seeded random mask);
  3. predict from row 0 before any update (prequential);
  4. hidden layers, unsupervised FF: the hidden_frac most strongly routed units of the positive
     row are pushed on (target 1) for it and off (target 0) for the negative row;
  5. with a label, the head: label-conditioned FF on the class prototypes (true class positive,
     the others negative) -- one-vs-rest logistic steps on the logits, each parameter's step
     scaled by the running RMS of its gradient (a diagonal second-order preconditioner: with
     5% labels it lifts gas drift accuracy by ~9 points over plain steps; docs/device.md). The
     head's input is whitened by the model (a fixed T in the graph; edge_spl.spl), so these
     per-coordinate steps work on decorrelated coordinates.

Sync bookkeeping: `protos_` (what onnxruntime is fed) = `base_` (the last adopted release)
+ the sum of `outstanding_` deltas (pushed, not yet in a release) + unpushed local changes.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from edge_spl.errors import DataError
from edge_spl.manifest import ExportedModel, proto_values_ok
from edge_spl.protocol import TRANSIENT_REJECTIONS, LayerDelta, PrototypeDelta, Release, check_name, split_delta

from .kernels import _ema_standardize, _ff_head_step, _ff_hidden_step, _ff_update_pair, head_arena, var_floor
from .session import OnnxModel

log = logging.getLogger("edge_spl.device")


class FFLearner:
    """Hyper-parameters are the constructor's arguments under the same names; learned state is in
    trailing-underscore attributes.

    lr_head     step size of the label-conditioned FF on the head prototypes (0 = off)
    lr_gate     step size of the head's gates (class biases) in that step; larger than lr_head,
                so the class balance of a drifted stream is picked up from a few labels
    rms_decay   decay of the running mean of squared head gradients that scales each step
                (RMSprop); 0 = plain, unscaled FF steps with lr_head for prototypes and gates
    lr_hidden   step size of the unsupervised FF on hidden prototypes and gates (0 = off, the
                default: on gas drift it never raised accuracy, at any step size, and it makes
                every delta ~40x larger; see docs/device.md)
    hidden_frac fraction of a hidden layer's units (the most strongly routed) that a sample is
                positive for
    alpha       EMA rate of the running input mean/variance (0 = keep the training statistics);
                0.003 rather than 0.01, because a stream that dwells on one class for hundreds of
                samples would otherwise have that class's own mean subtracted away
    mix         probability that a feature of the negative comes from the previous sample
    replay      head steps replayed from the last `replay_size` labelled samples after each label
                (latent replay: their head inputs are kept, so a step costs one small dot product
                per class, no network pass); gas drift, shuffled, 3 seeds: all labels 97.9 -> 98.3 %,
                5 % labels 89.2 -> 91.2 % (docs/device.md). 0 = off
    replay_size how many labelled head inputs are kept for replay
    """

    def __init__(self, model: ExportedModel, device_id: str = "device", lr_head: float = 0.03,
                 lr_gate: float = 0.2, rms_decay: float = 0.99, lr_hidden: float = 0.0,
                 hidden_frac: float = 0.25, alpha: float = 0.003, mix: float = 0.5, replay: int = 16,
                 replay_size: int = 32, seed: int = 0):
        check_name("device id", device_id)
        for name, v, lo, hi in (("lr_head", lr_head, 0.0, 10.0), ("lr_gate", lr_gate, 0.0, 10.0),
                                ("rms_decay", rms_decay, 0.0, 0.9999), ("lr_hidden", lr_hidden, 0.0, 10.0),
                                ("hidden_frac", hidden_frac, 1e-9, 1.0), ("alpha", alpha, 0.0, 1.0),
                                ("mix", mix, 0.0, 1.0), ("replay", replay, 0, 1000),
                                ("replay_size", replay_size, 1, 100_000)):
            if not (isinstance(v, (int, float)) and lo <= v <= hi):
                raise ValueError(f"{name} = {v!r}: expected a number in [{lo:g}, {hi:g}]")
        self.model = model
        self.device_id = device_id
        self.lr_head = float(lr_head)
        self.lr_gate = float(lr_gate)
        self.rms_decay = float(rms_decay)
        self.lr_hidden = float(lr_hidden)
        self.hidden_frac = float(hidden_frac)
        self.alpha = float(alpha)
        self.mix = float(mix)
        self.replay = int(replay)
        self.replay_size = int(replay_size)
        self.seed = int(seed)

        m = model.manifest
        m.check_prototypes(model.protos)
        self.sizes = list(m.sizes)
        self.n_layers = m.n_layers
        d = self.sizes[0]

        self.mean_ = np.asarray(m.mean, np.float32).copy()
        self.var_ = np.square(np.asarray(m.std, np.float32))
        self.protos_ = [(np.array(P, np.float32, order="C"), np.array(g, np.float32, order="C"))
                        for P, g in model.protos]
        self.base_ = [(P.copy(), g.copy()) for P, g in self.protos_]
        self.base_version_ = 0
        self.base_history_ = ""            # the version history base_version_ counts in ("" = unknown)
        self.outstanding_: list[PrototypeDelta] = []
        # seq -> what the server acked for an outstanding delta: the version it was merged into (at
        # most), or -1 for refused for good (note_ack)
        self.settled_: dict[int, int] = {}
        self.next_seq_ = 1
        # counts_[-1], protos_[-1], vP_, vg_, replay_u_, replay_y_ and head_state_ become views into
        # the head kernel's arena (_pack_head): update them in place, never rebind them
        self.counts_ = [np.zeros(s, np.float32) for s in self.sizes[1:]]
        # running mean of the squared head gradients and the number of head steps (local, not synced)
        self.vP_ = np.zeros(m.proto_shapes()[-1][0], np.float32)
        self.vg_ = np.zeros(self.sizes[-1], np.float32)
        # the last replay_size labelled head inputs (a ring)
        self.replay_u_ = np.zeros((self.replay_size, m.proto_shapes()[-1][0][1]), np.float32)
        self.replay_y_ = np.zeros(self.replay_size, np.int64)
        # the head kernel's counters, updated by it in place: RMS head steps taken, labelled
        # inputs ever stored for replay, and the replay picks' random stream (SplitMix64 state,
        # its 64 bits as int64); see head_steps_, replay_n_, replay_rng_
        self.head_state_ = np.zeros(3, np.int64)
        self.replay_rng_ = self.seed
        self.n_samples_ = 0
        self.prev_z_ = np.zeros(d, np.float32)
        self.has_prev_ = False
        self.rng_ = np.random.default_rng(self.seed)
        self._build()

    def _build(self) -> None:
        """Session, work buffers and the head arena: derived from the model and the learned arrays
        (which move into the arena), never saved or pickled."""
        d = self.sizes[0]
        self.onnx = OnnxModel(self.model)
        self._alpha32 = np.float32(self.alpha)
        self._var_floor = var_floor(self.model.manifest.std)
        self._zclip32 = np.float32(self.model.manifest.z_clip)
        self._lr_hidden32 = np.float32(self.lr_hidden)
        self._lr_head32 = np.float32(self.lr_head)
        self._lr_gate32 = np.float32(self.lr_gate)
        self._decay32 = np.float32(self.rms_decay)
        self._z = np.zeros((2, d), np.float32)
        hidden = self.sizes[1:-1]
        self._k = [max(1, math.ceil(self.hidden_frac * s)) for s in hidden]
        self._rows = [np.zeros(s, np.int64) for s in hidden]
        self._r_names = [f"r{i}" for i in range(self.n_layers)]
        self._h_names = [f"h{i}" for i in range(self.n_layers)]
        self._work = [np.zeros(s, np.float32) for s in hidden]
        self._head_on = self.lr_head > 0
        self._head_in = self._h_names[-1] if self.n_layers > 1 else None   # None: the head reads z
        self._pack_head()
        _warm_up(hidden=self.lr_hidden > 0 and self.n_layers > 1)

    def _pack_head(self) -> None:
        """Move everything the head kernel updates into one arena (kernels.head_arena), so its call
        takes 4 arguments: protos_[-1], vP_, vg_, replay_u_, replay_y_, counts_[-1] and head_state_
        become views into it, with their values. onnxruntime is bound to the views on the next
        run (a session binds the arrays it is handed)."""
        P, g = self.protos_[-1]
        self._arena, v = head_arena(P.shape[0], P.shape[1], self.replay_size)
        for name, a in (("P", P), ("g", g), ("vP", self.vP_), ("vg", self.vg_), ("U", self.replay_u_),
                        ("Y", self.replay_y_), ("counts", self.counts_[-1]), ("st", self.head_state_)):
            v[name][...] = a
        v["hp"][:] = (self.lr_head, self.lr_gate, self.rms_decay, self.replay)
        self.protos_[-1] = (v["P"], v["g"])
        self.vP_, self.vg_, self.replay_u_, self.replay_y_ = v["vP"], v["vg"], v["U"], v["Y"]
        self.counts_[-1] = v["counts"]
        self.head_state_ = v["st"]

    def __getstate__(self):
        # The onnxruntime session cannot be pickled; it is rebuilt from the model bytes.
        return {k: v for k, v in self.__dict__.items() if k != "onnx" and not k.startswith("_")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._build()

    @property
    def manifest(self):
        return self.model.manifest

    @property
    def head_steps_(self) -> int:
        """RMS head steps taken (own and replayed): the bias correction's step count."""
        return int(self.head_state_[0])

    @head_steps_.setter
    def head_steps_(self, n: int) -> None:
        self.head_state_[0] = n

    @property
    def replay_n_(self) -> int:
        """Labelled head inputs ever stored in the replay ring."""
        return int(self.head_state_[1])

    @replay_n_.setter
    def replay_n_(self, n: int) -> None:
        self.head_state_[1] = n

    @property
    def replay_rng_(self) -> int:
        """State of the replay picks' random stream, an unsigned 64-bit int."""
        return int(self.head_state_[2]) % (1 << 64)

    @replay_rng_.setter
    def replay_rng_(self, s: int) -> None:
        s = int(s) % (1 << 64)
        self.head_state_[2] = s - (1 << 64) if s >= 1 << 63 else s

    # -- per sample ----------------------------------------------------------------------------

    def step(self, x_raw, label: int = -1) -> tuple[int, float]:
        """Predict one raw sample, then learn from it. label: class index, or -1 when unlabeled.
        Returns (predicted class index, its softmax probability)."""
        d = self.sizes[0]
        x = np.ascontiguousarray(x_raw, np.float32)
        if x.shape != (d,):
            raise DataError(f"sample has shape {x.shape}, the model takes {d} features")
        if not np.all(np.isfinite(x)):
            raise DataError("sample holds NaN or infinite values")
        label = int(label)
        if not -1 <= label < self.sizes[-1]:
            raise ValueError(f"label index {label} outside -1..{self.sizes[-1] - 1}")

        z = self._z[0]
        _ema_standardize(x, self.mean_, self.var_, self._var_floor, self._alpha32, self._zclip32, z)
        learn_hidden = self.lr_hidden > 0 and self.has_prev_ and self.n_layers > 1
        if learn_hidden:
            neg = self._z[1]
            neg[:] = z
            take = self.rng_.random(d) < self.mix
            neg[take] = self.prev_z_[take]
            batch = self._z
        else:
            batch = self._z[:1]
        outs = self.onnx.run(batch, self.protos_)
        logits = outs["logits"][0]
        pred = int(np.argmax(logits))
        e = np.exp(logits - logits[pred])
        conf = float(1.0 / e.sum())
        self._learn(outs, batch, label, learn_hidden)
        self.prev_z_[:] = z
        self.has_prev_ = True
        self.n_samples_ += 1
        return pred, conf

    def _learn(self, outs: dict, batch: np.ndarray, label: int, learn_hidden: bool) -> None:
        """The update work of one sample, from its onnxruntime outputs: hidden FF (when on), then
        the head's label-conditioned FF. `edge-spl bench speed` times exactly this ("learn step")."""
        if learn_hidden:
            for i in range(self.n_layers - 1):
                r = outs[self._r_names[i]]
                h = batch if i == 0 else outs[self._h_names[i]]
                k = self._k[i]
                P, g = self.protos_[i]
                # top k of the positive row, then target 1 for it and 0 for the negative on the
                # same units (counted once), in one kernel call
                if _ff_hidden_step(h, r, k, P, g, self._lr_hidden32, self.counts_[i], self._rows[i],
                                   self._work[i]) < 0:
                    # ties at the k-th value: the set is argpartition's pick, as it always was
                    rows = self._rows[i]
                    rows[:k] = np.argpartition(r[0], -k)[-k:]
                    _ff_update_pair(h[0], r[0], h[1], r[1], rows, k, P, g, self._lr_hidden32,
                                    self.counts_[i])
        if label >= 0 and self._head_on:
            # the head step, its replay and the ring store, all in one kernel call on the head
            # arena; each argument costs ~60 ns of call overhead, so the head's inputs go in as the
            # 2-d buffers onnxruntime filled (row 0 is this sample)
            _ff_head_step(batch if self._head_in is None else outs[self._head_in], outs["logits"], label,
                          self._arena)

    # -- sync bookkeeping ----------------------------------------------------------------------

    def _outstanding_sum(self, deltas) -> list[tuple[np.ndarray, np.ndarray]]:
        acc = [(np.zeros_like(P), np.zeros_like(g)) for P, g in self.protos_]
        for dlt in deltas:
            for (aP, ag), L in zip(acc, dlt.layers):
                aP[L.rows] += L.dP
                ag[L.rows] += L.dg
        return acc

    def _unpushed(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """protos - base - sum(outstanding), on rows learned since the last delta (elsewhere it
        is only float rounding, which is dropped rather than carried from release to release)."""
        out = []
        for (P, g), (bP, bg), (sP, sg), c in zip(self.protos_, self.base_,
                                                 self._outstanding_sum(self.outstanding_), self.counts_):
            uP, ug = P - bP - sP, g - bg - sg
            idle = c <= 0
            uP[idle] = 0.0
            ug[idle] = 0.0
            out.append((uP, ug))
        return out

    @property
    def last_seq(self) -> int:
        return self.next_seq_ - 1

    def make_delta(self) -> PrototypeDelta | None:
        """The local learning since the last delta, as one delta to push (see make_deltas);
        None when nothing was learned."""
        deltas = self.make_deltas()
        return deltas[0] if deltas else None

    def make_deltas(self, max_bytes: int | None = None) -> list[PrototypeDelta]:
        """The local learning since the last delta, as deltas to push: one, or with `max_bytes`
        as many (consecutive seqs, each a group of rows) as it takes for each to encode within
        it. They join `outstanding_` until a release covers them. [] when nothing was learned;
        ProtocolError (and nothing changed) when a single row does not fit."""
        if not any(np.any(c > 0) for c in self.counts_):
            return []
        layers = []
        for (uP, ug), c in zip(self._unpushed(), self.counts_):
            rows = np.flatnonzero(c > 0).astype(np.int32)
            layers.append(LayerDelta(rows, np.ascontiguousarray(uP[rows]), np.ascontiguousarray(ug[rows]),
                                     c[rows].copy()))
        whole = PrototypeDelta(self.device_id, self.next_seq_, self.base_version_, layers,
                               self.manifest.onnx_sha256, self.base_history_)
        groups = [layers] if max_bytes is None else split_delta(whole, max_bytes)
        deltas = []
        for group in groups:
            deltas.append(PrototypeDelta(self.device_id, self.next_seq_, self.base_version_, group,
                                         self.manifest.onnx_sha256, self.base_history_))
            self.next_seq_ += 1
        self.outstanding_.extend(deltas)
        for c in self.counts_:
            c.fill(0.0)
        return deltas

    def check_release(self, release: Release) -> str | None:
        """Why `release` cannot be adopted, or None when it can."""
        if not isinstance(release, Release):
            return f"not a Release: {type(release).__name__}"
        if release.model_sha256 != self.manifest.onnx_sha256:
            return (f"release v{release.version} is for model {release.model_sha256[:12]}, "
                    f"this device runs {self.manifest.onnx_sha256[:12]}")
        if len(release.protos) != self.n_layers:
            return f"release v{release.version} has {len(release.protos)} layers, model has {self.n_layers}"
        for i, ((P, g), (mP, mg)) in enumerate(zip(release.protos, self.protos_)):
            if getattr(P, "shape", None) != mP.shape or getattr(g, "shape", None) != mg.shape:
                return f"release v{release.version} layer {i} shapes differ from the model's"
            if not proto_values_ok(P, g):   # NaN, inf, or so large that routing overflows
                return f"release v{release.version} layer {i} has non-finite or absurdly large values"
        if release.version <= self.base_version_ and not self._new_history(release):
            return f"release v{release.version} is not newer than v{self.base_version_}"
        return None

    def _new_history(self, release: Release) -> bool:
        """Whether `release` starts another version history than the base's (the server's database
        was replaced): its version numbers start again, and are not compared with ours."""
        return bool(release.history) and bool(self.base_history_) and release.history != self.base_history_

    def note_ack(self, seq: int, accepted: bool, reason: str, version: int) -> None:
        """What the server said of a delta: merged (or already merged: "duplicate") into a version
        up to `version`, or refused for good (any reason but edge_spl.protocol's transient ones).
        Adopting a release then drops it from the outbox even while the release's contiguous mark
        is held below it by an earlier seq (say one cut for a smaller packet size and not sent), so
        the release's copy of its learning is not added a second time."""
        if not any(d.seq == seq for d in self.outstanding_):
            return
        if accepted or reason == "duplicate":
            self.settled_[seq] = int(version)
        elif reason not in TRANSIENT_REJECTIONS:
            self.settled_[seq] = -1   # refused: nothing of it is in any release; drop it at the next

    def adopt_release(self, release: Release) -> bool:
        """Rebase local learning on a server release: protos = release + outstanding deltas it does
        not cover yet + unpushed changes, written into the arrays onnxruntime is fed. Returns False
        (and logs why) for a release of another model, of other shapes, or not newer."""
        why = self.check_release(release)
        if why is not None:
            # the current release comes again after every reconnect (it is retained): not news
            same = isinstance(release, Release) and release.version == self.base_version_
            log.log(logging.DEBUG if same else logging.WARNING, "refusing release: %s", why)
            return False
        unpushed = self._unpushed()
        covered = int(release.merged.get(self.device_id, 0))
        if self._new_history(release):
            # The server's database was replaced: it has none of our deltas and knows none of our
            # seqs. The outstanding deltas are steps, so they go again, renumbered from 1 (its
            # merged marks count from there) and based on this release; what the old history
            # acked means nothing here. (The server refused, as "other history", any of them that
            # reached it before we saw this release.)
            log.warning("release v%d starts a new version history (%s, was %s): the server's database "
                        "was replaced; sending %d outstanding deltas again, renumbered from 1",
                        release.version, release.history, self.base_history_, len(self.outstanding_))
            self.settled_.clear()
            for k, dl in enumerate(self.outstanding_, 1):
                dl.seq, dl.base_version, dl.history = k, int(release.version), release.history
            self.next_seq_ = len(self.outstanding_) + 1
        self.outstanding_ = [dl for dl in self.outstanding_ if dl.seq > covered
                             and not -1 <= self.settled_.get(dl.seq, release.version + 1) <= release.version]
        self.settled_ = {q: v for q, v in self.settled_.items() if any(dl.seq == q for dl in self.outstanding_)}
        if covered >= self.next_seq_:
            # the server has merged seqs this device never made: its state was lost or reset;
            # continue after them so new deltas are not dropped as duplicates
            log.warning("release v%d has merged seq %d of %s, past this device's %d; continuing at %d",
                        release.version, covered, self.device_id, self.last_seq, covered + 1)
            self.next_seq_ = covered + 1
        pending = self._outstanding_sum(self.outstanding_)
        for (P, g), (rP, rg), (sP, sg), (uP, ug) in zip(self.protos_, release.protos, pending, unpushed):
            np.add(np.asarray(rP, np.float32), sP, out=P)
            P += uP
            np.add(np.asarray(rg, np.float32), sg, out=g)
            g += ug
        self.base_ = [(np.array(P, np.float32), np.array(g, np.float32)) for P, g in release.protos]
        self.base_version_ = int(release.version)
        self.base_history_ = release.history or self.base_history_
        return True


def _warm_up(hidden: bool = True) -> None:
    """Compile (or load from numba's cache) the kernels for the types step() uses, so the first
    sample is not slow and samples/s measures the stream, not the compiler."""
    v = np.zeros(2, np.float32)
    M = np.zeros((2, 2), np.float32)
    one = np.float32(1.0)
    _ema_standardize(v, v.copy(), np.ones(2, np.float32), np.ones(2, np.float32), one, one, v.copy())
    arena, head = head_arena(2, 2, 2)
    head["hp"][:] = (1, 1, 0.5, 1)
    head["st"][1] = 1
    _ff_head_step(M, M.copy(), 0, arena)
    if hidden:   # only then: each kernel costs a compile on a cold cache
        rows = np.zeros(2, np.int64)
        _ff_hidden_step(M, M, 1, M.copy(), v.copy(), one, v.copy(), rows, v.copy())
        _ff_update_pair(v, v, v, v, rows, 1, M, v.copy(), one, v.copy())
